"""MixStyle: mix the feature statistics of training patches in the encoder's early levels.

Zhou, Yang, Qiao and Xiang, "Domain Generalization with MixStyle" (ICLR 2021).
A CNN's early feature maps carry a patch's *style* in their per-channel mean
and standard deviation (instance-normalisation and style-transfer work rests on
that) and its *content* in the normalised map. MixStyle replaces each patch's
statistics by a random convex mix of its own and another patch's::

    mu, sigma = x.mean(hw), x.std(hw)          # per patch, per channel, no gradient
    lam ~ Beta(alpha, alpha)
    x <- (x - mu) / sigma * mix(sigma, sigma[perm]) + mix(mu, mu[perm])

so the network sees the same morphology in styles between those of the batch
(rendering style A and B, labs, stain strengths) and cannot rest a class on a
style. It only acts in training mode; evaluation, calibration, export and
inference see the network untouched, and nothing is saved with the weights.

Patches are mixed only with patches of the same stain (``groups``): the stain
head is asked which stain it sees, and a von Kossa patch carrying H&E
statistics would teach it the wrong answer.

The mixer is attached with forward hooks on the modules that produce the
chosen feature levels (``feature_info.module_name()`` of the timm encoder), so
the network class and its state-dict keys stay as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from calcinosis.model import ConfigError


def shuffle_within_groups(groups: torch.Tensor) -> torch.Tensor:
    """A random permutation of ``range(len(groups))`` that maps each index to one of its group."""
    n = groups.shape[0]
    perm = torch.arange(n, device=groups.device)
    for g in torch.unique(groups):
        idx = (groups == g).nonzero(as_tuple=True)[0]
        perm[idx] = idx[torch.randperm(idx.numel(), device=groups.device)]
    return perm


class MixStyle:
    """Forward hook that mixes per-channel feature statistics between batch members.

    ``prob``: chance that a given batch is mixed at a given level (the paper's
    0.5); ``alpha``: the Beta(alpha, alpha) of the mixing weight (0.1: most
    weights near 0 or 1, a mild mix). Set ``groups`` (one integer per batch
    member) before each forward pass to mix only within a group; None mixes
    across the whole batch. Random numbers come from torch's global generator,
    which the trainer seeds and saves with every resume point.
    """

    def __init__(self, prob: float = 0.5, alpha: float = 0.1, eps: float = 1e-6) -> None:
        self.prob = float(prob)
        self.beta = torch.distributions.Beta(float(alpha), float(alpha))
        self.eps = eps
        self.groups: torch.Tensor | None = None

    def mix(self, x: torch.Tensor) -> torch.Tensor:
        """The mixed feature map (same shape, dtype and memory format)."""
        b = x.shape[0]
        if b < 2:
            return x
        if self.groups is not None and self.groups.shape[0] == b:
            perm = shuffle_within_groups(self.groups.to(x.device))
        else:
            perm = torch.randperm(b, device=x.device)
        xf = x.float()
        mu = xf.mean(dim=(2, 3), keepdim=True).detach()
        sigma = (xf.var(dim=(2, 3), keepdim=True) + self.eps).sqrt().detach()
        lam = self.beta.sample((b, 1, 1, 1)).to(x.device)
        mu_mix = lam * mu + (1 - lam) * mu[perm]
        sigma_mix = lam * sigma + (1 - lam) * sigma[perm]
        return ((xf - mu) / sigma * sigma_mix + mu_mix).to(x.dtype)

    def __call__(
        self, module: nn.Module, inputs: tuple, output: torch.Tensor
    ) -> torch.Tensor | None:
        if not module.training or not torch.is_tensor(output) or output.dim() != 4:
            return None
        if torch.rand(()) >= self.prob:
            return None
        return self.mix(output)


def attach_mixstyle(
    encoder: nn.Module, levels: Sequence[int], prob: float, alpha: float
) -> tuple[MixStyle, list[torch.utils.hooks.RemovableHandle]]:
    """Hook one :class:`MixStyle` after each chosen feature level of a timm encoder.

    ``levels`` index ``encoder.feature_info`` (0 = the finest level). Returns
    the mixer (set its ``groups`` per batch) and the hook handles.
    """
    info = encoder.feature_info
    names = list(info.module_name())
    mixer = MixStyle(prob, alpha)
    handles = []
    for level in levels:
        if not 0 <= level < len(names):
            raise ConfigError(
                f"train.mixstyle_levels: level {level} does not exist; this backbone has "
                f"{len(names)} feature levels (0-{len(names) - 1}, strides "
                f"{list(info.reduction())}). MixStyle belongs in the early ones, e.g. [0, 1]."
            )
        module = _find_module(encoder, names[level])
        handles.append(module.register_forward_hook(mixer))
    return mixer, handles


def _find_module(encoder: nn.Module, name: str) -> nn.Module:
    # timm's FeatureListNet flattens nested names ("stages.1" -> "stages_1").
    for candidate in (name, name.replace(".", "_")):
        try:
            return encoder.get_submodule(candidate)
        except AttributeError:
            continue
    raise ConfigError(
        f"train.mixstyle_levels: cannot find the encoder module {name!r} of a feature level; "
        "set train.mixstyle_prob=0 for this backbone."
    )
