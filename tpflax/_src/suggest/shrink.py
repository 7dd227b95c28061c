"""The "a smaller global batch would fit" hint, checked: the largest batch that fits on some mesh shape.

When no mesh shape fits, :func:`smaller_batch` prices every mesh shape that
could be planned again at smaller global batches, with the same estimate and
the same memory limit the ranking used, so the batch the hint names does fit,
on the mesh it names, and is a multiple of that mesh's data x fsdp.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tpflax._src.cost.estimate import price_leaves
from tpflax._src.cost.workload import with_batch_size
from tpflax._src.mesh import MeshShape, batch_axes


@dataclass(frozen=True)
class Shrink:
    """A global batch that fits, the mesh it fits on, and its bytes per device."""

    batch: int
    mesh: MeshShape
    shards: int
    needs: int


def smaller_batch(ctx: Any, meshes: list[MeshShape], mem_limit: int, needs: Any) -> Shrink | None:
    """The largest global batch below the workload's that fits on one of ``meshes`` (None: not even 1 per shard).

    Args:
        ctx: the suggestion's :class:`tpflax._src.suggest.search.Context`.
        meshes: the mesh shapes to try (those that could be planned).
        mem_limit: bytes per device the batch must fit in.
        needs: ``Estimate -> bytes`` that must fit (the ranking's own criterion).

    Memory grows with the batch on a given mesh, so each mesh's largest fitting
    multiple of its data x fsdp is found by bisection, every probe priced for real.

    >>> import optax, tpflax
    >>> from tpflax import zoo
    >>> try:
    ...     tpflax.suggest_mesh(zoo.get("llama"), 8, "2MiB", optimizer=optax.adam(1e-3), batch=64)
    ... except tpflax.NoFitError as e:
    ...     print([h for h in e.problems if "smaller" in h][0][:62])
    a smaller global batch: 48 instead of 64 fits on data=1,fsdp=8
    """
    w0 = ctx.workload
    cache: dict[int, Any] = {}

    def fits(ms: MeshShape, size: int) -> int | None:
        if size not in cache:
            cache[size] = with_batch_size(w0, size)
        shared = ctx.shared(ms)
        n = needs(price_leaves(shared.leaves, ms, cache[size]))
        return n if n <= mem_limit else None

    best: Shrink | None = None
    for ms in meshes:
        shards = math.prod(ms.sizes[n] for n in batch_axes(ms))
        lo, hi = 0, (w0.batch.size - 1) // shards  # multiples of shards below the batch: k in [1, hi]
        if hi < 1 or (best is not None and hi * shards <= best.batch):
            continue
        while lo < hi:
            mid = (lo + hi + 1) // 2
            if fits(ms, mid * shards) is not None:
                lo = mid
            else:
                hi = mid - 1
        if lo:
            size = lo * shards
            cand = Shrink(size, ms, shards, fits(ms, size))
            if best is None or (size, -cand.needs) > (best.batch, -best.needs):
                best = cand
    return best
