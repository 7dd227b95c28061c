"""The HTML report: one self-contained page (or notebook fragment) for a plan and its estimate.

It holds summary cards, a stacked bar chart of bytes per device by category
with and without sharding, communication per step by mesh axis, the mesh
picture of a chosen leaf, the grouped sortable table, and the plan's warnings.
Everything is inline (style, script, SVG); nothing is fetched.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass
from typing import Any

from tpflax._src.cost.records import MEMORY_FIELDS, Estimate
from tpflax._src.errors import OptionError
from tpflax._src.html.assets import CSS, JS
from tpflax._src.html.slices import describe, mesh_svg
from tpflax._src.html.svg import Bar, bar_chart, esc, legend
from tpflax._src.html.table import Group, groups, spec_text, table_html
from tpflax._src.planner.decision import Plan
from tpflax._src.specs import fmt_bytes

MEMORY_COLORS = {"params": "#4c78a8", "grads": "#f58518", "opt_state": "#54a24b", "activations": "#e45756",
                 "model_state": "#72b7b2", "inputs": "#b279a2"}
COMM_COLORS = {"all-reduce": "#4c78a8", "all-gather": "#54a24b", "reduce-scatter": "#f58518",
               "all-to-all": "#b279a2"}
_ROOTS = itertools.count(1)  # one id per rendering: several reports can share a notebook page


def _memory_rows(plan: Plan, estimate: Estimate | None) -> list[tuple[str, int, int]]:
    """``(category, per device, unsharded)``; parameters alone when there is no estimate."""
    if estimate is None:
        return [("params", plan.bytes_per_device, plan.total_bytes)]
    return [(f, getattr(estimate.per_device, f), getattr(estimate.unsharded, f)) for f in MEMORY_FIELDS
            if getattr(estimate.unsharded, f) or getattr(estimate.per_device, f)]


def memory_section(plan: Plan, estimate: Estimate | None) -> str:
    """The stacked bars (sharded vs one device) and their numbers."""
    rows = _memory_rows(plan, estimate)
    bars = [Bar("sharded, per device", tuple((c, float(a)) for c, a, _ in rows), {"bar": "per_device"}),
            Bar("unsharded, one device", tuple((c, float(b)) for c, _, b in rows), {"bar": "unsharded"})]
    nums = "".join(f"<tr><td>{esc(c)}</td><td>{esc(fmt_bytes(a))}</td><td>{esc(fmt_bytes(b))}</td>"
                   f"<td>{100 * (1 - a / b) if b else 0:.1f}%</td></tr>" for c, a, b in rows)
    ta, tb = sum(a for _, a, _ in rows), sum(b for _, _, b in rows)
    # the rows' sum, as the text report labels it: "total" read as what must fit, which is the peak (not all
    # the rows are live at once, and the peak's working sets are none of them)
    label = "total" if estimate is None else "sum of rows"
    nums += (f"<tr><th>{label}</th><th>{esc(fmt_bytes(ta))}</th><th>{esc(fmt_bytes(tb))}</th>"
             f"<th>{100 * (1 - ta / tb) if tb else 0:.1f}%</th></tr>")
    if estimate is not None:
        nums += (f'<tr><th>peak per device</th><th>{esc(fmt_bytes(estimate.peak))}</th><th></th>'
                 "<th>what must fit at once</th></tr>")
    if estimate is None:
        what = ("parameters only: pass <code>tpflax.estimate(plan, optimizer, batch)</code> for gradients, "
                "optimizer state and activations")
    else:
        s = estimate.settings
        what = (f"one training step: optimizer {esc(s.get('optimizer'))}, global batch "
                f"{esc(estimate.batch.get('size'))} over {esc(estimate.batch.get('shards'))} shard(s), "
                f"activations {esc(s.get('activations', ''))}, remat {'on' if s.get('remat') else 'off'}")
    return (f'<div class="panel"><h3>Bytes per device</h3><p>{what}</p>'
            f"{bar_chart(bars, MEMORY_COLORS, kind='memory')}"
            f"{legend(MEMORY_COLORS, [c for c, _, _ in rows])}"
            f'<table class="nums"><tr><th>category</th><th>per device</th><th>unsharded</th><th>saved</th></tr>'
            f"{nums}</table></div>")


def comm_section(estimate: Estimate | None) -> str:
    """Bytes each device sends per step, one bar per mesh axis, stacked by collective."""
    head = '<div class="panel"><h3>Communication per step, by mesh axis</h3>'
    if estimate is None:
        return head + "<p>pass <code>tpflax.estimate(...)</code> to see the collectives a step needs</p></div>"
    if not estimate.comm:
        return head + "<p>none: every leaf and the batch are whole on every device</p></div>"
    axes = list(dict.fromkeys(axis for by_axis in estimate.comm.values() for axis in by_axis))
    kinds = list(estimate.comm)
    bars = [Bar(axis, tuple((k, float(estimate.comm[k].get(axis, 0.0))) for k in kinds), {"axis": axis})
            for axis in axes]
    nums = "".join(f"<tr><td>{esc(k)}</td><td>{esc(a)}</td><td>{esc(fmt_bytes(v))}</td></tr>"
                   for k, by_axis in estimate.comm.items() for a, v in by_axis.items())
    nums += f"<tr><th>total</th><th></th><th>{esc(fmt_bytes(estimate.comm_total))}</th></tr>"
    return (head + "<p>bytes each device sends (ring algorithm), forward and backward, "
            f"{len(estimate.items)} modelled collectives</p>"
            f"{bar_chart(bars, COMM_COLORS, kind='comm')}{legend(COMM_COLORS, kinds)}"
            f'<table class="nums"><tr><th>collective</th><th>axis</th><th>per step</th></tr>{nums}</table></div>')


def _default_group(gs: list[Group]) -> Group:
    """The largest sharded group (the most telling picture), else the largest."""
    sharded = [g for g in gs if g.decision.bytes_per_device < g.decision.bytes]
    return max(sharded or gs, key=lambda g: g.bytes)


def mesh_section(plan: Plan) -> str:
    """A leaf picker and one pre-rendered mesh picture per distinct (shape, spec)."""
    gs = groups(plan)
    chosen = _default_group(gs)
    options = "".join(
        f'<option value="{esc(g.pattern)}" data-view="{esc(g.view)}"{" selected" if g is chosen else ""}>'
        f'{esc(g.pattern)}{f" ×{g.count}" if g.count > 1 else ""} · {esc("×".join(map(str, g.decision.shape)))}'
        f' · {esc(spec_text(g.decision.spec))}</option>' for g in gs)
    views = {}
    for g in gs:
        if g.view not in views:
            d = g.decision
            hidden = "" if g.view == chosen.view else " hidden"
            views[g.view] = (f'<div class="mesh-view" data-view="{esc(g.view)}"{hidden}>'
                             f'<p><code>{esc(spec_text(d.spec))}</code> on shape '
                             f'<code>{esc(tuple(d.shape))}</code>: {esc(describe(d.shape, d.spec, plan.mesh))}</p>'
                             f'{mesh_svg(d.shape, d.spec, plan.mesh)}</div>')
    return (f'<div class="panel"><h3>Which slice each device holds</h3><p>mesh '
            f'{esc(" × ".join(f"{n}={s}" for n, s in plan.mesh.axes))}; each cell is one device (its '
            'position in the mesh, row-major); cells of one colour hold the same slice. Click a spec in '
            f'the table to show it here.</p><select class="leaf" aria-label="leaf">{options}</select>'
            f'{"".join(views.values())}</div>')


def _cards(plan: Plan, estimate: Estimate | None) -> str:
    n_groups = len(groups(plan))
    cards = [(" × ".join(f"{n}={s}" for n, s in plan.mesh.axes) or "1 device",
              f"{plan.mesh.size} devices · " + ", ".join(f"{n}: {r}" for n, r in plan.mesh.roles)),
             (f"{fmt_bytes(plan.bytes_per_device)}",
              f"parameters per device, of {fmt_bytes(plan.total_bytes)} ({plan.savings:.1f}% saved)"),
             (f"{len(plan.decisions)} leaves", f"in {n_groups} groups of alike layers")]
    if estimate is not None:
        # the peak, what must fit (the text report's "peak per device", suggest_mesh's fit): the card showed
        # per_device.total, the memory rows' sum, which is neither
        cards += [(fmt_bytes(estimate.peak), "peak per device per step: what must fit at once"),
                  (fmt_bytes(estimate.comm_total), "sent by each device per step")]
    out = "".join(f'<div class="card"><b>{esc(a)}</b><span>{esc(b)}</span></div>' for a, b in cards)
    warn = " warn" if plan.warnings else ""
    out += (f'<div class="card{warn}"><b>{len(plan.warnings)}</b><span>warning'
            f'{"" if len(plan.warnings) == 1 else "s"}</span></div>')
    return f'<div class="cards">{out}</div>'


def _messages(plan: Plan, estimate: Estimate | None) -> str:
    out = []
    for title, items in (("Warnings", plan.warnings), ("Traced plan vs tree heuristics (the trace wins)",
                                                        plan.disagreements),
                         ("Estimate notes", estimate.notes if estimate is not None else ())):
        if items:
            out.append(f'<h2>{esc(title)}</h2><ul class="msgs">{"".join(f"<li>{esc(m)}</li>" for m in items)}</ul>')
    return "".join(out)


def _check(plan: Any, estimate: Any) -> None:
    if not isinstance(plan, Plan):
        raise OptionError(f"the HTML report expects a tpflax.Plan, got {type(plan).__name__}; make one with "
                          "tpflax.plan(tree, mesh)")
    if estimate is not None and not isinstance(estimate, Estimate):
        raise OptionError(f"estimate must be a tpflax.Estimate (from tpflax.estimate(plan, ...)), got "
                          f"{type(estimate).__name__}")
    from tpflax._src.report import check_made_for

    check_made_for(plan, estimate=estimate)


def fragment(plan: Plan, estimate: Estimate | None = None, *, title: str | None = None) -> str:
    """The report as one ``<div>`` (style and script inside it) to embed in any page.

    >>> import jax, tpflax
    >>> f = fragment(tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2}))
    >>> f.startswith('<div class="tpflax-report"') and "<html" not in f
    True
    """
    _check(plan, estimate)
    root = f"tpflax-report-{next(_ROOTS)}"
    return (f'<div class="tpflax-report" id="{root}"><style>{CSS}</style>'
            f'<h1>{esc(title or "tpflax plan")}</h1><p class="sub">mesh {esc(plan.mesh)} · '
            f'{len(plan.decisions)} leaves · made by tpflax</p>{_cards(plan, estimate)}'
            f'<div class="charts">{memory_section(plan, estimate)}{comm_section(estimate)}</div>'
            f"<h2>Mesh</h2>{mesh_section(plan)}"
            '<h2>Per-layer plan</h2><p class="sub">one row per group of alike layers (▸ lists them); click a '
            'header to sort; sorted by bytes per device</p>'
            f'<div class="tablewrap">{table_html(plan)}</div>{_messages(plan, estimate)}'
            f'<script>{JS.replace("%ROOT%", root)}</script></div>')


def html_report(plan: Plan, estimate: Estimate | None = None, *, title: str | None = None) -> str:
    """The report as one self-contained HTML page (no external assets, no network).

    >>> import jax, tpflax
    >>> page = html_report(tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2}))
    >>> page.startswith("<!DOCTYPE html>") and "src=" not in page
    True
    """
    body = fragment(plan, estimate, title=title)
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{esc(title or 'tpflax plan')} · {esc(plan.mesh)}</title></head>"
            f'<body style="margin:0;background:#fafbfc">{body}</body></html>\n')


def write_html(path: str | os.PathLike, plan: Plan, estimate: Estimate | None = None, *,
               title: str | None = None) -> str:
    """Write :func:`html_report` to ``path`` (UTF-8); returns the path written.

    >>> import jax, tpflax, tempfile, os
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    >>> out = write_html(os.path.join(tempfile.mkdtemp(), "r.html"), p)
    >>> open(out, encoding="utf-8").read(15)
    '<!DOCTYPE html>'
    """
    text = html_report(plan, estimate, title=title)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


@dataclass(frozen=True)
class HtmlReport:
    """A plan's HTML report; notebooks display it (``_repr_html_``).

    Attributes:
        plan: the plan.
        estimate: its estimate, or None (the charts then show parameters only).
        title: the heading.
    """

    plan: Plan
    estimate: Estimate | None = None
    title: str | None = None

    def _repr_html_(self) -> str:
        return fragment(self.plan, self.estimate, title=self.title)

    def html(self) -> str:
        """The whole page, as :func:`tpflax.report` with ``fmt="html"`` writes it."""
        return html_report(self.plan, self.estimate, title=self.title)

    def save(self, path: str | os.PathLike) -> str:
        """Write the page to ``path``; returns the path."""
        return write_html(path, self.plan, self.estimate, title=self.title)


def show(plan: Plan, estimate: Any = None, *, title: str | None = None) -> HtmlReport:
    """The plan's visual report for a notebook: display the result (it has ``_repr_html_``).

    Args:
        plan: a :class:`tpflax.Plan`, or a :func:`tpflax.suggest_mesh` candidate (``suggestion[0]``: its
            plan, with its estimate unless one is given).
        estimate: ``tpflax.estimate(plan, optimizer, batch)`` (or a candidate of the plan's mesh: its
            estimate) for the memory and communication charts; without it they show parameters only.
        title: the heading (default ``"tpflax plan"``).

    Raises:
        PlanMismatchError: the estimate (or candidate) is of another mesh or plan.

    >>> import jax, optax, tpflax
    >>> p = tpflax.plan({"w": jax.ShapeDtypeStruct((64, 64), "float32")}, {"data": 2, "model": 2})
    >>> r = tpflax.show(p, tpflax.estimate(p, optax.sgd(0.1), {"x": (8, 64)}))
    >>> "data-chart=\\"comm\\"" in r._repr_html_()
    True
    """
    from tpflax._src.report import as_estimate, candidate_parts

    plan, estimate = candidate_parts(plan, estimate, "tpflax.show")
    if isinstance(plan, Plan):  # (anything else is named by _check)
        estimate = as_estimate(estimate)
    _check(plan, estimate)  # now, not later when the notebook renders it
    return HtmlReport(plan, estimate, title)
