"""Dataflow rules: proposals for the leaves the traced forward pass explains.

Reads a :class:`tpflax._src.trace.dataflow.Dataflow` and builds specs with the
shared builders (:mod:`tpflax._src.planner.builders`), so the traced plan and
the tree heuristics speak the same vocabulary. The rules, in order: recurrent
cells, embeddings, column -> row pairs (and conv pairs, experts), output
heads and unpaired contractions, depthwise convolutions, biases, elementwise scales, fsdp.
"""

from __future__ import annotations

import dataclasses
import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tpflax._src.cost.buffers import ragged_groups
from tpflax._src.cost.chain import chain_calls, chain_collectives
from tpflax._src.cost.residual import Recompute
from tpflax._src.facts.classify import Facts
from tpflax._src.mesh import MeshShape, batch_axes
from tpflax._src.planner.builders import (
    Linear,
    Options,
    Proposal,
    State,
    conv_floor,
    join_column_of,
    join_row,
    shard_conv_pair,
    shard_pair,
    short,
    whole_conv_pair,
)
from tpflax._src.planner.constraints import pins
from tpflax._src.planner.decision import Pair
from tpflax._src.planner.experts import shard_experts, shard_straddled
from tpflax._src.planner.followers import follow, whole_reached
from tpflax._src.planner.leaf_groups import (
    fsdp,
    reprice_stream_updates,
    shard_embedding,
    shard_lone_dense,
    shard_output_head,
)
from tpflax._src.planner.repeats import merge_uses
from tpflax._src.specs import entries, to_pspec
from tpflax._src.trace.dataflow import Dataflow, Edge, Use
from tpflax._src.trace.records import score_bias_tags
from tpflax._src.trace.spread import GATHERS_PER_TOUCH, reader_streams, spread_streams

_CONTRACT = ("dot", "conv")


def _via(via: Sequence[str]) -> str:
    return "through " + ", ".join(via) if via else "directly"


@dataclass
class _Flow:
    """One pass: the state, the traced leaves (with the trace's scan dims) and their uses."""

    st: State
    flow: Dataflow
    fx: dict[str, Facts]
    uses: dict[str, list[Use]]
    # contractions of kernels used exactly once, and the edges between them
    cand: dict[int, Use] = field(default_factory=dict)
    out_edges: dict[tuple[int, int], list[Edge]] = field(default_factory=lambda: defaultdict(list))
    in_edges: dict[int, list[Edge]] = field(default_factory=lambda: defaultdict(list))
    # kernels whose few rows scale the residual stream elementwise (trace.spread)
    streams: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    # a lone kernel's output width, and the gathers its later readers make of it split (reader_streams)
    readers: dict[str, tuple[float, int, int]] = field(default_factory=dict)
    # low-rank adapters left out of a pair of their own: {B's use id: A's use id} (see _low_rank)
    adapters: dict[int, int] = field(default_factory=dict)
    # the flow's meeting parameter dims (Dataflow.meets), found when a lone kernel first needs them
    meets: tuple[tuple[str, int, str, int], ...] | None = None
    # kernels contracted at every step of a loop body, off its recurrence: {path: "at each of its N steps"}
    looped: dict[str, str] = field(default_factory=dict)


def propose(facts: Sequence[Facts], mesh: MeshShape, opts: Options, flow: Dataflow,
            skip: Mapping[str, Proposal] | None = None, widest_rows: int = 0, sample_rows: int = 0,
            buffers: Mapping[str, tuple[float, bool]] | None = None,
            recomputed: Recompute | None = None) -> tuple[dict[str, Proposal], list[Pair]]:
    """Proposals for the leaves the dataflow explains; ``(proposals, pairs)``.

    Leaves in ``skip`` (rules, annotations) and leaves the trace says nothing
    about are left to the tree heuristics. ``widest_rows``: the rows the widest
    traced layer reads, what the chooser's ``tokens`` count (a layer reading
    fewer, a pooled projection, is priced per row it reads). ``sample_rows``: the traced sample's
    rows counted as the chooser counts a batch's tokens (:func:`tpflax._src.cost.activations.token_rows`:
    an image batch's examples, a ``(batch, seq, features)`` batch's positions); where no traced layer
    reads token rows, a conv is priced per that row. ``buffers``: the
    dispatched buffers expert kernels read (:func:`tpflax._src.planner.pricing.expert_buffers`). ``recomputed``: which
    split rows' sums a remat'd step runs again (:func:`tpflax._src.planner.pricing.recompute`).
    """
    # no input gradient is computed where a kernel reads the model's own input, nor where it reads only what frozen
    # parameters compute (plan(trainable=), an optimizer's frozen labels, a leaf read through stop_gradient: a
    # LoRA base's first layers, the layer behind a frozen embedding), as the estimate prices both (Workload.widths)
    trained = {f.path: f.leaf.trainable and f.path not in flow.no_grad for f in facts}
    no_input_grad = flow.input_reads() | (flow.frozen_reads(trained) if not all(trained.values()) else frozenset())
    c = _start(facts, State(mesh, opts, forced=dict(skip or {}), positional=frozenset(flow.positional()),
                            casts=flow.cast_to(), ragged=ragged_groups(flow),
                            pins=pins(flow), streamed=frozenset(flow.split_widths),
                            no_input_grad=no_input_grad, recompute=recomputed), flow)
    widest = widest_rows or max((u.token_rows for u in flow.uses), default=0)
    for u in flow.uses:  # what each contraction reads, for the chooser (first use of a leaf)
        if u.tokens and widest and u.path in c.fx:
            c.st.rows.setdefault(u.path, u.tokens / widest)
        elif u.op == "conv" and u.rows and u.path in c.fx:
            # a conv's activations are its positions': per priced token (a matmul's row, or without one a
            # row of the sample as the chooser's tokens count it), a ResNet's 16x16 map is 256 of them per
            # image (its pairs were priced at one position per image); a WaveNet's (batch, seq, channels)
            # input already counts each position as a token, so its convs read one row per token (per
            # example they were priced at seq x the tokens: 6.7x the hand layout's collectives)
            c.st.rows.setdefault(u.path, u.rows / (widest or sample_rows or max(1, flow.examples)))
    if widest:  # per priced token on one device: a batch-free buffer is whole on every device of the batch axes
        shards = math.prod(mesh.sizes[a] for a in batch_axes(mesh))
        c.st.buffers.update({p: r / widest * (shards if free else 1) for p, (r, free) in (buffers or {}).items()})
        c.st.batch_free = frozenset(p for p, (_, free) in (buffers or {}).items() if free)
        c.st.split_sums = tuple((frozenset((flow.uses[u].path, d) for u, d in ks), n / widest, runs)
                                for ks, n, runs in flow.split_sums)
    _recurrent(c)
    _embeddings(c)
    _link(c)
    for rid in sorted(c.cand):
        _pair_row(c, rid)
        _join_readers(c, rid)
        _join_branches(c, rid)
        _join_columns(c, rid)
    _adapters(c)
    _loop_leftovers(c)
    _outputs(c)
    reprice_stream_updates(c.st, c.fx.values())  # a feature-split table, once the other groups are decided
    follow(c.st, c.flow, c.fx)
    fsdp(c.st, [f for p, f in c.fx.items() if p in c.st.out])
    return {p: q for p, q in c.st.out.items() if p not in c.st.forced}, list(c.st.pairs)


