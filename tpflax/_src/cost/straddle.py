"""Experts stored flat ``(E * f, d)`` (DBRX's checkpoints) split over tensor ranks whose blocks straddle experts.

Read ``(E, f, d)`` by a reshape (:attr:`tpflax._src.cost.scope.Scope.parted`), the flat dim split over ``n`` ranks
that neither divide ``E`` nor are a multiple of it (6 experts over 4) holds no whole expert and no equal slice of each
on a rank. XLA gathers the blocks over ``n / g`` ranks (``g = gcd(E, n)``) into ``g`` parts of whole experts, runs the
experts split ``g`` ways, sums the combine over the ``g`` parts, and sums each part's gradient over the batch at the
part's size before slicing its own block (measured, XLA:CPU data=2,model=4, 6 experts: each kernel's
``f32[384, 64]`` gathered over groups of 2, its gradient all-reduced over data as ``f32[3, 128, 64]``).
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from tpflax._src.cost.optstate import shard_bytes
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import Scope, leaf_itemsize
from tpflax._src.mesh import TENSOR
from tpflax._src.specs import entry_axes


def parted_ranks(s: Scope, path: str) -> Iterator[tuple[int, int, int]]:
    """``(dim, E, n)`` for each stored dim of 2-D ``path`` its contractions read cut into ``(E, minor)``
    (:attr:`Scope.parted`), ``n`` the ranks its tensor axes split that dim over (1: none); nothing for another leaf."""
    d = s.lv.decisions.get(path)
    parted = (s.parted or {}).get(path)
    if d is None or not parted or len(d.shape) != 2:
        return
    t = set(s.axes(path, TENSOR))
    spec = s.lv.specs[path]
    for dim, n_exp in parted.items():
        axes = tuple(a for a in entry_axes(spec[dim]) if a in t) if dim < len(spec) else ()
        yield dim, n_exp, s.size(axes) if axes else 1


def straddled_parts(n_exp: int, n: int) -> int | None:
    """The ``g = gcd(E, n)`` parts of whole experts XLA gathers ``E`` experts stored flat into when ``n`` ranks
    split them neither dividing ``E`` nor a multiple of it; None otherwise (one rank included).

    >>> straddled_parts(6, 4), straddled_parts(8, 4), straddled_parts(2, 4), straddled_parts(6, 1)
    (2, None, None, None)
    """
    return math.gcd(n_exp, n) if n_exp % n and n % n_exp else None


def straddled_split(s: Scope, path: str) -> tuple[int, int, int] | None:
    """``(E, n, g)`` when 2-D ``path``'s tensor axes split a stored dim its contractions read cut into ``(E, f)``
    over ``n`` ranks neither dividing ``E`` nor a multiple of it, ``g = gcd(E, n)`` (:func:`straddled_parts`);
    else None."""
    for _, n_exp, n in parted_ranks(s, path):
        g = straddled_parts(n_exp, n)
        if g is not None:
            return n_exp, n, g
    return None


def straddled_items(s: Scope, pc: object, axes: tuple[str, ...], eng: tuple[int, int, int], count: int,
                    source: str) -> list[CommItem]:
    """A straddled expert pair's collectives around its matmuls: each column's input gradient summed over the ``g``
    parts (backward); the combine's sum over the parts is the estimate's product of two activations
    (:func:`tpflax._src.cost.estimate.split_sum_items`), each kernel's gather :func:`straddle_gather`'s."""
    dec, label = s.lv.decisions, s.lv.label
    _, _, g = eng
    items = []
    if g > 1:
        for c in pc.columns:
            width = dec[c].shape[1 - next(iter((s.parted or {})[c]))]
            items.append(CommItem("all-reduce", axes, s.rows_of(c) * width * s.act_item, g, count, source,
                                  f"column {label[c]}: sum its input gradients over the {g} parts (backward)"))
    return items


def straddle_gather(s: Scope, path: str, d: object, count: int, label: str, item: int) -> CommItem | None:
    """The gather of a straddled kernel's blocks into its part of whole experts, once a step (forward; the
    backward reads it as gathered), over the ``n / g`` ranks of a part, ``item`` bytes an element (XLA:TPU gathers
    a float32 kernel as bfloat16, as its fsdp gathers: measured, v5e:2x4 fsdp=2,model=4, 6 experts, each kernel's
    ``bf16[2, 192, 64]``); None when ``path`` is no such kernel."""
    eng = straddled_split(s, path)
    if eng is None:
        return None
    _, n, g = eng
    t = tuple(s.axes(path, TENSOR))
    # of the blocks as the tensor split leaves them: an fsdp split is gathered first, for compute (measured,
    # XLA:CPU fsdp=2,model=4, 6 experts: each (768, 64) kernel's f32[192, 64] blocks gathered over fsdp, then
    # f32[384, 64] parts over model; priced at the fsdp shard, the estimate was 0.91x the compiled collectives)
    roles = dict(s.mesh.roles)
    spec = tuple(tuple(a for a in entry_axes(e) if roles[a] == TENSOR) or None for e in s.lv.specs[path])
    block = shard_bytes(tuple(d.shape), leaf_itemsize(d), spec, s.mesh) // leaf_itemsize(d) * item
    return CommItem("all-gather", t, block * n / g, n // g, count, label,
                    f"its blocks straddle experts: gathered into {g} part(s) of whole experts")
