"""The chooser prices a model's own ``jax.lax.with_sharding_constraint`` (tpflax/_src/planner/constraints.py).

The Flax "Scale up on multiple devices" guide's block at 256 -> 64, ``relu(up(x))`` constrained to
``P(batch, 'model')`` before ``down``: a bottleneck, so the chooser weighs its Megatron split against keeping it
whole by step time. Kept whole, XLA splits the hidden anyway: the whole kernels sum or gather around their matmuls
and their gradients come out split, updated split and gathered back (the estimate's quantities,
tests/test_constraint_cost.py). Priced so, the split that agrees with the constraint wins. Each plan is compiled on
the 8-device CPU mesh; the collectives are XLA's, exact (the same program compiles to the same HLO)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from test_constraint_cost import DATA, FSDP, Scanned, Unrolled

import tpflax

B = 8


def _loss(out, x):
    return jnp.mean((out - x) ** 2)


def _model(cls, mesh, constrained=True):
    batch = "fsdp" if "fsdp" in mesh else "data"
    act = NamedSharding(tpflax.make_mesh(mesh), P(batch, "model")) if constrained else None
    return cls(256, 64, act, rngs=nnx.Rngs(0))


def _compiled(model, variables, sample, p, mesh) -> float:
    m = tpflax.make_mesh(mesh)
    ts = tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=_loss)
    comm = tpflax.dry_run(ts, p, m, compiler_options=COMM_XLA).comm()
    return sum(v for by in comm.values() for v in by.values())


def _specs(p):
    return {k: d.spec for k, d in p.decisions.items()}


SAMPLE = (jax.ShapeDtypeStruct((B, 256), jnp.float32),)
MEGATRON = {"layers/up/kernel": P(None, None, "model"), "layers/down/kernel": P(None, "model", None)}
# (mesh, the plan's specs, its compiled collectives, the specs chosen before the constraint was priced, theirs)
CASES = {
    "data": (DATA, MEGATRON, 90_116, {"layers/up/kernel": P(None, None, None),
                                      "layers/down/kernel": P(None, None, None)}, 679_940),
    # the fsdp pass splits the other dim too; before, the pair was kept whole and split over fsdp only
    "fsdp": (FSDP, {"layers/up/kernel": P(None, "fsdp", "model"), "layers/down/kernel": P(None, "model", "fsdp")},
             122_884, {"layers/up/kernel": P(None, "fsdp", None), "layers/down/kernel": P(None, None, "fsdp")},
             417_796),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_the_guide_block_splits_as_its_constraint(case):
    """``plan(model=)`` on the guide's scanned block: the Megatron split the constraint asks for, 7.5x / 3.4x fewer
    compiled collectives per step than the whole pair it chose before (inside the scan XLA sums the whole kernels'
    partial results as the split pair does, and adds the gathers of both kernels and their moments)."""
    mesh, want, n, before, n_before = CASES[case]
    model = _model(Scanned, mesh)
    p = tpflax.plan(nnx.state(model), mesh, model=model, sample=SAMPLE)
    assert _specs(p) == want
    assert "constraint" in str(p.decisions["layers/up/kernel"].alternatives)
    old = tpflax.plan(nnx.state(model), mesh, rules=[(k, v) for k, v in before.items()])
    assert _specs(old) == before
    assert (_compiled(model, None, SAMPLE, p, mesh), _compiled(model, None, SAMPLE, old, mesh)) == (n, n_before)


def test_without_the_constraint_the_bottleneck_stays_whole():
    """The twin without the constraint: kept whole by cost, as before (what the constraint changes)."""
    model = _model(Scanned, DATA, constrained=False)
    p = tpflax.plan(nnx.state(model), DATA, model=model, sample=SAMPLE)
    assert _specs(p) == {"layers/up/kernel": P(None, None, None), "layers/down/kernel": P(None, None, None)}


def test_unrolled_blocks_by_the_batch_priced():
    """Unrolled, XLA gathers the 64-wide hidden before a whole ``down`` (and its gradient before ``up``) instead
    of summing 256-wide partials, so which layout is cheaper turns on the batch. At the chooser's default
    8,192 tokens, whole: compiled at 8,192 rows, 3.0 MB of collectives against the split's 18.9 MB (measured; not
    compiled here). At the batch of 8 given as ``batch=``, split: 83,972 B against 657,668 B whole. The chooser
    took both before the constraint was priced too; priced, it must not take the split at 8,192 tokens (pricing the
    whole pair's collectives as sums, as inside a scan, would)."""
    model = _model(Unrolled, DATA)
    whole = tpflax.plan(nnx.state(model), DATA, model=model, sample=SAMPLE)
    assert set(_specs(whole).values()) == {P(None, None)}
    p = tpflax.plan(nnx.state(model), DATA, model=model, sample=SAMPLE, batch=SAMPLE)
    assert _specs(p) == {f"blocks/{i}/{k}/kernel": s for i in range(2)
                         for k, s in (("up", P(None, "model")), ("down", P("model", None)))}
    assert (_compiled(model, None, SAMPLE, p, DATA), _compiled(model, None, SAMPLE, whole, DATA)) == (83_972, 657_668)


class LinenBlock(nn.Module):
    """The guide's block in linen, stacked with ``nn.scan``."""

    act: NamedSharding

    @nn.compact
    def __call__(self, x, _):
        y = jax.nn.relu(nn.Dense(64, use_bias=False, name="up")(x))
        y = jax.lax.with_sharding_constraint(y, self.act)
        return x + nn.Dense(256, use_bias=False, name="down")(y), None


class LinenStack(nn.Module):
    act: NamedSharding

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(LinenBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return scan(self.act, name="layers")(x, None)[0]


def test_linen_scanned_block_splits_as_its_constraint():
    """The same block in linen under ``nn.scan``: the split the constraint asks for, and XLA's collectives the
    nnx twin's (the same program)."""
    model = LinenStack(NamedSharding(tpflax.make_mesh(DATA), P("data", "model")))
    variables = jax.eval_shape(model.init, jax.random.key(0), SAMPLE[0])
    p = tpflax.plan(variables, DATA, model=model, sample=SAMPLE)
    assert _specs(p) == {"params/" + k: v for k, v in MEGATRON.items()}
    assert _compiled(model, variables, SAMPLE, p, DATA) == 90_116
