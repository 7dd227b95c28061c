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

import re
from collections import defaultdict
from collections.abc import Iterable, Sequence

from tpflax._src.facts.classify import ATTN, COLUMN_NAMES, HEAD, POS_EMBED, ROW_NAMES, Facts
from tpflax._src.mesh import EXPERT, TENSOR, MeshShape
from tpflax._src.planner.builders import (
    Linear,
    Options,
    Proposal,
    State,
    axis_label,
    bias_follows,
    join_column,
    shard_conv_pair,
    shard_experts,
    shard_pair,
    short,
)
from tpflax._src.planner.decision import Pair
from tpflax._src.planner.leaf_groups import fsdp, shard_embedding, shard_output_head


def _natural(s: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def propose(facts: Sequence[Facts], mesh: MeshShape, opts: Options,
            skip: Iterable[str] = (), first_pair: int = 1,
            doubts: list[str] | None = None) -> tuple[dict[str, Proposal], list[Pair]]:
    """Propose a spec for every leaf not in ``skip`` (already decided by rules or annotations).

    ``doubts``, when given, collects the layers whose names and shapes disagreed.
    """
    st = State(mesh, opts, forced=set(skip), first_pair=first_pair)
    todo = [f for f in facts if f.path not in st.forced]
    widths, sure = _widths(facts)
    # Pairing looks at forced leaves too, so a forced partner still pairs its sibling.
    _pair_linears(st, facts, widths, sure)
    _experts(st, todo, widths)
    _conv_chains(st, todo)
    _embeddings(st, todo)
    _heads(st, todo, widths)
    _biases(st, todo)
    _leftovers(st, todo)
    fsdp(st, todo)
    if doubts is not None:
        doubts.extend(st.doubts)
    return st.out, st.pairs


# ---------------------------------------------------------------------------
# residual width and linear layout

def _widths(facts: Sequence[Facts]) -> tuple[set[int], bool]:
    """``(residual widths, sure)``: embedding dims and the most common norm width.

    Residual norms come twice per block (plus a final one); a norm inside the
    FFN (NormFormer-style) comes once, so the most common width is the residual.
    Sure when an embedding or two norms of one width say so.
    """
    widths = set()
    norms: dict[int, int] = defaultdict(int)
    for f in facts:
        if f.kind == "norm" and f.body and f.leaf.collection in ("", "params") and f.name == "scale":
            norms[f.body[-1]] += 1
        elif f.kind == "embedding" and len(f.body) == 2 and not POS_EMBED.search(f.unit_name):
            widths.add(f.body[-1])
    sure = bool(widths)
    if norms:
        top = max(norms.values())
        widths |= {w for w, n in norms.items() if n == top}
        sure = sure or top >= 2
    return widths, sure


def role_name(f: Facts) -> str:
    """The name that tells a layer's role: its own, or its parent's when its own is generic.

    >>> from tpflax._src.facts.tree import Leaf
    >>> leaf = Leaf("params/layer/attention/output/dense/kernel", (8, 8), "float32", 4)
    >>> role_name(Facts(leaf, "dense", 0, "params/layer/attention/output/dense", ""))
    'output'
    """
    name = f.unit_name
    if COLUMN_NAMES.match(name) or ROW_NAMES.match(name):
        return name
    parent = f.unit.rsplit("/", 2)[-2] if f.unit.count("/") >= 1 else ""
    # ``attention/output/dense``, ``intermediate/dense`` (BERT): the parent names the role.
    return parent if COLUMN_NAMES.match(parent) or ROW_NAMES.match(parent) else name


def _linear(f: Facts, siblings: Sequence[Facts], widths: set[int] = frozenset()) -> Linear:
    body = f.body
    name = role_name(f)
    if len(body) == 2:
        return Linear(f, (0,), (1,))
    if len(body) == 4:  # an einsum stack (n, heads, d, head_dim): n projections of d side by side
        return Linear(f, (2,), (1, 3), heads=1, role="column",
                      why=f"stacked ({body[0]}, heads, d, head_dim) projection of d={body[2]}")
    at = [i for i, n in enumerate(body) if n in widths]
    if len(at) == 1:  # the residual width says where d is, whatever the layout's name
        return [Linear(f, (0,), (1, 2), heads=1, role="column", why="layout (d, heads, head_dim)"),
                Linear(f, (1,), (0, 2), heads=0, role="column", why="einsum layout (heads, d, head_dim)"),
                Linear(f, (0, 1), (2,), heads=0, role="row", why="layout (heads, head_dim, d)")][at[0]]
    # 3-D DenseGeneral: (d, heads, head_dim) projects in, (heads, head_dim, d) projects out.
    if ROW_NAMES.match(name):
        return Linear(f, (0, 1), (2,), heads=0, role="row", why=f"'{name}' is an output projection")
    if COLUMN_NAMES.match(name):
        return Linear(f, (0,), (1, 2), heads=1, role="column", why=f"'{name}' is an input projection")
    for s in siblings:
        if s is not f and len(s.body) == 3 and s.body[1:] == body[:2]:
            return Linear(f, (0, 1), (2,), heads=0, role="row",
                           why=f"layout (heads, head_dim, d) mirrors {short(s.path)}")
    return Linear(f, (0,), (1, 2), heads=1, role="column", why="layout (d, heads, head_dim)")


def _assign_roles(lins: list[Linear], widths: set[int], sure: bool = False) -> None:
    """Decide column/row for 2-D kernels of one block, shapes first, names second."""
    for lin in lins:
        if lin.role is not None:
            continue
        name = role_name(lin.f)
        i, o = lin.in_size, lin.out_size
        named = "column" if COLUMN_NAMES.match(name) else ("row" if ROW_NAMES.match(name) else None)
        if widths and (i in widths) != (o in widths):
            by_shape = "column" if i in widths else "row"
            if named and named != by_shape and len(lin.f.body) == 2 and sure:
                # The name and the (in, out) reading disagree, and read (out, in) they
                # agree: a Conv1D-style kernel stored transposed. Orient it by shape, so
                # the split falls on its non-residual dim whichever way it is stored.
                lin.in_dims, lin.out_dims = (1,), (0,)
                lin.role = named
                lin.doubt = (f"'{name}' reads as {named} and its shape ({i}, {o}) has the residual width "
                             f"{sorted(widths)} on the {'output' if named == 'column' else 'input'} side: "
                             "taken as stored (out, in) (pass model= to trace it)")
                lin.why = (f"'{name}' is an {'input' if named == 'column' else 'output'} projection stored "
                           f"(out, in) = ({i}, {o})")
                continue
            if named and named != by_shape:
                # One norm of a width only (an FFN norm, NormFormer-style): the widths are
                # a guess, the name the safer witness; the trace settles it.
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
            lin.why = (f"({lin.in_size} -> {lin.out_size}) is mirrored by {short(mirror[0].f.path)}; "
                       f"the widening side is column")


def _pair_linears(st: State, todo: Sequence[Facts], widths: set[int], sure: bool) -> None:
    groups: dict[str, list[Facts]] = defaultdict(list)
    for f in todo:
        if f.kind in ("dense", "attention"):
            groups[f.group].append(f)
    loose: dict[str, list[Linear]] = defaultdict(list)
    for group in sorted(groups, key=_natural):
        members = groups[group]
        lins = [_linear(f, members, widths) for f in members]
        _assign_roles(lins, widths, sure)
        _pool(loose, group, _pair_group(st, group, lins))
    # Blocks whose layers sit in sibling subtrees (``attention/self/query`` with
    # ``attention/output/dense``, ``intermediate/dense`` with ``output/dense``): what a
    # block left unpaired meets its cousins one or two levels up, within the layer.
    for _ in range(2):
        up: dict[str, list[Linear]] = defaultdict(list)
        for group in sorted(loose, key=_natural):
            lins = loose[group]
            _assign_roles(lins, widths, sure)
            _pool(up, group, _pair_group(st, group, lins))
        loose = up


def _pool(loose: dict[str, list[Linear]], group: str, left: list[Linear]) -> None:
    """Move unpaired layers to the parent block, never above a layer index nor to the root."""
    last = group.rsplit("/", 1)[-1]
    parent = group.rsplit("/", 1)[0] if "/" in group else ""
    if left and "/" in parent and not _INDEX.match(last):
        loose[parent] += left


_INDEX = re.compile(r"^\D*?_?\d+$")


def _pair_group(st: State, group: str, lins: list[Linear]) -> list[Linear]:
    """Pair the columns and rows of one block; returns the layers left unpaired."""
    cols = [x for x in lins if x.role == "column" and not HEAD.match(x.f.unit_name)]
    rows = [x for x in lins if x.role == "row"]
    if not cols or not rows:
        return [x for x in lins if not HEAD.match(x.f.unit_name)]
    for lin in lins:
        if lin.doubt:
            st.doubts.append(f"{lin.f.path}: {lin.doubt}")
            lin.doubt = ""
    matched: dict[int, list[Linear]] = {id(r): [] for r in rows}
    for c in cols:
        fits = [r for r in rows if r.in_size == c.out_size]
        if fits:  # two MLPs in one block: a_up feeds a_down, not b_down; q_0 feeds o_0, not o_1
            best = max(fits, key=lambda r: (_common_prefix(r.f.unit_name, c.f.unit_name),
                                            _common_prefix(r.f.unit_name[::-1], c.f.unit_name[::-1])))
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
        claimed.add(id(row))
        kind = "attention" if row.f.kind == "attention" or ATTN.search(group) else "mlp"
        shard_pair(st, kind, mine, row)
    return [x for x in lins if id(x) not in claimed and not HEAD.match(x.f.unit_name)]


def _common_prefix(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---------------------------------------------------------------------------
# experts, convs, embeddings, heads

def _experts(st: State, todo: Sequence[Facts], widths: set[int]) -> None:
    groups: dict[str, list[Facts]] = defaultdict(list)
    for f in todo:
        if f.kind == "expert" and f.path not in st.out:
            groups[f.group].append(f)
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
                shard_experts(st, a, b, ea, y)
                for g in fs:  # gated experts: gate and up, both (E, d, f), feed the one down
                    if g is not a and g.body == a.body and g.path not in st.out:
                        join_column(st, g, a, f"also feeds {short(b.path)} (gated experts)")
    for f in todo:  # lone expert tensors: split the expert dim when possible
        if f.kind == "expert" and f.path not in st.out and e_size > 1 and f.body[0] % e_size == 0:
            st.put(f, (e_entry, None, None), "expert",
                   f"expert: {f.body[0]} experts split over {axis_label(e_entry, e_size)}")


_SKIP_CHAIN = re.compile(r"(proj|shortcut|downsample|skip|patch|stem|init|residual)", re.I)


def _conv_chains(st: State, todo: Sequence[Facts]) -> None:
    groups: dict[str, list[Facts]] = defaultdict(list)
    for f in todo:
        if f.kind == "conv" and f.path not in st.out and not _SKIP_CHAIN.search(f.unit_name):
            groups[f.group].append(f)
    for group in sorted(groups, key=_natural):
        convs = sorted(groups[group], key=lambda f: _natural(f.unit_name))
        i = 0
        while i + 1 < len(convs):
            a, b = convs[i], convs[i + 1]
            ch = a.body[-1]
            if b.body[-2] != ch:
                i += 1
                continue
            shard_conv_pair(st, a, b, len(a.body) - 1, len(b.body) - 2)
            i += 2


def _embeddings(st: State, todo: Sequence[Facts]) -> None:
    for f in todo:
        if f.kind == "embedding" and f.path not in st.out and len(f.body) == 2:
            shard_embedding(st, f, 0)


def _heads(st: State, todo: Sequence[Facts], widths: set[int]) -> None:
    """Output projections to a vocab/classes: column over the tensor axis.

    Known by name (``lm_head``...), or, whatever the name, by projecting the
    residual width onto as many outputs as the token embedding has rows (an
    untied output head).
    """
    vocabs = {f.body[0] for f in todo if f.kind == "embedding" and len(f.body) == 2
              and not POS_EMBED.search(f.unit_name) and f.body[1] in widths}
    for f in todo:
        if f.kind != "dense" or f.path in st.out or len(f.body) != 2:
            continue
        d, v = f.body
        if HEAD.match(f.unit_name):
            if widths and d not in widths and v in widths:
                continue  # it narrows back to the residual width: not the model's output
            shard_output_head(st, f, 1, f"output head: '{f.unit_name}' projects {d} -> {v}")
        elif d in widths and v in vocabs:
            shard_output_head(st, f, 1, f"output head: projects the residual width {d} onto {v} outputs, the "
                                        "token embedding's vocabulary")
        elif v in widths and d in vocabs:
            shard_output_head(st, f, 0, f"output head stored (vocab, d) = ({d}, {v}): {d} outputs, the token "
                                        "embedding's vocabulary")


def _biases(st: State, todo: Sequence[Facts]) -> None:
    kernels = {f.unit: f for f in todo if f.name.lower() in ("kernel", "w", "weight") and f.path in st.out}
    for f in todo:
        k = kernels.get(f.unit)
        if f.kind != "bias" or f.path in st.out or k is None:
            continue
        p = st.out[k.path]
        kbody = p.spec[k.stacked:]
        n = len(f.body)
        spec: tuple = (None,) * n
        # The bias matches the kernel's trailing (output) dims.
        if n <= len(k.body) and tuple(k.body[-n:]) == tuple(f.body):
            spec = (kbody[0], kbody[-1]) if k.kind == "expert" and n == 2 else tuple(kbody[-n:])
        bias_follows(st, f, spec, p, f"bias of {short(k.path)}")


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
    "expert": "expert tensor without a partner",
    "other": "small parameter outside the known layer patterns (class token, gate, scalar table)",
}


def _leftovers(st: State, todo: Sequence[Facts]) -> None:
    for f in todo:
        if f.path not in st.out:
            reason = _LEFTOVER_REASON.get(f.kind, "no strategy applies")
            if f.kind == "embedding" and len(f.body) != 2:
                reason = "learned positional table: small and added to every token"
            if st.mesh.group(TENSOR)[1] == 1 and f.kind in ("dense", "attention", "conv", "embedding"):
                reason = f"{f.kind}: no tensor axis in the mesh"
            st.put(f, (None,) * len(f.body), "replicate", reason)
