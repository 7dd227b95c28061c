"""``tpflax zoo``: every built-in model with its parameter count and bytes at real size.

Counted abstractly (``jax.eval_shape``). A model whose config has
``n_layers`` is counted at one and two layers and extrapolated: its layers are
alike, so the count is exactly linear in the layer count, and the 405B model
lists in milliseconds instead of tracing 126 layers.
"""

from __future__ import annotations

import dataclasses
import functools

from tpflax._src.facts.tree import walk
from tpflax._src.specs import fmt_bytes


@functools.cache
def _count(name: str, n_layers: int | None) -> tuple[int, int]:
    """(parameters, bytes of all variables) of zoo ``name`` at real size, optionally with ``n_layers``."""
    from tpflax import zoo

    model = zoo.get(name, size="real", **({} if n_layers is None else {"n_layers": n_layers}))
    leaves, _ = walk(model.abstract_variables())
    return sum(x.size for x in leaves if x.collection in ("", "params")), sum(x.nbytes for x in leaves)


def real_size(name: str) -> tuple[int, int]:
    """(parameters, bytes) of a zoo model at its real size.

    >>> real_size("gpt2-small")[0]
    124439808
    """
    from tpflax import zoo

    config = zoo.get(name, size="real").config
    layers = getattr(config, "n_layers", None) if dataclasses.is_dataclass(config) else None
    if not isinstance(layers, int) or layers <= 2:
        return _count(name, None)
    (p1, b1), (p2, b2) = _count(name, 1), _count(name, 2)
    return p1 + (layers - 1) * (p2 - p1), b1 + (layers - 1) * (b2 - b1)


def zoo_lines() -> list[str]:
    """One line per zoo name: parameters and bytes at real size."""
    from tpflax import zoo

    rows = [(name, *real_size(name)) for name in zoo.names()]
    width = max(len(n) for n, _, _ in rows)
    out = [f"{'model':<{width}}  {'parameters':>17}  {'bytes (real size)':>17}"]
    out += [f"{n:<{width}}  {p:>17,}  {fmt_bytes(b):>17}" for n, p, b in rows]
    out.append("family names (gpt2, llama, ...) plan a tiny config unless --size real")
    return out
