"""The linear-layer view of a block's kernels: residual width, layout and column/row role.

The tree heuristics (:mod:`tpflax._src.planner.heuristics`) pair what these
functions orient: which dims a kernel reads and writes (its layout, from the
residual width, names and siblings) and whether it widens the residual stream
(column) or narrows it back (row). Fused kernels (``query_key_value``,
``c_attn``: several projections side by side in one output dim) are found here
and given their block's output projection as partner.
"""

from __future__ import annotations

import functools
import itertools
import os
import re
from collections import defaultdict
from collections.abc import Callable, Sequence

from tpflax._src.facts.classify import (
    ATTN,
    COLUMN_NAMES,
    POS_EMBED,
    ROW_NAMES,
    Facts,
    _Names,
    fused_projection,
    projection_stack,
)
from tpflax._src.planner.builders import Linear, short


def residual_widths(facts: Sequence[Facts]) -> tuple[set[int], bool]:
    """``(residual widths, sure)``: embedding dims and the most common norm width.

    Residual norms come twice per block (plus a final one); a norm inside the
    FFN (NormFormer-style) comes once, so the most common width is the residual.
    Sure when an embedding or two norms of one width say so.
    """
    widths = set()
    norms: dict[int, int] = defaultdict(int)
    for f in facts:
        if _is_norm_scale(f):
            norms[f.body[-1]] += 1
        elif f.kind == "embedding" and len(f.body) == 2 and not POS_EMBED.search(f.unit_name):
            widths.add(f.body[-1])
    sure = bool(widths)
    if norms:
        top = max(norms.values())
        widths |= {w for w, n in norms.items() if n == top}
        sure = sure or top >= 2
    return widths, sure


def _is_norm_scale(f: Facts) -> bool:
    """A norm layer's trained scale: its last dim is the width the norm normalises."""
    return f.kind == "norm" and bool(f.body) and f.leaf.collection in ("", "params") and f.name == "scale"


def stage_widths(facts: Sequence[Facts], widths: set[int], sure: bool):
    """``group -> (widths, sure)``: the model's residual widths (:func:`residual_widths`) and its stage's.

    A model of several stages (a U-Net's levels, 64 then 128 channels wide; a Swin's or a ConvNeXt's stages)
    has a residual width per stage, and the model's commonest norm width is only the widest-spread one. A
    block's stage is the closest module above it holding two norms or more of one width (a transformer
    block's ``norm1``/``norm2``/``norm3``): their commonest width joins the model's for that block, so the
    128-wide level's GEGLU ``proj`` (128 -> 1024) widens its residual as the 64-wide level's does. A block
    whose own norms are all of one width, the narrower side of its dense kernels of that width (jax-models'
    ConvNeXt: ``stages00/norm`` beside ``stages00/pwconv1`` (32 -> 128) and ``pwconv2``, a module per block with
    no stage around it), adds that width; a norm over an MLP's hidden width (NormFormer's) does not.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def norm(path, w):
    ...     return Facts(Leaf(path + "/scale", (w,), "float32", 4), "norm", 0, path, path.rsplit("/", 1)[0])
    >>> fs = [norm(f"a/blk_{i}/norm{j}", 64) for i in range(2) for j in (1, 2)]
    >>> fs += [norm(f"mid/blk/norm{j}", 128) for j in (1, 2)]
    >>> fs += [norm(f"mid/blk/attn/{n}_norm", 16) for n in ("q", "k")]  # of the heads: not counted
    >>> of = stage_widths(fs, *residual_widths(fs))
    >>> of("a/blk_0/ff"), of("mid/blk/ff"), of("mid/blk/attn"), of("other")
    (({64}, True), ({64, 128}, True), ({64, 128}, True), ({64}, True))
    >>> def dense(path, shape):
    ...     return Facts(Leaf(path + "/kernel", shape, "float32", 4), "dense", 0, path, path.rsplit("/", 1)[0])
    >>> blk = [norm("stages00/norm", 32), dense("stages00/pwconv1", (32, 128)), dense("stages00/pwconv2", (128, 32))]
    >>> mlp = [norm("mlp/ffn_ln", 128), dense("mlp/up", (32, 128)), dense("mlp/down", (128, 32))]
    >>> of = stage_widths(fs + blk + mlp, *residual_widths(fs))
    >>> sorted(of("stages00")[0]), sorted(of("mlp")[0])
    ([32, 64], [64])
    """
    under: dict[str, dict[int, int]] = defaultdict(lambda: defaultdict(int))
    for f in facts:
        # an attention's own norms (query and key norms: Gemma's, Qwen3's) are of its heads, not of a residual
        if _is_norm_scale(f) and not ATTN.search(f.group.rsplit("/", 1)[-1]):
            parts = f.unit.split("/")
            for i in range(1, len(parts)):
                under["/".join(parts[:i])][f.body[-1]] += 1
    memo: dict[str, tuple[set[int], bool]] = {}
    kernels: dict[str, list[tuple[int, ...]]] = defaultdict(list)
    for f in facts:
        if f.kind == "dense" and len(f.body) == 2:
            kernels[f.group].append(tuple(f.body))

    def of(group: str) -> tuple[set[int], bool]:
        if group not in memo:
            memo[group] = (widths, sure)
            own = under.get(group, {})
            # the block's own norms, of one width (a ConvNeXt block's one LayerNorm), that its kernels widen from
            # (a norm over an MLP's hidden width, NormFormer's, is no residual's)
            if len(own) == 1 and (shapes := [b for b in kernels.get(group, ()) if set(own) & set(b)]) \
                    and all(min(b) in own for b in shapes):
                memo[group] = (widths | set(own), True)
                return memo[group]
            parts = group.split("/")
            for i in range(len(parts) - 1, 0, -1):  # from the block's parent: the stage around the block
                counts = under.get("/".join(parts[:i]), {})
                top = max(counts.values(), default=0)
                if top >= 2:
                    memo[group] = (widths | {w for w, n in counts.items() if n == top}, True)
                    break
        return memo[group]

    return of


_MLP_TAILS = ("w1", "w2", "w3", "gate_proj", "up_proj")


_FLAT_PATH = re.compile(r"^(?:attention_)?self_(query|key|value)$|^(?:attention_)?(output|intermediate)_dense$")


def role_name(f: Facts) -> str:
    """The name that tells a layer's role: its own, or its parent's when its own is generic.

    >>> from tpflax._src.facts.tree import Leaf
    >>> leaf = Leaf("params/layer/attention/output/dense/kernel", (8, 8), "float32", 4)
    >>> role_name(Facts(leaf, "dense", 0, "params/layer/attention/output/dense", ""))
    'output'
    >>> named = lambda unit: role_name(Facts(Leaf(unit + "/kernel", (8, 8), "float32", 4), "dense", 0, unit, ""))
    >>> named("params/moe/shared_w2"), named("params/attn/q_a_proj"), named("params/attn/query_key_value")
    ('w2', 'q_a_proj', 'query_key_value')
    >>> named("params/layer_0/attention_self_key"), named("params/layer_0/attention_output_dense")
    ('key', 'output')
    """
    unit = f.unit
    return _role_name(unit.rsplit("/", 1)[-1], unit.rsplit("/", 2)[-2] if "/" in unit else "")


@functools.lru_cache(maxsize=1 << 12)
def _role_name(name: str, parent: str) -> str:
    """:func:`role_name` of a unit named ``name`` in a module named ``parent``: a function of the two names, asked
    of every layer of every block by several role passes, so a deep stack's alike layers match the patterns once."""
    if COLUMN_NAMES.match(name) or ROW_NAMES.match(name):
        return name
    # ``attention/output/dense``, ``intermediate/dense`` (BERT): the parent names the role.
    if COLUMN_NAMES.match(parent) or ROW_NAMES.match(parent):
        return parent
    # a prefixed MLP name (``shared_w1``/``shared_w3``/``shared_w2`` beside routed experts, ``shared_up_proj``):
    # only these tails, which name nothing else; ``proj``, ``value`` or ``down_proj`` would rename MLA's
    # ``q_a_proj`` and ``q_down_proj`` and Falcon's ``query_key_value``
    tail = next((t for t in _MLP_TAILS if name.endswith("_" + t)), None)
    # BERT's module path flattened into one name (``attention_self_query``, ``attention_output_dense``,
    # ``intermediate_dense``, a port into one linen module): its role word, as the parent rule above reads it
    flat = _FLAT_PATH.search(name)
    return tail or (next(g for g in flat.groups() if g) if flat else name)


def linear_view(f: Facts, siblings: Sequence[Facts], widths: set[int] = frozenset()) -> Linear:
    body = f.body
    name = role_name(f)
    if len(body) == 2:
        return Linear(f, (0,), (1,))
    if len(body) == 4 and fused_projection(body):  # a fused DenseGeneral (d, n, heads, head_dim)
        return Linear(f, (0,), (1, 2, 3), heads=2, role="column",
                      why=f"fused (d, {body[1]}, heads, head_dim) projection of d={body[0]}")
    if len(body) == 4:  # an einsum stack, (n, heads, d, head_dim) or (n, d, heads, head_dim): n projections of d
        d_at, h_at, hd_at = projection_stack(body) or (2, 1, 3)
        layout = "heads, d" if h_at < d_at else "d, heads"
        return Linear(f, (d_at,), (h_at, hd_at), heads=h_at, role="column",
                      why=f"stacked ({body[0]}, {layout}, head_dim) projection of d={body[d_at]}")
    stacked = _stacked_matrix(f, siblings, widths)
    if stacked is not None:
        return stacked
    mirror = _mirrored(f, siblings)
    if mirror is not None:
        return mirror
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


