"""Every script in examples/ runs as ``python examples/X.py`` and prints what it shows.

Each example sets up its own 8 emulated CPU devices, so it runs in a fresh process,
as a user would start it.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import pytest
from _util import RUN_XLA, xla_flags

ROOT = pathlib.Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))
EXPECTED = {  # words each example's output must hold
    "hf_flax.py": ("step 2  loss", "skipped: needs transformers"),  # either trains or says why not
    "own_linen.py": ("step 4  loss",),
    "own_nnx.py": ("step 4  loss",),
    "resume.py": ("loss after resume matches the uninterrupted run",),
    "train_zoo.py": ("step 4  loss",),
}


def test_every_example_is_checked():
    assert sorted(p.name for p in EXAMPLES) == sorted(EXPECTED)


@pytest.mark.slow
@pytest.mark.parametrize("script", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_runs(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    # XLA:CPU without LLVM's optimisations and with its older loop emitters (RUN_XLA in _util.py: the
    # examples only run their programs and print, no compiled number is read; their compiles take about
    # half the time; an XLA without them has no such flag and RUN_XLA leaves it out); the example adds its
    # device count to these flags
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + xla_flags(RUN_XLA)).strip()
    proc = subprocess.run([sys.executable, str(script)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    wanted = EXPECTED[script.name]
    assert any(w in proc.stdout for w in wanted), proc.stdout[-3000:]