def _start(facts: Sequence[Facts], st: State, flow: Dataflow) -> _Flow:
    flow = merge_uses(flow, {f.path: f.leaf.shape for f in facts})
    known = set(flow.paths)
    fx: dict[str, Facts] = {}
    for f in facts:
        if f.path not in known or f.path in st.forced:
            continue
        # The trace knows which dim a scan slices (0, or 1 for ``variable_axes={'params': 1}``):
        # that, not a name, makes a stack.
        at = flow.scanned.get(f.path)
        stacked = int(at is not None)
        same = stacked == f.stacked and (at or 0) == f.layers_at
        fx[f.path] = f if same else dataclasses.replace(f, stacked=stacked, layers_at=at or 0)
    uses: dict[str, list[Use]] = defaultdict(list)
    for u in flow.uses:
        if u.path in fx:  # an ``alias:``/``repeat:``/``join:`` use (see merge_uses) is no contraction of its own
            uses[u.path].append(u)
    shapes = {p: f.leaf.shape for p, f in fx.items()}
    return _Flow(st, flow, fx, uses, streams=spread_streams(flow, shapes), readers=reader_streams(flow, shapes))


def _recurrent(c: _Flow) -> None:
    """Recurrent cells: a kernel contracted at every step of a loop whose output returns through the carry stays
    whole; one whose output does not (a world model's prior and posterior MLPs beside its GRU, read off the
    hidden state inside the same ``nn.scan`` body) is a candidate for a column -> row pair like any other, left
    whole only if no pair takes it (:func:`_loop_leftovers`).

    A split cell kernel splits the carry, gathered for the next step's contraction at every step; a pair off the
    recurrence sums its partial outputs at every step, but divides its weight gradient, which XLA:CPU sums over
    the batch axes at every step of the backward loop (:func:`tpflax._src.cost.gradients.loop_reps`): measured on
    a DreamerV3 RSSM (data=2,model=4), keeping the prior/posterior pairs whole was 1.38 / 1.42 / 1.39 of the hand
    layout's bytes / collectives / flops that splits them (review_w W01).

    A loop whose steps read, all told, more rows than the model's input has positions is no cell's (an RNN's
    steps, or a chunked recurrence's, read each position once, batch- or time-major) but a block applied again to
    every token at every step (a Universal Transformer's ``nn.scan`` over one block with
    ``variable_broadcast="params"``): it is planned as a layer, its collectives paid at every step like a
    stack's at every layer (the estimate's trip count, :func:`tpflax._src.cost.comm._pair_items`)."""
    positions = c.flow.positions
    for path, us in c.uses.items():
        steps = [u.scan_length for u in us if u.op in _CONTRACT and u.scan_length
                 and not (positions and u.rows * u.scan_length > positions)]
        if not steps:
            continue
        at = f"at each of its {max(steps)} steps" if max(steps) > 1 else "at every step"
        if any(u.id in c.flow.recurrent for u in us):
            c.st.replicate(c.fx[path], f"recurrent cell kernel (traced): contracted inside a loop body {at}; its "
                                       "output returns through the carry; a tensor split would need a collective "
                                       "at every step, so kept whole")
        else:
            c.looped[path] = at


def _loop_leftovers(c: _Flow) -> None:
    """Kernels contracted in a loop body whose output the trace does not see return through the carry
    (:func:`_recurrent`; a norm on the way hides it) that no pair took and that make no model output: kept whole. Split alone, their output is gathered for what reads it whole at every step (a GRU's
    input projection, read by the cell through a norm; the first layer of an MLP cell whose second adds into the
    carry), which the lone-layer pricing counts once, not at each loop step (a DreamerV3 RSSM's ``img_in`` split:
    est/comp 1.28)."""
    for path, at in c.looped.items():
        if path in c.st.out:
            continue
        if _output_dims(c, _contractions(c, path)):
            continue  # its output is the model's (a vocab head in the scanned step): an output head (_outputs)
        c.st.replicate(c.fx[path], f"recurrent cell kernel (traced): contracted inside a loop body {at}, and no "
                                   "column/row pair takes it; split alone, its output would be gathered at every "
                                   "step, so kept whole")


def _embeddings(c: _Flow) -> None:
    """Gathered rows or one-hot matmuls; tied when also contracted as the logits kernel.

    A table of more dims whose every use is a lookup at ids the model's inputs give (Gemma 3n's per-layer
    inputs ``(vocab, layers, width)``, indexed by the token ids) is a vocabulary table too; one looked up at
    positions computed from no input is left to the tree (a learned position table, kept whole)."""
    for path, us in c.uses.items():
        look = [u for u in us if u.op in ("gather", "onehot")]
        f = c.fx[path]
        if not look or path in c.st.out or len(f.body) < 2 or len(look[0].contracted) != 1:
            continue
        if len(f.body) > 2 and (len(look) != len(us) or any(u.op != "gather" or u.fixed for u in look)):
            continue
        u = look[0]
        v = f.body_dim(u.contracted[0])
        d = 1 - v
        tied = len(f.body) == 2 and any(w.op == "dot" and f.leaf_dim(d) in w.contracted for w in us)
        how = "one-hot matmul" if u.op == "onehot" else "gather"
        ev = f"looked up by integer ids ({how} over dim {v}, {f.body[v]} rows)"
        if tied:
            ev += f"; also contracted over dim {d} as the logits kernel (tied output projection)"
        shard_embedding(c.st, f, v, f"{ev} (traced)", tied, every=list(c.fx.values()),
                        score_bias=not tied and _score_bias(c, path, f.body[d]))
    for path, f in c.fx.items():
        # named like a table but never looked up: a learned array added to activations (DETR's ``query_embed``,
        # its object queries). Taken for a token table from the tree, it was split over rows and priced as tied
        # to logits; XLA then split the decoder's queries and gathered them in every layer (13% of the step's
        # collectives, which the estimate did not count)
        if f.kind == "embedding" and path not in c.st.out and path not in c.uses and path in c.flow.elementwise:
            c.st.replicate(f, "traced: combined elementwise with activations and never looked up by ids: a learned "
                              "array, not a vocabulary table; kept whole on every tensor rank")


