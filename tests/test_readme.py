"""The README's examples run as written: every ```python test block is executed.

Blocks fenced as plain ```python are illustrations (real-size models, a library the
tests do not install); the ones marked ``test`` are complete programs.
"""

from __future__ import annotations

import contextlib
import io
import pathlib
import re
import sys
import types

import pytest

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
BLOCKS = re.findall(r"^```python test\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_readme_has_runnable_examples():
    assert len(BLOCKS) >= 2


@pytest.mark.parametrize("code", BLOCKS, ids=[f"block{i}" for i in range(len(BLOCKS))])
def test_readme_block_runs(code, monkeypatch):
    module = types.ModuleType("readme_example")  # a real module: flax dataclasses look their module up
    monkeypatch.setitem(sys.modules, module.__name__, module)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), module.__dict__)
    assert "loss" in out.getvalue()
