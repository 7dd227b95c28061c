"""Numerics: one sharded training step equals the unsharded one, for every zoo model.

Every tiny zoo model runs one full step (forward, backward, optax update) on
three CPU-emulated meshes, {model: 8}, {data: 2, model: 4} and {fsdp: 2,
model: 4} (planned with fsdp_min_bytes=0 so fsdp really shards tiny models), and
is compared with the same step compiled for one device.

Sharding reorders float32 sums (matmul contractions split over devices and
all-reduced, batch sums split over data/fsdp), so bit-exactness is not
expected here (placement itself is bit-exact: see test_apply.py). The bounds
come from the update rule. The optimizer is sgd with momentum: its first step
stores trace = g and moves each parameter by exactly -lr * g, so

1. the gradients (read back from the trace) must agree to the reorder error of
   float32 sums: |g_s - g_r| <= GRAD_ULPS * u * G, where u = 2**-24 and G is
   the model's largest gradient element (the size of the terms that cancel,
   even in a leaf whose own gradient is pure rounding noise, such as attention
   key biases: zero in exact arithmetic, since softmax is shift-invariant);
   measured at most 21 u G (vit's position embedding, a sum over every token
   of the batch), so GRAD_ULPS = 64 leaves 3x headroom, while a wrong layout
   or a missing all-reduce is off by about G;
2. the parameter deltas must agree to what (1) allows:
   |delta_s - delta_r| <= lr * (|g_s - g_r| + u * (|g_s| + |g_r|)) + ulp(new_s) + ulp(new_r)
   (the rounding of lr * g, and of p - lr * g, in each program);
3. the losses to LOSS_ULPS ulp (the forward pass only reorders sums).

Adam is not used: its first step is lr * g / (|g| + eps), which turns the
rounding noise of a near-zero gradient into a step of up to lr
(test_apply.py bounds that case through the gradients).
"""

from __future__ import annotations

import functools

import jax
import numpy as np
import optax
import pytest
from _util import FAST_XLA, RUN_XLA, assert_bit_exact, same_bytes, zoo_init
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo
from tpflax._src.facts.tree import is_box, unbox

MODELS = ["mlp", "cnn", "gpt2", "llama", "llama-scan", "vit", "lstm", "gru", "moe", "nnx-mlp"]
MESHES = {"model8": {"model": 8}, "data2_model4": {"data": 2, "model": 4},
          "fsdp2_model4": {"fsdp": 2, "model": 4}}
# The steps here are run and their values compared, so they compile with _util.RUN_XLA (LLVM's
# optimisations off, the older loop emitters): the reference and the sharded step alike.
FAST = RUN_XLA
LR = 0.1
U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff
GRAD_ULPS, LOSS_ULPS = 64, 16


def make_tx():
    return optax.sgd(LR, momentum=0.9)


def make_step(m, tx):
    is_nnx = m.framework == "nnx"

    def step(variables, opt_state, batch):
        params = variables if is_nnx else variables["params"]

        def loss_fn(p):
            return m.loss(p if is_nnx else {**variables, "params": p}, batch)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return (params if is_nnx else {**variables, "params": params}), opt_state, loss

    return step


@functools.cache
def reference(name):
    """The unsharded step on one device: (model, variables, batch, new variables, new opt state, loss)."""
    m = zoo.get(name)
    variables = zoo_init(name)  # any variables do: the sharded step starts from the same ones
    batch = jax.device_get(m.make_batch(1, 4))
    tx = make_tx()
    params = variables if m.framework == "nnx" else variables["params"]
    new, opt, loss = jax.jit(make_step(m, tx), compiler_options=FAST)(variables, tx.init(params), batch)
    return m, variables, batch, jax.device_get(new), jax.device_get(opt), float(loss)


@pytest.mark.parametrize("mesh_name", list(MESHES))
@pytest.mark.parametrize("name", MODELS)
def test_sharded_step_matches_unsharded(name, mesh_name):
    m, variables, batch, ref_new, ref_opt, ref_loss = reference(name)
    shape = MESHES[mesh_name]
    mesh = tpflax.make_mesh(shape)
    plan = tpflax.plan(variables, shape, fsdp_min_bytes=0)
    tx = make_tx()
    sv = tpflax.shard(variables, plan, mesh)
    params = sv if m.framework == "nnx" else sv["params"]
    so = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=params)
    step = tpflax.jit_step(make_step(m, tx), plan, mesh, optimizer=tx, compiler_options=FAST)
    new, new_opt, loss = step(sv, so, tpflax.shard_batch(batch, mesh))

    # Sharding really happened, and the outputs keep the plan's layout.
    specs = [d.spec for d in plan.decisions.values()]
    assert any(e is not None for s in specs for e in s), "nothing was sharded"
    if "fsdp" in shape:
        assert any("fsdp" in jax.tree_util.tree_leaves(tuple(s)) for s in specs)
    for path, x in jax.tree_util.tree_flatten_with_path(new, is_leaf=is_box)[0]:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        assert unbox(x).sharding.spec == plan.decisions[key].spec, key

    assert abs(float(loss) - ref_loss) <= LOSS_ULPS * U * abs(ref_loss), (float(loss), ref_loss)
    got = tpflax.unshard(new)
    if m.framework != "nnx":  # other collections (batch_stats) pass through the step untouched
        assert_bit_exact({k: x for k, x in got.items() if k != "params"},
                         {k: x for k, x in ref_new.items() if k != "params"})
        variables, got, ref_new = variables["params"], got["params"], ref_new["params"]
    assert_first_sgd_step_close(variables, got, ref_new, tpflax.unshard(new_opt[0].trace),
                                ref_opt[0].trace)


