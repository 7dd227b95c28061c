"""The spec builders both rule sets share: tree heuristics and dataflow rules.

A rule set finds *what* a leaf is (the column of a pair, an embedding, an
output head, a bias of some kernel); these builders decide *how* it is split,
and word the reason, so the two rule sets cannot drift apart. Each builder
writes :class:`Proposal` s into a :class:`State`.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from tpflax._src.cost.activations import layer_key
from tpflax._src.cost.headcut import (
    cut_head_scores,
    grouped_qkv_layout,
    grouped_qkv_moves,
    head_cut_gathers,
    repeated_kv_gathers,
    repeated_kv_groups,
    split_head_gathers,
    whole_kv,
)
from tpflax._src.cost.kvsplit import KVSplit, kv_split_comms
from tpflax._src.cost.pieces import column_read, member_items, pieces_of, update_pieces
from tpflax._src.cost.price import DEFAULT_TOKENS, OPT_COPIES, ActComm, Context
from tpflax._src.cost.residual import Recompute
from tpflax._src.facts.classify import Facts
from tpflax._src.hardware import DEFAULT_PLAN_HARDWARE, get_hardware
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape
from tpflax._src.planner.choose import Chosen, Option, pick
from tpflax._src.planner.constraints import pinned
from tpflax._src.planner.decision import Alternative, Pair
from tpflax._src.specs import Entry, entry_axes, gathered_axes, normalize_entry, to_pspec
from tpflax._src.vocab import Kind, Role, Strategy

# Strategies that split a kernel's output: a bias added to that output splits alike.
OUTPUT_SPLITS: tuple[str, ...] = ("column", "heads", "channel", "vocab", "expert")


@dataclass(frozen=True)
class Options:
    """Planner knobs.

    Attributes:
        fsdp_min_bytes: leaves at least this large are also sharded over fsdp
            axes; None: the chooser decides each leaf's fsdp split by cost.
        min_channels: conv chains narrower than this stay whole unpriced; the others are priced.
        tensor_min_bytes: pairs whose kernels are all smaller stay replicated.
        hardware: the :class:`tpflax._src.hardware.Hardware` candidates are priced on.
        tokens: global tokens per step the activation collectives are priced with.
        act_item: bytes per activation element.
        device_memory: bytes per device the plan must fit (None: no constraint).
        tied_guess: the tree has no output head, so a token table found by the
            tree heuristics is priced as tied (it also computes the logits).
        patch_width: untraced: the width of the patch tokens an image batch makes through its patch embedding
            (:func:`tpflax._src.planner.pricing.image_tokens`), which ``tokens`` counts (beside token ids, the
            image tower's share of them: ``towers``); its patch-merging stages read fewer
            (:func:`tpflax._src.planner.roles.merge_stages`). 0: none.
        towers: untraced: ``(module, share)`` of the modules whose leaves read ``share`` of ``tokens``: the
            image tower of a tree fed token ids beside an image (CLIP's ``vision_model``), ``tokens`` counting
            the ids (:func:`tpflax._src.planner.pricing.image_tokens`).
    """

    fsdp_min_bytes: int | None = None
    min_channels: int = 64
    tensor_min_bytes: int = 0
    hardware: Any = None
    tokens: int = DEFAULT_TOKENS
    act_item: int = 4
    device_memory: int | None = None
    tied_guess: bool = False
    patch_width: int = 0
    towers: tuple[tuple[str, float], ...] = ()


@dataclass(frozen=True)
class Proposal:
    """A rule's answer for one leaf: the spec and the facts the rule knows.

    ``kind`` overrides the classified kind when the rule knows better (an output
    head); ``layers_dim`` is the scan dim the rule saw (the trace's, when traced);
    ``fsdp`` says the fsdp fallback also split a dim.
    """

    spec: tuple[Entry, ...]
    strategy: Strategy
    reason: str
    pair: int | None = None
    role: Role | None = None
    fsdp: bool = False
    kind: Kind | None = None
    layers_dim: int | None = None
    alternatives: tuple[Alternative, ...] = ()
    # a fused column: (leaf dim, the pieces' sizes, the heads limit or None); see planner/fused.py
    fused: tuple[int, tuple[int, ...], int | None] | None = None


@functools.lru_cache(maxsize=1 << 12)
def _size(body: tuple[int, ...], dims: tuple[int, ...]) -> int:
    """The product of ``body``'s ``dims`` (the role passes ask each layer's widths many times, alike layers alike)."""
    return math.prod(body[d] for d in dims)


@dataclass
class Linear:
    """A linear layer's view of a kernel: which body dims it reads and writes."""

    f: Facts
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    heads: int | None = None  # body dim holding attention heads
    role: Role | None = None
    why: str = ""
    # Largest size the dataflow lets the column dim be split by (a reshape into
    # fewer heads, say); None: the dim's own size. Set by the dataflow rules.
    limit: int | None = None
    doubt: str = ""  # shapes and names disagreed: said in a plan warning
    pieces: int = 1  # a fused kernel's output holds this many projections side by side (q|k|v)
    cut: tuple[int, ...] = ()  # a fused kernel: its pieces' sizes along the fused dim, in order
    # a row whose input is a concatenation of these sizes (traced: Dataflow.concats; tree-only: a parallel block's
    # [attention out | MLP hidden], roles.parallel_partners): XLA reshards it into the split
    joined: tuple[int, ...] = ()
    # a row reading the outer product of two columns' ``outer`` features each, flattened with the first's major
    # (tree-only: AlphaFold's outer product mean, roles.outer_product_partners); 0: none
    outer: int = 0
    # a fused kernel whose output is reshaped to (pieces, heads, head_dim) before the pieces are cut apart (timm's
    # and Swin's qkv.reshape(..., 3, heads, head_dim); traced: Dataflow.views; tree-only: heads read off the tables)
    viewed: bool = False
    # traced: the last dim (the keys) of the attention-score product its output feeds (0: none): what a head cut over
    # several ranks sums per token (cost/headcut.py cut_head_scores)
    keys: int = 0
    guess: str = ""  # a row: why the tree cannot tell that it reads its columns' output (the pair stays whole)
    # traced: its head_dim output is cut in halves (a rotate-half RoPE) or not; None: untraced, unknown
    rope: bool | None = None
    # traced: its matmul reads a copy of the kernel (inside a scan or a rematerialised call, or cast to another
    # dtype: State.casts), which XLA splits as it splits the output (a whole key/value column: cost/pieces.py
    # column_read, as the estimate's whole_members)
    loop: bool = False
    # traced: most of the model's matmuls run rematerialised: the backward recomputes the forward's collectives
    # (a head_dim-split key/value's gathers, cost/kvsplit.py)
    remat: bool = False
    # untraced: a query (or a column as wide as it: its key) narrower than its attention row's input: the values'
    # head_dim is wider (RetNet's 2x values), not GQA; its heads are the row's, split with them
    narrow_query: str = ""

    def size(self, dims: Iterable[int]) -> int:
        return _size(self.f.body, tuple(dims))

    @property
    def in_size(self) -> int:
        return _size(self.f.body, self.in_dims)

    @property
    def out_size(self) -> int:
        return _size(self.f.body, self.out_dims)

    def shard_dim(self, role: Role) -> int:
        """Body dim that the tensor axis splits for this role."""
        if self.heads is not None:
            return self.heads
        return self.out_dims[-1] if role == "column" else self.in_dims[0]


@dataclass
class State:
    """Proposals and pairs of one rule set's pass over the leaves."""

    mesh: MeshShape
    opts: Options
    out: dict[str, Proposal] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    # decided by user rules/annotations: never overwritten, but followed (a bias follows its kernel)
    forced: dict[str, Proposal] = field(default_factory=dict)
    doubts: list[str] = field(default_factory=list)  # roles where names and shapes disagreed
    first_pair: int = 1  # pair ids continue after those of an earlier pass (the dataflow rules)
    chosen: list[Chosen] = field(default_factory=list)  # groups the chooser priced
    facts: dict[str, Facts] = field(default_factory=dict)  # every leaf a builder wrote, by path
    out_first: set[str] = field(default_factory=set)  # 2-D kernels stored (out, in): biases follow dim 0
    # traced: rows each leaf's contraction reads, per priced token (a group is priced at its leaves' rows)
    rows: dict[str, float] = field(default_factory=dict)
    # untraced: the share of the tokens each leaf of a tower reads (Options.towers), where ``rows`` holds none
    scale: dict[str, float] = field(default_factory=dict)
    # traced: tables looked up at batch-free positions, whose rows XLA:TPU all-reduces split or not (Dataflow.positional)
    positional: frozenset[str] = frozenset()
    # traced: {path: dtype} of leaves every matmul and lookup reads cast to that dtype (Dataflow.cast_to): XLA lays
    # a cast copy out as the matmul prefers; XLA:TPU gathers the leaf and reduces its gradient in a narrower one
    casts: dict[str, str] = field(default_factory=dict)
    # traced: expert kernels reading a dispatched buffer, its rows per priced token on one device (see shard_experts)
    buffers: dict[str, float] = field(default_factory=dict)
    batch_free: frozenset[str] = frozenset()  # of those, the buffers the dispatch summed the batch into
    # traced: {path: kernel dims} a ragged dot takes as its groups (cost.buffers.ragged_groups): no dim of the rows
    # carries them, so split over the tensor axis each such dot sums its output and its input gradient
    ragged: dict[str, frozenset[int]] = field(default_factory=dict)
    pins: Any = None  # traced: the model's own sharding constraints (planner/constraints.py Pins), None without
    # traced: (width, mesh axes) of activation dims no kernel tags that a model's constraint splits: its residual
    # stream past the norms (Dataflow.split_widths; MaxText's and EasyDeL's hidden states over the tensor axis)
    streamed: frozenset[tuple[int, tuple[str, ...]]] = frozenset()
    # traced: (leaf dims, elements per priced token, runs) of each product of two activations that sums those kernel
    # dims (Dataflow.split_sums, the estimate's split_sum_items): a layout splitting one all-reduces its partial sums
    split_sums: tuple[tuple[frozenset[tuple[str, int]], float, int], ...] = ()
    # traced: kernels whose every contraction reads the model's own input (Dataflow.input_reads), or reads only what
    # frozen parameters compute (Dataflow.frozen_reads): the step computes no gradient of their input, so split on
    # their output they sum no partial input gradients (as the estimate prices them)
    no_input_grad: frozenset[str] = frozenset()
    # traced, most matmuls rematerialised: which split rows' sums the recompute runs again (cost/residual.py
    # Recompute, the estimate's rule; planner/pricing.py recompute)
    recompute: Recompute | None = None

    @cached_property
    def context(self) -> Context:
        hw = self.opts.hardware or get_hardware(DEFAULT_PLAN_HARDWARE)
        return Context(self.mesh, hw, self.opts.tokens, self.opts.act_item)

    def proposal(self, f: Facts, body_spec: Sequence[Entry], strategy: Strategy, reason: str,
                 pair: int | None = None, role: Role | None = None, kind: Kind | None = None) -> Proposal:
        """What :meth:`put` would write, without writing it (a candidate)."""
        spec = f.leaf_of(body_spec)
        if f.stacked and strategy != "replicate":
            where = "leading layers dim" if f.layers_at == 0 else f"layers dim {f.layers_at}"
            reason += f"; {where} ({f.leaf.shape[f.layers_at]}) from nn.scan kept unsharded"
        return Proposal(spec, strategy, reason, pair, role, kind=kind, layers_dim=f.layers_dim)

    def whole(self, f: Facts, reason: str, pair: int | None = None, role: Role | None = None,
              kind: Kind | None = None) -> Proposal:
        return self.proposal(f, (None,) * len(f.body), "replicate", reason, pair, role, kind)

    def choose(self, kind: str, options: Sequence[Option], facts: Sequence[Facts]) -> None:
        """Let the chooser pick among ``options`` (see :mod:`tpflax._src.planner.choose`)."""
        fx = {f.path: f for f in facts}
        self.facts.update(fx)
        pick(self, kind, options, fx)

    def decided(self, path: str) -> Proposal | None:
        """This pass's proposal for ``path``, or the user rule's or annotation's that forced it."""
        return self.out.get(path) or self.forced.get(path)

    @cached_property
    def tensor(self) -> tuple[Entry, int]:
        """The tensor axes' spec entry and size (asked by every pair's builders: once per pass)."""
        return self.mesh.group(TENSOR)

    def put(self, f: Facts, body_spec: Sequence[Entry], strategy: Strategy, reason: str,
            pair: int | None = None, role: Role | None = None, kind: Kind | None = None) -> None:
        if f.path in self.forced:
            return
        self.facts[f.path] = f
        self.out[f.path] = self.proposal(f, body_spec, strategy, reason, pair, role, kind)

    def replicate(self, f: Facts, reason: str, pair: int | None = None, role: Role | None = None,
                  kind: Kind | None = None) -> None:
        self.put(f, (None,) * len(f.body), "replicate", reason, pair, role, kind)

    def new_pair(self, kind: str, columns: Sequence[Facts], rows: Sequence[Facts], size: int,
                 sharded: bool, note: str = "") -> Pair:
        p = Pair(self.first_pair + len(self.pairs), kind, tuple(c.path for c in columns),
                 tuple(r.path for r in rows), size, sharded, note)
        self.pairs.append(p)
        return p


def short(path: str) -> str:
    """Path without the collection prefix, for reasons.

    >>> short("params/mlp/up/kernel")
    'mlp/up/kernel'
    """
    return path.split("/", 1)[1] if path.startswith("params/") else path


def axis_label(entry: Entry, size: int) -> str:
    """``model=4`` (or ``tensor=1`` without an axis), for reasons.

    >>> axis_label(("data", "fsdp"), 8)
    'data*fsdp=8'
    """
    return f"{'*'.join(entry_axes(entry)) or 'tensor'}={size}"


def body_spec(rank: int, dim: int, entry: Entry) -> list[Entry]:
    """A body spec splitting only ``dim`` over ``entry``.

    >>> body_spec(3, 1, "model")
    [None, 'model', None]
    """
    spec: list[Entry] = [None] * rank
    spec[dim] = entry
    return spec


# ---------------------------------------------------------------------------
# column -> row pairs


def shard_pair(st: State, kind: str, cols: list[Linear], row: Linear, head: tuple[int, str] | None = None,
               more: Sequence[Linear] = ()) -> None:
    """Column kernels ``cols`` feeding ``row``: one all-reduce per pass when split.

    ``more``: other rows reading the columns' whole output beside ``row``, stored like it (a Gaussian policy's
    ``log_std`` beside its ``mean``): split alike, each summing its own partial outputs, or kept whole with the pair.

    ``head``: (body dim, why) when the row's output on that dim is the model's output (traced): the row is
    also a candidate output head, split over that dim with its columns whole (Medusa's heads,
    ``Dense(d, V)(x + silu(Dense(d, d)(x)))``: Megatron sums V-wide logits forward, a vocab-split head
    three values a token and its d-wide input gradient)."""
    t_entry, t_size = st.tensor
    rdim = row.shard_dim("row")
    size = row.f.body[rdim]
    unit = "heads" if row.heads is not None else "features"
    small = max(x.f.leaf.nbytes for x in [*cols, row, *more]) < st.opts.tensor_min_bytes
    ok_row = t_size > 1 and size % t_size == 0 and not small
    note = ""
    if t_size == 1:
        note = "no tensor axis in the mesh"
    elif small:
        note = f"all kernels < tensor_min_bytes={st.opts.tensor_min_bytes}"
    elif not ok_row:
        note = f"{unit} {size} not divisible by {axis_label(t_entry, t_size)}"
    elif row.guess:
        ok_row, note = False, f"a guess: {short(row.f.path)} {row.guess}"
    blocked = {id(c): column_blocked(c, kind, row, t_entry, t_size) for c in cols}
    # a fused [q|k|v] reshaped into heads the ranks do not divide (Swin's 6 heads on 4): the split that cuts them
    # is a candidate, priced with the gathers XLA compiles for it (cost/headcut.py)
    stuck = ok_row and all(blocked.values())
    cut_heads = _heads_cut(st, cols, row) if stuck else None
    if stuck and cut_heads is None:
        # Splitting only the row would all-reduce activations that no column split: skip both.
        ok_row = False
        note = "no column of the pair can be split (" + "; ".join(
            f"{short(c.f.path)}: {blocked[id(c)]}" for c in cols) + ")"
    pair = st.new_pair(kind, [c.f for c in cols], [row.f, *(r.f for r in more)], size, ok_row, note)
    lins = [*cols, row, *more]
    if not ok_row:
        for lin in lins:
            st.replicate(lin.f, f"{lin.role} of pair {pair.id} ({lin.why}) but {note}: tensor split skipped",
                         pair.id, lin.role)
        return
    if cut_heads is not None:
        # a GQA through jax.nn.dot_product_attention: also the hand layout, its query and output projections split,
        # its key/value kept whole (cost/headcut.py whole_kv)
        options = [_cut_heads_option(st, cols, row, pair, cut_heads), _kv_whole_option(st, cols, row, pair, blocked)]
    else:
        options = [_megatron(st, cols, row, pair, unit, size, blocked, kv_split=False)]
    if any(blocked.values()) and cut_heads is None:
        options.append(_megatron(st, cols, row, pair, unit, size, blocked, kv_split=True))
    # an attention pair divides its heads' scores too, whatever its width: it reads queries and keys
    # (two columns, or one fused) or sums heads (a 3-D row)
    scores = kind == "attention" and (len(cols) > 1 or cols[0].pieces > 1 or row.heads is not None)
    if not scores and row.in_size < min([row.out_size, *(c.in_size for c in cols)]):
        # a bottleneck (a LoRA adapter's (in, r) -> (r, out), an adapter's down -> up) divides only its
        # narrow inner width, narrower than the activations its all-reduces move: step time decides
        # against keeping it whole, as for any split that moves the whole output (choose.best)
        options = [o and replace(o, sums_output=True) for o in options]
    if more:  # the column's other row readers (heuristics._more_readers), each summing its partial outputs
        options = [o and _with_rows(st, o, more, cols, pair) for o in options]
    # a row widening into the model's output (logits wider than what it reads), not an attention's output
    # projection: the vocab-split head's price (the split softmax) is for logits
    if (not more and head is not None and kind != "attention" and row.heads is None and row.f.body[head[0]] > row.in_size
            and row.f.body[head[0]] % t_size == 0):
        options.append(_row_as_head(st, cols, row, pair, head))
    heads_note = f" ({short(cols[0].f.path)}: {blocked[id(cols[0])]})" if cut_heads is not None else ""
    options.append(Option("replicate", tuple(
        (lin.f.path, st.whole(lin.f, f"{lin.role} of pair {pair.id} ({lin.why}): kept whole on every tensor "
                                     f"rank{heads_note}", pair.id, lin.role)) for lin in lins),
        matmul=frozenset(lin.f.path for lin in lins), whole=True))
    facts = {lin.f.path: lin.f for lin in lins}
    st.choose("pair", [pinned(st, o, facts) for o in options if o is not None], [lin.f for lin in lins])
    chosen = st.out.get(row.f.path)
    if chosen is not None and chosen.strategy == "replicate":  # the chooser kept the pair whole
        st.pairs[st.pairs.index(pair)] = replace(pair, sharded=False, note="kept whole: cheaper by cost")
    elif chosen is not None and chosen.kind == "head":
        st.pairs[st.pairs.index(pair)] = replace(pair, sharded=False, note="its row split as an output head, "
                                                                            "its columns whole: cheaper by cost")


def _with_rows(st: State, o: Option, more: Sequence[Linear], cols: Sequence[Linear], pair: Pair) -> Option:
    """The split option ``o`` with the pair's other rows (:func:`shard_pair`'s ``more``) split on their inputs too,
    each row's all-reduce of its partial outputs priced."""
    t_entry, t_size = st.tensor
    partner = ", ".join(short(c.f.path) for c in cols)
    props, acts = [], []
    for r in more:
        rdim = r.shard_dim("row")
        props.append((r.f.path, st.proposal(
            r.f, body_spec(len(r.f.body), rdim, t_entry), "row",
            f"row: {r.why}; input features ({r.f.body[rdim]}) split over {axis_label(t_entry, t_size)}, fed by "
            f"{partner} (pair {pair.id}, one of its {len(pair.rows)} rows); one all-reduce of activations per pass",
            pair.id, "row")))
        acts.append(row_sum(st, r.f, r.out_size))
    return replace(o, proposals=(*o.proposals, *props), acts=(*o.acts, *acts),
                   matmul=o.matmul | {r.f.path for r in more})


def _heads_cut(st: State, cols: list[Linear], row: Linear) -> tuple[tuple, ...] | None:
    """The gathers of the split that cuts heads, when the tensor ranks neither divide the heads nor are divided by
    them (a Swin's 3 or 6 heads on model=4): the pair's one column a traced fused kernel of equal pieces reshaped to
    ``(pieces, heads, head_dim)``, the pieces and the ranks neither dividing
    (:func:`tpflax._src.cost.headcut.head_cut_gathers`), or separate traced 2-D ``q``, ``k`` and ``v`` columns as
    wide as the row's input, each reshaped into the same heads (:func:`tpflax._src.cost.headcut.split_head_gathers`;
    a GQA's narrower keys and values where ``jax.nn.dot_product_attention`` regroups the query into their heads, which
    the ranks neither divide nor are divided by), or a Falcon-style fused ``[q_1..q_R k v]`` per key/value group
    whose groups are half the ranks (:func:`tpflax._src.cost.headcut.grouped_qkv_moves`: ``(kind, width, ranks,
    why)`` each). None otherwise: the pair stays whole by rule."""
    t_size = st.tensor[1]
    if row.heads is not None or not cols:
        return None
    if len(cols) > 1:
        heads = cols[0].limit
        if any(c.viewed or len(c.cut) > 1 or c.heads is not None or len(c.f.body) != 2 or c.limit != heads
               for c in cols):
            return None
        widths = tuple(out_width(c) for c in cols)
        if any(w != row.in_size for w in widths):
            # a GQA through jax.nn.dot_product_attention, which regroups the query's N heads into (K, N / K): every
            # column's heads read K, the key/value narrower than the query; cut, XLA gathers each output to whole
            # groups of gcd(K, n) key/value heads as for equal widths (measured: 12:6 and 12:3 on model=4)
            return split_head_gathers(widths, heads, row.in_size, t_size) if row.in_size in widths else None
        gathers = split_head_gathers(widths, heads, row.in_size, t_size)
        keys = max(c.keys for c in cols)  # the queries' and keys' (the values feed p @ v, not the scores)
        if gathers is None and heads and keys:
            return cut_head_scores(heads, t_size, keys)
        return gathers
    col = cols[0]
    pieces, heads = len(col.cut), col.limit
    if (len(col.cut) <= 1 and not col.viewed and col.heads is None and len(col.f.body) == 2
            and col.in_size == row.in_size
            and (moves := grouped_qkv_moves(col.in_size, out_width(col), heads, t_size)) is not None):
        # a Falcon-style [q_1..q_R k v] per key/value group, the groups half the ranks (2 on model=4): split naively,
        # each group's heads lie whole over its 2 ranks; XLA moves queries and hands both its key and value
        return moves
    if not _fused_into_heads(col, row) or not _neither_divides(pieces, t_size):
        return None
    if col.keys and (sums := cut_head_scores(heads, t_size, col.keys)) is not None:
        # fewer heads than ranks that divide them (a Swin stage's 2 heads on 4): the output gathered whole, the
        # pieces' gradients alike, and each head's partial scores summed over its ranks (cost/reshard.py)
        width = out_width(col)
        return ((width, t_size, "forward: the output whole, before the reshape into heads"),
                (width, t_size, "backward: the pieces' gradients whole"), *sums)
    if not _neither_divides(heads, t_size):
        return None
    return head_cut_gathers(out_width(col), pieces, heads, t_size)


def _grouped(col: Linear, row: Linear) -> tuple[int, int] | None:
    """``(queries per group, head_dim)`` when ``col`` is a traced Falcon-style fused 2-D ``query_key_value`` laid out
    per key/value group ``[q_1..q_R k v]`` (its ``limit`` the groups, :func:`tpflax._src.cost.headcut.grouped_qkv_layout`)
    projected back by ``row``; else None."""
    if len(col.cut) > 1 or col.viewed or col.heads is not None or len(col.f.body) != 2 or not col.limit \
            or col.in_size != row.in_size:
        return None
    return grouped_qkv_layout(col.in_size, out_width(col), col.limit)


def _fused_into_heads(col: Linear, row: Linear) -> bool:
    """Whether ``col`` is a traced fused 2-D kernel (``[q|k|v]``) whose output is cut into 2+ equal pieces as wide as
    ``row``'s input, each reshaped into heads (a count the trace read) that no earlier view placed."""
    return bool(col.viewed and len(col.cut) > 1 and len(set(col.cut)) == 1 and col.limit and col.heads is None
                and len(col.f.body) == 2 and col.cut[0] == row.in_size)


def _neither_divides(a: int, b: int) -> bool:
    """Whether neither of ``a`` and ``b`` divides the other (3 pieces or 6 heads on 4 ranks)."""
    return bool(a % b and b % a)


def _cut_heads_option(st: State, cols: list[Linear], row: Linear, pair: Pair,
                      gathers: tuple[tuple, ...]) -> Option:
    """The Megatron layout of attention whose heads the tensor ranks do not divide: the columns' output split
    naively, the output projection's input alike, cutting heads; XLA gathers the outputs to whole heads (a fused
    ``[q|k|v]``'s whole, separate projections' to whole head groups) and, backward, the row's input gradient to whole
    head groups (:func:`_heads_cut`). Its gathers move more than the outputs it divides, so step time decides
    against keeping the pair whole (``sums_output``, :func:`tpflax._src.planner.choose.best`). Measured on a Swin
    (review_t m04, data=2,model=4): about half the flops per device for 2.5-3x the attention's collectives."""
    t_entry, t_size = st.tensor
    over = axis_label(t_entry, t_size)
    rdim = row.shard_dim("row")
    heads = cols[0].limit
    fused_col = len(cols) == 1
    grouped = len(gathers[0]) == 4  # (kind, width, ranks, why): a grouped fused q/k/v (cost/headcut.grouped_qkv_moves)
    # grouped, the trace's count is of key/value groups, each of several query heads, none of them cut
    per, _ = (_grouped(cols[0], row) or (0, 0)) if grouped else (0, 0)
    how = "key/value groups split" if grouped else "heads cut"
    whole = (f"its {heads} key/value groups of [{per} queries | key | value] over {t_size // heads} ranks each, whole "
             "heads on each rank: XLA moves the queries into a split of their heads and hands each rank its group's "
             "key and value (forward and backward)" if grouped else _what_xla_does_to_cut_heads(fused_col, heads, t_size))
    props = []
    for col in cols:
        cdim = col.shard_dim("column")
        fused = (col.f.leaf_dim(cdim), col.cut, col.limit) if fused_col else None
        props.append((col.f.path, fused_as(fused, st.proposal(
            col.f, body_spec(len(col.f.body), cdim, t_entry), "column",
            f"column, {how}: {col.why}; output features ({col.f.body[cdim]}) split over {over}"
            f"{'' if grouped else f' although its {heads} heads do not divide by it'}: "
            f"{whole}; feeds {short(row.f.path)} (pair {pair.id})", pair.id,
            "column"))))
    partner = ", ".join(short(c.f.path) for c in cols)
    heads_in = f"{heads * per} query heads in {heads} key/value groups" if grouped else f"{heads} heads"
    props.append((row.f.path, st.proposal(
        row.f, body_spec(len(row.f.body), rdim, t_entry), "row",
        f"row, {how}: {row.why}; input features ({row.in_size}, {heads_in}) split over {over}, fed by "
        f"{partner} (pair {pair.id}); one all-reduce of activations per pass", pair.id, "row")))
    label = short(cols[0].f.path) if fused_col else partner
    acts = (row_sum(st, row.f, row.out_size),
            *(a for col in cols for a in input_grad_sum(st, col.f.path, col.in_size)),
            *(ActComm("all-reduce" if why.startswith("sum") else "all-gather", t_entry, w, 1,
                      f"{'fused ' if fused_col else ''}{label}, {heads} heads cut: "
                      f"{'' if why.startswith('sum') else 'gather, '}{why}", ranks=ranks if ranks != t_size else 0)
              for w, ranks, why in (() if grouped else gathers)),
            *(ActComm(kind, t_entry, w, 1, f"fused {label}, {heads} key/value groups over {t_size} ranks: {why}",
                      ranks=ranks if ranks != t_size else 0)
              for kind, w, ranks, why in (gathers if grouped else ())))
    # a grouped fused q/k/v moves a few heads a token, narrower than the output it divides (as an MQA's naive cut
    # into unequal pieces): the Megatron rule against keeping it whole holds; a head cut gathers whole outputs
    return Option(f"Megatron, {how}", tuple(props), acts, frozenset(p for p, _ in props), sums_output=not grouped)


def _kv_whole_option(st: State, cols: list[Linear], row: Linear, pair: Pair, blocked: dict[int, str]) -> Option | None:
    """The hand layout of a GQA through ``jax.nn.dot_product_attention`` whose ``K`` key/value heads the tensor ranks
    neither divide nor are divided by (12 query heads, 6 key/value heads on model=4): the query split on its output
    and the output projection on its input (Megatron), the narrower key and value kept whole, XLA computing the
    attention in ``gcd(K, n)`` head groups. Priced with :func:`tpflax._src.cost.headcut.whole_kv`, as the estimate
    prices that plan (:func:`tpflax._src.cost.reshard.whole_kv_items`): the query's output and the row's input
    gradient gathered to whole head groups, each key/value's output gradient gathered over the groups and its update
    run in them. None: not this case (traced separate 2-D columns, one as wide as the row's input, the others
    narrower, all read in the same ``K`` heads)."""
    t_entry, t_size = st.tensor
    if len(cols) < 2 or row.heads is not None:
        return None
    query = [c for c in cols if out_width(c) == row.in_size]
    kvs = [c for c in cols if out_width(c) < row.in_size]
    heads = cols[0].limit
    if (len(query) != 1 or len(kvs) != len(cols) - 1 or row.in_size % t_size
            or any(len(c.f.body) != 2 or c.heads is not None or c.viewed or len(c.cut) > 1 or c.limit != heads
                   or c.rope is None for c in cols)):
        return None
    q = query[0]
    pinned_ = _fsdp_mesh(st)
    # rematerialised: what the recompute runs again, as the estimate prices it (Recompute.whole_kv_again)
    again = st.recompute.whole_kv_again(not pinned_) if st.recompute is not None else (False, False)
    w = whole_kv(out_width(q), tuple(out_width(c) for c in kvs), row.in_size, heads, t_size,
                 tuple(c.f.path not in st.no_input_grad for c in kvs), again, tuple(c.in_size for c in kvs))
    if w is None:
        return None
    over = axis_label(t_entry, t_size)
    groups = f"{w.groups} group(s) of {heads // w.groups} key/value head(s)"
    props = [(q.f.path, st.proposal(
        q.f, body_spec(2, 1, t_entry), "column",
        f"column, K/V whole: {q.why}; output features ({q.f.body[1]}) split over {over}, gathered to whole key/value "
        f"head groups ({groups}: XLA computes the attention in them); feeds {short(row.f.path)} (pair {pair.id})",
        pair.id, "column"))]
    kv_names = ", ".join(short(c.f.path) for c in kvs)
    props += [(c.f.path, st.whole(c.f, f"column of pair {pair.id}: {blocked[id(c)] or c.why}, kept whole on every "
                                       f"tensor rank beside the split query {short(q.f.path)} ({groups}); feeds "
                                       f"{short(row.f.path)}", pair.id, "column")) for c in kvs]
    props.append((row.f.path, st.proposal(
        row.f, body_spec(len(row.f.body), row.shard_dim("row"), t_entry), "row",
        f"row: {row.why}; input features ({row.in_size}) split over {over}, fed by {short(q.f.path)} split and "
        f"{kv_names} whole (pair {pair.id}); one all-reduce of activations per pass", pair.id, "row")))
    acts = [row_sum(st, row.f, row.out_size),
            *input_grad_sum(st, q.f.path, q.in_size),
            *(ActComm("all-gather", t_entry, size, 1, f"{short(q.f.path)} split, {kv_names} whole, in {groups}: "
                      f"gather, {why}", ranks=ranks if ranks != t_size else 0) for size, ranks, why in w.gathers),
            *(ActComm("all-reduce", t_entry, size, 1, f"{short(q.f.path)} split, {kv_names} whole, in {groups}: {why}",
                      ranks=ranks if ranks != t_size else 0) for size, ranks, why in w.sums)]
    for c in kvs:
        acts += update_acts(c, t_entry, w.pieces if c.f.leaf.trainable else None, pinned_)
    pieces = tuple((c.f.path, w.pieces) for c in kvs if w.pieces and c.f.leaf.trainable)
    return Option("q/o split, K/V whole", tuple(props), tuple(acts), frozenset(p for p, _ in props), pieces=pieces)


def _what_xla_does_to_cut_heads(fused: bool, heads: int, t_size: int) -> str:
    """The reason's clause for ``heads`` cut over ``t_size`` tensor ranks: what XLA does to a fused ``[q|k|v]``'s
    output (``fused``) or separate projections' outputs, with fewer heads than ranks or not."""
    if fused and heads >= t_size:
        return "XLA gathers the output whole before the reshape into heads (and backward to whole head groups)"
    if fused:
        return ("XLA gathers the output whole before the reshape into heads (and the pieces' gradients backward) and "
                f"sums each head's partial scores over its {t_size // heads} ranks")
    if heads < t_size:
        return f"XLA cuts each head's head_dim over {t_size // heads} ranks and sums its partial scores (forward and backward)"
    return (f"XLA gathers it to whole groups of gcd({heads}, {t_size}) heads before the reshape into heads (and the row's "
            "input gradient backward)")


def logit_acts(t_entry: Entry, d: int, what: str, input_grad: bool = True) -> tuple[ActComm, ...]:
    """A vocab-split output: the split softmax's three per-token reductions and the input gradients (none where it
    reads the model's own input or only what frozen parameters compute, ``input_grad`` False:
    :attr:`State.no_input_grad`)."""
    return (ActComm("all-reduce", t_entry, 1, 3, f"{what}: max, sum and label logit of the split softmax"),
            *((ActComm("all-reduce", t_entry, d, 1, f"{what}: sum input gradients (backward)"),) if input_grad else ()))


def _row_as_head(st: State, cols: list[Linear], row: Linear, pair: Pair, head: tuple[int, str]) -> Option:
    """A pair whose row writes the model's output: the row split over that output as a vocab-split output
    head, its columns whole (:func:`shard_pair`)."""
    t_entry, t_size = st.tensor
    dim, why = head
    n = row.f.body[dim]
    props = [(col.f.path, st.whole(col.f, f"{col.role} of pair {pair.id} ({col.why}): kept whole on every tensor "
                                          f"rank, as {short(row.f.path)} is split as an output head", pair.id,
                                   col.role)) for col in cols]
    props.append((row.f.path, st.proposal(row.f, body_spec(len(row.f.body), dim, t_entry), "column",
                                          f"{why}; {n} outputs split over {axis_label(t_entry, t_size)} "
                                          f"(vocab-parallel logits), its pair's columns kept whole", kind="head")))
    return Option("output head split", tuple(props), logit_acts(t_entry, row.in_size, "vocab-split output head"),
                  frozenset(p for p, _ in props))


def _megatron(st: State, cols: list[Linear], row: Linear, pair: Pair, unit: str, size: int,
              blocked: dict[int, str], kv_split: bool) -> Option | None:
    """The Megatron layout of a pair; ``kv_split``: blocked (GQA) columns split their last dim instead."""
    t_entry, t_size = st.tensor
    rdim = row.shard_dim("row")
    partner = ", ".join(short(c.f.path) for c in cols)
    heads = row.heads is not None
    props = [(row.f.path, st.proposal(
        row.f, body_spec(len(row.f.body), rdim, t_entry), "heads" if heads else "row",
        f"{'heads (row side)' if heads else 'row'}: {row.why}; input {unit} ({size}) split over "
        f"{axis_label(t_entry, t_size)}, fed by {partner} (pair {pair.id}); one all-reduce of "
        "activations per pass", pair.id, "row"))]
    acts = [row_sum(st, row.f, row.out_size), *_joined(row, t_entry, t_size)]
    pieces: list[tuple[str, int]] = []
    regrouped: list[bool] = []  # per blocked column split: repeated to query heads, gathered to head groups
    rotated = _rotated([c for c in cols if blocked[id(c)]])
    # traced: the query heads a GQA's key/value may be repeated to (cost/headcut.py repeated_kv_groups)
    query_heads = next((c.limit for c in cols if not blocked[id(c)] and c.limit), None)
    for col in cols:
        why = blocked[id(col)]
        if why and kv_split:
            last = len(col.f.body) - 1
            if col.f.body[last] % t_size:
                return None
            regrouped.append((rep := _repeated(col, query_heads, t_size)) is not None)
            if rep is not None:
                props.append((col.f.path, st.proposal(
                    col.f, body_spec(len(col.f.body), last, t_entry), "column",
                    f"column of pair {pair.id}: {why}, so its output features ({col.f.body[last]}) are split over "
                    f"{axis_label(t_entry, t_size)} instead, gathered to whole head groups; feeds "
                    f"{short(row.f.path)}", pair.id, "column")))
                g, repeats = rep
                w = out_width(col)
                acts += [*input_grad_sum(st, col.f.path, col.in_size),
                         *(ActComm("all-gather", t_entry, size, 1, f"{short(col.f.path)}, repeated to the query heads "
                                   f"in {g} head group(s): gather, {gwhy}", ranks=ranks if ranks != t_size else 0)
                           for size, ranks, gwhy in repeated_kv_gathers(w, w * repeats, g, t_size, split=True))]
                continue
            whole = whole_heads_likely(col, t_size)  # an untraced 2-D kernel wide enough for whole heads per rank
            over = axis_label(t_entry, t_size)
            what = (f"split on its output features ({col.f.body[last]}) over {over} instead: {HEAD_DIM_GUESS}-wide "
                    "heads are likely whole on each rank" if whole else
                    f"so its last dim ({col.f.body[last]}, head_dim) is split over {over} instead")
            props.append((col.f.path, st.proposal(
                col.f, body_spec(len(col.f.body), last, t_entry), "column",
                f"column of pair {pair.id}: {why}, {what}; feeds {short(row.f.path)}", pair.id, "column")))
            if whole:
                acts += input_grad_sum(st, col.f.path, col.in_size)
                continue
            kv = kv_view(col, col is rotated, t_size)
            acts += [ActComm(kind, t_entry, width, count, why, fixed * col.f.leaf.itemsize, ranks)
                     for kind, width, fixed, count, why, ranks in kv_split_comms(kv, t_size)]
        elif why:
            props.append((col.f.path, st.whole(col.f, f"column of pair {pair.id}: {why}, kept whole on every "
                                                      f"tensor rank; feeds {short(row.f.path)}", pair.id, "column")))
            whole_acts, k = whole_column(col, t_entry, t_size, query_heads, pinned=_fsdp_mesh(st),
                                         input_grad=col.f.path not in st.no_input_grad)
            acts += whole_acts
            if k is not None:
                pieces.append((col.f.path, k))
        else:
            cdim = col.shard_dim("column")
            cheads = col.heads is not None
            fused = (col.f.leaf_dim(cdim), col.cut, col.limit) if len(col.cut) > 1 else None
            props.append((col.f.path, fused_as(fused, st.proposal(
                col.f, body_spec(len(col.f.body), cdim, t_entry), "heads" if cheads else "column",
                f"{'heads (column side)' if cheads else 'column'}: {col.why}; output "
                f"{'heads' if cheads else 'features'} ({col.f.body[cdim]}) split over "
                f"{axis_label(t_entry, t_size)}, feeds {short(row.f.path)} (pair {pair.id})", pair.id, "column"))))
            acts += input_grad_sum(st, col.f.path, col.in_size)
    # a key/value jnp.repeat expands to query heads its groups do not follow is split on its output features, its
    # heads cut and gathered to whole head groups: not a head_dim split, named apart
    name = ("Megatron, K/V split, gathered to head groups" if kv_split and regrouped and all(regrouped) else
            "Megatron, K/V head_dim split" if kv_split else
            "Megatron, K/V replicated" if any(blocked.values()) else "Megatron split")
    return Option(name, tuple(props), tuple(acts), frozenset(p for p, _ in props), pieces=tuple(pieces))


def row_sum(st: State, row: Facts, width: float, batched: bool = False) -> ActComm:
    """A split row's all-reduce of its partial outputs (``width`` per token, forward), run again in a remat'd
    block's recompute where :class:`tpflax._src.cost.residual.Recompute` says the estimate prices it so (``batched``:
    the row's contraction batches over experts)."""
    redo = st.recompute is not None
    if redo:
        key = layer_key(row.unit)
        redo = st.recompute.summed_again(key, row.kind, batched, st.recompute.unread({key: row.kind}))
    return ActComm("all-reduce", st.tensor[0], width, 1 + redo,
                   f"row: sum partial outputs (forward{', again in the remat recompute' if redo else ''})")


def input_grad_sum(st: State, path: str, width: int,
                   why: str = "column: sum partial input gradients (backward)") -> list[ActComm]:
    """A column split on its output: the all-reduce of its partial input gradients (``width`` per token, backward);
    none where it reads the model's own input or only what frozen parameters compute (:attr:`State.no_input_grad`),
    whose gradient the step does not compute
    (XLA compiles no such sum; the estimate prices none: :attr:`tpflax._src.cost.traced.Traced.widths`)."""
    if path in st.no_input_grad:
        return []
    return [ActComm("all-reduce", st.tensor[0], width, 1, why)]


def _joined(row: Linear, t_entry: Entry, t_size: int) -> list[ActComm]:
    """XLA's reshard of a row's concatenated input into its split, as the estimate prices it
    (:func:`tpflax._src.cost.reshard.concat_items`)."""
    from tpflax._src.cost.reshard import split_columns  # the cost model imports the planner

    cut = split_columns(sum(row.joined), row.joined, t_size) if len(row.joined) > 1 else None
    if cut is None:
        return []
    cps, back = cut
    return [ActComm("all-to-all", t_entry, back, 2, "row: lay its concatenated inputs out as its split (forward)"),
            ActComm("collective-permute", t_entry, sum(cps), 1,
                    "row: cut its input gradient back into the concatenated inputs' shards (backward)")]


def _repeated(col: Linear, query_heads: int | None, t_size: int) -> tuple[int, int] | None:
    """``(groups, repeats)`` of a traced 2-D key/value column whose heads (``limit``) a ``jnp.repeat`` expands to
    ``query_heads`` that ``t_size`` divides, while its own neither divide ``t_size`` nor are divided by it
    (:func:`tpflax._src.cost.headcut.repeated_kv_groups`, as the estimate's :func:`tpflax._src.cost.reshard.repeated_kv`
    reads the trace); None otherwise."""
    if len(col.f.body) != 2 or col.heads is not None or not col.limit or col.rope is None:
        return None
    g = repeated_kv_groups(col.limit, query_heads, t_size)
    return None if g is None else (g, query_heads // col.limit)


def _fsdp_mesh(st: State) -> bool:
    """Whether tpflax's step gathers parameters for compute and pins every gradient to its parameter's layout: the axes
    it gathers over (:func:`tpflax._src.specs.gathered_axes`, as the step's :func:`tpflax._src.specs.fsdp_axes` and the
    estimate's :func:`tpflax._src.cost.stream.zero3_axes` read them) are the mesh's fsdp axes larger than 1, whatever
    the plan splits over them (the fsdp split is chosen after the pairs; measured, XLA:CPU fsdp=2,model=4 with
    ``fsdp_min_bytes`` leaving nothing split over fsdp: each whole key/value kernel's gradient still gathered once), and
    any other batch axis a user rule or annotation splits a leaf over (a rule putting one kernel on ``data``, on
    data=2,model=4: the step gathers over ``data`` and pins every gradient; the chooser priced the key/value updates
    unpinned, 3 gathers for the compiled 1)."""
    return bool(gathered_axes(st.mesh, [p.spec for p in st.forced.values()]))


def whole_column(col: Linear, t_entry: Entry, t_size: int, query_heads: int | None = None,
                 pinned: bool = False, input_grad: bool = True) -> tuple[list[ActComm], int | None]:
    """A column kept whole in a split pair (a GQA key/value with fewer heads than ``t_size``) priced as the
    estimate prices it (:mod:`tpflax._src.cost.pieces`): traced, its output in the pieces its heads give
    (``K`` dividing ``t_size``), each piece's output gradient summed over the ranks sharing it, its input
    gradient summed or its output gradient gathered over the pieces (summed inside a scan or a remat'd call),
    its update run on its piece and gathered with its :data:`OPT_COPIES` moments. Untraced, the same for a 3-D
    kernel, whose heads dim shows (a scanned stack's is in a loop: benchmarks/scan_pricing.py; XLA:CPU, and
    XLA:TPU on data=2,model=4, split an unrolled one in the same pieces); a 2-D kernel, whose heads do not show,
    the narrower of the two over every rank.
    ``(collectives, the pieces its weight gradient is split in)``.

    tpflax's fsdp step gathers the kernel whole for compute, which the estimate reads off the plan
    (:func:`tpflax._src.cost.whole.whole_members`). Where it gathers parameters for compute (``pinned``:
    :func:`_fsdp_mesh`, an fsdp axis, split or not) the step pins the gradient to the parameter's layout: XLA gathers the
    split gradient once and the update runs as stored, no moments gathered, as the estimate prices it
    (:func:`tpflax._src.cost.stream.update_gathers`; measured, XLA:CPU fsdp=2,model=4, review_u's m18 Llama with f32
    masters, 8 query and 2 key/value heads: one ``f32[128,32]`` gather over 2 ranks per key/value kernel, where the
    parameter and its 2 moments were priced).
    Not ``input_grad`` (it reads the model's own input, or only what frozen parameters compute:
    :attr:`State.no_input_grad`): no input gradient to sum, and,
    as the estimate's :func:`tpflax._src.cost.whole.whole_members`, only the output-gradient sums and the update
    pieces' gathers priced.
    """
    stacked = bool(col.f.stacked) and col.heads is not None
    rep = _repeated(col, query_heads, t_size)
    in_size = col.in_size if input_grad else 0
    if rep is not None:  # repeated to query heads its groups do not follow: in their head groups
        k = rep[0]
    elif col.rope is not None or col.heads is not None:
        k = pieces_of(col.limit or col.f.body[col.shard_dim("column")], t_size)
    else:
        k = None
    r = column_read(col.f.path, (), in_size, out_width(col), k, col.loop or stacked)
    if rep is not None:
        r = replace(r, repeat=out_width(col) * rep[1])
    acts = [ActComm(i.kind, t_entry, i.size, i.count, i.why, ranks=i.group_size)
            for i in member_items(r, f"key/value column {short(col.f.path)}", t_size, 1, col.f.path, r.size)]
    split = update_pieces(r, t_size) if col.f.leaf.trainable else None
    acts += update_acts(col, t_entry, split, pinned)
    return acts, split


def update_acts(col: Linear, t_entry: Entry, split: int | None, pinned: bool) -> list[ActComm]:
    """A whole key/value column whose weight gradient comes out in ``split`` pieces (None: whole): its update run on
    its piece and the parameter and its moments gathered over that many ranks, or, where tpflax's fsdp step pins the
    gradient to the parameter's layout (``pinned``), the gradient gathered once (see :func:`whole_column`)."""
    if split is None:
        return []
    if pinned:
        return [ActComm("all-gather", t_entry, 0, 1, f"replicated key/value column {short(col.f.path)}: its "
                        f"gradient, in {split} pieces, is gathered where the fsdp step pins it to the parameter's "
                        "layout", math.prod(col.f.body) * col.f.leaf.itemsize, ranks=split)]
    return [ActComm("all-gather", t_entry, 0, 1 + OPT_COPIES, f"replicated key/value column "
                    f"{short(col.f.path)}: its update runs on its piece of {split}, then the parameter and "
                    "its moments are gathered", math.prod(col.f.body) * col.f.leaf.itemsize, ranks=split)]


def out_width(col: Linear) -> int:
    """Output elements per token of a column: every dim its contraction does not sum (a ``(2, K, d, head_dim)``
    key/value stack writes both pieces; a traced column's ``out_dims`` holds only its split dim)."""
    return math.prod(col.f.body) // max(col.in_size, 1)


HEAD_DIM_GUESS = 128  # Llama, Mistral, Qwen, Gemma 3-4B+ key/value heads: 128 or 256 features


def whole_heads_likely(col: Linear, t_size: int) -> bool:
    """Whether an untraced 2-D key/value kernel, whose head count the tree does not show, likely splits into
    whole heads per tensor rank: its width divides into ``t_size`` times :data:`HEAD_DIM_GUESS` (Mistral-7B's
    1024 = 8 heads of 128 over 4 ranks: 2 heads each, a split that cuts no head). Narrower kernels (Gemma 3-1B's
    one 256-wide head over 4 ranks) are priced as a head_dim split. Traced kernels show their heads."""
    return (len(col.f.body) == 2 and col.heads is None and col.limit is None
            and out_width(col) % (HEAD_DIM_GUESS * t_size) == 0)


def kv_view(col: Linear, rotated: bool, t_size: int) -> KVSplit:
    """A key/value column as :class:`tpflax._src.cost.kvsplit.KVSplit` prices its head_dim split over ``t_size``
    ranks. A 2-D kernel shows its heads only traced (``limit``); without them it is priced as one head. Traced,
    more than one dividing the ranks, each head is cut over ``t_size / heads`` ranks (``KVSplit.flat``)."""
    width = out_width(col)
    head_dim = col.f.body[-1] if len(col.f.body) >= 3 else width // (col.limit or 1)
    heads = col.f.body[col.heads] if col.heads is not None and len(col.f.body) >= 3 else (col.limit or 1)
    flat = len(col.f.body) == 2 and col.rope is not None and 1 < heads < t_size and t_size % heads == 0
    return KVSplit(heads, head_dim, max(width // (heads * head_dim), 1), col.in_size, math.prod(col.f.body), rotated,
                   flat=flat, remat=col.remat)


def _rotated(blocked: Sequence[Linear]) -> Linear | None:
    """The key/value column whose keys a rotate-half RoPE cuts: the traced one whose head_dim output is cut in
    halves; untraced, the first (the common RoPE, Llama's and Gemma's, is rotate-half)."""
    if any(c.rope is not None for c in blocked):
        return next((c for c in blocked if c.rope), None)
    return blocked[0] if blocked else None


def fused_as(fused: tuple[int, tuple[int, ...], int | None] | None, p: Proposal) -> Proposal:
    """``p`` marked as a fused column's (see :mod:`tpflax._src.planner.fused`)."""
    return p if fused is None else replace(p, fused=fused)


def column_blocked(col: Linear, kind: str, row: Linear, t_entry: Entry, t_size: int) -> str:
    """Why a column of a pair cannot be split over the tensor axis ('' when it can)."""
    n = col.f.body[col.shard_dim("column")]
    cunit = "heads" if col.heads is not None else "features"
    if kind == "attention" and col.heads is None and col.limit is None and col.out_size < row.in_size \
            and not col.why.startswith("traced") and not col.narrow_query:
        # A 2-D key/value kernel narrower than the attention output is GQA: its head
        # count is not in the tree, and a split that cuts heads costs a gather. Traced, keys and values show
        # their heads (a reshape: ``limit``) or end at the scores (summed there, or merged as a minor dim); one
        # reaching the row unreshaped is a factor per head (a Mamba-2 mixer's dt), split with the heads
        return (f"{n} features narrower than the attention output ({row.in_size}): taken for GQA key/value heads, "
                "whose count a 2-D kernel does not show (pass model= to trace the heads), so no head is cut")
    if n % t_size:
        gqa = " (GQA key/value heads)" if col.heads is not None else ""
        return f"{cunit} {n}{gqa} not divisible by {axis_label(t_entry, t_size)}"
    # A fused [q | k | v] of a GQA cut into unequal pieces that each divide is split naively whatever heads its keys
    # make: XLA reshards the pieces (priced) and gathers the keys' heads, the queries split by heads; the chooser
    # weighs that against keeping it whole (DBRX's Wqkv: 2 key/value heads). Equal pieces whose heads do not divide
    # (a Swin stage's 2 heads over 4 ranks) would cut the queries' head_dim too: XLA sums partial scores.
    naive = len(set(col.cut)) > 1 and all(p % t_size == 0 for p in col.cut)
    grouped = _grouped(col, row)
    if grouped is not None and col.limit % t_size:
        # Falcon's [q_1..q_R k v] per key/value group (the trace reads the groups, not the query heads): say which
        groups, (per, head_dim) = col.limit, grouped
        share = n // t_size
        what = (f"{groups} key/value groups of [{per} queries | key | value] ({head_dim}-wide heads, {groups * per} "
                f"query heads in all), which {axis_label(t_entry, t_size)} does not divide")
        if grouped_qkv_moves(col.in_size, n, groups, t_size) is not None:
            return (f"{cunit} {n} are {what}: split, each group lies over {t_size // groups} ranks, {share} features "
                    "(whole heads) a rank")
        spread = f"{t_size // groups} ranks a group" if t_size % groups == 0 else f"{groups} groups over {t_size} ranks"
        cut = f", cutting its {head_dim}-wide heads" if share % head_dim else ""
        return (f"{cunit} {n} are {what}: split, each rank holds {share} features ({spread}{cut}), a reshard only "
                "priced for groups over 2 ranks each, so the split is no candidate")
    if (col.limit or n) % t_size and not naive:
        # the features divide; what the model reshapes them into on the way does not
        # a fused [q|k|v] reshaped into heads that neither divide nor divide the ranks (a Swin's 6 heads on 4): XLA
        # gathers the output whole instead; the split that cuts them is priced (shard_pair, _heads_cut)
        # separate q, k and v projections alike: XLA gathers each output to whole head groups
        cut = ("XLA sums a cut head's partial scores" if not (col.limit and t_size % col.limit) else
               "XLA gathers the fused output whole for the heads" if col.viewed else
               "XLA gathers the output to whole head groups")
        return (f"{cunit} {n} are reshaped on the way into {col.limit} (e.g. attention heads), not divisible by "
                f"{axis_label(t_entry, t_size)}: a split would cut them ({cut})")
    return ""


def conv_floor(st: State, ch: int) -> str:
    """Why a conv pair on ``ch`` channels stays whole, unpriced ('' when it is priced): no tensor axis, or
    fewer channels than ``min_channels``."""
    if st.tensor[1] == 1:
        return "no tensor axis in the mesh"
    if ch < st.opts.min_channels:
        return f"{ch} channels < min_channels={st.opts.min_channels}"
    return ""


def whole_conv_pair(st: State, members: Sequence[tuple[Facts, str, str]], ch: int, note: str, why: str = "") -> None:
    """A conv pair kept whole for ``note``: recorded unsharded, each ``(facts, side, role)`` member replicated."""
    pair = st.new_pair("conv", [f for f, _, role in members if role == "column"],
                       [f for f, _, role in members if role == "row"], ch, False, note)
    for f, side, role in members:
        st.replicate(f, f"{side} of conv pair {pair.id}, but {note}: {why}tensor split skipped", pair.id, role)


def shard_conv_pair(st: State, a: Facts, b: Facts, a_dim: int, b_dim: int, why: str = "",
                    extra: Sequence[Facts] = (), gathered: int = 0) -> None:
    """Conv ``a`` (output channels, body dim ``a_dim``) feeding conv ``b`` (input channels, ``b_dim``): split
    on those channels or kept whole, whichever the chooser prices cheaper (``min_channels``, when set, is a
    floor below which the pair stays whole unpriced). ``extra``: 2-D dense kernels whose outputs are added to
    ``a``'s output channels (a diffusion ResNet's time-embedding projection), columns of the pair split
    with it; their input gradients, one row per example, are summed (priced by the estimate, not here).
    ``gathered``: later convs reading ``a``'s output channels whole, beside ``b`` (traced): split, that output is
    gathered for each of them."""
    t_entry, t_size = st.tensor
    ch = a.body[a_dim]
    note = conv_floor(st, ch)
    if not note and ch % t_size:
        note = f"{ch} channels not divisible by {axis_label(t_entry, t_size)}"
    why = f"{why}; " if why else ""
    members = ((a, "channel", "column"), *((e, "added to its output channels", "column") for e in extra),
               (b, "input-channel", "row"))
    if note:
        whole_conv_pair(st, members, ch, note, why)
        return
    pair = st.new_pair("conv", [a, *extra], [b], ch, True)
    paths = frozenset((a.path, b.path, *(e.path for e in extra)))
    over = axis_label(t_entry, t_size)
    split = Option("channel split", (
        (a.path, st.proposal(a, body_spec(len(a.body), a_dim, t_entry), "channel",
                             f"channel: {why}{ch} output channels split over {over}, feed {short(b.path)} (conv "
                             f"pair {pair.id})", pair.id, "column")),
        (b.path, st.proposal(b, body_spec(len(b.body), b_dim, t_entry), "row",
                             f"input-channel: {ch} input channels split over {over}, fed by {short(a.path)} (conv "
                             f"pair {pair.id}); one all-reduce per pass", pair.id, "row")),
        *((e.path, st.proposal(e, body_spec(2, 1, t_entry), "column",
                               f"column: its {ch} outputs are added to {short(a.path)}'s output channels (by name and "
                               f"shape: a conditioning projection in the conv's block), split with them over {over} "
                               f"(conv pair {pair.id})", pair.id, "column")) for e in extra)),
        (ActComm("all-reduce", t_entry, math.prod(b.body) // (b.body[b_dim] * _taps(b)), 1,
                 "input-channel conv: sum partial outputs (forward)"),
         *input_grad_sum(st, a.path, math.prod(a.body) // (ch * _taps(a)),
                        "channel conv: sum partial input gradients (backward)"),
         *((ActComm("all-gather", t_entry, ch, 2 * gathered, "gather the split output channels for the later convs "
                    "that read them whole (forward, and again for their weight gradients)"),) if gathered else ())),
        paths)
    whole = Option("replicate", tuple(
        (f.path, st.whole(f, f"{side} of conv pair {pair.id}: {why}kept whole on every tensor rank", pair.id, role))
        for f, side, role in members),
        matmul=paths, whole=True)
    st.choose("pair", [split, whole], [a, b, *extra])
    if st.out[b.path].strategy == "replicate":
        st.pairs[st.pairs.index(pair)] = replace(pair, sharded=False, note="kept whole: cheaper by cost")


def _taps(f: Facts) -> int:
    """Spatial taps of a conv kernel, laid out as flax's ``(*window, in, out)``: ``kh * kw``. What it reads
    and writes per position is channels only."""
    return math.prod(f.body[:-2])


# ---------------------------------------------------------------------------
# biases


def bias_follows(st: State, f: Facts, body_spec: Sequence[Entry], kpath: str, evidence: str) -> None:
    """A bias added to kernel ``kpath``'s output: split like that output, or replicated after a reduction.

    ``body_spec`` is the kernel's spec at its output dims. A kernel a user rule or an annotation
    forced says nothing by its strategy, so its spec speaks: the bias takes the tensor and expert
    axes there (fsdp and data axes only store the kernel in pieces; the fsdp pass splits the bias
    on its own).
    """
    kernel = st.decided(kpath)
    assert kernel is not None, kpath  # callers pass a decided kernel
    if kpath in st.forced:
        roles = dict(st.mesh.roles)
        body_spec = [normalize_entry(tuple(a for a in entry_axes(e) if roles.get(a) in (TENSOR, EXPERT)))
                     for e in body_spec]
        how = f"{'annotated' if kernel.strategy == 'annotation' else 'set by a rule to'} {to_pspec(kernel.spec)}"
        split, whole = any(body_spec), "its output is not tensor-split, so neither is the bias"
    else:
        how = kernel.strategy
        split = any(body_spec) and kernel.strategy in OUTPUT_SPLITS
        whole = ("added after the reduction, so not tensor-split" if kernel.strategy == "row"
                 else "its output is not tensor-split, so neither is the bias")
    if split:
        st.put(f, body_spec, "channel" if kernel.strategy == "channel" else "column",
               f"{evidence} ({how}): split like that output", kernel.pair)
    else:
        st.replicate(f, f"{evidence} ({how}): {whole}", kernel.pair)


def join_row(st: State, row: Facts, rdim: int, col: Facts, why: str) -> bool:
    """Add ``row`` to the pair the column ``col`` is in, split on its body dim ``rdim`` when ``col`` is
    split: a parallel block's fused input projection, whose pieces feed two rows (attention output and
    MLP down). False (nothing written) when ``col`` is not a split column or ``rdim`` does not divide."""
    return _join(st, row, rdim, col, "row", lambda label, pair: (
        f"row: {why}; input features ({row.body[rdim]}) split over {label}, fed by {short(col.path)} "
        f"(pair {pair}); one all-reduce of activations per pass"))


def join_column_of(st: State, col: Facts, cdim: int, row: Facts, why: str) -> bool:
    """Add ``col`` to the pair the split row ``row`` is in, split on its body dim ``cdim`` (the output the row
    sums). False (nothing written) when ``row`` is no split row or ``cdim`` does not divide."""
    return _join(st, col, cdim, row, "column", lambda label, pair: (
        f"column: {why}; output features ({col.body[cdim]}) split over {label} (pair {pair})"))


def _join(st: State, f: Facts, dim: int, member: Facts, role: str, reason: Any) -> bool:
    """Add ``f`` as a ``role`` to the pair of the split ``member`` (of the other role), split on body dim ``dim``."""
    p = st.out.get(member.path)
    t_entry, t_size = st.tensor
    other = "column" if role == "row" else "row"
    if p is None or p.role != other or p.strategy == "replicate" or f.body[dim] % t_size:
        return False
    st.put(f, body_spec(len(f.body), dim, t_entry), role, reason(axis_label(t_entry, t_size), p.pair), p.pair, role)
    field = "rows" if role == "row" else "columns"
    for i, q in enumerate(st.pairs):
        if q.id == p.pair and f.path not in getattr(q, field):
            st.pairs[i] = replace(q, **{field: (*getattr(q, field), f.path)})
    return True


def join_column(st: State, col: Facts, like: Facts, why: str) -> None:
    """Add ``col`` to the pair ``like`` (a column) is in, split the same way: the second
    up-projection of a gated MLP (gate and up both feed the down projection)."""
    p = st.out[like.path]
    st.put(col, like.body_of(p.spec), p.strategy, f"{p.reason.split(';')[0]}; {why}", p.pair, "column")
    for i, q in enumerate(st.pairs):
        if q.id == p.pair and col.path not in q.columns:
            st.pairs[i] = replace(q, columns=(*q.columns, col.path))