def _mirrored(f: Facts, siblings: Sequence[Facts]) -> Linear | None:
    """A 3-D attention kernel oriented by its block's other 3-D kernels: q/k/v ``(d, heads, head_dim)`` end in
    the ``(heads, head_dim)`` the output ``(heads, head_dim, d)`` starts with. Only one way round holds; else
    None. It outranks the residual width, which misleads in a cross-attention whose context width equals
    head_dim (a U-Net's middle attention: q ``(128, 4, 32)`` from the image, k/v ``(32, 4, 32)`` from 32-wide
    text, out ``(4, 32, 128)``: 32 taken for d put q's d on its last dim and out's on its middle one).

    >>> from tpflax._src.facts.tree import Leaf
    >>> def facts(path, shape):
    ...     return Facts(Leaf(path, shape, "float32", 4), "dense", 0, path, "attn")
    >>> q, k, o = facts("a/q", (128, 4, 32)), facts("a/k", (32, 4, 32)), facts("a/o", (4, 32, 128))
    >>> [(x.in_dims, x.role) for x in (_mirrored(q, [q, k, o]), _mirrored(o, [q, k, o]))]
    [((0,), 'column'), ((0, 1), 'row')]
    """
    body = f.body
    others = [s.body for s in siblings if s is not f and len(s.body) == 3]
    col = any(b[:2] == body[1:] for b in others)
    row = any(b[1:] == body[:2] for b in others)
    if col == row:
        return None
    if col:
        return Linear(f, (0,), (1, 2), heads=1, role="column",
                      why="layout (d, heads, head_dim): its (heads, head_dim) start its block's output projection")
    return Linear(f, (0, 1), (2,), heads=0, role="row",
                  why="layout (heads, head_dim, d): its (heads, head_dim) end its block's input projections")


def _stacked_matrix(f: Facts, siblings: Sequence[Facts], widths: set[int]) -> Linear | None:
    """A 3-D kernel holding 2 or 3 projections of d stacked on one dim, beside its row partner; else None.

    Gemma's ``gating_einsum`` ``(2, d, f)`` (or ``(2, f, d)``, stored (out, in)) is gate and
    up stacked on a leading dim, MaxText's fused ``wi`` ``(d, 2, f)`` on a middle one; their
    block's 2-D ``(f, d)`` kernel narrows their output back to d. Like the ``(n, heads, d,
    head_dim)`` q/k/v stack, the stack dim is neither read nor written: each piece is a whole
    column of the pair, and the f dim splits. Read as ``(heads, d, head_dim)`` instead, the
    stack dim would be two "heads" and the row no partner. d is the residual width, or without
    one the narrower dim (a gated MLP widens). A genuine ``(heads, d, head_dim)`` attention
    kernel has no ``(head_dim, d)`` 2-D kernel beside it: its output projection is
    ``(heads, head_dim, d)`` or ``(heads * head_dim, d)``.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def facts(path, shape):
    ...     return Facts(Leaf(path, shape, "float32", 4), "dense", 0, path, "mlp")
    >>> gate, down = facts("mlp/gating_einsum", (2, 64, 256)), facts("mlp/linear", (256, 64))
    >>> lin = _stacked_matrix(gate, [gate, down], {64})
    >>> lin.in_dims, lin.out_dims, lin.role
    ((1,), (2,), 'column')
    """
    body = f.body
    if len(body) != 3:
        return None
    for k in (i for i, n in enumerate(body) if n in (2, 3)):
        a, b = (n for i, n in enumerate(body) if i != k)
        if a == b:
            continue
        d = (a if a in widths else b) if (a in widths) != (b in widths) else min(a, b)
        ffw = a + b - d
        rows = [s for s in siblings if s is not f and len(s.body) == 2 and s.body == (ffw, d)]
        if not rows:
            continue
        dims = [i for i in range(3) if i != k]
        d_at, f_at = dims if body[dims[0]] == d else dims[::-1]
        stored = "" if d_at < f_at else ", stored (out, in)"
        gated = " (gate and up)" if body[k] == 2 else ""
        return Linear(f, (d_at,), (f_at,), role="column",
                      why=f"{body[k]} projections of d={d} to {ffw} stacked on dim {k}{gated}{stored}, "
                          f"narrowed back by {short(rows[0].path)}")
    return None


def assign_roles(lins: list[Linear], widths: set[int], sure: bool = False) -> None:
    """Decide column/row for 2-D kernels of one block, shapes first, names second."""
    for lin in lins:
        if lin.role is not None:
            continue
        name = role_name(lin.f)
        i, o = lin.in_size, lin.out_size
        named = "column" if COLUMN_NAMES.match(name) else ("row" if ROW_NAMES.match(name) else None)
        if widths and (i in widths) != (o in widths):
            by_shape = "column" if i in widths else "row"
            # the name and the shape disagree, and a sibling pairs with it by its shape: unnamed, or named and agreeing
            turned = named and named != by_shape and len(lin.f.body) == 2
            partner = None
            if turned and _shape_pairs(lin, lins, widths, by_shape):
                partner = f"pairs by shape with an unnamed sibling as its {'row' if by_shape == 'column' else 'column'}"
            elif turned and _named_partner(lin, lins, widths, by_shape):
                partner = (f"{'widens' if by_shape == 'column' else 'narrows back'} exactly what its named sibling "
                           f"{'narrows' if by_shape == 'column' else 'widens'}")
            if partner is not None:
                lin.role = by_shape
                lin.doubt = (f"'{name}' reads as {named} but ({i} -> {o}) {partner}; going by the shape "
                             "(pass model= to trace it)")
                lin.why = _residual_why(by_shape, i, o)
                continue
            if turned and sure and not _like_its_query(lin, lins, widths):
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
            order = _call_order(lin, lins)
            # sure widths outvote linen's numbering, unless their reading makes the pair an MLP that narrows
            # its input while the numbering makes it widen: a mixer's token MLP, over the tokens, whose hidden
            # width is the model's (the norms' width is then not its residual)
            narrows = (i > o) if by_shape == "column" else (o > i)
            if order is not None and (not sure or (narrows and order[0] != by_shape)):
                lin.role, lin.why = order
                lin.doubt = (f"'{short(lin.f.path)}' ({i} -> {o}) taken as {order[0]} by linen's layer numbering; "
                             f"the norm widths {sorted(widths)} say {by_shape} (pass model= to trace it)")
                continue
            lin.role = by_shape
            lin.why = _residual_why(by_shape, i, o)
        elif COLUMN_NAMES.match(name):
            lin.role, lin.why = "column", f"'{name}' is an input projection ({i} -> {o})"
        elif ROW_NAMES.match(name):
            lin.role, lin.why = "row", f"'{name}' is an output projection ({i} -> {o})"
    _square_like_flipped(lins)
    _columns_of_a_named_row(lins)
    _columns_beside_named_columns(lins)
    _column_of_a_lone_row(lins, widths)
    _row_of_named_queries(lins)
    # Without widths or names, a kernel whose mirror image is in the block pairs by shape. One at the model's top
    # level between two residual widths maps one stream onto another (ALBERT's factorized embedding E -> H and its
    # MLM head's H -> E, the whole encoder between them): paired, the encoder's H-wide stream was split between
    # them, 1.36x the collectives of keeping both whole (XLA:CPU data=2,model=4). Inside a block the same widths
    # are a stage's MLP (Swin's first stage, 96 -> 384 -> 96, where 384 is a later stage's width)
    for lin in lins:
        if lin.role is not None or lin.in_size == lin.out_size or (
                "/" not in lin.f.group and {lin.in_size, lin.out_size} <= set(widths)):
            continue
        mirror = [m for m in lins if m is not lin and m.in_size == lin.out_size and m.out_size == lin.in_size]
        if mirror:
            lin.role = "column" if lin.in_size < lin.out_size else "row"
            lin.why = (f"({lin.in_size} -> {lin.out_size}) is mirrored by {short(mirror[0].f.path)}; "
                       f"the widening side is column")




def _residual_why(role: str, i: int, o: int) -> str:
    """Why a kernel ``(i -> o)`` with the residual width on one side only is a column (reads it) or a row (writes
    it): it widens or narrows that width as its shape says.

    >>> _residual_why("column", 64, 256), _residual_why("column", 64, 8)
    ('(64 -> 256) widens the residual width 64', '(64 -> 8) reads the residual width 64, narrowing it')
    >>> _residual_why("row", 256, 64), _residual_why("row", 8, 64)
    ('(256 -> 64) narrows back to the residual width 64', '(8 -> 64) writes the residual width 64, widening back to it')
    """
    if role == "column":
        return f"({i} -> {o}) widens the residual width {i}" if o > i else f"({i} -> {o}) reads the residual width {i}, narrowing it"
    return f"({i} -> {o}) narrows back to the residual width {o}" if i > o else \
        f"({i} -> {o}) writes the residual width {o}, widening back to it"


def _shape_pairs(lin: Linear, lins: list[Linear], widths: set[int], by_shape: str) -> bool:
    """Read as stored, ``lin`` pairs with an unnamed sibling that the widths orient the other way.

    A generic name can mislead: diffusers' GEGLU calls its input projection ``proj`` (a row name
    elsewhere), ``(d, 2f)``, and the ``(f, d)`` kernel after it is unnamed (``net_2``). Read as
    stored they are a fused column and its row; turned (out, in) the name's way, both would be rows
    and nothing would pair. A Conv1D-style tree stored (out, in) has no such sibling: its partner
    is named and turned too.
    """
    def oriented(m: Linear, role: str) -> bool:
        i, o = m.f.body
        return (i in widths) != (o in widths) and (i in widths) == (role == "column")

    other = "row" if by_shape == "column" else "column"
    for m in lins:
        if m is lin or len(m.f.body) != 2 or not oriented(m, other):
            continue
        name = role_name(m.f)
        if COLUMN_NAMES.match(name) or ROW_NAMES.match(name):
            continue
        col, row = (lin, m) if by_shape == "column" else (m, lin)
        if col.f.body[1] in {row.f.body[0] * k for k in (1, 2, 3)}:
            return True
    return False


def _named_partner(lin: Linear, lins: list[Linear], widths: set[int], by_shape: str) -> bool:
    """``lin``'s shape contradicts its name, and a sibling whose name and shape agree is its partner by shape.

    RWKV's channel-mix names its MLP ``key`` ``(d, 4d)`` and ``value`` ``(4d, d)``: both column names, but
    ``value`` narrows back to the residual width exactly the hidden ``key`` widens to, so it is the row. Left
    a (turned, Conv1D-style) column, nothing paired and the MLP stayed whole: 1.29x the bytes and 1.73x the
    flops of the hand layout (XLA:CPU data=2,model=4). A tree stored (out, in) turns every kernel, so there
    no named sibling's name agrees with its shape and this declines. An attention ``value`` is ``(d, d)`` or
    GQA ``(d, kv)``: its shape agrees with its name, or does not decide.
    """
    def reads(m: Linear) -> str | None:
        if len(m.f.body) != 2:
            return None
        i, o = m.f.body
        return None if (i in widths) == (o in widths) else ("column" if i in widths else "row")

    other = "row" if by_shape == "column" else "column"
    for m in lins:
        if m is lin or reads(m) != other:
            continue
        name = role_name(m.f)
        named = "column" if COLUMN_NAMES.match(name) else ("row" if ROW_NAMES.match(name) else None)
        if named != other:
            continue
        col, row = (lin, m) if by_shape == "column" else (m, lin)
        if col.f.body[1] == row.f.body[0] and col.f.body[0] == row.f.body[1]:
            return True
    return False