def assert_first_sgd_step_close(old, new_s, new_r, g_s, g_r):
    """Bounds (1) and (2) of the module docstring, leaf by leaf."""
    trees = [jax.tree_util.tree_leaves(t) for t in (old, new_s, new_r, g_s, g_r)]
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(old)[0]]
    big = max(float(np.abs(np.asarray(g, np.float64)).max(initial=0)) for g in trees[4])
    for path, p, ns, nr, gs, gr in zip(paths, *trees, strict=True):
        p, ns, nr, gs, gr = (np.asarray(x, np.float64) for x in (p, ns, nr, gs, gr))
        e = np.abs(gs - gr)
        assert e.max(initial=0) <= GRAD_ULPS * U * big, (path, e.max() / (U * big))
        ulps = np.spacing(np.abs(ns).astype(np.float32)) + np.spacing(np.abs(nr).astype(np.float32))
        bound = LR * (e + U * (np.abs(gs) + np.abs(gr))) + ulps
        diff = np.abs((ns - p) - (nr - p))
        assert (diff <= bound).all(), (path, float((diff - bound).max()))


def test_nnx_step_trains_params_only_and_keeps_the_forward_state():
    # an nnx module's state holds BatchNorm statistics and dropout RNG counts next to its Params: the
    # step differentiates and updates the Params only (the optimizer state is nnx.Optimizer's,
    # wrt=nnx.Param) and keeps the statistics the forward pass computed, as nnx training does
    import jax.numpy as jnp
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            # no bias before the norm: its gradient is zero up to rounding, which adam's
            # normalisation would turn into a +-lr step of either sign
            self.l1 = nnx.Linear(32, 128, use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(128, rngs=rngs)
            self.do, self.l2 = nnx.Dropout(0.1, rngs=rngs), nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            return self.l2(self.do(nnx.relu(self.bn(self.l1(x)))))

    x = jax.random.normal(jax.random.key(1), (8, 32))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    loss = lambda out, x: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()  # noqa: E731
    tx = optax.adamw(0.1, weight_decay=0.5)
    m = Net(nnx.Rngs(0))
    state = nnx.state(m)
    plan = tpflax.plan(state, {"data": 2, "model": 4}, model=m, sample=(x,))
    assert not plan.decisions["bn/var"].trainable and plan.decisions["bn/scale"].trainable
    mesh = tpflax.make_mesh(plan.mesh)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=loss)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    v, _, value = step(tpflax.shard(state, plan, mesh), jax.device_put(tx.init(nnx.state(m, nnx.Param)),
                                                                       ts.in_shardings[1]), (x,))
    ref = Net(nnx.Rngs(0))
    opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)

    @nnx.jit  # the nnx training step, compiled whole rather than dispatched an op (and a compile) at a time
    def ref_step(ref, opt):
        ref_loss, grads = nnx.value_and_grad(lambda mod: loss(mod(x), x))(ref)
        opt.update(ref, grads)
        return ref_loss

    ref_loss = ref_step(ref, opt)
    # the same float32 program split over 8 devices: a few ulps of the loss and of each updated value
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(nnx.state(ref)), strict=True):
        if jnp.issubdtype(jnp.asarray(b).dtype, jnp.floating):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)
        else:
            assert np.array_equal(np.asarray(jax.random.key_data(a) if jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
                                             else a),
                                  np.asarray(jax.random.key_data(b) if jnp.issubdtype(b.dtype, jax.dtypes.prng_key)
                                             else b))


def test_a_cast_tree_needs_variables_and_the_error_says_so():
    import flax.linen as nn
    import jax.numpy as jnp

    m, x = nn.Dense(16), jax.ShapeDtypeStruct((8, 16), jnp.float32)
    v = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, jnp.bfloat16), jax.eval_shape(m.init, jax.random.key(0), x))
    p = tpflax.plan(v, {"data": 2})
    mesh = tpflax.make_mesh(p.mesh)
    mse = lambda out, x: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    with pytest.raises(tpflax.PlanMismatchError, match="pass variables="):
        tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), sample=(x,), loss=mse)
    assert tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), sample=(x,), loss=mse, variables=v).args


def test_a_loss_with_aux_outputs_or_no_mean_is_refused_before_jax_says_gradient_only_for_scalars():
    import flax.linen as nn
    import jax.numpy as jnp

    m, x = nn.Dense(16), jax.ShapeDtypeStruct((8, 16), jnp.float32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2})
    mesh = tpflax.make_mesh(p.mesh)
    for loss, got in ((lambda out, x: (jnp.mean(out ** 2), {"max": out.max()}), "got tuple"),  # has_aux style
                      (lambda out, x: jnp.mean(out ** 2, axis=-1), r"got float32\[8\]")):     # no mean over the batch
        with pytest.raises(tpflax.OptionError, match=f"loss= must return one float scalar, {got}; .*has_aux"):
            tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), sample=(x,), loss=loss)


