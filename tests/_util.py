"""Helpers shared by test modules (not collected: the name starts with an underscore)."""

import functools

import jax
import numpy as np
import pytest


@functools.cache
def xla_takes(name: str, value) -> bool:
    """Whether the running XLA has the compile option ``name``: it refuses an option it lacks ("No such compile
    option"), and options come and go between jaxlib releases. One tiny compile per option and process."""
    try:
        jax.jit(lambda x: x + 1).lower(np.float32(0)).compile({name: value})
    except jax.errors.JaxRuntimeError as e:
        if f"No such compile option: '{name}'" in str(e):
            return False
        raise
    return True


def xla_options(options: dict) -> dict:
    """``options`` without those the running XLA lacks (``xla_takes``)."""
    return {k: v for k, v in options.items() if xla_takes(k, v)}


def xla_flags(options: dict) -> str:
    """``options`` as ``XLA_FLAGS`` words, for a subprocess (the same names as compile options)."""
    return " ".join(f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in options.items())


# Compile options for tests that read a compiled step's numbers: XLA:CPU skips LLVM's optimisations
# only (the same HLO passes), so memory analysis, collectives and FLOPs are the same in less time.
FAST_XLA = {"xla_backend_optimization_level": 0}
# Compile options for tests that run a program and compare its values only (a sharded step against the
# unsharded one, an init, a forward): XLA:CPU's older loop emitters as well, which compile a tiny model's
# train step in about half the time. They fuse a few reductions differently (a few hundred bytes of temp,
# a few thousand elementwise FLOPs; the same collectives), so no test reading a compiled number uses them,
# and neither does a test comparing two programs bit for bit whose fusions may differ (a remat'd step).
# XLA:CPU in jaxlib 0.12 has no older emitters left, nor the option (it refuses an option it lacks): there
# RUN_XLA is FAST_XLA, and these tests compile as those reading compiled numbers do.
RUN_XLA = xla_options({**FAST_XLA, "xla_cpu_use_fusion_emitters": False})
# Compile options for tests that read a compiled step's collectives and nothing else (comm_total,
# comm(), collectives): RUN_XLA. The older emitters change how XLA:CPU fuses, after SPMD partitioning
# and the collective passes: each dry_run switched to COMM_XLA was compiled both ways when it was
# switched (over a hundred programs), and all gave the same collectives, to the byte, in about a third
# of the time. A program whose collectives differed under the two (test_hand_layout_estimates' scanned
# remat K2 case: the same bytes, split apart differently) keeps FAST_XLA, as does a test reading memory
# or FLOPs as well.
COMM_XLA = RUN_XLA


# The XLA the suite's compiled numbers were read off is jaxlib 0.10's. A newer one (jaxlib 0.12) compiles a few of
# the suite's programs otherwise (a collective more or less, another buffer size): a test whose expectation holds
# for 0.10's compiler only is skipped there with ``newer_xla(what differs)``, naming the difference measured.
NEWER_XLA = jax.__version_info__ >= (0, 11)


def newer_xla(difference: str):
    """Skip mark for jaxlib >= 0.11, whose XLA compiles the test's program with ``difference`` (measured on 0.12.1)."""
    return pytest.mark.skipif(NEWER_XLA, reason=f"jaxlib {jax.__version__}'s XLA (measured on 0.12.1): {difference}")


@functools.cache
def _zoo_init(name: str, seed: int):
    from tpflax import zoo

    key = jax.random.key(seed)
    return jax.device_get(jax.jit(zoo.get(name).init).lower(key).compile(RUN_XLA)(key))


def zoo_init(name: str, seed: int = 0):
    """A tiny zoo model's variables on the host, for tests that only need some variables: the init is
    compiled with RUN_XLA (several times quicker than ``m.init``'s optimised compile; the values may differ from
    ``m.init(seed)``'s in a float's last bits) once per process, and each call gets its own copy."""
    return jax.tree_util.tree_map(np.array, _zoo_init(name, seed))


def same_bytes(a, b) -> bool:
    """Same dtype, shape and bytes: bit-exact, NaN payloads included."""
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()


def assert_bit_exact(got, want):
    g, w = jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want)
    assert len(g) == len(w)
    for a, b in zip(g, w, strict=True):
        assert same_bytes(a, b), (np.asarray(a).dtype, np.asarray(b).dtype)


def tiny_lm():
    """A linen token model: embed 128 x 64, an MLP on the residual, a 128-way head (untied)."""
    import flax.linen as nn

    class TinyLM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(128, 64, name="embed")(ids)
            return nn.Dense(128, name="head")(h + nn.Dense(64, name="down")(nn.gelu(nn.Dense(256, name="up")(h))))

    return TinyLM()


def nnx_mlp(d: int, f: int, seed: int = 0):
    """An nnx module of two linears, ``up`` (d -> f) and ``down`` (f -> d), its variables concrete."""
    from flax import nnx

    class Mlp(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(d, f, rngs=rngs), nnx.Linear(f, d, rngs=rngs)

    return Mlp(nnx.Rngs(seed))


def specs(plan, suffixes):
    """``{suffix: spec}`` for the one decision whose path ends with each suffix."""
    out = {}
    for s in suffixes:
        hits = [k for k in plan.decisions if k.endswith(s)]
        assert len(hits) == 1, (s, hits)
        out[s] = plan.decisions[hits[0]].spec
    return out
