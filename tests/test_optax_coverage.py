"""Every common optax optimizer: its state placed like the parameters, and two sharded steps equal to
two unsharded ones.

A real linen model (token embedding, 4-head attention without biases, a layer norm, an MLP, a
64-way head) is planned on ``{data: 2, model: 4}`` of the 8 CPU-emulated devices: the attention
kernels split their heads, ``up`` and ``head`` their outputs, ``down`` its inputs. For each
optimizer:

1. ``tpflax.shard_optimizer_state`` places every state leaf as the rule says, checked leaf by leaf
   against specs this file derives on its own (and a few written out): a leaf shaped like its
   parameter takes the parameter's spec; a factored or reduced leaf (adafactor's ``v_row`` /
   ``v_col``, SM3's per-dim accumulators) the parameter's entries on the dims it keeps; scalars
   (counts, hyperparameters, novograd's per-leaf second moments) are whole.
2. ``tpflax.make_train_step`` runs two steps, compared with the same optimizer's two steps in a plain
   ``jax.jit`` on one device, started from the same variables and state.

The bound. The sharded program sums in another order: the batch over ``data`` and the contractions
of split dims over ``model`` are partial sums then all-reduced, so nothing float is bit-exact; integer
leaves (step counts, ``MultiSteps``' mini-step) are. A gradient element then differs by at most
GRAD_ULPS u G (u = 2**-24, G its leaf's largest gradient over both steps; tests/test_train_step.py
measured 21 u G over the zoo). A leaf linear in the gradients (adam's moments, sgd's trace, an update
with a fixed learning rate) is off by that much of its own size, while an adaptive update (adam's
``m / (sqrt(v) + eps)``, lion, lamb, SM3, schedule-free) divides by the element's own gradient size and
carries that element's relative error, GRAD_ULPS u G / |g|, which is large where a sum over the batch
nearly cancels. So each element must satisfy

    |x_s - x_r| <= max|x_r| * (RTOL + GRAD_ULPS u G / |g|)  (+ the float32 rounding of the parameter)

with x a parameter's change over the two steps (so that the parameter's own rounding does not hide a
wrong update) or a state leaf (|g| of the parameter it mirrors element for element; none for the
others), RTOL = 2e-5 for everything else the reorder touches (losses, norms, adafactor's factors).
Measured: at most 0.46 of the bound anywhere (novograd's parameters); normwise, gradient-linear state
<= 1.2e-6, non-adaptive parameter changes <= 2.4e-7, adaptive ones up to 1.6e-3 (schedule-free), all
of it on elements whose |g| is 1e-5..1e-4 of G. 97% of the elements are held to RTOL + 1e-3 or better
(asserted), and fed half the batch (one data shard's gradient) adam, sgd, adafactor, SM3 and lion fail
the bound on every leaf.
The model has no attention biases: a key bias's gradient is zero in exact arithmetic (softmax is
shift-invariant), pure rounding noise with no G of its own.
"""

from __future__ import annotations

import functools
import logging

import flax.linen as nn
import jax
import numpy as np
import optax
import pytest
from _util import RUN_XLA
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}
FAST = RUN_XLA  # the steps are run and their values compared (tests/_util.py)
RTOL = 2e-5
U = float(np.finfo(np.float32).eps) / 2  # float32 unit roundoff
GRAD_ULPS = 64  # tests/test_train_step.py: gradients of the zoo models agree to 21 u G, measured


class Net(nn.Module):
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, 32, name="embed")(ids)
        a = nn.MultiHeadDotProductAttention(num_heads=4, qkv_features=32, use_bias=False, name="attn")(h, h)
        h = nn.LayerNorm(name="ln")(h + a)
        h = h + nn.Dense(32, name="down")(nn.gelu(nn.Dense(128, name="up")(h)))
        return nn.Dense(64, name="head")(h)


def loss(logits, ids):
    return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()


# The plan this model gets (asserted in test_the_plan_splits_what_the_sweep_relies_on).
PLANNED = {
    "attn/key/kernel": P(None, "model", None), "attn/query/kernel": P(None, "model", None),
    "attn/value/kernel": P(None, "model", None), "attn/out/kernel": P("model", None, None),
    "up/kernel": P(None, "model"), "up/bias": P("model"), "down/kernel": P("model", None),
    "head/kernel": P(None, "model"), "head/bias": P("model"),
}


