"""Collectives in compiled HLO text (:func:`parse_collectives`).

``jax.jit(f).lower(*args).compile().as_text()`` is the program XLA will run;
its ``all-reduce`` / ``all-gather`` / ``reduce-scatter`` / ``all-to-all`` /
``collective-permute`` instructions are the step's real communication (a
``ragged-all-to-all``, experts' token dispatch, is read as an all-to-all of its
operand: the rows it sends depend on the routing, at most all of them). This
module parses them (tuple all-reduces, ``-start``/``-done`` async pairs counted
once, ops wrapped in ``async-start`` computations, collectives inside ``while``
bodies multiplied by the loop's known trip count; the TPU compiler's async
collective fusions, whose pieces each hold a copy of one collective under one
``channel_id``, counted once; its ``all-reduce-scatter`` fusions read as the
reduce-scatters they are) and prices each one with the
**same** per-device convention the estimator uses (:mod:`tpflax._src.hlo.records`),
so the two can be compared.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

from tpflax._src.hlo.channels import _chained, _names, _one_per_channel
from tpflax._src.hlo.groups import group_axes, mesh_axes, parse_replica_groups
from tpflax._src.hlo.loops import text_multipliers
from tpflax._src.hlo.records import KINDS, Collective, ring_bytes
from tpflax._src.hlo.text import _SHAPE, _attr, _Instr, _nbytes, _scan, _shapes

_ASYNC_PAIRS = {f"{k}-start": k for k in ("all-reduce", "all-gather", "collective-permute",
                                          "reduce-scatter", "all-to-all")}


def parse_collectives(hlo_text: str, mesh: Any = None, *, num_devices: int | None = None) -> list[Collective]:
    """Every collective of an HLO module, priced with the module's ring convention.

    Args:
        hlo_text: ``compiled.as_text()`` (or any HLO module text, or lines of it).
        mesh: optional mesh (shape, dict, ``jax.sharding.Mesh``) to fill ``axes``.
        num_devices: devices in the program, for ``replica_groups={}``; read
            from ``num_partitions=`` in the module header when present.

    Returns:
        Collectives in program order; async ``-start``/``-done`` pairs appear once.

    >>> hlo = ("ENTRY %main {\\n"
    ...        "  %ar = f32[8,32]{1,0} all-reduce(f32[8,32]{1,0} %x), replica_groups=[2,4]<=[8], to_apply=%add\\n"
    ...        "}")
    >>> c = parse_collectives(hlo, {"data": 2, "model": 4})[0]
    >>> c.kind, c.bytes, c.group_size, c.ring_bytes, c.axes
    ('all-reduce', 1024, 4, 1536.0, ('model',))
    """
    instrs, _, partitions = _scan(hlo_text)
    n_dev = num_devices or partitions
    if n_dev is None and mesh is not None:
        n_dev = math.prod(s for _, s in mesh_axes(mesh))
    mult = text_multipliers(hlo_text)
    done_of: dict[str, _Instr] = {}
    for ins in instrs:
        if ins.opcode.endswith("-done") and ins.opcode[:-5] + "-start" in _ASYNC_PAIRS:
            src = re.match(r"\s*(?:[^%]*\s)?%?([\w.\-]+)", ins.operands)
            if src:
                done_of[src.group(1)] = ins
    # the TPU compiler's reduce-scatter: a fusion calling an ``all-reduce-scatter.N`` computation
    # that all-reduces its inputs and keeps this device's dynamic-slice of each
    slices = _fused_slices(instrs)
    wrapped = _async_wrapped(instrs)
    out = []
    for ins in instrs:
        op = ins.opcode
        is_async = False
        if op in _ASYNC_PAIRS:
            kind, is_async = _ASYNC_PAIRS[op], True
            done = done_of.get(ins.name)
            shape_text = done.shape if done is not None else _start_result(kind, ins.shape)
        elif op in KINDS or op == "ragged-all-to-all":
            ragged = op == "ragged-all-to-all"
            kind, shape_text = ("all-to-all", _ragged_buffer(ins, instrs)) if ragged else (op, ins.shape)
            is_async = ins.computation in wrapped
        else:
            continue
        shapes, dtypes = _shapes(shape_text)
        nbytes = _nbytes(shapes, dtypes)
        pairs: tuple[tuple[int, int], ...] = ()
        if kind == "collective-permute":
            raw = _attr(ins.attrs, "source_target_pairs") or "{}"
            pairs = tuple((int(a), int(b)) for a, b in re.findall(r"\{\s*(\d+)\s*,\s*(\d+)\s*\}", raw))
            groups: tuple[tuple[int, ...], ...] = pairs
            n = 2 if any(a != b for a, b in pairs) else 1
        else:
            groups = parse_replica_groups(_attr(ins.attrs, "replica_groups"), n_dev)
            n = len(groups[0]) if groups else (n_dev or 1)
        if kind == "all-reduce" and ins.computation in slices:
            kind, shapes, dtypes, nbytes = _scattered(shapes, dtypes, nbytes, slices[ins.computation], n)
        dims_raw = _attr(ins.attrs, "dimensions") or ""
        dims = tuple(int(x) for x in re.findall(r"\d+", dims_raw))
        size = nbytes * n if kind == "reduce-scatter" else nbytes
        op_name = ""
        meta = re.search(r'op_name="((?:[^"\\]|\\.)*)"', ins.attrs)
        if meta:
            op_name = meta.group(1)
        channel = _attr(ins.attrs, "channel_id")
        axes: tuple[str, ...] = ()
        if mesh is not None and groups:
            try:
                axes = group_axes(groups, mesh)
            except Exception:  # noqa: BLE001 - a mesh that does not fit leaves axes unknown
                axes = ()
        out.append(Collective(
            kind=kind, name=ins.name, shapes=shapes, dtypes=dtypes, bytes=nbytes,
            replica_groups=groups if kind != "collective-permute" else (), group_size=n,
            ring_bytes=ring_bytes(kind, size, n) if kind != "collective-permute" or pairs else 0.0,
            count=max(1, mult.get(ins.computation, 1)), axes=axes, dimensions=dims,
            source_target_pairs=pairs, is_async=is_async, op_name=op_name,
            computation=ins.computation, channel_id=int(channel) if channel and channel.isdigit() else None))
    return _one_per_channel(out, _chained(instrs))


def _ragged_buffer(ins: _Instr, instrs: tuple[_Instr, ...]) -> str:
    """The buffer a ``ragged-all-to-all`` is priced on: the smaller of its operand (the rows it may send) and
    its result (the output buffer they are written into). The rows it sends depend on the routing: at most all
    of them, which the estimate's trace prices too. The TPU compiler prints operands without their shapes, so
    the operand's is looked up by name in its computation."""
    first = re.match(r"\s*(?:([a-z][a-z0-9]*\[[^\]]*\]\S*)\s+)?%?([\w.\-]+)", ins.operands)  # [type] name
    if first is None:
        return ins.shape
    typed, name = first.groups()
    operand = typed or next(
        (i.shape for i in instrs if i.name == name and i.computation == ins.computation), ins.shape)
    return operand if _nbytes(*_shapes(operand)) <= _nbytes(*_shapes(ins.shape)) else ins.shape