def test_the_forward_pass_is_traced_once_and_chooses_the_default_loss_the_step_runs():
    # make_train_step checks the step (its shard_maps, a float scalar loss) on one trace of the forward pass, whose
    # abstract output also chooses the default loss; before, the default loss ran the forward pass abstractly and
    # the check traced it again with the loss (twice the time on transformers' GPT-2: benchmarks/step_speed.py)
    import jax.numpy as jnp

    traces = []

    def lm(v, ids):
        traces.append(ids.shape)
        return jnp.take(v["embed"], ids, axis=0) @ v["embed"].T

    v = {"embed": jax.random.normal(jax.random.key(0), (64, 16))}
    ids = jax.random.randint(jax.random.key(1), (8, 12), 0, 64)
    p = tpflax.plan(v, {"data": 2})
    mesh = tpflax.make_mesh(p.mesh)
    ts = tpflax.make_train_step(lm, p, mesh, optax.sgd(0.1), sample=(ids,))
    assert traces == [(8, 12)]
    # the loss it chose is next-token cross-entropy of the logits over the ids
    from tpflax._src.step import next_token_loss

    _, _, loss = jax.jit(ts.fn)(v, optax.sgd(0.1).init(v), (ids,))
    # the same 88 positive float32 terms summed in two orders (over data=2): each sum is within 87 roundings of
    # 2**-24 of the exact one, so the two are within 2 * 87 * 2**-24 < 1.1e-5 of it, relative
    assert abs(float(loss) - float(next_token_loss(lm(v, ids), ids))) <= 1.1e-5 * float(loss)


def test_a_given_loss_reads_python_values_the_forward_pass_returns():
    # with loss= the forward pass is traced with the loss, so its output may hold Python values the loss reads
    # (a flag, a string): the single trace without loss= must not take that from a given loss
    import jax.numpy as jnp

    v = {"w": jax.ShapeDtypeStruct((16, 4), jnp.float32)}
    x = jax.ShapeDtypeStruct((8, 16), jnp.float32)
    p = tpflax.plan(v, {"data": 2})
    mesh = tpflax.make_mesh(p.mesh)
    fn = lambda v, x: ({"y": x @ v["w"], "kind": "regression"}, True)  # noqa: E731
    loss = lambda o, x: jnp.mean(o[0]["y"] ** 2) if o[1] and o[0]["kind"] == "regression" else 0.0  # noqa: E731
    assert tpflax.make_train_step(fn, p, mesh, optax.sgd(0.1), sample=(x,), loss=loss).args


