"""What XLA compiles for key/value kernels split on head_dim (GQA with fewer key/value heads than tensor ranks).

When a pair's query heads split over ``n`` tensor ranks but its ``K < n`` key/value heads do not, the
planner can keep the key/value kernels whole or split their head_dim. Split, XLA:CPU's SPMD partitioner
(measured on ``(d, K, head_dim)`` kernels and ``(2, K, d, head_dim)`` stacks, K 1 and 2, model=4; the
gemma probe's Gemma 3 blocks) does not sum partial attention scores: it

* gathers the keys and values whole (one all-gather of the column's whole output per pass: every stacked
  piece, forward), so every rank computes its query heads' scores against whole key heads;
* reshards the keys for a rotate-half RoPE (``x1, x2 = split(x, 2, -1)``), whose halves are no shards of the
  split head_dim: a halo exchange (collective-permutes, :func:`tpflax._src.cost.reshard.piece_permutes` of
  head_dim in 2 pieces, once per key head) forward, and again backward with a single key head (the
  partitioner's "involuntary full rematerialization" warnings there). An interleaved RoPE (``x[..., ::2]``)
  reads the gathered keys and adds nothing;
* sums the partial input gradients of a single key/value head (an all-reduce of the input, as any split
  column), but for several heads gathers the kernel instead (its per-head gradients come out split by heads,
  which the split head_dim does not follow);
* gathers the query heads' partial key/value gradients, as when the kernels are kept whole.

In a rematerialised block (``nn.remat``, ``jax.checkpoint``) the backward recomputes the forward: its gathers of
whole heads and its RoPE reshards run again there (measured, XLA:CPU data=2,model=4, 3-D and 2-D kernels, one and
two key heads, each layer of a 2-layer stack remat'd: ``rematted_computation`` gathers and permutes; the zoo's
scanned Llama). Not counted, the estimate of those steps was 0.90-0.95 of the compiled collectives.

A 2-D ``(d, K * head_dim)`` kernel of ``K > 1`` heads dividing ``n`` (traced: the heads are the trace's limit) split
on its last dim puts one head on each ``n / K`` ranks, cut in ``n / K`` (:attr:`KVSplit.flat`). Measured, XLA:CPU
data=2,model=4, tests/test_choose.py's GQA (``(64, 16)``, K 2, head_dim 8): per kernel, its head gathered over the
2 ranks holding it (``f32[4,64,1,8]``, forward), the partial input gradients all-reduced over all 4 (``f32[4,64,64]``)
and the head's output gradient over its 2 (``f32[4,64,1,8]``, backward): 802048 B per step priced against 801980
compiled (the kernel-gather rule above: 580864). A rotate-half RoPE adds permutes and all-to-alls there
(benchmarks/third_party.py mistral), priced as the halo exchange of the head's halves, forward and backward.

The chooser (:func:`tpflax._src.planner.builders.shard_pair`, through ``kv_view``) and the estimate
(``tpflax._src.cost.comm._pair_items``, through :func:`kv_splits`) price the same list.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class KVSplit:
    """One head_dim-split key/value column.

    Attributes:
        heads: key/value heads ``K`` (per stacked piece).
        head_dim: the split dim.
        pieces: projections stacked in the kernel (2 for a ``(2, K, d, head_dim)`` k/v stack, else 1).
        d: its input width.
        kernel: its elements per layer.
        rotated: a rotate-half RoPE cuts its key piece's head_dim in halves.
        flat: a 2-D kernel whose ``heads`` (more than one) divide the ranks: each head cut over ``n / heads``.
        remat: its block is rematerialised: the forward's collectives run again in the backward.
    """

    heads: int
    head_dim: int
    pieces: int
    d: int
    kernel: int
    rotated: bool
    flat: bool = False
    remat: bool = False

    @property
    def width(self) -> int:
        """Output elements per token, every stacked piece."""
        return self.pieces * self.heads * self.head_dim


def kv_split_comms(kv: KVSplit, n: int) -> tuple[tuple[str, float, float, int, str, int], ...]:
    """``(kind, elements per token, elements per step, count, why, ranks)`` of the collectives a head_dim-split
    key/value column adds over ``n`` tensor ranks (see the module docstring); ``ranks`` 0: all ``n``.

    >>> [c[:4] for c in kv_split_comms(KVSplit(2, 16, 2, 128, 2 * 2 * 128 * 16, True), 4)]
    [('all-gather', 64, 0, 1), ('collective-permute', 20, 0, 1), ('all-gather', 0, 8192, 1), ('all-gather', 64, 0, 1)]
    >>> [(c[0], c[1], c[5]) for c in kv_split_comms(KVSplit(2, 8, 1, 64, 64 * 16, False, flat=True), 4)]
    [('all-gather', 8, 2), ('all-reduce', 64, 0), ('all-reduce', 8, 2)]
    >>> [c[3] for c in kv_split_comms(KVSplit(2, 16, 2, 128, 2 * 2 * 128 * 16, True, remat=True), 4)]
    [2, 2, 1, 1]
    """
    from tpflax._src.cost.reshard import (
        piece_permutes,  # here: reshard reads the estimate's Scope, which
    )
    # imports the planner, which imports this module

    r = int(kv.remat)  # the forward's collectives once more, in the remat recompute
    again = ", again in the remat recompute" if r else ""
    if kv.flat:
        g = n // kv.heads
        cps = piece_permutes(kv.head_dim, 2, g) if kv.rotated else None
        return tuple(x for x in (
            ("all-gather", kv.head_dim, 0, 1 + r, f"head_dim-split key/value, each head on {g} ranks: gather it for "
                                                  f"the scores and the values (forward{again})", g),
            cps and ("collective-permute", sum(cps), 0, 2 + r, "head_dim-split key/value: rotate-half RoPE reshards "
                                                              f"the key head's halves (forward{again} and backward)",
                     g),
            ("all-reduce", kv.d, 0, 1, "head_dim-split key/value: sum partial input gradients (backward)", 0),
            ("all-reduce", kv.head_dim, 0, 1, f"head_dim-split key/value: sum each head's output gradient over its "
                                              f"{g} ranks (backward)", g)) if x)
    out = [("all-gather", kv.width, 0, 1 + r, "head_dim-split key/value: gather whole heads for the scores and the "
                                               f"values (forward{again})", 0)]
    cps = piece_permutes(kv.head_dim, 2, n) if kv.rotated else None
    if cps:
        out.append(("collective-permute", kv.heads * sum(cps), 0, 1 + r + (kv.heads == 1),
                    "head_dim-split key/value: rotate-half RoPE reshards the keys' halves "
                    f"(forward{again}{', and backward with one key head' if kv.heads == 1 else ''})", 0))
    if kv.heads == 1:
        out.append(("all-reduce", kv.d, 0, 1, "head_dim-split key/value: sum partial input gradients (backward)", 0))
    else:
        out.append(("all-gather", 0, kv.kernel, 1, "head_dim-split key/value of several heads: gather the kernel "
                                                    "for its input gradient (backward)", 0))
    out.append(("all-gather", kv.width, 0, 1, "head_dim-split key/value: gather the query heads' partial key/value "
                                               "gradients (backward)", 0))
    return tuple(out)


def kv_splits(s: Any) -> dict[str, KVSplit]:
    """The head_dim-split key/value columns of an estimate's :class:`tpflax._src.cost.scope.Scope`: a column of an
    attention pair (its row tensor-split, a query column split on its heads) which is itself split over the tensor axes on its last dim only,
    a ``(d, K, head_dim)``, ``(K, d, head_dim)`` or ``(pieces, K, d, head_dim)`` kernel, or a traced 2-D one whose
    ``K > 1`` heads divide the ranks (:attr:`KVSplit.flat`). Its keys rotate in halves
    where the trace cut that dim in 2 (:attr:`tpflax._src.cost.traced.Traced.fused`); untraced, the pair's first
    such column's (rotate-half, the common RoPE)."""
    from tpflax._src.cost.scope import body, drop_layers
    from tpflax._src.mesh import TENSOR
    from tpflax._src.specs import entry_axes

    def split(c: str) -> list[int]:
        t = set(s.axes(c, TENSOR))
        return [i for i, e in enumerate(drop_layers(dec[c], s.lv.specs[c])) if t & set(entry_axes(e))]

    dec, out = s.lv.decisions, {}
    for pc in s.lv.pairs:
        # an attention pair: its row split, and a query column split on its heads (not its last dim)
        if not any(s.axes(r, TENSOR) for r in pc.rows):
            continue
        # a fused column cut into pieces is resharded piece by piece (cost/reshard.py fused_items), not a key/value
        flats = {c: _flat_heads(s, c, pc.rows) for c in pc.columns
                 if len(body(dec[c])) == 2 and split(c) == [1] and not cut_in_pieces(s, c)}
        if not any(flats.values()) and not any(split(c) and split(c) != [len(body(dec[c])) - 1] for c in pc.columns):
            continue
        if pc.columns and all(flats.get(c) for c in pc.columns):
            # the queries too are cut into head_dim slices (2 heads on 4 ranks): no key/value split, but a head
            # split over n / heads ranks: XLA sums the partial scores (a product of two activations, priced there)
            continue
        first = True
        for c in pc.columns:
            b = body(dec[c])
            flat = flats.get(c, 0)
            if not flat and (len(b) < 3 or split(c) != [len(b) - 1]):
                continue
            width = (s.widths or {}).get(c) or body(dec[pc.rows[0]])[-1]
            if width not in b[:-1]:
                continue
            fused = (s.fused or {}).get(c)
            leaf_last = len(dec[c].shape) - 1
            rotated = (fused is not None and fused[0] == leaf_last and fused[1] == 2) if s.fused is not None else first
            first = False
            if flat:
                out[c] = KVSplit(flat, b[1] // flat, 1, width, math.prod(b), rotated, flat=True, remat=s.remat)
                continue
            rest = list(b[:-1])
            rest.remove(width)
            pieces, heads = (rest[0], rest[1]) if len(rest) == 2 else (1, rest[0])
            out[c] = KVSplit(heads, b[-1], pieces, width, math.prod(b), rotated, remat=s.remat)
    return out


def cut_in_pieces(s: Any, col: str) -> bool:
    """Whether the trace saw ``col``'s output cut into pieces (a fused ``[q | k | v]`` kernel)."""
    pieces = (s.fused or {}).get(col, (None, 1))[1]
    return isinstance(pieces, tuple) or pieces > 1


def _flat_heads(s: Any, col: str, rows: tuple[str, ...]) -> int:
    """The heads of ``col``, a 2-D column split on its output, where they are more than one and divide the
    tensor ranks less than all of them (:attr:`KVSplit.flat`; traced: the limit of its edges into the row's
    split dims, :func:`tpflax._src.cost.whole.output_pieces`); else 0."""
    from tpflax._src.cost.whole import output_pieces
    from tpflax._src.mesh import TENSOR

    axes = s.axes(col, TENSOR)
    k = output_pieces(s, col, rows, axes)
    return k if k is not None and 1 < k < s.size(axes) else 0
