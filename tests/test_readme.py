"""The README's examples run as written: every ```python block is a complete program.

Each block is executed in a fresh module (8 CPU devices come from the root conftest;
a block's own device set-up line is then a no-op) and must print what it shows. The
resume recipe is examples/resume.py verbatim, so the two cannot drift apart.
"""

from __future__ import annotations

import contextlib
import io
import os
import pathlib
import re
import sys
import types

import jax
import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
BLOCKS = re.findall(r"^```python(?: test)?\n(.*?)^```", README.read_text(), flags=re.S | re.M)
HEAVY = ("jax.jit", "dry_run(", "make_train_step", "nnx.jit")  # blocks that compile: -m slow


def _marks(code: str) -> list:
    return [pytest.mark.slow] if any(h in code for h in HEAVY) else []


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 8
    assert all(b.strip() for b in BLOCKS)


def test_resume_recipe_is_the_example():
    recipe = (ROOT / "examples" / "resume.py").read_text()
    assert recipe in BLOCKS, "README's resume block must be examples/resume.py verbatim"


# The resume block is examples/resume.py verbatim (checked above), which tests/test_examples.py
# runs as a script: running it here again would only double its compile time.
RUN = [b for b in BLOCKS if b != (ROOT / "examples" / "resume.py").read_text()]


@pytest.mark.parametrize("code", [pytest.param(b, marks=_marks(b)) for b in RUN],
                         ids=[f"block{i}" for i in range(len(RUN))])
def test_readme_block_runs(code, monkeypatch):
    module = types.ModuleType("readme_example")  # a real module: flax dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(os, "environ", dict(os.environ))  # a block's XLA_FLAGS set-up stays in it
    out = io.StringIO()
    # XLA:CPU without LLVM's optimisations (the same HLO passes, as FAST_XLA in _util.py) while the block
    # runs; then every kept executable is dropped, so no later test is served one compiled so
    fast = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, str(README), "exec"), module.__dict__)
    finally:
        jax.config.update("jax_disable_most_optimizations", fast)
        jax.clear_caches()
    assert out.getvalue().strip(), "every README program prints what it shows"
