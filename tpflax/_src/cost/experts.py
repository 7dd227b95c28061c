"""Expert parallelism: routed tokens move to their experts and back, or every expert sees them."""

from __future__ import annotations

from tpflax._src.cost.batch import config_value
from tpflax._src.cost.records import CommItem
from tpflax._src.cost.scope import Scope, body, drop_layers, layers
from tpflax._src.facts.classify import layer_group
from tpflax._src.mesh import EXPERT, FSDP
from tpflax._src.specs import entry_axes


def expert_items(s: Scope) -> list[CommItem]:
    """Every expert sees the tokens (dense), or routed tokens move to their experts and back (all-to-all).

    The expert axes split the batch (:func:`tpflax._src.mesh.batch_axes`): a dense layer gathers its
    tokens over them and sums its outputs back, and the same for the gradients (measured on the zoo
    MoE, XLA:CPU, expert=8 and expert=4,data=2: ``btd,edf->btef`` all-gathers the tokens over expert
    forward and backward, ``btef,efd->btd`` and its transpose all-reduce the gathered rows).

    >>> import tpflax
    >>> from tpflax import zoo
    >>> m = zoo.get("moe")
    >>> p = tpflax.plan(m.abstract_variables(), {"expert": 8})
    >>> e = tpflax.estimate(p, None, "16x16", model=m)
    >>> sorted({i.kind for i in e.items if "expert dispatch" in i.why})
    ['all-gather', 'all-reduce']
    >>> e = tpflax.estimate(p, None, "16x16", model=m, expert_dispatch="all-to-all")
    >>> sorted({i.kind for i in e.items if i.why.startswith("expert parallel")})
    ['all-to-all']
    """
    e_axes = s.mesh.axes_with(EXPERT)
    if not e_axes:
        return []
    blocks: dict[str, list[str]] = {}  # expert leaves by the block holding them
    for path, d in s.lv.decisions.items():
        if d.kind == "expert" and s.axes(path, EXPERT):
            blocks.setdefault(d.unit.rsplit("/", 1)[0], []).append(path)
    n = s.size(e_axes)
    top_k = config_value(s.config, "top_k", 1) or 1
    items = []
    for block, paths in blocks.items():
        d0 = s.lv.decisions[paths[0]]
        d_model, stack = body(d0)[1], layers(d0) * s.lv.count[paths[0]]
        if s.lv.count[paths[0]] > 1:
            block = layer_group(block)
        if s.dispatch == "all-to-all":
            size = s.rows_local * top_k * d_model * s.act_item
            items.append(CommItem("all-to-all", e_axes, size, n, 2 * stack, block,
                                  "expert parallel: dispatch and return routed tokens (forward)"))
            items.append(CommItem("all-to-all", e_axes, size, n, 2 * stack, block,
                                  "expert parallel: the same, for gradients (backward)"))
        else:  # the batch is split over the expert axes too: the layer gathers its tokens over them
            size = s.rows_local * n * d_model * s.act_item
            # experts also split over fsdp axes: XLA gathered the tokens over those too (measured, zoo MoE,
            # XLA:CPU, expert=2,fsdp=2,model=2: the whole batch at each expert einsum and its transpose)
            g_axes = tuple(a for a in s.mesh.names if a in e_axes or a in s.axes(paths[0], FSDP))
            ng = s.size(g_axes)
            items.append(CommItem("all-gather", g_axes, size * ng // n, ng, 2 * stack, block,
                                  "dense expert dispatch: gather the tokens over the expert axes (forward) and the "
                                  "output gradients (backward)"))
            items.append(CommItem("all-reduce", e_axes, size, n, 2 * stack, block,
                                  "dense expert dispatch: sum expert outputs (forward) and input gradients "
                                  "(backward)"))
    return items