def _score_bias(c: _Flow, path: str, width: int) -> bool:
    """Whether a table's lookups (``width`` columns) are a bias per head of a traced score product
    (:func:`tpflax._src.trace.records.score_bias_tags`, which the estimate's ``cost.comm.score_bias`` reads too)."""
    ids = sum(math.prod(u.looked) for u in c.uses[path] if u.op == "gather" and u.looked and not u.fixed)
    products = ((math.prod(x.shape), zip(x.shape, x.tags, strict=False)) for x in c.flow.products)
    return bool(score_bias_tags(ids, width, products))


def _link(c: _Flow) -> None:
    """Candidate contractions (kernels used once) and the dataflow edges between them."""
    counts = {p: sum(u.op in _CONTRACT for u in us) for p, us in c.uses.items()}
    c.cand.update({u.id: u for p, us in c.uses.items() for u in us if u.op in _CONTRACT and counts[p] == 1})
    for e in c.flow.edges:
        if e.src_use in c.cand and e.dst_use in c.cand:
            c.out_edges[(e.src_use, e.src_dim)].append(e)
            c.in_edges[e.dst_use].append(e)


def _sources_by_dim(c: _Flow, rid: int) -> dict[int, dict[int, Edge]]:
    """Columns whose output reaches only the row ``rid``, by the row's kernel dim they meet."""
    R = c.cand[rid]
    by_rdim: dict[int, dict[int, Edge]] = defaultdict(dict)
    for e in c.in_edges[rid]:
        S = c.cand[e.src_use]
        if S.path in c.st.out or S.path == R.path:
            continue
        if (S.id, e.src_dim) in c.flow.escapes or _summed_into_output(c, S.id, e.src_dim):
            continue
        if S.path in c.streams:
            continue  # its output scales the residual stream (DiT's adaLN): split, XLA splits the stream too
        if 0 < S.rows < min(R.rows, c.flow.spread.get((S.id, e.src_dim), 0)) and not _beside_column(c, S.id, e, rid):
            # its few rows scale a larger activation on the way (StyleGAN2's style, one row per example, scales
            # every position of a conv's input) that no other column of this row makes (its maker decided
            # already, a row of its own pair: whole at run time): split as the row's column, the product is split,
            # and so is the larger activation's gradient, which XLA gathers for its whole producer (measured on
            # StyleGAN2's generator, data=2,model=4: 2.2x the collectives of the conv-to-conv pairs). Beside a
            # column of the row that makes it (a diffusion ResNet's time embedding added to its first conv's
            # output, a style scaling the previous conv's) it is a column with it
            continue
        if {x.dst_use for x in c.out_edges[(S.id, e.src_dim)]} != {rid} and not _branched(c, S.id, e.src_dim) \
                and not _narrow_readers(c, S.id, e.src_dim, rid) and not _free_rows(c, S.id, e.src_dim) \
                and not _later_convs(c, S.id, e.src_dim, rid):
            continue  # its output also feeds a contraction already decided: not a clean pair
        prev = by_rdim[e.dst_dim].get(S.id)
        if prev is None or e.src_dim < prev.src_dim:
            by_rdim[e.dst_dim][S.id] = e
    _drop_added_to_others(c, by_rdim)
    # A depthwise kernel is no column: it widens nothing, and its channels are its input's (it follows the
    # kernel that makes them, followers._depthwise). Between a column and the row it follows the column
    # (Mamba's conv1d); reading a stream (ConvNeXt's 7x7 before LayerNorm and its MLP) it would take the
    # MLP's up-projection as its row, leaving that to all-reduce its 4x-wide output
    for srcs in by_rdim.values():
        for sid in [s for s in srcs if c.cand[s].path in c.flow.channelwise or c.cand[s].grouped == 0]:
            del srcs[sid]
    return {d: srcs for d, srcs in by_rdim.items() if srcs}


def _summed_into_output(c: _Flow, sid: int, dim: int) -> bool:
    """Use ``sid``'s output along ``dim`` reaches the model's output added to an activation (a residual stream, a
    scan's carry, whose next step's projection it also reaches): no column there. Returned as it is, it stays one:
    a sparse autoencoder returns its features beside the reconstruction its decoder makes of them; split, they
    leave split and the loss sums them where they lie (kept out of the pair, the decoder was taken as a
    vocab-parallel output head and the encoder kept whole: 3.25 / 6.25 / 1.50 of the hand layout's bytes /
    collectives / flops, data=2,model=4)."""
    return (sid, dim) in c.flow.outputs and (sid, dim) in c.flow.added


def _drop_added_to_others(c: _Flow, by_rdim: dict[int, dict[int, Edge]]) -> None:
    """Drop the columns whose output is added to an activation no other column of the row makes
    (:attr:`Dataflow.added`): a ResNet block's last conv, added to the stream and read by the classifier
    after the pool. Split, the sum is split too, so the stream's gradient reaches its whole producers
    split, and XLA gathers it at every position (1.65x the hand layout's collectives on a bottleneck
    ResNet; a UNet's shortcut conv added to its block's row: 1.34x). A column added to another column of
    the same row (a diffusion ResNet's time embedding onto its first conv's output) stays."""
    while True:
        kept = {(sid, e.src_dim) for srcs in by_rdim.values() for sid, e in srcs.items()}
        drop = [(d, sid) for d, srcs in by_rdim.items() for sid, e in srcs.items()
                if (sid, e.src_dim) in c.flow.added and not c.flow.added[(sid, e.src_dim)] <= kept]
        if not drop:
            return
        for d, sid in drop:
            del by_rdim[d][sid]


