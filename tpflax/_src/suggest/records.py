"""The mesh suggestion's records: candidates, degrees, verifications and the ranked suggestion."""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from tpflax._src.errors import SuggestError
from tpflax._src.hardware import Hardware
from tpflax._src.mesh import MeshShape
from tpflax._src.specs import fmt_bytes


@dataclass(frozen=True, eq=False)
class Candidate:
    """One mesh shape, planned and estimated.

    Attributes:
        mesh: the shape (axes ``data, fsdp[, expert], model``; size-1 axes included).
        memory: :class:`tpflax.estimate.Memory` on the fullest device (None when the
            shape was rejected before estimating).
        comm: ``{kind: {axis label: bytes per step}}`` as in :class:`tpflax.Estimate`.
        comm_time: estimated seconds per step spent in collectives (no overlap).
        time_by_axis: seconds per axis label.
        links: ``{axis label: link name}`` (ICI, DCN, NVLink, ...).
        peak: the estimate's peak bytes on the fullest device (``Estimate.peak``: what
            must fit at once; 0 when not estimated).
        fits: the peak within the device's memory.
        tensor_local: every tensor-parallel group lies within one host.
        rank: 1-based rank among the ranked shapes; 0 when rejected.
        why: one line on its rank (against #1 for the runners-up).
        rejected: why the shape was filtered out ("" when ranked).
        device_memory: bytes per device it was judged against.
        context: what the suggestion shares between candidates (behind ``.plan`` and ``.estimate``).
    """

    mesh: MeshShape
    memory: Any = None
    peak: int = 0
    comm: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    comm_time: float = 0.0
    time_by_axis: Mapping[str, float] = field(default_factory=dict)
    links: Mapping[str, str] = field(default_factory=dict)
    fits: bool = False
    tensor_local: bool = True
    rank: int = 0
    why: str = ""
    rejected: str = ""
    device_memory: int = 0
    context: Any = field(default=None, repr=False)

    @property
    def mesh_shape(self) -> dict[str, int]:
        return dict(self.mesh.sizes)

    @property
    def per_device(self) -> int:
        """Bytes the fullest device must hold at once: the estimate's peak (0 when not estimated)."""
        return self.peak

    @property
    def headroom(self) -> int:
        """Device memory left over (negative: short by that much)."""
        return self.device_memory - self.per_device

    @property
    def comm_total(self) -> float:
        return sum(v for by_axis in self.comm.values() for v in by_axis.values())

    def degree(self, role: str) -> int:
        return math.prod(s for (n, s), (_, r) in zip(self.mesh.axes, self.mesh.roles, strict=True) if r == role)

    @functools.cached_property
    def plan(self):
        """The real :func:`tpflax.plan` for this shape (computed on first access)."""
        if self.context is None:
            raise SuggestError("this candidate has no model attached")
        return self.context.plan_for(self.mesh)

    @functools.cached_property
    def estimate(self):
        """The real :func:`tpflax.estimate` for this shape (computed on first access)."""
        if self.context is None:
            raise SuggestError("this candidate has no model attached")
        return self.context.estimate_for(self.plan)

    def to_dict(self) -> dict:
        return {"mesh": self.mesh_shape, "rank": self.rank, "fits": self.fits,
                "per_device": self.per_device, "headroom": self.headroom,
                "memory": self.memory.to_dict() if self.memory is not None else None,
                "comm_bytes_per_step": {k: dict(v) for k, v in self.comm.items()},
                "comm_total": self.comm_total, "comm_seconds": self.comm_time,
                "comm_seconds_by_axis": dict(self.time_by_axis), "links": dict(self.links),
                "tensor_within_host": self.tensor_local, "why": self.why, "rejected": self.rejected}