def _fused_slices(instrs: list[_Instr]) -> dict[str, list[_Instr]]:
    """Per ``all-reduce-scatter`` fusion computation, the dynamic-slices of its all-reduce's result.

    Only slices of the reduced buffer count: on a mesh with more than one axis the fusion also
    looks this device's shard index up in a ``u32[N]`` table with a dynamic-slice of a constant.
    """
    reduced: dict[str, set[str]] = {}
    out: dict[str, list[_Instr]] = {}
    for ins in instrs:
        if not ins.computation.startswith("all-reduce-scatter"):
            continue
        names = reduced.setdefault(ins.computation, set())
        source = (_names(ins.operands) or [""])[0]
        if ins.opcode == "all-reduce" or (ins.opcode == "get-tuple-element" and source in names):
            names.add(ins.name)
        elif ins.opcode == "dynamic-slice" and source in names:
            out.setdefault(ins.computation, []).append(ins)
    return out


def _scattered(shapes, dtypes, nbytes: int, slices: list[_Instr], n: int) -> tuple:
    """``(kind, shapes, dtypes, bytes)`` of an all-reduce inside an ``all-reduce-scatter`` fusion.

    Each device keeps a ``1/n`` slice of the sum (the fusion's dynamic-slices), so it is a
    reduce-scatter of the all-reduced buffer (libtpu 0.0.42.1 emits it for fsdp gradients that
    are constrained to their shards). Left an all-reduce if the slices are not ``1/n`` of it.
    """
    got, types = _shapes(",".join(x.shape for x in slices))
    if not got or _nbytes(got, types) * n != nbytes:
        return "all-reduce", shapes, dtypes, nbytes
    return "reduce-scatter", got, types, _nbytes(got, types)


def _start_result(kind: str, shape_text: str) -> str:
    """Result shape of a ``-start`` op with no ``-done``: its tuple's second half."""
    if kind == "all-reduce" or not shape_text.startswith("("):
        return shape_text
    inner = shape_text[1:-1]
    parts, depth, cur = [], 0, ""
    for c in inner:
        if c in "({[":
            depth += 1
        elif c in ")}]":
            depth -= 1
        if c == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += c
    parts.append(cur)
    arrays = [p for p in parts if _SHAPE.search(p) and not re.match(r"\s*[su]32\[\]", p)]
    return ",".join(arrays[len(arrays) // 2:]) if len(arrays) > 1 else ",".join(arrays)


def _async_wrapped(instrs: Sequence[_Instr]) -> set[str]:
    """The computations an ``async-start`` calls (``calls=%name``): a collective in one runs asynchronously.
    One pass over the module (a search per collective over every instruction was quadratic: 0.72 s and 1.70 s of
    reading the zoo llama unrolled to 12 and 24 layers, benchmarks/hlo_read_speed.py)."""
    out: set[str] = set()
    for ins in instrs:
        if ins.opcode == "async-start":
            out.update(re.findall(r"%?([\w.\-]+)", _attr(ins.attrs, "calls") or ""))
    return out