def _kept_size(c: _Flow, uid: int) -> int:
    """Elements of a contraction's kernel that survive into its output (its output features)."""
    u, f = c.cand[uid], c.fx[c.cand[uid].path]
    return math.prod(f.leaf.shape[k] for k in u.kept)


def _beside_column(c: _Flow, sid: int, e: Edge, rid: int) -> bool:
    """Whether another undecided contraction reaching the row ``rid`` on the same dim meets use ``sid``'s output
    (the kept dim of edge ``e``) in an elementwise op on the way (:attr:`~tpflax._src.trace.records.Dataflow.alongside`):
    then the larger activation that output scales is that column's, split alike."""
    for x in c.in_edges[rid]:
        if x.src_use == sid or x.dst_dim != e.dst_dim or c.cand[x.src_use].path in c.st.out:
            continue
        if ((sid, e.src_dim), (x.src_use, x.src_dim)) in c.flow.alongside:
            return True
    return False


def _later_convs(c: _Flow, sid: int, dim: int, rid: int) -> list[int]:
    """The other contractions reading conv ``sid``'s output channels when conv ``rid`` is the first, a narrow
    one (at most a quarter of those channels out: an image head), and all of them are undecided convs after it
    (StyleGAN2's synthesis conv, read by its 1x1 toRGB conv and by the next block's upsampling conv): paired
    with ``rid``, the column's split output is gathered for each of them (priced in the pair:
    :func:`~tpflax._src.planner.builders.shard_conv_pair`'s ``gathered``), and they stay free to head pairs of
    their own; else []. A stage's output read by the next stage's conv and its shortcut projection, both as
    wide, stays whole (a ResNet keeps its stream whole between stages)."""
    others = sorted({x.dst_use for x in c.out_edges[(sid, dim)]} - {rid})
    if c.cand[sid].op != "conv" or c.cand[rid].op != "conv" or not others or min(others) < rid \
            or 4 * _kept_size(c, rid) > _kept_size(c, sid):
        return []
    ok = all(c.cand[o].op == "conv" and c.cand[o].path not in c.st.out for o in others)
    return others if ok else []


def _narrow_readers(c: _Flow, sid: int, dim: int, rid: int) -> bool:
    """The row ``rid`` reads the dim beside contractions of its own layer at most a quarter as wide as it:
    a LoRA adapter's A ``(in, r)`` next to its base kernel. Split on the same dim they join the row's pair
    (:func:`_join_readers`), each summing its narrow output; kept whole they would need the column's
    output gathered."""
    edges = c.out_edges[(sid, dim)]
    vias = {x.via for x in edges if x.dst_use == rid}
    fR = c.fx[c.cand[rid].path]

    def adapter(uid: int) -> bool:
        # held by the row's own module (nnx.LoRALinear's ``o/lora/lora_a``), or, wherever it is held (a
        # wrapper's ``o_proj/base/kernel`` beside ``o_proj/lora_a``), an adapter's down-projection: it feeds one
        # contraction, whose output is summed with the row's (a router beside the row is none)
        f = c.fx[c.cand[uid].path]
        if f.unit == fR.unit or f.unit.startswith(fR.unit + "/"):
            return True
        outs = [x for k in c.cand[uid].kept for x in c.out_edges[(uid, k)]]
        if len({x.dst_use for x in outs}) != 1:
            return False
        b = outs[0].dst_use  # its up-projection: added to the row's output (where a norm ends what both reach)
        return _low_rank(c, outs[0], b) or any(t[0] == rid for k in c.cand[b].kept
                                               for t in c.flow.added.get((b, k), ()))

    # the same activation, read through the same ops as the row reads it, by a narrow kernel of the row's
    # own layer (a residual stream read again by a narrow output head is no adapter)
    return bool(vias) and all(x.dst_use == rid or (x.via in vias and adapter(x.dst_use) and
                                                   4 * _kept_size(c, x.dst_use) <= _kept_size(c, rid))
                              for x in edges)


def _free_rows(c: _Flow, sid: int, dim: int, pair: int | None = None, keep: bool = False) -> bool:
    """Every contraction summing the dim is undecided (or in ``pair``) and sums one dim of its kernel: a
    Mamba block's ``in_proj`` output, read by ``x_proj`` and (through the scan) ``out_proj``. Split, each
    reader is a row of the pair (the first in program order prices it, the others join it,
    :func:`_join_readers`). ``keep``: readers may keep the width too (none widens it)."""
    src = c.cand[sid].op
    # (a conv's product with a projection is a modulation, StyleGAN2's style, no gated unit)
    keep = keep or src == "dot" and _gated_with_a_projection(c, sid, dim, pair)

    def free(uid: int) -> bool:
        d, u = c.st.out.get(c.cand[uid].path), c.cand[uid]
        into = {e.dst_dim for e in c.in_edges[uid]}
        # a conv sums its window too: it narrows when it writes fewer channels than it reads
        summed = math.prod(c.fx[u.path].leaf.shape[k] for k in (u.contracted if u.op == "dot" else into))
        # a gated unit's readers may keep its width (WaveNet's residual projection), not widen it (a GLU MLP's
        # gate and up reading a gated stem head their own pair with its down projection)
        return (d is None or (pair is not None and d.pair == pair)) and u.op in ("dot", "conv") and \
            len(into) == 1 and (_kept_size(c, uid) <= summed if keep else _kept_size(c, uid) < summed)
    # dense layers that narrow only: a reader that widens or keeps the width (an MLP's up, q/k/v) reads a
    # residual stream, not a column's inner activations; a conv stage's channels reaching its next stage's
    # conv and shortcut projection are the channel chain's (a ResNet keeps its stream whole between stages).
    # A gated unit's output (two projections' outputs multiplied: WaveNet's tanh(a) * sigmoid(g)) is no stream:
    # its readers may keep its width. A conv's channels read by narrowing layers only (an inverted
    # residual's expanded channels: its squeeze-excite's pooled reduction and its 1x1 projection) are split alike
    return (src == "dot" or src == "conv" and c.cand[sid].grouped is None) and \
        all(free(x.dst_use) and (src == "dot" or c.cand[x.dst_use].grouped is None) for x in c.out_edges[(sid, dim)])


