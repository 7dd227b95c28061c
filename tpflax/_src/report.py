"""Plan reports: a per-layer text table with totals and warnings, or JSON.

The text table groups repeated layers by default (``h_{0..11}/mlp/c_fc/kernel
×12`` is one row) and fits the terminal; ``full=True`` lists every leaf at full
width. The JSON form records the tpflax, jax and flax versions, so a plan saved
as a lockfile says what made it (see :func:`tpflax.diff`).
"""

from __future__ import annotations

import json
import numbers
import re
import shutil
import textwrap
from collections.abc import Sequence
from typing import Any

from tpflax._src.planner.plan import Decision, Plan
from tpflax._src.specs import fmt_bytes


def spec_str(spec) -> str:
    """A PartitionSpec as the report shows it.

    >>> from jax.sharding import PartitionSpec
    >>> spec_str(PartitionSpec("model")), spec_str(PartitionSpec(None, ("data", "fsdp")))
    ("P('model')", "P(None, ('data', 'fsdp'))")
    """
    inner = ", ".join("None" if e is None else (repr(e) if isinstance(e, str) else str(tuple(e)))
                      for e in tuple(spec))
    return f"P({inner})"


def versions() -> dict[str, str]:
    """The versions that decide a plan: tpflax's, jax's and flax's.

    >>> sorted(versions())
    ['flax', 'jax', 'tpflax']
    """
    import flax
    import jax

    from tpflax import __version__

    return {"tpflax": __version__, "jax": jax.__version__, "flax": flax.__version__}


def index_set(values: Sequence[int]) -> str:
    """``{0..11}``, ``{0,2,5}``, ``{0..3,8}`` or ``{1..23 step 2}``: a set of indices, runs collapsed.

    Runs of three or more with one stride collapse, so the pair ids of 10,000
    alike layers stay one short token instead of 10,000 numbers.

    >>> index_set([3, 0, 1, 2, 8]), index_set([1, 3, 5, 7, 9])
    ('{0..3,8}', '{1..9 step 2}')
    """
    xs = sorted(set(values))
    runs: list[list[int]] = []
    for x in xs:
        r = runs[-1] if runs else None
        if r and (len(r) == 1 or x - r[-1] == r[1] - r[0]):
            r.append(x)
        else:
            runs.append([x])
    # a run shorter than three is written out: {1,2} is clearer than {1..2}
    out: list[str] = []
    for r in runs:
        if len(r) >= 3:
            step = r[1] - r[0]
            out.append(f"{r[0]}..{r[-1]}" + (f" step {step}" if step != 1 else ""))
        else:
            out.extend(map(str, r))
    return "{" + ",".join(out) + "}"


_INDEX = re.compile(r"^(.*?)(\d+)$")


def compact_paths(paths: Sequence[str]) -> str:
    """Paths of one repeated-layer group as one pattern.

    >>> compact_paths(["params/h_0/mlp/kernel", "params/h_1/mlp/kernel", "params/h_2/mlp/kernel"])
    'params/h_{0..2}/mlp/kernel'
    """
    split = [p.split("/") for p in paths]
    if len({len(s) for s in split}) != 1:
        return paths[0]
    out = []
    for column in zip(*split, strict=True):
        if len(set(column)) == 1:
            out.append(column[0])
            continue
        found = [_INDEX.match(c) for c in column]
        prefixes = {m.group(1) for m in found if m}
        if all(found) and len(prefixes) == 1:
            out.append(prefixes.pop() + index_set([int(m.group(2)) for m in found if m]))
        else:
            out.append("{" + ",".join(dict.fromkeys(column)) + "}")
    return "/".join(out)


def grouped(plan: Plan) -> list[tuple[list[str], Decision]]:
    """Leaves of one repeated-layer group with the same kind, shape, dtype, strategy and spec, in tree order."""
    groups: dict[tuple, list[str]] = {}
    for path, d in plan.decisions.items():
        key = (d.group or path, d.kind, d.shape, d.dtype, d.label, tuple(d.spec), d.trainable)
        groups.setdefault(key, []).append(path)
    return [(paths, plan.decisions[paths[0]]) for paths in groups.values()]


