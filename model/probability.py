"""The one numpy softmax: the predictor's calibrated probabilities, the metrics, the benchmarks.

Torch code uses ``torch.softmax``; everything that holds numpy logits (an ONNX
session's outputs, collected evaluation logits, a benchmark's saved outputs)
comes here, so a probability means the same thing wherever it is computed.
"""

from __future__ import annotations

import numpy as np

__all__ = ["softmax"]


def softmax(x: np.ndarray, axis: int = -1) -> np.ndarray:
    """Softmax along ``axis``, in the input's floating precision (integers become float64).

    The maximum along the axis is subtracted first, so logits of any size
    (1e4, -1e4) give finite probabilities instead of overflow. A float32
    input stays float32 (the predictor's maps are large); ``training.metrics``
    passes float64. The input is never modified.
    """
    z = np.asarray(x)
    if not np.issubdtype(z.dtype, np.floating):
        z = z.astype(np.float64)
    if z.size == 0:
        return z.copy()
    z = z - z.max(axis=axis, keepdims=True)
    np.exp(z, out=z)
    z /= z.sum(axis=axis, keepdims=True)
    return z
