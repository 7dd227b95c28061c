"""Tree-only: the parameters inside a split pair's block that act on its inner features follow the split.

A recurrence block (Griffin's ``recurrent_block``: ``linear_x`` and ``linear_y`` columns, ``linear_out`` its
row) computes between its columns and its row with parameters of its own sub-modules: a depthwise temporal
conv (``conv_1d/w`` ``(taps, F)``), per-feature decays (``rg_lru/a_param`` ``(F,)``) and block-diagonal gates
(``rg_lru/input_gate/w`` ``(heads, F/heads, F/heads)``). The trace finds them reading the split features
(:mod:`tpflax._src.planner.followers`); without it, left whole, each device slices its features out of
them in the forward pass, and the backward pass gathers their gradients (and the optimizer holds them
whole on every tensor rank). Split with the features, they cost nothing: no collective, a quarter of the
bytes. Only leaves inside the module that holds both sides of the pair are read this way (a layer's scale
on the residual stream sits beside its attention or MLP module, not in it), and none named as a layer scale
(BEiT's ``lambda_1``, CaiT's ``gamma_1``, timm's ``ls1``), which scales the row's output: a BEiT layer holding
its projections and its layer scales in one module split them, 1.26x the collectives of the hand layout
(XLA:CPU data=2,model=4). Nor a vector the block holds itself as wide as the residual stream (RWKV's
``time_mix_k``, see :func:`_beside`): it may scale the block's whole input.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from tpflax._src.facts.classify import Facts
from tpflax._src.planner.builders import (
    OUTPUT_SPLITS,
    State,
    axis_label,
    bias_follows,
    body_spec,
    join_column_of,
    join_row,
    short,
)

_KINDS = ("other", "dense")
LAYER_SCALE = re.compile(r"^(lambda|gamma|ls|layer_?scale)_?\d*$", re.I)


def inner_features(st: State, todo: Sequence[Facts]) -> None:
    """Split what acts on a split pair's inner features inside its block (see the module docstring)."""
    t_entry, t_size = st.tensor
    if t_size == 1:
        return
    # (and a block-diagonal kernel the classifier takes for attention by its 3 dims: xLSTM's headwise q/k/v)
    loose = [f for f in todo if (f.kind in _KINDS or f.kind == "attention" and _square_blocks(f.body))
             and f.path not in st.out and f.path not in st.forced]
    if not loose:
        return
    for pair in st.pairs:
        if not pair.sharded or not pair.rows:
            continue
        # the pair's first row; rows joined later (a Mamba block's x_proj beside out_proj) read the same features
        rows, cols = [st.facts.get(r) for r in pair.rows], [st.facts.get(c) for c in pair.columns]
        row, rp = rows[0], st.out.get(pair.rows[0])
        if None in rows or None in cols or rp is None or rp.strategy != "row" or len(row.body) != 2:
            continue
        if any(st.out.get(c.path) is None or st.out[c.path].strategy not in OUTPUT_SPLITS for c in cols):
            continue
        block = {*(r.group for r in rows), *(c.group for c in cols)}
        if len(block) != 1:
            continue
        inside = f"{block.pop()}/"
        split = row.body_of(rp.spec)
        dim = next((i for i, e in enumerate(split) if e is not None), None)
        if dim is None:
            continue
        width = row.body[dim]
        out = row.body[1 - dim]
        for f in loose:
            # (a layer scale multiplies the row's output, as wide as it: a GRN's gamma of the inner width follows)
            if f.path not in st.out and f.unit.startswith(inside) and not (
                    LAYER_SCALE.match(f.unit_name) and tuple(f.body) == (out,)):
                if _beside(f, inside, out):
                    st.replicate(f, f"per-feature parameter ({out}) held by the block of pair {pair.id} itself, as "
                                    "wide as the residual stream its row writes: it may scale the block's whole "
                                    "input, so kept whole (pass model= to trace it)", pair.id)
                    continue
                if not _joins(st, f, width, out, pair.id, cols[0], row):
                    _follow(st, f, width, pair.id, short(row.path), t_entry, t_size, todo)


def _square_blocks(body: Sequence[int]) -> bool:
    """``(heads, n, n)``: a block-diagonal kernel's, one square block per head."""
    return len(body) == 3 and body[1] == body[2] and body[0] > 1


