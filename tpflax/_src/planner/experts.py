"""Expert pairs: stacked expert kernels ``(E, d, f)`` -> ``(E, f, d)``, split over an expert axis or by cost.

On a mesh with an expert axis dividing the experts, they split over it and their ffn dim over the tensor
axis. On a mesh without one ({data, model}, {fsdp, model}), the chooser prices the layouts the tensor axis
allows (Megatron inside each expert, the experts over the tensor axis, whole) with what each sums, read
off the trace where there is one (the buffer the experts read), and keeps the cheapest.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from tpflax._src.cost.price import ActComm
from tpflax._src.facts.classify import Facts
from tpflax._src.mesh import EXPERT, batch_axes
from tpflax._src.planner.builders import State, axis_label, body_spec, join_column, row_sum, short
from tpflax._src.planner.choose import Option


def shard_experts(st: State, col: Facts, row: Facts, n_exp: int, ffn: int, evidence: str = "",
                  gated: Sequence[tuple[Facts, str]] = (), ffn_dims: tuple[int, int] = (2, 1),
                  kept_experts: bool = False) -> None:
    """Expert kernels ``col`` (E, d, f) (and the ``gated`` second up-projections beside it, each with why)
    feeding ``row`` (E, f, d).

    ``ffn_dims``: the body dims of the ffn dim in ``col`` and in ``row`` (``(2, 1)`` as above; ``(1, 1)`` for
    DBRX's kernels, all three stored (E, f, d)). ``kept_experts``: the row's contraction batches over the
    experts (``btef,efd->bted``, a combine by the router weights after it), so its output keeps them, and
    Megatron inside each expert sums E times the layer's width where the experts over the tensor axis leave
    each device its experts' outputs whole (measured, XLA:CPU data=2,model=4, DBRX-style experts: ``f32[b, t,
    E, d]`` all-reduced at ``btef,efd->bted``, 1.19x the collectives of the experts split over model).

    On a mesh with an expert axis that divides E: E over it, f over the tensor axis. Without one, the
    chooser prices Megatron inside each expert (f over the tensor axis), the experts over the tensor axis
    (E over it: expert parallelism on the tensor axis) and whole experts, and keeps the cheapest
    (:func:`_expert_options`).
    """
    t_entry, t_size = st.tensor
    e_entry, e_size = st.mesh.group(EXPERT)
    e_ok = e_size > 1 and n_exp % e_size == 0
    t_ok = t_size > 1 and ffn % t_size == 0
    et_ok = not e_ok and t_size > 1 and n_exp % t_size == 0
    cols = [col, *(g for g, _ in gated)]
    cf, rf = ffn_dims
    pair = st.new_pair("expert", cols, [row], ffn, t_ok or e_ok or et_ok,
                       "" if t_ok or et_ok else f"ffn {ffn} not divisible by {axis_label(t_entry, t_size)}")
    e_txt = (f"{n_exp} experts over {axis_label(e_entry, e_size)}" if e_ok else
             ("the mesh has no expert axis" if e_size == 1 else f"{n_exp} experts not divisible by "
              f"{axis_label(e_entry, e_size)}"))
    # untraced, the two tensor-axis layouts tie at the tokens and Megatron is kept: measured on XLA:CPU
    # data=2,model=4, the experts over the tensor axis cost 0.58-0.87x Megatron's collectives on a GShard or
    # Switch dispatch, but 2.0x on tokens sorted for ragged_dot and 9x (3.7x the flops) on a Python loop over the
    # experts; the trace tells them apart
    tail = f"; {evidence}" if evidence else ""
    if not et_ok:
        e_spec = e_entry if e_ok else None
        t_spec = t_entry if t_ok else None
        t_txt = f"ffn {ffn} split over {axis_label(t_entry, t_size)}" if t_ok else "ffn dim whole"
        st.put(col, _spec(e_spec, cf, t_spec), "expert" if e_ok else ("column" if t_ok else "replicate"),
               f"expert column: {e_txt}; {t_txt}; feeds {short(row.path)} (pair {pair.id}){tail}", pair.id, "column")
        st.put(row, _spec(e_spec, rf, t_spec), "expert" if e_ok else ("row" if t_ok else "replicate"),
               f"expert row: {e_txt}; {t_txt}; fed by {short(col.path)} (pair {pair.id}){tail}", pair.id, "row")
        for g, why in gated:
            join_column(st, g, col, why)
        return
    if not evidence:
        tail += ("; untraced: experts over the tensor axis would sum less around a dispatched buffer (GShard, "
                 "Switch) and more around sorted (ragged_dot) or looped experts; pass model= to tell")
    st.choose("expert", _expert_options(st, cols, row, pair.id, ffn, t_ok, (e_txt, tail), [why for _, why in gated],
                                        ffn_dims, n_exp if kept_experts else 1), [*cols, row])
    chosen = st.out.get(row.path)
    if chosen is not None and chosen.strategy == "replicate":  # the chooser kept the experts whole
        st.pairs[st.pairs.index(pair)] = replace(pair, sharded=False, note="kept whole: cheaper by cost")


def _spec(e_entry: Any, ffn_dim: int, t_entry: Any) -> tuple:
    """An expert kernel's body spec: ``e_entry`` on its experts (dim 0), ``t_entry`` on its ffn dim ``ffn_dim``."""
    spec: list[Any] = [e_entry, None, None]
    spec[ffn_dim] = t_entry
    return tuple(spec)


