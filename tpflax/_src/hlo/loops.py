"""How often each computation of an HLO module runs per program run.

Calls (fusions, ``to_apply``, conditionals, ``async-start``) run once per call,
a ``while`` body as often as its trip count: ``known_trip_count`` in its
``backend_config``, or read from the loop's condition when the compiler dropped it.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping

from tpflax._src.hlo.text import _attr, _Instr, _scan


@functools.lru_cache(maxsize=8)
def text_multipliers(hlo_text: str, loops: bool = True) -> Mapping[str, int]:
    """:func:`_multipliers` of a module's text, cached on it as :func:`_scan` is: a dry run reads one module for
    its collectives and for its FLOPs with and without the loops. Shared: callers must not change it."""
    instrs, entries, _ = _scan(hlo_text)
    return _multipliers(instrs, entries, loops=loops) if entries else {}


def _multipliers(instrs: list[_Instr], entries: Mapping[str, bool], *, loops: bool = True) -> dict[str, int]:
    """How often each computation runs per program run (while trip counts multiply; not with ``loops=False``)."""
    edges: dict[str, list[tuple[str, int]]] = {}
    by_comp: dict[str, dict[str, _Instr]] = {}  # computation -> {name: instruction}, built once
    for ins in instrs:
        by_comp.setdefault(ins.computation, {})[ins.name] = ins
    for ins in instrs:
        if ins.opcode in ("async-done", "async-update"):
            continue  # the wrapped computation is counted once, at async-start
        trip = 1
        if ins.opcode == "while":
            m = re.search(r'"known_trip_count"\s*:\s*\{\s*"n"\s*:\s*"?(\d+)', ins.attrs)
            trip = int(m.group(1)) if m else _trip_from_condition(ins, by_comp)
            trip = trip if loops else 1
        for key in ("body", "calls", "to_apply", "condition", "true_computation", "false_computation",
                    "branch_computations"):
            v = _attr(ins.attrs, key) if key + "=" in ins.attrs else None  # substring first: _attr is slow
            if v:
                for callee in re.findall(r"%?([\w.\-]+)", v):
                    edges.setdefault(ins.computation, []).append((callee, trip if key == "body" else 1))
    mult: dict[str, int] = {}

    def visit(comp: str, factor: int, depth: int = 0) -> None:
        if depth > 64:
            return
        mult[comp] = mult.get(comp, 0) + factor
        for callee, trip in edges.get(comp, ()):
            visit(callee, factor * trip, depth + 1)

    roots = [c for c, is_entry in entries.items() if is_entry] or list(entries)[-1:]
    for r in roots:
        visit(r, 1)
    return mult


def _trip_from_condition(loop: _Instr, by_comp: Mapping[str, Mapping[str, _Instr]]) -> int:
    """A ``while`` loop's trip count read from its condition: ``counter < N``, counter starting at c.

    XLA:TPU's optimised HLO drops ``known_trip_count``; a ``lax.scan`` still
    compares its tuple's counter with a constant. 1 when the shape is not that.
    """
    cond = _attr(loop.attrs, "condition")
    by_name = by_comp.get(cond.lstrip("%"), {}) if cond else {}
    for cmp in (i for i in by_name.values() if i.opcode == "compare" and "direction=LT" in i.attrs):
        names = _operand_names(cmp)
        if len(names) != 2 or names[1] not in by_name or by_name[names[1]].opcode != "constant":
            continue
        gte = by_name.get(names[0])
        index = re.search(r"index=(\d+)", gte.attrs) if gte is not None else None
        start = _tuple_constant(loop, int(index.group(1)), by_comp.get(loop.computation, {})) if index else 0
        n = _int_constant(by_name[names[1]])
        return max(n - start, 1) if n is not None else 1
    return 1


def _operand_names(ins: _Instr) -> list[str]:
    return [x.strip().split()[-1].lstrip("%") for x in ins.operands.split(",")]


def _int_constant(ins: _Instr | None) -> int | None:
    """The value of an integer ``constant`` instruction, else None."""
    if ins is None or ins.opcode != "constant":
        return None
    try:
        return int(ins.operands.strip())
    except ValueError:
        return None


def _tuple_constant(loop: _Instr, index: int, found: Mapping[str, _Instr]) -> int:
    """The integer constant at ``index`` of the loop's initial tuple, else 0 (a scan's counter starts there)."""
    tup = found.get(_operand_names(loop)[0])
    if tup is None or tup.opcode != "tuple":
        return 0
    parts = _operand_names(tup)
    c = _int_constant(found.get(parts[index])) if index < len(parts) else None
    return c if c is not None else 0
