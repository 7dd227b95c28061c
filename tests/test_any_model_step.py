"""make_train_step and dry_run for models that are not in the zoo.

Two models of the test's own, each planned for {data: 2, model: 4}: a linen
Module (with ``sample=``) and a plain ``fn(variables, ids)`` in the style of a
Hugging Face Flax model's apply. Each is compiled once with the dry run and run
for one real step (module-scoped), whose loss must equal the unsharded loss.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import FAST_XLA

import tpflax

VOCAB, EMBED, HIDDEN, BATCH, SEQ = 64, 32, 128, 8, 16
MESH = {"data": 2, "model": 4}
S = jax.ShapeDtypeStruct
IDS = S((BATCH, SEQ), jnp.int32)


class TinyLM(nn.Module):
    """Embed -> MLP (up, down) with a residual -> logits: names tpflax's zoo never uses."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(VOCAB, EMBED, name="tok")(ids)
        h = h + nn.Dense(EMBED, name="lower")(nn.gelu(nn.Dense(HIDDEN, name="upper")(h)))
        return nn.Dense(VOCAB, name="logits")(h)


def hf_style(variables, ids):
    """Like ``FlaxGPT2LMHeadModel(ids, params=variables)``: a function of the tree and the ids."""
    h = variables["wte"][ids]
    h = h + jax.nn.gelu(h @ variables["fc_in"]) @ variables["fc_out"]
    return h @ variables["wte"].T  # tied output head


def hf_variables(seed=0):
    k = jax.random.split(jax.random.key(seed), 3)
    return {"wte": 0.1 * jax.random.normal(k[0], (VOCAB, EMBED)),
            "fc_in": 0.1 * jax.random.normal(k[1], (EMBED, HIDDEN)),
            "fc_out": 0.1 * jax.random.normal(k[2], (HIDDEN, EMBED))}


def reference_loss(forward, variables, ids):
    """Next-token cross-entropy written out by hand, on one device."""
    logits = forward(variables, ids).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))


def _build(kind):
    ids = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB, dtype=jnp.int32)
    if kind == "linen":
        model = TinyLM()
        variables = jax.jit(model.init)(jax.random.key(0), ids)
        forward = model.apply
    else:
        model, variables, forward = hf_style, hf_variables(), hf_style
    return model, variables, forward, ids


@pytest.fixture(scope="module", params=["linen", "callable"])
def case(request):
    """(plan, TrainStep, DryRun, sharded loss, reference loss), each compiled once."""
    model, variables, forward, ids = _build(request.param)
    opt = optax.adamw(1e-3)
    plan = tpflax.plan(variables, MESH)
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(model, plan, mesh, opt, sample=(IDS,))
    dr = tpflax.dry_run(ts, plan, mesh, compiler_options=FAST_XLA)
    params = variables["params"] if "params" in variables else variables
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
                   compiler_options=FAST_XLA)
    _, _, loss = step(tpflax.shard(variables, plan, mesh), jax.device_put(opt.init(params), ts.in_shardings[1]),
                      jax.device_put((ids,), ts.in_shardings[2]))
    ref = jax.jit(reference_loss, static_argnums=0)(forward, variables, ids)
    return plan, ts, dr, float(loss), float(ref)


def test_step_is_planned_and_sharded(case):
    plan, ts, dr, _, _ = case
    specs = [tuple(d.spec) for d in plan.decisions.values()]
    assert any("model" in s for s in specs), "nothing was tensor-split"
    ids_sharding = ts.args[2][0].sharding
    assert tuple(ids_sharding.spec) == ("data",)  # the batch splits over data only
    assert ts.args[2][0].shape == (BATCH, SEQ)


def test_dry_run_compiles_with_model_parallel_collectives(case):
    plan, ts, dr, _, _ = case
    assert dr.memory["argument"] is not None and dr.memory["argument"] > 0
    kinds = {c.kind for c in dr.collectives}
    assert "all-reduce" in kinds, kinds  # gradients over data, row outputs over model
    # params, adamw's mu and nu (shaped like them), its int32 step count and this device's
    # ids: exactly the argument bytes XLA holds per device
    sharded_param_bytes = sum(d.bytes_per_device for d in plan.decisions.values())
    ids_bytes = BATCH // MESH["data"] * SEQ * 4
    assert dr.memory["argument"] == 3 * sharded_param_bytes + 4 + ids_bytes


def test_one_real_step_loss_equals_unsharded(case):
    _, _, _, loss, ref = case
    # Both are float32 means of 120 x 8 log-softmax terms of logits from dot products at
    # most 128 wide. Sharding only reorders those sums (partial dots all-reduced over
    # model=4, the mean split over data=2); a reordered sum of K float32 terms differs by
    # at most (K-1)*eps relative to the sum of magnitudes, here 127 * 1.2e-7 = 1.5e-5 of the
    # per-logit scale, and the loss (~log 64 = 4.2) is bounded by the same relative amount.
    assert abs(loss - ref) <= 1.5e-5 * abs(ref), (loss, ref)
    assert np.isfinite(loss) and loss > 0


def test_no_loss_and_no_logits_is_a_clear_error():
    def regress(v, x):
        return x @ v["w"]

    p = tpflax.plan({"w": S((16, 8), jnp.float32)}, {"model": 1})
    with pytest.raises(tpflax.OptionError, match="pass loss="):
        tpflax.make_train_step(regress, p, tpflax.make_mesh({"model": 1}), optax.sgd(0.1),
                               sample=(S((4, 16), jnp.float32),))
    ts = tpflax.make_train_step(regress, p, tpflax.make_mesh({"model": 1}), optax.sgd(0.1),
                                sample=(S((4, 16), jnp.float32),), loss=lambda out, x: jnp.mean(out ** 2))
    assert jax.eval_shape(ts.fn, *ts.args)[2].shape == ()


def test_batch_size_resizes_the_sample():
    p = tpflax.plan(hf_variables(), MESH)
    ts = tpflax.make_train_step(hf_style, p, tpflax.make_mesh(MESH), optax.sgd(0.1), 4,
                                sample=(IDS,))
    assert ts.args[2][0].shape == (4, SEQ)
