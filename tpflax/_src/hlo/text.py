"""The HLO text scanner: instructions per computation, attributes, shapes and element sizes.

``_scan`` splits ``compiled.as_text()`` into one ``_Instr`` per instruction (name,
result shape, opcode, operands, attributes, computation); ``_attr`` reads one
attribute's raw value, ``_shapes`` the dims and element types of a shape, and
:func:`dtype_bytes` the bytes per element of an HLO type. The other modules of
this package read HLO only through these.
"""

from __future__ import annotations

import functools
import math
import re
from dataclasses import dataclass

# Bytes per element of HLO primitive types; sub-byte types count fractionally.
_DTYPE_BITS = {
    "pred": 8, "s2": 2, "u2": 2, "s4": 4, "u4": 4, "s8": 8, "u8": 8, "s16": 16, "u16": 16,
    "s32": 32, "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32, "f64": 64,
    "c64": 64, "c128": 128, "token": 0, "tf32": 32,
}


def dtype_bytes(dtype: str) -> float:
    """Bytes per element of an HLO type name (``f8e4m3fn`` and friends are 1)."""
    if dtype in _DTYPE_BITS:
        return _DTYPE_BITS[dtype] / 8
    if dtype.startswith("f8") or dtype.startswith("f6") or dtype.startswith("f4"):
        return int(dtype[1]) / 8
    raise ValueError(f"unknown HLO element type {dtype!r}")


@dataclass(frozen=True)
class _Instr:
    name: str
    shape: str
    opcode: str
    operands: str
    attrs: str
    computation: str


_COMP_HEADER = re.compile(r"^(ENTRY\s+)?%?([\w.\-]+)\s*(\(.*)?\{\s*$")
_INSTR_HEAD = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([<=0-9,]*)\]")


_BRACKETS = re.compile(r'[(){}\[\]"]')
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.S)
_CLOSING = {"(": ")", "{": "}", "[": "]"}


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]`` (string literals skipped: metadata,
    backend_config). A regex jumps from bracket to bracket: an optimised module's text is megabytes."""
    stack: list[str] = []
    pos = start
    while (m := _BRACKETS.search(text, pos)) is not None:
        c, i = m.group(), m.start()
        if c in _CLOSING:
            stack.append(_CLOSING[c])
        elif c == '"':
            lit = _STRING.match(text, i)
            if lit is None:  # an unterminated literal runs to the end
                return len(text)
            pos = lit.end()
            continue
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        pos = i + 1
    return len(text)


@functools.lru_cache(maxsize=4)
def _scan(hlo_text: str) -> tuple[tuple[_Instr, ...], dict[str, bool], int | None]:
    """Instructions with their computation, which computations are ENTRY, and num_partitions.

    Cached on the text: a dry run reads one compiled module for its collectives and for its flops. The
    result is shared, so callers must not change the ``entries`` dict."""
    instrs: list[_Instr] = []
    entries: dict[str, bool] = {}
    current = ""
    partitions = None
    for line in hlo_text.splitlines():
        if line.startswith("HloModule"):
            m = re.search(r"num_partitions=(\d+)", line)
            partitions = int(m.group(1)) if m else None
            continue
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            m = _COMP_HEADER.match(line)
            if m:
                current = m.group(2)
                entries[current] = bool(m.group(1))
            continue
        m = _INSTR_HEAD.match(line)
        if not m:
            continue
        rest = line[m.end():]
        if rest.startswith("("):
            end = _balanced(rest, 0)
            shape, rest = rest[:end], rest[end:].lstrip()
        else:
            sp = rest.find(" ")
            if sp < 0:
                continue
            shape, rest = rest[:sp], rest[sp + 1:].lstrip()
        op = re.match(r"([\w\-]+)\(", rest)
        if not op:
            continue
        close = _balanced(rest, op.end() - 1)
        instrs.append(_Instr(m.group(1), shape, op.group(1), rest[op.end():close - 1],
                             rest[close:], current))
    return tuple(instrs), entries, partitions


@functools.cache
def _key(key: str) -> re.Pattern[str]:
    return re.compile(r"(?:^|[,\s])" + re.escape(key) + r"=")


def _attr(attrs: str, key: str) -> str | None:
    """The raw value of ``key=`` in an attribute string (bracket-balanced)."""
    m = _key(key).search(attrs)
    if not m:
        return None
    i = m.end()
    if i < len(attrs) and attrs[i] in "{[(":
        if key == "replica_groups" and attrs[i] == "[":
            # iota form: [2,4]<=[8] or [4,2]<=[2,4]T(1,0)
            mm = re.match(r"\[[\d,]*\]<=\[[\d,]*\](?:T\([\d,]*\))?", attrs[i:])
            if mm:
                return mm.group(0)
        return attrs[i:_balanced(attrs, i)]
    if key == "replica_groups" and attrs.startswith("mesh[", i):
        end = _balanced(attrs, i + 4)
        brace = attrs.find("{", end)
        if brace >= 0:
            return attrs[i:_balanced(attrs, brace)]
        return attrs[i:end]
    mm = re.match(r'"(?:[^"\\]|\\.)*"|[^,\s]+', attrs[i:])
    return mm.group(0) if mm else None


def _shapes(shape_text: str) -> tuple[tuple[tuple[int, ...], ...], tuple[str, ...]]:
    shapes, dtypes = [], []
    for dt, dims in _SHAPE.findall(shape_text):
        if dt == "token":
            continue
        dims = [d.replace("<=", "") for d in dims.split(",") if d]
        shapes.append(tuple(int(d) for d in dims))
        dtypes.append(dt)
    return tuple(shapes), tuple(dtypes)


def _nbytes(shapes, dtypes) -> int:
    return int(sum(math.prod(s) * dtype_bytes(d) for s, d in zip(shapes, dtypes, strict=True)))