def test_integer_leaves_of_a_plain_tree_are_carried_through_the_step():
    # a step counter (or int8 codes, or an RNG key) beside the weights: jax cannot differentiate
    # it, so the optimizer sees the float leaves only and the step returns the others unchanged
    import jax.numpy as jnp

    w = {"w1": jax.random.normal(jax.random.key(0), (32, 64)) * 0.1,
         "w2": jax.random.normal(jax.random.key(1), (64, 32)) * 0.1, "count": jnp.full((), 7, jnp.int32)}
    x = jax.random.normal(jax.random.key(2), (8, 32))
    fn = lambda v, x: jnp.tanh(x @ v["w1"]) @ v["w2"] * v["count"].astype(x.dtype)  # noqa: E731
    mse = lambda out, x: jnp.mean((out - x) ** 2)  # noqa: E731
    tx = optax.adamw(1e-2)
    p = tpflax.plan(w, {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    ts = tpflax.make_train_step(fn, p, mesh, tx, sample=(x,), loss=mse)
    state = tpflax.shard_optimizer_state(tx, None, p, mesh)
    assert state[0].mu["count"] is None and state[0].mu["w1"].sharding.spec == p.specs["w1"]
    # from the real params too (they had moments for the counter, which the step refused)
    assert tpflax.shard_optimizer_state(tx, None, p, mesh, params=w)[0].mu["count"] is None
    # a state made from the whole tree (integer moments included) is still placed, as before
    assert tpflax.shard_optimizer_state(tx, tx.init(w), p, mesh)[0].mu["count"].shape == ()
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    new, _, value = step(tpflax.shard(w, p, mesh), state, (x,))
    assert int(new["count"]) == 7 and new["count"].dtype == jnp.int32
    floats = {k: w[k] for k in ("w1", "w2")}

    @jax.jit  # the unsharded step, compiled whole rather than dispatched an op (and a compile) at a time
    def ref_step(floats):
        ref_loss, grads = jax.value_and_grad(lambda f: mse(fn({**f, "count": w["count"]}, x), x))(floats)
        updates, _ = tx.update(grads, tx.init(floats), floats)
        return ref_loss, optax.apply_updates(floats, updates)

    ref_loss, ref = ref_step(floats)
    # the same float32 program split over 8 devices: a few ulps of the loss and of each updated value
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
    for k in ref:
        np.testing.assert_allclose(np.asarray(new[k]), np.asarray(ref[k]), rtol=1e-4, atol=1e-5)


def _values(state):
    """The arrays of an nnx State (keys as their key data), in leaf order, on the host."""
    import jax.numpy as jnp

    return [np.asarray(jax.random.key_data(x) if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
            for x in jax.tree.leaves(state)]


def _assert_values_close(got, want):
    for a, b in zip(_values(got), _values(want), strict=True):
        if np.issubdtype(b.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        else:
            assert np.array_equal(a, b)


def test_optimizer_state_from_the_plan_alone_runs_through_the_nnx_step():
    # shard_optimizer_state(tx, None, plan, mesh) knows the model only through the plan: it covered
    # the BatchNorm statistics and an integer counter too, and its leaves had no nnx Variable
    # wrappers, so the step (which trains the Params) refused it. Both now build the state over what
    # the step differentiates, the float Params as bare arrays (as nnx.Optimizer hands them to optax)
    import jax.numpy as jnp
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(32, 128, use_bias=False, rngs=rngs)
            self.bn = nnx.BatchNorm(128, rngs=rngs)
            self.l2 = nnx.Linear(128, 16, rngs=rngs)
            self.calls = nnx.Variable(jnp.zeros((), jnp.int32))

        def __call__(self, x):
            self.calls[...] += 1
            return self.l2(nnx.relu(self.bn(self.l1(x))))

    x = jax.random.normal(jax.random.key(1), (8, 32))
    mse = lambda out, x: jnp.mean((out - x[:, :16]) ** 2)  # noqa: E731
    tx = optax.adamw(0.01, weight_decay=0.1)
    m = Net(nnx.Rngs(0))
    state = nnx.state(m)
    plan = tpflax.plan(state, {"data": 2, "model": 4}, model=m, sample=(x,))
    ref = Net(nnx.Rngs(0))  # two nnx training steps: the reference both plans' steps must equal
    ref_opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)

    @nnx.jit  # compiled whole rather than dispatched an op (and a compile) at a time
    def ref_step(ref, ref_opt):
        _, grads = nnx.value_and_grad(lambda mod: mse(mod(x), x))(ref)
        ref_opt.update(ref, grads)

    for _ in range(2):
        ref_step(ref, ref_opt)
    for p in (plan, tpflax.Plan.from_json(plan.to_json())):  # the plan alone, as a job would load it
        mesh = tpflax.make_mesh(p.mesh)
        ts = tpflax.make_train_step(m, p, mesh, tx, sample=(x,), loss=mse)
        opt = tpflax.shard_optimizer_state(tx, None, p, mesh)
        assert jax.tree.structure(opt) == jax.tree.structure(ts.args[1])
        assert set(opt[0].mu) == {"l1", "l2", "bn"} and set(opt[0].mu["bn"]) == {"scale", "bias"}
        assert opt[0].mu["l1"]["kernel"].sharding.spec == p.specs["l1"]["kernel"]
        step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
        v = tpflax.shard(state, p, mesh)
        for _ in range(2):
            v, opt, _ = step(v, opt, (x,))
        assert int(v["calls"].get_value()) == 2
        _assert_values_close(v, nnx.state(ref))
        _assert_values_close(opt, ref_opt.opt_state)
    # a state made as the README says, tx.init(nnx.state(model, nnx.Param)), still runs, and comes
    # back in its own form (Variables kept), ready for the next call
    boxed = jax.device_put(tx.init(nnx.state(m, nnx.Param)), ts.in_shardings[1])
    _, out, _ = step(tpflax.shard(state, plan, mesh), boxed, (x,))
    assert jax.tree.structure(out) == jax.tree.structure(boxed)


def test_integer_nnx_params_are_carried_through_the_step():
    # an integer nnx.Param (codes, a lookup table of indices) reached jax.grad; it is now left out of
    # what the step differentiates and of the optimizer state, as integer leaves of linen params are
    import jax.numpy as jnp
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.codes = nnx.Param(jnp.array([3, 0, 7, 1], jnp.int32))
            self.flags = nnx.Param(jnp.array([True, False]))
            self.up = nnx.Linear(32, 64, rngs=rngs)
            self.down = nnx.Linear(64, 8, rngs=rngs)

        def __call__(self, x):
            h = self.up(x)[:, self.codes[...]] * jnp.where(self.flags[0], 1.0, -1.0)
            return self.down(jnp.tanh(jnp.tile(h, (1, 16))))

    x = jax.random.normal(jax.random.key(1), (8, 32))
    mse = lambda out, x: jnp.mean((out - x[:, :8]) ** 2)  # noqa: E731
    tx = optax.adam(0.01)
    m = Net(nnx.Rngs(0))
    state = nnx.state(m)
    plan = tpflax.plan(state, {"data": 2, "model": 4})
    assert not plan.decisions["codes"].trainable and plan.decisions["up/kernel"].trainable
    mesh = tpflax.make_mesh(plan.mesh)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=mse)
    opt = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    assert set(opt[0].mu) == {"up", "down"}  # no optimizer state for the integer Params
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    # from the Params themselves too: the state optimizer.init makes of their float leaves
    given = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=nnx.state(m, nnx.Param))
    assert set(given[0].mu) == {"up", "down"}
    assert step(tpflax.shard(state, plan, mesh), given, (x,))[2] > 0
    v, opt, value = step(tpflax.shard(state, plan, mesh), opt, (x,))
    assert v["codes"].get_value().dtype == jnp.int32 and v["flags"].get_value().dtype == jnp.bool_
    ref = Net(nnx.Rngs(0))
    floats = nnx.All(nnx.Param, lambda _, x: jnp.issubdtype(x.get_value().dtype, jnp.floating))
    ref_opt = nnx.Optimizer(ref, tx, wrt=floats)

    @nnx.jit  # the nnx training step, compiled whole rather than dispatched an op (and a compile) at a time
    def ref_step(ref, ref_opt):
        ref_loss, grads = nnx.value_and_grad(lambda mod: mse(mod(x), x), argnums=nnx.DiffState(0, floats))(ref)
        ref_opt.update(ref, grads)
        return ref_loss

    ref_loss = ref_step(ref, ref_opt)
    np.testing.assert_allclose(float(value), float(ref_loss), rtol=1e-5)
    _assert_values_close(v, nnx.state(ref))  # the integer and bool Params unchanged, the rest updated


def test_a_state_with_moments_for_integer_leaves_is_refused_by_name():
    # tx.init over the whole tree gives the int32 counter (and an nnx module's integer Param) adam
    # moments; the step's optimizer keeps none for leaves it does not differentiate, and optax failed
    # deep inside update with a bare pytree error. The step names the leaves and the fix instead.
    import jax.numpy as jnp
    from flax import nnx

    w = {"w": jax.random.normal(jax.random.key(0), (32, 16)) * 0.1, "count": jnp.full((), 7, jnp.int32)}
    x = jax.random.normal(jax.random.key(2), (8, 32))
    mse = lambda out, x: jnp.mean((out - x[:, :16]) ** 2)  # noqa: E731
    tx = optax.adamw(1e-2)
    p = tpflax.plan(w, {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh)
    ts = tpflax.make_train_step(lambda v, x: x @ v["w"], p, mesh, tx, sample=(x,), loss=mse)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    with pytest.raises(tpflax.PlanMismatchError, match=r"(?s)tpflax.shard_optimizer_state.*"
                       r"0/mu/count: shape \(\) int32 is optimizer state of count \(shape \(\) int32\), "
                       r"which is not trained"):
        step(tpflax.shard(w, p, mesh), tpflax.shard_optimizer_state(tx, tx.init(w), p, mesh), (x,))
    assert step(tpflax.shard(w, p, mesh), tpflax.shard_optimizer_state(tx, None, p, mesh), (x,))[2] > 0

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.codes = nnx.Param(jnp.arange(16, dtype=jnp.int32))
            self.lin = nnx.Linear(32, 16, rngs=rngs)

        def __call__(self, x):
            return self.lin(x)[:, self.codes[...]]

    m = Net(nnx.Rngs(0))
    p = tpflax.plan(nnx.state(m), {"data": 2, "model": 4})
    ts = tpflax.make_train_step(m, p, mesh, tx, sample=(x,), loss=mse)
    with pytest.raises(tpflax.PlanMismatchError, match=r"0/nu/codes: shape \(16,\) int32 is optimizer "
                       r"state of codes \(shape \(16,\) int32\)"):
        jax.jit(ts.fn)(nnx.state(m), tx.init(nnx.state(m, nnx.Param)), (x,))


def test_an_nnx_submodule_named_params_is_no_linen_collection():
    # nnx.state keys a module's state by attribute: a submodule called "params" made the planner
    # read the state as linen collections, so every other Param counted as model state (never
    # trained, replicated like a BatchNorm statistic)
    import jax.numpy as jnp
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.params = nnx.Linear(32, 64, rngs=rngs)
            self.bn = nnx.BatchNorm(64, rngs=rngs)
            self.out = nnx.Linear(64, 16, rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.bn(self.params(x))))

    x = jax.random.normal(jax.random.key(1), (8, 32))
    mse = lambda out, x: jnp.mean((out - x[:, :16]) ** 2)  # noqa: E731
    m = Net(nnx.Rngs(0))
    plan = tpflax.plan(nnx.state(m), {"data": 2, "model": 4})
    assert plan.decisions["out/kernel"].trainable and plan.decisions["bn/scale"].trainable
    assert not plan.decisions["bn/mean"].trainable and plan.decisions["out/kernel"].kind == "dense"
    mesh = tpflax.make_mesh(plan.mesh)
    tx = optax.sgd(0.1)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=mse)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    v, _, _ = step(tpflax.shard(nnx.state(m), plan, mesh), tpflax.shard_optimizer_state(tx, None, plan, mesh), (x,))
    ref = Net(nnx.Rngs(0))
    ref_opt = nnx.Optimizer(ref, tx, wrt=nnx.Param)

    @nnx.jit  # the nnx training step, compiled whole rather than dispatched an op (and a compile) at a time
    def ref_step(ref, ref_opt):
        _, grads = nnx.value_and_grad(lambda mod: mse(mod(x), x))(ref)
        ref_opt.update(ref, grads)

    ref_step(ref, ref_opt)
    assert not np.allclose(np.asarray(v["out"]["kernel"].get_value()), np.asarray(m.out.kernel.get_value()))
    _assert_values_close(v, nnx.state(ref))


