"""Where the test suite's Python time goes, from a py-spy profile of one full run.

Record (py-spy is not a dependency: ``pip install py-spy``), then read:

    py-spy record --subprocesses -r 40 -f raw -o prof.txt -- \\
        python -m pytest -q -n 2 --dist worksteal -p no:cacheprovider
    python benchmarks/suite_profile.py prof.txt [--rate 40] [--top 25]

py-spy samples Python threads only. XLA compiles in its own native threads, which it does not see, so
the samples are the suite's Python side: tracing, lowering to MLIR, tpflax's own analysis, reading the
compiled HLO, imports. Each sample is counted once, in the first of these phases (in this order) that
its stack is inside:

- **flax's param check**: linen's ``Scope.param`` traces each parameter's initializer under
  ``jax.eval_shape`` on every ``apply`` to check the given parameter's shape (flax's own cost, paid by
  every trace of a linen model: tpflax's analyses, the step's ``jax.jit``, a user's own step);
- **HLO reading**: ``tpflax._src.hlo``, ``compiled.read_flops``/``read_memory`` and ``Compiled.as_text``;
- **compile (Python side)**: jax's ``backend_compile_and_load`` (waiting on XLA, and its Python glue);
- **lowering**: jax's lowering of a traced step to MLIR (after its trace, inside ``jit(...).lower``);
- **tpflax analysis traces**: the traces behind ``plan(model=)`` and ``estimate``: dataflow, layer calls,
  traced uses, batched rows, abstract inits;
- **step tracing**: every other ``jax.jit``/``make_jaxpr``/``eval_shape`` trace (train steps, inits);
- **imports**, and **other** (tpflax's planning and pricing, the tests' own work, pytest).

The second table counts each test module's samples (a test's stack names its module).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter
from collections.abc import Iterable

# (phase, markers): a sample belongs to the first phase one of whose markers appears in its stack
PHASES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("flax's param check (Scope.param -> eval_shape)", ("Scope.param (flax/core/scope.py",)),
    ("HLO reading", ("tpflax/_src/hlo/", "read_flops (tpflax", "read_memory (tpflax", "Compiled.as_text (")),
    ("compile (Python side)", ("backend_compile_and_load (",)),
    ("lowering to MLIR", ("_pjit_lower (", "lower_sharding_computation (")),
    ("tpflax analysis traces", ("dataflow (tpflax/_src/trace/dataflow.py", "_traced_layers (tpflax",
                                "_traced_uses (tpflax", "_batched_rows (tpflax", "_abstract_init (tpflax",
                                "ZooModel._abstract (tpflax")),
    ("step tracing (jit, make_jaxpr, eval_shape)", ("jit_trace (", "trace_to_jaxpr (")),
    ("imports", ("_find_and_load (", "<frozen importlib._bootstrap>")),
)
OTHER = "other (planning, pricing, the tests' own work, pytest)"
_TEST = re.compile(r"\((test_\w+)\.py:\d+\)")


def samples(lines: Iterable[str]) -> Iterable[tuple[str, int]]:
    """``(stack, count)`` of each line of py-spy's raw (collapsed) output; lines without a count are skipped."""
    for line in lines:
        stack, _, n = line.rstrip("\n").rpartition(" ")
        if stack and n.isdigit():
            yield stack, int(n)


def phase(stack: str) -> str:
    """The first phase of :data:`PHASES` whose marker is in ``stack``.

    >>> phase("a (x.py:1);Scope.param (flax/core/scope.py:956);eval_shape (jax/_src/api.py:2317)")
    "flax's param check (Scope.param -> eval_shape)"
    >>> phase("t (test_a.py:3);jit_trace (jax/_src/pjit.py:9)")
    'step tracing (jit, make_jaxpr, eval_shape)'
    >>> phase("t (test_a.py:3);main (pytest.py:1)")
    "other (planning, pricing, the tests' own work, pytest)"
    """
    for name, markers in PHASES:
        if any(m in stack for m in markers):
            return name
    return OTHER


def tally(lines: Iterable[str]) -> tuple[int, Counter, Counter]:
    """``(total samples, samples by phase, samples by test module)``."""
    total, phases, tests = 0, Counter(), Counter()
    for stack, n in samples(lines):
        total += n
        phases[phase(stack)] += n
        m = _TEST.search(stack)
        if m:
            tests[m.group(1)] += n
    return total, phases, tests


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profile", help="py-spy's raw output (record -f raw)")
    ap.add_argument("--rate", type=float, default=40.0, help="the sampling rate it was recorded at (-r)")
    ap.add_argument("--top", type=int, default=25, help="test modules to list")
    args = ap.parse_args(argv)
    with open(args.profile) as f:
        total, phases, tests = tally(f)
    if not total:
        print(f"no samples in {args.profile}", file=sys.stderr)
        return 1
    print(f"{total} samples, {total / args.rate:.0f} s of Python time at {args.rate:g} Hz\n")
    print("| phase | samples | share |\n|---|---:|---:|")
    for name, n in phases.most_common():
        print(f"| {name} | {n} | {n / total:.1%} |")
    print("\n| test module | samples | share |\n|---|---:|---:|")
    for name, n in tests.most_common(args.top):
        print(f"| {name} | {n} | {n / total:.1%} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
