"""Attention key/value caches: split like the batch and the heads they store.

A decoding model keeps what its key and value projections wrote in a cache:
flax's ``MultiHeadDotProductAttention(decode=True)`` and transformers' Flax models
in the ``cache`` collection (``cached_key``/``cached_value``), an nnx
``MultiHeadAttention`` in ``nnx.Cache`` variables; each ``(*batch, length, heads,
head_dim)``. It is no parameter, but at serving time it is the largest thing on
a device. Kept whole, every device holds every sequence's keys for every head,
and XLA gathers the new key and value (split by heads like the projections
that make them) to write them in. Split like the projections' heads and like
the batch (:func:`~tpflax._src.mesh.batch_axes`, the one batch-layout rule),
each device writes and reads its own slice, with no collective and the cache's
bytes divided by both.

The heads follow the module's key/value kernel: the tensor axes its output's
heads (or flattened ``heads * head_dim``, split in whole heads) are split over.
A cache beside no such kernel (a fused ``[q|k|v]`` projection, or a cache
planned without its parameters) is split over the batch only.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

from tpflax._src.facts.classify import Facts
from tpflax._src.mesh import TENSOR, MeshShape, batch_axes
from tpflax._src.planner.builders import Proposal
from tpflax._src.specs import entry_axes

_CACHE_NAMES = {"cached_key": "key", "cached_value": "value"}


def _module(f: Facts, path: str) -> str:
    """The module holding ``path`` (a leaf's, or its layer's), without its linen collection (``params/``)."""
    c = f.leaf.collection
    if c and path.split("/", 1)[0] == c:
        path = path.split("/", 1)[1] if "/" in path else ""
    return _parent(path)


def is_cache(f: Facts) -> bool:
    """A float key/value cache leaf: ``cached_key``/``cached_value`` of rank >= 3 in a cache collection."""
    return (f.kind == "state" and f.leaf.collection.lower() == "cache" and f.name in _CACHE_NAMES
            and f.leaf.numeric in ("float", "complex") and len(f.body) >= 3)


def _tensor_axes(entry, ms: MeshShape) -> tuple[str, ...]:
    roles = dict(ms.roles)
    axes = entry_axes(entry)
    return axes if axes and all(roles.get(a) == TENSOR for a in axes) else ()


def _heads_split(f: Facts, k: Facts, p: Proposal, ms: MeshShape) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """The tensor axes the cache's heads dim and head_dim take from kernel ``k``'s proposal ``p``."""
    heads, dim = f.body[-2], f.body[-1]
    out: list[tuple[str, ...]] = [(), ()]

    def ways(axes):
        return math.prod(ms.sizes[a] for a in axes)

    if p.fused is not None:  # [q|k|v] side by side, placed head-aligned: each rank holds whole heads of each
        at, sizes, _ = p.fused
        axes = _tensor_axes(p.spec[at], ms) if heads * dim in sizes else ()
        return (axes if axes and heads % ways(axes) == 0 else ()), ()
    kbody, kspec = k.body, k.body_of(p.spec)
    for i, n in enumerate(kbody):
        if i == 0 and len(kbody) == 2:  # a 2-D column's input features: not what the cache stores
            continue
        axes = _tensor_axes(kspec[i], ms)
        if not axes:
            continue
        if n == heads * dim and len(kbody) == 2 and heads % ways(axes) == 0:
            out[0] = axes  # flattened heads * head_dim split in whole heads
        elif n == heads * dim and len(kbody) == 2 and heads == 1 and dim % ways(axes) == 0:
            out[1] = axes  # multi-query: the one key/value head's features split
        elif n == heads and dim in kbody and heads % ways(axes) == 0 and not out[0]:
            out[0] = axes
        elif n == dim and heads in kbody and dim % ways(axes) == 0 and not out[1]:
            out[1] = axes
    return out[0], out[1]


def _writers(f: Facts, kernels: Mapping[str, list[Facts]], proposals: Mapping[str, Proposal]) -> list[Facts]:
    """The column kernels of the cache's module whose output it stores (``key`` ones for ``cached_key``
    first), a fused ``[q|k|v]`` kernel holding it among its pieces included."""
    heads, dim = f.body[-2], f.body[-1]

    def writes(k: Facts) -> bool:
        p = proposals[k.path]
        if p.fused is not None:
            return heads * dim in p.fused[1]
        return (len(k.body) == 2 and k.body[1] == heads * dim) or (heads in k.body and dim in k.body)

    fits = [k for k in kernels.get(_module(f, f.path), ()) if proposals[k.path].role != "row" and writes(k)]
    which = _CACHE_NAMES[f.name]
    named = [k for k in fits if k.unit_name.lower().startswith((which[0], which)) or which in k.unit_name.lower()]
    return named or fits


def follow_caches(facts: Sequence[Facts], proposals: dict[str, Proposal], forced: Mapping[str, Proposal],
                  ms: MeshShape) -> None:
    """Split every key/value cache over the batch axes and its writer kernel's heads split (in place)."""
    caches = [f for f in facts if is_cache(f) and f.path not in forced and f.path in proposals]
    if not caches:
        return
    kernels: dict[str, list[Facts]] = {}
    for k in facts:
        if k.kind in ("dense", "attention") and k.path in proposals:
            kernels.setdefault(_module(k, k.unit), []).append(k)
    batch = batch_axes(ms)
    for f in caches:
        spec: list = [None] * len(f.body)
        writers = _writers(f, kernels, proposals)
        at = _batch_dim(f, writers)
        rows = f.body[at]
        # all the batch axes or none, as tpflax.batch_sharding places the batch the cache was made for
        on_batch = batch if batch and rows % math.prod(ms.sizes[a] for a in batch) == 0 else ()
        if on_batch:
            spec[at] = on_batch[0] if len(on_batch) == 1 else on_batch
        writer = ""
        for k in writers:
            h, d = _heads_split(f, k, proposals[k.path], ms)
            if h or d:
                spec[-2] = (h[0] if len(h) == 1 else h) or None
                spec[-1] = (d[0] if len(d) == 1 else d) or None
                writer = k.path
                break
        where = [f"layers dim {at - 1} ({f.body[at - 1]}) kept whole"] if at else []
        if on_batch:
            where.append(f"its {rows} rows over {' x '.join(on_batch)} like the batch")
        if writer:
            what = "heads" if spec[-2] else "head_dim"
            where.append(f"its {what} like {writer}, which writes it")
        reason = (f"attention {_CACHE_NAMES[f.name]} cache: " + (", ".join(where) if on_batch or writer else
                  f"kept whole: its {rows} rows divide no batch axes and no kernel beside it splits its heads"))
        strategy = "heads" if writer else ("batch" if on_batch else "replicate")
        proposals[f.path] = Proposal(spec=f.leaf_of(spec), strategy=strategy, reason=reason,
                                     layers_dim=0 if at else f.layers_dim)


def _batch_dim(f: Facts, writers: Sequence[Facts]) -> int:
    """The cache's batch dim: its first, or its second when the first is the layers dim of an ``nn.scan``
    stack (a cache of shape ``(layers, batch, length, heads, head_dim)`` beside stacked writer kernels)."""
    if len(f.body) >= 5 and not f.stacked and any(
            k.stacked and k.leaf.shape[k.layers_at] == f.body[0] for k in writers):
        return 1
    return 0


def _parent(unit: str) -> str:
    return unit.rsplit("/", 1)[0] if "/" in unit else ""