def _beside(f: Facts, inside: str, out: int) -> bool:
    """A vector the block holds itself (no sub-module of its own) as wide as the residual stream the row writes:
    it may scale the block's input as well as its inner features, and the tree cannot tell which.

    RWKV's time-mix holds ``time_mix_k/v/r`` ``(d,)``, which mix the block's (whole) input with its token
    shift before the key/value/receptance columns, beside ``time_decay``/``time_first`` ``(d,)``, which act on
    the columns' split outputs. Split with the features, the mixing vectors feature-split the whole stream:
    2.12x the collectives of the hand layout (XLA:CPU data=2,model=4); whole, the decays cost each tensor
    rank a slice and a gather of a d-wide gradient. A sub-module's vector (Griffin's ``rg_lru/a_param``) or a
    vector of an inner width other than the residual's reads only the inner features, and still follows.
    """
    return len(f.body) == 1 and f.body[0] == out and f.unit == f.path and f.path.rsplit("/", 1)[0] + "/" == inside


def _joins(st: State, f: Facts, width: int, out: int, pair: int, col: Facts, row: Facts) -> bool:
    """A 2-D dense kernel inside the block reading the pair's ``width`` inner features (a Mamba block's
    ``x_proj`` ``(d_inner, dt_rank + 2 n)``, its ``A_log`` ``(d_inner, n)``) joins the pair as a row split on them;
    one making them from fewer (``dt_proj`` ``(dt_rank, d_inner)``) joins as a column. Only where the inner width
    is not the residual width ``out`` the row writes (an attention block's ``d -> d`` projections are not inner
    features). :func:`tpflax._src.planner.heuristics._beside_a_column` does this beside a depthwise ``nn.Conv``
    in the block itself; here the selective scan's kernels sit in a sub-module (a bidirectional Vision-Mamba's
    ``fwd``/``bwd`` branches, each with a raw ``(taps, d_inner)`` conv weight): kept whole, 1.18x the hand
    layout's collectives (XLA:CPU data=2,model=4). False (nothing written) for any other leaf."""
    if f.kind != "dense" or len(f.body) != 2 or width == out:
        return False
    a, b = f.body
    if a == width and b < width:
        return join_row(st, f, 0, col, f"reads the {width} inner features of pair {pair} inside its block "
                                       "(by shape; pass model= to trace it)")
    if a in (2 * width, 3 * width) and b < width:
        # several views of them concatenated (xLSTM's gates on [q | k | v], each as wide as the inner features):
        # split contiguously, XLA reshards the concatenation (cost.reshard.concat_items), as the hand layout does;
        # kept whole, every tensor rank gathers it whole (1.45x the hand layout's collectives, data=2,model=4)
        return join_row(st, f, 0, col, f"reads {a // width} views of the {width} inner features of pair {pair} "
                                       "concatenated, inside its block (by shape; pass model= to trace it)")
    if b == width and a < width:
        return join_column_of(st, f, 1, row, f"makes {width} inner features of pair {pair} inside its block "
                                             "(by shape; pass model= to trace it)")
    return False


def _follow(st: State, f: Facts, width: int, pair: int, row: str, t_entry, t_size: int,
            todo: Sequence[Facts]) -> None:
    body, over = f.body, axis_label(t_entry, t_size)
    how = f"inside the block of pair {pair}, between its columns and {row}, whose {width} input features are split"
    if len(body) == 1 and body[0] == width:
        st.put(f, body_spec(1, 0, t_entry), "channel", f"per-feature parameter ({width}) {how}: split over {over} "
                                                        "with them (pass model= to trace it)", pair)
    elif len(body) == 2 and body[1] == width and body[0] < width and "conv" in f.unit_name.lower():
        st.put(f, body_spec(2, 1, t_entry), "channel",
               f"depthwise taps ({body[0]} x {width} features) {how}: split over {over} with them (pass model= to "
               "trace it)", pair)
    elif len(body) == 3 and body[1] == body[2] and body[0] * body[1] == width and body[0] % t_size == 0:
        st.put(f, body_spec(3, 0, t_entry), "heads",
               f"block-diagonal gate ({body[0]} heads of {body[1]} x {body[2]}) {how}: its heads split over "
               f"{over} with them (pass model= to trace it)", pair)
        for b in todo:  # its (heads, F/heads) bias: split like the gate's heads
            if b.unit == f.unit and b.kind == "bias" and b.path not in st.out and tuple(b.body) == body[:2]:
                bias_follows(st, b, (t_entry, None), f.path, f"bias of {short(f.path)}")