def _like_its_query(lin: Linear, lins: list[Linear], widths: set[int]) -> bool:
    """An unfused input projection as wide out as a sibling of its layer that reads the residual as stored:
    a key or value of a cross-attention reading a narrower input (a Perceiver's k/v ``(48, 64)`` beside its
    query ``(64, 64)``), which q . k needs as wide as the query, not a kernel stored (out, in).

    Not in a tree whose output projections are stored (out, in) (an ``o``/``down`` reading the residual
    width and writing another): there a GQA key ``(kv, d)`` beside its query ``(d, d)`` has that shape."""
    if FUSED_NAMES.match(role_name(lin.f)) or not COLUMN_NAMES.match(role_name(lin.f)):
        return False
    if any(len(m.f.body) == 2 and ROW_NAMES.match(role_name(m.f)) and m.f.body[0] in widths
           and m.f.body[1] not in widths for m in lins):  # as stored: an earlier kernel may be turned already
        return False
    parent = lin.f.unit.rsplit("/", 1)[0]
    return any(m is not lin and len(m.f.body) == 2 and m.f.unit.rsplit("/", 1)[0] == parent and m.in_dims == (0,)
               and COLUMN_NAMES.match(role_name(m.f)) and m.in_size in widths and m.out_size == lin.out_size
               for m in lins)


_AUTO_NAME = re.compile(r"^(?P<kind>[A-Za-z]\w*?)_(?P<n>\d+)$")


def _call_order(lin: Linear, lins: list[Linear]) -> tuple[str, str] | None:
    """``(role, why)`` from linen's automatic names, for a kernel whose mirror is its auto-named sibling.

    Linen names unnamed layers ``Dense_0``, ``Dense_1``... in the order they are
    created, which is the order they are called when each layer is its own
    statement (``h = nn.Dense(f)(x)``); of two mirrored kernels (``i -> o`` and
    ``o -> i``) the one called first produces the other's input: it is the
    column. A nested expression (``nn.Dense(d)(nn.Dense(f)(x))``) creates the
    outer layer first, so this stays a guess with a doubt (the trace settles it).
    None without such a sibling.
    """
    me = _AUTO_NAME.match(lin.f.unit_name)
    if me is None or lin.in_size == lin.out_size:
        return None
    parent = lin.f.unit.rsplit("/", 1)[0]
    for other in lins:
        it = _AUTO_NAME.match(other.f.unit_name)
        if (other is lin or it is None or it["kind"] != me["kind"] or other.f.unit.rsplit("/", 1)[0] != parent
                or (other.in_size, other.out_size) != (lin.out_size, lin.in_size)):
            continue
        first = int(me["n"]) < int(it["n"])
        return ("column" if first else "row",
                f"({lin.in_size} -> {lin.out_size}) is created {'before' if first else 'after'} its mirror "
                f"{short(other.f.path)} (linen numbers unnamed layers in creation order, which is call order "
                "for a layer per statement)")
    return None


NUMBERED = re.compile(r"^(?P<stem>[A-Za-z_]\w*?)_?(?P<n>\d+)$")


def numbered_chain(lins: list[Linear]) -> None:
    """A block of two unoriented 2-D kernels, numbered siblings whose widths chain: column -> row (of three or
    more chained in their numbers' order, the first two).

    A LLaVA projector (``linear_1`` ``(d_v, d_t)``, GELU, ``linear_2`` ``(d_t, d_t)``) sits alone in its
    block between two towers: neither names nor the residual widths orient it (both its widths may be
    residual widths, of the two towers). The layer writing the width the other reads is the column of a
    Megatron pair, which the chooser prices against keeping both whole. Where the widths chain both ways
    (square), the author's numbers are the call order (with a doubt); linen's auto-names (``Dense_0``)
    number creation, which a nested ``Dense(d)(gelu(Dense(d)(x)))`` reverses: those are left alone.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(name, shape):
    ...     path = f"p/{name}/kernel"
    ...     return Linear(Facts(Leaf(path, shape, "float32", 4), "dense", 0, path[:-7], "p"), (0,), (1,))
    >>> a, b = lin("linear_1", (48, 64)), lin("linear_2", (64, 64))
    >>> numbered_chain([b, a])
    >>> a.role, b.role
    ('column', 'row')
    """
    two = [x for x in lins if len(x.f.body) == 2 and x.role is None]
    if len(lins) < 2 or len(two) != len(lins):
        return
    names = [NUMBERED.match(x.f.unit_name) for x in two]
    if None in names or len({m["stem"] for m in names}) != 1:
        _towers(two, names)
        return
    if len({m["n"] for m in names}) != len(names):
        return
    chain = [x for _, x in sorted(zip((int(m["n"]) for m in names), two, strict=True), key=lambda nx: nx[0])]
    if len(chain) > 2:
        # a sequential MLP of numbered layers (NetKet's ``MLP``: ``Dense_0`` (n, h) -> ``Dense_1`` (h, h) ->
        # ``Dense_2`` (h, 1)): the widths chain in the numbers' order and not backwards; its first two layers
        # are a column and a row, the others left to themselves
        steps = list(itertools.pairwise(chain))
        if any(x.out_size != y.in_size for x, y in steps) or all(y.out_size == x.in_size for x, y in steps):
            return
    what = "two chained layers alone in their block (a projector)" if len(lins) == 2 else \
        f"{len(lins)} numbered layers chained in their numbers' order (a sequential MLP)"
    a, b = chain[:2]
    both = a.out_size == b.in_size and b.out_size == a.in_size
    if both and _AUTO_NAME.match(a.f.unit_name) and a.f.unit_name[0].isupper():
        return  # linen's auto-names number creation, not calls: a nested ``Dense(d)(Dense(d)(x))`` is reversed
    if not both and b.out_size == a.in_size:
        a, b = b, a  # the widths chain one way only: they, not the numbers, say which reads which
    if a.out_size != b.in_size:
        return
    a.role, b.role = "column", "row"
    by = "numbered before" if both else "writing the input width of"
    a.why = f"({a.in_size} -> {a.out_size}) {by} {short(b.f.path)} ({b.in_size} -> {b.out_size}): the first of {what}"
    b.why = f"({b.in_size} -> {b.out_size}) reads the output of {short(a.f.path)}"
    if b.out_size == a.in_size:
        a.doubt = (f"'{short(a.f.path)}' and '{short(b.f.path)}' chain both ways; taken in their numbering's "
                   "order (pass model= to trace it)")


def _towers(two: list[Linear], names: list[re.Match | None]) -> None:
    """Several numbered MLPs side by side in one block (a PPO actor-critic's ``actor_0``, ``actor_1`` beside
    ``critic_0``, ``critic_1``, each tower's unnumbered head ``actor_head``, ``critic_head`` beside them): where
    two or more families' widths chain one way in their numbers' order, each is a sequential MLP, its first two
    layers a column and a row, as :func:`numbered_chain` makes a block of one family; one such family beside
    unnumbered layers is left alone (DiT's small timestep MLP ``t_mlp_0``, ``t_mlp_1`` beside its
    ``final_adaLN``: tests/test_patterns.py); the unnumbered layers (the heads) are left to themselves. Square steps (``q_0``, ``q_1`` of two layers' attentions) chain
    both ways at every step: their numbers index layers, not steps, and that family is left alone.

    Review w12: a PPO actor-critic's two tanh towers were left whole by the tree, 3.63x the bytes, 2.39x the
    collectives and 3.63x the flops per device of the Megatron hand layout (data=2,model=4; the traced plan
    splits them as the hand does).
    """
    fams: dict[str, dict[int, Linear]] = {}
    for x, m in zip(two, names, strict=True):
        if m is not None:
            fam = fams.setdefault(m["stem"], {})
            if int(m["n"]) in fam:
                return  # one number twice in a family (``a_1`` and ``a1``): not a sequence
            fam[int(m["n"])] = x
    chains = []
    for fam in fams.values():
        chain = [fam[n] for n in sorted(fam)]
        steps = list(itertools.pairwise(chain))
        if steps and all(x.out_size == y.in_size for x, y in steps) and not all(
                y.out_size == x.in_size for x, y in steps):
            chains.append(chain)
    if len(chains) < 2:
        return  # one numbered MLP beside other layers (DiT's t_mlp_0, t_mlp_1 beside final_adaLN): left alone
    for chain in chains:
        a, b = chain[:2]
        a.role, b.role = "column", "row"
        a.why = (f"({a.in_size} -> {a.out_size}) writing the input width of {short(b.f.path)} ({b.in_size} -> "
                 f"{b.out_size}): the first of {len(chain)} numbered layers chained in their numbers' order (a "
                 "sequential MLP beside others in its block)")
        # the tree knows names and widths, not dataflow: two inputs embedded side by side chain the same way
        b.why = (f"({b.in_size} -> {b.out_size}) numbered after {short(a.f.path)} and reading the width it writes "
                 f"({a.out_size}): taken as reading its output by names and widths alone")
        a.doubt = (f"'{short(a.f.path)}' and '{short(b.f.path)}' taken as one MLP's column and row by their numbers "
                   "and widths alone (pass model= to trace it)")


GATE_NAMES = _Names(r"^gate$")