def _group_reason(plan: Plan, paths: list[str], name: str) -> str:
    """The first leaf's reason, with its layer indices and pair id widened to the group's."""
    first = plan.decisions[paths[0]]
    reason = first.reason
    for mine, theirs in zip(paths[0].split("/"), name.split("/"), strict=False):
        if mine != theirs:
            reason = re.sub(rf"(?<![\w]){re.escape(mine)}(?![\w])", theirs, reason)
    ids = [plan.decisions[p].pair for p in paths]
    if first.pair is not None and len(set(ids)) > 1:
        reason = re.sub(rf"\bpair {first.pair}\b", "pairs " + index_set([i for i in ids if i is not None]), reason)
    return reason


def table_rows(plan: Plan, full: bool = True) -> list[list[str]]:
    """One row per leaf (``full``), or per group of alike repeated layers (``path ×n``)."""
    rows = []
    for paths, d in ([([p], d) for p, d in plan.decisions.items()] if full else grouped(plan)):
        name = compact_paths(paths)
        reason = d.reason if len(paths) == 1 else _group_reason(plan, paths, name)
        rows.append([name + _frozen(d) + (f" ×{len(paths)}" if len(paths) > 1 else ""), d.kind,
                     "x".join(map(str, d.shape)) or "()", d.dtype, d.label, spec_str(d.spec),
                     fmt_bytes(d.bytes), fmt_bytes(d.bytes_per_device), reason])
    return rows


def _frozen(d: Decision) -> str:
    """``*`` after the path of a float parameter the run does not train (``trainable=``, ``optimizer=``; the
    title says what it means): no gradient, optimizer state or gradient collectives are priced for it."""
    return "*" if not d.trainable and d.kind not in ("int", "state") else ""


# the narrowest width a report wraps to: its table's columns (kind, shape, strategy, spec, per device) take 60
MIN_WIDTH = 60
HEADER = ["path", "kind", "shape", "dtype", "strategy", "spec", "bytes", "per device", "reason"]


def _clip(text: str, width: int, middle: bool = False) -> str:
    if len(text) <= width:
        return text
    if middle:  # a path: keep its start and its leaf name
        head = (width - 1) // 2
        return text[:head] + "…" + text[len(text) - (width - 1 - head):]
    return text[:width - 1] + "…"


def _common_root(paths: Sequence[str]) -> str:
    """``params/`` when every path starts with it (and goes deeper): said once, in the title."""
    roots = {p.split("/", 1)[0] for p in paths}
    return f"{roots.pop()}/" if len(roots) == 1 and all("/" in p for p in paths) else ""


