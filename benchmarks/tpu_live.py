"""The HBM values live at the peak of a TPU compile, from its XLA dump (no TPU needed).

Compile one step with ``XLA_FLAGS=--xla_dump_to=DIR`` set before jax starts, then

    python benchmarks/tpu_live.py DIR            # the peak step, its live set and the heap
    python benchmarks/tpu_live.py DIR --step 1060 --min-mib 1
    python benchmarks/tpu_live.py DIR --temp 1436702720   # temp - heap against the heap's slack
    python benchmarks/tpu_live.py DIR --holes             # the heap's holes at the peak, and what left them

reads the train step's ``*after_optimizations-live-range.txt`` (each value's live range over the
schedule), ``*-buffer-assignment.txt`` (each value's offset and size in the preallocated temp,
the default memory space) and the optimized HLO's ``op_name`` metadata (printed next to each value),
and reports the bytes in use at each step as the union of the live values' ``[offset, offset +
size)`` ranges (values sharing a buffer count once). Used for the "Row outputs" and later sections
of ``tpu_aot_notes.md``. A while loop's carried values (``(phi)`` in the buffer assignment: a scanned
stack's saved inputs and gradient stacks) are live values too; the compiled temp does not count them
(:func:`carried`, twentieth round).
"""

from __future__ import annotations

import argparse
import glob
import re

VALUE = re.compile(r" value: <\d+ (\S+)(?: \(phi\))? @\d+> \(size=(\d+),offset=(\d+)\): (\S+)")
PHI = re.compile(r" value: <\d+ (\S+) \(phi\) @\d+>")
MIB = 2 ** 20


def step_files(dump: str) -> tuple[str, str]:
    """The train step's buffer-assignment and live-range files in ``dump``."""
    (ba,) = glob.glob(f"{dump}/*jit_step*after_optimizations-buffer-assignment.txt")
    (lr,) = glob.glob(f"{dump}/*jit_step*after_optimizations-live-range.txt")
    return ba, lr


def op_names(dump: str) -> dict[str, str]:
    """``{instruction: its op_name metadata}`` from the train step's optimized HLO (which jax op, or which
    argument for a copy of one, made a value), empty without the dump's ``*after_optimizations.txt``."""
    paths = glob.glob(f"{dump}/*jit_step*after_optimizations.txt")
    names = {}
    for line in open(paths[0]) if paths else ():
        if m := re.match(r'\s+%(\S+) = .*?op_name="([^"]+)"', line):
            names[m.group(1)] = m.group(2)
    return names


def live_ranges(path: str) -> dict[str, tuple[int, ...]]:
    """``{value name: (first step, last step)}`` from a ``*-live-range.txt``."""
    ranges, on = {}, False
    for line in open(path):
        on = on or "BufferLiveRange" in line
        if "Live ranges at" in line:
            break
        if on and re.match(r"^\s+\S+:\d+-\d+$", line):
            name, r = line.strip().rsplit(":", 1)
            ranges[name] = tuple(int(x) for x in r.split("-"))
    return ranges


def ranged(name: str, ranges: dict[str, tuple[int, ...]]) -> tuple[int, ...] | None:
    """The live range of a buffer-assignment value (a whole value is listed as ``name{}``)."""
    return ranges.get(name if "{" in name else name + "{}")


def read(dump: str) -> tuple[list[tuple[str, int, int, str, int, int]], int]:
    """``([(name, offset, size, shape, start, end)], heap bytes)`` of the step's temp values."""
    ba, lr = step_files(dump)
    vals, heap, temp = [], 0, False
    for line in open(ba):
        if line.startswith("allocation"):
            temp = line.split(", ", 1)[1].startswith("preallocated-temp")
            heap = int(line.split("size ")[1].split(",")[0]) if temp else heap
        elif temp and (m := VALUE.match(line)):
            vals.append((m.group(1), int(m.group(3)), int(m.group(2)), m.group(4).split("{")[0]))
    ranges = live_ranges(lr)
    out = []
    for name, offset, size, shape in vals:
        r = ranged(name, ranges)
        if r:
            out.append((name, offset, size, shape, *r))
    return out, heap


def carried(dump: str, vals) -> set[str]:
    """The names of the values a while loop carries: its ``(phi)`` values and the in-place
    ``dynamic-update-slice`` fusions into their buffers (a scanned stack's saved inputs stack as the forward
    loop writes it). XLA:TPU's compiled temp is ``2 heap - L'``, ``L'`` the largest live set without these and
    without the async collectives' values (``tpu_aot_notes.md``, twentieth round)."""
    ba, _ = step_files(dump)
    phis = {m.group(1) for line in open(ba) if (m := PHI.match(line))}
    slots = {(o, s) for n, o, s, *_ in vals if n in phis}
    return phis | {n for n, o, s, *_ in vals if (o, s) in slots and "dynamic-update-slice" in n}


