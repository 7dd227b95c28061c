"""Decision groups of one leaf: embeddings (and other lookup tables), output heads, fsdp splits.

Each builder proposes the leaf's candidate layouts and lets the chooser
(:mod:`tpflax._src.planner.choose`) price them; the rule sets call these the
way they call the pair builders of :mod:`tpflax._src.planner.builders`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import replace

from tpflax._src.cost.price import ActComm, stream_gathers
from tpflax._src.facts.classify import ATTN, POS_EMBED, REL_BIAS, Facts
from tpflax._src.mesh import FSDP
from tpflax._src.planner.builders import (
    Proposal,
    State,
    axis_label,
    body_spec,
    input_grad_sum,
    logit_acts,
    short,
)
from tpflax._src.planner.choose import Chosen, Option, fit, pick, revise
from tpflax._src.planner.constraints import split_updated, update_gathers
from tpflax._src.specs import Entry, entries, entry_axes, used_axes

# tables named for token types or segments are looked up by ids that carry the batch, as a vocabulary is
_LOOKED_UP_BY_IDS = re.compile(r"token_type|segment", re.I)


def shard_embedding(st: State, f: Facts, vdim: int, evidence: str = "", tied: bool = False,
                    every: Sequence[Facts] = (), score_bias: bool = False) -> None:
    """A table looked up over body dim ``vdim``: vocab split, embedding-dim split or whole, by cost.

    A table of more dims (Gemma 3n's per-layer inputs ``(vocab, layers, width)``, every layer its own
    vector per token) is looked up like the token table: its vocab split sums the looked-up rows, all
    their trailing dims, and it is offered only that split or whole (never tied, no feature split).

    ``every``: the model's leaves, whose norms of the table's width say how often a feature-split
    residual stream is gathered (:func:`~tpflax._src.cost.price.stream_gathers`). ``score_bias``: the trace
    shows its looked-up rows are a bias per head of attention scores (one column per head), as a relative bias
    inside an attention layer is by its place.
    """
    t_entry, t_size = st.tensor
    rank = len(f.body)
    v, d = f.body[vdim], math.prod(f.body) // max(f.body[vdim], 1)
    ev = f"{evidence}; " if evidence else ""
    if t_size == 1:
        st.replicate(f, f"embedding: {ev}no tensor axis in the mesh")
        return
    over = axis_label(t_entry, t_size)
    # a table inside an attention layer (T5's relative-position bias) is never the token table
    # and a table with no more rows than features is more often a learned array (DETR's 16 x 64 object queries) than
    # a vocabulary: kept whole by cost. A character LM's tied 96 x 128 table is one too; whole, it moved 10% fewer
    # collectives for 3% more bytes and 8% more flops than split (measured, data=2,model=4)
    if (rank == 2 and not evidence and st.opts.tied_guess and not POS_EMBED.search(f.unit_name)
            and not ATTN.search(f.path) and v > d):
        tied, ev = True, "no output head in the tree, so priced as tied to the logits; "
    mm = frozenset({f.path}) if tied else frozenset()
    options = []
    # a table inside an attention layer with fewer columns than rows (T5's relative-position bias:
    # buckets x heads): each column is one head's bias, added to that head's scores, which the heads
    # split divides, so it splits with them and moves nothing; split on its rows, every device would
    # sum the looked-up biases of every query-key pair (a scores-sized all-reduce, where the heads
    # split moves none), so that split is not offered. A table named for a relative-position bias is
    # one whatever its width: dalle-mini's ``rel_bias`` (queries, keys x heads), read into the scores as
    # ``q (k h) -> h q k``, split on its columns holds a quarter of the table and XLA:CPU compiles fewer
    # collectives than for the whole table, whose gradient the split scores leave split (measured on the
    # DalleBart probe: 0.95x the bytes, 0.995x the collectives; its row split: 1.08x the collectives)
    # (a table named as a relative-position bias is one wherever it sits: BEiT's, Swin's and a user's own at a
    # block's top level, looked up at fixed distances, were split over their rows, 1.08x the collectives of the
    # heads split when the rows divide, XLA:CPU data=2,model=4)
    rel = bool(REL_BIAS.search(f.unit_name))
    bias = rank == 2 and ((bool(ATTN.search(f.path)) and d < v) or rel or score_bias) and d % t_size == 0
    if (rank == 2 and not evidence and not bias and not rel and POS_EMBED.search(f.unit_name) and not ATTN.search(f.path)
            and not _LOOKED_UP_BY_IDS.search(f.unit_name)):
        # tree-only, a table named for positions is added to every token (ViViT's (S, d) ``pos_space``,
        # broadcast over the batch and frames) or looked up at the positions, not by ids: split on its rows it
        # splits the sequence dim of every activation it meets, which XLA reshards layer after layer (ViViT,
        # data=2,model=4: 1.27x the collectives of the table kept whole, the estimate 0.79 of the compiled),
        # and the tree's tokens per step, read off the batch's leading dim, do not price that
        st.choose("embedding", [Option("replicate", ((f.path, st.whole(
            f, f"embedding: learned positional table ({' x '.join(map(str, f.body))}, named for positions): "
               "added to every token or looked up at the positions, kept whole on every tensor rank (split on "
               "its rows it would split the sequence dim of every activation)")),), (), mm, whole=True)], [f])
        return
    # tree-only, a table with no more rows than features is as often a learned array read whole through
    # ``.embedding`` (DETR's 16 x 128 object queries added to the query stream) as a lookup, and the tree cannot
    # tell: split on its rows, a whole read comes out split on its row dim, which XLA gathers per example
    # (measured, XLA:CPU data=2,model=4, a DETR whose stem the tree cannot count patches for: +368,640 B of
    # all-gathers, 1.16x the collectives of the table kept whole), while a lookup moves no gather at all (a char
    # LM's 64 x 128 table split: 3,015,684 B compiled, none gathered). No price is honest for both, so the row split
    # is not offered: kept whole (a char LM's 64 x 128 table whole: 2,843,652 B compiled), and the reason says so
    read_whole = (rank == 2 and not evidence and not bias and not tied and v <= d and v % t_size == 0
                  and not POS_EMBED.search(f.unit_name))
    if v % t_size == 0 and not bias and not read_whole:
        acts = (ActComm("all-reduce", t_entry, d, 1, "sum the looked-up rows (forward)"),)
        if tied:
            acts += logit_acts(t_entry, d, "tied output embedding")
        options.append(Option("vocab split", ((f.path, st.proposal(
            f, body_spec(rank, vdim, t_entry), "vocab",
            f"vocab: {ev}{v} rows split over {over} (vocab-parallel lookup{' and logits' if tied else ''})")),),
            acts, mm))
    # A model whose own constraint splits its residual stream's features over the tensor axis (MaxText's and
    # EasyDeL's hidden states) pays the stream's gathers whatever the table's layout; split on its features,
    # the table's lookup comes out in the constraint's layout, where the vocab split sums the looked-up rows
    # and reshards them into it (measured, XLA:CPU dp=2,tp=4: EasyDeL's Llama, 0.92x the vocab split's
    # collectives, tests/test_streamed_table.py)
    streamed = rank == 2 and not bias and not tied and d % t_size == 0 and any(
        w == d and set(entry_axes(t_entry)) <= set(axes) for w, axes in st.streamed)
    if streamed:
        options.append(Option("embed-dim split", ((f.path, st.proposal(
            f, body_spec(2, 1 - vdim, t_entry), "vocab",
            f"vocab: {ev}the embedding dim {d} is split over {over}, as the model's own sharding constraint "
            f"splits the residual stream it writes")),), (), mm))
    # The embedding-dim split only where the rows do not divide: measured on a GQA block
    # (tests/test_choose.py), splitting a 128-row token table on its features instead of its rows
    # cost XLA 60% more collectives than the priced gather (its feature-split output feeds a norm).
    if rank == 2 and d % t_size == 0 and not options and not bias and not read_whole:
        # A feature-split table hands XLA a feature-split activation to add to the residual
        # stream, which stays split through every block: gathered behind each of its norms (the
        # estimate counts the same gathers, cost.comm). They are priced at the activation dtype:
        # XLA:TPU moves a float32 stream as bfloat16 (the estimate's TPU backend says so), and the
        # split is not priced padded to 128 lanes: XLA:TPU lays a short sequence in the lanes, and the
        # 3-5x "temp" some tiny split compiles report (distilbert-tok at width 64) is a block of
        # collective descriptors, not data; by XLA's heap peak the split is smaller (benchmarks/
        # tpu_aot_notes.md, round 57)
        gathers = stream_gathers(((g.path, g.kind, g.body, g.leaf.shape[g.layers_at] if g.stacked else 1)
                                  for g in every), d)
        acts = (ActComm("all-gather", t_entry, d, gathers,
                        "gather the looked-up features and the feature-split residual stream behind each "
                        "norm (forward and for the weight gradients)"),)
        if tied:
            acts += (ActComm("all-reduce", t_entry, v, 1, "sum partial logits over the split features"),)
        options.append(Option("embed-dim split", ((f.path, st.proposal(
            f, body_spec(2, 1 - vdim, t_entry), "vocab",
            f"vocab: {ev}" + (f"the embedding dim {d} is split over {over}" if v % t_size == 0 else
                              f"{v} rows not divisible by {t_size}, so the embedding dim {d} is split over "
                              f"{over} instead"))),), acts, mm, sums_output=True))
    if bias:
        options.append(Option("heads split", ((f.path, st.proposal(
            f, body_spec(2, 1 - vdim, t_entry), "heads",
            f"heads: {ev}a {v} x {d} table looked up per query-key pair (traced): its {d} columns (one per head) "
            f"split over {over} like the heads of the scores they are added to" if score_bias and not rel else
            f"heads: {ev}a {v} x {d} table inside an attention layer: its {d} columns (one per head) split "
            f"over {over} like the heads of the scores they are added to" if d < v and not rel else
            f"heads: {ev}a {v} x {d} relative-position bias: its {d} columns, read into the scores, split over "
            f"{over} with them")),)))
    options.append(Option("replicate", ((f.path, st.whole(
        f, f"embedding: {ev}{' x '.join(map(str, f.body))} table kept whole on every tensor rank" + (
            ": a table no taller than it is wide may be read whole (a learned array, not looked up by ids), "
            "which a row split makes XLA gather; its row split is not offered (pass model= to trace it)"
            if read_whole else ""))),), (), mm, whole=True))
    st.choose("embedding", options, [f])


def shard_output_head(st: State, f: Facts, dim: int, evidence: str) -> None:
    """An output head (logits): column over its output body dim ``dim`` or whole, by cost; kind ``head``."""
    t_entry, t_size = st.tensor
    n = f.body[dim]
    if t_size > 1 and n % t_size == 0:
        d = math.prod(f.body) // n
        mm = frozenset({f.path})
        split = Option("vocab split", ((f.path, st.proposal(
            f, body_spec(len(f.body), dim, t_entry), "column",
            f"{evidence}; {n} outputs split over {axis_label(t_entry, t_size)} (vocab-parallel logits)",
            kind="head")),), logit_acts(t_entry, d, "vocab-split output head", f.path not in st.no_input_grad), mm,
            # its input gradient, summed per token, is wider than the outputs it divides (a value, reward or box
            # head of a few outputs): step time decides against keeping it whole (choose.best)
            sums_output=d >= n)
        whole = Option("replicate", ((f.path, st.whole(f, f"{evidence}; kept whole on every tensor rank",
                                                       kind="head")),), (), mm, whole=True)
        st.choose("head", [split, whole], [f])
    else:
        st.replicate(f, f"{evidence}; " + ("no tensor axis in the mesh" if t_size == 1 else
                                           f"{n} outputs not divisible by {axis_label(t_entry, t_size)}, "
                                           "kept whole"), kind="head")


def shard_lone_dense(st: State, f: Facts, dim: int, why: str,
                     stream: tuple[float, int, int] | None = None, reached: Sequence[Facts] = (),
                     grown: float = 1.0, reduced: bool = False, resequenced: bool = False,
                     calls: tuple[int, float, float, int, int] | None = None) -> None:
    """A dense without a partner: whole, or its output body dim ``dim`` split over the tensor axis, by cost.

    It is priced at the rows it reads per token the chooser prices (traced, ``State.rows``): a projection of
    pooled outputs (CLIP's text and image projections, a class token's head) reads one row per
    example, so gathering its split output and summing its input gradient move next to nothing,
    while the split divides its bytes, flops and gradient reduction. On every token the
    collectives cost more than they save and it stays whole (measured: tests/test_patterns.py).
    ``stream``: ``(rows over its own, width, gathers)`` when its output scales a larger activation
    elementwise (:func:`~tpflax._src.trace.spread.spread_streams`: DiT's adaLN): split, it leaves XLA a
    feature-split residual stream, gathered that often.
    ``reached``: the trained leaves kept whole whose gradient its split output would split
    (:func:`~tpflax._src.planner.followers.whole_reached`: the adaLN modulation kernels reading a split time
    embedding); XLA sums their gradient split, runs their update split and gathers them back
    (:func:`reached_acts`).
    ``grown``: how many times its own rows its split output has where it is read whole, upsampled on the
    way (:attr:`~tpflax._src.trace.records.Dataflow.grown`: SegFormer's per-stage heads, resized to the
    first stage's resolution and concatenated): XLA carries the split through the interpolation and
    gathers the upsampled output.
    ``reduced``: its output is only reduced row by row (:meth:`~tpflax._src.trace.records.Dataflow.only_reduced`:
    NetKet's RBM sums the log-cosh of its hidden units): split, XLA all-reduces one value per row, no gather.
    ``resequenced``: a reshape moves part of its output features into the rows
    (:attr:`~tpflax._src.trace.records.Dataflow.resequenced`: Hourglass's linear upsampling,
    ``(b, s/k, k*d) -> (b, s, d)``): XLA carries the split into the sequence dim of every layer after it
    and reshards them there (measured on a compiled adamw step, data=2,model=4: 3.3 MB of all-gathers plus
    all-to-alls and permutes where one gather of the output is 98 KB), so it is kept whole.
    ``calls``: ``(calls, input-gradient sums, output gathers, sums counted, gathers counted)`` of one
    kernel called several times in a chain (:func:`~tpflax._src.planner.dataflow_rules._chained_calls`), its
    ``State.rows`` every call's: the split is priced with that many sums and gathers per step, each at its own
    rows, as the estimate counts them (:func:`tpflax._src.cost.chain.chain_collectives`), not one of each.
    """
    t_entry, t_size = st.tensor
    keep = Option("replicate", ((f.path, st.whole(f, why)),), (), frozenset({f.path}), whole=True)
    n = f.body[dim]
    share = st.rows.get(f.path, 0.0)
    if t_size == 1 or n % t_size or share <= 0:
        st.choose("dense", [keep], [f])
        return
    if resequenced:
        st.choose("dense", [replace(keep, proposals=((f.path, st.whole(
            f, f"{why}; not split: a reshape moves its {n} outputs partly into the rows (an upsampling), where "
               "XLA would carry the split into the sequence dim of the layers after it")),))], [f])
        return
    whole, split_acts = reached_acts(st, t_entry, reached)
    keep = replace(keep, acts=whole)
    over = axis_label(t_entry, t_size)
    if calls is not None:
        # the rows priced are every call's (share): a width per token counts once per call, so each collective's
        # width is scaled by its count over the calls
        n_calls, sums, gathers, n_sums, n_gathers = calls
        batch = st.context.batch_axes
        if batch and f.leaf.trainable and n_calls > 1:
            # each call's weight gradient is reduced over the batch axes apart, as the estimate counts it
            # (cost.gradients: "used whole N times"; measured, XLA:CPU data=2,model=4 and fsdp=2,model=4, 3 calls:
            # 3 all-reduces, whole or on the column's shard): the calls after the first, on top of the leaf's own
            def again(size: float) -> tuple[ActComm, ...]:
                return (ActComm("all-reduce", batch, 0, 1, f"reduce the weight gradient of each of its {n_calls - 1} "
                                "later calls over the batch apart", size * (n_calls - 1), every_layer=True),)

            keep = replace(keep, acts=keep.acts + again(f.leaf.nbytes))
            split_acts = (*split_acts, *again(f.leaf.nbytes / t_size))
        acts = (*((ActComm("all-gather", t_entry, n * gathers / n_calls, 1,
                           f"gather its split output {n_gathers} times over its {n_calls} calls (forward, and for "
                           "the weight gradients where its calls add back onto their input)"),) if gathers else ()),
                *((ActComm("all-reduce", t_entry, math.prod(f.body) // n * sums / n_calls, 1,
                           f"sum its input gradient at each of its {n_sums} calls reading an activation "
                           "(backward)"),) if sums else ()))
    else:
        acts = (ActComm("all-reduce", t_entry, 1, 1, "sum each row's partial reduction of its split output "
                        "(forward)") if reduced else
                ActComm("all-gather", t_entry, n * grown, 1, "gather its split output (forward)" if grown == 1 else
                        f"gather its split output, upsampled {grown:.3g}x on the way (forward)"),
                *input_grad_sum(st, f.path, math.prod(f.body) // n, "sum its input gradient (backward)"))
    if stream:
        ratio, width, gathers = stream
        acts += (ActComm("all-gather", t_entry, ratio * width, gathers, "gather the residual stream its split "
                         "output splits, for each kernel that reads or writes it"),)
    acts += split_acts
    split = Option("column", ((f.path, st.proposal(
        f, body_spec(len(f.body), dim, t_entry), "column",
        (f"column: dense without a partner called {calls[0]} times in a chain (traced); its {n} " if calls else
         f"column: dense without a partner reading {share:.3g} rows per token (traced); its {n} ") +
        f"outputs split over {over}, " + ("each row's partial reduction of them summed" if reduced else
                                          "gathered for what reads them whole"), role="column")),),
        acts, frozenset({f.path}), sums_output=True)
    st.choose("dense", [keep, split], [f])


def fsdp(st: State, facts: Sequence[Facts]) -> None:
    """Float leaves also split their largest free divisible dim over the fsdp axes.

    With ``fsdp_min_bytes`` None the chooser decides each leaf by cost (on TPU
    and GPU the gather and the reduce-scatter cost what the data-parallel
    all-reduce they replace costs, so the split wins on memory); with a number,
    leaves at least that large split.

    A model repeats its layers: a leaf alike to one decided before in this pass (same shape,
    dtype, layers dim, proposal spec and strategy, rows) takes that leaf's choice, its reason's
    tail and its alternatives (:class:`_Reuse`), with its own proposal's reason before them.
    """
    f_entry, f_size = st.mesh.group(FSDP)
    by_cost = st.opts.fsdp_min_bytes is None
    f_axes = set(entry_axes(f_entry))
    label = axis_label(f_entry, f_size)
    seen: dict[tuple, _Reuse] = {}
    for f in facts if f_size > 1 else ():
        p = st.out[f.path]
        if f.leaf.numeric not in ("float", "complex", "int") or f.kind in ("int", "state") or f.leaf.nbytes == 0:
            continue
        if not by_cost and f.leaf.nbytes < st.opts.fsdp_min_bytes:
            if p.strategy == "replicate":
                st.out[f.path] = revise(p, reason=p.reason + f"; below fsdp_min_bytes ({f.leaf.nbytes} < "
                                                               f"{st.opts.fsdp_min_bytes})")
            continue
        if used_axes(p.spec) & f_axes:
            continue
        key = (p.spec, p.strategy, f.leaf.shape, f.leaf.itemsize, f.leaf.trainable, f.stacked, f.layers_at,
               st.rows.get(f.path), f.path in st.positional, st.casts.get(f.path, "")) if by_cost and f.path not in st.forced else None
        reuse = seen.get(key) if key is not None else None
        if reuse is not None:
            reuse.apply(st, f, p)
            continue
        free = [d for d in range(len(f.leaf.shape)) if d != f.layers_dim
                and p.spec[d] is None and f.leaf.shape[d] % f_size == 0]
        if not free:
            st.out[f.path] = revise(p, reason=p.reason + f"; no free dim divisible by {label} for fsdp")
            continue
        dim = max(free, key=lambda d: (f.leaf.shape[d], -d))
        spec = list(p.spec)
        spec[dim] = f_entry
        tail = (f"; fsdp: dim {f.body_dim(dim)} ({f.leaf.shape[dim]}) split over {label}" +
                ("" if by_cost else f" (leaf {f.leaf.nbytes} B >= fsdp_min_bytes)"))
        on = revise(p, spec=tuple(spec), strategy="fsdp" if p.strategy == "replicate" else p.strategy, fsdp=True,
                    reason=p.reason + tail)
        if by_cost:
            n = len(st.chosen)
            st.choose("fsdp", [Option("fsdp", ((f.path, on),)), Option("no fsdp", ((f.path, p),))], [f])
            if key is not None and len(st.chosen) == n + 1:
                seen[key] = _Reuse(st.chosen[-1], tail, p, st.out[f.path])
        else:
            st.out[f.path] = on
    st.doubts.extend(fit(st, st.opts.device_memory))


class _Reuse:
    """One leaf's priced fsdp choice, for the alike leaves after it (:func:`fsdp`): the chooser's
    costs and pick, the words it added to the chosen proposal's reason and the alternatives it
    added after the leaf's own, none of which name the leaf."""

    def __init__(self, ch: Chosen, tail: str, p: Proposal, out: Proposal) -> None:
        on = ch.options[0].proposals[0][1]
        chosen = ch.options[ch.index].proposals[0][1]
        self.ch, self.tail, self.spec, self.strategy = ch, tail, on.spec, on.strategy
        self.words = out.reason[len(chosen.reason):]
        self.alts = out.alternatives[len(p.alternatives):]

    def apply(self, st: State, f: Facts, p: Proposal) -> None:
        """Write the choice for alike leaf ``f`` (its proposal ``p``), as :func:`fsdp` would have."""
        ch = self.ch
        on = (revise(p, spec=self.spec, strategy=self.strategy, fsdp=True, reason=p.reason + self.tail)
              if ch.index == 0 or st.opts.device_memory else None)
        st.facts[f.path] = f
        if st.opts.device_memory:  # only fit() reads the groups, and only under a memory budget
            st.chosen.append(Chosen(ch.kind, (Option("fsdp", ((f.path, on),)), Option("no fsdp", ((f.path, p),))),
                                    ch.costs, ch.index, {f.path: f}, ch.tokens))
        chosen = on if ch.index == 0 else p
        st.out[f.path] = revise(chosen, reason=chosen.reason + self.words, alternatives=p.alternatives + self.alts)


def reprice_stream_updates(st: State, every: Iterable[Facts]) -> None:
    """Reprice a table split on its features once the other groups are decided: its split residual stream
    splits the gradient of every trained leaf of the stream's width kept whole (an output head whose rows do
    not divide, a whole projection reading the stream), whose update XLA then runs split and gathers back
    (:func:`reached_acts`; the estimate: :func:`tpflax._src.cost.stream.stream_reached`).
    Priced with the table's own choice, those gathers were missed: a Mamba-2 LM's 1003-row table split on its
    128 features (its untied ``(128, 1003)`` head and B/C projections whole) was chosen for 2.1 us less step
    time than whole; compiled for v5e:2x4 it took 5.6 us more (data=2,model=4; 7.0 us on fsdp=2,model=4),
    1.4x the collectives of the table kept whole. The leaves it reaches are read from the tree (their width),
    so tree-only plans are repriced alike: RWKV-4's tree plan split its 1003-row table, 1.70x the collectives
    of the hand layout (XLA:CPU data=2,model=4)."""
    every = list(every)
    t_entry, _ = st.tensor
    tensor = set(entry_axes(t_entry))
    for k, ch in enumerate(list(st.chosen)):
        o = ch.options[ch.index]
        if ch.kind != "embedding" or o.name != "embed-dim split" or not o.sums_output or len(o.proposals) != 1:
            continue
        path, p = o.proposals[0]
        f = ch.facts[path]
        split = [i for i, e in enumerate(entries(p.spec, len(f.leaf.shape))) if set(entry_axes(e)) & tensor]
        if len(split) != 1:
            continue
        width = f.leaf.shape[split[0]]
        reached = [g for g in every if g.path != path and width in g.body and (d := st.decided(g.path)) is not None
                   and not used_axes(d.spec) & tensor]
        whole, split_acts = reached_acts(st, t_entry, reached)
        if not split_acts:
            continue
        options = [replace(x, acts=x.acts + (split_acts if x is o else whole if x.whole else ()))
                   for x in ch.options]
        st.chosen.pop(k)
        n = len(st.chosen)
        pick(st, ch.kind, options, ch.facts)
        if len(st.chosen) > n:  # priced (two or more options): back in its place among the groups
            st.chosen.insert(k, st.chosen.pop())


def reached_acts(st: State, t_entry: Entry, reached: Sequence[Facts]
                 ) -> tuple[tuple[ActComm, ...], tuple[ActComm, ...]]:
    """``(whole, split)``: what the ``reached`` leaves (kept whole on the tensor axis) move when a kernel stays
    whole and when its split output splits their gradient, as the estimate counts them
    (:func:`tpflax._src.cost.stream.split_updates`, :func:`tpflax._src.cost.stream.update_gathers`): their
    gradient summed over the batch axes whole, or on its split shard; then XLA updates each split and gathers
    the parameter and its :data:`~tpflax._src.cost.price.OPT_COPIES` moments, or, under the step's fsdp
    pinning (an fsdp axis in the mesh), gathers the gradient once, whole, and runs the update as stored.
    XLA:TPU does so for kernels only (on GPU the estimate counts none). Measured on flaxdiff's SimpleMMDiT
    (benchmarks/probe_flaxdiff.py, data=2,model=4, XLA:CPU and compiled for v5e:2x4 alike): a split time
    embedding and text projection left 12 gathers of the four ``(64, 384)`` modulation kernels and summed
    their gradients as quarters, 1.14x the hand layout's collectives on CPU; under fsdp the one gather costs
    what the smaller sum saves, and the split's memory and flops decide."""
    leaves = split_updated(st, reached)
    if not leaves:
        return (), ()
    t_size, total = st.tensor[1], sum(g.leaf.nbytes for g in leaves)
    batch = st.context.batch_axes
    names = ", ".join(short(g.path) for g in leaves[:3]) + (", ..." if len(leaves) > 3 else "")

    def summed(size: float, how: str) -> tuple[ActComm, ...]:
        return (ActComm("all-reduce", batch, 0, 1, f"sum the gradients of {names} over the batch, {how}",
                        size, every_layer=True),) if batch else ()

    gathers = update_gathers(st, t_entry, leaves, f"the whole leaves whose gradient its split output splits ({names})")
    return summed(total, "whole"), (*summed(total / t_size, "on the split shard"), *gathers)
