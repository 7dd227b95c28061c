"""Plan reports: a per-layer text table with totals and warnings, or JSON."""

from __future__ import annotations

import json
from typing import Any

from tpflax._src.planner.plan import Plan
from tpflax._src.specs import fmt_bytes


def _spec_str(spec) -> str:
    inner = ", ".join("None" if e is None else (repr(e) if isinstance(e, str) else str(tuple(e)))
                      for e in tuple(spec))
    return f"P({inner})"


def table_rows(plan: Plan) -> list[list[str]]:
    rows = []
    for path, d in plan.decisions.items():
        rows.append([path, d.kind, "x".join(map(str, d.shape)) or "()", d.dtype, d.label,
                     _spec_str(d.spec), fmt_bytes(d.bytes), fmt_bytes(d.bytes_per_device), d.reason])
    return rows


HEADER = ["path", "kind", "shape", "dtype", "strategy", "spec", "bytes", "per device", "reason"]


def report(plan: Plan, estimate: Any = None, *, fmt: str = "text", reasons: bool = True,
           pairs: bool = False, dry_run: Any = None, why: Any = None) -> str:
    """Render a plan (and optionally an estimate) as text or JSON.

    Args:
        plan: the plan.
        estimate: an object with a ``report_lines()`` method (e.g. ``tpflax.estimate``'s
            result) or None.
        fmt: ``"text"`` or ``"json"``.
        reasons: include the reason column in text.
        pairs: list the column/row pairs in text.
        dry_run: a ``tpflax.dry_run`` result: what XLA compiled, set beside the
            estimate (memory and collectives, with relative errors) when both are given.
        why: a file path: also write there every candidate layout the chooser
            priced for each leaf, with its cost (see :mod:`tpflax._src.why`).

    >>> import jax
    >>> from tpflax import plan
    >>> p = plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    >>> "savings" in report(p)
    True
    """
    from tpflax._src.errors import OptionError

    if not isinstance(plan, Plan):
        raise OptionError(f"report() expects a tpflax.Plan, got {type(plan).__name__}; make one with "
                          "tpflax.plan(tree, mesh)")
    if why is not None:
        from tpflax._src.why import write_why

        write_why(plan, why)
    if fmt == "json":
        data = json.loads(plan.to_json())
        if estimate is not None and hasattr(estimate, "to_dict"):
            data["estimate"] = estimate.to_dict()
        if dry_run is not None and hasattr(dry_run, "to_dict"):
            data["dry_run"] = dry_run.to_dict()
            if estimate is not None and hasattr(dry_run, "compare"):
                data["estimate_vs_compiled"] = dry_run.compare(estimate).to_dict()
        return json.dumps(data, indent=2)
    if fmt != "text":
        raise OptionError(f"fmt must be 'text' or 'json', not {fmt!r}")
    header = HEADER if reasons else HEADER[:-1]
    rows = [r if reasons else r[:-1] for r in table_rows(plan)]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    widths[0] = min(widths[0], 60)
    out = [f"tpflax plan  mesh {plan.mesh}  roles "
           + ", ".join(f"{n}:{r}" for n, r in plan.mesh.roles)]

    def line(cells):
        return "  ".join(c.ljust(w) if i < len(cells) - 1 else c for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    out.append(line(header))
    out.append(line(["-" * w for w in widths]))
    out += [line(r) for r in rows]
    n = len(plan.decisions)
    counts: dict[str, int] = {}
    for d in plan.decisions.values():
        counts[d.label] = counts.get(d.label, 0) + 1
    out.append("")
    out.append(f"leaves: {n}   strategies: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    out.append(f"parameters without sharding: {fmt_bytes(plan.total_bytes)}")
    out.append(f"parameters on the fullest device: {fmt_bytes(plan.bytes_per_device)}")
    out.append(f"savings per device: {plan.savings:.1f}%")
    if pairs and plan.pairs:
        out.append("")
        out.append("pairs:")
        for p in plan.pairs:
            state = "sharded" if p.sharded else f"not sharded ({p.note})"
            out.append(f"  {p.id:>3} {p.kind:<9} {', '.join(p.columns)} -> {', '.join(p.rows)}  "
                       f"[{p.size}, {state}]")
    if estimate is not None and hasattr(estimate, "report_lines"):
        out.append("")
        out += estimate.report_lines()
    if dry_run is not None and hasattr(dry_run, "report_lines"):
        out.append("")
        out += dry_run.report_lines()
        if estimate is not None and hasattr(dry_run, "compare"):
            out.append("")
            out += dry_run.compare(estimate).report_lines()
    if plan.disagreements:
        out.append("")
        out.append(f"traced plan vs tree heuristics ({len(plan.disagreements)} disagreements, the trace wins):")
        out += [f"  ~ {d}" for d in plan.disagreements]
    if plan.warnings:
        out.append("")
        out.append(f"warnings ({len(plan.warnings)}):")
        out += [f"  ! {w}" for w in plan.warnings]
    return "\n".join(out)
