"""Matmul flops of an HLO module: its ``dot`` and ``convolution`` instructions, each times its executions."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

from tpflax._src.hlo.loops import text_multipliers
from tpflax._src.hlo.text import _attr, _Instr, _scan, _shapes


def dot_flops(hlo_text: str, *, loops: bool = True) -> float:
    """FLOPs of an HLO module's ``dot`` and ``convolution`` instructions, each times its executions.

    A dot does ``2 * output elements * contracted elements`` (a multiply and an
    add per term, XLA's own convention); a convolution ``2 * input features per
    group`` per (output element, kernel tap) pair that reads a real input element
    (padding and ``lhs_dilate`` holes are not counted, as in XLA's cost analysis).
    Dots inside fusions count as often as the fusion runs, and a ``while`` body as
    often as its trip count (``known_trip_count``, or read from the loop's
    condition; 1 when neither is there).

    Args:
        hlo_text: ``compiled.as_text()`` (or any HLO module text).
        loops: False counts every loop body once, as XLA's ``cost_analysis()``
            does; the difference is what that analysis misses.

    >>> hlo = ("body {\\n  %p = (s32[], f32[8,16]) parameter(0)\\n"
    ...        "  %x = f32[8,16]{1,0} get-tuple-element(%p), index=1\\n"
    ...        "  %w = f32[16,16]{1,0} constant({...})\\n"
    ...        "  %d = f32[8,16]{1,0} dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}\\n}\\n"
    ...        "ENTRY main {\\n  %t = (s32[], f32[8,16]) parameter(0)\\n"
    ...        '  ROOT %l = (s32[], f32[8,16]) while(%t), condition=cond, body=body, '
    ...        'backend_config={"known_trip_count":{"n":"4"}}\\n}')
    >>> dot_flops(hlo), dot_flops(hlo, loops=False)
    (16384.0, 4096.0)
    """
    looped, once = dot_flop_counts(hlo_text)
    return looped if loops else once


def dot_flop_counts(hlo_text: str) -> tuple[float, float]:
    """:func:`dot_flops` with and without the loops' trip counts, from one reading of the HLO.

    >>> dot_flop_counts("ENTRY main {\\n  %a = f32[8,16]{1,0} parameter(0)\\n  %b = f32[16,4]{1,0} parameter(1)\\n"
    ...                 "  ROOT %d = f32[8,4]{1,0} dot(%a, %b), lhs_contracting_dims={1}, rhs_contracting_dims={0}\\n}")
    (1024.0, 1024.0)
    """
    instrs, _, _ = _scan(hlo_text)
    looped, once = text_multipliers(hlo_text), text_multipliers(hlo_text, loops=False)
    by_comp: dict[str, dict[str, _Instr]] = {}
    for ins in instrs:
        by_comp.setdefault(ins.computation, {})[ins.name] = ins
    totals = [0.0, 0.0]
    for ins in instrs:
        if ins.opcode in ("dot", "convolution"):
            flops = _matmul_flops(ins, _operand_shapes(ins, by_comp.get(ins.computation, {})))
            totals[0] += flops * looped.get(ins.computation, 1)
            totals[1] += flops * once.get(ins.computation, 1)
    return totals[0], totals[1]


def _operand_shapes(ins: _Instr, found: Mapping[str, _Instr]) -> list[tuple[int, ...] | None]:
    """Each operand's dims: written inline (``f32[8,16]{1,0} %x``) or read from its defining instruction."""
    out: list[tuple[int, ...] | None] = []
    depth, start, text = 0, 0, ins.operands + ","
    for i, c in enumerate(text):
        depth += c in "([{"
        depth -= c in ")]}"
        if c == "," and depth == 0:
            piece, start = text[start:i].strip(), i + 1
            shapes, _ = _shapes(piece.rsplit(" ", 1)[0] if " " in piece else "")
            if not shapes:
                src = found.get(piece.split()[-1].lstrip("%")) if piece else None
                shapes, _ = _shapes(src.shape) if src is not None else ((), ())
            out.append(shapes[0] if len(shapes) == 1 else None)
    return out


def _matmul_flops(ins: _Instr, operands: list[tuple[int, ...] | None]) -> float:
    """One execution's flops of a dot or convolution; 0 when an operand's shape is unknown."""
    result, _ = _shapes(ins.shape)
    if len(result) != 1 or len(operands) < 2:
        return 0.0
    out = math.prod(result[0])
    if ins.opcode == "dot":
        for side, dims in ((0, "lhs_contracting_dims"), (1, "rhs_contracting_dims")):
            shape = operands[side]
            if shape is not None:
                contracted = [int(d) for d in re.findall(r"\d+", _attr(ins.attrs, dims) or "")]
                return 2.0 * out * math.prod(shape[d] for d in contracted)
        return 0.0
    return _conv_flops(ins, result[0], operands)


def _conv_flops(ins: _Instr, result: tuple[int, ...], operands: list[tuple[int, ...] | None]) -> float:
    """A convolution's flops as XLA's cost analysis counts them: only kernel taps that land on input.

    Per spatial dim, the (output position, kernel tap) pairs that read a real input
    element (not padding, not a hole of ``lhs_dilate``) are counted; dims are independent,
    so their counts multiply. Each pair is one multiply-add per input feature of a group.
    """
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", ins.attrs)
    lhs, kernel = operands[0], operands[1]
    if lhs is None or kernel is None or labels is None or len(labels.group(2)) != len(kernel):
        return 0.0
    lhs_l, rhs_l, out_l = labels.groups()
    window = _window(_attr(ins.attrs, "window") or "", len(lhs_l) - 2)
    pairs = 1
    for d, (size, stride, pad, lhs_dil, rhs_dil) in enumerate(window):
        n_in, n_out = lhs[lhs_l.index(str(d))], result[out_l.index(str(d))]
        span = (n_in - 1) * lhs_dil
        pairs *= sum(1 for o in range(n_out) for k in range(size)
                     if 0 <= (p := o * stride + k * rhs_dil - pad) <= span and p % lhs_dil == 0)
    per_pair = math.prod(result) // max(math.prod(result[out_l.index(str(d))] for d in range(len(window))), 1)
    return 2.0 * per_pair * kernel[rhs_l.index("i")] * pairs


def _window(text: str, n: int) -> list[tuple[int, int, int, int, int]]:
    """``(size, stride, low padding, lhs_dilate, rhs_dilate)`` per spatial dim of ``window={...}``."""
    def field(key: str, default: int) -> list[int]:
        m = re.search(key + r"=([\d_x\-]+)", text)
        if not m:
            return [default] * n
        return [int(v.split("_")[0]) for v in m.group(1).split("x")]
    return list(zip(field("size", 1), field("stride", 1), field(r"\bpad", 0), field("lhs_dilate", 1),
                    field("rhs_dilate", 1), strict=True))
