"""Neural-network wave functions as NetKet writes them (``benchmarks/probe_netket.py``), in plain Flax.

Four things the planner and the estimate got wrong on NetKet's models, each a test below:

- an RBM sums the log-cosh of its hidden units: split, each shard sums its part and XLA all-reduces one value
  per configuration, but the estimate priced a gather of the whole hidden layer (2.4x the compiled collectives);
- NetKet's ``log_cosh`` takes ``jnp.signbit``, a ``bitcast_convert_type`` (float64 -> int64), which the trace
  took as opaque: every dataflow through it ended;
- an autoregressive network's dense layers multiply their kernel by a constant mask: the trace took the mask
  for an activation, so the masked kernel was no weight and nothing was paired (the traced plan replicated);
- NetKet's ``MLP`` numbers its layers ``Dense_0``, ``Dense_1``, ``Dense_2``: tree-only, none was paired.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from _util import COMM_XLA

import tpflax

MESH = {"data": 2, "model": 4}
N, B = 32, 16
SAMPLE = (jax.ShapeDtypeStruct((B, N), jnp.float32),)


def _log_cosh(x):
    """NetKet's: ``signbit`` keeps it finite for large negative ``x``."""
    sgn = 1 - 2 * jnp.signbit(x)
    x = x * sgn
    return x + jnp.log1p(jnp.exp(-2.0 * x)) - jnp.log(2.0)


class RBM(nn.Module):
    @nn.compact
    def __call__(self, x):
        return jnp.sum(_log_cosh(nn.Dense(4 * N, name="hidden")(x)), axis=-1) + nn.Dense(1, name="visible")(x)[:, 0]


class MaskedDense(nn.Module):
    """A dense layer whose kernel is multiplied by a constant lower-triangular mask (an autoregressive layer)."""

    features: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        mask = np.tril(np.ones((x.shape[-1], self.features), np.float32), -1)
        return x @ (k * mask) + self.param("bias", nn.initializers.zeros, (self.features,))


class Autoregressive(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.gelu(MaskedDense(4 * N, name="layers_0")(x))
        h = MaskedDense(N, name="layers_1")(h)
        return jnp.sum(h * x, axis=-1)


class SequentialMLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        for width in (8 * N, 8 * N):
            x = nn.gelu(nn.Dense(width)(x))
        return nn.Dense(1)(x)[:, 0]


class Wavefunction(nn.Module):
    """NetKet's ``MLP`` model: the layers inside a submodule of their own."""

    @nn.compact
    def __call__(self, x):
        return SequentialMLP(name="MLP_0")(x)


def _loss(out, x):
    return jnp.mean(out ** 2)


def _specs(plan):
    return {p.removeprefix("params/"): tuple(d.spec) for p, d in plan.decisions.items()}


def test_an_rbm_hidden_layer_split_sums_one_value_per_configuration():
    model = RBM()
    variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
    plan = tpflax.plan(variables, MESH, model=model, sample=SAMPLE, batch=SAMPLE)
    assert _specs(plan)["hidden/kernel"] == (None, "model")
    assert "each row's partial reduction" in plan.decisions["params/hidden/kernel"].reason
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(model, plan, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, plan, mesh, compiler_options=COMM_XLA)
    est = tpflax.estimate(plan, optax.adamw(1e-3), model=model, sample=SAMPLE, loss=_loss, backend="cpu")
    # over model: one float32 per configuration on a device (8 of them), all-reduced; nothing gathered
    compiled = [(c.kind, c.shapes) for c in dr.collectives if c.axes == ("model",)]
    assert compiled == [("all-reduce", ((8,),))], compiled
    summed = [i for i in est.items if i.axes == ("model",)]
    assert [(i.kind, i.size) for i in summed] == [("all-reduce", 8 * 4)], summed
    assert abs(est.comm_total / dr.comm_total - 1) < 0.01, (est.comm_total, dr.comm_total)


def test_a_kernel_times_a_constant_mask_is_still_a_kernel():
    model = Autoregressive()
    variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
    plan = tpflax.plan(variables, MESH, model=model, sample=SAMPLE, batch=SAMPLE)
    specs = _specs(plan)
    assert specs["layers_0/kernel"] == (None, "model") and specs["layers_1/kernel"] == ("model", None)
    # paired by the trace (the tree would pair two numbered layers too, by their names and widths)
    assert all("traced" in plan.decisions[f"params/layers_{i}/kernel"].reason for i in (0, 1))


def test_numbered_dense_layers_chained_in_order_pair_the_first_two():
    model = Wavefunction()
    variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
    tree = _specs(tpflax.plan(variables, MESH, batch=SAMPLE))
    traced = _specs(tpflax.plan(variables, MESH, model=model, sample=SAMPLE, batch=SAMPLE))
    assert tree["MLP_0/Dense_0/kernel"] == (None, "model") and tree["MLP_0/Dense_1/kernel"] == ("model", None)
    assert tree["MLP_0/Dense_2/kernel"] == (None, None)
    assert {k: v for k, v in tree.items() if k.endswith("kernel")} == {
        k: v for k, v in traced.items() if k.endswith("kernel")}
