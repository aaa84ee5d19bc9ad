"""Presets: `preset:NAME` model paths. Published checkpoints installed as packages
(colocate/model/published.py: SmolLM2) and the random tiny ones (colocate/model/tiny.py)
written on first use. The one place that knows every preset name."""
from __future__ import annotations

from colocate.model.model_config import LlamaConfig

PRESET_PREFIX = "preset:"


def tiny_presets() -> dict[str, dict] | None:
    """colocate.model.tiny.PRESETS (HF config.json dicts), or None if not installed."""
    try:
        from colocate.model.tiny import PRESETS
    except ImportError:
        return None
    return PRESETS


def preset_names() -> list[str]:
    from colocate.model.published import PUBLISHED

    return sorted([*(tiny_presets() or {}), *PUBLISHED])


def preset_config(name: str) -> LlamaConfig:
    """The shape of preset `name`: a published checkpoint's (its GGUF header) or a
    built-in tiny one's. The one place that knows presets."""
    from colocate.model.published import is_published, published_path

    if is_published(name):
        return LlamaConfig.from_pretrained(published_path(name))
    presets = tiny_presets()
    if presets is None:
        raise ValueError(f"preset {name!r}: colocate.model.tiny is not available")
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; choose from {preset_names()}")
    return LlamaConfig.from_dict(dict(presets[name]), source=f"{PRESET_PREFIX}{name}")