def test_linen_step_updates_batch_stats_of_a_training_mode_batchnorm():
    # a linen module with BatchNorm(use_running_average=False) mutates its batch_stats collection:
    # applied immutable, planning with model= and compiling the step raised. The step keeps the statistics
    # the forward pass left (flax's own apply(..., mutable=["batch_stats"])) and updates params only
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.BatchNorm(use_running_average=False, name="bn")(nn.Dense(128, use_bias=False, name="l1")(x))
            return nn.Dense(10, name="l2")(nn.relu(h))

    x = jax.random.normal(jax.random.key(1), (8, 32))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    loss = lambda out, x: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()  # noqa: E731
    tx, m = optax.sgd(0.1), Net()
    v = jax.jit(m.init)(jax.random.key(0), x)
    plan = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(x,))
    mesh = tpflax.make_mesh(plan.mesh)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=loss)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    new, _, value = step(tpflax.shard(v, plan, mesh), jax.device_put(tx.init(v["params"]), ts.in_shardings[1]), (x,))

    @jax.jit
    def ref_step(p):  # flax's own training step on one device
        def ref_loss(p):
            out, state = m.apply({**v, "params": p}, x, mutable=["batch_stats"])
            return loss(out, x), state

        (value, state), grads = jax.value_and_grad(ref_loss, has_aux=True)(p)
        return value, state, optax.apply_updates(p, tx.update(grads, tx.init(p), p)[0])

    want, state, want_params = ref_step(v["params"])
    # the same float32 program split over 8 devices: a few ulps of the loss, statistics and updates
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)
    assert not np.allclose(np.asarray(state["batch_stats"]["bn"]["mean"]), 0)  # the statistics moved
    for a, b in zip(jax.tree.leaves(new), jax.tree.leaves({**v, **state, "params": want_params}), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["gpt2", "cnn"])