def buffer_items(s: Scope) -> list[CommItem]:
    """Experts that read a batch-free buffer (GShard's one-hot dispatch ``btec,btd->ecd``, see
    :mod:`tpflax._src.cost.buffers`): each device of the batch axes dispatches its own examples, so
    XLA sums the buffer over them before the experts run (forward), and the gradient of the buffer
    the combine reads back (backward); the experts then run alike on those devices, and their
    weights' gradients need no sum over them (:func:`tpflax._src.cost.gradients.gradient_items`;
    measured on a 2-layer GShard MoE, XLA:CPU, data=2,model=4 and fsdp=2,model=4: ``f32[E, C, d]``
    all-reduced over data (fsdp) at the dispatch and at the combine's transpose, and no expert weight
    in the gradients' all-reduce).
    """
    axes = s.batch_axes  # an fsdp split of the kernels too: they are gathered for the experts' work
    if not axes:
        return []
    dec = s.lv.decisions
    # (the kernel reading the dispatch, the one writing the output, layers, source)
    ends = [(pc.columns[0], pc.rows[-1], max(layers(dec[p]) for p in pc.columns + pc.rows) * pc.count,
             f"pair {pc.id}" + (f" and {pc.count - 1} alike" if pc.count > 1 else ""))
            for pc in s.lv.pairs if pc.columns and pc.rows and pc.columns[0] in s.buffered]
    # kernels no pair holds: a chain's first kernel (no traced edge from another of them) reads the dispatch,
    # its last (no edge to another) writes the output; one sum per buffer: the first kernels of one block
    # read one dispatch (a gated expert MLP's gate and up), its last ones write one output. Each class's
    # alike layers count (lv.count), as the pairs' do (measured: a 2-block GShard MoE whose experts a rule keeps
    # whole, XLA:CPU data=2,model=4: 4 buffer sums over data, two per block)
    loose, edges = s.loose_buffered, s.edges or frozenset()
    seen: set[tuple] = set()
    for p in loose:
        block = dec[p].unit.rsplit("/", 1)[0]
        count = layers(dec[p]) * _blocks(s, p, block)
        first = not any((q, p) in edges for q in loose) and _once(seen, ("in", block, body(dec[p])[1]))
        last = not any((p, q) in edges for q in loose) and _once(seen, ("out", block, body(dec[p])[-1]))
        ends.append((p if first else None, p if last else None, count, s.lv.label[p]))
    items: list[CommItem] = []
    for c, r, count, source in ends:
        items += _buffer_sums(s, axes, c, r, count, source)
    return items


def _blocks(s: Scope, path: str, block: str) -> int:
    """The blocks holding the alike leaves of ``path``'s class (``block``: the one holding ``path``). Leaves of one
    block read one dispatch and write one output (a gated expert MLP's ``wi_0`` and ``wi_1``, alike, are one class
    of two), so the buffer is summed once per block, not once per leaf."""
    if not path.startswith(block + "/"):
        return s.lv.count[path]
    depth = path[len(block) + 1:].count("/") + 1
    members = [q for q, r in s.lv.rep_of.items() if r == path] or [path]
    return len({q.rsplit("/", depth)[0] for q in members})


def _once(seen: set, key: tuple) -> bool:
    """Whether ``key`` is new to ``seen`` (and add it)."""
    new = key not in seen
    seen.add(key)
    return new


def _buffer_sums(s: Scope, axes: tuple[str, ...], c: str | None, r: str | None, count: int,
                 source: str) -> list[CommItem]:
    """The batch-axes sums around a batch-free expert buffer: of the dispatch ``c`` reads (forward) and of the
    gradient of the output ``r`` writes (backward)."""
    dec, label, n = s.lv.decisions, s.lv.label, s.size(axes)
    out = []
    if c is not None:
        width = (s.widths or {}).get(c) or body(dec[c])[1]
        out.append(CommItem("all-reduce", axes, _buffer_bytes(c, width, s), n, count, source,
                            f"{label[c]} reads a batch-free expert buffer: sum the dispatch over the batch (forward)"))
    if r is not None:
        out.append(CommItem("all-reduce", axes, _buffer_bytes(r, body(dec[r])[-1], s), n, count, source,
                            f"{label[r]}'s batch-free expert output: sum its gradient over the batch (backward)"))
    return out


def _buffer_bytes(path: str, width: int, s: Scope) -> float:
    """Bytes of the expert buffer ``path`` reads or writes on one device: its experts split as the kernel's
    (an expert axis holds its experts' rows only; a batch axis gathers the kernel for the work)."""
    d = s.lv.decisions[path]
    if path not in s.batched:  # a ragged_dot's sorted tokens (cost.buffers.ragged_buffers): whole on every device
        return s.rows_of(path) * width * s.act_item
    split = [a for a in entry_axes(drop_layers(d, s.lv.specs[path])[0]) if a not in s.batch_axes]
    return s.rows_of(path) * width * s.act_item / s.size(split)
