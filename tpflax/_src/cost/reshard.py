"""What XLA adds when a fused kernel's split output is cut into pieces that do not follow its shards.

A fused ``[q|k|v]`` kernel (GPT-2's ``c_attn``) split contiguously over ``n``
tensor devices leaves device ``j`` holding columns ``[jD/n, (j+1)D/n)`` of its
output; the model then cuts that output into ``p`` equal pieces, and each piece
is wanted split over the same ``n`` devices (``D/(pn)`` columns each). XLA's
SPMD partitioner reshards every piece with a halo exchange
(``ExchangeHalo`` / ``ExchangeHaloCompact`` in ``spmd_partitioner_util.cc``):
collective-permutes in the forward pass. In the backward pass it puts the
pieces' gradients back into the fused layout with all-to-alls whose buffers
add up to twice the fused output's shard. The permute widths below follow
XLA's algorithm; they matched every compiled XLA:CPU program measured
(``D`` in 96..384, ``p`` in 2..4, ``n`` in 2..8, and GPT-2's ``c_attn``).

The trace says which kernels are fused (:attr:`tpflax._src.trace.records.Dataflow.fused`);
nothing here reads a name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection
from typing import Any

from tpflax._src.cost.headcut import (
    WholeKV,
    grouped_qkv_moves,
    head_cut_gathers,
    repeated_kv_gathers,
    repeated_kv_groups,
    split_head_gathers,
    whole_kv,
)
from tpflax._src.cost.kvsplit import cut_in_pieces, kv_splits
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.residual import scope_recompute
from tpflax._src.cost.scope import Scope, body, layers
from tpflax._src.mesh import TENSOR
from tpflax._src.specs import entry_axes


def piece_permutes(width: int, pieces: int | tuple[int, ...], n: int) -> tuple[int, ...] | None:
    """Columns of each collective-permute XLA issues to reshard the ``pieces`` of a ``width``-wide dim split ``n`` ways.

    ``pieces``: how many equal pieces, or the sizes of unequal ones in order (a parallel block's
    ``[q | k | v | gate | up]``). None when a piece or the dim does not split evenly or XLA would not
    use a halo exchange.

    >>> piece_permutes(192, 3, 4)  # GPT-2's c_attn (q|k|v of 64) over model=4
    (32, 16, 32, 32, 16, 16, 16)
    >>> piece_permutes(128, 2, 2)
    (32, 32)
    >>> sum(piece_permutes(1184, (128, 16, 16, 512, 512), 4))  # MQA q|k|v and SwiGLU gate|up, d=128
    720
    """
    sizes = pieces if isinstance(pieces, tuple) else (width // pieces,) * pieces
    if n <= 1 or width % n or sum(sizes) != width or any(s % n for s in sizes):
        return None
    out, at = [], 0
    for piece in sizes:
        cps = _halo_exchange(width // n, n, lambda j, o=at, p=piece: o + j * p // n, piece // n)
        if cps is None:
            return None
        out += cps
        at += piece
    return tuple(out)


def _halo_exchange(shard: int, n: int, start: Callable[[int], int], want: int) -> list[int] | None:
    """XLA's ``ExchangeHaloAndGetValidData`` for device ``j`` wanting ``[start(j), start(j) + want)``."""
    left = [shard * j - start(j) for j in range(n)]
    right = [start(j) + want - shard * (j + 1) for j in range(n)]
    if max(max(left), max(right)) > 2 * want:
        return None if 2 * want >= n * shard else _compact(shard, n, start, want)
    return _plain(shard, n, left, right)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def _plain(shard: int, n: int, left: list[int], right: list[int]) -> list[int] | None:
    """``ExchangeHalo``: one permute per neighbour distance, as wide as the widest halo at that distance."""
    max_left, max_right = max(left[1:]), max(right[:-1])
    if max_left + max_right + shard >= shard * n and (max_left > shard or max_right > shard):
        return None  # XLA gives up on the halo exchange here
    low, high = -max(left), shard + max(right)
    out = []
    i = _ceil(max_left, shard) - 1
    while i >= 0 and (-i - 1) * shard < high:
        out.append(min(max_left - shard * i, shard) - max(-i * shard - high, 0))
        i -= 1
    for i in range(min(max(low - shard, 0), max(max_right, 0)) // shard, _ceil(max_right, shard)):
        out.append(min(max_right - shard * i, shard) - max(low - (i + 1) * shard, 0))
    return out


def _compact(shard: int, n: int, start: Callable[[int], int], want: int) -> list[int]:
    """``ExchangeHaloCompact``: each device's window cut at shard edges; disjoint sends share a permute."""
    wanted = []  # per device: (offset in its window, start and limit in the source shard, source)
    for j in range(n):
        pieces, at, limit = [], start(j), start(j) + want
        while at < limit:
            size = min(shard - at % shard, limit - at)
            pieces.append((at - start(j), at % shard, at % shard + size, at // shard, j))
            at += size
        wanted.append(pieces)
    sends: list[list[tuple]] = [[] for _ in range(n)]  # per source, in XLA's order
    for k in range(max(len(p) for p in wanted)):
        for j in range(n):
            if k < len(wanted[j]) and wanted[j][k][3] != j:
                sends[wanted[j][k][3]].append(wanted[j][k])
    for s in sends:
        s.sort(key=lambda h: h[0])
    nxt, out = [0] * n, []
    while True:
        seen, lo, hi = set(), shard, 0
        for src in range(n):
            if nxt[src] >= len(sends[src]):
                continue
            _, a, b, _, dst = sends[src][nxt[src]]
            if seen and (dst in seen or (lo > b and hi == shard and a == 0) or (hi < a and lo == 0 and b == shard)):
                continue
            seen.add(dst)
            lo, hi, nxt[src] = min(lo, a), max(hi, b), nxt[src] + 1
        if not seen:
            return out
        out.append(hi - lo)


def pad_backward(width: int, pieces: int, n: int) -> list[tuple[str, int]] | None:
    """What one local activation row sends, per layer, to pad each of ``pieces`` equal pieces' gradients
    back into a ``width``-wide fused dim split ``n`` ways: ``("collective-permute", columns)`` per permute
    and ``("all-gather", piece columns)`` per piece gathered whole; None when not modelled.

    Pieces cut by static slices (``xz[..., :d], xz[..., d:]``: Mamba's in_proj) transpose to pads, not to a
    split's concatenate, and XLA reshards a pad with a halo exchange of its operand (device ``j`` wants the
    piece's columns ``[j * width / n - offset, ...)``, the window taken as it lies, padding included),
    at most ``n - 1`` neighbours away; a halo wider than twice the window gathers the piece whole. Measured
    on XLA:CPU (f32, 8 x 16 rows): 512 in 2 over 4: 6 permutes of 64 columns; 128 in 2 over 2: 2 of 32;
    256 in 2 over 2: 2 of 64; 96 in 3 over 2: 2 of 16; 192 in 3 and 256 in 4 over 4: every piece gathered
    (64 columns each), 384 in 3 over 4: 128 each. 256 in 2 over 8 (4 permutes of 16) takes XLA's compact
    exchange, not modelled.

    >>> pad_backward(512, 2, 4)
    [('collective-permute', 64), ('collective-permute', 64), ('collective-permute', 64), ('collective-permute', 64), ('collective-permute', 64), ('collective-permute', 64)]
    >>> pad_backward(96, 3, 2)
    [('collective-permute', 16), ('collective-permute', 16)]
    >>> pad_backward(192, 3, 4)
    [('all-gather', 64), ('all-gather', 64), ('all-gather', 64)]
    """
    if n <= 1 or width % (pieces * n):
        return None
    size, want = width // pieces, width // n
    shard = size // n
    out: list[tuple[str, int]] = []
    for i in range(pieces):
        left = [shard * j - (want * j - i * size) for j in range(n)]
        right = [want * (j + 1) - i * size - shard * (j + 1) for j in range(n)]
        if max(max(left), max(right)) > 2 * want:
            if 2 * want < n * shard:
                return None  # XLA's compact exchange
            out.append(("all-gather", size))
            continue
        cap = (n - 1) * shard  # no neighbour is farther than n - 1 devices
        cps = _plain(shard, n, [min(x, cap) for x in left], [min(x, cap) for x in right])
        out += [("all-gather", size)] if cps is None else [("collective-permute", c) for c in cps if c > 0]
    return out


def split_columns(width: int, pieces: int | tuple[int, ...], n: int) -> tuple[tuple[int, ...], int] | None:
    """What one local activation row of a naively split fused kernel sends per layer: the forward
    collective-permutes' widths, and the width of each of the two backward all-to-alls (None: not modelled).

    >>> split_columns(192, 3, 4)
    ((32, 16, 32, 32, 16, 16, 16), 48)
    """
    cps = piece_permutes(width, pieces, n)
    return None if cps is None else (cps, width // n)


def fused_items(s: Scope, notes: list[str]) -> list[CommItem]:
    """The reshard of every traced fused kernel split over tensor axes on its fused dim.

    >>> import jax, jax.numpy as jnp, tpflax
    >>> def fn(v, x):
    ...     x = jnp.tanh(x @ v["inp"])
    ...     q, k, w = jnp.split(x @ v["qkv"], 3, axis=-1)  # a [q|k|v] kernel
    ...     return (x + (q * k + w) @ v["proj"]) @ v["head"]
    >>> shapes = {"inp": (64, 64), "qkv": (64, 192), "proj": (64, 64), "head": (64, 10)}
    >>> tree = {n: jax.ShapeDtypeStruct(s, "float32") for n, s in shapes.items()}
    >>> x = (jax.ShapeDtypeStruct((8, 16, 64), "float32"),)
    >>> p = tpflax.plan(tree, {"model": 4}, model=fn, sample=x)
    >>> e = tpflax.estimate(p, model=fn, sample=x, backend="cpu")
    >>> [(i.kind, i.size) for i in e.items if i.why.startswith("fused")]  # 128 rows x 160 / 48 columns x 4 B
    [('collective-permute', 81920.0), ('all-to-all', 24576.0)]
    """
    items: list[CommItem] = []
    tensor = s.mesh.role_axes.get(TENSOR, frozenset())
    kvs = kv_splits(s)  # a key/value split on head_dim: its RoPE halves are priced with it (cost/kvsplit.py)
    for path, d in s.lv.decisions.items():
        dim, pieces, whole, viewed, padded = (s.fused or {}).get(path, (None, 1, (), False, False))
        if dim is None or pieces == 1 or getattr(d, "layout", None) is not None or path in kvs:
            continue  # stored head-aligned (plan(fused="aligned")): the step cuts the pieces per rank
        axes = tuple(a for a in entry_axes(s.lv.specs[path][dim]) if a in tensor)
        n = s.size(axes)
        if n <= 1 or any(o in (s.fused or {}) for o in s.channel_partners(path, axes)):
            continue  # a depthwise conv on a fused kernel's split output: resharded once, at that kernel
        width = d.shape[dim]
        if viewed and isinstance(pieces, int) and pieces % n and n % pieces:
            items += _view_gathers(s, path, d, width, pieces, n, axes, view_heads(s, path, dim))
            continue
        cut = split_columns(width, pieces, n)
        sizes = pieces if isinstance(pieces, tuple) else (width // pieces,) * pieces
        pieces = len(sizes)
        if cut is None:
            notes.append(f"{s.lv.label[path]}: its {pieces} fused pieces of {width} over {n} devices are "
                         "resharded by XLA in a way not modelled")
            continue
        row = s.rows_of(path) * s.act_item  # bytes of one column of the local rows
        count = layers(d) * s.lv.count[path]
        label = s.lv.label[path]
        cps, back = cut
        items.append(CommItem("collective-permute", axes, row * sum(cps), n, count, label,
                              f"fused {label}: {len(cps)} collective-permutes reshard its {pieces} pieces, "
                              f"cut across the {n} shards (forward)"))
        pads = pad_backward(width, pieces, n) if padded and len(set(sizes)) == 1 else None
        if pads is None:
            items.append(CommItem("all-to-all", axes, row * back, n, 2 * count, label,
                                  f"fused {label}: gather the pieces' gradients back into the split layout (backward)"))
        else:  # cut by static slices: each piece's gradient padded back into the fused dim (pad_backward)
            if (moved := sum(c for k, c in pads if k == "collective-permute")):
                items.append(CommItem("collective-permute", axes, row * moved, n, count, label,
                                      f"fused {label}: {sum(k == 'collective-permute' for k, _ in pads)} "
                                      "collective-permutes pad its sliced pieces' gradients back (backward)"))
            for k, c in pads:
                if k == "all-gather":
                    items.append(CommItem("all-gather", axes, row * c, n, count, label,
                                          f"fused {label}: gather a sliced piece's gradient whole to pad it "
                                          "back (backward)"))
        for i in whole:  # resharded split like the others, then read whole (measured on XLA:CPU, MQA k and v)
            size = row * sizes[i]
            items.append(CommItem("all-gather", axes, size, n, count, label,
                                  f"fused {label}: gather piece {i}, read whole (forward)"))
            items.append(CommItem("all-reduce", axes, size, n, count, label,
                                  f"fused {label}: sum piece {i}'s gradient, read whole (backward)"))
    return items


def concat_items(s: Scope, notes: list[str]) -> list[CommItem]:
    """The reshard of a kernel dim split over tensor axes that contracts a concatenation of other kernels' outputs
    (:attr:`tpflax._src.trace.records.Dataflow.concats`: a parallel block's ``concat([attn_out, gelu(up)])`` read
    by one output projection), each input split over the same devices by its column.

    The mirror of :func:`fused_items`: device ``j`` holds its share of each input, the kernel's contiguous shard
    wants ``[jW/n, (j+1)W/n)`` of the concatenation. Forward, XLA puts the inputs into that layout with
    all-to-alls whose buffers add up to twice the concatenation's shard; backward, it cuts the gradient back
    into the inputs' shards with the halo exchange of :func:`piece_permutes` (measured on XLA:CPU: ``[128 | 512]``
    over model=4, 32 + 128 + 160 columns of all-to-all and 32, 32, 32, 96 of collective-permutes per layer).
    Kernels reading the same concatenation split alike (xLSTM's ``igate`` and ``fgate`` on ``concat([q, k, v])``)
    share one reshard each way (:attr:`Scope.concat_again`; measured on XLA:CPU, 2.0x the compiled concatenation
    collectives priced per kernel).
    """
    items: list[CommItem] = []
    tensor = s.mesh.role_axes.get(TENSOR, frozenset())

    def axes_of(path: str) -> tuple[str, ...] | None:
        d, got = s.lv.decisions.get(path), (s.concats or {}).get(path)
        if d is None or got is None or getattr(d, "layout", None) is not None or got[0] >= len(s.lv.specs[path]):
            return None
        return tuple(a for a in entry_axes(s.lv.specs[path][got[0]]) if a in tensor)

    for path, (dim, sizes) in (s.concats or {}).items():
        d = s.lv.decisions.get(path)
        if (axes := axes_of(path)) is None:
            continue
        first = (s.concat_again or {}).get(path)
        if first is not None and axes_of(first) == axes:
            continue
        n = s.size(axes)
        width = d.shape[dim]
        if n <= 1 or sum(sizes) != width:
            continue
        cut = split_columns(width, tuple(sizes), n)
        label = s.lv.label[path]
        if cut is None:
            notes.append(f"{label}: its input, {len(sizes)} values of {'+'.join(map(str, sizes))} concatenated, "
                         f"over {n} devices is resharded by XLA in a way not modelled")
            continue
        row = s.rows_of(path) * s.act_item
        count = layers(d) * s.lv.count[path]
        cps, back = cut
        items.append(CommItem("all-to-all", axes, row * back, n, 2 * count, label,
                              f"{label}: all-to-alls lay its {len(sizes)} concatenated inputs out as its split input "
                              "(forward)"))
        items.append(CommItem("collective-permute", axes, row * sum(cps), n, count, label,
                              f"{label}: {len(cps)} collective-permutes cut its input gradient back into the "
                              f"{len(sizes)} concatenated inputs' shards (backward)"))
    return items


def view_heads(s: Scope, path: str, dim: int) -> int | None:
    """The heads a traced fused output's view reshapes its pieces into: the gcd of its edges' limits
    (:attr:`Scope.limits`, the activation dims on the way: ``3C``, the heads, ``C``), None untraced."""
    g = 0
    for (src, sdim, _, _), lim in (s.limits or {}).items():
        if src == path and sdim == dim:
            g = math.gcd(g, lim)
    return g or None


def _view_gathers(s: Scope, path: str, d, width: int, pieces: int, n: int, axes: tuple[str, ...],
                  heads: int | None = None) -> list[CommItem]:
    """A fused output reshaped to ``(pieces, heads, head_dim)`` before it is cut (timm's ``qkv[0]``).

    ``n`` contiguous shards of the fused dim are no shards of a ``(pieces, ...)`` view when ``n``
    neither divides nor is divided by ``pieces`` (3 pieces over 2 or 4 devices), so XLA gathers the
    whole output before the reshape (forward) and, backward, what the ``heads`` it is reshaped into
    leave it (:func:`tpflax._src.cost.headcut.head_cut_gathers`: with heads dividing ``n``, the pieces'
    gradients whole before the kernel's transposed matmul; Swin's 3 or 6 heads on 4 ranks, the output
    projection's input gradient to whole head groups, and the pieces' gradients over the groups).
    Measured on XLA:CPU: ``C`` 32..128, 2..12 heads, ``n`` 2, 4 and 8.
    """
    row = s.rows_of(path) * s.act_item
    count = layers(d) * s.lv.count[path]
    label = s.lv.label[path]
    cut = head_cut_gathers(width, pieces, heads, n)
    if cut is not None:
        return [CommItem("all-gather", axes, row * w, ranks, count, label, f"fused {label}, {heads} heads over {n} "
                         f"shards of a reshaped view of its {pieces} pieces: gather, {why}") for w, ranks, why in cut]
    # fewer heads than ranks that divide them (a Swin stage's 2 heads on 4): each head's head_dim cut, its partial
    # scores summed over its n / heads ranks (measured, XLA:CPU: 2 heads on 4 and 8; est/comp 0.91-0.94 without)
    sums = _cut_head_scores(s, path, axes, n, heads, [path]) if heads and 1 < heads < n and not n % heads else []
    return [*sums, CommItem("all-gather", axes, row * width, n, count, label,
                     f"fused {label}: gather the output whole, {pieces} pieces of a reshaped view that {n} "
                     "shards of the fused dim do not follow (forward)"),
            CommItem("all-gather", axes, row * width, n, count, label,
                     f"fused {label}: gather the pieces' gradients whole (backward)")]


def split_head_items(s: Scope) -> list[CommItem]:
    """The gathers of separate traced ``q``, ``k`` and ``v`` projections (2-D kernels, as wide as their attention
    row's input, each reshaped into the same heads) split over tensor ranks that neither divide their heads nor
    are divided by them (6 heads on model=4), with the row split alike: each output gathered to whole head groups
    forward, the row's input gradient backward (:func:`tpflax._src.cost.headcut.split_head_gathers`, measured on
    XLA:CPU). Before, nothing was priced there (0.77-0.95x the compiled collectives)."""
    items: list[CommItem] = []
    for r, raxes, n, h, widths, cols in _separate_heads(s):
        cut = split_head_gathers(tuple(widths), h, body(s.lv.decisions[r])[0], n)
        if cut is not None:
            row = s.rows_of(r) * s.act_item
            count = layers(s.lv.decisions[r]) * s.lv.count[r]
            label = s.lv.label[r]
            items += [CommItem("all-gather", raxes, row * w, ranks, count, label,
                               f"{label}'s {h} heads over {n} shards of separate projections: gather, {why}")
                      for w, ranks, why in cut]
        elif h and 1 < h < n and not n % h:
            items += _cut_head_scores(s, r, raxes, n, h, cols)
    return items


def grouped_qkv_items(s: Scope) -> list[CommItem]:
    """The reshard of a traced Falcon-style fused ``query_key_value`` (2-D ``(d, d + 2 kv)``, its output reshaped into
    ``groups`` key/value groups of ``[q_1 .. q_R k v]``) split on its output over tensor ranks the groups divide
    (2 groups on model=4): XLA moves queries and hands each group's ranks its key and value, each way
    (:func:`tpflax._src.cost.headcut.grouped_qkv_moves`, the price the planner's candidate pays). Before, only the
    pair's sums were priced: est/comp 0.898 on Falcon g2 data=2,model=4."""
    items: list[CommItem] = []
    dec = s.lv.decisions
    for _, c, axes, b in _split_2d_columns(s):
        n = s.size(axes)
        cut = grouped_qkv_moves(b[0], b[1], view_heads(s, c, len(dec[c].shape) - 1), n)
        if cut is None:
            continue
        row = s.rows_of(c) * s.act_item
        count = layers(dec[c]) * s.lv.count[c]
        label = s.lv.label[c]
        items += [CommItem(kind, axes, row * w, ranks, count, label,
                           f"fused {label}, key/value groups over {n} shards: {why}")
                  for kind, w, ranks, why in cut]
    return items


def _split_2d_columns(s: Scope):
    """``(pair class, column, tensor axes, body)`` of each pair column with a 2-D body split on its output over
    tensor axes, not cut in pieces and not split on its input over them."""
    dec, specs = s.lv.decisions, s.lv.specs
    for pc in s.lv.pairs:
        for c in pc.columns:
            axes = s.axes(c, TENSOR)
            b = body(dec[c])
            if axes and len(b) == 2 and not cut_in_pieces(s, c) and not set(entry_axes(specs[c][-2])) & set(axes):
                yield pc, c, axes, b


def repeated_kv_items(s: Scope) -> list[CommItem]:
    """The gathers of a GQA's key/value projections expanded by ``jnp.repeat`` to query heads split over tensor ranks
    that the key/value heads neither divide nor are divided by (12 query heads, 6 or 3 key/value heads on model=4;
    :func:`repeated_kv`), their 2-D kernels split on their output over those ranks: each output gathered to whole
    head groups forward, the repeated gradient backward (:func:`tpflax._src.cost.headcut.repeated_kv_gathers`, read
    off XLA:CPU's HLO); the partial input gradients are summed as any split column's. The same key/value kept whole
    prices its repeated gradient with its other collectives (:func:`tpflax._src.cost.pieces.member_items`)."""
    items: list[CommItem] = []
    dec = s.lv.decisions
    for pc, c, axes, b in _split_2d_columns(s):
        if (rep := repeated_kv(s, pc, c, axes)) is None:
            continue
        n, (g, repeats) = s.size(axes), rep
        out = s.rows_of(c) * s.act_item * b[1]
        count = layers(dec[c]) * s.lv.count[c]
        label = s.lv.label[c]
        items += [CommItem("all-gather", axes, size, ranks, count, label,
                           f"{label}, repeated to {repeats}x its heads over {n} shards, its heads in {g} group(s): "
                           f"gather, {why}")
                  for size, ranks, why in repeated_kv_gathers(out, out * repeats, g, n, split=True)]
    return items


def whole_kv_items(s: Scope) -> list[CommItem]:
    """The gathers of a GQA through ``jax.nn.dot_product_attention`` laid out by hand: its query split on its output
    and its output projection on its input over tensor ranks that its ``K`` key/value heads neither divide nor are
    divided by, its narrower key and value kept whole (:func:`whole_kv_pair`): the query's output and the row's input
    gradient gathered to whole head groups, each key/value's output gradient over the groups
    (:func:`tpflax._src.cost.headcut.whole_kv`, as the planner's "q/o split, K/V whole" candidate prices them; the
    key/value's update in the groups: :func:`tpflax._src.cost.whole.whole_members`)."""
    items: list[CommItem] = []
    dec = s.lv.decisions
    for pc in s.lv.pairs:
        if (found := whole_kv_pair(s, pc)) is None:
            continue
        r, axes, q, kvs, heads, _ = found
        label, count = s.lv.label[r], layers(dec[r]) * s.lv.count[r]
        out_b = {c: s.rows_of(c) * s.act_item * body(dec[c])[1] for c in (q, *kvs)}  # bytes of a local row's output
        # rematerialised: what the recompute runs again (Recompute, the rule the row sums follow too)
        again = redone.whole_kv_again(not any(entry_axes(e) for c in kvs for e in s.lv.specs[c])) \
            if (redone := scope_recompute(s)) is not None else (False, False)
        w = whole_kv(out_b[q], tuple(out_b[c] for c in kvs), s.rows_of(r) * s.act_item * body(dec[r])[0], heads,
                     s.size(axes), tuple((s.widths or {}).get(c) != 0 for c in kvs),  # 0: reads the model's input
                     again, tuple(s.rows_of(c) * s.act_item * body(dec[c])[0] for c in kvs))
        what = f"{label}: {s.lv.label[q]} split, {', '.join(s.lv.label[c] for c in kvs)} whole, in {w.groups if w else 0}" \
               " key/value head group(s)"
        items += [CommItem("all-gather", axes, size, ranks, count, label, f"{what}: gather, {why}")
                  for size, ranks, why in (w.gathers if w else ())]
        items += [CommItem("all-reduce", axes, size, ranks, count, label, f"{what}: {why}")
                  for size, ranks, why in (w.sums if w else ())]
    return items


def whole_kv_pair(s: Any, pc: Any) -> tuple[str, tuple[str, ...], str, tuple[str, ...], int, WholeKV] | None:
    """``(row, tensor axes, query, key/values, K, the layout in elements per row)`` of attention pair class ``pc`` laid out as
    :func:`tpflax._src.cost.headcut.whole_kv` prices: one 2-D row split on its input over tensor axes, one 2-D
    column as wide as its input split on its output over the same axes (the query), the other 2-D columns narrower
    and whole on them (the key and value), every column's traced edges into the row read in the same ``K`` heads
    (the query's capped at ``K``: ``jax.nn.dot_product_attention`` regroups it into the key/value heads; a
    ``jnp.repeat`` leaves it its own, :func:`repeated_kv`), ``K`` and the ranks neither dividing the other; None
    otherwise."""
    dec, specs = s.lv.decisions, s.lv.specs
    tensor = s.mesh.role_axes.get(TENSOR, frozenset())
    if len(pc.rows) != 1 or len(pc.columns) < 2 or len(rb := body(dec[pc.rows[0]])) != 2:
        return None
    r = pc.rows[0]
    axes = tuple(a for a in entry_axes(specs[r][-2]) if a in tensor)
    split = [c for c in pc.columns if s.axes(c, TENSOR)]
    kvs = tuple(c for c in pc.columns if c not in split)
    if s.size(axes) <= 1 or len(split) != 1 or not kvs:
        return None
    q = split[0]
    qb = body(dec[q])
    if (len(qb) != 2 or qb[1] != rb[0] or tuple(a for a in entry_axes(specs[q][-1]) if a in tensor) != axes
            or set(entry_axes(specs[q][-2])) & set(axes)
            or any(len(body(dec[c])) != 2 or body(dec[c])[1] >= rb[0] for c in kvs)):
        return None
    limits = {edge_limit(s, c, pc.rows, axes) for c in pc.columns}
    heads = limits.pop() if len(limits) == 1 else None
    w = whole_kv(qb[1], tuple(body(dec[c])[1] for c in kvs), rb[0], heads, s.size(axes))
    return None if w is None else (r, axes, q, kvs, heads, w)


def repeated_kv(s: Any, pc: Any, col: str, axes: tuple[str, ...]) -> tuple[int, int] | None:
    """``(groups, repeats)`` of ``col``, a column of attention pair ``pc`` (kept whole, or split on its output over
    ``axes``) whose traced heads ``K`` (the limit
    of its edges into the row's split dims) neither divide the ``n`` ranks of ``axes`` nor are divided by them, beside
    a query column split over ``axes`` whose heads (its edges' limit) ``n`` and ``K`` divide: a key/value expanded
    by ``jnp.repeat`` to the query heads (:func:`tpflax._src.cost.headcut.repeated_kv_groups`); None otherwise
    (``jax.nn.dot_product_attention`` reshapes the query into ``(K, groups)``, which caps its limit at ``K``)."""
    n, kv = s.size(axes), edge_limit(s, col, pc.rows, axes)
    for q in pc.columns:
        if q != col and set(s.axes(q, TENSOR)) == set(axes):
            heads = edge_limit(s, q, pc.rows, axes)
            if heads and kv and (g := repeated_kv_groups(kv, heads, n)) is not None:
                return g, heads // kv
    return None


def edge_limit(s: Any, col: str, rows: Collection[str], axes: tuple[str, ...]) -> int | None:
    """The least limit (:attr:`tpflax._src.cost.traced.Traced.limits`) of the traced edges from ``col`` to a dim of
    ``rows`` split over ``axes``; None untraced or without one."""

    def split(row: str, dim: int) -> bool:
        spec = s.lv.specs.get(row, ())
        return dim < len(spec) and bool(set(entry_axes(spec[dim])) & set(axes))

    limits = [lim for (a, _, b, bd), lim in (s.limits or {}).items()
              if s.lv.rep(a) == col and s.lv.rep(b) in rows and split(s.lv.rep(b), bd)]
    return min(limits) if limits else None



def _cut_head_scores(s: Scope, r: str, raxes: tuple[str, ...], n: int, h: int, cols: list[str]) -> list[CommItem]:
    """Fewer heads than ranks that divide them (2 heads on model=4): each head's head_dim cut over ``n / h`` ranks,
    XLA sums the partial scores of one head slice per rank over those ranks, forward (``q @ k``) and backward (the
    probabilities' gradient, ``d(out) @ v``). Measured on XLA:CPU (separate q, k, v, 16 tokens): 2 heads on 4 and
    on 8, 4 on 8: two ``f32[b, 1, N, N]`` all-reduces over ``n / h`` ranks. Every score product of the pair class's
    layers counts (alike blocks merged into one class each run their own; only the first was priced before)."""
    mine = set(cols)
    runs: dict[float, int] = {}  # per score size, the times a step runs such a product
    for sc in s.scores or ():
        if any(s.lv.rep(p) in mine for _, tags in sc.dims for p, _ in tags):
            size = sc.per_example * s.batch.size / s.shards / h * s.act_item
            runs[size] = runs.get(size, 0) + sc.count
    return [CommItem("all-reduce", raxes, size, n // h, count, s.lv.label[r],
                     f"{s.lv.label[r]}'s {h} heads over {n} shards: sum a head's partial scores over its "
                     f"{n // h} ranks ({why})") for size, count in runs.items() for why in ("forward", "backward")]


def _separate_heads(s: Scope):
    """``(row, its tensor axes, ranks, heads, the columns' widths, the columns)`` of each attention pair of separate
    traced 2-D columns as wide as the row's input, split on their output over the axes that split the row's input
    (none on their input), reading one head count off the trace's edge limits (skipped without one). Narrower columns
    beside one as wide (a GQA through ``jax.nn.dot_product_attention``, whose query's heads read the key/value's
    ``K``) only where ``K`` and the ranks neither divide the other (measured: 12:6 and 12:3 on model=4)."""
    dec, specs = s.lv.decisions, s.lv.specs
    tensor = s.mesh.role_axes.get(TENSOR, frozenset())
    for pc in s.lv.pairs:
        if len(pc.rows) != 1 or len(pc.columns) < 2:
            continue
        r = pc.rows[0]
        raxes = tuple(a for a in entry_axes(specs[r][-2]) if a in tensor) \
            if len(body(dec[r])) == 2 else ()
        n = s.size(raxes)
        if n <= 1:
            continue
        heads, widths = set(), []
        for c in pc.columns:
            b, spec = body(dec[c]), specs[c]
            if (len(b) != 2 or cut_in_pieces(s, c) or b[1] > body(dec[r])[0] or body(dec[r])[0] % b[1]
                    or tuple(a for a in entry_axes(spec[-1]) if a in tensor) != raxes
                    or set(entry_axes(spec[-2])) & set(raxes)):
                break
            lims = [lim for (a, ad, d, dd), lim in (s.limits or {}).items()
                    if s.lv.rep(a) == c and ad == len(spec) - 1 and s.lv.rep(d) == r and dd == len(specs[r]) - 2]
            heads.add(math.gcd(*lims) if lims else None)
            widths.append(b[1])
        else:
            h = heads.pop() if len(heads) == 1 else None
            # narrower keys and values (a GQA through jax.nn.dot_product_attention, whose regrouped query reads the
            # key/value heads): measured only where those heads and the ranks neither divide the other
            grouped = any(w != body(dec[r])[0] for w in widths)
            if h and (not grouped or (body(dec[r])[0] in widths and h % n and n % h)):
                yield r, raxes, n, h, widths, list(pc.columns)