def test_a_zoo_models_remat_changes_no_number_of_the_step(name):
    # the zoo's remat field (nn.remat of each block, as llama's) gives the step remat=on rows for every
    # model of benchmarks/tpu_aot.py: on 8 devices the remat'd step's loss and gradients are the plain
    # step's, bit for bit (the recompute is the forward's own HLO: the same sums in the same order). A
    # transformer block and a conv block; the ViT's and the MoE's fields wrap their blocks the same way
    # (their remat is checked through the estimate below, without compiling a step). Compiled with XLA's
    # default emitters (FAST_XLA): the older ones fuse GPT-2's remat'd step apart from the plain one's
    shape = {"fsdp": 2, "model": 4}
    mesh, tx = tpflax.make_mesh(shape), make_tx()
    plain = zoo.get(name)
    variables, batch = zoo_init(name), tpflax.shard_batch(plain.make_batch(1, 4), mesh)
    plan = tpflax.plan(variables, shape, fsdp_min_bytes=0)
    sv = tpflax.shard(variables, plan, mesh)
    so = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=sv["params"])
    out = []
    for remat in (False, True):
        m = zoo.get(name, remat=remat)
        ts = tpflax.make_train_step(m, plan, mesh, tx, 4)
        step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST_XLA)
        new, opt, loss = step(sv, so, batch)
        out.append((float(loss), tpflax.unshard(new)["params"], tpflax.unshard(opt[0].trace)))
    (loss0, new0, g0), (loss1, new1, g1) = out
    assert loss1 == loss0
    assert_bit_exact((new1, g1), (new0, g0))


@pytest.mark.parametrize("name", ["gpt2", "vit", "moe", "cnn"])
def test_a_zoo_models_remat_field_is_seen_by_the_estimate(name):
    # the estimate reads remat from the model: the traced nn.remat of the bare module, and the config's field
    shape = {"fsdp": 2, "model": 4}
    tx = make_tx()
    plain = zoo.get(name)
    plan = tpflax.plan(plain.abstract_variables(), shape, fsdp_min_bytes=0)
    for remat in (False, True):
        m = zoo.get(name, remat=remat)
        assert m.abstract_variables() == plain.abstract_variables()  # the same tree
        e = tpflax.estimate(plan, tx, model=m.module, sample=m.input_specs(4))  # the traced nn.remat
        assert e.settings["remat"] is remat and (e.breakdown.recompute > 0) is remat, (remat, e.breakdown)
    said = tpflax.estimate(plan, tx, jax.eval_shape(lambda: m.make_batch(0, 4)), model=m)  # the config's field
    assert said.settings["remat"] and said.breakdown.recompute > 0, said.breakdown
    # one layer recomputed either way: the config's n_layers, or the trace's remat'd blocks (exact: the same
    # traced shapes divided by the same count)
    assert e.breakdown.recompute == said.breakdown.recompute, (e.breakdown, said.breakdown)