def table_lines(plan: Plan, *, reasons: bool = True, full: bool = False, width: int | None = None) -> list[str]:
    """The per-leaf table: every leaf at full width (``full``), or alike layers grouped to fit ``width``.

    The compact table leaves out what the title or the totals already say (one
    dtype, the common ``params/`` root, total bytes) and puts each reason on its
    own indented lines when the row leaves less than 30 columns for it.
    """
    rows = table_rows(plan, full)
    title = f"tpflax plan  mesh {plan.mesh}  roles " + ", ".join(f"{n}:{r}" for n, r in plan.mesh.roles)
    keep = list(HEADER if reasons else HEADER[:-1])
    dtypes = {d.dtype for d in plan.decisions.values()}
    root = "" if full else _common_root(list(plan.decisions))
    if not full:
        keep.remove("bytes")
        if len(dtypes) == 1:  # one dtype for every leaf: say it once
            keep.remove("dtype")
            title += f"  dtype {next(iter(dtypes))}"
        if root:
            title += f"  paths under {root}"
            rows = [[r[0][len(root):], *r[1:]] for r in rows]
    frozen = sum(1 for d in plan.decisions.values() if _frozen(d))
    if frozen:
        title += f"  {frozen} of {len(plan.decisions)} leaves frozen (path*)"
    if plan.options.get("tokens_from") == "default" and plan.options.get("tokens"):
        # the reasons' "N tokens per step" is the default, not the training batch: a tiny batch splits small
        # tables a default-priced plan keeps whole (and the other way round)
        title += f"  priced for {plan.options['tokens']:,} tokens/step (the default: pass batch=, or --batch)"
    cols = [HEADER.index(h) for h in keep]
    rows = [[r[i] for i in cols] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(keep)]
    notes: list[str] = []  # reasons on lines of their own
    if full:
        widths[0] = min(widths[0], 60)
    elif width is not None:
        if reasons:
            room = width - sum(widths[1:-1]) - 2 * (len(keep) - 1) - widths[0]
            if room >= 30:
                widths[-1] = room
            else:
                notes = [r[-1] for r in rows]
                keep, rows, widths = keep[:-1], [r[:-1] for r in rows], widths[:-1]
        if not reasons or notes:
            widths[0] = min(widths[0], width - sum(widths[1:]) - 2 * (len(keep) - 1))
    stacked = not full and width is not None and widths[0] < 24  # narrow: the path gets a line of its own
    if stacked:
        paths = [r[0] for r in rows]
        keep, rows, widths = keep[1:], [r[1:] for r in rows], widths[1:]
    last = len(keep) - 1

    def line(cells):
        if not full and width is not None:
            cells = [_clip(c, w, middle=i == 0) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(c.ljust(w) if i < last else c for i, (c, w) in enumerate(zip(cells, widths, strict=True)))

    indent = "  " if stacked else ""
    out = [title, *(["path"] if stacked else []), indent + line(keep), *(["    reason"] if notes else []),
           indent + line(["-" * w for w in widths])]
    for i, r in enumerate(rows):
        if stacked:
            out.append(_clip(paths[i], width or 0, middle=True))
        out.append(indent + line(r))
        if notes:
            out += textwrap.wrap(notes[i], width or 80, initial_indent="    ", subsequent_indent="    ",
                                 break_on_hyphens=False)
    return [*_wrap(out[:1], width), *out[1:]]


def _wrap(lines: list[str], width: int | None, indent: str = "      ") -> list[str]:
    if width is None:
        return lines
    return [w for x in lines for w in textwrap.wrap(x, width, subsequent_indent=indent, break_on_hyphens=False)
            or [""]]


def check_made_for(plan: Plan, **others: Any) -> None:
    """A PlanMismatchError when an estimate or dry run (``estimate=``, ``dry_run=``) was made for another mesh
    than ``plan``'s: a report would show its numbers under the plan's header."""
    from tpflax._src.errors import PlanMismatchError

    for key, other in others.items():
        made_for = getattr(other, "mesh", None)
        name = key.replace("_", " ")
        fix = (f"report a plan with its own {name} (tpflax.estimate(plan, ...), "
               "tpflax.dry_run(step, plan, mesh))")
        if made_for is not None and getattr(made_for, "sizes", made_for) != plan.mesh.sizes:
            raise PlanMismatchError(f"the {name} was made for mesh {made_for}, the plan is for {plan.mesh}: {fix}")
        leaves = getattr(other, "made_for", None)
        if leaves and isinstance(leaves, tuple):
            problems = _leaf_mismatches(leaves, plan)
            if problems:
                raise PlanMismatchError(f"the {name} was made for another plan than this one (its figures would be "
                                        f"shown under this plan's table): {fix}", problems)


def _leaf_mismatches(leaves: Sequence[tuple], plan: Plan, most: int = 5) -> list[str]:
    """What differs between an estimate's :attr:`~tpflax.Estimate.made_for` and ``plan``'s leaves (up to ``most``)."""
    from tpflax._src.cost.records import plan_leaves

    theirs = {p: rest for p, *rest in leaves}
    ours = {p: rest for p, *rest in plan_leaves(plan.decisions)}
    kinds = ([f"{p}: in the plan, not priced" for p in ours if p not in theirs],
             [f"{p}: priced, not in the plan" for p in theirs if p not in ours],
             [f"{p}: {d}{list(s)} {spec} in the plan, priced as {theirs[p][1]}{list(theirs[p][0])} {theirs[p][2]}"
              for p, (s, d, spec) in ours.items() if p in theirs and (s, d, spec) != tuple(theirs[p])])
    out = [k[i] for i in range(max(map(len, kinds))) for k in kinds if i < len(k)]  # some of each kind first
    return out[:most] + ([f"... and {len(out) - most} more"] if len(out) > most else [])


def candidate_parts(plan: Any, estimate: Any, call: str) -> tuple[Any, Any]:
    """``(plan, estimate)`` as :func:`report` and :func:`tpflax.show` show them when either is a
    :func:`tpflax.suggest_mesh` candidate: a candidate in the plan's place is its own layout and estimate
    (``show(candidate)``); one in the estimate's place gives its estimate, which must be of the plan's mesh.

    ``show(plan, candidate)`` was refused ("estimate must be a tpflax.Estimate ..., got Candidate") and
    ``report(candidate)`` too ("expects a tpflax.Plan"), though ``report(plan, candidate)`` took it.

    Raises:
        PlanMismatchError: the candidate is of another mesh than the plan (naming both and what to pass).
    """
    from tpflax._src.errors import PlanMismatchError
    from tpflax._src.suggest.records import Candidate

    if isinstance(plan, Candidate):
        if estimate is plan:
            estimate = None
        if estimate is None:
            return plan.plan, plan.estimate
        plan = plan.plan
    if isinstance(estimate, Candidate) and estimate.mesh.sizes != getattr(getattr(plan, "mesh", None), "sizes", None) \
            and isinstance(plan, Plan):
        raise PlanMismatchError(f"the candidate was made for mesh {estimate.mesh}, the plan is for {plan.mesh}: show the "
                                f"candidate's own layout with {call}(candidate) (its plan and estimate), or pass "
                                f"the plan for {estimate.mesh} ({call}(candidate.plan, candidate))")
    return plan, estimate


def as_estimate(estimate: Any) -> Any:
    """``estimate`` as :func:`report` shows it: an :class:`~tpflax.Estimate`, or a :func:`tpflax.suggest_mesh`
    candidate's (``suggestion[0]``: its ``.estimate``); None as is. Anything else was shown as an estimate when it
    had ``report_lines`` (a Suggestion's ranking, a dry run under the estimate's heading) and dropped without a
    word when it had not (a candidate, ``estimate.to_dict()``)."""
    from tpflax._src.cost.records import Estimate
    from tpflax._src.errors import OptionError
    from tpflax._src.suggest.records import Candidate, Suggestion

    if estimate is None or isinstance(estimate, Estimate):
        return estimate
    if isinstance(estimate, Candidate):
        return estimate.estimate
    hint = (" (a DryRun goes in dry_run=)" if _is_dry_run(estimate) else
            " (take a candidate's: suggestion[0].estimate, with suggestion[0].plan)"
            if isinstance(estimate, Suggestion) else "")
    raise OptionError(f"estimate= takes tpflax.estimate(plan, ...)'s result (or a suggest_mesh candidate), not "
                      f"{type(estimate).__name__}{hint}")


def _is_dry_run(x: Any) -> bool:
    from tpflax._src.dryrun import DryRun

    return isinstance(x, DryRun)


def _as_dry_run(dry_run: Any) -> Any:
    """``dry_run`` as :func:`report` shows it: a :class:`~tpflax.DryRun` or None; an OptionError otherwise (it was
    dropped, or shown as compiled, without a word)."""
    from tpflax._src.errors import OptionError

    if dry_run is None or _is_dry_run(dry_run):
        return dry_run
    raise OptionError(f"dry_run= takes tpflax.dry_run(step, plan, mesh)'s result, not {type(dry_run).__name__}"
                      f"{' (an Estimate goes in estimate=)' if type(dry_run).__name__ == 'Estimate' else ''}")


def report(plan: Plan, estimate: Any = None, *, fmt: str = "text", reasons: bool = True,
           pairs: bool = False, dry_run: Any = None, full: bool = False, width: int | None = None,
           why: Any = None) -> str:
    """Render a plan (and optionally an estimate) as text or JSON.

    Args:
        plan: the plan, or a ``tpflax.suggest_mesh`` candidate (its plan, with its estimate unless one is given).
        estimate: ``tpflax.estimate``'s result, a ``tpflax.suggest_mesh`` candidate of the plan's mesh (its
            estimate), or None.
        fmt: ``"text"`` or ``"json"``.
        reasons: include the reason column in text.
        pairs: list the column/row pairs in text.
        dry_run: a ``tpflax.dry_run`` result: what XLA compiled, set beside the
            estimate (memory and collectives, with relative errors) when both are given.
        full: one row per leaf at full width; by default repeated layers share a
            row (``h_{0..11}/mlp/c_fc/kernel ×12``) and lines fit ``width``.
        width: columns to fit, at least 60 (default: the terminal's, at least 60, else 100).
        why: a file path: also write there every candidate layout the chooser
            priced for each leaf, with its cost (see :mod:`tpflax._src.why`). A leaf's
            path (``"params/h_0/mlp/c_fc/kernel"``, or as the table shows it, without
            ``params/``) instead adds that leaf's candidates to the report.

    >>> import jax
    >>> from tpflax import plan
    >>> p = plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    >>> "savings" in report(p)
    True
    """
    from tpflax._src.errors import OptionError

    plan, estimate = candidate_parts(plan, estimate, "tpflax.report")
    if not isinstance(plan, Plan):
        raise OptionError(f"report() expects a tpflax.Plan (or a tpflax.suggest_mesh candidate), got "
                          f"{type(plan).__name__}; make one with tpflax.plan(tree, mesh)")
    estimate, dry_run = as_estimate(estimate), _as_dry_run(dry_run)
    check_made_for(plan, estimate=estimate, dry_run=dry_run)
    if width is not None and (isinstance(width, bool) or not isinstance(width, numbers.Integral) or width < 1):
        raise OptionError(f"width {width!r} must be a positive number of columns (or None: the terminal's)")
    if width is not None and width < MIN_WIDTH:  # the title and pairs broke into a letter a line
        raise OptionError(f"width {width} is too narrow for the plan's table: give at least {MIN_WIDTH} columns, "
                          "None (the terminal's, at least that) or full=True (no width)")
    if fmt not in ("text", "json", "html"):
        raise OptionError(f"fmt must be 'text', 'json' or 'html', not {fmt!r}")
    from tpflax._src.why import leaf_named, why_text, write_why

    leaf = leaf_named(plan, why)
    if why is not None and leaf is None:  # once the arguments are known good: a refused call writes nothing
        write_why(plan, why)
    if fmt == "json":
        data = json.loads(plan.to_json())
        data["versions"] = versions()
        if estimate is not None and hasattr(estimate, "to_dict"):
            data["estimate"] = estimate.to_dict()
        if dry_run is not None and hasattr(dry_run, "to_dict"):
            data["dry_run"] = dry_run.to_dict()
            if estimate is not None and hasattr(dry_run, "compare"):
                data["estimate_vs_compiled"] = dry_run.compare(estimate).to_dict()
        if leaf is not None:
            data["why"] = {"leaf": leaf, "text": why_text(plan, leaf)}
        return json.dumps(data, indent=2)
    if fmt == "html" and leaf is not None:
        raise OptionError(f"why={why!r} names a leaf: a leaf's candidates are shown in the text and JSON reports; "
                          "give the HTML report a file path to write them to (why='why.txt')")
    if fmt == "html":  # the visual report: one self-contained page
        from tpflax._src.html.page import html_report

        return html_report(plan, estimate)
    if not full and width is None:  # a narrower terminal gets lines that run over, not a letter a line
        width = max(shutil.get_terminal_size((100, 24)).columns, MIN_WIDTH)
    width = None if full else width
    out = table_lines(plan, reasons=reasons, full=full, width=width)
    shown = len(plan.decisions) if full else len(grouped(plan))
    n = len(plan.decisions)
    counts: dict[str, int] = {}
    for d in plan.decisions.values():
        counts[d.label] = counts.get(d.label, 0) + 1
    out.append("")
    out += _wrap([f"leaves: {n}   strategies: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))],
                 width)
    if shown < n:
        out += _wrap([f"rows: {shown} (alike repeated layers share a row; --full / full=True lists every leaf)"],
                     width)
    out.append(f"parameters without sharding: {fmt_bytes(plan.total_bytes)}")
    out.append(f"parameters on the fullest device: {fmt_bytes(plan.bytes_per_device)}")
    out.append(f"savings per device: {plan.savings:.1f}%")
    if pairs and plan.pairs:
        out.append("")
        out.append("pairs:")
        for p in plan.pairs:
            state = "sharded" if p.sharded else f"not sharded ({p.note})"
            out += _wrap([f"  {p.id:>3} {p.kind:<9} {', '.join(p.columns)} -> {', '.join(p.rows)}  "
                          f"[{p.size}, {state}]"], width, " " * 16)
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
        out += _wrap([f"  ~ {d}" for d in plan.disagreements], width)
    if plan.warnings:
        out.append("")
        out.append(f"warnings ({len(plan.warnings)}):")
        out += _wrap([f"  ! {w}" for w in plan.warnings], width)
    if leaf is not None:  # that leaf's priced candidates, as why= writes them for every leaf
        out += ["", *why_text(plan, leaf).rstrip("\n").splitlines()]
    return "\n".join(out)