@dataclass(frozen=True)
class Degree:
    """Tensor-parallel degrees one model size allows.

    Attributes:
        name: ``heads``, ``kv heads``, ``vocab``, ``hidden``, ``mlp`` or ``experts``.
        size: the size.
        allowed: degrees that split it evenly (its divisors up to the device count).
        blocked: tensor degrees this mesh could use (divisors of the device count
            within a host) that the size does not divide.
        pad_to: the size padded to a multiple of every blocked degree (None: nothing blocked).
    """

    name: str
    size: int
    allowed: tuple[int, ...]
    blocked: tuple[int, ...] = ()
    pad_to: int | None = None

    def line(self) -> str:
        text = f"{self.name} {self.size} allow {{{', '.join(map(str, self.allowed))}}}"
        if self.blocked:
            text += (f"; blocks model={', '.join(map(str, self.blocked))}: pad to {self.pad_to} "
                     f"(+{self.pad_to - self.size}) to allow them")
        return text


@dataclass(frozen=True)
class Verification:
    """XLA's verdict on one candidate (``--verify``): compiled for a TPU topology or a CPU-emulated mesh.

    Attributes:
        mesh: the shape.
        estimated: the estimate's bytes per device.
        compiled: XLA's peak bytes per device (``DryRun.memory["peak"]``), or None.
        fits_estimate, fits_compiled: each side's verdict against the device memory.
        agree: the verdicts agree.
        seconds: compile time.
        note: what XLA did not report, or why it was skipped.
    """

    mesh: MeshShape
    estimated: int
    compiled: int | None
    fits_estimate: bool
    fits_compiled: bool | None
    agree: bool | None
    seconds: float = 0.0
    note: str = ""
    target: str = ""  # what XLA compiled for: a TPU topology ("tpu-v5e:8x8") or "cpu"

    def line(self) -> str:
        fmt = fmt_bytes
        if self.compiled is None:
            return f"  {str(self.mesh):<32} not verified: {self.note}"
        verdict = "agrees" if self.agree else "DISAGREES"
        return (f"  {str(self.mesh):<32} estimate {fmt(self.estimated):>10}  XLA:{self.target or 'cpu'} "
                f"{fmt(self.compiled):>10}  "
                f"({self.compiled / max(self.estimated, 1):.2f}x)  XLA {verdict} on the fit "
                f"({'fits' if self.fits_compiled else 'does not fit'}; compiled in {self.seconds:.1f}s)")