def _gated_with_a_projection(c: _Flow, sid: int, dim: int, pair: int | None = None) -> bool:
    """Use ``sid``'s output along ``dim`` is multiplied elementwise with another dense projection's, undecided or
    a column of ``pair`` (:attr:`Dataflow.gated`): the two halves of a gated unit, not a residual stream (which
    a norm rescales by its own statistics, no projection). Neither half may be added to another activation
    (:attr:`Dataflow.added`): a GLU stem's product is the stream each later block adds its output to."""
    if (sid, dim) in c.flow.added:
        return False
    for a, b in c.flow.gated:
        other = b if a == (sid, dim) else a if b == (sid, dim) else None
        if other in c.flow.added:
            continue
        o = c.cand.get(other[0]) if other is not None else None
        if o is None or o.op != "dot" or o.path == c.cand[sid].path:
            continue
        d = c.st.out.get(o.path)
        if d is None or (pair is not None and d.pair == pair):
            return True
    return False


def _join_readers(c: _Flow, rid: int) -> None:
    """The narrow contractions reading a paired column's output beside the row ``rid`` join its pair."""
    R = c.cand[rid]
    dr = c.st.out.get(R.path)
    if dr is None or dr.role != "row":
        return
    for e in c.in_edges[rid]:
        S = c.cand[e.src_use]
        ds = c.st.out.get(S.path)
        if ds is None or ds.pair != dr.pair or not (_narrow_readers(c, S.id, e.src_dim, rid)
                                                    or _free_rows(c, S.id, e.src_dim, dr.pair)):
            continue
        for x in c.out_edges[(S.id, e.src_dim)]:
            X = c.cand[x.dst_use]
            if X.path not in c.st.out and X.path != R.path:
                fX = c.fx[X.path]
                join_row(c.st, fX, fX.body_dim(x.dst_dim), c.fx[S.path],
                         f"traced: it reads {short(S.path)}'s split output beside {short(R.path)} {_via(x.via)}"
                         + (", and its own output is narrow (an adapter's down-projection)"
                            if _narrow_readers(c, S.id, e.src_dim, rid) else ""))


def _join_columns(c: _Flow, rid: int) -> None:
    """An undecided contraction whose output only the split row ``rid`` sums joins the row's pair as a
    column (Mamba's ``dt_proj``, whose output reaches ``out_proj`` through the scan, after ``out_proj``
    joined ``in_proj``'s pair)."""
    dr = c.st.out.get(c.cand[rid].path)
    if dr is None or dr.role != "row" or dr.strategy == "replicate":
        return
    for e in c.in_edges[rid]:
        S = c.cand[e.src_use]
        if S.path in c.st.out or S.path in c.streams or S.path in c.flow.channelwise or \
                (S.id, e.src_dim) in c.flow.escapes or (S.id, e.src_dim) in c.flow.outputs or \
                {x.dst_use for x in c.out_edges[(S.id, e.src_dim)]} != {rid} or \
                e.dst_dim >= len(dr.spec) or dr.spec[e.dst_dim] != c.st.tensor[0]:
            continue  # (last: it reaches a dim of the row's kernel the pair does not split: its split would be gathered)
        fS = c.fx[S.path]
        join_column_of(c.st, fS, fS.body_dim(e.src_dim), c.fx[c.cand[rid].path],
                       f"traced: its output reaches {short(c.cand[rid].path)} {_via(e.via)}")


def _branched(c: _Flow, sid: int, dim: int) -> bool:
    """The dim's output is cut into pieces, each reaching one contraction (a parallel block's fused
    input projection: q to the attention's output projection, gate and up to the MLP's down)."""
    pieces = c.flow.branches.get((sid, dim))
    return bool(pieces) and all(len(p) == 1 for p in pieces)


def _join_branches(c: _Flow, rid: int) -> None:
    """A row that another piece of an already split fused column feeds joins that column's pair."""
    R = c.cand[rid]
    for e in c.in_edges[rid]:
        if R.path in c.st.out:
            return
        S = c.cand[e.src_use]
        if S.path in c.st.out and _branched(c, S.id, e.src_dim):
            fR = c.fx[R.path]
            join_row(c.st, fR, fR.body_dim(e.dst_dim), c.fx[S.path],
                     f"traced: another piece of {short(S.path)}'s output reaches it {_via(e.via)}")


def _expert_dim(c: _Flow, R: Use, by_rdim: Mapping[int, Mapping[int, Edge]]) -> int | None:
    """The expert dim: the leading dim of both kernels, kept by the column and summed by the
    row together with the features (or a dot_general batch dim)."""
    fR = c.fx[R.path]
    lead = fR.leaf_dim(0)
    expert = None
    if len(fR.body) == 3 and len(by_rdim) >= 2 and lead in by_rdim and all(
            e.src_dim == c.fx[e.src].leaf_dim(0) and len(c.fx[e.src].body) == 3 for e in by_rdim[lead].values()):
        expert = lead
    if R.batch and len(fR.body) == 3:
        expert = R.batch[0]
    return expert


def _narrow_before_its_own(c: _Flow, ch: int, rid: int) -> bool:
    """A conv pair of ``ch`` channels, fewer than ``min_channels``, whose row ``rid`` writes channels later
    contractions read, none widening them: left undecided, so the row can head a pair of its own. An inverted residual's 1x1
    expansion reads the stem's 32 channels and writes 128 its projection sums; taken as the stem's row, the
    pair was kept whole under the floor and the expansion with it (1.76x the hand layout's bytes, 2.9x its
    flops on an EfficientNet stage)."""
    if c.st.tensor[1] == 1 or ch >= c.st.opts.min_channels:
        return False
    # (RegNet's squeeze-excite expansion, whose gate the next 1x1 conv reads at its width, heads one; a decoder's
    # conv read by a wider one is left to the floor, as before)
    return any(c.out_edges.get((rid, d)) and _free_rows(c, rid, d, keep=True) for d in c.cand[rid].kept)


