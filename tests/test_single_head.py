"""Collectives of a single-head attention split over its channels, as a VAE's mid-block has it.

diffusers' FlaxAutoencoderKL attends over the pixels with one head: ``query``, ``key``, ``value`` and
``proj_attn`` are all ``(c, c)``. A plan that splits q/k/v as columns and ``proj_attn`` as their row (the
tree-only plan does: no head count is visible in the tree) makes the scores ``q @ k`` partial sums over
the channels, all-reduced forward, and ``probs @ v`` sums v's split channels into the gradient of the
probabilities, all-reduced backward. The estimate priced the pair's two activation all-reduces but not
these two scores-sized ones: tiny VAE, data=2 x model=4, -10.8% under the compiled collectives. The traced
planner keeps q and k whole (their channels are summed by a product of two activations); only v and
``proj_attn`` pair.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _util import COMM_XLA
from jax.sharding import PartitionSpec as P

import tpflax

B, S, C = 8, 64, 64
X = (jax.ShapeDtypeStruct((B, S, C), jnp.float32),)
MESH = {"data": 2, "model": 4}
SPLIT = [(r"(query|key|value)/kernel$", P(None, "model")), (r"(query|key|value)/bias$", P("model")),
         (r"proj_attn/kernel$", P("model", None)), (r".*", "replicate")]


class Attention(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm")(x)
        q, k, v = (nn.Dense(C, name=n)(h) for n in ("query", "key", "value"))
        probs = jax.nn.softmax(jnp.einsum("bqc,bkc->bqk", q, k) * C ** -0.5, axis=-1)
        return x + nn.Dense(C, name="proj_attn")(jnp.einsum("bqk,bkc->bqc", probs, v))


def _fn(p, x):
    return Attention().apply({"params": p}, x)


def _loss(out, x):
    return jnp.mean((out - x) ** 2)


def _params():
    return jax.eval_shape(Attention().init, jax.random.PRNGKey(0), *X)["params"]


def test_estimate_prices_the_scores_all_reduces(devices):
    plan = tpflax.plan(_params(), MESH, rules=SPLIT)
    mesh = tpflax.make_mesh(MESH)
    tx = optax.adamw(1e-3)
    dr = tpflax.dry_run(tpflax.make_train_step(_fn, plan, mesh, tx, sample=X, loss=_loss), plan, mesh,
                        compiler_options=COMM_XLA)
    e = tpflax.estimate(plan, tx, model=_fn, sample=X, loss=_loss, backend="cpu")
    scores = [i for i in e.items if i.why.startswith("a product of two activations")]
    # the scores (b, q, k) of one device's 4 examples in float32, forward and backward
    assert sorted((i.size, i.count, i.axes) for i in scores) == [(B // 2 * S * S * 4, 1, ("model",))] * 2
    got, want = e.comm["all-reduce"]["model"], dr.comm()["all-reduce"]["model"]
    assert got == want, (e.comm, dr.comm())


def test_traced_plan_keeps_query_and_key_whole():
    plan = tpflax.plan(_params(), MESH, model=_fn, sample=X)
    assert [plan.decisions[f"{n}/kernel"].spec for n in ("query", "key", "value", "proj_attn")] == [
        P(None, None), P(None, None), P(None, "model"), P("model", None)]