def _is_kernel(path, _):
    return jax.tree_util.keystr(path, simple=True, separator="/").endswith(("kernel", "embedding"))


def kernels_only(params):
    """The mask / labels of a model where only the kernels and the embedding train."""
    return jax.tree_util.tree_map_with_path(_is_kernel, params)


OPTIMIZERS = {
    "adamw": lambda p: optax.adamw(1e-3, weight_decay=0.1),
    "adam": lambda p: optax.adam(1e-3),
    "sgd_momentum": lambda p: optax.sgd(0.1, momentum=0.9),
    "adafactor": lambda p: optax.adafactor(1e-2, min_dim_size_to_factor=8),
    "sm3": lambda p: optax.sm3(0.1),
    "lion": lambda p: optax.lion(1e-4),
    "lamb": lambda p: optax.lamb(1e-3),
    "adagrad": lambda p: optax.adagrad(0.1),
    "rmsprop": lambda p: optax.rmsprop(1e-3, momentum=0.9),
    "novograd": lambda p: optax.novograd(1e-3),
    "chain_clip_adamw": lambda p: optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)),
    "masked_frozen": lambda p: optax.chain(
        optax.masked(optax.adam(1e-3), kernels_only(p)),
        optax.masked(optax.set_to_zero(), jax.tree_util.tree_map(lambda k: not k, kernels_only(p)))),
    "multi_transform_frozen": lambda p: optax.multi_transform(
        {"train": optax.adam(1e-3), "frozen": optax.set_to_zero()},
        jax.tree_util.tree_map(lambda k: "train" if k else "frozen", kernels_only(p))),
    "multisteps": lambda p: optax.MultiSteps(optax.adam(1e-3), every_k_schedule=2),
    "lookahead_adam": lambda p: optax.lookahead(optax.adam(1e-3), sync_period=2, slow_step_size=0.5),
    "schedule_free_adamw": lambda p: optax.contrib.schedule_free_adamw(1e-3, warmup_steps=1),
    "inject_hyperparams_adamw": lambda p: optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3),
    "adam_then_ema": lambda p: optax.chain(optax.adam(1e-3), optax.ema(0.9)),
}
LOOKAHEAD = {"lookahead_adam"}


@functools.cache
def setup():
    """(model, variables on the host, ids, plan, mesh)."""
    m = Net()
    ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 64)
    v = jax.device_get(jax.jit(m.init)(jax.random.key(0), ids))
    plan = tpflax.plan(v, MESH, model=m, sample=(ids,))
    return m, v, np.asarray(ids), plan, tpflax.make_mesh(MESH)


def key(path):
    return jax.tree_util.keystr(path, simple=True, separator="/")


def expected_spec(path: str, shape, plan) -> P:
    """The spec a state leaf should have, derived here from the optax state layouts, not from tpflax.

    The parameter a leaf belongs to is the one whose path (relative to ``params``) is a segment of
    the leaf's path: ``0/mu/up/kernel`` (adam), ``0/mu/up/kernel/1`` (SM3's accumulator of dim 1).
    """
    sizes = plan.mesh.sizes
    owner = [p for p in plan.decisions if f"/{p[len('params/'):]}/" in f"/{path}/"]
    if not owner or shape == ():
        return P()
    owner = max(owner, key=len)
    d = plan.decisions[owner]
    spec = tuple(d.spec) + (None,) * (len(d.shape) - len(d.spec))
    rest = f"/{path}/".split(f"/{owner[len('params/'):]}/", 1)[1].strip("/")
    if tuple(shape) == d.shape:
        kept = list(range(len(shape)))
    elif len(d.shape) >= 2 and ("/v_row/" in f"/{path}/" or "/v_col/" in f"/{path}/"):
        # adafactor: v_row is the mean over d0, v_col over d1, of its two largest dims
        d1, d0 = np.argsort(d.shape)[-2:]
        gone = d0 if "/v_row/" in f"/{path}/" else d1
        kept = [k for k in range(len(d.shape)) if k != gone]
        if tuple(d.shape[k] for k in kept) != tuple(shape):
            return P(*[None] * len(shape))  # not factored: a (1,) placeholder
    elif rest.isdigit():  # SM3: one accumulator per parameter dim
        kept = [int(rest)]
    else:
        return P(*[None] * len(shape))
    out = [spec[k] for k in kept]
    out = [e if e is None or shape[i] % sizes[e] == 0 else None for i, e in enumerate(out)]
    return P(*out)


