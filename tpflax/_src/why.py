"""Why a plan chose each layout: every candidate the chooser priced, with its cost.

``tpflax.report(plan, why=PATH)`` and ``tpflax plan MODEL --mesh ... --why PATH``
write this text. Leaves of one repeated-layer group (``Decision.group``) with
the same candidates are shown once.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from tpflax._src.errors import OptionError
from tpflax._src.specs import fmt_bytes


def _spec(spec: Any) -> str:
    inner = ", ".join("None" if e is None else (repr(e) if isinstance(e, str) else str(tuple(e)))
                      for e in tuple(spec))
    return f"P({inner})"


def why_text(plan: Any, leaf: str | None = None) -> str:
    """Every priced candidate of every decision group, leaf by leaf (repeated layers once); of one leaf's only
    with ``leaf`` (a path of ``plan.decisions``, :func:`leaf_named`).

    >>> import jax, tpflax
    >>> S = jax.ShapeDtypeStruct
    >>> p = tpflax.plan({"wte": {"embedding": S((1003, 32), "float32")}}, {"data": 2, "model": 4})
    >>> print(why_text(p).splitlines()[5])
    wte/embedding  (1003, 32) float32: P(None, None)
    """
    opts = plan.options
    out = [f"tpflax plan: candidate layouts and their costs  (mesh {plan.mesh}; priced on "
           f"{opts.get('hardware', '?')}, {opts.get('tokens', '?')} tokens per step)",
           "  bytes/device: the group's parameters, gradients and two optimizer moments on one device (a "
           "frozen leaf: its parameters), not the plan's parameter bytes per device",
           "  comm/step: bytes one device sends per step for the group (ring algorithm); each collective "
           "under it names its payload, the array reduced or gathered",
           "  flops: the group's matmul flops per device per step; step time: the group's, on that hardware",
           ""]
    seen: dict[tuple, list[str]] = {}
    for path, d in plan.decisions.items():
        if not d.alternatives or leaf is not None and path != leaf:
            continue
        # members of one group (a pair's kernels) and alike layers share the candidates' costs
        key = tuple((a.group, a.name, a.bytes_per_device, a.comm_bytes, a.flops) for a in d.alternatives)
        if key in seen:
            seen[key].append(path)
            continue
        seen[key] = [path]
        out.append(f"{path}  {tuple(d.shape)} {d.dtype}: {_spec(d.spec)}")
        out.append(f"  {'':2}{'group':<10}{'candidate':<30}{'spec':<28}{'bytes/device':>14}{'comm/step':>12}"
                   f"{'flops':>12}{'step time':>12}")
        for a in d.alternatives:
            out.append(f"  {'*' if a.chosen else ' ':2}{a.group:<10}{a.name:<30}{_spec(a.spec):<28}"
                       f"{fmt_bytes(a.bytes_per_device):>14}{fmt_bytes(a.comm_bytes):>12}{a.flops:>12.3g}"
                       f"{a.step_time * 1e6:>9.2f} us")
            for c in dict.fromkeys(a.collectives):
                n = a.collectives.count(c)
                out.append(f"  {'':42}{c}{f'  (x{n})' if n > 1 else ''}")
        out.append(f"  reason: {d.reason}")
        out.append("")
    for paths in seen.values():
        if len(paths) > 1:
            out.append(f"{paths[0]}: the same candidates and costs for {len(paths) - 1} more leaves "
                       f"({', '.join(paths[1:4])}{', ...' if len(paths) > 4 else ''})")
    if leaf is not None and not seen:
        d = plan.decisions[leaf]
        out += [f"{leaf}  {tuple(d.shape)} {d.dtype}: {_spec(d.spec)}",
                "  no other candidate was priced for it (a rule, an annotation, a 1-device tensor axis or a "
                "leaf with one layout decided it)", f"  reason: {d.reason}"]
    elif not seen:
        out.append("no decision group had more than one candidate (rules, annotations or a 1-device tensor "
                   "axis decided every leaf)")
    return "\n".join(out) + "\n"


def leaf_named(plan: Any, why: Any) -> str | None:
    """The leaf of ``plan`` that ``why=`` names (its path, or the path under the common ``params/`` root the
    report's table shows), else None: ``why=`` is then a file to write.

    >>> import jax, tpflax
    >>> p = tpflax.plan({"params": {"w": jax.ShapeDtypeStruct((8, 8), "float32")}}, {"model": 2})
    >>> leaf_named(p, "params/w"), leaf_named(p, "w"), leaf_named(p, "why.txt")
    ('params/w', 'params/w', None)
    """
    if not isinstance(why, str):
        return None
    named = plan.decisions.named(why)  # the rule plan.spec(path) reads a path by
    return named[0] if len(named) == 1 else None


def write_why(plan: Any, path: Any) -> None:
    """Write :func:`why_text` to ``path``; an OptionError naming it when it cannot be written."""
    if not isinstance(path, (str, os.PathLike)):
        raise OptionError(f"why={path!r} is no file path: give the path of a file to write (e.g. why='why.txt')")
    text = why_text(plan)
    try:
        Path(path).write_text(text)
    except OSError as e:
        close = _close_leaves(plan, str(path)) if isinstance(e, FileNotFoundError) else []
        if close:  # a leaf's path mistyped ("h_0/mlp/c_fc/kernal"): its directory does not exist either
            raise OptionError(f"why={str(path)!r} names no leaf of the plan (did you mean "
                              f"{' or '.join(map(repr, close))}?) and cannot be written as a file "
                              f"({type(e).__name__}: {e.strerror or e}); give a leaf's path, or a file path in a "
                              "directory that exists") from e
        raise OptionError(f"why={str(path)!r} cannot be written ({type(e).__name__}: {e.strerror or e}); "
                          "give a file path in a directory that exists") from e


def _close_leaves(plan: Any, text: str) -> list[str]:
    """Up to 3 leaf paths of ``plan`` close to ``text`` (as :func:`leaf_named` reads them: whole, or under their
    root), as the report's table shows them."""
    import difflib

    names = {}
    for p in plan.decisions:
        names.setdefault(p, p)
        if "/" in p:
            names.setdefault(p.split("/", 1)[-1], p)
    return difflib.get_close_matches(text, list(names), n=3, cutoff=0.8)
