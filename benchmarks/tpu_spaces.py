"""The values live at the HBM peak of a TPU compile in both memory spaces: HBM and on-chip ``S(1)``.

``tpu_live.py`` reads the default memory space only; XLA:TPU's memory-space assignment also keeps
values in the on-chip memory (``vmem (color=1)`` in ``*-memory-usage-report.txt``, a 112 MiB heap on
v5e), which the compiled temp bytes do not count. Whether a kept buffer sits there decides how much
of a small step's live set the HBM peak holds (see the ResNet-18 section of ``results/tpu_aot.md``).

    XLA_FLAGS=--xla_dump_to=DIR python ...   # compile one step
    python benchmarks/tpu_spaces.py DIR --min-mib 1

prints the HBM peak step, the bytes in use in each space there, and the values at least
``--min-mib`` large live at it, largest first, each with its space and live range.
"""

from __future__ import annotations

import argparse
import re

from tpu_live import MIB, VALUE, in_use, live_ranges, ranged, step_files

SPACES = {0: "HBM", 1: "S(1)"}


def read(dump: str) -> dict[int, list[tuple[str, int, int, str, int, int]]]:
    """``{color: [(name, offset, size, shape, start, end)]}`` of the step's temp values in HBM and S(1)."""
    ba, lr = step_files(dump)
    vals, color = [], None
    for line in open(ba):
        if line.startswith("allocation"):
            m = re.search(r"color (\d+)", line)
            color = (int(m.group(1)) if m else 0) if "preallocated-temp" in line else None
        elif color in SPACES and (m := VALUE.match(line)):
            vals.append((color, m.group(1), int(m.group(3)), int(m.group(2)), m.group(4).split("{")[0]))
    ranges = live_ranges(lr)
    out: dict[int, list] = {c: [] for c in SPACES}
    for color, name, offset, size, shape in vals:
        r = ranged(name, ranges)
        if r:
            out[color].append((name, offset, size, shape, *r))
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("dump")
    ap.add_argument("--min-mib", type=float, default=4.0, help="list values at least this large")
    args = ap.parse_args()
    spaces = read(args.dump)
    steps = max(b for vals in spaces.values() for *_, b in vals) + 1
    step = max(range(steps), key=lambda t: in_use(spaces[0], t))
    print(f"HBM peak at step {step} of {steps}: "
          + ", ".join(f"{SPACES[c]} {in_use(v, step) / MIB:.1f} MiB" for c, v in spaces.items()))
    live = sorted(((c, *v) for c, vals in spaces.items() for v in vals if v[4] <= step <= v[5]),
                  key=lambda v: -v[3])
    seen = set()
    for c, name, offset, size, shape, a, b in live:
        if (c, offset, size) not in seen and size >= args.min_mib * MIB:
            seen.add((c, offset, size))
            print(f"  {SPACES[c]:5s} {size / MIB:8.2f} MiB {shape:28s} {name:40s} {a}-{b}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