def sharded_state(name):
    m, v, ids, plan, mesh = setup()
    tx = OPTIMIZERS[name](v["params"])
    if name in LOOKAHEAD:  # the slow copy is the parameters' second tree, not optimizer state
        return tx, tpflax.shard_optimizer_state(tx, None, plan, mesh,
                                                params=optax.LookaheadParams.init_synced(v))
    return tx, tpflax.shard_optimizer_state(tx, None, plan, mesh, params=v)


def test_the_plan_splits_what_the_sweep_relies_on():
    *_, plan, _ = setup()
    got = {p[len("params/"):]: d.spec for p, d in plan.decisions.items() if any(e is not None for e in d.spec)}
    assert got == PLANNED


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_every_state_leaf_is_placed_like_its_parameter(name):
    m, v, ids, plan, mesh = setup()
    tx, state = sharded_state(name)
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    for path, x in flat:
        assert x.sharding.spec == expected_spec(key(path), x.shape, plan), (name, key(path), x.shape)
    # the state tpflax placed is the one optax makes, value for value
    start = optax.LookaheadParams.init_synced(v["params"]) if name in LOOKAHEAD else v["params"]
    want = tx.init(start)
    assert jax.tree_util.tree_structure(state) == jax.tree_util.tree_structure(want)
    for a, b in zip(jax.tree_util.tree_leaves(state), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    split = [key(p) for p, x in flat if any(e is not None for e in x.sharding.spec)]
    assert split, name  # (a sweep that placed everything whole would pass the spec check above)


# A few leaves written out, so that the derivation above is checked against the hand's too.
SPELLED = {
    "sm3": {"0/mu/up/kernel/1": ((128,), P("model")), "0/mu/up/kernel/0": ((32,), P(None)),
            "0/mu/down/kernel/0": ((128,), P("model")), "0/mu/attn/query/kernel/1": ((4,), P("model")),
            "0/mu/attn/out/kernel/0": ((4,), P("model")), "0/mu/head/bias/0": ((64,), P("model")),
            "0/nu/up/kernel": ((32, 128), P(None, "model"))},
    "adafactor": {"0/v_row/attn/query/kernel": ((4, 8), P("model", None)),
                  "0/v_col/attn/query/kernel": ((32, 4), P(None, "model")),
                  "0/v_row/attn/out/kernel": ((4, 8), P("model", None)),
                  "0/v_col/attn/out/kernel": ((4, 32), P("model", None)),
                  "0/v_row/up/kernel": ((32,), P(None)), "0/v_col/up/kernel": ((128,), P("model")),
                  "0/v_row/down/kernel": ((32,), P(None)), "0/v_col/down/kernel": ((128,), P("model")),
                  "0/v/up/bias": ((128,), P("model")), "0/v/up/kernel": ((1,), P(None)), "0/count": ((), P())},
    "novograd": {"0/nu/up/kernel": ((), P()), "0/mu/up/kernel": ((32, 128), P(None, "model"))},
    "lookahead_adam": {"fast_state/0/mu/attn/out/kernel": ((4, 8, 32), P("model", None, None)),
                       "steps_since_sync": ((), P())},
    "schedule_free_adamw": {"z/down/kernel": ((128, 32), P("model", None)), "b1": ((), P())},
    "multisteps": {"acc_grads/head/kernel": ((32, 64), P(None, "model")), "mini_step": ((), P())},
    "multi_transform_frozen": {"inner_states/train/inner_state/0/nu/up/kernel": ((32, 128), P(None, "model"))},
    "inject_hyperparams_adamw": {"inner_state/0/mu/head/bias": ((64,), P("model")),
                                 "hyperparams/learning_rate": ((), P())},
}


@pytest.mark.parametrize("name", sorted(SPELLED))
def test_leaves_written_out(name):
    _, state = sharded_state(name)
    flat = {key(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for path, (shape, spec) in SPELLED[name].items():
        assert (flat[path].shape, flat[path].sharding.spec) == (shape, spec), path


def reference(name, m, v, ids):
    """Two steps of the same optimizer in a plain jax.jit on one device: (variables, state, losses,
    the two steps' gradients)."""
    tx = OPTIMIZERS[name](v["params"])
    la = name in LOOKAHEAD
    params = optax.LookaheadParams.init_synced(v["params"]) if la else v["params"]

    @functools.partial(jax.jit, compiler_options=FAST)
    def step(params, state):
        fast = params.fast if la else params
        value, grads = jax.value_and_grad(lambda p: loss(m.apply({"params": p}, ids), ids))(fast)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state, value, grads

    state, values, grads = tx.init(params), [], []
    for _ in range(2):
        params, state, value, g = step(params, state)
        values.append(float(value))
        grads.append(jax.device_get(g))
    return jax.device_get(params), jax.device_get(state), values, grads


def sharded(name, m, v, ids, plan, mesh):
    """Two steps of tpflax.make_train_step on the mesh: (variables, state, losses)."""
    tx, state = sharded_state(name)
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(ids,), loss=loss)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST)
    if name in LOOKAHEAD:  # tpflax.shard places the pair as two copies: fast and slow are separate buffers
        variables = tpflax.shard(optax.LookaheadParams.init_synced(v), plan, mesh)
    else:
        variables = tpflax.shard(v, plan, mesh)
    batch = tpflax.shard_batch((ids,), mesh)
    values = []
    for _ in range(2):
        variables, state, value = step(variables, state, batch)
        values.append(float(value))
    # the outputs keep the plan's layout
    trees = (variables.fast, variables.slow) if name in LOOKAHEAD else (variables,)
    for tree in trees:
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
            assert x.sharding.spec == plan.decisions[key(path)].spec, key(path)
    return variables, state, values


def close(got, want, what, cond=0.0, slack=0.0):
    """``|got - want| <= max|want| * (RTOL + cond) + slack`` elementwise; integers bit-exact."""
    got, want = np.asarray(got), np.asarray(want)
    assert got.shape == want.shape and got.dtype == want.dtype, what
    if not np.issubdtype(want.dtype, np.floating):
        np.testing.assert_array_equal(got, want, err_msg=str(what))
        return
    scale = float(np.abs(want.astype(np.float64)).max(initial=0))
    err = np.abs(got.astype(np.float64) - want)
    over = err - scale * (RTOL + cond) - slack
    assert (over <= 0).all(), (what, float(err.max()), scale, float(over.max()))


def conditioning(grads):
    """Per parameter path, per element: GRAD_ULPS * u * G / |g| (G: the leaf's largest gradient over both
    steps, |g|: the element's smaller nonzero one), the relative error an update that divides by the
    element's own gradient size takes from the reorder error of its gradient; 0 where both gradients are
    exactly zero (an embedding row of a token not in the batch: no sum, nothing reordered)."""
    out = {}
    for (path, g1), g2 in zip(jax.tree_util.tree_flatten_with_path(grads[0])[0], jax.tree_util.tree_leaves(grads[1]),
                              strict=True):
        a, b = (np.abs(np.asarray(g, np.float64)) for g in (g1, g2))
        small = np.minimum(np.where(a > 0, a, np.inf), np.where(b > 0, b, np.inf))
        big = max(float(a.max(initial=0)), float(b.max(initial=0)))
        out[key(path)] = np.where(np.isinf(small), 0.0, GRAD_ULPS * U * big / small)
    return out


def ulp(x):
    return np.spacing(np.abs(np.asarray(x, np.float32))).astype(np.float64)


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_two_sharded_steps_equal_two_unsharded_ones(name):
    m, v, ids, plan, mesh = setup()
    ref_params, ref_state, ref_losses, grads = reference(name, m, v, ids)
    got_vars, got_state, got_losses = sharded(name, m, v, ids, plan, mesh)
    for g, r in zip(got_losses, ref_losses, strict=True):
        assert abs(g - r) <= RTOL * abs(r), (name, got_losses, ref_losses)
    cond = conditioning(grads)
    loose = np.concatenate([(c > 1e-3).ravel() for c in cond.values()]).mean()
    assert loose < 0.05, loose  # 97% of the elements are held to RTOL + 1e-3 or better (measured 2.6% looser)
    if name in LOOKAHEAD:
        pairs = [("fast", got_vars.fast["params"], ref_params.fast), ("slow", got_vars.slow["params"], ref_params.slow)]
    else:
        pairs = [("params", got_vars["params"], ref_params)]
    moved = 0
    for what, got, want in pairs:
        got = tpflax.unshard(got)
        for (path, g), r, p0 in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree_util.tree_leaves(want),
                                    jax.tree_util.tree_leaves(v["params"]), strict=True):
            delta_r = np.asarray(r, np.float64) - p0
            moved += bool(np.any(delta_r))
            # each program rounds the parameter to float32 at each of the two steps: half an ulp each time
            close(np.asarray(g, np.float64) - p0, delta_r, (name, what, key(path)), cond[key(path)],
                  slack=ulp(g) + ulp(r))
    assert moved, name  # the steps really moved the parameters
    got_state = tpflax.unshard(got_state)
    assert jax.tree_util.tree_structure(got_state) == jax.tree_util.tree_structure(ref_state)
    for (path, g), r in zip(jax.tree_util.tree_flatten_with_path(got_state)[0], jax.tree_util.tree_leaves(ref_state),
                            strict=True):
        close(g, r, (name, "state", key(path)), mirrored(key(path), np.shape(r), cond, plan))


