"""Test fixtures and hypothesis profiles (the 8 CPU devices are set up in ../conftest.py)."""

import os

import jax
import pytest

try:  # hypothesis profiles: CI default (the same examples on every machine), and a longer, random local run
    from hypothesis import HealthCheck, settings

    # derandomized: a random draw that finds a new bug on one CI machine and not another would make
    # landing a lottery; the "thorough" profile keeps exploring (HYPOTHESIS_PROFILE=thorough), and
    # what it finds becomes an @example
    settings.register_profile("ci", max_examples=200, deadline=None, derandomize=True,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.register_profile("thorough", max_examples=2000, deadline=None,
                              suppress_health_check=[HealthCheck.too_slow])
    settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
except ImportError:  # pragma: no cover - hypothesis is in the test extras
    pass


@pytest.fixture(scope="session")
def devices():
    devs = jax.devices()
    assert len(devs) >= 8, f"expected 8 CPU-emulated devices, got {len(devs)}"
    return devs


@pytest.fixture(autouse=True)
def _piped_terminal_size(monkeypatch):
    """Text reports size themselves to the terminal, and ``shutil.get_terminal_size`` reads ``COLUMNS`` and
    ``LINES`` first; the tests read the piped default (100 columns), so an exported ``COLUMNS`` (a shell's,
    or the 80 pytest-xdist's workers get) must not change what they see."""
    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.delenv("LINES", raising=False)