def _pair_row(c: _Flow, rid: int, adapters: bool = True) -> None:
    """Column -> row pairs, in program order of the row. ``adapters``: leave a low-rank adapter's
    ``A -> B`` out (:func:`_low_rank`); :func:`_adapters` pairs it if nothing else took ``B``."""
    R = c.cand[rid]
    if R.path in c.st.out:
        return
    by_rdim = _sources_by_dim(c, rid)
    expert = _expert_dim(c, R, by_rdim) if by_rdim else None
    choices = [d for d in by_rdim if d != expert]
    if not choices:
        return
    fR = c.fx[R.path]
    rdim = max(choices, key=lambda d: (len(by_rdim[d]), -d))
    cols = by_rdim[rdim]
    if adapters and len(cols) == 1 and _low_rank(c, next(iter(cols.values())), rid):
        c.adapters[rid] = next(iter(cols))
        return
    rb = fR.body_dim(rdim)
    if expert is not None and _experts(c, fR, expert, rb, list(cols.values()), expert in R.batch):
        return
    if _straddled(c, fR, rdim, list(cols.values())):
        return
    lins = [_column(c, sid, e, R.path) for sid, e in sorted(cols.items())]
    if R.op == "conv" and len(lins) == 1 and c.cand[next(iter(cols))].op == "conv":
        (sid, e), = cols.items()
        if _narrow_before_its_own(c, lins[0].f.body[lins[0].out_dims[0]], rid):
            return
        via = _via(e.via)
        later = _later_convs(c, sid, e.src_dim, rid) if {x.dst_use for x in c.out_edges[(sid, e.src_dim)]} != {rid} \
            else []
        why = f"traced: output channels reach {short(R.path)} {via}"
        if later:
            why += f", gathered for {len(later)} later conv(s) reading them whole ({short(c.cand[later[0]].path)})"
        shard_conv_pair(c.st, lins[0].f, fR, lins[0].out_dims[0], rb, why=why, gathered=len(later))
        return
    if R.op == "conv" and all(c.cand[sid].op == "conv" for sid in cols) and (note := conv_floor(c.st, fR.body[rb])):
        # several convs meeting a conv row (EnCodec's upsampling conv and a residual branch's last conv, into the
        # output conv): as narrow as a one-column conv pair, it stays whole as that does (shard_conv_pair). A
        # dense column beside them (a diffusion ResNet's time embedding scaling its first conv's output) is no
        # conv chain: priced as a pair (tests/test_modulated_conv.py)
        whole_conv_pair(c.st, [*((x.f, "channel", "column") for x in lins), (fR, "input-channel", "row")],
                        fR.body[rb], note)
        return
    row = Linear(fR, (rb,), tuple(fR.body_dim(k) for k in R.kept), heads=rb if len(fR.body) == 3 else None,
                 role="row", why=f"traced: its contraction sums kernel dim {rb} against that output"
                                 f"{_shared(c, R.path)}", joined=tuple(c.flow.concats.get((rid, rdim), ())))
    kind = "attention" if any("dot" in e.via for e in cols.values()) else "mlp"
    # its output the model's, not added to a residual stream on the way (a last block's row in a model without
    # a head): a vocab-split head's pricing (the split softmax) is for logits
    out = [k for k in R.kept if (R.id, k) in c.flow.features and not c.out_edges.get((R.id, k))
           and (R.id, k) not in c.flow.streamed]
    head = None
    if out and R.op == "dot":
        b = fR.body_dim(out[0])
        head = (b, f"output projection (traced): its {fR.body[b]} outputs (dim {b}) are the model's output, with "
                   "no later contraction")
    shard_pair(c.st, kind, lins, row, head)


def _low_rank(c: _Flow, e: Edge, rid: int) -> bool:
    """The edge ``A -> B`` (``rid``) is a low-rank adapter whose output is summed with a wider layer's: ``A``
    ``(in, r)`` feeds only ``B`` ``(r, out)``, both at least 4x narrower inside than outside, and ``B``'s
    output reaches exactly the contractions, on the same dims, that a contraction ``W`` of ``B``'s output
    width reading more than ``r`` features reaches (LoRA: ``x @ A @ B + x @ W``, nnx.LoRA, nnx.LoRALinear,
    peft's). Paired on its own the adapter splits only ``r`` (its all-reduces move the whole output) or
    stays whole, and kept whole beside a split ``W`` the backward gathers the ``(tokens, out)`` gradient of
    ``B``'s output; split like ``W``'s output, ``B`` joins ``W``'s pair and ``A`` stays whole, its
    backward summing a ``(tokens, r)`` partial only. A bottleneck whose output goes anywhere else (a
    Houlsby adapter added to the residual stream, reduced by the next norm) stays a pair."""
    A, B = c.cand[e.src_use], c.cand[rid]
    if A.op != "dot" or B.op != "dot" or len(B.kept) != 1 or \
            {x.dst_use for x in c.out_edges[(A.id, e.src_dim)]} != {rid}:
        return False
    fA, fB = c.fx[A.path], c.fx[B.path]
    r = math.prod(fB.leaf.shape[k] for k in B.contracted)
    if 4 * _kept_size(c, A.id) > math.prod(fA.leaf.shape[k] for k in A.contracted) or \
            4 * r > _kept_size(c, rid):
        return False
    reach = {(x.dst_use, x.dst_dim) for x in c.out_edges[(rid, B.kept[0])]}
    if not reach:
        return False
    d, dd = next(iter(reach))
    for wid in sorted({x.src_use for x in c.in_edges[d] if x.dst_dim == dd} - {A.id, rid}):
        W = c.cand[wid]
        if W.op != "dot" or _kept_size(c, wid) != _kept_size(c, rid):
            continue
        if math.prod(c.fx[W.path].leaf.shape[k] for k in W.contracted) <= r:
            continue
        if any({(x.dst_use, x.dst_dim) for x in c.out_edges[(wid, k)]} == reach for k in W.kept):
            return True
    return False


def _adapters(c: _Flow) -> None:
    """The low-rank adapters :func:`_pair_row` left out: ``B`` split like the layer its output is summed with
    (it joined that layer's pair as a column), ``A`` whole; an adapter nothing took is paired on its own."""
    for rid, sid in sorted(c.adapters.items()):
        A, B = c.cand[sid], c.cand[rid]
        if A.path in c.st.out:
            continue
        if B.path not in c.st.out:
            _pair_row(c, rid, adapters=False)
            continue
        dB = c.st.out[B.path]
        how = (f"split like the layer its output is summed with (pair {dB.pair})"
               if dB.strategy != "replicate" else "kept whole")
        c.st.replicate(c.fx[A.path], f"low-rank adapter's down-projection (traced): its narrow output "
                                     f"({_kept_size(c, sid)}) feeds only {short(B.path)}, {how}; kept whole "
                                     "on every tensor rank, so the backward sums only its narrow partial "
                                     "gradient")