def mirrored(path, shape, cond, plan):
    """The conditioning of the parameter a state leaf mirrors element for element (same shape), else 0."""
    owner = [p[len("params/"):] for p in plan.decisions if f"/{p[len('params/'):]}/" in f"/{path}/"]
    if not owner:
        return 0.0
    c = cond[max(owner, key=len)]
    return c if c.shape == tuple(shape) else 0.0


def test_lookahead_syncs_the_slow_copy_on_the_mesh():
    # sync_period=2: after two steps the slow copy has moved halfway to the fast one, and differs from the start
    m, v, ids, plan, mesh = setup()
    got, _, _ = sharded("lookahead_adam", m, v, ids, plan, mesh)
    fast, slow = tpflax.unshard(got.fast["params"]), tpflax.unshard(got.slow["params"])
    k = np.asarray(fast["up"]["kernel"])
    s = np.asarray(slow["up"]["kernel"])
    assert np.abs(s - v["params"]["up"]["kernel"]).max() > 1e-4  # the slow copy moved
    # synced: equal in exact arithmetic; optax computes the two by different float32 sums (each a few ulps)
    np.testing.assert_allclose(k, s, rtol=0, atol=4 * float(ulp(np.abs(s).max())))


def test_shard_and_unshard_take_a_lookahead_pair():
    _, v, _, plan, mesh = setup()
    pair = optax.LookaheadParams.init_synced(v)  # fast and slow are the same host arrays
    placed = tpflax.shard(pair, plan, mesh)
    assert isinstance(placed, optax.LookaheadParams)
    sh = tpflax.shardings(plan, mesh, pair)
    for copy, want in zip(placed, sh, strict=True):
        for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(copy)[0], jax.tree_util.tree_leaves(want),
                                strict=True):
            assert x.sharding == s, key(path)
            assert x.sharding.spec == plan.decisions[key(path)].spec, key(path)
    back = tpflax.unshard(placed, plan)
    assert isinstance(back, optax.LookaheadParams)
    for copy in back:
        for a, b in zip(jax.tree_util.tree_leaves(copy), jax.tree_util.tree_leaves(v), strict=True):
            np.testing.assert_array_equal(a, b)  # bit-exact round trip