def gate_beside_its_row(lins: list[Linear]) -> Linear | None:
    """A block's lone ``gate`` that multiplies its row's output rather than feeding the row: taken out of the
    block's roles (returned, role None, to be kept whole); the unplaced kernels shaped as the row's columns become them.
    Beside exactly one such kernel it is a square GLU's gate: that kernel is made a column beside it and None is
    returned.

    A column pairs with a row only if the row reads its output. A gated MLP's ``gate`` does (``down(silu(gate(x))
    * up(x))``), and has a named input projection beside it (``up``, or the attention's ``q``/``k``/``v`` before a
    gated attention's output); a gate as wide in and out as the block's square row writes the width the row writes
    too, and beside only unnamed kernels of the row's column shape, two or more (a square GLU has one: its up
    projection under a name the tables lack, ``lin``, a column beside the gate), it gates the row's output (AlphaFold's triangle
    update: ``out(norm(einsum(a_gate * a_proj, b_gate * b_proj))) * sigmoid(gate(z))``). Paired as the column, its
    split output met the row's whole one: XLA split the pair stream behind it and gathered it at every later reader
    (the Evoformer's tree plan: 1.18x the hand layout's collectives, data=2,model=4); the trace pairs the unnamed
    kernels with the row and keeps the gate whole. Square shapes cannot tell the two apart (a gated MLP widens, so
    its gate writes another width than its row), so the names decide, with a doubt; ``model=`` traces it.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, role=None):
    ...     f = Facts(Leaf(path, (8, 8), "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> a, b = lin("b/a_proj/kernel"), lin("b/b_proj/kernel")
    >>> g, out = lin("b/gate/kernel", "column"), lin("b/out/kernel", "row")
    >>> gate_beside_its_row([a, b, g, out]) is g, a.role, g.role
    (True, 'column', None)
    >>> up = lin("b/up/kernel", "column")
    >>> g.role = "column"; a.role = b.role = None
    >>> gate_beside_its_row([a, b, g, up, out]) is None  # a named input projection beside the gate: a gated MLP
    True
    >>> gate_beside_its_row([a, g, out]) is None, a.role  # one unnamed kernel beside it: a square GLU's up
    (True, 'column')
    """
    rows = [x for x in lins if x.role == "row"]
    cols = [x for x in lins if x.role == "column"]
    if len(rows) != 1 or len(cols) != 1:
        return None
    row, gate = rows[0], cols[0]
    if not (len(row.f.body) == 2 and ROW_NAMES.match(role_name(row.f)) and len(gate.f.body) == 2
            and GATE_NAMES.match(role_name(gate.f)) and not ATTN.search(gate.f.unit)):
        return None
    if not (row.in_size == row.out_size == gate.in_size == gate.out_size):
        return None  # a gate writing the width the row reads and not the one it writes: a gated MLP's gate
    inputs = [x for x in lins if x.role is None and len(x.f.body) == 2
              and (x.in_size, x.out_size) == (row.out_size, row.in_size)]
    if len(inputs) == 1:
        # one unnamed kernel beside the gate: a square GLU's up-projection under a name the tables do not know
        # (``lin``); the gate is the row's column and so is it (the triangle update has four: a/b proj and gate)
        x = inputs[0]
        x.role = "column"
        x.why = (f"({x.in_size} -> {x.out_size}) feeds {short(row.f.path)}, the block's one row by name, beside "
                 f"{short(gate.f.path)}, the gated MLP's gate (pass model= to trace it)")
        return None
    for x in inputs:
        x.role = "column"
        x.why = (f"({x.in_size} -> {x.out_size}) feeds {short(row.f.path)}, the block's one row by name, beside "
                 f"{short(gate.f.path)}, which gates the row's output (pass model= to trace it)")
    gate.role = None
    gate.why = (f"'{gate.f.unit_name}' ({gate.in_size} -> {gate.out_size}) is the block's only named input projection, "
                f"as wide in and out as its row {short(row.f.path)} and beside unnamed kernels shaped as that row's "
                f"columns ({', '.join(short(x.f.path) for x in inputs)}): taken for a gate multiplying the row's "
                "output, not one of its inputs; kept whole, outside the pair (pass model= to trace it)")
    gate.doubt = (f"'{short(gate.f.path)}' taken for a gate on the output of {short(row.f.path)}, not its column "
                  "(pass model= to trace it)")
    return gate


def _columns_of_a_named_row(lins: list[Linear]) -> None:
    """A block whose names place one row and nothing places a column: its unplaced kernels that read
    the width the row writes and write the width it reads are its columns.

    Square kernels cannot be oriented by shape, and names like ``linear_x``/``linear_y`` say nothing;
    beside ``linear_out`` (Griffin's recurrent block, lru width = model width) they are what the row
    narrows back. Left unplaced, the whole block stayed replicated (1.5x the hand layout's bytes and
    flops on RecurrentGemma); a wrong guess costs collectives, never correctness, and model= traces it.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, role=None):
    ...     f = Facts(Leaf(path, (8, 8), "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> x, out = lin("b/linear_x/kernel"), lin("b/linear_out/kernel", "row")
    >>> _columns_of_a_named_row([x, out]); x.role
    'column'
    """
    rows = [x for x in lins if x.role == "row" and ROW_NAMES.match(role_name(x.f))]
    if len(rows) != 1 or any(x.role == "column" for x in lins):
        return
    _flipped_columns(lins, rows[0], lambda lin, row: (
        f"({lin.in_size} -> {lin.out_size}) feeds {short(row.f.path)}, the block's one row by name "
        "(pass model= to trace it)"))


def _columns_beside_named_columns(lins: list[Linear]) -> None:
    """A block of one named row and two or more named columns shaped as it flipped: its unplaced kernels of that
    same shape are columns too.

    RWKV's time-mix names ``key`` and ``value`` ``(d, d)`` and ``output`` ``(d, d)``; its ``receptance`` ``(d, d)``
    gates the per-channel recurrence of the two before the row reads it, a column like them (the hand layout's).
    Left unplaced it stayed whole beside the split pair: its gate's output gathered and its input gradient
    summed every layer. Square kernels cannot be oriented by shape; beside named columns of the same shape and
    the row they feed, the guess costs collectives at worst, and ``model=`` traces it.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, role=None):
    ...     f = Facts(Leaf(path, (8, 8), "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> k, v, r = lin("b/key/kernel", "column"), lin("b/value/kernel", "column"), lin("b/receptance/kernel")
    >>> _columns_beside_named_columns([k, v, r, lin("b/output/kernel", "row")]); r.role
    'column'
    """
    rows = [x for x in lins if x.role == "row" and ROW_NAMES.match(role_name(x.f))]
    if len(rows) != 1:
        return
    row = rows[0]
    shape = (row.out_size, row.in_size)
    cols = [x for x in lins if x.role == "column" and len(x.f.body) == 2 and COLUMN_NAMES.match(role_name(x.f))]
    if len(cols) < 2 or any((x.in_size, x.out_size) != shape for x in cols):
        return
    names = " and ".join(short(x.f.path) for x in cols[:2])
    _flipped_columns(lins, row, lambda lin, row: (
        f"({lin.in_size} -> {lin.out_size}) beside the named columns {names} of the same shape, feeding "
        f"{short(row.f.path)}, the block's one row by name (pass model= to trace it)"))


_QKV = re.compile(r"^(q|k|v|query|key|value|q_proj|k_proj|v_proj|wq|wk|wv)$", re.I)


def _row_of_named_queries(lins: list[Linear]) -> None:
    """A block whose query, key and value are named and no row reads what they write: its one unplaced
    kernel reading that width and writing theirs is their output projection, whatever its name (ALBERT's
    attention ``dense``, in one module with ``query``/``key``/``value`` and the MLP's ``ffn``/``ffn_output``).
    Left unplaced, the attention stayed whole (1.42x the hand layout's bytes, 1.76x its flops, XLA:CPU
    data=2,model=4); ``model=`` traces it.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> q, k, dense = lin("b/query/kernel", (8, 8), "column"), lin("b/key/kernel", (8, 8), "column"), lin("b/dense/kernel", (8, 8))
    >>> up, down = lin("b/ffn/kernel", (8, 32), "column"), lin("b/ffn_output/kernel", (32, 8), "row")
    >>> _row_of_named_queries([q, k, dense, up, down]); dense.role
    'row'
    """
    qkv = [x for x in lins if x.role == "column" and _QKV.match(role_name(x.f)) and len(x.f.body) == 2]
    if len(qkv) < 2 or len({(x.in_size, x.out_size) for x in qkv}) != 1:
        return
    d, inner = qkv[0].in_size, qkv[0].out_size
    if any(x.role == "row" and x.in_size == inner for x in lins):
        return
    readers = [x for x in lins if x.role is None and len(x.f.body) == 2 and (x.in_size, x.out_size) == (inner, d)]
    if len(readers) != 1:
        return
    row = readers[0]
    row.role = "row"
    row.why = (f"({row.in_size} -> {row.out_size}) reads what {', '.join(short(x.f.path) for x in qkv)} write, "
               "the block's one such kernel: their output projection")
    row.doubt = (f"'{short(row.f.path)}' taken as the output projection of the block's named query, key and value "
                 "(pass model= to trace it)")


def _column_of_a_lone_row(lins: list[Linear], widths: set[int]) -> None:
    """A block whose widths place one row and nothing else: its one unplaced 2-D kernel writing the width the
    row reads is the row's column, whatever it reads (a GNN's edge MLP reads the concatenation of its nodes'
    features, ``l1`` ``(3d, f)``, whose width is no residual width; ``l2`` ``(f, d)`` narrows back to the norm's
    width). Left unplaced, both stayed whole (1.7x the hand layout's bytes, 3.8x its flops); ``model=`` traces it.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> l1, l2 = lin("b/l1/kernel", (192, 128)), lin("b/l2/kernel", (128, 64), "row")
    >>> _column_of_a_lone_row([l1, l2], {64}); l1.role
    'column'

    A row placed by its name alone is not enough: diffusers' GEGLU calls its input projection ``proj``.
    """
    rows = [x for x in lins if x.role == "row"]
    if len(rows) != 1 or any(x.role is not None and x is not rows[0] for x in lins):
        return
    row = rows[0]
    if not (row.out_size in widths and row.in_size not in widths):
        return  # placed by its name, not by the widths
    writers = [x for x in lins if x.role is None and len(x.f.body) == 2 and x.out_size == row.in_size]
    if len(writers) != 1 or len([x for x in lins if x.role is None]) != 1:
        return
    col = writers[0]
    col.role = "column"
    col.why = (f"({col.in_size} -> {col.out_size}) writes the input width of {short(row.f.path)} "
               f"({row.in_size} -> {row.out_size}), the block's one row")
    col.doubt = (f"'{short(col.f.path)}' taken as the column of {short(row.f.path)}, which the widths place: the "
                 "one kernel of the block writing the width it reads (pass model= to trace it)")


def _flipped_columns(lins: list[Linear], row: Linear, why: Callable[[Linear, Linear], str]) -> None:
    """Unplaced 2-D linears of the block shaped like ``row`` flipped, ``(row out, row in)``, become its columns."""
    for lin in lins:
        if lin.role is None and len(lin.f.body) == 2 and (lin.in_size, lin.out_size) == (row.out_size, row.in_size):
            lin.role = "column"
            lin.why = why(lin, row)