@dataclass(frozen=True)
class Suggestion:
    """Ranked mesh shapes; indexes like a tuple of :class:`Candidate` (best first).

    Attributes:
        ranked: shapes that fit, best first.
        rejected: shapes filtered out, each with its reason.
        degrees: tensor-parallel degrees the model's sizes allow.
        hardware: the :class:`tpflax.hardware.Hardware` used.
        devices: the device count.
        notes: assumptions and fallbacks.
        settings: optimizer, batch, remat, ... used.
        seconds: time spent ranking.
        verified: :class:`Verification` records, when ``verify`` was asked.
    """

    ranked: tuple[Candidate, ...]
    rejected: tuple[Candidate, ...]
    degrees: tuple[Degree, ...]
    hardware: Hardware
    devices: int
    notes: tuple[str, ...] = ()
    settings: Mapping[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    verified: tuple[Verification, ...] = ()

    def __getitem__(self, i):
        return self.ranked[i]

    def __len__(self) -> int:
        return len(self.ranked)

    def __iter__(self):
        return iter(self.ranked)

    @property
    def candidates(self) -> tuple[Candidate, ...]:
        """Every enumerated shape: ranked first, then rejected."""
        return self.ranked + self.rejected

    def to_dict(self) -> dict:
        return {"devices": self.devices, "hardware": self.hardware.__dict__ | {},
                "settings": dict(self.settings), "seconds": self.seconds,
                "ranked": [c.to_dict() for c in self.ranked],
                "rejected": [c.to_dict() for c in self.rejected],
                "degrees": [d.__dict__ | {} for d in self.degrees], "notes": list(self.notes),
                "verified": [{"mesh": v.mesh.sizes, "estimated": v.estimated, "compiled": v.compiled,
                              "fits_estimate": v.fits_estimate, "fits_compiled": v.fits_compiled,
                              "agree": v.agree, "seconds": v.seconds, "note": v.note} for v in self.verified]}

    def report_lines(self, top: int = 5, show_all: bool = False) -> list[str]:
        fmt = fmt_bytes
        hw, s = self.hardware, self.settings
        n_enum = len(self.ranked) + len(self.rejected)
        out = [f"{self.devices} x {hw.describe()}",
               f"optimizer {s.get('optimizer')}, batch {s.get('batch')}, remat "
               f"{'on' if s.get('remat') else 'off'}; {len(self.ranked)} of {n_enum} mesh shapes fit "
               f"(ranked by estimated communication time per step; {self.seconds:.2f}s)", ""]
        rows = self.ranked if show_all else self.ranked[:top]
        out.append(f"{'rank':>4}  {'mesh':<30}{'per device':>12}{'headroom':>12}{'comm/step':>12}"
                   f"{'comm time':>12}")
        for c in rows:
            out.append(f"{c.rank:>4}  {str(c.mesh):<30}{fmt(c.per_device):>12}{fmt(c.headroom):>12}"
                       f"{fmt(c.comm_total):>12}{fmt_time(c.comm_time):>12}")
        if rows:
            out.append("")
            out += [f"  #{c.rank}: {c.why}" for c in rows]
        if len(self.ranked) > len(rows):
            out.append(f"  ... {len(self.ranked) - len(rows)} more ranked shapes (--all)")
        if show_all and self.rejected:
            out += ["", f"rejected ({len(self.rejected)}):"]
            out += [f"  {str(c.mesh):<32} {c.rejected}" for c in self.rejected]
        elif self.rejected:
            kinds: dict[str, int] = {}
            for c in self.rejected:
                kinds[_reason_kind(c.rejected)] = kinds.get(_reason_kind(c.rejected), 0) + 1
            out.append(f"  rejected {len(self.rejected)}: "
                       + ", ".join(f"{n} {k}" for k, n in kinds.items()) + " (--all lists them)")
        if self.degrees:
            out += ["", "tensor-parallel degrees (model axis) the model's sizes allow:"]
            out += [f"  {d.line()}" for d in self.degrees]
        if self.verified:
            where = sorted({v.target for v in self.verified if v.target}) or ["cpu"]
            where = "CPU-emulated meshes" if where == ["cpu"] else "XLA:" + ", ".join(where)
            out += ["", f"verified on {where} (dry run: compiled, nothing run):"]
            out += [v.line() for v in self.verified]
        out += [f"note: {n}" for n in self.notes]
        return out


def _reason_kind(text: str) -> str:
    for key in ("does not fit", "batch", "shards no parameter", "cannot be planned"):
        if key in text:
            return {"batch": "batch does not split", "shards no parameter": "axis shards nothing"}.get(key, key)
    return "other"


def fmt_time(s: float) -> str:
    """A step's time to three significant digits below a millisecond: a small model's comm times are
    nanoseconds, which whole microseconds showed as "0 us" next to a ratio of 4.96x.

    >>> fmt_time(2.5), fmt_time(0.0123), fmt_time(4.2e-4), fmt_time(3.07e-6), fmt_time(7.1e-8), fmt_time(0.0)
    ('2.50 s', '12.3 ms', '420 us', '3.07 us', '71 ns', '0 us')
    >>> fmt_time(9.996e-4), fmt_time(9.996e-7)
    ('1.0 ms', '1 us')
    """
    if s >= 1:
        return f"{s:.2f} s"
    if s >= 1e-3 or float(f"{s * 1e6:.3g}") >= 1000:  # (9.996e-4 s rounds to 1.0 ms, not "1e+03 us")
        return f"{s * 1e3:.1f} ms"
    if s >= 1e-6 or s <= 0 or float(f"{s * 1e9:.3g}") >= 1000:
        return f"{s * 1e6:.3g} us"
    return f"{s * 1e9:.3g} ns"


# ---------------------------------------------------------------------------
