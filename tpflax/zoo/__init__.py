"""A zoo of small-and-real Flax models for exercising the sharding planner.

Every entry is a :class:`ZooModel`. Family names (``"gpt2"``, ``"llama"``, ...)
default to a tiny config that runs on a laptop CPU; ``size="real"`` gives the
published sizes, which are meant for :meth:`ZooModel.abstract_variables` only.
Named aliases (``"gpt2-small"``, ``"llama-70b"``, ...) are fixed real sizes.

Example:
  >>> from tpflax import zoo
  >>> m = zoo.get("gpt2-small")
  >>> m.abstract_variables()["params"]["wte"]["embedding"].shape
  (50257, 768)
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from typing import Any, NamedTuple

from tpflax._src.errors import ModelLoadError

from ._base import ZooModel, count_params, params_of

__all__ = ["ZooModel", "count_params", "get", "names", "params_of"]


class _Entry(NamedTuple):
    module: str  # family module under tpflax.zoo
    family: str
    presets: dict[str, str]  # size -> preset key in the module's PRESETS


# Order is the order of names(). Family names first within each group, then aliases.
_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry("mlp", "mlp", {"tiny": "tiny", "real": "real"}),
    "cnn": _Entry("cnn", "cnn", {"tiny": "tiny", "real": "resnet18"}),
    "resnet18": _Entry("cnn", "cnn", {"real": "resnet18"}),
    "gpt2": _Entry("gpt2", "gpt2", {"tiny": "tiny", "real": "gpt2-small"}),
    "gpt2-small": _Entry("gpt2", "gpt2", {"real": "gpt2-small"}),
    "llama": _Entry("llama", "llama", {"tiny": "tiny", "real": "llama-2-7b"}),
    "llama-scan": _Entry("llama", "llama", {"tiny": "tiny-scan", "real": "llama-2-7b-scan"}),
    "llama-2-7b": _Entry("llama", "llama", {"real": "llama-2-7b"}),
    "llama-2-7b-scan": _Entry("llama", "llama", {"real": "llama-2-7b-scan"}),
    "llama-70b": _Entry("llama", "llama", {"real": "llama-70b"}),
    "llama-405b": _Entry("llama", "llama", {"real": "llama-405b"}),
    "vit": _Entry("vit", "vit", {"tiny": "tiny", "real": "vit-b16"}),
    "vit-b16": _Entry("vit", "vit", {"real": "vit-b16"}),
    "lstm": _Entry("rnn", "lstm", {"tiny": "lstm-tiny", "real": "lstm-real"}),
    "gru": _Entry("rnn", "gru", {"tiny": "gru-tiny", "real": "gru-real"}),
    "moe": _Entry("moe", "moe", {"tiny": "tiny", "real": "real"}),
    "nnx-mlp": _Entry("nnx_mlp", "nnx-mlp", {"tiny": "tiny", "real": "real"}),
}


def names() -> list[str]:
    """All registered model names, family names and aliases."""
    return list(_REGISTRY)


def get(name: str, size: str | None = None, **overrides: Any) -> ZooModel:
    """Build a zoo model.

    Args:
      name: a name from :func:`names`.
      size: ``"tiny"`` or ``"real"``. Defaults to ``"tiny"`` for family names;
        aliases such as ``"llama-70b"`` only have ``"real"``.
      **overrides: config fields to replace, e.g. ``n_layers=4`` or
        ``param_dtype=jnp.bfloat16``.

    Returns:
      A :class:`ZooModel`.

    Raises:
      ValueError: unknown name, size, or config field.

    Example:
      >>> from tpflax import zoo
      >>> zoo.get("llama", n_layers=1).config.n_layers
      1
    """
    key = tuple(sorted(overrides.items()))
    try:
        hash(key)
    except TypeError:  # e.g. a list-valued override: build uncached
        return _get.__wrapped__(name, size, key)
    return _get(name, size, key)


@functools.cache
def _get(name: str, size: str | None, overrides: tuple[tuple[str, Any], ...]) -> ZooModel:
    # Cached: a ZooModel is immutable, and reusing it reuses its jitted init and graphdef.
    try:
        entry = _REGISTRY[name]
    except KeyError:
        raise ModelLoadError(
            f"unknown zoo model {name!r}; known models: {', '.join(_REGISTRY)}"
        ) from None
    if size is None:
        size = "tiny" if "tiny" in entry.presets else next(iter(entry.presets))
    if size not in entry.presets:
        raise ModelLoadError(
            f"zoo model {name!r} has no size {size!r}; available: {', '.join(entry.presets)}"
        )
    module = importlib.import_module(f"{__name__}.{entry.module}")
    cfg = module.PRESETS[entry.presets[size]]
    if overrides:
        fields = {f.name for f in dataclasses.fields(cfg)}
        unknown = sorted({k for k, _ in overrides} - fields)
        if unknown:
            raise ModelLoadError(
                f"zoo model {name!r}: unknown config field(s) {unknown}; "
                f"{type(cfg).__name__} has {sorted(fields)}"
            )
        cfg = dataclasses.replace(cfg, **dict(overrides))
    return module.build(name, entry.family, size, cfg)