def test_lookahead_state_and_init_are_quiet(caplog):
    # optax warns "`params` has no attribute `fast`" when its init sees plain parameters: tpflax initialises
    # lookahead's inner state from the parameters on purpose (the slow copy is not optimizer state)
    m, v, ids, plan, mesh = setup()
    tx = OPTIMIZERS["lookahead_adam"](v["params"])
    with caplog.at_level(logging.WARNING):
        tpflax.shard_optimizer_state(tx, None, plan, mesh)
        tpflax.make_train_step(m, plan, mesh, tx, sample=(ids,), loss=loss)
        tpflax.estimate(plan, optimizer=tx, model=m, sample=(ids,))
    assert not [r for r in caplog.records if "fast" in r.getMessage()]


def device_bytes(tree):
    """(bytes of the whole tree, bytes on the fullest device) of placed arrays."""
    per = {}
    for x in jax.tree_util.tree_leaves(tree):
        for shard in x.addressable_shards:
            per[shard.device] = per.get(shard.device, 0) + shard.data.nbytes
    return sum(np.asarray(x).nbytes for x in jax.tree_util.tree_leaves(tree)), max(per.values())


@pytest.mark.parametrize("name", ["adam", "adafactor", "sm3", "lookahead_adam"])
def test_the_estimate_counts_the_state_as_placed(name):
    # the estimate sizes optax's real state (jax.eval_shape of its init), placed as shard_optimizer_state
    # places it: adafactor's factored moments and SM3's accumulators are far smaller than adam's two
    # moments, and SM3's accumulators split with their parameters' dims (they were counted whole)
    m, v, ids, plan, mesh = setup()
    tx, state = sharded_state(name)
    e = tpflax.estimate(plan, tx, model=m, sample=(ids,))
    full, fullest = device_bytes(state)
    if name in LOOKAHEAD:  # the step's slow copy of the parameters counts with the state
        slow = device_bytes(tpflax.shard(v, plan, mesh)["params"])
        full, fullest = full + slow[0], fullest + slow[1]
    assert (e.unsharded.opt_state, e.per_device.opt_state) == (full, fullest)
    params = sum(x.nbytes for x in jax.tree_util.tree_leaves(v["params"]))
    if name == "adafactor":
        assert full < params / 8
    if name == "sm3":  # nu like the parameters, and one accumulator per dim
        assert params < full < params * 1.1