def _expert_options(st: State, cols: list[Facts], row: Facts, pid: int, ffn: int, t_ok: bool,
                    said: tuple[str, str], gated: list[str], ffn_dims: tuple[int, int] = (2, 1),
                    kept: int = 1) -> list[Option]:
    """The candidate layouts of an expert pair on a mesh without an expert axis, with the collectives each
    causes per priced token (:func:`shard_experts`).

    Megatron inside each expert sums the buffer the experts read: its row's partial outputs (forward) and
    each column's partial input gradients (backward). The experts over the tensor axis sum nothing around
    the expert matmuls when they read a dispatched buffer (traced, ``State.buffers``): the combine sums
    their outputs and the dispatch's transpose their input gradients, at the layer's tokens, once each
    (measured, benchmarks/linen_probe.py moe-mixtral and moe-switch, XLA:CPU data=2,model=4: the
    estimate's :func:`tpflax._src.cost.comm.expert_split_items`); read by an einsum over every token
    (``btd,edf->btef``, or untraced) they sum as Megatron's do, at the tokens. A buffer the dispatch summed
    the batch into is summed over the batch axes before the experts and its gradient after them, whole
    on each device unless its experts are split (:func:`tpflax._src.cost.experts.buffer_items`).
    ``ffn_dims``, ``kept``: :func:`shard_experts`'s ``ffn_dims``, and ``E`` when the row's output keeps the
    experts (its ``kept_experts``; else 1): Megatron's row then sums ``kept`` times its width a token.
    """
    t_entry, t_size = st.tensor
    over = axis_label(t_entry, t_size)
    cf, rf = ffn_dims
    d_in, d_out = cols[0].body[3 - cf], row.body[3 - rf]
    # rows per priced token on one device of the buffer each kernel reads (1: the layer's tokens, untraced or
    # no dispatch)
    rows = {f.path: st.buffers.get(f.path, 1.0) for f in [*cols, row]}
    ratio = max(rows.values())
    buffered = all(f.path in st.buffers for f in [*cols, row])
    b_axes = tuple(a for a in batch_axes(st.mesh) if st.mesh.sizes[a] > 1)

    def buffer_sums(split: int) -> tuple[ActComm, ...]:
        if not b_axes or not all(f.path in st.batch_free for f in [*cols, row]):
            return ()
        return (ActComm("all-reduce", b_axes, d_in * ratio / split, 1, "sum the batch-free dispatch over the batch"),
                ActComm("all-reduce", b_axes, d_out * ratio / split, 1, "sum its output's gradient over the batch"))

    def props(specs: tuple[tuple, tuple], strategies: tuple[str, str], words: str) -> tuple:
        (c_spec, r_spec), (e_txt, tail) = specs, said
        out = [(cols[0].path, st.proposal(cols[0], c_spec, strategies[0], f"expert column: {e_txt}; {words}; feeds "
                                          f"{short(row.path)} (pair {pid}){tail}", pid, "column"))]
        out += [(g.path, st.proposal(g, c_spec, strategies[0], f"expert column: {words}; {why}", pid, "column"))
                for g, why in zip(cols[1:], gated, strict=True)]
        out.append((row.path, st.proposal(row, r_spec, strategies[1], f"expert row: {e_txt}; {words}; fed by "
                                          f"{short(cols[0].path)} (pair {pid}){tail}", pid, "row")))
        return tuple(out)

    matmul = frozenset(f.path for f in [*cols, row])
    options = []
    if t_ok:
        # a row reading no buffer whose contraction keeps the experts: its partial outputs are E per token
        wide = kept if row.path not in st.buffers else 1
        split_ffn = {(c.path, c.leaf_dim(cf)) for c in cols} | {(row.path, row.leaf_dim(rf))}
        acts = (row_sum(st, row, d_out * rows[row.path] * wide, batched=True),
                *(ActComm("all-reduce", t_entry, d_in * rows[c.path], 1, "column: sum partial input gradients "
                          "(backward)") for c in cols), *buffer_sums(1), *_split_sums(st, split_ffn, cols[0]))
        options.append(Option("Megatron in each expert", props(
            (_spec(None, cf, t_entry), _spec(None, rf, t_entry)), ("column", "row"), f"ffn {ffn} split over {over}"),
            acts, matmul))
    sums = (ActComm("all-reduce", t_entry, d_out, 1, "the combine sums the experts' outputs (forward)"),
            *(ActComm("all-reduce", t_entry, d_in, 1, "sum the experts' input gradients (backward)")
              for _ in (cols[:1] if buffered else cols)), *buffer_sums(t_size))
    if all(f.leaf_dim(0) in st.ragged.get(f.path, ()) for f in [*cols, row]):
        # ragged dots (sorted tokens) carry no experts dim to split alike: every dot sums its output and its input
        # gradient (the estimate's cost.comm.ragged_split_items), 2.0x Megatron's collectives measured (XLA:CPU
        # data=2,model=4, a dropless Mixtral-like MoE)
        sums = (*(ActComm("all-reduce", t_entry, width * rows[f.path], 1, f"ragged dot: sum its partial {what}")
                  for f, k in [*((c, cf) for c in cols), (row, 3 - rf)]
                  for width, what in ((f.body[k], "output (forward)"), (f.body[3 - k], "input gradient (backward)"))),
                *buffer_sums(1))  # the sorted tokens stay whole on each device, whatever splits the experts
    options.append(Option("experts over the tensor axis", props(
        ((t_entry, None, None), (t_entry, None, None)), ("expert", "expert"),
        f"{row.body[0]} experts split over {over} (expert parallelism over the tensor axis)"), sums, matmul))
    options.append(Option("replicate", props(((None,) * 3, (None,) * 3), ("replicate", "replicate"),
                                             "kept whole on every tensor rank"), buffer_sums(1), matmul, whole=True))
    return options