def test_optimizer_state_from_the_plan_alone_runs_through_a_boxed_linen_step():
    # a linen model whose kernels are boxed (nn.with_logical_partitioning): the step's optimizer keeps
    # its moments boxed, shard_optimizer_state(tx, None, plan, mesh) makes them bare, and the step refused
    # that state, its error recommending the very call that made it. It now runs, and comes back bare
    import flax.linen as nn
    import jax.numpy as jnp

    def boxed_init(*names):
        return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.gelu(nn.Dense(128, kernel_init=boxed_init("embed", "mlp"), name="up")(x))
            return nn.Dense(32, kernel_init=boxed_init("mlp", "embed"), name="down")(h)

    x = jax.random.normal(jax.random.key(1), (8, 32))
    mse = lambda out, x: jnp.mean((out - x) ** 2)  # noqa: E731
    tx, m = make_tx(), Net()  # sgd with momentum: its trace is boxed like the kernels
    v = jax.jit(m.init)(jax.random.key(0), x)
    plan = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(x,))
    mesh = tpflax.make_mesh(plan.mesh)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=mse)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    bare = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    assert jax.tree.structure(bare) != jax.tree.structure(tx.init(v["params"]))  # no boxes in it
    new, out, value = step(tpflax.shard(v, plan, mesh), bare, (x,))
    assert jax.tree.structure(out) == jax.tree.structure(bare)
    want_loss, grads = jax.value_and_grad(lambda p: mse(m.apply({"params": p}, x), x))(v["params"])
    np.testing.assert_allclose(float(value), float(want_loss), rtol=1e-5)
    want = optax.apply_updates(nn.unbox(v["params"]), nn.unbox(tx.update(grads, tx.init(v["params"]))[0]))
    for a, b in zip(jax.tree.leaves(nn.unbox(new["params"])), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_a_function_returning_linens_mutable_pair_plans_and_steps_as_the_module():
    # fn = lambda v, x: module.apply(v, x, mutable=["batch_stats"]) returns flax's (output, updated
    # collections) pair. Traced as the model's output, the new BatchNorm statistics (per-channel means of
    # each conv's output) made every conv "reach the output unsplit": the plan split nothing (0 of 36 leaves
    # of a ResNet on data=2,model=4), and the step handed the pair to the loss. The pair's second item is the
    # call's new state: planned and stepped as the linen module itself is
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Conv(128, (3, 3), use_bias=False, name="c1")(x)
            h = nn.relu(nn.BatchNorm(use_running_average=False, name="bn")(h))
            h = nn.Conv(128, (3, 3), use_bias=False, name="c2")(h)
            return nn.Dense(10, name="head")(h.mean(axis=(1, 2)))

    x = jax.random.normal(jax.random.key(1), (8, 8, 8, 4))
    y = jax.random.randint(jax.random.key(2), (8,), 0, 10)
    loss = lambda out, x: optax.softmax_cross_entropy_with_integer_labels(out, y).mean()  # noqa: E731
    tx, m = optax.sgd(0.1), Net()
    v = jax.jit(m.init)(jax.random.key(0), x)
    pair = lambda v, x: m.apply(v, x, mutable=["batch_stats"])  # noqa: E731
    shape = {"data": 2, "model": 4}
    plans = [tpflax.plan(v, shape, model=f, sample=(x,), batch=(x,)) for f in (pair, m)]
    assert plans[0].specs == plans[1].specs
    assert plans[0].decisions["params/c1/kernel"].spec == P(None, None, None, "model")
    assert plans[0].decisions["params/c2/kernel"].spec == P(None, None, "model", None)
    mesh = tpflax.make_mesh(shape)
    out = []
    for f in (pair, m):
        ts = tpflax.make_train_step(f, plans[0], mesh, tx, sample=(x,), loss=loss)
        step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
        new, _, value = step(tpflax.shard(v, plans[0], mesh), jax.device_put(tx.init(v["params"]), ts.in_shardings[1]),
                             (x,))
        out.append((float(value), tpflax.unshard(new)))
    assert not np.allclose(out[0][1]["batch_stats"]["bn"]["mean"], 0)  # the statistics the call left
    assert out[0][0] == out[1][0]  # the same program either way
    assert_bit_exact(out[0][1], out[1][1])


def test_a_planned_frozendict_steps_with_what_shard_and_shard_optimizer_state_return():
    # variables planned as a FrozenDict (flax < 0.7's init, or a restored checkpoint) while the linen
    # model's own init makes dicts: the step's in_shardings were dicts, so jax.jit refused the FrozenDict
    # that tpflax.shard and shard_optimizer_state(tx, None, plan, mesh) return for that plan (a bare
    # "pytree structure error"), and the step's merge turned the variables back into a dict. The same
    # step of the same tree planned as dicts is the reference: same specs, same program, so bit-exact
    import flax.linen as nn
    import jax.numpy as jnp
    from flax.core import FrozenDict, freeze

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            t = self.param("temperature", lambda _: jnp.float32(0.5))  # a learned rank-0 scalar
            return nn.Dense(32, name="down")(nn.gelu(nn.Dense(128, name="up")(x))) / t

    x = jax.random.normal(jax.random.key(1), (8, 32))
    mse = lambda out, x: jnp.mean((out - x) ** 2)  # noqa: E731
    tx, m = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)), Net()
    v = jax.device_get(m.init(jax.random.key(0), x))
    runs = []
    for tree in (freeze(v), v):
        plan = tpflax.plan(tree, {"fsdp": 2, "model": 4}, fsdp_min_bytes=0)
        mesh = tpflax.make_mesh(plan.mesh)
        ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=mse)
        step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
        runs.append(step(tpflax.shard(tree, plan, mesh), tpflax.shard_optimizer_state(tx, None, plan, mesh), (x,)))
    (frozen, frozen_state, frozen_loss), (plain, plain_state, plain_loss) = runs
    assert isinstance(frozen, FrozenDict) and isinstance(frozen["params"], FrozenDict)
    assert isinstance(frozen_state[1][0].mu, FrozenDict) and not isinstance(plain, FrozenDict)
    assert_bit_exact((frozen, frozen_state, frozen_loss), (plain, plain_state, plain_loss))


def _boxed_block_net(box):
    """A T5X/MaxText-style linen block (Einsum q/o heads kernels, an MLP, ``nn.remat``) whose kernels'
    inits are wrapped by ``box(init, logical names)``."""
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x):
            q = nn.Einsum((32, 4, 8), "bd,dhk->bhk", kernel_init=box(("embed", "heads", "kv")), name="q")(x)
            x = x + nn.Einsum((4, 8, 32), "bhk,hkd->bd", kernel_init=box(("heads", "kv", "embed")), name="o")(q)
            h = nn.gelu(nn.Dense(128, kernel_init=box(("embed", "mlp")), name="wi")(x))
            return x + nn.Dense(32, kernel_init=box(("mlp", "embed")), name="wo")(h)

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            for i in range(2):
                x = nn.remat(Block)(name=f"layers_{i}")(x)
            return x

    return Net()


def _logical(names):
    import flax.linen as nn

    return nn.with_logical_partitioning(nn.initializers.lecun_normal(), names)


def _partitioned(names):
    # annotated for a ("data", "model") mesh; trained on {"fsdp": 2, "model": 4}. Applied boxed, flax
    # constrained each kernel to P("data", ...) inside the step: "Resource axis: data ... is not found in mesh"
    import flax.linen as nn

    mesh_axes = {"embed": "data", "heads": "model", "mlp": "model"}
    return nn.with_partitioning(nn.initializers.lecun_normal(), tuple(mesh_axes.get(n) for n in names))


