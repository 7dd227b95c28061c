"""Collectives in compiled HLO text, and the byte convention used to count them.

``jax.jit(f).lower(*args).compile().as_text()`` is the program XLA will run;
its ``all-reduce`` / ``all-gather`` / ``reduce-scatter`` / ``all-to-all`` /
``collective-permute`` instructions are the step's real communication. This
module parses them (tuple all-reduces, ``-start``/``-done`` async pairs counted
once, ops wrapped in ``async-start`` computations, collectives inside ``while``
bodies multiplied by the loop's known trip count; the TPU compiler's async
collective fusions, whose pieces each hold a copy of one collective under one
``channel_id``, counted once; its ``all-reduce-scatter`` fusions read as the
reduce-scatters they are) and prices each one with the
**same** per-device convention the estimator uses, so the two can be compared.

Counting convention (ring algorithm, bytes one device sends, n = group size):

=====================  ==========================  =========================
kind                   ``S`` is                    bytes sent per device
=====================  ==========================  =========================
all-reduce             the buffer (result)         ``2 (n-1)/n * S``
all-gather             the gathered (result) buf.  ``(n-1)/n * S``
reduce-scatter         the full (operand) buffer   ``(n-1)/n * S``
all-to-all             the buffer (result)         ``(n-1)/n * S``
collective-permute     the buffer (result)         ``S``
=====================  ==========================  =========================

Replica groups are written three ways in HLO text: explicit
``{{0,1},{2,3}}``, iota ``[2,4]<=[8]`` / ``[4,2]<=[2,4]T(1,0)``, and mesh axes
``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}``. All three become explicit tuples of
logical device ids; :func:`group_axes` maps them back to the mesh axes they
span (logical id ``i`` is position ``i`` of ``mesh.devices.flat``).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

KINDS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")

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


def ring_bytes(kind: str, size: float, n: int) -> float:
    """Bytes one device sends for a collective under the ring algorithm.

    Args:
        kind: one of :data:`KINDS`.
        size: ``S`` as defined per kind in the module docstring (the full
            buffer: the all-reduce buffer, the gathered result, the unscattered
            operand, the all-to-all buffer, the permuted buffer).
        n: devices in the group.

    >>> ring_bytes("all-reduce", 1024, 4), ring_bytes("all-gather", 1024, 4)
    (1536.0, 768.0)
    """
    if kind == "collective-permute":
        return float(size) if n > 1 else 0.0
    if n <= 1:
        return 0.0
    factor = 2.0 if kind == "all-reduce" else 1.0
    if kind not in KINDS:
        raise ValueError(f"unknown collective kind {kind!r}; use one of {', '.join(KINDS)}")
    return factor * (n - 1) / n * float(size)


@dataclass(frozen=True)
class Collective:
    """One collective instruction of a compiled program.

    Attributes:
        kind: all-reduce, all-gather, reduce-scatter, all-to-all or collective-permute.
        name: the HLO instruction name (of the ``-start`` op for async pairs).
        shapes: result shapes per device (several for a tuple all-reduce).
        dtypes: element types of ``shapes``.
        bytes: result bytes per device.
        replica_groups: logical device ids of every group (``()`` if unknown).
        group_size: devices per group.
        ring_bytes: bytes one device sends per execution (module convention).
        count: executions per program run (``while`` trip counts multiply).
        axes: mesh axes the groups span, when parsed with a mesh.
        dimensions: gather/scatter/split dimensions, if any.
        source_target_pairs: collective-permute pairs.
        is_async: came from a ``-start``/``-done`` pair or an ``async-start`` wrapper.
        op_name: jax provenance from the instruction's metadata.
        computation: the HLO computation holding the instruction.
        channel_id: the instruction's ``channel_id`` (None when it has none).
        pieces: how many instructions of the program make up this collective (the TPU compiler
            splits one collective into an async start, continuation fusions and a done, each
            holding a copy of it under the same ``channel_id``).
    """

    kind: str
    name: str
    shapes: tuple[tuple[int, ...], ...]
    dtypes: tuple[str, ...]
    bytes: int
    replica_groups: tuple[tuple[int, ...], ...]
    group_size: int
    ring_bytes: float
    count: int = 1
    axes: tuple[str, ...] = ()
    dimensions: tuple[int, ...] = ()
    source_target_pairs: tuple[tuple[int, int], ...] = ()
    is_async: bool = False
    op_name: str = ""
    computation: str = ""
    channel_id: int | None = None
    pieces: int = 1

    @property
    def dtype(self) -> str:
        """The element type (the first one for a tuple all-reduce)."""
        return self.dtypes[0] if self.dtypes else ""

    @property
    def total_ring_bytes(self) -> float:
        """``ring_bytes * count``: what this instruction sends per program run."""
        return self.ring_bytes * self.count

    @property
    def axis_label(self) -> str:
        """``"model"``, ``"data+model"``, or ``"?"`` when the axes are unknown."""
        return "+".join(self.axes) if self.axes else "?"

    def to_dict(self) -> dict:
        return {"kind": self.kind, "name": self.name, "shapes": [list(s) for s in self.shapes],
                "dtypes": list(self.dtypes), "bytes": self.bytes, "group_size": self.group_size,
                "replica_groups": [list(g) for g in self.replica_groups], "ring_bytes": self.ring_bytes,
                "count": self.count, "axes": list(self.axes), "op_name": self.op_name,
                "channel_id": self.channel_id, "pieces": self.pieces}


# ---------------------------------------------------------------------------
# text scanning

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


def _balanced(text: str, start: int) -> int:
    """Index just past the bracket group opening at ``text[start]``."""
    pairs = {"(": ")", "{": "}", "[": "]"}
    stack = []
    i = start
    while i < len(text):
        c = text[i]
        if c in pairs:
            stack.append(pairs[c])
        elif stack and c == stack[-1]:
            stack.pop()
            if not stack:
                return i + 1
        elif c == '"':  # skip string literals (metadata, backend_config)
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            i = j
        i += 1
    return len(text)


def _scan(hlo_text: str) -> tuple[list[_Instr], dict[str, bool], int | None]:
    """Instructions with their computation, which computations are ENTRY, and num_partitions."""
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
    return instrs, entries, partitions


def _attr(attrs: str, key: str) -> str | None:
    """The raw value of ``key=`` in an attribute string (bracket-balanced)."""
    m = re.search(r"(?:^|[,\s])" + re.escape(key) + r"=", attrs)
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


# ---------------------------------------------------------------------------
# replica groups

def parse_replica_groups(text: str | None, num_devices: int | None = None) -> tuple[tuple[int, ...], ...]:
    """Explicit groups from any of HLO's replica-group spellings.

    Args:
        text: ``{{0,1},{2,3}}``, ``[2,4]<=[8]``, ``[4,2]<=[2,4]T(1,0)``,
            ``mesh['axis_0'=2,'axis_1'=4] {'axis_0'}`` or ``{}``.
        num_devices: devices in the program, for ``{}`` (one group of all).

    >>> parse_replica_groups("[2,2]<=[2,2]T(1,0)")
    ((0, 2), (1, 3))
    >>> parse_replica_groups("mesh['a'=4,'b'=2], device_ids=([2,4]T(1,0)) {'a'}")  # devices 0 4 1 5 2 6 3 7
    ((0, 1, 2, 3), (4, 5, 6, 7))
    """
    import numpy as np

    if text is None:
        return ()
    text = text.strip()
    if text.startswith("mesh["):
        return _mesh_groups(text)
    m = re.fullmatch(r"\[([\d,]*)\]<=\[([\d,]*)\](?:T\(([\d,]*)\))?", text)
    if m:
        out_dims = [int(x) for x in m.group(1).split(",") if x]
        dims = [int(x) for x in m.group(2).split(",") if x]
        ids = np.arange(math.prod(dims)).reshape(dims)
        if m.group(3):
            ids = ids.transpose([int(x) for x in m.group(3).split(",")])
        ids = ids.reshape(-1, out_dims[-1]) if out_dims else ids.reshape(1, -1)
        return tuple(tuple(int(x) for x in row) for row in ids)
    groups = tuple(tuple(int(x) for x in g.split(",") if x.strip())
                   for g in re.findall(r"\{([\d,\s]*)\}", text))
    groups = tuple(g for g in groups if g)
    if not groups and num_devices:
        return (tuple(range(num_devices)),)
    return groups


def _mesh_groups(text: str) -> tuple[tuple[int, ...], ...]:
    """Groups from ``mesh['a'=2,'b'=4] {'a'}`` (sub-axes ``'a':(pre)size`` too)."""
    import numpy as np

    head = re.match(r"mesh\[(.*?)\]", text)
    axes = re.findall(r"'?([\w.\-]+)'?\s*=\s*(\d+)", head.group(1)) if head else []
    names = [a for a, _ in axes]
    sizes = [int(s) for _, s in axes]
    ids = np.arange(math.prod(sizes)).reshape(sizes) if sizes else np.arange(1)
    dev = re.search(r"device_ids=\[([\d,\s]*)\]", text)
    iota = re.search(r"device_ids=\(\[([\d,]*)\](?:T\(([\d,]*)\))?\)", text)
    if dev:
        listed = [int(x) for x in dev.group(1).split(",") if x.strip()]
        if len(listed) == ids.size:
            ids = np.array(listed).reshape(sizes)
    elif iota:  # the devices in iota form: ([2,4]T(1,0)) is arange(8).reshape(2, 4).T, flattened
        dims = [int(x) for x in iota.group(1).split(",") if x]
        listed = np.arange(math.prod(dims)).reshape(dims)
        if iota.group(2):
            listed = listed.transpose([int(x) for x in iota.group(2).split(",")])
        if listed.size == ids.size:
            ids = listed.reshape(sizes)
    brace = text.rfind("{")
    wanted = re.findall(r"'?([\w.\-]+)'?(?::\((\d+)\)(\d+))?", text[brace + 1:text.rfind("}")]) \
        if brace >= 0 else []
    # Split every axis into (pre, size, post) pieces so sub-axes become real dims.
    split: list[list[tuple[int, int]]] = [[(0, s)] for s in sizes]  # per axis: [(pre, size)] minor pieces
    for name, pre, size in wanted:
        if pre and name in names:
            i = names.index(name)
            split[i] = sorted(set(split[i]) | {(int(pre), int(size))})
    dims, keys = [], []
    for i, s in enumerate(sizes):
        pieces = [p for p in split[i] if p[0] > 0]
        if not pieces:
            dims.append(s)
            keys.append((names[i], None))
            continue
        # one sub-axis only is supported per axis: (pre, size, rest)
        pre, size = pieces[0]
        rest = s // (pre * size)
        dims += [pre, size, rest]
        keys += [(names[i], "pre"), (names[i], (pre, size)), (names[i], "post")]
    ids = ids.reshape(dims)
    chosen = []
    for name, pre, size in wanted:
        key = (name, (int(pre), int(size))) if pre else (name, None)
        if key in keys:
            chosen.append(keys.index(key))
    if not chosen:
        return (tuple(int(x) for x in ids.reshape(-1)),)
    others = [d for d in range(len(dims)) if d not in chosen]
    flat = ids.transpose(others + chosen).reshape(-1, math.prod(dims[d] for d in chosen))
    return tuple(tuple(int(x) for x in row) for row in flat)


def group_axes(groups: Iterable[Sequence[int]], mesh: Any) -> tuple[str, ...]:
    """Mesh axes a set of device groups spans, in mesh order.

    Logical device id ``i`` is the ``i``-th device of the mesh in row-major
    order (``mesh.devices.flat``), which is how jax assigns devices to a
    program compiled with shardings on that mesh.

    Args:
        groups: device id groups (or collective-permute ``(source, target)`` pairs).
        mesh: anything :func:`tpflax.mesh_shape` accepts.

    >>> group_axes([(0, 4), (1, 5), (2, 6), (3, 7)], {"data": 2, "model": 4})
    ('data',)
    """
    axes = mesh_axes(mesh)
    sizes = [s for _, s in axes]
    total = math.prod(sizes)
    varying = set()
    for g in groups:
        coords = [_unravel(i % total, sizes) for i in g]
        for d in range(len(sizes)):
            if len({c[d] for c in coords}) > 1:
                varying.add(d)
    return tuple(axes[d][0] for d in sorted(varying))


def mesh_axes(mesh: Any) -> tuple[tuple[str, int], ...]:
    """``((name, size), ...)`` of a mesh given in any common form (no role checks).

    >>> mesh_axes("data=2,model=4")
    (('data', 2), ('model', 4))
    """
    from tpflax._src.mesh import MeshShape, parse_mesh_string

    if isinstance(mesh, MeshShape):
        return mesh.axes
    if isinstance(mesh, str):
        return tuple(parse_mesh_string(mesh).items())
    if isinstance(mesh, Mapping):
        return tuple((str(k), int(v)) for k, v in mesh.items())
    names = getattr(mesh, "axis_names", None)
    if names is not None and hasattr(mesh, "shape"):
        return tuple((n, int(mesh.shape[n])) for n in names)
    return tuple((str(n), int(s)) for n, s in mesh)


def _unravel(i: int, sizes: Sequence[int]) -> tuple[int, ...]:
    out = []
    for s in reversed(sizes):
        out.append(i % s)
        i //= s
    return tuple(reversed(out))


# ---------------------------------------------------------------------------
# parsing

_ASYNC_PAIRS = {f"{k}-start": k for k in ("all-reduce", "all-gather", "collective-permute",
                                          "reduce-scatter", "all-to-all")}


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
        for key in ("body", "calls", "to_apply", "condition", "true_computation", "false_computation"):
            v = _attr(ins.attrs, key) if key + "=" in ins.attrs else None  # substring first: _attr is slow
            if v:
                for callee in re.findall(r"%?([\w.\-]+)", v):
                    edges.setdefault(ins.computation, []).append((callee, trip if key == "body" else 1))
        v = _attr(ins.attrs, "branch_computations") if "branch_computations=" in ins.attrs else None
        if v:
            for callee in re.findall(r"%?([\w.\-]+)", v):
                edges.setdefault(ins.computation, []).append((callee, 1))
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
    instrs, entries, partitions = _scan(hlo_text)
    n_dev = num_devices or partitions
    if n_dev is None and mesh is not None:
        n_dev = math.prod(s for _, s in mesh_axes(mesh))
    mult = _multipliers(instrs, entries) if entries else {}
    done_of: dict[str, _Instr] = {}
    for ins in instrs:
        if ins.opcode.endswith("-done") and ins.opcode[:-5] + "-start" in _ASYNC_PAIRS:
            src = re.match(r"\s*(?:[^%]*\s)?%?([\w.\-]+)", ins.operands)
            if src:
                done_of[src.group(1)] = ins
    # the TPU compiler's reduce-scatter: a fusion calling an ``all-reduce-scatter.N`` computation
    # that all-reduces its inputs and keeps this device's dynamic-slice of each
    slices: dict[str, list[_Instr]] = {}
    for ins in instrs:
        if ins.opcode == "dynamic-slice" and ins.computation.startswith("all-reduce-scatter"):
            slices.setdefault(ins.computation, []).append(ins)
    out = []
    for ins in instrs:
        op = ins.opcode
        is_async = False
        if op in _ASYNC_PAIRS:
            kind, is_async = _ASYNC_PAIRS[op], True
            done = done_of.get(ins.name)
            shape_text = done.shape if done is not None else _start_result(kind, ins.shape)
        elif op in KINDS:
            kind, shape_text = op, ins.shape
            is_async = bool(ins.computation) and _called_by_async(ins.computation, instrs)
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


def _one_per_channel(collectives: list[Collective], chained=None) -> list[Collective]:
    """Merge the copies of one collective that share a ``channel_id``: it runs once.

    XLA gives every cross-device collective its own channel id. The TPU compiler
    splits an fsdp all-gather into an ``async-collective-start`` fusion, several
    ``async_collective_fusion`` continuations (each overlapping a slice of the
    transfer with compute) and an ``async-collective-done`` fusion; every one of
    them holds a copy of the same all-gather, result shape and channel id. Counting
    each copy overstated the gathers by the number of pieces (2.65x for Llama-2-7B).

    Distinct collectives can share a channel id and shapes too (XLA:TPU's ``all-reduce-scatter``
    fusions of two layers' gradients, XLA:CPU's shard_map bodies), so a copy must also be a piece
    of the same chain: ``chained(a, b)`` (from :func:`_chained`) says whether the computations
    ``a`` and ``b`` are; without it every same-key copy in another computation is merged.
    """
    groups: dict[tuple, list[tuple[int, set[str]]]] = {}  # key -> [(index in out, computations)]
    out: list[Collective | None] = []
    for c in collectives:
        # same channel, same buffer, same groups (or permute pairs), another computation of the
        # same chain: a copy. Two of them in one computation are two.
        k = ((c.kind, c.channel_id, c.shapes, c.replica_groups, c.source_target_pairs)
             if c.channel_id is not None else None)
        if k is None:
            out.append(c)
            continue
        hits = [g for g in groups.setdefault(k, []) if c.computation not in g[1]
                and (chained is None or any(chained(c.computation, x) for x in g[1]))]
        if not hits:
            groups[k].append((len(out), {c.computation}))
            out.append(c)
            continue
        i, comps = hits[0]
        comps.add(c.computation)
        for j, more in hits[1:]:  # c joins pieces seen apart (a chain written out of order)
            comps |= more
            groups[k].remove((j, more))
            c = replace(c, pieces=c.pieces + out[j].pieces, count=max(c.count, out[j].count))
            out[j] = None
        out[i] = replace(out[i], pieces=out[i].pieces + c.pieces, is_async=True, count=max(out[i].count, c.count))
    return [c for c in out if c is not None]


def _chained(instrs: list[_Instr]):
    """``chained(a, b)``: whether computations ``a`` and ``b`` are pieces of one async chain.

    The pieces of an XLA:TPU async collective are fusions each reading the one before it (the
    in-flight buffer and its flags, through ``get-tuple-element``); two fusions that each make
    their own result from other values are two collectives. A computation nothing calls with
    ``calls=`` (the entry, a loop body) is no piece. When a caller reads operands the text does not
    define (an excerpt of a module), the pieces cannot be told apart and are taken as one chain.
    """
    defined = {(i.computation, i.name): i for i in instrs}
    callers: dict[str, set[tuple[str, str]]] = {}
    reads: dict[str, set[tuple[str, str]]] = {}
    unknown: set[str] = set()
    for ins in instrs:
        callee = _attr(ins.attrs, "calls") if "calls=" in ins.attrs else None
        for comp in re.findall(r"%?([\w.\-]+)", callee or ""):
            callers.setdefault(comp, set()).add((ins.computation, ins.name))
            for name in _names(ins.operands):
                src = defined.get((ins.computation, name))
                while src is not None and src.opcode in ("get-tuple-element", "bitcast") and _names(src.operands):
                    name = _names(src.operands)[0]
                    src = defined.get((ins.computation, name))
                if src is None:
                    unknown.add(comp)
                reads.setdefault(comp, set()).add((ins.computation, name))

    def chained(a: str, b: str) -> bool:
        if a not in callers or b not in callers:
            return False
        if callers[a] & reads.get(b, set()) or callers[b] & reads.get(a, set()):
            return True
        return a in unknown or b in unknown

    return chained


def _names(operands: str) -> list[str]:
    """The instruction names an operand list reads (shapes, layouts and ``/*index=*/`` dropped)."""
    return re.findall(r"%?([\w.\-]+)", re.sub(r"/\*.*?\*/|[a-z][a-z0-9]*\[[^\]]*\](?:\{[^}]*\})?", "", operands))


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


def _called_by_async(comp: str, instrs: list[_Instr]) -> bool:
    return any(i.opcode == "async-start" and re.search(r"%?" + re.escape(comp) + r"\b", i.attrs)
               for i in instrs)


def summarize(collectives: Iterable[Collective], *, by: str = "kind", field: str = "ring_bytes") -> dict:
    """Total bytes per collective kind (or per ``(kind, axes)``).

    Args:
        collectives: from :func:`parse_collectives`.
        by: ``"kind"`` -> ``{kind: bytes}``; ``"axis"`` -> ``{(kind, "data+model"): bytes}``.
        field: ``"ring_bytes"`` (bytes each device sends, times ``count``) or
            ``"bytes"`` (result bytes, times ``count``).

    >>> c = Collective("all-gather", "ag", ((8,),), ("f32",), 32, ((0, 1),), 2, 16.0)
    >>> summarize([c, c])
    {'all-gather': 32.0}
    """
    if by not in ("kind", "axis"):
        raise ValueError(f"by must be 'kind' or 'axis', not {by!r}")
    if field not in ("ring_bytes", "bytes"):
        raise ValueError(f"field must be 'ring_bytes' or 'bytes', not {field!r}")
    out: dict = {}
    for c in collectives:
        key = c.kind if by == "kind" else (c.kind, c.axis_label)
        value = (c.ring_bytes if field == "ring_bytes" else c.bytes) * c.count
        out[key] = out.get(key, 0.0) + float(value)
    return out



# ---------------------------------------------------------------------------
# matmul flops

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
    instrs, entries, _ = _scan(hlo_text)
    looped = _multipliers(instrs, entries) if entries else {}
    once = _multipliers(instrs, entries, loops=False) if entries else {}
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