def _split_sums(st: State, split: set[tuple[str, int]], f: Facts) -> tuple[ActComm, ...]:
    """The all-reduces of products of two activations that sum a leaf dim in ``split`` (traced,
    :attr:`State.split_sums`), as the estimate prices them (its ``split_sum_items``).

    Megatron in each expert splits the ffn dim that the combine's routing weights meet: DeepSeek-MoE's
    ``bsef,efd,bse->bsd`` sums the weights' gradient over the split ffn (a ``(tokens, experts)`` all-reduce per
    pass), which the experts over the tensor axis do not (their combine is priced with them). Unpriced, the two
    layouts tied exactly on 16 fine-grained experts of ffn 64 and Megatron's slivers were kept; compiled (XLA:CPU
    data=2,model=4) they hold 3% more bytes and 0.8% more collectives than the experts over the tensor axis.
    """
    t_entry, _ = st.tensor
    layers = f.leaf.shape[f.layers_at] if f.stacked else 1  # a scan's steps are counted once per layer (ActComm)
    return tuple(ActComm("all-reduce", t_entry, width, max(1, runs // layers),
                         "a product of two activations sums the split ffn: all-reduce its partial sums")
                 for dims, width, runs in st.split_sums if dims & split)


def shard_straddled(st: State, cols: Sequence[tuple[Facts, int]], row: tuple[Facts, int], n_exp: int,
                    evidence: str) -> None:
    """Experts stored flat ``(E * f, d)`` (DBRX's checkpoints) read ``(E, f, d)``, ``cols`` feeding ``row`` (each with
    the leaf dim the experts are cut from), over tensor ranks ``n`` that neither divide ``E`` nor are a multiple of
    it (6 experts over 4): split on the flat dim, each rank's block straddles experts. XLA gathers the blocks over
    ``n / g`` ranks (``g = gcd(E, n)``) into ``g`` parts of whole experts and runs the experts split ``g`` ways:
    the combine sums their outputs over the ``g`` parts (forward) and each column's input gradient likewise
    (backward), each part's gradient summed over the batch whole (measured, XLA:CPU data=2,model=4, 6 experts:
    ``f32[384, 64]`` gathered over groups of 2 for each kernel; 0.51x the bytes, 0.88x the collectives, 0.54x the
    flops of the experts kept whole, which is what the planner did, the heads-like limit of 6 not dividing 4).
    The chooser prices it (:attr:`tpflax._src.cost.price.LeafLayout.held`) against the experts kept whole.
    """
    t_entry, t_size = st.tensor
    g = math.gcd(n_exp, t_size)
    (fr, rdim), members = row, [*cols, row]
    roles = ["column"] * len(cols) + ["row"]
    pair = st.new_pair("expert", [f for f, _ in cols], [fr], fr.leaf.shape[rdim], True)
    over = axis_label(t_entry, t_size)
    d_out = fr.body[1 - fr.body_dim(rdim)]
    rows = max(st.buffers.get(f.path, 1.0) for f, _ in members)
    words = (f"{n_exp} experts stored flat, split over {over} in blocks that straddle experts: XLA gathers them "
             f"into {g} parts of whole experts")

    def prop(f: Facts, dim: int, strategy: str, role: str, why: str) -> Any:
        return st.proposal(f, body_spec(len(f.body), f.body_dim(dim), t_entry) if strategy != "replicate" else
                           (None,) * len(f.body), strategy, why, pair.id, role)

    acts = (ActComm("all-reduce", t_entry, d_out * rows, 1, f"the combine sums the {g} parts' outputs (forward)",
                    ranks=g),
            *(ActComm("all-reduce", t_entry, f.body[1 - f.body_dim(d)] * rows, 1,
                      f"sum {short(f.path)}'s input gradients over the {g} parts (backward)", ranks=g)
              for f, d in cols))
    matmul = frozenset(f.path for f, _ in members)
    split = Option("experts straddled", tuple(
        (f.path, prop(f, d, "expert", role, f"expert {role}: {words}; {evidence} (pair {pair.id})"))
        for (f, d), role in zip(members, roles, strict=True)),
        acts, matmul, held=tuple((f.path, g) for f, _ in members))
    whole = Option("replicate", tuple(
        (f.path, prop(f, d, "replicate", role, f"expert {role}: kept whole on every tensor rank; {evidence} "
                      f"(pair {pair.id})"))
        for (f, d), role in zip(members, roles, strict=True)), (), matmul, whole=True)
    st.choose("expert", [split, whole], [f for f, _ in members])
    chosen = st.out.get(fr.path)
    if chosen is not None and chosen.strategy == "replicate":
        st.pairs[st.pairs.index(pair)] = replace(pair, sharded=False, note="kept whole: cheaper by cost")
