"""Tree heuristics: column/row pairing, heads, channel, vocab, expert, fsdp.

Given classified leaves (:mod:`tpflax.classify`) and a mesh shape, propose a
spec, a strategy and a reason for every leaf. The rules, in order:

1. **Pairs.** Inside each block (the parent of a layer), linear layers that
   widen the residual stream (``d -> f``) are *column*, those that narrow it back
   (``f -> d``) are *row*; a column feeding a row is a Megatron pair and costs
   one all-reduce forward and one backward. The residual width ``d`` comes from
   the model's norm and embedding sizes, 3-D attention kernels from their layout,
   and names only break ties (square ``d -> d`` kernels). A pair is sharded only
   when its shared dim divides the tensor axis; otherwise neither side is.
2. **Experts** ``(E, d, f)``/``(E, f, d)``: E over the expert axis, f column/row.
3. **Conv chains**: ``conv1 -> conv2`` in a block becomes channel -> input-channel.
4. **Embeddings**: vocab dim, else the embedding dim.
5. **Output heads** (``lm_head``...): column over the vocab.
6. **Biases** follow their kernel (sharded for column, replicated for row).
7. **FSDP**: any float leaf >= ``fsdp_min_bytes`` also shards its largest free
   divisible dim over the fsdp axes.
8. Everything else is replicated, with the reason.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from tpflax._src.facts.classify import ATTN, COLUMN_NAMES, HEAD, POS_EMBED, ROW_NAMES, Facts
from tpflax._src.mesh import EXPERT, FSDP, TENSOR, MeshShape
from tpflax._src.specs import Entry, entry_axes, used_axes


@dataclass(frozen=True)
class Options:
    """Planner knobs.

    Attributes:
        fsdp_min_bytes: leaves at least this large are also sharded over fsdp axes.
        min_channels: conv chains are channel-split only from this many channels.
        tensor_min_bytes: pairs whose kernels are all smaller stay replicated.
        stacked: regex forcing leaves to be treated as ``nn.scan`` stacked.
    """

    fsdp_min_bytes: int = 1 << 18
    min_channels: int = 64
    tensor_min_bytes: int = 0
    stacked: str | None = None


@dataclass(frozen=True)
class Pair:
    """A column->row (or channel->input-channel) pair found in one block."""

    id: int
    kind: str
    columns: tuple[str, ...]
    rows: tuple[str, ...]
    size: int
    sharded: bool
    note: str = ""

    def to_json(self) -> dict:
        return {"id": self.id, "kind": self.kind, "columns": list(self.columns),
                "rows": list(self.rows), "size": self.size, "sharded": self.sharded, "note": self.note}

    @classmethod
    def from_json(cls, d: dict) -> Pair:
        return cls(id=int(d["id"]), kind=str(d["kind"]), columns=tuple(d["columns"]),
                   rows=tuple(d["rows"]), size=int(d["size"]), sharded=bool(d["sharded"]),
                   note=str(d.get("note", "")))


@dataclass(frozen=True)
class Proposal:
    spec: tuple[Entry, ...]
    strategy: str
    reason: str
    pair: int | None = None


@dataclass
class _Linear:
    f: Facts
    in_dims: tuple[int, ...]
    out_dims: tuple[int, ...]
    heads: int | None = None  # body dim holding attention heads
    role: str | None = None
    why: str = ""
    # Largest size the dataflow lets the column dim be split by (a reshape into
    # fewer heads, say); None: the dim's own size. Set by tpflax.trace.
    limit: int | None = None
    doubt: str = ""  # shapes and names disagreed: said in a plan warning

    def size(self, dims: Iterable[int]) -> int:
        return math.prod(self.f.body[d] for d in dims)

    @property
    def in_size(self) -> int:
        return self.size(self.in_dims)

    @property
    def out_size(self) -> int:
        return self.size(self.out_dims)

    def shard_dim(self, role: str) -> int:
        """Body dim that the tensor axis splits for this role."""
        if self.heads is not None:
            return self.heads
        return self.out_dims[-1] if role == "column" else self.in_dims[0]


@dataclass
class _State:
    mesh: MeshShape
    opts: Options
    out: dict[str, Proposal] = field(default_factory=dict)
    pairs: list[Pair] = field(default_factory=list)
    forced: set[str] = field(default_factory=set)  # decided by rules/annotations: never overwritten
    doubts: list[str] = field(default_factory=list)  # roles where names and shapes disagreed
    first_pair: int = 1  # pair ids continue after those of an earlier pass (tpflax.trace)

    @property
    def tensor(self) -> tuple[Entry, int]:
        return self.mesh.group(TENSOR)

    def put(self, f: Facts, body_spec: Sequence[Entry], strategy: str, reason: str,
            pair: int | None = None) -> None:
        if f.path in self.forced:
            return
        spec = (None,) * f.stacked + tuple(body_spec)
        if f.stacked and strategy != "replicate":
            reason += f"; leading layers dim ({f.leaf.shape[0]}) from nn.scan kept unsharded"
        self.out[f.path] = Proposal(spec, strategy, reason, pair)

    def new_pair(self, kind: str, columns: Sequence[Facts], rows: Sequence[Facts], size: int,
                 sharded: bool, note: str = "") -> Pair:
        p = Pair(self.first_pair + len(self.pairs), kind, tuple(c.path for c in columns),
                 tuple(r.path for r in rows), size, sharded, note)
        self.pairs.append(p)
        return p


def _short(path: str) -> str:
    """Path without the collection prefix, for reasons."""
    return path.split("/", 1)[1] if path.startswith("params/") else path


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def propose(facts: Sequence[Facts], mesh: MeshShape, opts: Options,
            skip: Iterable[str] = (), first_pair: int = 1,
            doubts: list[str] | None = None) -> tuple[dict[str, Proposal], list[Pair]]:
    """Propose a spec for every leaf not in ``skip`` (already decided by rules or annotations).

    ``doubts``, when given, collects the layers whose names and shapes disagreed.
    """
    st = _State(mesh, opts, forced=set(skip), first_pair=first_pair)
    todo = [f for f in facts if f.path not in st.forced]
    widths = _residual_widths(facts)
    # Pairing looks at forced leaves too, so a forced partner still pairs its sibling.
    _pair_linears(st, facts, widths)
    _experts(st, todo, widths)
    _conv_chains(st, todo)
    _embeddings(st, todo)
    _heads(st, todo, widths)
    _biases(st, todo)
    _leftovers(st, todo)
    _fsdp(st, todo)
    if doubts is not None:
        doubts.extend(st.doubts)
    return st.out, st.pairs


# ---------------------------------------------------------------------------
# residual width and linear layout

def _residual_widths(facts: Sequence[Facts]) -> set[int]:
    """Sizes of the residual stream: embedding dims and the most common norm width.

    Residual norms come twice per block (plus a final one); a norm inside the
    FFN (NormFormer-style) comes once, so the most common width is the residual.
    """
    widths = set()
    norms: dict[int, int] = defaultdict(int)
    for f in facts:
        if f.kind == "norm" and f.body and f.leaf.collection in ("", "params") and f.name == "scale":
            norms[f.body[-1]] += 1
        elif f.kind == "embedding" and len(f.body) == 2 and not POS_EMBED.search(f.unit_name):
            widths.add(f.body[-1])
    if norms:
        top = max(norms.values())
        widths |= {w for w, n in norms.items() if n == top}
    return widths


def _linear(f: Facts, siblings: Sequence[Facts]) -> _Linear:
    body = f.body
    name = f.unit_name
    if len(body) == 2:
        return _Linear(f, (0,), (1,))
    # 3-D DenseGeneral: (d, heads, head_dim) projects in, (heads, head_dim, d) projects out.
    if ROW_NAMES.match(name):
        return _Linear(f, (0, 1), (2,), heads=0, role="row", why=f"'{name}' is an output projection")
    if COLUMN_NAMES.match(name):
        return _Linear(f, (0,), (1, 2), heads=1, role="column", why=f"'{name}' is an input projection")
    for s in siblings:
        if s is not f and len(s.body) == 3 and s.body[1:] == body[:2]:
            return _Linear(f, (0, 1), (2,), heads=0, role="row",
                           why=f"layout (heads, head_dim, d) mirrors {_short(s.path)}")
    return _Linear(f, (0,), (1, 2), heads=1, role="column", why="layout (d, heads, head_dim)")


def _assign_roles(lins: list[_Linear], widths: set[int]) -> None:
    """Decide column/row for 2-D kernels of one block, shapes first, names second."""
    for lin in lins:
        if lin.role is not None:
            continue
        name = lin.f.unit_name
        i, o = lin.in_size, lin.out_size
        named = "column" if COLUMN_NAMES.match(name) else ("row" if ROW_NAMES.match(name) else None)
        if widths and (i in widths) != (o in widths):
            by_shape = "column" if i in widths else "row"
            if named and named != by_shape:
                # A norm inside the FFN, or a kernel stored (out, in): the name is the
                # safer witness for a flax (in, out) kernel; the trace settles it.
                lin.role = named
                lin.doubt = (f"'{name}' reads as {named} but ({i} -> {o}) looks like {by_shape} against "
                             f"the norm widths {sorted(widths)}; going by the name (pass model= to trace it)")
                lin.why = f"'{name}' is an {'input' if named == 'column' else 'output'} projection ({i} -> {o})"
                continue
            lin.role = by_shape
            lin.why = (f"({i} -> {o}) widens the residual width {i}" if lin.role == "column"
                       else f"({i} -> {o}) narrows back to the residual width {o}")
        elif COLUMN_NAMES.match(name):
            lin.role, lin.why = "column", f"'{name}' is an input projection ({i} -> {o})"
        elif ROW_NAMES.match(name):
            lin.role, lin.why = "row", f"'{name}' is an output projection ({i} -> {o})"
    # Without widths or names, a kernel whose mirror image is in the block pairs by shape.
    for lin in lins:
        if lin.role is not None or lin.in_size == lin.out_size:
            continue
        mirror = [m for m in lins if m is not lin and m.in_size == lin.out_size and m.out_size == lin.in_size]
        if mirror:
            lin.role = "column" if lin.in_size < lin.out_size else "row"
            lin.why = (f"({lin.in_size} -> {lin.out_size}) is mirrored by {_short(mirror[0].f.path)}; "
                       f"the widening side is column")


def _pair_linears(st: _State, todo: Sequence[Facts], widths: set[int]) -> None:
    groups: dict[str, list[Facts]] = defaultdict(list)
    for f in todo:
        if f.kind in ("dense", "attention"):
            groups[f.group].append(f)
    t_entry, t_size = st.tensor
    for group in sorted(groups, key=_natural):
        members = groups[group]
        lins = [_linear(f, members) for f in members]
        _assign_roles(lins, widths)
        cols = [x for x in lins if x.role == "column" and not HEAD.match(x.f.unit_name)]
        rows = [x for x in lins if x.role == "row"]
        if not cols or not rows:
            continue
        for lin in lins:
            if lin.doubt:
                st.doubts.append(f"{lin.f.path}: {lin.doubt}")
        matched: dict[int, list[_Linear]] = {id(r): [] for r in rows}
        for c in cols:
            fits = [r for r in rows if r.in_size == c.out_size]
            if fits:  # two MLPs in one block: a_up feeds a_down, not b_down
                best = max(fits, key=lambda r: _common_prefix(r.f.unit_name, c.f.unit_name))
                matched[id(best)].append(c)
        # GQA key/value projections are narrower than the output projection's input:
        # in an attention block they join the attention row.
        loose = [c for c in cols if not any(c in m for m in matched.values())]
        attn_rows = [r for r in rows if r.f.kind == "attention"] or (rows if ATTN.search(group) else [])
        if loose and attn_rows:
            matched[id(attn_rows[0])] += [c for c in loose if c.f.kind == "attention" or ATTN.search(group)]
        claimed: set[int] = set()
        for row in rows:
            mine = [c for c in matched[id(row)] if id(c) not in claimed]
            if not mine:
                continue
            claimed.update(id(c) for c in mine)
            kind = "attention" if row.f.kind == "attention" or ATTN.search(group) else "mlp"
            _shard_pair(st, kind, mine, row, t_entry, t_size)


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def _shard_pair(st: _State, kind: str, cols: list[_Linear], row: _Linear, t_entry: Entry,
                t_size: int) -> None:
    rdim = row.shard_dim("row")
    size = row.f.body[rdim]
    unit = "heads" if row.heads is not None else "features"
    kernels = [c.f for c in cols] + [row.f]
    small = max(k.leaf.nbytes for k in kernels) < st.opts.tensor_min_bytes
    ok_row = t_size > 1 and size % t_size == 0 and not small
    note = ""
    if t_size == 1:
        note = "no tensor axis in the mesh"
    elif small:
        note = f"all kernels < tensor_min_bytes={st.opts.tensor_min_bytes}"
    elif not ok_row:
        note = f"{unit} {size} not divisible by {_axis(t_entry, t_size)}"
    blocked = {id(c): _column_blocked(c, kind, row, t_entry, t_size) for c in cols}
    if ok_row and all(blocked.values()):
        # Splitting only the row would all-reduce activations that no column split: skip both.
        ok_row = False
        note = "no column of the pair can be split (" + "; ".join(
            f"{_short(c.f.path)}: {blocked[id(c)]}" for c in cols) + ")"
    pair = st.new_pair(kind, [c.f for c in cols], [row.f], size, ok_row, note)
    partner = ", ".join(_short(c.f.path) for c in cols)
    strat = "heads" if row.heads is not None else "row"
    if not ok_row:
        for lin in cols + [row]:
            st.put(lin.f, (None,) * len(lin.f.body), "replicate",
                   f"{lin.role} of pair {pair.id} ({lin.why}) but {note}: tensor split skipped", pair.id)
        return
    spec = [None] * len(row.f.body)
    spec[rdim] = t_entry
    st.put(row.f, spec, strat,
           f"{'heads (row side)' if strat == 'heads' else 'row'}: {row.why}; input {unit} ({size}) split over {_axis(t_entry, t_size)}, fed by "
           f"{partner} (pair {pair.id}); one all-reduce of activations per pass", pair.id)
    for col in cols:
        cdim = col.shard_dim("column")
        n = col.f.body[cdim]
        cunit = "heads" if col.heads is not None else "features"
        if blocked[id(col)]:
            st.put(col.f, (None,) * len(col.f.body), "replicate",
                   f"column of pair {pair.id}: {blocked[id(col)]}, kept whole on every tensor rank; "
                   f"feeds {_short(row.f.path)}", pair.id)
            continue
        cspec = [None] * len(col.f.body)
        cspec[cdim] = t_entry
        st.put(col.f, cspec, "heads" if col.heads is not None else "column",
               f"{'heads (column side)' if col.heads is not None else 'column'}: {col.why}; output {cunit} ({n}) split over {_axis(t_entry, t_size)}, feeds "
               f"{_short(row.f.path)} (pair {pair.id})", pair.id)


def _column_blocked(col: _Linear, kind: str, row: _Linear, t_entry: Entry, t_size: int) -> str:
    """Why a column of a pair cannot be split over the tensor axis ('' when it can)."""
    n = col.f.body[col.shard_dim("column")]
    cunit = "heads" if col.heads is not None else "features"
    if kind == "attention" and col.heads is None and col.limit is None and col.out_size < row.in_size:
        # A 2-D key/value kernel narrower than the attention output is GQA: its head
        # count is not in the tree, and a split that cuts heads costs a gather.
        return (f"{n} features narrower than the attention output ({row.in_size}): GQA key/value "
                "heads whose count a 2-D kernel does not show, so no head is cut (pass model= to trace "
                "the heads)")
    if n % t_size or (col.limit or n) % t_size:
        gqa = " (GQA key/value heads)" if col.heads is not None else ""
        if (col.limit or n) != n:
            gqa = f" (reshaped into {col.limit} on the way, e.g. attention heads)"
        return f"{cunit} {n}{gqa} not divisible by {_axis(t_entry, t_size)}"
    return ""


def _axis(entry: Entry, size: int) -> str:
    return f"{'*'.join(entry_axes(entry)) or 'tensor'}={size}"


# ---------------------------------------------------------------------------
# experts, convs, embeddings, heads

def _experts(st: _State, todo: Sequence[Facts], widths: set[int]) -> None:
    groups: dict[str, list[Facts]] = defaultdict(list)
    for f in todo:
        if f.kind == "expert" and f.path not in st.out:
            groups[f.group].append(f)
    t_entry, t_size = st.tensor
    e_entry, e_size = st.mesh.group(EXPERT)
    for group in sorted(groups, key=_natural):
        fs = groups[group]
        for a in fs:
            ea, x, y = a.body
            for b in fs:
                if b is a or b.body != (ea, y, x) or a.path in st.out or b.path in st.out:
                    continue
                # a: (E, x, y) widens when x is the residual width (or by name).
                if not ((x in widths and y not in widths) or COLUMN_NAMES.match(a.unit_name)
                        or (not widths and x < y)):
                    continue
                _shard_experts(st, a, b, ea, y, t_entry, t_size, e_entry, e_size)
    for f in todo:  # lone expert tensors: split the expert dim when possible
        if f.kind == "expert" and f.path not in st.out and e_size > 1 and f.body[0] % e_size == 0:
            st.put(f, (e_entry, None, None), "expert",
                   f"expert: {f.body[0]} experts split over {_axis(e_entry, e_size)}")


def _shard_experts(st, col: Facts, row: Facts, n_exp: int, ffn: int, t_entry, t_size, e_entry,
                   e_size) -> None:
    e_ok = e_size > 1 and n_exp % e_size == 0
    t_ok = t_size > 1 and ffn % t_size == 0
    pair = st.new_pair("expert", [col], [row], ffn, t_ok or e_ok,
                       "" if t_ok else f"ffn {ffn} not divisible by {_axis(t_entry, t_size)}")
    e_spec = e_entry if e_ok else None
    e_txt = (f"{n_exp} experts over {_axis(e_entry, e_size)}" if e_ok else
             ("no expert axis" if e_size == 1 else f"{n_exp} experts not divisible by "
              f"{_axis(e_entry, e_size)}"))
    t_spec = t_entry if t_ok else None
    t_txt = (f"ffn {ffn} split over {_axis(t_entry, t_size)}" if t_ok else "ffn dim whole")
    strategy = "expert" if e_ok else ("column" if t_ok else "replicate")
    st.put(col, (e_spec, None, t_spec), strategy,
           f"expert column: {e_txt}; {t_txt}; feeds {_short(row.path)} (pair {pair.id})", pair.id)
    st.put(row, (e_spec, t_spec, None), "expert" if e_ok else ("row" if t_ok else "replicate"),
           f"expert row: {e_txt}; {t_txt}; fed by {_short(col.path)} (pair {pair.id})", pair.id)


_SKIP_CHAIN = re.compile(r"(proj|shortcut|downsample|skip|patch|stem|init|residual)", re.I)


def _conv_chains(st: _State, todo: Sequence[Facts]) -> None:
    groups: dict[str, list[Facts]] = defaultdict(list)
    for f in todo:
        if f.kind == "conv" and f.path not in st.out and not _SKIP_CHAIN.search(f.unit_name):
            groups[f.group].append(f)
    t_entry, t_size = st.tensor
    for group in sorted(groups, key=_natural):
        convs = sorted(groups[group], key=lambda f: _natural(f.unit_name))
        i = 0
        while i + 1 < len(convs):
            a, b = convs[i], convs[i + 1]
            ch = a.body[-1]
            if b.body[-2] != ch:
                i += 1
                continue
            _shard_conv_pair(st, a, b, len(a.body) - 1, len(b.body) - 2)
            i += 2


def _shard_conv_pair(st: _State, a: Facts, b: Facts, a_dim: int, b_dim: int, why: str = "") -> None:
    """Conv ``a`` (output channels, body dim ``a_dim``) feeding conv ``b`` (input channels, ``b_dim``)."""
    t_entry, t_size = st.tensor
    ch = a.body[a_dim]
    note = ""
    if t_size == 1:
        note = "no tensor axis in the mesh"
    elif ch < st.opts.min_channels:
        note = f"{ch} channels < min_channels={st.opts.min_channels}"
    elif ch % t_size:
        note = f"{ch} channels not divisible by {_axis(t_entry, t_size)}"
    pair = st.new_pair("conv", [a], [b], ch, not note, note)
    why = f"{why}; " if why else ""
    if note:
        for f, role in ((a, "channel"), (b, "input-channel")):
            st.put(f, (None,) * len(f.body), "replicate",
                   f"{role} of conv pair {pair.id}, but {note}: {why}tensor split skipped", pair.id)
        return
    spec_a = [None] * len(a.body)
    spec_a[a_dim] = t_entry
    spec_b = [None] * len(b.body)
    spec_b[b_dim] = t_entry
    st.put(a, spec_a, "channel",
           f"channel: {why}{ch} output channels split over {_axis(t_entry, t_size)}, feed "
           f"{_short(b.path)} (conv pair {pair.id})", pair.id)
    st.put(b, spec_b, "row",
           f"input-channel: {ch} input channels split over {_axis(t_entry, t_size)}, fed by "
           f"{_short(a.path)} (conv pair {pair.id}); one all-reduce per pass", pair.id)


def _embeddings(st: _State, todo: Sequence[Facts]) -> None:
    t_entry, t_size = st.tensor
    for f in todo:
        if f.kind != "embedding" or f.path in st.out or len(f.body) != 2:
            continue
        v, d = f.body
        if t_size == 1:
            continue
        if v % t_size == 0:
            st.put(f, (t_entry, None), "vocab",
                   f"vocab: {v} rows split over {_axis(t_entry, t_size)} (vocab-parallel lookup and tied logits)")
        elif d % t_size == 0:
            st.put(f, (None, t_entry), "vocab",
                   f"vocab: {v} rows not divisible by {t_size}, so the embedding dim {d} is split over "
                   f"{_axis(t_entry, t_size)} instead")


def _heads(st: _State, todo: Sequence[Facts], widths: set[int]) -> None:
    """Output projections to a vocab/classes: column over the tensor axis."""
    t_entry, t_size = st.tensor
    for f in todo:
        if f.kind != "dense" or f.path in st.out or len(f.body) != 2 or not HEAD.match(f.unit_name):
            continue
        d, v = f.body
        if t_size == 1 or (widths and d not in widths and v in widths):
            continue
        if v % t_size == 0:
            st.put(f, (None, t_entry), "column",
                   f"output head: {v} outputs split over {_axis(t_entry, t_size)} (vocab-parallel logits)")
        else:
            st.put(f, (None, None), "replicate",
                   f"output head: {v} outputs not divisible by {_axis(t_entry, t_size)}, kept whole")


def _biases(st: _State, todo: Sequence[Facts]) -> None:
    kernels = {}
    for f in todo:
        if f.name.lower() in ("kernel", "w", "weight") and f.path in st.out:
            kernels[f.unit] = f
    for f in todo:
        if f.kind != "bias" or f.path in st.out:
            continue
        k = kernels.get(f.unit)
        if k is None:
            continue
        p = st.out[k.path]
        kbody_spec = p.spec[k.stacked:]
        n = len(f.body)
        # The bias matches the kernel's trailing (output) dims.
        if n <= len(k.body) and tuple(k.body[-n:]) == tuple(f.body) and p.strategy in (
                "column", "heads", "channel", "vocab", "expert"):
            spec = tuple(kbody_spec[-n:])
            if k.kind == "expert" and n == 2:
                spec = (kbody_spec[0], kbody_spec[-1])
            if any(spec):
                st.put(f, spec, "column" if p.strategy != "channel" else "channel",
                       f"bias of {_short(k.path)} ({p.strategy}): split like its output dim", p.pair)
                continue
        st.put(f, (None,) * n, "replicate",
               f"bias of {_short(k.path)} ({p.strategy}): added after the reduction, so replicated", p.pair)


_LEFTOVER_REASON = {
    "norm": "norm parameter: tiny and needed whole by every device",
    "scalar": "scalar",
    "int": "integer/bool/PRNG-key leaf: never sharded",
    "state": "non-parameter collection (e.g. batch_stats): small, replicated",
    "recurrent": "recurrent kernel: a tensor split would need an all-gather at every time step",
    "router": "MoE router: small, every token needs all expert scores",
    "bias": "bias whose kernel is replicated",
    "conv": "conv outside a channel chain (stem/projection/patch)",
    "dense": "dense layer without a column/row partner in its block",
    "attention": "attention kernel without a partner",
    "embedding": "embedding whose dims do not divide the tensor axis",
    "expert": "expert tensor without a partner",
    "other": "small parameter outside the known layer patterns (class token, gate, scalar table)",
}


def _leftovers(st: _State, todo: Sequence[Facts]) -> None:
    for f in todo:
        if f.path not in st.out:
            reason = _LEFTOVER_REASON.get(f.kind, "no strategy applies")
            if f.kind == "embedding" and len(f.body) != 2:
                reason = "learned positional table: small and added to every token"
            if st.mesh.group(TENSOR)[1] == 1 and f.kind in ("dense", "attention", "conv", "embedding"):
                reason = f"{f.kind}: no tensor axis in the mesh"
            st.put(f, (None,) * len(f.body), "replicate", reason)


def _fsdp(st: _State, todo: Sequence[Facts]) -> None:
    f_entry, f_size = st.mesh.group(FSDP)
    if f_size == 1:
        return
    for f in todo:
        p = st.out[f.path]
        if f.leaf.numeric not in ("float", "complex") or f.kind in ("int", "state"):
            continue
        if f.leaf.nbytes < st.opts.fsdp_min_bytes:
            if p.strategy == "replicate":
                st.out[f.path] = Proposal(
                    p.spec, p.strategy,
                    p.reason + f"; below fsdp_min_bytes ({f.leaf.nbytes} < {st.opts.fsdp_min_bytes})", p.pair)
            continue
        taken = used_axes(p.spec)
        if taken & set(entry_axes(f_entry)):
            continue
        free = [d for d in range(f.stacked, len(f.leaf.shape))
                if p.spec[d] is None and f.leaf.shape[d] % f_size == 0]
        if not free:
            st.out[f.path] = Proposal(p.spec, p.strategy,
                                      p.reason + f"; no free dim divisible by {_axis(f_entry, f_size)} for fsdp",
                                      p.pair)
            continue
        dim = max(free, key=lambda d: (f.leaf.shape[d], -d))
        spec = list(p.spec)
        spec[dim] = f_entry
        strategy = "fsdp" if p.strategy == "replicate" else p.strategy + "+fsdp"
        st.out[f.path] = Proposal(
            tuple(spec), strategy,
            p.reason + f"; fsdp: dim {dim - f.stacked} ({f.leaf.shape[dim]}) split over "
            f"{_axis(f_entry, f_size)} (leaf {f.leaf.nbytes} B >= fsdp_min_bytes)", p.pair)
