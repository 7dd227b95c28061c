"""Parameters whose gradient is structurally zero (read only through ``jax.lax.stop_gradient``): live in the
forward, so jax's dead-code elimination keeps them, but XLA compiles no gradient collective for them."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA

import tpflax

D, F, V = 64, 256, 128
SAMPLE = (jax.ShapeDtypeStruct((8, 16), jnp.int32),)


class FrozenDense(nn.Module):
    """A dense layer whose kernel the step does not train: the forward reads it through stop_gradient."""

    features: int

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features))
        return x @ jax.lax.stop_gradient(k)


class FrozenEncoder(nn.Module):
    # a frozen feature extractor (embedding and MLP under stop_gradient) below a trained MLP and head
    @nn.compact
    def __call__(self, ids):
        h = jax.lax.stop_gradient(nn.Embed(V, D, name="embed")(ids))
        h = h + FrozenDense(D, name="frozen_down")(nn.gelu(FrozenDense(F, name="frozen_up")(h)))
        h = h + nn.Dense(D, name="down")(nn.gelu(nn.Dense(F, name="up")(nn.LayerNorm(name="norm")(h))))
        return nn.Dense(V, use_bias=False, name="head")(h)


def _loss(out, ids):
    return jnp.mean(out ** 2)


def test_no_grad_params_are_found_from_the_trace():
    m = FrozenEncoder()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    flow = tpflax.dataflow(m, SAMPLE, v)
    assert flow.no_grad == {"params/embed/embedding", "params/frozen_up/kernel", "params/frozen_down/kernel"}
    assert not flow.dead


@pytest.mark.parametrize("mesh_shape", [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}])
def test_stopped_params_get_no_gradient_collectives(mesh_shape):
    # the frozen kernels still compute (a Megatron pair, fsdp-gathered on the fsdp mesh), but their gradients
    # are zero: XLA:CPU compiles no batch-axis all-reduce for them (2 x 16 KB shards and the 32 KB table), and
    # their pair's input (the stopped table's lookup) has no gradient to sum over model (24 KB). The estimate
    # priced both: 1.65x the compiled collectives (data mesh), 1.47x (fsdp mesh); now 1.008x and 1.006x (the
    # split softmax's three float32 row sums, 1 KB over). 2% on the batch axis and on the total
    m = FrozenEncoder()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    p = tpflax.plan(v, mesh_shape, model=m, sample=SAMPLE)
    assert p.decisions["params/frozen_up/kernel"].spec == p.decisions["params/up/kernel"].spec
    mesh = tpflax.make_mesh(mesh_shape)
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=SAMPLE, loss=_loss, backend="cpu")
    grads = [i for i in e.items if "frozen" in i.source or "embed" in i.source]
    assert not [i for i in grads if "gradient" in i.why and "input" not in i.why], grads
    batch = next(a for a in mesh_shape if a != "model")
    assert e.comm["all-reduce"][batch] == pytest.approx(dr.comm()["all-reduce"][batch], rel=0.02), (e.comm, dr.comm())
    assert abs(e.comm_total / dr.comm_total - 1) < 0.02, (e.comm, dr.comm())


class TwoMLPs(nn.Module):
    # a trained MLP over an embedding, and a second MLP and head that only the optimizer freezes
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        h = h + nn.Dense(D, name="down")(nn.gelu(nn.Dense(F, name="up")(h)))
        h = h + nn.Dense(D, name="frozen_down")(nn.gelu(nn.Dense(F, name="frozen_up")(h)))
        return nn.Dense(V, use_bias=False, name="head")(h)


def test_params_the_optimizer_zeroes_get_no_gradient_collectives():
    # frozen by optax.multi_transform + set_to_zero instead of plan(trainable=): the update never reads their
    # gradients, so XLA drops them and their data all-reduces. The estimate priced them as trained (the LoRA-Llama
    # review: 2.04x the compiled collectives); now planner/optimizer.py::ignored_grads finds them from update's jaxpr
    m = TwoMLPs()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    ms = {"data": 2, "model": 4}
    p = tpflax.plan(v, ms, model=m, sample=SAMPLE)
    labels = jax.tree_util.tree_map_with_path(
        lambda path, _: "train" if any(getattr(k, "key", None) in ("up", "down") for k in path) else "frozen",
        v["params"])
    tx = optax.multi_transform({"train": optax.adamw(1e-3), "frozen": optax.set_to_zero()}, labels)
    mesh = tpflax.make_mesh(ms)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, tx, sample=SAMPLE, loss=_loss), p, mesh,
                        compiler_options=COMM_XLA)
    e = tpflax.estimate(p, tx, model=m, sample=SAMPLE, loss=_loss, backend="cpu")
    assert e.comm["all-reduce"]["data"] == pytest.approx(dr.comm()["all-reduce"]["data"], rel=0.02), (e.comm, dr.comm())
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05, (e.comm, dr.comm())
    assert any("never reads the gradient" in n and "trainable=" in n for n in e.notes)
