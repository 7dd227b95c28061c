"""Two plans side by side: the leaves whose specs (or head-aligned layouts) differ, and what each side costs.

``tpflax.diff(a, b)`` takes plans or their JSON (``tpflax plan --json``
output). A plan saved as JSON is a lockfile: ``tpflax diff plan.lock.json -
--fail-on-change`` in CI fails when today's code, jax or flax plans differently,
and says which versions changed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.errors import OptionError
from tpflax._src.planner.plan import Plan
from tpflax._src.report import compact_paths, spec_str, versions
from tpflax._src.specs import fmt_bytes


@dataclass(frozen=True)
class Change:
    """Leaves of one repeated-layer group whose plan changed alike.

    Attributes:
        paths: the leaves.
        a, b: the spec on each side (``"-"`` where the leaf is missing), as text.
        bytes_a, bytes_b: their bytes per device on each side (summed over ``paths``).
    """

    paths: tuple[str, ...]
    a: str
    b: str
    bytes_a: int
    bytes_b: int


@dataclass(frozen=True)
class Side:
    """What one plan costs: bytes per device and, with a batch, communication per step."""

    mesh: str
    bytes_per_device: int
    comm: float | None = None
    versions: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class PlanDiff:
    """The result of :func:`diff`."""

    changes: tuple[Change, ...]
    a: Side
    b: Side

    @property
    def changed(self) -> bool:
        """True when a leaf's spec or stored layout, a leaf or the mesh differs (versions alone do not count)."""
        return bool(self.changes) or self.a.mesh != self.b.mesh

    @property
    def version_changes(self) -> dict[str, tuple[str, str]]:
        """``{package: (a's version, b's version)}`` where both sides record one and they differ."""
        return {k: (v, self.b.versions[k]) for k, v in self.a.versions.items()
                if k in self.b.versions and self.b.versions[k] != v}

    def to_dict(self) -> dict:
        return {"changed": self.changed, "version_changes": {k: list(v) for k, v in self.version_changes.items()},
                "a": vars(self.a) | {"versions": dict(self.a.versions)},
                "b": vars(self.b) | {"versions": dict(self.b.versions)},
                "changes": [{"paths": list(c.paths), "a": c.a, "b": c.b, "bytes_per_device_a": c.bytes_a,
                             "bytes_per_device_b": c.bytes_b} for c in self.changes]}

    def report_lines(self) -> list[str]:
        n = sum(len(c.paths) for c in self.changes)
        leaves = f"{n} leaves differ" if n else "same specs for every leaf"
        if self.a.mesh != self.b.mesh:  # first: equal specs on other meshes are another layout
            out = [f"tpflax diff  the meshes differ: a: mesh {self.a.mesh}  b: mesh {self.b.mesh}",
                   f"  {leaves}" + ("" if n else ", but on different meshes")]
        else:
            out = [f"tpflax diff  a: mesh {self.a.mesh}  b: mesh {self.b.mesh}  {leaves}"]
        for pkg, (va, vb) in self.version_changes.items():
            out.append(f"  {pkg} changed: {va} -> {vb}")
        for c in self.changes:
            many = f" ×{len(c.paths)}" if len(c.paths) > 1 else ""
            out.append(f"  {compact_paths(list(c.paths))}{many}")
            out.append(f"      {c.a} -> {c.b}   per device {fmt_bytes(c.bytes_a)} -> {fmt_bytes(c.bytes_b)}")
        out.append(f"parameters on the fullest device: {fmt_bytes(self.a.bytes_per_device)} -> "
                   f"{fmt_bytes(self.b.bytes_per_device)}")
        if self.a.comm is not None and self.b.comm is not None:
            out.append(f"communication per step (one device sends): {fmt_bytes(self.a.comm)} -> "
                       f"{fmt_bytes(self.b.comm)}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.report_lines())


def _load(x: Any) -> tuple[Plan, dict[str, str]]:
    """A plan and the versions its JSON recorded (a Plan in memory: this process's versions)."""
    if isinstance(x, Plan):
        return x, versions()
    if isinstance(x, str):
        plan = Plan.from_json(x)  # raises PlanFormatError naming what is wrong
        recorded = json.loads(x).get("versions") or {}
        return plan, {str(k): str(v) for k, v in recorded.items()}
    raise OptionError(f"diff() takes a tpflax.Plan or its JSON text, got {type(x).__name__}")


def _comm(plan: Plan, optimizer: Any, batch: Any, model: Any) -> float | None:
    if batch is None and model is None:
        return None
    from tpflax._src.cost.estimate import estimate

    return estimate(plan, optimizer, batch, model=model).comm_total


def _spec_text(d: Any) -> str:
    """The spec, and the stored order of a fused dim kept head-aligned (the bytes each device holds differ)."""
    if d is None:
        return "-"
    lay = d.layout
    if lay is None:
        return spec_str(d.spec)
    return f"{spec_str(d.spec)} head-aligned (dim {lay.dim}: pieces {'|'.join(map(str, lay.pieces))} over {lay.ranks})"


def diff(a: Any, b: Any, *, optimizer: Any = None, batch: Any = None, model: Any = None) -> PlanDiff:
    """The leaves whose specs differ between two plans, and what each plan costs.

    Args:
        a, b: :class:`tpflax.Plan` s, or their JSON text (``Plan.to_json()`` or
            ``tpflax plan --json``, which also records the tpflax/jax/flax versions).
        optimizer: an optax optimizer for the communication estimate (optional).
        batch: the global batch; with it (or ``model``), each side's communication
            per step comes from :func:`tpflax.estimate`.
        model: the model, as for :func:`tpflax.estimate`.

    Returns:
        A :class:`PlanDiff`; ``print`` it, or read ``changed`` and ``changes``.

    >>> import jax, tpflax
    >>> tree = {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), "float32")},
    ...         "down": {"kernel": jax.ShapeDtypeStruct((256, 64), "float32")}}
    >>> d = tpflax.diff(tpflax.plan(tree, {"model": 4}), tpflax.plan(tree, {"model": 4}, rules=[("up", "replicate")]))
    >>> d.changed, d.changes[0].paths, d.changes[0].a, d.changes[0].b
    (True, ('up/kernel',), "P(None, 'model')", 'P(None, None)')
    """
    pa, va = _load(a)
    pb, vb = _load(b)
    groups: dict[tuple, list[str]] = {}
    for path in dict.fromkeys([*pa.decisions, *pb.decisions]):
        da, db = pa.decisions.get(path), pb.decisions.get(path)
        if (da is not None and db is not None and da.spec == db.spec and da.shape == db.shape
                and da.layout == db.layout):  # a head-aligned layout stores other bytes on each device
            continue
        group = (da or db).group or path
        groups.setdefault((group, _spec_text(da), _spec_text(db)), []).append(path)
    changes = tuple(Change(tuple(paths), sa, sb,
                           sum(pa.decisions[p].bytes_per_device for p in paths if p in pa.decisions),
                           sum(pb.decisions[p].bytes_per_device for p in paths if p in pb.decisions))
                    for (_, sa, sb), paths in groups.items())
    return PlanDiff(changes=changes,
                    a=Side(str(pa.mesh), pa.bytes_per_device, _comm(pa, optimizer, batch, model), va),
                    b=Side(str(pb.mesh), pb.bytes_per_device, _comm(pb, optimizer, batch, model), vb))
