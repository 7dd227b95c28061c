"""What XLA gathers when a fused ``[q|k|v]`` split over the tensor axis is reshaped into heads it does not follow.

A Swin or timm attention computes ``qkv = x @ W`` (``W``: ``(C, 3C)``) and reshapes it to
``(..., 3, heads, head_dim)`` before picking ``q, k, v`` apart. Split naively over ``n`` tensor ranks
(``W``'s fused dim, and the output projection's input ``C``), ``n`` contiguous shards of the fused dim
are no shards of the ``(3, heads, head_dim)`` view when ``n`` neither divides nor is divided by the 3
pieces, and, where ``heads`` do not divide by ``n`` either (Swin's 3 and 6 heads on 4 ranks), no shards
of the heads. XLA:CPU then (measured, :func:`head_cut_gathers`):

* forward: gathers the fused output whole before the reshape (every rank then holds every head);
* backward: lays the attention's gradient out by the output projection's split of ``C`` cut into
  ``(heads, head_dim)``: the ``g = gcd(heads, n)`` head groups over ``g`` ranks, the rest of the ranks
  sharing each group. It gathers the projection's input gradient to whole head groups (``C / g`` wide,
  over the ``n / g`` ranks of a group), and, where ``g > 1``, the pieces' gradients whole across the
  ``g`` groups (the fused width, over ``g`` ranks) before the kernel's transposed matmul.

With ``heads`` dividing by ``n`` (``g = n``) this is the gather of the whole output and of the pieces'
gradients that :mod:`tpflax._src.cost.reshard` measured for 4 heads on 4 ranks. Fewer heads that divide
``n`` (2 heads on 4 ranks) cut ``head_dim`` instead, and XLA sums partial attention scores
(:func:`cut_head_scores`; :func:`head_cut_gathers` returns None for them). Separate ``q``, ``k``, ``v``
projections: :func:`split_head_gathers`. A GQA through ``jax.nn.dot_product_attention`` with only its query and
output projections split, its key/value kept whole (the hand layout): :func:`whole_kv`.

Pure arithmetic over sizes: the estimate (:func:`tpflax._src.cost.reshard.fused_items`) and the
planner's candidate that cuts heads (:mod:`tpflax._src.planner.builders`) price the same collectives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def head_cut_gathers(width: int, pieces: int, heads: int | None, n: int) -> tuple[tuple[int, int, str], ...] | None:
    """``((result width, ranks, why), ...)``: the all-gathers one local activation row of a naively split
    fused kernel costs per layer, ``width`` its fused dim cut into ``pieces`` equal pieces each reshaped into
    ``heads`` heads, over ``n`` tensor ranks (a gather's result is ``width`` elements per row, among ``ranks``
    devices). None: not this case, or not modelled (fewer heads than ranks that divide them).

    Measured on XLA:CPU (data=2,model=4 and model=8; a Swin window block, widths 48..96): 3 heads on 4 ranks,
    6 on 4, 6 on 8, 12 on 8, 3 on 2.

    >>> head_cut_gathers(288, 3, 6, 4)  # Swin's 6 heads of 16 over model=4: 2 head groups of 3
    ((288, 4, 'forward: the output whole, before the reshape into heads'), \
(48, 2, 'backward: the output projection input gradient, to whole head groups'), \
(288, 2, "backward: the pieces' gradients whole"))
    >>> [w for w, _, _ in head_cut_gathers(144, 3, 3, 4)]  # 3 heads: no head group to gather the pieces over
    [144, 48]
    >>> head_cut_gathers(192, 3, 2, 4) is None  # 2 heads on 4 ranks cut head_dim: partial scores summed
    True
    """
    if n <= 1 or pieces <= 1 or not heads or width % (pieces * heads) or width % n or (heads < n and n % heads == 0):
        return None
    g = math.gcd(heads, n)
    out = [(width, n, "forward: the output whole, before the reshape into heads")]
    if n > g:
        out.append((width // pieces // g, n // g, "backward: the output projection input gradient, to whole head groups"))
    if g > 1:
        out.append((width, g, "backward: the pieces' gradients whole"))
    return tuple(out)


def grouped_qkv_layout(d: int, width: int, groups: int | None) -> tuple[int, int] | None:
    """``(queries per group, head_dim)`` of a Falcon-style fused ``query_key_value`` kernel ``(d, width)`` laid out
    per key/value group as ``[q_1 .. q_R k v]`` and reshaped to ``(groups, R + 2, head_dim)``, ``width = d + 2 kv``;
    None when the widths do not make that layout.

    >>> grouped_qkv_layout(128, 192, 2)  # 2 groups of [4 q | k | v], 16 wide
    (4, 16)
    >>> grouped_qkv_layout(128, 384, 3) is None  # equal [q | k | v] pieces
    True
    """
    if not groups or groups < 2 or width <= d or (width - d) % (2 * groups):
        return None
    head_dim = (width - d) // (2 * groups)
    if d % (groups * head_dim) or width != groups * (d // (groups * head_dim) + 2) * head_dim:
        return None
    return d // (groups * head_dim), head_dim


def grouped_qkv_moves(d: int, width: int, groups: int | None, n: int) -> tuple[tuple[str, int, int, str], ...] | None:
    """``((kind, elements per local row, ranks, why), ...)``: the collectives one local activation row costs per
    layer when a Falcon-style fused ``query_key_value`` kernel ``(d, width)``, ``width = d + 2 kv``, laid out per
    key/value group as ``[q_1 .. q_R k v]`` and reshaped to ``(groups, R + 2, head_dim)``, is split naively over
    ``n`` tensor ranks, ``2 groups`` of them (2 groups on model=4), its output projection's input split alike: each
    group's ``R + 2`` heads lie over its 2 ranks, whole heads each. XLA moves the queries into a split of their
    ``R`` heads with 3 one-head collective-permutes and hands both ranks of the group its key and value with an
    all-reduce (2 heads), forward, and mirrors both backward. Measured on XLA:CPU (Falcon, head_dim 16, data=2,
    model=4, 2 groups of 2, 4 and 6 queries): 64 or 48 + 32 elements a row forward, 48 + 32 backward; priced
    48 + 32 each way (0.91-1.00x). None: not this case (groups not half the ranks, a share cutting a head, no
    key/value beside the queries); separate projections, equal fused pieces and one group (MQA, cut into unequal
    pieces) are priced elsewhere.

    >>> [(k, w, r) for k, w, r, _ in grouped_qkv_moves(128, 192, 2, 4)]  # 2 groups of [4 q | k | v] x 16, model=4
    [('collective-permute', 48, 2), ('all-reduce', 32, 2), ('collective-permute', 48, 2), ('all-reduce', 32, 2)]
    >>> grouped_qkv_moves(128, 256, 4, 4) is None  # 4 groups on 4 ranks: a group a rank, nothing moves
    True
    """
    layout = grouped_qkv_layout(d, width, groups)
    if layout is None or n != 2 * groups or width % n:
        return None
    head_dim = layout[1]
    if (width // n) % head_dim:
        return None
    r = n // groups
    return tuple((kind, w, r, f"{way}: {why}") for way in ("forward", "backward") for kind, w, why in (
        ("collective-permute", 3 * head_dim, "the queries moved into a split of their heads"),
        ("all-reduce", 2 * head_dim, "the group's key and value to both of its ranks")))


def split_head_gathers(widths: tuple[int, ...], heads: int | None, row_in: int,
                       n: int) -> tuple[tuple[int, int, str], ...] | None:
    """``((result width, ranks, why), ...)``: the all-gathers one local activation row costs per layer when separate
    ``q``, ``k`` and ``v`` projections (output ``widths``, each reshaped into the same ``heads``) and the output
    projection's input (``row_in``) are split naively over ``n`` tensor ranks that neither divide the heads nor are
    divided by them (6 heads on model=4). None: not this case.

    Measured on XLA:CPU (data=2,model=4, model=2 and model=8; a pre-norm block, widths 48..96, 16 tokens): 3 heads
    on 4, 6 on 4, 12 on 8, 3 on 2. XLA lays each projection's output out in ``g = gcd(heads, n)`` head groups over
    ``g`` ranks, the rest of the ranks sharing each group:

    * forward: each projection's output gathered to whole head groups (``width / g`` over the ``n / g`` ranks of
      a group) before the reshape into heads;
    * backward: the output projection's input gradient gathered to whole head groups alike; the projections'
      gradients are sliced back out of the groups (no collective).

    >>> split_head_gathers((96, 96, 96), 6, 96, 4)  # 6 heads of 16 on model=4: 2 groups of 3 heads, 2 ranks each
    ((48, 2, "forward: a projection's output to whole head groups"), \
(48, 2, "forward: a projection's output to whole head groups"), \
(48, 2, "forward: a projection's output to whole head groups"), \
(48, 2, "backward: the output projection's input gradient, to whole head groups"))
    >>> [(w, r) for w, r, _ in split_head_gathers((48, 48, 48), 3, 48, 4)]  # 3 heads: one group, all ranks
    [(48, 4), (48, 4), (48, 4), (48, 4)]
    >>> split_head_gathers((64, 64, 64), 2, 64, 4) is None  # 2 heads on 4 cut head_dim: partial scores summed
    True
    """
    if (n <= 1 or not heads or not heads % n or not n % heads or row_in % heads
            or any(w % heads for w in widths)):
        return None
    g = math.gcd(heads, n)
    return (*((w // g, n // g, "forward: a projection's output to whole head groups") for w in widths),
            (row_in // g, n // g, "backward: the output projection's input gradient, to whole head groups"))


def cut_head_scores(heads: int | None, n: int, keys: int) -> tuple[tuple[int, int, str], ...] | None:
    """``((elements per local query row, ranks, why), ...)``: the all-reduces of partial attention scores when fewer
    ``heads`` than ``n`` tensor ranks divide them (2 heads on model=4) and separate ``q``, ``k``, ``v`` projections
    and the output projection's input are split naively: each head's head_dim is cut over ``n / heads`` ranks,
    each rank holding one head's slice. XLA sums its partial scores (``keys`` per query row) over those ranks
    forward (``q @ k``) and the probabilities' partial gradient (``d(out) @ v``) backward. None: not this case.

    Measured on XLA:CPU (data=2,model=4 and model=8, 16 tokens): 2 heads on 4 and on 8, 4 on 8 (one head on 4: a
    single head's sums, which the estimate prices as products of two activations).

    >>> [(w, r) for w, r, _ in cut_head_scores(2, 4, 16)]  # 2 heads on 4: each cut over 2 ranks
    [(16, 2), (16, 2)]
    >>> cut_head_scores(6, 4, 16) is None
    True
    """
    if not heads or heads < 2 or heads >= n or n % heads or keys <= 0:
        return None
    return ((keys, n // heads, "sum a head slice's partial scores (forward)"),
            (keys, n // heads, "sum a head slice's partial probability gradients (backward)"))


def repeated_kv_groups(heads: int | None, query_heads: int | None, n: int) -> int | None:
    """The head groups XLA lays a GQA's key/value out in when its ``heads`` (``K``) are expanded to the query's
    ``query_heads`` by ``jnp.repeat`` and the query is split over ``n`` tensor ranks dividing its heads, while ``K``
    and ``n`` neither divide the other (12 query heads, 6 or 3 key/value heads on model=4): ``gcd(K, n)`` groups of
    ``K / g`` heads, each over the ``n / g`` ranks whose query heads read them. None: not this case (``K`` dividing
    ``n`` or divided by it is :mod:`tpflax._src.cost.pieces`' and :mod:`tpflax._src.cost.kvsplit`'s).

    >>> repeated_kv_groups(6, 12, 4), repeated_kv_groups(3, 12, 4), repeated_kv_groups(2, 8, 4)
    (2, 1, None)
    """
    if (n <= 1 or not heads or not query_heads or query_heads % n or query_heads % heads
            or not (heads % n and n % heads)):
        return None
    return math.gcd(heads, n)


def repeated_kv_gathers(width: float, query: float, groups: int, n: int,
                        split: bool) -> tuple[tuple[float, int, str], ...]:
    """``((result size, ranks, why), ...)``: the all-gathers XLA:CPU compiles for one key or value projection of
    :func:`repeated_kv_groups` ``groups`` over ``n`` ranks, its output ``width`` and the query's (the repeated
    key/value's) ``query`` in any unit per local row. Read off the HLO (data=2,model=4; 12 query heads of 4 over 6
    and 3 key/value heads, a bare attention and a pre-norm block):

    * backward, kept whole or split: the repeated key/value's gradient, split with the query heads, gathered to
      whole head groups (``query / g`` over the ``n / g`` ranks of a group) before the sum over the repeats
      (``f32[8,16,6,4]`` over 2 ranks with 6 key/value heads, ``f32[8,16,12,4]`` over 4 with 3);
    * ``split`` (the kernel split on its output, 6 or 3 features a rank: no whole head on any): forward, its output
      gathered to whole head groups (``width / g`` over ``n / g``) before the repeat; its partial input gradients
      are summed, as any split column's.

    Kept whole with ``g > 1``, the key/value's gradient comes out in its ``g`` groups: its output gradient is gathered
    over them where its input needs a gradient, and its update runs split in ``g`` and is gathered
    (:func:`tpflax._src.cost.pieces.member_items`, :func:`tpflax._src.cost.pieces.update_pieces`).

    >>> [(w, r) for w, r, _ in repeated_kv_gathers(24, 48, 2, 4, split=True)]
    [(12.0, 2), (24.0, 2)]
    >>> [(w, r) for w, r, _ in repeated_kv_gathers(12, 48, 1, 4, split=False)]
    [(48.0, 4)]
    """
    out = [(query / groups, n // groups, "backward: the repeated key/value's gradient, to whole head groups")]
    if split:
        out.insert(0, (width / groups, n // groups, "forward: the key/value output, to whole head groups"))
    return tuple(out)


@dataclass(frozen=True)
class WholeKV:
    """What XLA:CPU compiles for a GQA through ``jax.nn.dot_product_attention`` whose ``K`` key/value heads ``n``
    tensor ranks neither divide nor are divided by, laid out as by hand: the query and output projections split
    over the ranks (Megatron), the key and value kernels kept whole (:func:`whole_kv`).

    Attributes:
        groups: ``g = gcd(K, n)``: the key/value head groups XLA lays the attention out in, each over ``n / g``
            ranks (which compute it alike).
        gathers: ``((result size, ranks, why), ...)``, sizes in the unit of :func:`whole_kv`'s widths.
        sums: ``((size, ranks, why), ...)``: all-reduces, in the same unit (a remat'd step's key/value input
            gradients, :meth:`tpflax._src.cost.residual.Recompute.whole_kv_again`).
        pieces: the pieces each key/value kernel's weight gradient comes out in (its update run on its piece and
            the parameter and its moments gathered over that many ranks, or, pinned by tpflax's fsdp step, its
            gradient gathered once), None: whole (one group).
    """

    groups: int
    gathers: tuple[tuple[float, int, str], ...]
    pieces: int | None
    sums: tuple[tuple[float, int, str], ...] = ()


def whole_kv(query: float, kv: tuple[float, ...], row_in: float, heads: int | None, n: int,
             input_grad: tuple[bool, ...] = (), again: tuple[bool, bool] = (False, False),
             kv_in: tuple[float, ...] = ()) -> WholeKV | None:
    """The collectives of a GQA through ``jax.nn.dot_product_attention`` (which regroups the query's heads into the
    key/value's ``K = heads``) whose query projection (output ``query`` wide) is split on its output and whose output
    projection (input ``row_in``) is split on its input over ``n`` tensor ranks, its key and value projections
    (outputs ``kv``) kept whole, where ``K`` and ``n`` neither divide the other (6 or 3 key/value heads on model=4);
    widths in any unit per local row. None: not this case.

    Read off XLA:CPU's HLO (data=2,model=4 and fsdp=2,model=4; 12 query heads of 4, 6 and 3 key/value heads, width 48,
    16 tokens), ``g = gcd(K, n)``:

    * forward: the query's output gathered to whole key/value head groups (``query / g`` over the ``n / g`` ranks of a
      group; every rank of a group then computes its group's attention);
    * backward: the output projection's input gradient gathered to whole head groups alike (``row_in / g``); each
      whole key/value's output gradient, whole within a group, gathered over the ``g`` groups (``kv`` over ``g``
      ranks; none for one group), so its input gradient is computed whole (no partial sums, unlike the query's);
      none where its input needs no gradient (``input_grad``, one flag per ``kv``, default all: it reads the model's
      own input, whose gradient the step does not compute, and its weight gradient reads its groups as they are);
    * its weight gradient comes out in the ``g`` groups (:attr:`WholeKV.pieces`);
    * rematerialised (``again``, :meth:`tpflax._src.cost.residual.Recompute.whole_kv_again`): the query's output
      gathered again in the recompute; and where the backward sums each key/value's input gradient (``kv_in`` wide)
      over the ``g`` groups, that all-reduce instead of its output gradient's gather.

    The planner's candidate (:mod:`tpflax._src.planner.builders`) and the estimate
    (:func:`tpflax._src.cost.reshard.whole_kv_items`) price the same collectives with it.

    >>> w = whole_kv(48, (24, 24), 48, 6, 4)  # 6 key/value heads of 4 on model=4: 2 groups of 3, 2 ranks each
    >>> w.groups, [(s, r) for s, r, _ in w.gathers], w.pieces
    (2, [(24.0, 2), (24.0, 2), (24, 2), (24, 2)], 2)
    >>> [(s, r) for s, r, _ in whole_kv(48, (24, 24), 48, 6, 4, input_grad=(False, False)).gathers]  # model input
    [(24.0, 2), (24.0, 2)]
    >>> w = whole_kv(48, (12, 12), 48, 3, 4)  # 3 heads: one group over every rank, the key/value whole on each
    >>> [(s, r) for s, r, _ in w.gathers], w.pieces
    ([(48.0, 4), (48.0, 4)], None)
    >>> whole_kv(48, (24, 24), 48, 2, 4) is None  # 2 heads on 4: each key/value in 2 pieces (cost/pieces.py)
    True
    >>> w = whole_kv(48, (24, 24), 48, 6, 4, again=(True, True), kv_in=(48, 48))  # remat'd, kernels replicated
    >>> [(s, r) for s, r, _ in w.gathers], [(s, r) for s, r, _ in w.sums]
    ([(24.0, 2), (24.0, 2), (24.0, 2)], [(48, 2), (48, 2)])
    """
    if n <= 1 or not heads or not (heads % n and n % heads):
        return None
    g = math.gcd(heads, n)
    gathers = [(query / g, n // g, "forward: the query's output, to whole key/value head groups"),
               (row_in / g, n // g, "backward: the output projection's input gradient, to whole head groups")]
    if again[0]:
        gathers.insert(1, (query / g, n // g, "again in the remat recompute: the query's output, to whole key/value "
                                              "head groups"))
    summed = again[1] and len(kv_in) == len(kv)
    sums = []
    if g > 1:
        grads = [(w, win) for w, win, grad in zip(kv, kv_in if summed else kv, input_grad or (True,) * len(kv),
                                                  strict=True) if grad]
        if summed:
            sums = [(win, g, "backward (remat'd): a whole key/value's partial input gradient, summed over the head "
                             "groups") for _, win in grads]
        else:
            gathers += [(w, g, "backward: a whole key/value's output gradient, over the head groups")
                        for w, _ in grads]
    return WholeKV(g, tuple(gathers), g if g > 1 else None, tuple(sums))