def test_lbfgs_history_is_split_like_its_parameters_and_estimated_so():
    # optax.lbfgs keeps ``memory_size`` differences of the parameters and of the updates, each leaf
    # ``(memory_size, *param.shape)``: read as unrelated to its parameter, each was placed whole on every
    # device (2 * memory_size copies of the model) and estimated so
    m, v, ids, plan, mesh = setup()
    tx = optax.lbfgs(memory_size=3)
    state = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=v)
    flat = {key(p): x for p, x in jax.tree_util.tree_flatten_with_path(state)[0]}
    for name in ("diff_params_memory", "diff_updates_memory"):
        for param, spec in PLANNED.items():
            x = flat[f"0/{name}/{param}"]
            assert x.sharding.spec == P(None, *spec), (name, param)
    e = tpflax.estimate(plan, tx, model=m, sample=(ids,))
    assert (e.unsharded.opt_state, e.per_device.opt_state) == device_bytes(state)


def test_a_lookahead_step_given_plain_variables_says_how_to_pass_the_pair():
    m, v, ids, plan, mesh = setup()
    tx, state = sharded_state("lookahead_adam")
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(ids,), loss=loss)
    assert isinstance(ts.args[0], optax.LookaheadParams) and isinstance(ts.in_shardings[0], optax.LookaheadParams)
    with pytest.raises(tpflax.OptionError, match=r"optax.LookaheadParams\(fast=tpflax.shard"):
        jax.eval_shape(ts.fn, tpflax.shard(v, plan, mesh), state, (ids,))


def test_a_lookahead_steps_arguments_are_what_the_estimate_says():
    # the step's arguments hold the fast and the slow copy and the fast optimizer's state: XLA's argument
    # bytes per device equal the estimate's (without the slow copy it was 23104 bytes short)
    m, v, ids, plan, mesh = setup()
    tx = OPTIMIZERS["lookahead_adam"](v["params"])
    ts = tpflax.make_train_step(m, plan, mesh, tx, sample=(ids,), loss=loss)
    compiled = tpflax.dry_run(ts, plan, mesh)
    e = tpflax.estimate(plan, tx, model=m, sample=(ids,), loss=loss, backend="cpu")
    assert e.per_device.arguments == compiled.memory["argument"]


