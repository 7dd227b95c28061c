"""Which of the test suite's compiles are the same program: a pytest plugin (diagnostic, not loaded by default).

    PYTHONPATH=benchmarks COMPILE_KEYS_OUT=/tmp/ck python -m pytest -q -p compile_keys -p no:cacheprovider tests/test_x.py
    python benchmarks/compile_keys.py /tmp/ck.*.json

For every backend compile (``jax._src.compiler.compile_or_get_cached``, CPU and TPU-topology alike) it records the
test that made it, its CPU seconds (``time.process_time``: every thread of the process, so XLA's compile threads
too) and jax's persistent-cache key twice: without the HLO's debug metadata (jax's default,
``jax_compilation_cache_include_metadata_in_key=False``) and with it. Two compiles with one key are what jax's
persistent compilation cache would serve from its first; only the keyed-with-metadata ones can be served without
changing a test's op_names (the r53 reproducer ``rep_cache_opnames.py``). One JSON per process (per xdist worker).
Results: ``benchmarks/results/compile_keys.md``.
"""

from __future__ import annotations

import collections
import json
import os
import sys
import time

_current = {"test": "<collection>"}
_records: dict[str, dict] = {}


def _record(test: str) -> dict:
    return _records.setdefault(test, {"cpu": 0.0, "wall": 0.0, "compiles": []})


def _patch() -> None:
    from jax._src import cache_key, compiler, config

    compile_or_get_cached = compiler.compile_or_get_cached

    def keyed(backend, computation, devices, compile_options, *args, **kwargs):
        keys = []
        for metadata in (False, True):
            try:
                with config.compilation_cache_include_metadata_in_key(metadata):
                    keys.append(cache_key.get(computation, devices, compile_options, backend))
            except Exception as e:  # noqa: BLE001 - a key that cannot be made is reported, not raised
                keys.append(f"error: {type(e).__name__}")
        t0 = time.process_time()
        out = compile_or_get_cached(backend, computation, devices, compile_options, *args, **kwargs)
        _record(_current["test"])["compiles"].append(
            {"key": keys[0], "key_metadata": keys[1], "cpu": time.process_time() - t0,
             "platform": getattr(backend, "platform", "?")})
        return out

    compiler.compile_or_get_cached = keyed


def pytest_configure(config) -> None:
    _patch()


def pytest_runtest_protocol(item, nextitem):
    _current["test"] = item.nodeid
    rec = _record(item.nodeid)
    rec["cpu"] -= time.process_time()
    rec["wall"] -= time.perf_counter()


def pytest_runtest_logfinish(nodeid, location):
    rec = _record(nodeid)
    rec["cpu"] += time.process_time()
    rec["wall"] += time.perf_counter()
    _current["test"] = "<between tests>"


def pytest_sessionfinish(session) -> None:
    out = os.environ.get("COMPILE_KEYS_OUT", "/tmp/compile_keys")
    with open(f"{out}.{os.environ.get('PYTEST_XDIST_WORKER', 'main')}.json", "w") as f:
        json.dump(_records, f)


def summary(paths: list[str]) -> str:
    records: dict[str, dict] = {}
    for path in paths:
        with open(path) as f:
            records.update(json.load(f))
    compiles = [(test, c) for test, r in records.items() for c in r["compiles"]]
    lines = [f"{len(records)} tests, {sum(r['cpu'] for r in records.values()):.1f} s CPU; {len(compiles)} compiles, "
             f"{sum(c['cpu'] for _, c in compiles):.1f} s CPU"]
    for field in ("key", "key_metadata"):
        groups = collections.defaultdict(list)
        for test, c in compiles:
            groups[c[field]].append((test, c))
        dups = [g for g in groups.values() if len(g) > 1]
        again = sum(c["cpu"] for g in dups for _, c in g[1:])
        lines.append(f"{field}: {len(groups)} distinct programs, {len(dups)} compiled more than once, "
                     f"{again:.1f} s CPU on the repeats")
        for g in sorted(dups, key=lambda g: -sum(c["cpu"] for _, c in g[1:]))[:10]:
            tests = sorted({t.split("::")[-1] for t, _ in g})
            lines.append(f"  {sum(c['cpu'] for _, c in g[1:]):6.2f} s x{len(g)}: {' | '.join(tests)}")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summary(sys.argv[1:]))