@pytest.mark.parametrize("box", [_logical, _partitioned], ids=["logical", "partitioned"])
def test_a_boxed_linen_model_trains_as_its_unboxed_tree(box):
    # kernels boxed in nn.LogicallyPartitioned / nn.Partitioned (nn.with_logical_partitioning /
    # nn.with_partitioning, as T5X and MaxText write them): the step unboxes them for model.apply, the
    # gradients and adamw, and boxes its outputs again. The same plan's step on the unboxed tree runs
    # the same program on the same arrays: bit-exact
    import flax.linen as nn
    import jax.numpy as jnp

    m = _boxed_block_net(box)
    x = jax.random.normal(jax.random.key(1), (8, 32))
    mse = lambda out, x: jnp.mean((out - 0.5 * x) ** 2)  # noqa: E731
    v = jax.jit(m.init)(jax.random.key(0), x)
    assert isinstance(v["params"]["layers_0"]["q"]["kernel"], nn.meta.AxisMetadata)
    bare = nn.meta.unbox(v)  # outside any mesh: the arrays, no constraint
    plan = tpflax.plan(v, {"fsdp": 2, "model": 4}, model=m, sample=(x,), fsdp_min_bytes=0)
    assert plan.specs_for(bare) == plan.specs_for(v)  # the specs line up with the unboxed leaves
    mesh = tpflax.make_mesh(plan.mesh)
    tx = optax.adamw(1e-2)
    runs = []
    for tree in (v, bare):
        ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(x,), loss=mse,
                                    variables=None if tree is v else jax.eval_shape(lambda t=tree: t))
        step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
                       compiler_options=FAST)
        # the boxed tree with boxed moments (tx.init of the boxed params); the bare one from the plan alone
        state = (tpflax.shard_optimizer_state(tx, tx.init(v["params"]), plan, mesh) if tree is v
                 else tpflax.shard_optimizer_state(tx, None, plan, mesh))
        given_state = jax.tree.structure(state)
        sv, losses = tpflax.shard(tree, plan, mesh), []
        for _ in range(2):
            sv, state, loss = step(sv, state, (x,))
            losses.append(float(loss))
        assert jax.tree.structure(sv) == jax.tree.structure(tree) and jax.tree.structure(state) == given_state
        runs.append((tpflax.unshard(sv), tpflax.unshard(state), losses))
        for path, d in plan.decisions.items():  # laid out by the plan, not by the boxes' names
            leaf = sv
            for k in path.split("/"):
                leaf = leaf[k]
            assert getattr(leaf, "value", leaf).sharding.spec == d.spec, path
    (new_b, state_b, losses_b), (new_u, state_u, losses_u) = runs
    box_types = {type(b) for b in jax.tree.leaves(new_b, is_leaf=lambda b: isinstance(b, nn.meta.AxisMetadata))
                 if isinstance(b, nn.meta.AxisMetadata)}
    assert box_types == {nn.LogicallyPartitioned if box is _logical else nn.Partitioned}
    assert losses_b == losses_u and losses_b[1] < losses_b[0], losses_b
    assert_bit_exact(nn.meta.unbox(new_b), new_u)
    assert_bit_exact(nn.meta.unbox(state_b), state_u)
    assert all(np.isfinite(np.asarray(a)).all() for a in jax.tree.leaves(new_u))
    assert not any(same_bytes(a, b) for a, b in zip(jax.tree.leaves(new_u["params"]),
                                                   jax.tree.leaves(bare["params"]), strict=True))  # all trained


def test_a_zoo_models_step_takes_the_batch_shape_estimate_takes_and_refuses_others():
    """Regression: ``make_train_step(zoo_model, ..., batch=(8, 32))``, the ``(batch, seq)`` that estimate and
    suggest_mesh take (and suggest_mesh's verify= passed on), a ``"8x32"`` string, or a dict of other than
    arrays failed with a bare AttributeError ('int' object has no attribute 'shape')."""
    m = zoo.get("gpt2")
    plan = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(plan.mesh)
    want = tpflax.make_train_step(m, plan, mesh, optax.adamw(1e-3), 8).args[2]
    for batch in ((8, 32), [8, 32], "8x32"):
        got = tpflax.make_train_step(m, plan, mesh, optax.adamw(1e-3), batch).args[2]
        assert jax.tree_util.tree_map(lambda s: (s.shape, s.dtype, s.sharding.spec), got) == \
            jax.tree_util.tree_map(lambda s: (s.shape, s.dtype, s.sharding.spec), want), batch
    for batch, words in (((8, 64), ("batch (8, 64)", "(32,) per example", "seq_len=64", "batch=(8, 32)")),
                         ("eight", ("batch='eight'", "batch=8", "(8, 32)", "make_batch(0, 8)")),
                         ({"x": 1}, ("batch={'x': 1}", "x = 1", "make_batch(0, 8)"))):
        with pytest.raises(tpflax.OptionError) as e:
            tpflax.make_train_step(m, plan, mesh, optax.adamw(1e-3), batch)
        assert all(w in str(e.value) for w in words), str(e.value)


def test_a_jit_step_given_its_donated_params_again_names_them_instead_of_crashing():
    # step(params, x) twice with the same params: the first call donated them, and the second was jax 0.10's
    # "Buffer has been deleted or donated" log line, then a segmentation fault of the whole process
    params = {"w": jax.numpy.ones((8, 4))}
    plan = tpflax.plan(params, {"model": 2}, rules=[("w", "row")])
    mesh = tpflax.make_mesh({"model": 2})
    step = tpflax.jit_step(lambda p, x: (p, (x @ p["w"]).sum()), plan, mesh, in_roles=("params", "batch"))
    placed = tpflax.shard(params, plan, mesh)
    out, _ = step(placed, jax.numpy.ones((2, 8)))
    with pytest.raises(tpflax.TreeError, match=r"deleted, donated to an earlier call of it: pass that call's outputs") as e:
        step(placed, jax.numpy.ones((2, 8)))
    assert e.value.problems == ("argument 0/w: shape (8, 4)",)
    _, loss = step(out, jax.numpy.ones((2, 8)))
    assert float(loss) == 64.0
