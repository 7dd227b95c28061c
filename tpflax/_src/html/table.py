"""The per-layer table of the HTML report: one row per repeated-layer group, expandable.

Leaves of one ``Decision.group`` (``params/h_*/mlp/c_fc/kernel``) are alike, so
the group is one row with a ``×N`` count; its members follow it, hidden until
the row is opened. Each group is its own ``<tbody>`` so that sorting moves a
group and its members together.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from tpflax._src.html.svg import esc
from tpflax._src.planner.decision import Decision, Plan
from tpflax._src.specs import entries, fmt_bytes

# (header, sort type); the script sorts by each cell's data-v
COLUMNS = (("path", "str"), ("×", "num"), ("kind", "str"), ("shape", "num"), ("dtype", "str"),
           ("strategy", "str"), ("spec", "str"), ("bytes", "num"), ("per device", "num"),
           ("share", "num"), ("reason", "str"))
SORT_ON_LOAD = COLUMNS.index(("per device", "num"))


@dataclass(frozen=True)
class Group:
    """Leaves planned alike: one repeated-layer pattern with one spec, shape and dtype.

    Attributes:
        pattern: ``Decision.group`` (the member's path when there is one member).
        paths: the members, in tree order.
        decision: the first member's decision (the others differ only in path).
    """

    pattern: str
    paths: tuple[str, ...]
    decision: Decision

    @property
    def count(self) -> int:
        return len(self.paths)

    @property
    def bytes(self) -> int:
        return self.decision.bytes * self.count

    @property
    def bytes_per_device(self) -> int:
        return self.decision.bytes_per_device * self.count

    @property
    def view(self) -> str:
        """The mesh picture this group is drawn with (shape and spec decide it)."""
        return view_key(self.decision)


def view_key(d: Decision) -> str:
    """A stable name for the (shape, spec) pair: leaves that share it share a mesh picture.

    >>> from jax.sharding import PartitionSpec as P
    >>> view_key(Decision(P(None, "model"), "column", "", (8, 8), "float32", 256, 64))
    '8x8|None,model'
    """
    spec = ",".join("+".join(e) if isinstance(e, tuple) else str(e) for e in entries(d.spec, len(d.shape)))
    return "x".join(map(str, d.shape)) + "|" + spec


def spec_text(spec) -> str:
    """``P(None, 'model')``, as the text report writes it.

    >>> from jax.sharding import PartitionSpec as P
    >>> spec_text(P(None, ("fsdp", "model")))
    "P(None, ('fsdp', 'model'))"
    """
    inner = ", ".join("None" if e is None else (repr(e) if isinstance(e, str) else str(tuple(e)))
                      for e in tuple(spec))
    return f"P({inner})"


def groups(plan: Plan) -> list[Group]:
    """The plan's leaves grouped by repeated-layer pattern, spec, shape and dtype, in tree order.

    >>> import jax, tpflax
    >>> t = {f"h_{i}": {"w": jax.ShapeDtypeStruct((8, 8), "float32")} for i in range(3)}
    >>> [(g.pattern, g.count) for g in groups(tpflax.plan(t, {"model": 2}))]
    [('h_*/w', 3)]
    """
    found: dict[tuple, list[str]] = {}
    for path, d in plan.decisions.items():
        key = (d.group or path, d.spec, d.shape, d.dtype, d.label, d.kind)
        found.setdefault(key, []).append(path)
    out = []
    for key, paths in found.items():
        pattern = key[0] if len(paths) > 1 else paths[0]
        out.append(Group(pattern=pattern, paths=tuple(paths), decision=plan.decisions[paths[0]]))
    return out


def _cells(d: Decision, path_cell: str, path: str, count: int, share: float | None) -> str:
    shape = "×".join(map(str, d.shape)) or "()"
    spec = spec_text(d.spec)
    share_cell = ('<td data-v="0"></td>' if share is None else
                  f'<td data-v="{share:.6f}"><div class="share"><b style="width:{min(share, 100):.1f}%"></b>'
                  f'<span>{share:.1f}%</span></div></td>')
    cells = [
        f'<td class="path" data-v="{esc(path)}">{path_cell}</td>',
        f'<td class="num" data-v="{count}">{"×" + str(count) if count > 1 else ""}</td>',
        f'<td data-v="{esc(d.kind)}">{esc(d.kind)}</td>',
        f'<td class="mono" data-v="{math.prod(d.shape)}">{esc(shape)}</td>',
        f'<td data-v="{esc(d.dtype)}">{esc(d.dtype)}</td>',
        f'<td data-v="{esc(d.label)}"><span class="strategy s-{esc(d.strategy)}">{esc(d.label)}</span></td>',
        f'<td class="mono spec" data-v="{esc(spec)}" title="show on the mesh">{esc(spec)}</td>',
        f'<td class="num" data-v="{d.bytes * count}">{esc(fmt_bytes(d.bytes * count))}</td>',
        f'<td class="num" data-v="{d.bytes_per_device * count}">{esc(fmt_bytes(d.bytes_per_device * count))}</td>',
        share_cell,
        f'<td class="reason" data-v="{esc(d.reason)}" title="{esc(d.reason)}">'
        f'<div>{esc(d.reason) if share is not None else ""}</div></td>',
    ]
    return "".join(cells)


def table_html(plan: Plan) -> str:
    """The sortable, grouped table (one ``<tbody class="group">`` per :class:`Group`).

    >>> import jax, tpflax
    >>> t = {f"h_{i}": {"w": jax.ShapeDtypeStruct((8, 8), "float32")} for i in range(3)}
    >>> table_html(tpflax.plan(t, {"model": 2})).count('class="group"')
    1
    """
    total = plan.bytes_per_device or 1
    head = "".join(f'<th data-col="{i}" data-type="{t}">{esc(name)}</th>' for i, (name, t) in enumerate(COLUMNS))
    body = []
    for g in groups(plan):
        d = g.decision
        toggle = '<button class="toggle" title="show the members">▸</button>' if g.count > 1 else ""
        label = f'{toggle}<span class="pname">{esc(g.pattern)}</span>'
        rows = [f'<tr class="head">{_cells(d, label, g.pattern, g.count, 100 * g.bytes_per_device / total)}</tr>']
        if g.count > 1:
            rows += [f'<tr class="member">{_cells(plan.decisions[p], esc(p), p, 1, None)}</tr>' for p in g.paths]
        body.append(f'<tbody class="group" data-view="{esc(g.view)}" data-count="{g.count}">{"".join(rows)}</tbody>')
    return (f'<table class="plan" data-sort-on-load="{SORT_ON_LOAD}"><thead><tr>{head}</tr></thead>'
            f'{"".join(body)}</table>')
