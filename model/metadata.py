"""Reading checkpoint metadata of every layout this package has written.

Newer checkpoints keep each setting in one place (``preprocessing``, the
calibration, the top-level inference thresholds); older ones left some of
them only in the saved training config. :func:`setting` is the one lookup
that knows both, so no other module needs to know how a training config is
laid out.
"""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from .errors import CheckpointError

__all__ = [
    "checkpoint_tta",
    "require_known_keys",
    "setting",
    "temperature_for",
    "temperature_tta",
]


def setting(
    meta: dict[str, Any], key: str | None, config_path: tuple[str, ...], default: Any
) -> Any:
    """``meta[key]`` when set, else the saved training config's value at ``config_path``.

    ``setting(meta, "mpp", ("data", "mpp"), None)`` reads ``meta["mpp"]``, else
    ``meta["config"]["data"]["mpp"]``, else None. ``key=None`` looks only in
    the config.
    """
    if key is not None and meta.get(key) is not None:
        return meta[key]
    node: Any = meta.get("config") or {}
    for k in config_path:
        if not isinstance(node, dict) or k not in node:
            return default
        node = node[k]
    return default if node is None else node


def checkpoint_tta(meta: dict[str, Any], requested: str | None = None) -> tuple[str, str | None]:
    """(test-time augmentation mode to run, warning or None) for a checkpoint.

    The mode is ``requested`` when given, else the checkpoint's default
    (``inference.tta`` of its config); the warning comes from
    :func:`calcinosis.model.tta.resolve_tta` when the checkpoint has a
    temperature but none fitted in that mode (see :func:`temperature_for`).
    """
    from .tta import resolve_tta

    fitted = temperature_tta(meta)
    mode, warning = resolve_tta(
        setting(meta, None, ("inference", "tta"), "none"),
        requested,
        fitted=fitted or "none",
        calibrated=fitted is not None,
    )
    return mode, (None if temperature_for(meta, mode) is not None else warning)


def temperature_tta(meta: dict[str, Any]) -> str | None:
    """The test-time augmentation mode of the checkpoint's main temperature (None: no temperature).

    ``temperature`` is fitted in the training config's ``inference.tta``
    (``calibration.tta``); checkpoints calibrated before test-time
    augmentation existed were fitted without it. Checkpoints since per-mode
    calibration also hold ``calibration.temperatures`` (one per mode).
    """
    if meta.get("temperature") is None:
        return None
    return (meta.get("calibration") or {}).get("tta", "none")


def temperature_for(meta: dict[str, Any], mode: str) -> float | None:
    """The temperature fitted in test-time augmentation ``mode``, or None when there is none.

    From ``calibration.temperatures[mode]`` (written by calibration since it
    fits every mode), else ``temperature`` when that was fitted in ``mode``.
    Averaged (d4) logits are less extreme than one pass's, so a temperature
    fitted in one mode mis-calibrates the other.
    """
    per_mode = (meta.get("calibration") or {}).get("temperatures") or {}
    if per_mode.get(mode) is not None:
        return float(per_mode[mode])
    if temperature_tta(meta) == mode:
        return float(meta["temperature"])
    return None


def require_known_keys(section: dict[str, Any], schema: type, name: str, where: str = "") -> None:
    """CheckpointError when a metadata ``section`` has keys the dataclass ``schema`` lacks.

    Such keys come from a newer calcinosis; silently dropping them could
    change what the checkpoint means. ``where`` prefixes the message (a path).
    """
    unknown = sorted(set(section) - {f.name for f in fields(schema)})
    if unknown:
        raise CheckpointError(
            f"{where}metadata '{name}' has keys this version does not know: {unknown}. "
            "It was probably written by a newer calcinosis; upgrade the package."
        )