def _shared(c: _Flow, path: str) -> str:
    """Words for a weight that one layer, called several times, contracts at the same place each call."""
    n = 1 + sum(u.op.startswith("repeat:") for u in c.uses[path])
    j = 1 + sum(u.op.startswith("join:") for u in c.uses[path])
    if j > 1:
        return f"; applied to {j} inputs whose outputs all reach that contraction, so split alike in all"
    return f"; shared by {n} calls of its layer, at the same place in each, so split alike in all" if n > 1 else ""


def _experts(c: _Flow, fR: Facts, expert: int, rb: int, edges: Sequence[Edge], kept: bool = False) -> bool:
    """Expert pairs: columns (E, d, f) or (E, f, d) -> a row (E, f, d) or (E, d, f), gate and up alike; False
    when the shapes do not say experts. ``kept``: the row's contraction batches over the experts
    (``btef,efd->bted``, DBRX's: all three kernels stored (E, f, d)), its output keeps them."""
    if (fR.stacked and expert == fR.layers_at) or fR.body_dim(expert) != 0 or rb not in (1, 2):
        return False  # the experts lead the body (a stacked leaf's layers dim is none of its body's)
    E = fR.body[0]
    fits = []
    for e in edges:
        fS = c.fx[e.src]
        cf = fS.body_dim(e.src_dim)
        if len(fS.body) == 3 and fS.body[0] == E and cf in (1, 2) and fS.body[cf] == fR.body[rb]:
            fits.append((fS, e, cf))
    if len(fits) != len(edges) or len({cf for _, _, cf in fits}) != 1:
        return False
    (fS, e, cf), rest = fits[0], fits[1:]
    how = "batched over by" if kept else "summed by"
    shard_experts(c.st, fS, fR, E, fS.body[cf],
                  f"traced: dim 0 ({E}) is kept by {short(fS.path)} and {how} {short(fR.path)}"
                  f"{'' if kept else ' with the ffn dim'}, {_via(e.via)} (experts)",
                  [(g, f"traced: also feeds {short(fR.path)} {_via(e2.via)} (gated experts)") for g, e2, _ in rest],
                  ffn_dims=(cf, rb), kept_experts=kept)
    return True


def _straddled(c: _Flow, fR: Facts, rdim: int, edges: Sequence[Edge]) -> bool:
    """Experts stored flat ``(E * f, d)`` and read ``(E, f, d)`` (:attr:`Dataflow.parted`, every member alike) over
    tensor ranks that cut experts (neither dividing E nor a multiple of it, sharing a factor with it): priced as XLA
    runs the split (:func:`tpflax._src.planner.experts.shard_straddled`). A multiple or a divisor is a pair as any
    other (whole experts, or each one's f split: the trace runs the split on into it)."""
    t = c.st.tensor[1]
    n_exp = c.flow.parted.get(fR.path, {}).get(rdim)
    # 2-D leaves only, as the estimate reads them (cost.straddle, cost.comm.parted_split): a scanned stack is not priced so
    if n_exp is None or len(fR.leaf.shape) != 2 or t <= 1 or n_exp % t == 0 or t % n_exp == 0 or math.gcd(n_exp, t) == 1:
        return False
    members = [(c.fx[e.src], e.src_dim) for e in edges] + [(fR, rdim)]
    if any(len(f.leaf.shape) != 2 or c.flow.parted.get(f.path, {}).get(d) != n_exp or f.leaf.shape[d] % t
           or f.path in c.st.out for f, d in members):
        return False
    shard_straddled(c.st, members[:-1], members[-1], n_exp,
                    f"traced: dim {rdim} of {short(fR.path)} and its columns' are read as ({n_exp}, "
                    f"{fR.leaf.shape[rdim] // n_exp}) experts by a reshape")
    return True


