"""Reading a compiled XLA program: memory per device, the peak, the fit, FLOPs.

The peak is what must fit in one device's memory for the step to run:

* XLA:CPU: ``argument + output + temp - alias``, everything that can be live at
  once, donated (aliased) buffers counted once (its ``peak_memory_in_bytes``
  leaves the temporaries out).
* XLA:TPU: the larger of that sum and ``peak_memory_in_bytes`` (its heap
  simulation). Big programs report their temporaries as one block
  (``temp_size_in_bytes``), which can exceed the simulated peak, and XLA:TPU's
  own out-of-memory check holds that block against the HBM; small programs
  report ``temp`` as 0 and only the simulated peak, and then
  ``temp = peak - (argument + output - alias)``.

  XLA:TPU's temp block is ``2 heap - L'`` (its HBM heap counted twice, less the
  largest live set: ``benchmarks/tpu_aot_notes.md``), and every tuple-shaped
  value's index table (32 to 512 bytes) sits alone in a 16 KiB slot of that heap
  (:data:`TUPLE_SLOT`): the block counts ``2 x 16 KiB`` per tuple value that is
  not tensor data. Where those slots are the larger part of the block (a tiny
  program, whose arrays live on chip), that part, up to what the block adds
  over the simulated peak, is reported apart as ``reserved`` and left out of
  ``temp`` and ``peak``; ``peak + reserved`` is XLA's own figure, which the fit
  verdict holds against the HBM. A program whose block is mostly data (every
  step of more than a few MiB) reports ``reserved = 0``: its numbers are XLA's.

The fit verdict holds the peak (plus ``reserved``) against the device's HBM from
the hardware presets (:mod:`tpflax._src.hardware`), split between the devices one
chip exposes.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tpflax._src.errors import CompileError
from tpflax._src.hlo import dot_flop_counts
from tpflax._src.hlo.text import _attr, _scan
from tpflax._src.specs import entry_axes, fmt_bytes

MEMORY_KEYS = ("argument", "output", "temp", "alias", "generated_code", "peak", "reserved")
# the fields read off XLA's memory analysis (``peak`` and ``reserved`` are worked out from them)
_XLA_KEYS = ("argument", "output", "temp", "alias", "generated_code")
# XLA:TPU's HBM temp heap gives each tuple-shaped value's index table (512 bytes on v5e and v4, 32 on v5p) a
# 16 KiB-aligned slot of its own; buffer dumps of v5e:2x4, v4:2x2x1 and v5p:2x2x2 steps from 2 to 800 MiB:
# tpu_aot_notes.md, "Fifty-eighth round"
TUPLE_SLOT = 16 << 10
# a tuple's opening bracket in an HLO shape; a layout's ``T(8,128)(2,1)`` and ``S(1)`` follow a letter or a bracket
_TUPLE_OPEN = re.compile(r"(?<![\w)])\(")
# the attributes naming a computation an instruction applies per element (its body emitted as code, no buffers)
_APPLIED = ("to_apply", "comparator", "select", "scatter")


@dataclass(frozen=True)
class Fit:
    """Whether the compiled peak fits in one device's memory.

    Attributes:
        peak: bytes the step needs per device (``DryRun.memory["peak"]``).
        device_memory: bytes of HBM per device.
        hardware: the preset the memory comes from (``"tpu-v5e"``).
        reserved: XLA:TPU's temp slots of tuple index tables beside the peak
            (``DryRun.memory["reserved"]``): held against the HBM with it.
    """

    peak: int
    device_memory: int
    hardware: str
    reserved: int = 0

    @property
    def fits(self) -> bool:
        return self.peak + self.reserved <= self.device_memory

    @property
    def headroom(self) -> int:
        """Free bytes per device at the peak (negative: how much too much)."""
        return self.device_memory - self.peak - self.reserved

    def line(self) -> str:
        """One sentence for reports.

        >>> Fit(3 << 30, 16 << 30, "tpu-v5e").line()
        'fits: peak 3.0 GiB of 16.0 GiB tpu-v5e HBM per device (81% free)'
        >>> Fit(4 << 20, 16 << 30, "tpu-v5e", 2 << 20).line()
        'fits: peak 4.0 MiB + 2.0 MiB reserved of 16.0 GiB tpu-v5e HBM per device (100% free)'
        """
        held = fmt_bytes(self.peak) + (f" + {fmt_bytes(self.reserved)} reserved" if self.reserved else "")
        share = f"{held} of {fmt_bytes(self.device_memory)} {self.hardware} HBM per device"
        if self.fits:
            return f"fits: peak {share} ({100 * self.headroom / self.device_memory:.0f}% free)"
        return f"DOES NOT FIT: peak {share}, {fmt_bytes(-self.headroom)} over"

    def to_dict(self) -> dict:
        return {"fits": self.fits, "peak": self.peak, "reserved": self.reserved, "device_memory": self.device_memory,
                "hardware": self.hardware, "headroom": self.headroom}


def fit_verdict(memory: Mapping[str, int | None], devices: Any) -> Fit | None:
    """The peak against the HBM of ``devices`` (a TPU preset's), or None off TPU or without a peak.

    The peak is held against the HBM with ``reserved`` (XLA:TPU's temp slots of tuple index tables) beside it:
    the whole block XLA:TPU's out-of-memory check counts."""
    from tpflax._src.tpu import hbm_per_device

    hbm = hbm_per_device(devices)
    peak = memory.get("peak")
    if hbm is None or peak is None:
        return None
    return Fit(int(peak), *hbm, reserved=int(memory.get("reserved") or 0))


_OOM = re.compile(r"Ran out of memory on HBM.*?required for HLO temporaries \(([\d.]+)([KMGT]?)\) exceeds "
                  r"available HBM \(([\d.]+)([KMGT]?)\)", re.S)


def tpu_out_of_memory(error: Exception) -> tuple[int, int] | None:
    """``(bytes required, bytes available)`` per device when XLA:TPU refused a program that does not fit.

    XLA:TPU does not compile a program whose buffers exceed the device's HBM;
    its message carries both figures (``G`` is GiB), which is the fit verdict.

    >>> tpu_out_of_memory(RuntimeError("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
    ...     "required for HLO temporaries (21.62G) exceeds available HBM (15.75G)."))
    (23214298234, 16911433728)
    """
    m = _OOM.search(str(error))
    if m is None:
        return None
    scale = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    return int(float(m.group(1)) * scale[m.group(2)]), int(float(m.group(3)) * scale[m.group(4)])


def read_memory(compiled: Any, platform: str, warnings: list[str], hlo_text: str = "") -> dict[str, int | None]:
    """``{argument, output, temp, alias, generated_code, peak, reserved}`` bytes per device (None: not reported).

    ``hlo_text`` (``compiled.as_text()``) gives XLA:TPU's tuple values, whose index-table slots its temp
    block counts (:func:`tuple_values`); without it nothing is reported apart (``reserved`` 0)."""
    try:
        ma = compiled.memory_analysis()
    except Exception as e:  # noqa: BLE001 - some backends do not implement it
        warnings.append(f"XLA memory_analysis() is unavailable on this backend ({type(e).__name__})")
        ma = None
    out: dict[str, int | None] = {}
    missing = []
    for k in _XLA_KEYS:
        v = getattr(ma, f"{k}_size_in_bytes", None) if ma is not None else None
        zero_means_unknown = k in ("argument", "output", "generated_code") or (k == "temp" and platform == "tpu")
        if v is None or v < 0 or (v == 0 and zero_means_unknown):
            out[k] = None
            if ma is not None and not (k == "temp" and platform == "tpu"):
                missing.append(k)
        else:
            out[k] = int(v)
    if missing and missing != ["generated_code"]:  # XLA:CPU never reports generated code size
        warnings.append("XLA reported zero or -1 for " + ", ".join(missing) + " bytes; those are not compared")
    slots = 2 * TUPLE_SLOT * tuple_values(hlo_text) if platform == "tpu" and hlo_text else 0
    out["peak"], out["reserved"] = _peak(ma, out, platform, warnings, slots)
    return out


def _peak(ma: Any, out: dict[str, int | None], platform: str, warnings: list[str],
          slots: int = 0) -> tuple[int | None, int | None]:
    """``(peak, reserved)``; on XLA:TPU ``temp`` is rewritten to the temporaries the peak holds (module docstring)."""
    live = None
    if out.get("argument") is not None and out.get("output") is not None:
        live = out["argument"] + out["output"] - int(out.get("alias") or 0)
    reported = int(getattr(ma, "peak_memory_in_bytes", 0) or 0) if ma is not None and platform == "tpu" else 0
    reserved = 0 if platform == "tpu" else None
    if reported and out.get("temp") is None and live is not None:
        out["temp"] = max(reported - live, 0)
        warnings.append("XLA:TPU reported no temp bytes: temp = peak - (argument + output - alias)")
    if live is None or out.get("temp") is None:
        return (reported or None), reserved
    temp = int(out["temp"])
    if platform == "tpu" and slots and 2 * slots >= temp:  # the slots are the larger part of the temp block
        reserved = min(slots, temp, max(live + temp - reported, 0))
        if reserved:
            out["temp"] = temp - reserved
            warnings.append(f"XLA:TPU's temp block ({fmt_bytes(temp)}) counts its HBM heap's slots of tuple index "
                            f"tables (16 KiB each, twice: {fmt_bytes(slots)}), not tensor data: "
                            f"{fmt_bytes(reserved)} of it is reported apart as 'reserved' and left out of temp and "
                            "the peak (the fit counts it)")
    return max(live + int(out["temp"]), reported), reserved


def tuple_values(hlo_text: str) -> int:
    """How many tuple-shaped values a compiled module's buffers hold: the tuples (a nested one counts apart) in
    the shapes of instructions outside fusion bodies and the scalar computations an instruction applies (a
    variadic reduce's ``to_apply=``, argmax's ``(f32[], s32[])``; a sort's ``comparator=``, a select-and-scatter's
    ``select=`` and ``scatter=``: code, no buffers), less parameters, ``get-tuple-element`` (views of another's),
    the entry's root (the outputs' table, allocated with them) and a ``while`` loop's state: the loop, its
    body's root and its body's and condition's parameters share its operand's table (one slot per loop in the
    buffer dumps). XLA:TPU keeps each one's index table in a 16 KiB slot of its HBM temp heap
    (:data:`TUPLE_SLOT`)."""
    instrs, entries, _ = _scan(hlo_text)
    fused = {c for ins in instrs
             for key in (("calls",) if ins.opcode == "fusion" else ()) + _APPLIED
             for c in re.findall(r"%?([\w.\-]+)", _attr(ins.attrs, key) or "")}
    bodies = {c for ins in instrs if ins.opcode == "while"
              for c in re.findall(r"%?([\w.\-]+)", _attr(ins.attrs, "body") or "")}
    roots: dict[str, str] = {}
    for ins in instrs:  # a scheduled module lists each computation's root last
        roots[ins.computation] = ins.name
    return sum(len(_TUPLE_OPEN.findall(ins.shape)) for ins in instrs
               if ins.shape.startswith("(") and ins.computation not in fused
               and ins.opcode not in ("parameter", "get-tuple-element", "while")
               and not ((entries.get(ins.computation) or ins.computation in bodies)
                        and roots[ins.computation] == ins.name))


def read_flops(compiled: Any, warnings: list[str], hlo_text: str = "") -> float | None:
    """Per-device FLOPs: ``cost_analysis()`` plus the loop iterations it leaves out, or None if unknown.

    XLA's cost analysis counts a ``while`` body once (CPU and TPU), so a scanned
    layer stack reads as one layer. The dot and convolution flops of every
    further iteration are read from ``hlo_text`` (:func:`tpflax.hlo.dot_flops`)
    and added; a loop body's other operations stay counted once. Without a cost
    analysis the HLO's dot/convolution flops are the count.
    """
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 - optional on some backends
        ca = None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    flops = (ca or {}).get("flops") if isinstance(ca, Mapping) else None
    if flops is None or flops <= 0:
        counted = dot_flop_counts(hlo_text)[0] if hlo_text else 0.0
        if counted > 0:
            warnings.append("XLA reported no FLOP count for this program; flops are its dot and "
                            "convolution flops read from the HLO")
            return counted
        warnings.append("XLA reported no FLOP count for this program")
        return None
    if hlo_text:
        looped, once = dot_flop_counts(hlo_text)
        flops += looped - once
    return float(flops)


def compile_error(plan, args: tuple[Any, ...], e: Exception) -> CompileError:
    """One CompileError naming every argument leaf whose sharding does not divide, and XLA's message."""
    import jax

    problems = []
    for i, a in enumerate(args):
        for path, leaf in jax.tree_util.tree_flatten_with_path(a)[0]:
            sh = getattr(leaf, "sharding", None)
            spec = getattr(sh, "spec", None)
            if spec is None:
                continue
            name = jax.tree_util.keystr(path, simple=True, separator="/")
            shape = tuple(leaf.shape)
            mesh_sizes = dict(sh.mesh.shape)
            for dim, entry in enumerate(tuple(spec)):
                axes = entry_axes(entry)
                n = math.prod(mesh_sizes.get(a_, 1) for a_ in axes)
                if dim >= len(shape):
                    problems.append(f"argument {i} leaf {name} shape {shape}: spec {spec} has more entries "
                                    "than the leaf has dims; fix the rule that produced it")
                    break
                if n > 1 and shape[dim] % n:
                    problems.append(f"argument {i} leaf {name} shape {shape}: dim {dim} ({shape[dim]}) is not "
                                    f"divisible by {'*'.join(f'{x}={mesh_sizes[x]}' for x in axes)}; change "
                                    "the rule or the mesh")
    msg = str(e).strip().splitlines()
    head = " ".join(msg[:6])[:1500] if msg else type(e).__name__
    problems.append(f"XLA/jax said ({type(e).__name__}): {head}")
    missing = re.search(r"HLO opcode `?([\w-]+)`? is not supported by XLA:CPU", str(e))
    if missing:  # EasyDeL's and MaxText's expert-parallel token dispatch: ragged-all-to-all
        problems.append(f"XLA:CPU does not implement `{missing.group(1)}`; dry-run the plan for a TPU topology "
                        "instead, where the TPU compiler takes it: mesh = tpflax.make_mesh(shape, "
                        "target=\"tpu-v5e:2x4\") (libtpu: pip install \"tpflax[tpu]\")")
    if type(e).__name__ == "ShardingTypeError":  # jax's explicit sharding mode: the mesh has Explicit axes
        problems.append("the mesh has Explicit axis types (jax.make_mesh's default), under which code written for "
                        "Auto axes (an unannotated Flax model) does not trace: build the step with "
                        "tpflax.make_train_step or tpflax.jit_step (they run such a step with its axes Auto), "
                        "wrap the loss in tpflax.gathered_loss, or make the mesh with tpflax.make_mesh (Auto "
                        "axes)")
    return CompileError(f"the step did not compile on mesh {plan.mesh}", problems)