def _square_like_flipped(lins: list[Linear]) -> None:
    """Square kernels of a block whose other kernels are stored (out, in) are stored so too.

    A square ``(d, d)`` kernel cannot be oriented by its shape; a Conv1D-style
    model (GPT-2's ``c_attn``/``c_proj``) stores every kernel alike, so the
    block's oriented kernels say how.
    """
    flipped = [x for x in lins if len(x.f.body) == 2 and x.in_dims == (1,) and x.in_size != x.out_size]
    if not flipped:
        return
    for lin in lins:
        if len(lin.f.body) == 2 and lin.in_dims == (0,) and lin.in_size == lin.out_size:
            lin.in_dims, lin.out_dims = (1,), (0,)
            lin.why += f"; stored (out, in) like {short(flipped[0].f.path)}"


FUSED_NAMES = _Names(r"^(qkv|query_key_value|c_attn|wqkv|w_pack|in_proj|qkv_proj|fused_qkv|kv|kv_proj|wkv|"
                     r"gate_up|gate_up_proj|w13)$")
# a name that says the kernel is an attention's query (GQA narrows keys and values, never it)
QUERY_NAMES = _Names(r"^(q|query|wq|q_proj)$")
KEY_NAMES = _Names(r"^(k|key|wk|k_proj)$")
VALUE_NAMES = _Names(r"^(v|value|wv|v_proj)$")
# a name that says the kernel is one projection (a query, key or value): never fused by shape (a DQN's ``q_net``
# head, whose output is twice the model input's width, is no fused q/k/v pair with the input layer)
ONE_PROJECTION = _Names("|".join(n.rx.pattern for n in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES)))


def named_attention(cols: Sequence[Linear]) -> tuple[Linear, ...]:
    """The 2-D columns of a block named as an attention's query, key and value (``q``/``k``/``v``,
    ``query``/``key``/``value``, ``q_proj``..., ``wq``...), when the block has all three; else ``()``.

    Their block is an attention whatever its scope's name: a model whose ``q``, ``k``, ``v`` and ``o`` sit at its top
    level or in a module named as nothing :data:`ATTN` knows. A GQA's key and value, narrower than the output
    projection's input, then join the query's pair as they do under an ``attn`` scope: left out, the estimate
    priced them as lone whole layers (12 query and 6 key/value heads on model=4: their gradients split in 4
    pieces where XLA lays them out in 2 head groups, the repeated key/value's gradient gathers unpriced, 0.896 of
    the compiled collectives).

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(name, shape=(48, 48)):
    ...     return Linear(Facts(Leaf(f"params/{name}/kernel", shape, "float32", 4), "dense", 0, f"params/{name}",
    ...                         "params"), (0,), (1,), role="column")
    >>> [short(c.f.path) for c in named_attention([lin("q"), lin("k", (48, 24)), lin("v", (48, 24))])]
    ['q/kernel', 'k/kernel', 'v/kernel']
    >>> named_attention([lin("key"), lin("value"), lin("receptance")])  # RWKV's time-mix: no query
    ()
    """
    named = tuple(c for c in cols if len(c.f.body) == 2 and c.pieces == 1
                  and any(n.match(role_name(c.f)) for n in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES)))
    if all(any(n.match(role_name(c.f)) for c in named) for n in (QUERY_NAMES, KEY_NAMES, VALUE_NAMES)):
        return named
    return ()


