"""Fine-tuning a subset: ``plan(..., trainable=)`` freezes the rest (LoRA's base kernels).

A frozen parameter has no gradient, no optimizer state and no gradient collective. Before
``trainable=`` every float parameter was priced and stepped as trained: for a LoRA model the
estimate counted the base kernels' gradients and adam moments (2.7x the compiled arguments of a
LoRA step) and ``make_train_step`` differentiated the base kernels.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpflax

D, F, R = 32, 64, 4


def _lora_mlp():
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.LoRALinear(D, F, lora_rank=R, use_bias=False, rngs=rngs,
                                     b_initializer=nnx.initializers.normal(0.1))
            self.down = nnx.LoRALinear(F, D, lora_rank=R, use_bias=False, rngs=rngs,
                                       b_initializer=nnx.initializers.normal(0.1))

        def __call__(self, x):
            return x + self.down(nnx.relu(self.up(x)))

    return Net(nnx.Rngs(0))


def _mse(out, x):
    return jnp.mean((out - 1.0) ** 2)


@pytest.fixture(scope="module")
def lora():
    from flax import nnx

    m = _lora_mlp()
    x = jax.random.normal(jax.random.key(1), (8, D))
    plan = tpflax.plan(nnx.state(m), {"data": 2, "model": 4}, trainable=nnx.LoRAParam)
    return m, x, plan


def test_the_filter_marks_only_the_adapters_trainable(lora):
    from flax import nnx

    m, _, plan = lora
    assert {p for p, d in plan.decisions.items() if d.trainable} == {
        f"{layer}/lora/lora_{ab}" for layer in ("up", "down") for ab in "ab"}
    # a regex on the paths says the same
    again = tpflax.plan(nnx.state(m), {"data": 2, "model": 4}, trainable=r"lora_[ab]$")
    assert {p: d.trainable for p, d in again.decisions.items()} == {p: d.trainable for p, d in plan.decisions.items()}
    with pytest.raises(tpflax.OptionError, match="selects none"):
        tpflax.plan(nnx.state(m), {"model": 4}, trainable="no-such-path")
    with pytest.raises(tpflax.RuleError, match="not a regex"):
        tpflax.plan(nnx.state(m), {"model": 4}, trainable="(")


def test_estimate_prices_no_gradient_or_moments_for_frozen_leaves_and_xla_agrees(lora):
    m, x, plan = lora
    tx = optax.adam(1e-2)
    mesh = tpflax.make_mesh(plan.mesh)
    e = tpflax.estimate(plan, tx, model=m, sample=(x,), loss=_mse)
    trained = sum(d.bytes_per_device for d in plan.decisions.values() if d.trainable)
    frozen = sum(d.bytes_per_device for d in plan.decisions.values() if not d.trainable)
    assert (e.per_device.params, e.per_device.grads, e.per_device.model_state) == (trained, trained, frozen)
    assert e.per_device.opt_state == 2 * trained + 4  # adam's mu and nu, and its int32 count
    dr = tpflax.dry_run(tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=_mse), plan, mesh)
    # the step's arguments are every leaf, the adapters' optimizer state and the batch: exact
    assert dr.memory["argument"] == e.per_device.arguments


def test_the_step_updates_the_adapters_as_nnx_optimizer_wrt_does_and_keeps_the_base(lora):
    from flax import nnx

    m, x, plan = lora
    tx = optax.sgd(0.5)
    mesh = tpflax.make_mesh(plan.mesh)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=_mse)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings)
    state = nnx.state(m)
    opt = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    new, _, value = step(tpflax.shard(state, plan, mesh), opt, (x,))
    ref = _lora_mlp()
    ref_opt = nnx.Optimizer(ref, tx, wrt=nnx.LoRAParam)
    ref_loss, grads = nnx.value_and_grad(lambda mod: _mse(mod(x), x), argnums=nnx.DiffState(0, nnx.LoRAParam))(ref)
    ref_opt.update(ref, grads)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
    flat_new, flat_ref, flat_old = (dict(nnx.to_flat_state(s)) for s in (new, nnx.state(ref), state))
    for path, v in flat_new.items():
        if isinstance(v, nnx.LoRAParam):
            assert not np.array_equal(v[...], flat_old[path][...]), path  # it trained
            # the same float32 program split over 8 devices: reordered sums, a few ulps
            np.testing.assert_allclose(np.asarray(v[...]), np.asarray(flat_ref[path][...]), rtol=1e-5, atol=1e-6)
        else:  # frozen: carried through bit for bit
            np.testing.assert_array_equal(np.asarray(v[...]), np.asarray(flat_old[path][...]))


def test_a_plain_tree_freezes_by_regex_in_the_step():
    # a function over a dict (a Hugging Face apply): the frozen leaf is no parameter of the optimizer
    # and leaves the step unchanged
    tree = {"w": jnp.ones((D, D)), "lora_a": jnp.full((D, R), 0.1), "lora_b": jnp.full((R, D), 0.1)}

    def fn(v, x):
        return x @ v["w"] + x @ v["lora_a"] @ v["lora_b"]

    x = jax.random.normal(jax.random.key(2), (8, D))
    plan = tpflax.plan(tree, {"data": 2, "model": 4}, trainable="lora")
    mesh = tpflax.make_mesh(plan.mesh)
    tx = optax.adam(1e-2)
    ts = tpflax.make_train_step(fn, plan, mesh, tx, sample=(x,), loss=_mse)
    opt = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    assert opt[0].mu["w"] is None and opt[0].mu["lora_a"].shape == (D, R)
    new, _, _ = jax.jit(ts.fn)(tpflax.shard(tree, plan, mesh), opt, (x,))
    np.testing.assert_array_equal(np.asarray(new["w"]), np.asarray(tree["w"]))
    assert not np.array_equal(np.asarray(new["lora_b"]), np.asarray(tree["lora_b"]))