def in_use(vals, step: int) -> int:
    """Bytes of the heap in use at ``step``: the union of the live values' ranges."""
    total, end = 0, -1
    for lo, hi in sorted((o, o + s) for _, o, s, _, a, b in vals if a <= step <= b):
        if hi > end:
            total += hi - max(lo, end)
            end = hi
    return total


def starts(*val_lists) -> list[int]:
    """Step 0 and every step where a value's live range starts, in order: the only steps a peak needs.
    The live set at any step is a subset of the live set at the last of these at or before it (nothing
    joins it in between), so ``in_use`` there (or its sum over several value lists) is at most its value
    at that start: ``max`` over these steps is the max over every step, and the first step holding it
    (``max(steps, key=...)``'s) is one of them. A schedule has thousands of steps and far fewer starts."""
    return sorted({0} | {v[4] for vals in val_lists for v in vals})


def holes(vals, step: int, heap: int, min_bytes: int) -> list[tuple[int, int, list, list]]:
    """``[(offset, size, the values that last held it before step, the first values that hold it after)]``
    for each free range of the heap at ``step`` of at least ``min_bytes`` (the heap's slack, by name:
    ``tpu_aot_notes.md``, eighteenth round)."""
    out, end = [], 0
    for lo, hi in sorted((o, o + s) for _, o, s, _, a, b in vals if a <= step <= b) + [(heap, heap)]:
        if lo - end >= min_bytes:
            over = [v for v in vals if v[1] < lo and v[1] + v[2] > end and v[2] >= min_bytes // 4]
            before = sorted((v for v in over if v[5] < step), key=lambda v: -v[5])[:3]
            after = sorted((v for v in over if v[4] > step), key=lambda v: v[4])[:3]
            out.append((end, lo - end, before, after))
        end = max(end, hi)
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--step", type=int, default=None, help="the step to list (default: the peak)")
    ap.add_argument("--min-mib", type=float, default=8.0, help="list values at least this large")
    ap.add_argument("--temp", type=int, default=None,
                    help="the compile's memory_analysis().temp_size_in_bytes: also print temp - heap next to "
                         "heap - live peak and heap - the largest live set without async collectives, "
                         "which it equals (tpu_aot_notes.md, ninth round)")
    ap.add_argument("--holes", action="store_true",
                    help="list the heap's free ranges at the step (at least --min-mib) and the values around them")
    args = ap.parse_args()
    vals, heap = read(args.dump)
    steps = max(b for *_, b in vals) + 1
    step = args.step if args.step is not None else max(range(steps), key=lambda t: in_use(vals, t))
    print(f"step {step} of {steps}: {in_use(vals, step) / MIB:.0f} MiB live, heap {heap / MIB:.0f} MiB")
    if args.temp is not None:
        peak = max(in_use(vals, t) for t in range(steps))
        loop = carried(args.dump, vals)
        sync = [v for v in vals if not v[0].startswith("async-collective") and v[0] not in loop]
        flat = max(in_use(sync, t) for t in range(steps))  # L': temp = heap + (heap - L') (tpu_aot_notes.md)
        print(f"temp {args.temp / MIB:.1f} MiB: temp - heap {(args.temp - heap) / MIB:.1f} MiB, "
              f"heap - live peak {(heap - peak) / MIB:.1f} MiB, heap - the largest live set without "
              f"async collectives and loop-carried values {(heap - flat) / MIB:.1f} MiB")
    seen, ops = set(), op_names(args.dump)
    if args.holes:
        def named(vs):
            return ", ".join(f"{n} {sh} {s / MIB:.1f} MiB {a}-{b}" for n, o, s, sh, a, b in vs)
        for offset, size, before, after in holes(vals, step, heap, int(args.min_mib * MIB)):
            print(f"  hole {size / MIB:8.1f} MiB at {offset / MIB:.1f}: before [{named(before)}]; after [{named(after)}]")
        return 0
    for name, offset, size, shape, a, b in sorted(vals, key=lambda v: -v[2]):
        if a <= step <= b and (offset, size) not in seen and size >= args.min_mib * MIB:
            seen.add((offset, size))
            print(f"  {size / MIB:8.1f} MiB {shape:28s} {name:40s} {a}-{b} {ops.get(name.split('{')[0], '')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