def fused_partners(lins: list[Linear]) -> None:
    """Pair a fused kernel ``(d, k*p)`` (k = 2 or 3) with its block's output projection ``(p, d)``.

    A fused kernel (``query_key_value``, ``c_attn``, ``Wqkv``...) holds k
    projections side by side in its output dim, and the model cuts that output
    into k pieces after the matmul, so no kernel of the block reads all ``k*p``
    features and the usual ``out == in`` match finds no row. Its partner is the
    kernel that projects one piece's width ``p`` back to the residual width ``d``.
    Splitting the fused dim contiguously and the partner's input alike is a
    Megatron pair whatever the layout; a ``(heads, k, head_dim)`` layout
    (BLOOM) is head-aligned, a ``[q|k|v]`` one is resharded by XLA after the cut.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "a")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> qkv, out = lin("a/query_key_value/kernel", (64, 192), "column"), lin("a/dense/kernel", (64, 64))
    >>> fused_partners([qkv, out])
    >>> qkv.pieces, out.role
    (3, 'row')
    """
    for c in lins:
        if c.role != "column" or len(c.f.body) != 2 or any(r.role == "row" and r.in_size == c.out_size
                                                          for r in lins):
            continue
        fits = [m for m in lins if m is not c and len(m.f.body) == 2 and m.role != "column"
                and m.out_size == c.in_size and c.out_size % m.in_size == 0 and c.out_size // m.in_size in (2, 3)]
        # a q/k/v name means three pieces: (d, 2d) is GQA's [d, d/2, d/2] before it is two equal projections
        if (not fits or QKV_NAMES.match(role_name(c.f))) and _grouped_qkv(c, lins):
            continue
        # Several layers in one flat block (``attn_0``, ``proj_0``, ``attn_1``...): the closest name.
        fits.sort(key=lambda m: _affinity(m.f.unit_name, c.f.unit_name), reverse=True)
        name = role_name(c.f)
        if ONE_PROJECTION.match(name) and not FUSED_NAMES.match(name):
            continue
        if len(fits) > 1 and not FUSED_NAMES.match(name) and \
                _affinity(fits[0].f.unit_name, c.f.unit_name) == _affinity(fits[1].f.unit_name, c.f.unit_name):
            # no name says fused and none is closer: shapes alone (UViT's output head (d, 256) at the root beside
            # its two long-skip projections (2d, d), d = 64) cannot tell a partner from a coincidence
            continue
        for m in fits[:1]:
            k = c.out_size // m.in_size
            by = f"'{name}' names a fused kernel" if FUSED_NAMES.match(name) else "by shape"
            c.pieces = k
            c.cut = (m.in_size,) * k
            stored = "; stored (out, in)" if c.in_dims == (1,) else ""
            c.why = (f"fused ({by}): ({c.in_size} -> {c.out_size}) holds {k} projections of {m.in_size} side by "
                     f"side, cut apart after the matmul; the fused dim is split contiguously, which keeps whole "
                     f"heads on each rank only for a (heads, {k}, head_dim) layout (BLOOM): a [q|k|v] layout is "
                     f"resharded by XLA after the cut (pass model= to trace it){stored}")
            if m.role is None:
                m.role = "row"
                m.why = (f"({m.in_size} -> {m.out_size}) projects one piece of the fused {short(c.f.path)} back "
                         "to the residual width")


QKV_NAMES = _Names(r"^(qkv|query_key_value|c_attn|wqkv|w_pack|qkv_proj|fused_qkv)$")


def _grouped_qkv(c: Linear, lins: list[Linear]) -> bool:
    """A fused q/k/v kernel of grouped-query or multi-query attention, ``(d, d + 2 kv)``, beside its output
    projection ``(d, d)``: paired as a column cut into ``[d, kv, kv]`` (whatever its layout: Falcon's per-group
    ``[q_1..q_R k v]``, ChatGLM's and Phi-3's ``[q | k | v]``, split over the fused dim contiguously, XLA
    resharding the pieces after the cut, as the traced planner splits it); the output projection is its row
    (:func:`gqa_fit`). Only a name that says q/k/v (``query_key_value``, ``qkv_proj``, ``wqkv``...) makes one:
    the pieces are no equal multiple of the row's input, so the shapes alone say nothing.

    Review_w W04: Falcon's ``query_key_value`` (Falcon-7B's one kv head, d + 2 head_dim; 40B's kv groups) was
    "dense layer without a column/row partner" from the tree, the attention whole on every tensor rank:
    1.37-1.39x the bytes and 1.55-1.58x the flops per device of the hand layout (data=2,model=4).

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "a")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> qkv, out = lin("a/query_key_value/kernel", (128, 160), "column"), lin("a/dense/kernel", (128, 128))
    >>> fused_partners([qkv, out])
    >>> qkv.cut, out.role, gqa_fit(qkv, out)
    ((128, 16, 16), 'row', True)
    >>> qkv, out = lin("a/query_key_value/kernel", (128, 256), "column"), lin("a/dense/kernel", (128, 128))
    >>> fused_partners([qkv, out])  # K/V heads half the query heads: (d, 2d), three pieces, not two
    >>> qkv.cut, qkv.pieces, out.role, gqa_fit(qkv, out)
    ((128, 64, 64), 1, 'row', True)
    """
    name = role_name(c.f)
    if not QKV_NAMES.match(name):
        return False
    fits = [m for m in lins if m is not c and len(m.f.body) == 2 and m.role in (None, "row")
            and m.out_size == c.in_size and m.in_size < c.out_size < 3 * m.in_size
            and (c.out_size - m.in_size) % 2 == 0 and m.in_size % ((c.out_size - m.in_size) // 2) == 0]
    if len(fits) != 1:
        return False
    m = fits[0]
    d, kv = m.in_size, (c.out_size - m.in_size) // 2
    c.cut = (d, kv, kv)
    stored = "; stored (out, in)" if c.in_dims == (1,) else ""
    c.why = (f"fused ('{name}' names a fused q/k/v kernel): ({c.in_size} -> {c.out_size}) holds the queries ({d}) "
             f"and grouped keys and values ({kv} each) side by side, cut apart after the matmul; the fused dim is "
             f"split contiguously and XLA reshards the pieces after the cut (pass model= to trace it){stored}")
    if m.role is None:
        m.role = "row"
        m.why = (f"({m.in_size} -> {m.out_size}) projects the attention output of the fused {short(c.f.path)} back "
                 "to the residual width")
    return True


def gqa_fit(c: Linear, r: Linear) -> bool:
    """Whether ``c`` is a fused grouped q/k/v kernel whose attention output ``r`` projects (:func:`_grouped_qkv`)."""
    return len(c.cut) == 3 and c.cut[1] == c.cut[2] < c.cut[0] == r.in_size and sum(c.cut) == c.out_size \
        and c.in_size == r.out_size


def parallel_partners(lins: list[Linear]) -> None:
    """Pair a parallel block's fused input projection ``(d, 3d + f)`` (gated: ``(d, 3d + 2f)``; fewer key/value
    heads: narrower, :func:`parallel_cut`) with its output projection ``(d + f, d)``.

    ViT-22B's (and PaLM's) parallel block reads one norm's output with one kernel holding q, k, v and the MLP's
    up-projection side by side, ``[q | k | v | up]``, cut apart after the matmul; its one output projection reads
    the attention output and the MLP's hidden side by side, ``concat([attn_out, gelu(up)])``. Neither ``out ==
    in`` nor a fused kernel's ``k`` equal pieces find that row, so both stayed whole: 2.15x the bytes and 3.76x
    the flops of the Megatron hand layout (review_u m08, data=2,model=4). The shapes say it: the column reads the
    width ``d`` the row writes, and its output is exactly ``2d`` (k and v, as wide as q) wider than the row's
    input, so ``f = in - d``. The pair is split as the traced planner splits it (the fused dim naively, XLA
    resharding the pieces; the row's input alike, XLA resharding the concatenation), with the pieces ``[d, d, d,
    f]`` and the concatenation ``[d, f]`` it prices (:func:`tpflax._src.planner.builders._joined`), in the order
    ViT-22B and PaLM use. Only one such column and one such row in the block, the column's whole output read
    by no other layer of the block and the row reading no other layer's whole output, by shape whatever their
    roles: a residual MLP ``d -> 6d -> 4d -> d`` has ``6d = 4d + 2d`` too, but its middle layer reads the first's
    output and writes the last's input (pairing first and last left it whole between them: 3.37x the compiled
    collectives, review r58 pp2); an unplaced pair is oriented as the widening side is a column. PaLM's gated
    ``[q | k | v | gate | up]`` ``(d, 3d + 2f)`` (``silu(gate) * up`` into the row) found no row either: 2.80x
    the bytes and 3.62x the flops of the Megatron layout (r59 treegaps g01, data=2,model=4); its cut is ``[d, d,
    d, f, f]``, and multi-query or grouped keys and values ``w`` wide each make ``[d, w, w, ...]``.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> cin, cout = lin("b/layer_1/kernel", (128, 896)), lin("b/layer_2/kernel", (640, 128))
    >>> parallel_partners([cin, cout])
    >>> cin.role, cin.cut, cout.role, cout.joined, parallel_fit(cin, cout)
    ('column', (128, 128, 128, 512), 'row', (128, 512), True)
    """
    def two(x: Linear) -> bool:
        return len(x.f.body) == 2 and x.pieces == 1 and not x.cut and not x.joined

    found = []
    for c in lins:
        if c.role not in ("column", None) or not two(c) or any(
                x is not c and x.in_size == c.out_size for x in lins):
            continue  # something reads the column's whole output, whatever its role (a deeper MLP's middle layer)
        d = c.in_size
        for r in lins:
            if r is c or r.role not in ("row", None) or not two(r) or r.out_size != d or r.in_size <= d:
                continue
            cut = parallel_cut(d, c.out_size, r.in_size)
            if cut is None:
                continue
            if any(x is not c and x is not r and x.out_size == r.in_size * x.pieces for x in lins):
                continue  # the row reads another layer's whole output, whatever its role (an MLP's up-projection)
            found.append((c, r, cut))
    if len(found) != 1:
        return
    (c, r, cut), = found
    d, f = c.in_size, r.in_size - c.in_size
    placed = [x for x in (c, r) if x.role is None]
    c.role, r.role = "column", "row"
    c.cut, r.joined = cut, (d, f)
    names = "q | k | v | " + ("gate | up" if len(cut) == 5 else "up")
    kv = "" if cut[1] == d else f" (keys and values {cut[1]} wide each: fewer key/value heads)"
    c.why = (f"{c.why + '; ' if c.why else ''}a parallel block's fused [{names}] by shape: ({d} -> {c.out_size}) "
             f"beside {short(r.f.path)} ({r.in_size} -> {d}), which reads [attention out | MLP hidden]{kv}; "
             f"cut into [{', '.join(map(str, cut))}] after the matmul, split naively over the fused dim and XLA "
             "reshards the pieces (pass model= to trace it)")
    r.why = (f"{r.why + '; ' if r.why else ''}reads [attention out ({d}) | MLP hidden ({f})] of the parallel block's "
             f"fused {short(c.f.path)}, concatenated")
    for x in placed:
        x.doubt = (f"'{short(x.f.path)}' taken as the {x.role} of a parallel block by shape alone "
                   f"({short(c.f.path)} ({d} -> {c.out_size}), {short(r.f.path)} ({r.in_size} -> {d})) "
                   "(pass model= to trace it)")


def outer_product_partners(lins: list[Linear]) -> Linear | None:
    """Pair the first of two kernels ``(d, c)`` whose outer product a row ``(c * c, e)`` reads with that row; the
    second is returned (to be kept whole).

    AlphaFold's outer product mean: ``a`` and ``b`` (both ``(d, c)``) project the MSA, ``einsum("bsic,bsjd->bijcd",
    a, b)`` takes their outer product and ``out`` ``(c * c, e)`` reads it flattened, ``a``'s features the major
    ones. No shape pairs them (nothing reads ``c``), so all three stayed whole, the one block whose flops the
    Evoformer's tree plan did not split: 1.074x the Megatron hand layout's flops (review_u m03, data=2,model=4),
    which splits ``a``'s ``c`` and ``out``'s ``c * c`` rows alike, in contiguous blocks of ``c / t`` whole rows of
    ``b``'s, and keeps ``b`` whole. Taken by shape whatever the names, but only two such kernels, alike, and the
    one row, with no other kernel of the block reading ``c`` or writing ``c * c``; the first by name (``a``,
    ``left``, ``linear_1``) is taken as the major (AlphaFold's and OpenFold's order). A row that writes the pair's
    input width feeds them rather than reading their product: a Gaussian policy's ``hidden`` (256 -> 512) before its
    heads ``mean`` and ``log_std`` (512 -> 16), 256 = 16 x 16, taken as one cost 1.16x the bytes and 2.73x the
    collectives of the hand layout (XLA:CPU data=2,model=4); the tree sees no order in a flat block, so that shape
    rules it out unless more than shapes says the row reads the product (:func:`_after`: its name, ``out``, or
    linen's numbering): an outer product mean whose output is as wide as its input (``c_z = c_m``), ``out`` (64 ->
    64) beside ``a`` and ``b`` (64 -> 8), stayed whole by that rule where the trace splits it (review r59).

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "b")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> a, b, out = lin("b/a/kernel", (64, 8)), lin("b/b/kernel", (64, 8)), lin("b/out/kernel", (64, 32))
    >>> outer_product_partners([out, b, a]) is b, a.role, out.role, out.outer
    (True, 'column', 'row', 8)
    >>> a.role = out.role = None; out.outer = 0
    >>> outer_product_partners([a, b, out, lin("b/c/kernel", (64, 8))]) is None  # three alike: q, k, v?
    True
    >>> hidden, mean, log_std = (lin(f"p/{n}/kernel", s) for n, s in
    ...                          (("hidden", (256, 512)), ("mean", (512, 16)), ("log_std", (512, 16))))
    >>> outer_product_partners([hidden, mean, log_std]) is None, hidden.role, mean.role
    (True, None, None)
    >>> a, b, out = lin("b/a/kernel", (128, 8)), lin("b/b/kernel", (128, 8)), lin("b/out/kernel", (64, 128))
    >>> outer_product_partners([out, b, a]) is b, a.role, out.role  # c_z = c_m: 'out' names the reader
    (True, 'column', 'row')
    """
    def two(x: Linear) -> bool:
        return len(x.f.body) == 2 and x.pieces == 1 and not x.cut and not x.joined

    pairs = [x for x in lins if two(x) and x.role in ("column", None) and x.out_size > 1]
    widths = {y.in_size for y in lins}  # asked once: most blocks have no kernel reading any c * c
    for x in pairs:
        c = x.out_size
        if c * c not in widths or c in widths:
            continue  # no row reads c * c, or a kernel reads c (both ruled out below)
        alike = [y for y in lins if len(y.f.body) == 2 and (y.in_size, y.out_size) == (x.in_size, x.out_size)]
        rows = [r for r in lins if r.in_size == c * c and all(r is not y for y in alike)]  # d may be c * c
        if len(alike) != 2 or not all(two(y) and y.role in ("column", None) for y in alike) or len(rows) != 1 \
                or not two(rows[0]) or rows[0].role not in ("row", None) or any(y.in_size == c for y in lins) \
                or any(y.out_size * y.pieces == c * c and y is not rows[0] for y in lins) \
                or (rows[0].out_size == x.in_size and not _after(rows[0], alike)):
            continue  # the last: the row writes what the pair reads, so it may feed them (a policy's hidden layer
            # 256 -> 512 before its heads 512 -> 16, 256 = 16 * 16) rather than read their product
        (r,), (major, other) = rows, sorted(alike, key=lambda y: natural(y.f.path))
        major.role, r.role, r.outer, other.role = "column", "row", c, None
        major.why = (f"{major.why + '; ' if major.why else ''}the major side of an outer product ({major.in_size} -> {c}, "
                     f"beside {short(other.f.path)}) that {short(r.f.path)} ({c * c} -> {r.out_size}) reads flattened")
        r.why = (f"{r.why + '; ' if r.why else ''}reads the outer product of {short(major.f.path)} and "
                 f"{short(other.f.path)} ({c} x {c}) flattened, {short(major.f.path)}'s features the major ones")
        other.why = (f"dense layer ({other.in_size} -> {c}): the minor side of an outer product that {short(r.f.path)} "
                     f"reads flattened beside {short(major.f.path)}; kept whole whatever the pair's layout (when "
                     f"{short(major.f.path)}'s features are split, each device takes the product of its share of "
                     "those with all of these) (pass model= to trace it)")
        major.doubt = (f"'{short(major.f.path)}' and '{short(r.f.path)}' taken as an outer product's major side and "
                       f"reader by shape alone ({c} and {c} x {c} features) (pass model= to trace it)")
        return other
    return None


_OUT_NAMES = _Names(r"^(o|out|output|o_proj|out_proj|output_proj|proj_out|dense_out|attn_out)$")


def _after(r: Linear, pair: Sequence[Linear]) -> bool:
    """Whether more than shapes says ``r`` reads the outer product of ``pair`` rather than feeding it, when it writes
    the width the pair reads (:func:`outer_product_partners`): its name calls it an output (``out``, ``linear_out``,
    ``o_proj``), or linen numbered it after both (``Dense_2`` after ``Dense_0`` and ``Dense_1``: creation order,
    the call order of a layer per statement). Not any row name: a policy's hidden layer named ``proj``, ``fc2`` or
    ``down`` (row names all) feeding heads ``mean`` and ``log_std`` was taken for their product's reader, 1.17x the
    bytes and 2.40x the collectives of the hand layout (re-read r60). Shapes cannot tell the two apart, so a policy
    whose heads linen numbered before its hidden layer (built first, called later) still reads as an outer product.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape):
    ...     return Linear(Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "p"), (0,), (1,))
    >>> a, b = lin("p/Dense_0/kernel", (64, 8)), lin("p/Dense_1/kernel", (64, 8))
    >>> _after(lin("p/Dense_2/kernel", (64, 64)), [a, b]), _after(lin("p/out/kernel", (64, 64)), [a, b])
    (True, True)
    >>> hidden, mean, log_std = (lin(f"p/Dense_{i}/kernel", s) for i, s in
    ...                          enumerate([(256, 512), (512, 16), (512, 16)]))
    >>> _after(hidden, [mean, log_std]), _after(lin("p/hidden/kernel", (256, 512)), [mean, log_std])
    (False, False)
    >>> _after(lin("p/proj/kernel", (256, 512)), [mean, log_std]), _after(lin("p/fc2/kernel", (256, 512)), [mean, log_std])
    (False, False)
    """
    if _OUT_NAMES.match(role_name(r.f)):
        return True
    me = _AUTO_NAME.match(r.f.unit_name)
    parent = r.f.unit.rsplit("/", 1)[0]
    if me is None:
        return False
    for y in pair:
        it = _AUTO_NAME.match(y.f.unit_name)
        if it is None or it["kind"] != me["kind"] or y.f.unit.rsplit("/", 1)[0] != parent or int(it["n"]) > int(me["n"]):
            return False
    return True


def fan_out_readers(lins: list[Linear]) -> None:
    """Orient a 2-D kernel whose output two or more alike kernels read, each narrowing it, as a column and those
    readers as its rows, when nothing else in the block reads or writes that width.

    A Gaussian policy's ``hidden`` (256 -> 512) feeds two heads ``mean`` and ``log_std`` (512 -> 16 each); a VAE
    encoder's hidden layer feeds ``mu`` and ``logvar`` alike. No name or residual width orients them and a column
    pairs with one row, so all three stayed whole: 3.79x the bytes, 3.84x the collectives and 3.99x the flops of
    the hand layout (``hidden`` split on its output, both heads on their input; XLA:CPU data=2,model=4, adamw).
    The readers, siblings by shape, are all rows of one pair (:func:`tpflax._src.planner.heuristics._pair_group`
    joins them), which the chooser prices against keeping it whole. Readers that keep or widen the width (q, k, v
    reading a stream) read a stream, not a column's hidden features: left alone, as is a width another kernel
    writes too. A widening kernel a row name calls a row (a policy's hidden layer named ``proj`` or ``fc2``) is
    such a column all the same: no row widens what its readers narrow (re-read r60: kept whole, 3.79x the bytes).

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(path, shape, role=None):
    ...     f = Facts(Leaf(path, shape, "float32", 4), "dense", 0, path.rsplit("/", 1)[0], "p")
    ...     return Linear(f, (0,), (1,), role=role)
    >>> hidden, mean, log_std = (lin(f"p/{n}/kernel", s) for n, s in
    ...                          (("hidden", (256, 512)), ("mean", (512, 16)), ("log_std", (512, 16))))
    >>> fan_out_readers([mean, hidden, log_std])
    >>> hidden.role, mean.role, log_std.role
    ('column', 'row', 'row')
    >>> q, k, x = lin("p/q/kernel", (64, 64)), lin("p/k/kernel", (64, 64)), lin("p/x/kernel", (32, 64))
    >>> fan_out_readers([x, q, k])  # readers as wide as what they read: a stream's
    >>> x.role, q.role
    (None, None)
    """
    def two(x: Linear) -> bool:
        return len(x.f.body) == 2 and x.pieces == 1 and not x.cut and not x.joined and x.outer == 0

    reading = [y.in_size for y in lins]  # asked once: most widths have fewer than two readers
    for x in lins:
        o = x.out_size
        named_row = x.role == "row" and o > x.in_size  # a widening layer a row name (proj, fc2) misnames
        if reading.count(o) - (x.in_size == o) < 2 or not two(x) or (x.role not in ("column", None) and not named_row):
            continue
        readers = [y for y in lins if y is not x and y.in_size == o]
        if len(readers) < 2 or not all(two(y) and y.role in ("row", None) and y.f.body == readers[0].f.body
                                       and y.in_dims == readers[0].in_dims and y.out_size < o for y in readers):
            continue
        if any(y is not x and y.out_size * y.pieces == o for y in lins):
            continue  # another kernel writes the width too: which one the readers read, the tree cannot tell
        placed = [y for y in (x, *readers) if y.role is None or y is x and named_row]
        if not placed:
            continue
        names = ", ".join(short(y.f.path) for y in readers)
        if x.role is None or named_row:
            x.role = "column"
            x.why = (f"({x.in_size} -> {o}) read by {len(readers)} alike kernels ({o} -> {readers[0].out_size}: "
                     f"{names}), nothing else reading or writing its output width")
        for y in readers:
            if y.role is None:
                y.role = "row"
                y.why = (f"({y.in_size} -> {y.out_size}) reads the output of {short(x.f.path)}, one of its "
                         f"{len(readers)} alike readers")
        for y in placed:
            y.doubt = (f"'{short(y.f.path)}' taken as the {y.role} of {short(x.f.path)} ({x.in_size} -> {o}) read by "
                       f"{names} by shape alone (pass model= to trace it)")


def natural(s: str) -> list:
    """A sort key ordering the numbers in ``s`` by value: ``layers_2`` before ``layers_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]


def parallel_fit(c: Linear, r: Linear) -> bool:
    """Whether ``c`` is the parallel block's fused input projection whose pieces ``r`` reads
    (:func:`parallel_partners`)."""
    return len(r.joined) == 2 and c.in_size == r.out_size == r.joined[0] \
        and c.cut == parallel_cut(c.in_size, c.out_size, r.in_size)


def parallel_cut(d: int, out: int, joined: int) -> tuple[int, ...] | None:
    """The pieces ``[q, k, v, up]`` or ``[q, k, v, gate, up]`` of a parallel block's fused input projection ``(d,
    out)`` whose output projection reads ``joined = d + f`` (:func:`parallel_partners`); None when the widths fit
    neither, or both.

    Keys and values are each ``w`` wide, ``d`` (one per query head) or fewer heads' (multi-query, grouped): a
    divisor of ``d``. Ungated ``out = d + 2w + f``, gated ``out = d + 2w + 2f``; with ``w = d`` the two never
    meet (``f > 0``); a shape both read with narrower keys is no proof of either and is left alone.

    >>> parallel_cut(128, 896, 640), parallel_cut(128, 1408, 640)  # ViT-22B's; PaLM's (gated) with every head
    ((128, 128, 128, 512), (128, 128, 128, 512, 512))
    >>> parallel_cut(64, 64 + 2 * 16 + 2 * 128, 64 + 128)  # multi-query (one head of 16), gated
    (64, 16, 16, 128, 128)
    >>> parallel_cut(128, 128 + 2 * 16 + 512, 640), parallel_cut(64, 64 + 2 * 24 + 128, 192)  # 16 | 128; 24 not | 64
    ((128, 16, 16, 512), None)
    """
    f = joined - d
    if f <= 0:
        return None
    fits = []
    for ups in ((f,), (f, f)):
        w, odd = divmod(out - d - sum(ups), 2)
        if not odd and 0 < w <= d and d % w == 0:
            fits.append((d, w, w, *ups))
    full = [cut for cut in fits if cut[1] == d]  # every query head its own key/value head: the first to try
    fits = full or fits
    return fits[0] if len(fits) == 1 else None


def _affinity(a: str, b: str) -> tuple[int, int]:
    return len(os.path.commonprefix([a, b])), len(os.path.commonprefix([a[::-1], b[::-1]]))


def attention_output(lins: list[Linear], group: str) -> None:
    """The one unnamed square kernel of an attention block with q/k/v columns and no row is its output.

    ALBERT's ``attention/{query,key,value,dense}``: ``dense`` (d, d) can be
    neither oriented by shape nor named; the columns' output width is its input.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(name, role=None):
    ...     path = f"l/attention/{name}/kernel"
    ...     return Linear(Facts(Leaf(path, (64, 64), "float32", 4), "dense", 0, path[:-7], "l/attention"),
    ...                   (0,), (1,), role=role)
    >>> q, out = lin("query", "column"), lin("dense")
    >>> attention_output([q, out], "l/attention")
    >>> out.role
    'row'
    """
    if not ATTN.search(group.rsplit("/", 1)[-1]) or any(x.role == "row" for x in lins):
        return
    free = [m for m in lins if m.role is None and len(m.f.body) == 2 and m.in_size == m.out_size]
    cols = [c for c in lins if c.role == "column" and len(free) == 1 and c.out_size == free[0].in_size]
    if cols:
        free[0].role = "row"
        free[0].why = (f"the one unnamed ({free[0].in_size} -> {free[0].out_size}) kernel of an attention block "
                       f"whose columns ({', '.join(role_name(c.f) for c in cols)}) produce its input width")


def attention_inputs(lins: list[Linear], group: str) -> None:
    """In an attention block whose output projection is known, the unnamed kernels into it are inputs.

    GPT-2's cross-attention ``crossattention/{q_attn, c_attn, c_proj}``: ``c_attn``
    is a fused ``[k|v]`` and ``c_proj`` the row, so the square ``q_attn`` (named
    neither way, so neither shape nor name orients it) is the query: a kernel from
    the row's output width into its input width is a column of the same pair.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(name, role=None):
    ...     path = f"h/crossattention/{name}/kernel"
    ...     return Linear(Facts(Leaf(path, (64, 64), "float32", 4), "dense", 0, path[:-7], "h/crossattention"),
    ...                   (0,), (1,), role=role)
    >>> q, out = lin("q_attn"), lin("c_proj", "row")
    >>> attention_inputs([q, out], "h/crossattention")
    >>> q.role
    'column'
    """
    rows = [r for r in lins if r.role == "row"]
    if not ATTN.search(group.rsplit("/", 1)[-1]) or len(rows) != 1:
        return
    _flipped_columns(lins, rows[0], lambda m, row: (
        f"({m.in_size} -> {m.out_size}) of an attention block projects into the input of its "
        f"output projection {short(row.f.path)}: an input projection (query, key or value)"))


def low_rank_factors(lins: list[Linear]) -> list[tuple[Linear, Linear]]:
    """``(down, up)`` pairs of a block's low-rank factored projections; ``up`` becomes a column.

    DeepSeek-V2's multi-head latent attention projects d onto a narrow latent (``q_a``
    ``(d, r)``, ``kv_a`` ``(d, r + rope)``) and up again per head (``q_b`` ``(r, heads *
    head_dim)``, ``kv_b``). The down-projection narrows the residual, so by shape it reads as a
    column, and being narrower than the attention output as a GQA key/value one that blocks its
    row; the up-projection, widening a width that is not the residual, has no role at all. The
    heads are in the up-projection's output: it is the column of the block's pair, and the down-
    projection (small, its output needed whole by the up-projection) stays out of the pair. An
    unoriented widening kernel reads the latent of the narrowing column whose output holds its
    input (``kv_b`` reads 32 of ``kv_a``'s 40 features): the same width first, else the closest name.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def lin(name, shape, role=None):
    ...     path = f"l/attn/{name}/kernel"
    ...     return Linear(Facts(Leaf(path, shape, "float32", 4), "dense", 0, path[:-7], "l/attn"),
    ...                   (0,), (1,), role=role)
    >>> qa, qb, kva, kvb = lin("q_a", (128, 64), "column"), lin("q_b", (64, 192)), \\
    ...     lin("kv_a", (128, 40), "column"), lin("kv_b", (32, 256))
    >>> [(short(a.f.path), short(b.f.path)) for a, b in low_rank_factors([qa, qb, kva, kvb])]
    [('l/attn/q_a/kernel', 'l/attn/q_b/kernel'), ('l/attn/kv_a/kernel', 'l/attn/kv_b/kernel')]
    >>> qb.role, kvb.role
    ('column', 'column')
    """
    downs = [a for a in lins if a.role == "column" and len(a.f.body) == 2 and a.out_size < a.in_size]
    out = []
    for b in lins:
        if b.role is not None or len(b.f.body) != 2 or b.in_size >= b.out_size:
            continue
        fits = [a for a in downs if b.in_size <= a.out_size]
        if not fits:
            continue
        a = max(fits, key=lambda a: (a.out_size == b.in_size, _affinity(a.f.unit_name, b.f.unit_name)))
        b.role = "column"
        b.why = (f"({b.in_size} -> {b.out_size}) up-projects the {b.in_size}-wide latent of {short(a.f.path)} "
                 f"({a.in_size} -> {a.out_size}), a low-rank factored projection")
        out.append((a, b))
    return out


# a bottleneck adapter (Houlsby's, Pfeiffer's: ``adapter/down_project``, ``adapter_up``) reads the output of the
# layer beside it, no LoRA beside its input; the shapes alone cannot tell them apart, the name does
_BOTTLENECK = re.compile(r"^(?!.*lora).*adapter", re.I)  # no ``LoRAAdapter_0``, no ``lora_adapter``


def low_rank_adapters(facts: Sequence[Facts]) -> list[tuple[Facts, Facts, Facts]]:
    """``(x, y, w)``: a low-rank adapter ``x @ y`` beside the 2-D kernel ``w`` whose output it is added to (LoRA).

    ``x`` ``(m, r)`` and ``y`` ``(r, n)``, ``r`` at most a quarter of ``m`` and of ``n``, whose product has the
    shape ``(m, n)`` of a kernel ``w`` beside them: a sibling in the module holding the factors (a linen
    ``base(x) + up(down(x))``, nnx.LoRA's ``base_module`` beside ``lora_a``, peft's ``base_layer`` beside
    ``lora_A``), or the kernel of the module that holds them (nnx.LoRALinear's ``q/lora/lora_a`` under
    ``q/kernel``). Stored ``(in, out)`` ``x`` is the down-projection, stored ``(out, in)`` (torch) the up one:
    either way ``x @ y`` is laid out like ``w``, so ``x``'s dim 0 follows ``w``'s dim 0 and ``y``'s dim 1 ``w``'s
    dim 1. The shapes decide; names only choose between several alike (``q_a``/``q_b`` beside ``q``). A
    bottleneck with no kernel of its product's shape beside it (DeepSeek's ``q_a -> q_b``) is no adapter.

    >>> from tpflax._src.facts.tree import Leaf
    >>> def facts(path, shape):
    ...     unit = path.rsplit("/", 1)[0] if path.endswith("/kernel") else path
    ...     return Facts(Leaf(path, shape, "float32", 4), "dense", 0, unit, unit.rsplit("/", 1)[0])
    >>> w, a, b = facts("attn/q/kernel", (64, 64)), facts("attn/q/lora/lora_a", (64, 4)), \\
    ...     facts("attn/q/lora/lora_b", (4, 64))
    >>> [(x.path, y.path, w.path) for x, y, w in low_rank_adapters([w, a, b])]
    [('attn/q/lora/lora_a', 'attn/q/lora/lora_b', 'attn/q/kernel')]
    >>> qa, qb = facts("attn/q_a/kernel", (64, 16)), facts("attn/q_b/kernel", (16, 128))
    >>> low_rank_adapters([qa, qb, facts("attn/o/kernel", (128, 64))])
    []
    >>> o, down, up = facts("out/dense/kernel", (64, 64)), facts("out/adapter/down_project/kernel", (64, 4)), \\
    ...     facts("out/adapter/up_project/kernel", (4, 64))
    >>> low_rank_adapters([o, down, up])  # a Houlsby adapter runs after the dense, on its output
    []
    """
    mats = sorted((f for f in facts if f.kind in ("dense", "attention") and len(f.body) == 2), key=lambda f: f.path)
    shapes: dict[tuple[int, ...], list[Facts]] = defaultdict(list)
    ups: dict[tuple[int, str], list[Facts]] = defaultdict(list)  # {(r, a module above y): [y]}
    for f in mats:
        shapes[f.body].append(f)
        if 4 * f.body[0] <= f.body[1]:
            for scope in _scopes(f.unit):
                ups[(f.body[0], scope)].append(f)
    out, used = [], set()
    for x in (f for f in mats if 4 * f.body[1] <= f.body[0] and not _BOTTLENECK.search(f.unit)):
        for scope in _scopes(x.unit):  # the factors' own module first
            found = [(y, w) for y in ups.get((x.body[1], scope), ()) for w in shapes.get((x.body[0], y.body[1]), ())
                     if len({x.path, y.path, w.path} | used) == len(used) + 3 and scope in (w.group, w.unit)]
            if found:
                y, w = max(found, key=lambda yw: (_affinity(x.unit_name, yw[0].unit_name),
                                                  _affinity(x.unit_name, yw[1].unit_name)))
                out.append((x, y, w))
                used |= {x.path, y.path, w.path}
                break
    return out


def _scopes(unit: str) -> list[str]:
    """The module holding a layer and the one above it: where its adapter's kernel may sit."""
    parent = unit.rsplit("/", 1)[0] if "/" in unit else ""
    return [parent, parent.rsplit("/", 1)[0]] if "/" in parent else [parent]


def merge_stages(facts: Sequence[Facts], width: int) -> dict[str, float]:
    """``{path: share}`` of the priced tokens the leaves of a Swin's later stages read: each patch merging (a 2-D
    dense ``(4C, 2C)`` beside a norm of ``4C``: 2x2 neighbours concatenated, normed, projected) quarters the
    tokens and doubles the width, so from the patch embedding's ``width`` on, a stage ``2^k`` times as wide reads
    ``4^-k`` of them. A leaf's stage is the width of the norms of the closest module above it holding any (a merge's
    own excepted), when they agree; no share without a merge from ``width``, or where they do not agree (the
    model's root, its output head).

    >>> from tpflax._src.facts.tree import Leaf
    >>> def leaf(path, shape, kind):
    ...     unit = path.rsplit("/", 1)[0]
    ...     return Facts(Leaf(path, shape, "float32", 4), kind, 0, unit, unit.rsplit("/", 1)[0])
    >>> fs = [leaf(f"s{i}_blk/{n}/scale", (w,), "norm") for i, w in enumerate((8, 16)) for n in ("n1", "n2")]
    >>> fs += [leaf(f"s{i}_blk/fc1/kernel", (w, 4 * w), "dense") for i, w in enumerate((8, 16))]
    >>> fs += [leaf("s0_merge/norm/scale", (32,), "norm"), leaf("s0_merge/reduction/kernel", (32, 16), "dense")]
    >>> fs += [leaf("head/kernel", (16, 10), "dense")]
    >>> merge_stages(fs, 8)  # doctest: +NORMALIZE_WHITESPACE
    {'s0_merge/reduction/kernel': 0.25, 's0_blk/n1/scale': 1.0, 's0_blk/n2/scale': 1.0, 's1_blk/n1/scale': 0.25,
     's1_blk/n2/scale': 0.25, 's0_blk/fc1/kernel': 1.0, 's1_blk/fc1/kernel': 0.25}
    """
    norms: dict[str, set[int]] = defaultdict(set)  # group -> its norms' widths
    for f in facts:
        if _is_norm_scale(f):
            norms[f.group].add(f.body[-1])
    merges = {f.path: f.body[0] // 4 for f in facts
              if f.kind == "dense" and len(f.body) == 2 and f.body[0] == 2 * f.body[1] and f.body[1] % 2 == 0
              and f.body[0] in norms.get(f.group, ())}
    merged = set(merges.values())
    share, c, stages = 1.0, width, {}
    while c in merged:
        stages[c] = share
        c, share = 2 * c, share / 4
    if not stages:
        return {}
    stages[c] = share
    out = {p: stages[c] / 4 for p, c in merges.items() if c in stages}
    skip = {f.group for f in facts if f.path in merges}
    under: dict[str, set[int]] = defaultdict(set)  # module -> the widths of every norm below it, a merge's excepted
    for f in facts:
        if _is_norm_scale(f) and f.group not in skip:
            parts = f.path.split("/")
            for i in range(1, len(parts)):
                under["/".join(parts[:i])].add(f.body[-1])
    for f in facts:
        if f.path in out:
            continue
        parts = f.path.split("/")
        found = next((under[m] for m in ("/".join(parts[:i]) for i in range(len(parts) - 1, 0, -1)) if under.get(m)),
                     set())
        if len(found) == 1 and (w := next(iter(found))) in stages:
            out[f.path] = stages[w]
    return out