def test_a_donated_synced_pair_of_placed_arrays_gives_two_arrays():
    _, v, _, plan, mesh = setup()
    on_mesh = tpflax.shard(v, plan, mesh)
    placed = tpflax.shard(optax.LookaheadParams.init_synced(on_mesh), plan, mesh, donate=True)
    for a, b, want in zip(jax.tree_util.tree_leaves(placed.fast), jax.tree_util.tree_leaves(placed.slow),
                          jax.tree_util.tree_leaves(v), strict=True):
        assert a is not b
        np.testing.assert_array_equal(np.asarray(a), want)
        np.testing.assert_array_equal(np.asarray(b), want)


def test_jit_step_places_a_hand_written_lookahead_step():
    # a user's own optax.lookahead step: the params role takes the (fast, slow) pair and gives it back
    m, v, ids, plan, mesh = setup()
    tx = OPTIMIZERS["lookahead_adam"](v["params"])

    def step(pair, state, ids):
        params = optax.LookaheadParams(pair.fast["params"], pair.slow["params"])
        grads = jax.grad(lambda p: loss(m.apply({"params": p}, ids), ids))(params.fast)
        updates, state = tx.update(grads, state, params)
        new = optax.apply_updates(params, updates)
        return optax.LookaheadParams({"params": new.fast}, {"params": new.slow}), state

    pair = tpflax.shard(optax.LookaheadParams.init_synced(v), plan, mesh)
    state = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=optax.LookaheadParams.init_synced(v))
    jitted = tpflax.jit_step(step, plan, mesh, in_roles=("params", "state", "batch"), out_roles=("params", "state"),
                             optimizer=tx, compiler_options=FAST)
    out, state = jitted(pair, state, ids)
    assert isinstance(out, optax.LookaheadParams)
    for copy in out:
        for path, x in jax.tree_util.tree_flatten_with_path(copy)[0]:
            assert x.sharding.spec == plan.decisions[key(path)].spec, key(path)
    assert np.abs(np.asarray(out.fast["params"]["up"]["kernel"]) - v["params"]["up"]["kernel"]).max() > 0


@pytest.mark.parametrize("kind", ["masked", "multi_transform"])
def test_a_param_whose_path_ends_another_params_is_tied_to_its_own_moments(kind):
    """Regression: masked / multi_transform given a function tie state leaves to parameters by path. With
    params ``mu/w`` and ``w`` (a VAE's ``mu`` head beside a root param), adam's moment of ``w``,
    ``.../0/mu/w``, was tied to the longest matching param, ``mu/w``, and got its layout."""
    params = {"mu": {"w": np.ones((64, 64), np.float32)}, "w": np.ones((64, 64), np.float32),
              "b": np.ones((64,), np.float32)}
    plan = tpflax.plan(params, MESH, rules=[("^mu/w$", "column"), ("^w$", "row")])
    assert plan.spec("w") != plan.spec("mu/w")
    two_d = lambda p: jax.tree_util.tree_map(lambda x: x.ndim == 2, p)  # noqa: E731
    tx = (optax.masked(optax.adam(1e-3), two_d) if kind == "masked" else
          optax.multi_transform({True: optax.adam(1e-3), False: optax.sgd(1e-3)}, two_d))
    mesh = tpflax.make_mesh(MESH)
    placed = {key(p): x.sharding.spec for p, x in
              jax.tree_util.tree_flatten_with_path(tpflax.shard_optimizer_state(tx, None, plan, mesh))[0]}
    made = {key(p): s.spec for p, s in jax.tree_util.tree_flatten_with_path(tpflax.optimizer_shardings(tx, plan, mesh))[0]}
    for got in (placed, made):
        want = {k: plan.spec("mu/w") if k.endswith(("mu/mu/w", "nu/mu/w")) else plan.spec("w")
                for k in got if k.endswith("/w")}  # adam's mu and nu of each
        assert len(want) == 4 and {k: got[k] for k in want} == want, got