def _column(c: _Flow, sid: int, e: Edge, row_path: str) -> Linear:
    S = c.cand[sid]
    fS = c.fx[S.path]
    cb = fS.body_dim(e.src_dim)
    limit = 0
    for x in c.out_edges[(sid, e.src_dim)]:
        limit = math.gcd(limit, x.limit)
    why = f"traced: its output reaches {short(row_path)} {_via(e.via)}{_shared(c, S.path)}"
    pieces = c.flow.fused.get((sid, e.src_dim), 1)
    sizes: tuple[int, ...] = ()
    if pieces > 1:
        cut = "unequal" if (sid, e.src_dim) in c.flow.cuts else "equal"
        sizes = tuple(c.flow.cuts[(sid, e.src_dim)][0]) if cut == "unequal" else (fS.body[cb] // pieces,) * pieces
        why += (f"; fused: cut into {len(sizes)} {cut} pieces after the matmul, so split naively over the fused "
                f"dim ({fS.body[cb]}) and XLA reshards the pieces")
    # A 3-D or 4-D kernel's traced dim is its heads when the kernel keeps a dim after it, the head_dim
    # ((d, heads, head_dim), (3, heads, d, head_dim)); kept last, it is features: a stack of 2-D
    # kernels ((2, d, ffw), Gemma's gate and up, one sliced out per dot) is a column over features.
    heads = len(fS.body) >= 3 and any(fS.body_dim(k) > cb for k in S.kept)
    # a rotate-half RoPE cuts the head_dim (the last dim; a 2-D kernel's only output dim) in halves: priced
    # if the head_dim is split (a GQA key with fewer heads than tensor ranks, planner/builders.py kv_view)
    last = fS.leaf_dim(len(fS.body) - 1)
    return Linear(fS, tuple(fS.body_dim(k) for k in S.contracted), (cb,),
                  heads=cb if heads else None, role="column", why=why,
                  limit=limit if limit and limit != fS.body[cb] else None,
                  cut=sizes if sum(sizes) == fS.body[cb] else (),
                  viewed=(sid, e.src_dim) in c.flow.views,
                  keys=next((x.shape[-1] for x in c.flow.products if any(u == sid for t in x.tags for u, _ in t)), 0),
                  rope=c.flow.fused.get((sid, last), 1) > 1,
                  loop=bool(fS.stacked) or c.flow.remat >= 0.5 or c.st.casts.get(S.path, fS.leaf.dtype) != fS.leaf.dtype,
                  remat=c.flow.remat >= 0.5)


def _contractions(c: _Flow, path: str) -> list[Use]:
    """A parameter's traced uses that contract it (dot, conv)."""
    return [u for u in c.uses[path] if u.op in _CONTRACT]


def _output_dims(c: _Flow, cu: list[Use]) -> list[int]:
    """The param dims every one of the contractions ``cu`` carries to the model's output, sorted (none: ``[]``)."""
    return sorted(set.intersection(*(_head_dims(c, u) for u in cu))) if cu else []


def _outputs(c: _Flow) -> None:
    """Output heads (logits) and contractions left without a partner."""
    for path, f in c.fx.items():
        if path in c.st.out:
            continue
        cu = _contractions(c, path)
        if not cu or (len(cu) == 1 and path in c.flow.channelwise):
            continue
        heads = _output_dims(c, cu)
        if heads:
            # an output head, or one shared by several outputs (DeepSeek-V3's multi-token prediction: the main and
            # the MTP hiddens through one lm_head), priced as a head
            b = f.body_dim(heads[0])
            calls = f", at each of its {len(cu)} calls" if len(cu) > 1 else ""
            shard_output_head(c.st, f, b, f"output projection (traced): its {f.body[b]} outputs (dim {b}) "
                                          f"are the model's output, with no later contraction{calls}")
            continue
        if len(cu) > 1:
            chain = _chained_calls(c, path, cu) if path in c.st.rows and f.stacked == 0 else None
            if chain is None:
                c.st.replicate(f, f"shared weights (traced): contracted {len(cu)} times in the forward pass; "
                                  "kept whole")
                continue
            u = cu[0]
            # its rows priced at every call's: each call's matmul runs split (the calls' flops), and each sums and
            # gathers as counted by _chained_calls
            c.st.rows[path] = c.st.rows[path] * sum(x.tokens for x in cu) / max(1, u.tokens)
            shard_lone_dense(c.st, f, f.body_dim(u.kept[0]),
                             f"shared weights (traced): one dense contracted {len(cu)} times in the forward pass, "
                             "each call after the first reading an earlier call's output", calls=chain)
            continue
        u = cu[0]
        why = (f"{'conv' if u.op == 'conv' else 'dense'} without a partner (traced): "
               f"{_why_not_column(c, u)}; {_why_not_row(c, u)}")
        if u.op == "dot" and len(u.kept) == 1 and path in c.st.rows and f.stacked == 0:
            if c.meets is None:
                c.meets = c.flow.meets()
            shard_lone_dense(c.st, f, f.body_dim(u.kept[0]), why,
                             c.streams.get(path) or c.readers.get(path) or _modulates(c, u),
                             whole_reached(c.st, c.flow, c.fx, u, c.meets),
                             grown=c.flow.growth(u.id, u.kept[0]), reduced=c.flow.only_reduced(u.id, u.kept[0]),
                             resequenced=(u.id, u.kept[0]) in c.flow.resequenced)
        else:
            c.st.replicate(f, why)


def _chained_calls(c: _Flow, path: str, cu: list[Use]) -> tuple[int, float, float, int, int] | None:
    """``(calls, input-gradient sums, output gathers, sums counted, gathers counted)`` of a kernel
    without a partner whose plain ``dot`` calls are chained: each call but the first reads, through elementwise
    ops, an earlier call's output (one ``nn.Dense`` in a Python loop, ``x = d(gelu(x))``, or added back,
    ``x = x + d(gelu(x))``), split as a column, as XLA runs it and the estimate prices it (both through
    :func:`tpflax._src.cost.chain.chain_collectives`, each call at its own rows). The sums and gathers are in calls
    of the chain's mean rows (``State.rows`` holds that mean); the counts go into the reason. None for calls of
    other shapes, in scans, or two or more reading no earlier call."""
    chain = chain_calls(c.flow, cu)
    if chain is None:
        return None
    g_rows, gathers, s_rows, sums = chain_collectives(chain, path not in c.st.no_input_grad)
    per = sum(x.rows for x in chain) / len(chain)
    return len(chain), s_rows / per, g_rows / per, sums, gathers


def _head_dims(c: _Flow, u: Use) -> set[int]:
    """The kept dims of a matmul use that reach the model's output features with no later contraction."""
    if u.op != "dot":
        return set()
    return {k for k in u.kept if (u.id, k) in c.flow.features and not c.out_edges.get((u.id, k))}


def _modulates(c: _Flow, u: Use) -> tuple[float, int, int] | None:
    """``(rows / its own, width, gathers)`` of the larger activation a lone kernel's output scales elementwise
    (StyleGAN2's style, one row per example, times every position of a conv's input; not a residual stream of
    tokens, :func:`~tpflax._src.trace.spread.spread_streams`): split, it splits that product, which XLA gathers
    for its whole reader, and the product's gradient; else None."""
    rows = c.flow.spread.get((u.id, u.kept[0]), 0)
    if not u.rows or rows <= u.rows:
        return None
    return rows / u.rows, c.fx[u.path].leaf.shape[u.kept[0]], GATHERS_PER_TOUCH


def _why_not_column(c: _Flow, u: Use) -> str:
    for k in u.kept:
        if (u.id, k) in c.flow.escapes:
            return f"its output (dim {k}) {c.flow.escapes[(u.id, k)]}"
        dsts = sorted({e.dst for e in c.out_edges.get((u.id, k), ())})
        if len(dsts) > 1:
            return f"its output feeds {len(dsts)} contractions ({', '.join(short(d) for d in dsts[:3])})"
        if dsts and dsts[0] in c.st.out:
            return f"its output feeds {short(dsts[0])}, already {c.st.out[dsts[0]].strategy}"
    return "its output is not summed by another parameter's contraction"


def _why_not_row(c: _Flow, u: Use) -> str:
    srcs = sorted({e.src for e in c.in_edges.get(u.id, ())})
    if not srcs:
        return "its input is not a split-able output of another kernel (model input, lookup or norm)"
    return f"its input comes from {', '.join(short(s) for s in srcs[:3])}, which cannot stay split"


def disagreements(traced: Mapping[str, Proposal], tree: Mapping[str, Proposal]) -> list[str]:
    """One line per leaf where the traced proposal and the tree heuristics' differ."""
    out = []
    for path, p in traced.items():
        b = tree.get(path)
        if b is None:
            continue
        n = max(len(p.spec), len(b.spec))
        if entries(p.spec, n) != entries(b.spec, n):
            out.append(f"{path}: traced {to_pspec(p.spec)} ({p.strategy}) but the tree heuristics give "
                       f"{to_pspec(b.spec)} ({b.strategy}: {b.reason.split(';')[0]}); the trace wins")
    return out
