"""The converter: placement, init, optimizer state, NNX, batches, jit_step, errors.

Real Flax modules, real optax optimizers, real compiled programs on 8 CPU-emulated
devices. Bit-exactness is checked on the raw bytes.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from _util import FAST_XLA, assert_bit_exact, same_bytes, zoo_init
from flax import nnx
from flax.training import train_state
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo
from tpflax._src.apply.put import put
from tpflax._src.specs import local_shape

DP_TP = {"data": 2, "model": 4}


def assert_placed(tree, plan, mesh):
    """Every leaf carries the plan's sharding and each device holds only its shard."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    assert len(flat) == len(plan.decisions)
    for path, x in flat:
        key = jax.tree_util.keystr(path, simple=True, separator="/")
        d = plan.decisions[key]
        assert x.sharding == NamedSharding(mesh, d.spec), key
        want = local_shape(d.shape, d.spec, plan.mesh)
        assert all(s.data.shape == want for s in x.addressable_shards), key


@pytest.fixture(scope="module")
def mesh():
    return tpflax.make_mesh(DP_TP)


def mixed_dtype_tree():
    rng = np.random.default_rng(0)
    f = rng.standard_normal((16, 32)).astype(np.float32)
    return {
        "f32": {"kernel": f},
        "bf16": {"kernel": f.astype(ml_dtypes.bfloat16)},
        "f16": {"kernel": f.astype(np.float16)},
        "i8": {"kernel": rng.integers(-128, 127, (16, 32), dtype=np.int8)},
        "e4m3": {"kernel": f.astype(ml_dtypes.float8_e4m3fn)},
        "e5m2": {"kernel": f.astype(ml_dtypes.float8_e5m2)},
        "norm": {"scale": np.ones((32,), np.float32)},
    }


MIXED_RULES = [(r"f32|bf16|i8", P("data", "model")), (r"f16|e4m3", P(None, "model")),
               (r"e5m2", P("model", "data"))]


@pytest.mark.parametrize("source", ["numpy", "device0", "per_shard"])
def test_shard_is_bit_exact_for_every_dtype(mesh, source):
    host = mixed_dtype_tree()
    plan = tpflax.plan(host, DP_TP, rules=MIXED_RULES)
    tree = host if source != "device0" else jax.device_put(host, jax.devices()[0])
    before = jax.tree_util.tree_leaves(tree)
    out = tpflax.shard(tree, plan, mesh, per_shard=source == "per_shard")
    assert_placed(out, plan, mesh)
    assert_bit_exact(tpflax.unshard(out), host)
    # The caller's tree is untouched: same leaf objects, still readable.
    assert all(a is b for a, b in zip(before, jax.tree_util.tree_leaves(tree), strict=True))
    assert_bit_exact(tree, host)


def test_make_array_from_callback_path_reads_memmaps_by_slice(mesh, tmp_path):
    """The multi-host code path, single-process: every leaf built from per-device slices."""
    data = np.arange(64 * 48, dtype=np.float32).reshape(64, 48)
    np.save(tmp_path / "w.npy", data)
    mm = np.load(tmp_path / "w.npy", mmap_mode="r")
    plan = tpflax.plan({"w": mm}, DP_TP, rules=[("w", P("data", "model"))])
    out = tpflax.shard({"w": mm}, plan, mesh)
    assert same_bytes(tpflax.unshard(out)["w"], data)
    assert out["w"].addressable_shards[0].data.shape == (32, 12)
    s = NamedSharding(mesh, P("model", None))
    (a,) = put([data], [s], per_shard=True)
    assert a.sharding == s and same_bytes(np.asarray(a), data)


def test_shard_keeps_flax_boxes():
    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.with_logical_partitioning(nn.initializers.lecun_normal(), ("embed", "mlp"))
            return nn.Dense(32, kernel_init=init, use_bias=False)(x)

    v = Boxed().init(jax.random.key(0), jnp.ones((1, 16)))
    plan = tpflax.plan(v, DP_TP)
    out = tpflax.shard(v, plan, tpflax.make_mesh(DP_TP))
    box = out["params"]["Dense_0"]["kernel"]
    assert isinstance(box, nn.LogicallyPartitioned) and box.names == ("embed", "mlp")
    assert box.value.sharding.spec == P(None, "model")
    assert same_bytes(box.value, v["params"]["Dense_0"]["kernel"].value)


def test_init_sharded_matches_plain_init_bit_exact(mesh):
    m = zoo.get("llama")
    x = jnp.zeros((1, m.config.seq_len), jnp.int32)
    plan = tpflax.plan(m.abstract_variables(), DP_TP)
    got = tpflax.init_sharded(m.module.init, plan, mesh, jax.random.key(0), x)
    assert_placed(got, plan, mesh)
    assert_bit_exact(tpflax.unshard(got), jax.device_get(m.module.init(jax.random.key(0), x)))


def test_init_sharded_in_chunks_given_as_a_size_string_is_bit_exact(mesh):
    """``chunk_bytes="4KiB"`` (a size as the CLI and suggest_mesh write them): several programs, the same
    values as one (a bare TypeError before: the size was compared with ints)."""
    m = zoo.get("mlp")
    plan = tpflax.plan(m.abstract_variables(), DP_TP)
    one = tpflax.init_sharded(lambda k: m.init(k), plan, mesh, jax.random.key(0), chunk_bytes=None)
    many = tpflax.init_sharded(lambda k: m.init(k), plan, mesh, jax.random.key(0), chunk_bytes="4KiB")
    assert_placed(many, plan, mesh)
    assert_bit_exact(tpflax.unshard(many), tpflax.unshard(one))


def test_init_sharded_nnx_module_comes_back_merged(mesh):
    m = zoo.get("nnx-mlp")
    plan = tpflax.plan(m.abstract_variables(), DP_TP)
    model = tpflax.init_sharded(lambda k: m.module(nnx.Rngs(params=k)), plan, mesh,
                                jax.random.key(3))
    assert isinstance(model, nnx.Module)
    assert_placed(nnx.state(model).to_pure_dict(), plan, mesh)
    ref = m.init(jax.random.key(3))
    assert_bit_exact(tpflax.unshard(model), jax.device_get(ref))


@pytest.mark.parametrize("chunk_bytes", [None, "4KiB"])
def test_init_sharded_advances_an_nnx_rngs_argument_as_plain_nnx_does(mesh, chunk_bytes):
    """Regression: ``init_sharded(lambda r: Model(r), plan, mesh, rngs)`` (the form its TraceError
    recommends) left the caller's ``nnx.Rngs`` where it was, so two towers made with one Rngs had the
    same weights, where ``Model(rngs); Model(rngs)`` gives different ones."""
    class Tower(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

    plain = nnx.Rngs(0, dropout=5)
    a, b = Tower(plain), Tower(plain)
    plan = tpflax.plan(nnx.state(a), DP_TP)
    rngs = nnx.Rngs(0, dropout=5)
    a2 = tpflax.init_sharded(lambda r: Tower(r), plan, mesh, rngs, chunk_bytes=chunk_bytes)
    b2 = tpflax.init_sharded(lambda r: Tower(r), plan, mesh, rngs, chunk_bytes=chunk_bytes)
    counts = lambda r: [int(s.count.get_value()) for s in (r.default, r.dropout)]  # noqa: E731
    assert counts(rngs) == counts(plain) and counts(rngs)[0] > 0
    assert_bit_exact(tpflax.unshard(a2), tpflax.unshard(a))
    assert_bit_exact(tpflax.unshard(b2), tpflax.unshard(b))
    assert not same_bytes(b2.up.kernel.get_value(), a2.up.kernel.get_value())
    c = Tower(rngs)  # the caller's Rngs stays usable eagerly, on one device, as plain NNX leaves it
    assert c.up.kernel.get_value().sharding.device_set == {jax.devices()[0]}


def test_init_sharded_advances_every_stream_of_nested_rngs_as_plain_nnx_does(mesh):
    """Regression: an ``nnx.Rngs`` of several streams (params, dropout, a custom ``noise``) reached through a
    container argument (``init_sharded(lambda a: Model(a["rngs"]), plan, mesh, {"rngs": rngs})``), used by
    nested submodules, was not advanced: a second call made the first call's weights. Every stream is now
    left where two ``Model(rngs)`` calls leave it, and each call's weights are the plain constructor's."""
    class Block(nnx.Module):
        def __init__(self, rngs):
            self.a, self.drop = nnx.Linear(8, 16, rngs=rngs), nnx.Dropout(0.1, rngs=rngs)
            self.b = nnx.Linear(16, 8, rngs=rngs)

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs), Block(rngs)])
            self.noise = nnx.Param(jax.random.normal(rngs.noise(), (8,)))

    make = lambda: nnx.Rngs(params=0, dropout=1, noise=2)  # noqa: E731
    plain = make()
    a, b = Model(plain), Model(plain)
    plan = tpflax.plan(nnx.state(a), DP_TP)
    state = lambda r: {jax.tree_util.keystr(p): np.asarray(  # noqa: E731
        jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x)
        for p, x in jax.tree_util.tree_leaves_with_path(nnx.state(r))}
    for wrap in (lambda r: r, lambda r: {"rngs": r}, lambda r: (r,)):
        rngs = make()
        build = lambda arg: Model(jax.tree_util.tree_leaves(arg, is_leaf=lambda x: isinstance(x, nnx.Rngs))[0])  # noqa: E731
        a2 = tpflax.init_sharded(build, plan, mesh, wrap(rngs))
        b2 = tpflax.init_sharded(build, plan, mesh, wrap(rngs))
        params = lambda m: tpflax.unshard(nnx.state(m, nnx.Param))  # noqa: E731
        assert_bit_exact(params(a2), params(a))
        assert_bit_exact(params(b2), params(b))
        got, want = state(rngs), state(plain)
        assert got.keys() == want.keys() and all(same_bytes(got[k], want[k]) for k in got), (got, want)


def test_init_sharded_with_one_rngs_passed_twice_draws_each_key_once(mesh):
    """Regression: ``init_sharded(lambda a, b: Pair(a, b), plan, mesh, rngs, rngs)`` gave jit two copies of the
    one Rngs: both towers drew the same keys (identical weights, where plain NNX makes different ones), and
    the caller's Rngs was left where one copy left it. It is one object inside the init now, as in NNX."""
    class Pair(nnx.Module):
        def __init__(self, r1, r2):
            self.left, self.right = nnx.Linear(16, 64, rngs=r1), nnx.Linear(16, 64, rngs=r2)

    plain = nnx.Rngs(0)
    want = Pair(plain, plain)
    plan = tpflax.plan(nnx.state(want), DP_TP)
    rngs = nnx.Rngs(0)
    got = tpflax.init_sharded(lambda a, b: Pair(a, b["again"]), plan, mesh, rngs, {"again": rngs})
    assert_bit_exact(tpflax.unshard(got), tpflax.unshard(want))
    assert int(rngs.default.count.get_value()) == int(plain.default.count.get_value()) == 4


def test_init_sharded_nnx_module_with_a_dropout_key(mesh):
    # nnx.Dropout keeps an RNG key in the state: sizing the init chunks read its dtype with numpy,
    # which does not know key<fry> (a raw TypeError); the key comes back replicated, bit-exact
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up, self.drop = nnx.Linear(64, 256, rngs=rngs), nnx.Dropout(0.1, rngs=rngs)
            self.down = nnx.Linear(256, 64, rngs=rngs)

        def __call__(self, x):
            return self.down(self.drop(nnx.relu(self.up(x))))

    make = lambda: Net(nnx.Rngs(0, dropout=1))  # noqa: E731
    plan = tpflax.plan(nnx.state(make()), DP_TP, model=make(), sample=(jnp.ones((16, 64)),))
    model = tpflax.init_sharded(make, plan, mesh)
    assert model.up.kernel.get_value().sharding.spec == plan.specs["up"]["kernel"]
    key = model.drop.rngs.key.get_value()
    assert key.sharding.spec == P() and jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    ref = make()
    assert same_bytes(jax.random.key_data(key), jax.random.key_data(ref.drop.rngs.key.get_value()))
    assert same_bytes(model.up.kernel.get_value(), ref.up.kernel.get_value())


# ---------------------------------------------------------------------------
# optimizer state


def small_params():
    r = np.random.default_rng(1)
    return {"up": {"kernel": r.standard_normal((16, 64)).astype(np.float32),
                   "bias": np.zeros((64,), np.float32)},
            "down": {"kernel": r.standard_normal((64, 16)).astype(np.float32)},
            "norm": {"scale": np.ones((16,), np.float32)}}


LABELS = {"up": {"kernel": "a", "bias": "b"}, "down": {"kernel": "a"}, "norm": {"scale": "b"}}
MASK = {"up": {"kernel": True, "bias": False}, "down": {"kernel": True}, "norm": {"scale": False}}

OPTIMIZERS = {
    "adamw": lambda: optax.adamw(1e-3),
    "adafactor": lambda: optax.adafactor(1e-3, min_dim_size_to_factor=8),
    "sgd_momentum": lambda: optax.sgd(1e-2, momentum=0.9),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-3)),
    "masked": lambda: optax.masked(optax.adam(1e-3), MASK),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(1e-3), "b": optax.sgd(1e-2, momentum=0.9)}, LABELS),
    "multisteps": lambda: optax.MultiSteps(optax.adam(1e-3), 2),
}


def expected_spec(path: str, shape, plan) -> P:
    """What a state leaf should get: its parameter's spec, adapted; replicated otherwise."""
    for ppath, d in plan.decisions.items():
        if path.endswith("/" + ppath):
            if tuple(shape) == d.shape:
                return d.spec
            if len(shape) == len(d.shape) - 1:  # adafactor factored moment: one dim reduced
                for k in range(len(d.shape)):
                    if d.shape[:k] + d.shape[k + 1:] == tuple(shape):
                        return P(*(tuple(d.spec)[:k] + tuple(d.spec)[k + 1:]))
            return P(*[None] * len(shape))
    return P()


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_optimizer_state_specs_follow_params(name, mesh):
    params = small_params()
    plan = tpflax.plan(params, DP_TP, rules=[("up/kernel", "column"), ("up/bias", P("model")),
                                             ("down/kernel", "row")])
    tx = OPTIMIZERS[name]()
    ref_state = jax.device_get(tx.init(params))
    # Created sharded from nothing, and placed from an existing state: same layout, same values.
    created = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=params)
    placed = tpflax.shard_optimizer_state(tx, ref_state, plan, mesh)
    zeros_init = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    for state in (created, placed, zeros_init):
        flat = jax.tree_util.tree_flatten_with_path(state)[0]
        assert flat, name
        for path, x in flat:
            key = jax.tree_util.keystr(path, simple=True, separator="/")
            assert x.sharding.spec == expected_spec(key, x.shape, plan), (name, key)
        assert_bit_exact(tpflax.unshard(state), ref_state)
    n_sharded = sum(1 for _, x in jax.tree_util.tree_flatten_with_path(created)[0]
                    if any(e is not None for e in x.sharding.spec))
    assert n_sharded >= 2, name
    if name == "adafactor":  # factored moments really are there, with reduced shapes
        vr = created[0].v_row["up"]["kernel"]
        assert vr.shape == (16,) and vr.sharding.spec == P(None)
        vc = created[0].v_col["up"]["kernel"]
        assert vc.shape == (64,) and vc.sharding.spec == P("model")
    # One real update under jit with the derived shardings.
    sp = tpflax.shard(params, plan, mesh)
    grads = jax.tree_util.tree_map(lambda a: jnp.full(a.shape, 0.5, a.dtype), sp)
    s_opt = tpflax.optimizer_shardings(tx, plan, mesh)
    upd = jax.jit(tx.update, out_shardings=(tpflax.shardings(plan, mesh), s_opt))
    u, new_state = upd(grads, created, sp)
    ref_u, _ = tx.update(jax.device_get(grads), ref_state, params)
    np.testing.assert_allclose(np.asarray(u["down"]["kernel"]), ref_u["down"]["kernel"], rtol=1e-6)
    assert new_state is not None


def zoo_variables(name):
    """A zoo model's variables on the host, initialised once per session (any values do here)."""
    return zoo_init(name)


def flat_specs(tree, prefix=""):
    return {prefix + jax.tree_util.keystr(p, simple=True, separator="/"): x.sharding.spec
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("name", ["gpt2", "cnn"])  # cnn carries batch_stats, gpt2 only params
def test_optimizer_state_for_planned_variables_or_their_params(name, mesh):
    """Regression: opt.init(variables) for plan(variables) was refused ("0/nu/params/...")."""
    v = zoo_variables(name)
    assert ("batch_stats" in v) == (name == "cnn")
    plan = tpflax.plan(v, DP_TP)
    tx = optax.adam(1e-3)
    for made_from, prefix in ((v, ""), (v["params"], "params/")):
        state = tx.init(made_from)
        placed = tpflax.shard_optimizer_state(tx, state, plan, mesh)
        assert_bit_exact(tpflax.unshard(placed), state)
        for key, spec in flat_specs(placed[0].mu, prefix).items():
            assert spec == plan.decisions[key].spec, key
        assert placed[0].count.sharding.spec == P()
        want = tpflax.optimizer_shardings(tx, plan, mesh, opt_state=state)
        assert jax.tree_util.tree_leaves(want) == [x.sharding for x in jax.tree_util.tree_leaves(placed)]


@pytest.mark.parametrize("planned", ["variables", "params"])
def test_optimizer_state_from_full_variables_mirrors_their_params_collection(planned, mesh):
    # params=variables ({"params", "batch_stats"}) for the state to start from: masked and multi_transform
    # (their mask and labels a tree like variables["params"]) met jax's "pytree structure error" inside
    # jit, adamw silently kept moments of the BatchNorm statistics that no step trains. The state now
    # mirrors the params collection (what make_train_step updates), for a plan of either tree
    v = zoo_variables("cnn")
    assert set(v) == {"params", "batch_stats"}
    plan = tpflax.plan(v if planned == "variables" else v["params"], DP_TP)
    prefix = "params/" if planned == "variables" else ""
    mask = jax.tree.map(lambda x: x.ndim > 1, v["params"])
    labels = jax.tree.map(lambda x: "a" if x.ndim > 1 else "b", v["params"])
    for tx in (optax.adamw(1e-3), optax.adamw(1e-3, mask=mask),
               optax.multi_transform({"a": optax.adam(1e-3), "b": optax.sgd(1e-2, momentum=0.9)}, labels)):
        want = tx.init(v["params"])
        got = tpflax.shard_optimizer_state(tx, None, plan, mesh, params=v)
        assert jax.tree.structure(got) == jax.tree.structure(want)
        assert_bit_exact(tpflax.unshard(got), want)
        for path, x in jax.tree_util.tree_flatten_with_path(got)[0]:
            key = jax.tree_util.keystr(path, simple=True, separator="/")
            spec = next((d.spec for k, d in plan.decisions.items() if key.endswith("/" + k.removeprefix(prefix))), P())
            assert x.sharding.spec == (spec if x.ndim else P()), key
        shardings = tpflax.optimizer_shardings(tx, plan, mesh, params=v)
        assert jax.tree.leaves(shardings) == [x.sharding for x in jax.tree.leaves(got)]
    # a state made of all the variables is still placed, as before (params= names what it was made of)
    whole = optax.adam(1e-3).init(v)
    placed = tpflax.shard_optimizer_state(optax.adam(1e-3), whole, plan, mesh, params=v)
    assert jax.tree.structure(placed) == jax.tree.structure(whole)
    # another model's variables: refused by name, not with a jax error inside jit
    other = zoo_variables("gpt2")
    with pytest.raises(tpflax.PlanMismatchError, match=r"params= holds linen collections \['params'\]; the "
                       r"optimizer state mirrors their 'params' collection") as e:
        tpflax.shard_optimizer_state(optax.adamw(1e-3), None, plan, mesh, params=other)
    assert any(p.endswith("planned, not in params['params']") for p in e.value.problems)
    assert any(p.endswith("in params['params'], not planned") for p in e.value.problems)
    assert str(e.value).count("pass params= the variables (or their params collection) the plan was made for")


@pytest.mark.parametrize("name", ["gpt2", "cnn"])
def test_params_of_planned_variables_are_accepted(name, mesh):
    """variables["params"] for a plan of the full variables: placed as planned, not 58 mismatches."""
    v = zoo_variables(name)
    plan = tpflax.plan(v, DP_TP)
    placed = tpflax.shard(v["params"], plan, mesh)
    assert_bit_exact(tpflax.unshard(placed), v["params"])
    specs = {k: d.spec for k, d in plan.decisions.items() if k.startswith("params/")}
    assert flat_specs(placed, "params/") == specs
    sh = tpflax.shardings(plan, mesh, v["params"])
    assert jax.tree_util.tree_leaves(sh) == [x.sharding for x in jax.tree_util.tree_leaves(placed)]
    first = sorted(v["params"])[0]
    missing = {k: x for k, x in v["params"].items() if k != first}
    with pytest.raises(tpflax.PlanMismatchError, match=r"the plan's params/ collection") as e:
        tpflax.shard(missing, plan, mesh)
    assert all(f"params/{first}/" in p and "missing from the tree" in p for p in e.value.problems)
    extra = {**v["params"], "extra": {"w": np.zeros((3,), np.float32)}}
    with pytest.raises(tpflax.PlanMismatchError, match=r"paths are in the plan with the prefix params/"):
        tpflax.shard(extra, plan, mesh)


F32_U = float(np.finfo(np.float32).eps) / 2  # unit roundoff of float32


def assert_adam_first_step_close(old, new_s, new_r, g_s, g_r, lr, eps):
    """Sharded vs unsharded results of one adamw step from a zero state, with a derived bound.

    One step updates each element by ``-lr * (g / (|g| + eps) + wd * p)`` (bias
    correction makes m_hat = g, v_hat = g**2). Its slope in g is at most 1/eps
    (at g = 0), so a gradient error e moves the update by at most
    ``lr * |e| / eps``: a gradient that is rounding noise near zero can flip
    the update by up to 2 * lr, which is why a plain rtol on the parameters
    fails now and then. So:

    1. gradients (read back from mu = (1 - b1) g) agree to the reduction-order
       error of float32 sums split across shards, ``64 u max|g|`` per leaf
       (measured <= 9 u; a wrong layout or a missing all-reduce is off by ~max|g|);
    2. parameter deltas agree to what (1) allows: ``lr * |g_s - g_r| / eps``,
       plus ``16 u lr`` for rounding inside the update (sqrt, divide, scale)
       and one ulp of the old and new parameter for ``p + delta``.
    """
    flat = jax.tree_util.tree_flatten_with_path(old)[0]
    leaves = [jax.tree_util.tree_leaves(t) for t in (new_s, new_r, g_s, g_r)]
    for (path, p), ns, nr, gs, gr in zip(flat, *leaves, strict=True):
        p, ns, nr, gs, gr = (np.asarray(x, np.float64) for x in (p, ns, nr, gs, gr))
        key = jax.tree_util.keystr(path)
        e = np.abs(gs - gr)
        assert e.max() <= 64 * F32_U * np.abs(gr).max(), (key, e.max() / (F32_U * np.abs(gr).max()))
        ulp = np.spacing(np.abs(p).astype(np.float32)) + np.spacing(np.abs(nr).astype(np.float32))
        bound = lr * (e / eps + 16 * F32_U) + ulp
        diff = np.abs((ns - p) - (nr - p))
        assert (diff <= bound).all(), (key, float((diff - bound).max()))


def test_train_state_is_sharded_and_steps(mesh):
    m = zoo.get("mlp")
    v = zoo_init("mlp")  # any variables do; compiled once per process
    plan = tpflax.plan(v["params"], DP_TP, fsdp_min_bytes=0)
    tx = optax.adamw(1e-3)
    ts = train_state.TrainState.create(apply_fn=m.module.apply, params=v["params"], tx=tx)
    sts = tpflax.shard_train_state(ts, plan, mesh)
    assert_placed(sts.params, plan, mesh)
    assert sts.opt_state[0].mu["head"]["kernel"].sharding == sts.params["head"]["kernel"].sharding
    assert sts.step.sharding.spec == P()
    shard_tree = tpflax.train_state_shardings(ts, plan, mesh)
    batch = m.make_batch(1, 4)

    def step(state, batch):
        loss, g = jax.value_and_grad(lambda p: m.loss({"params": p}, batch))(state.params)
        return state.apply_gradients(grads=g), loss

    run = jax.jit(step, in_shardings=(shard_tree, tpflax.batch_sharding(mesh)),
                  out_shardings=(shard_tree, None), donate_argnums=0, compiler_options=FAST_XLA)
    new, loss = run(sts, batch)
    ref_new, ref_loss = jax.jit(step, compiler_options=FAST_XLA)(ts, batch)
    assert int(new.step) == 1
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    assert_placed(new.params, plan, mesh)

    def grads(state):  # adamw's mu after one step is (1 - b1) * g, b1 = 0.9
        return jax.tree_util.tree_map(lambda x: np.asarray(x) / 0.1, tpflax.unshard(state.opt_state[0].mu))

    assert_adam_first_step_close(jax.device_get(v["params"]), tpflax.unshard(new.params),
                                 jax.device_get(ref_new.params), grads(new), grads(ref_new), 1e-3, 1e-8)


# ---------------------------------------------------------------------------
# NNX


def test_nnx_module_and_optimizer_shard_and_train(mesh):
    m = zoo.get("nnx-mlp")
    model = m.make_model(0)
    ref_model = m.make_model(0)
    old = jax.device_get(nnx.state(ref_model).to_pure_dict())
    plan = tpflax.plan(nnx.state(model), DP_TP, fsdp_min_bytes=0)
    sharded = tpflax.shard(model, plan, mesh)
    assert sharded is not model
    assert model.blocks[0].up.kernel.get_value().sharding.num_devices == 1  # untouched
    assert_placed(nnx.state(sharded).to_pure_dict(), plan, mesh)
    assert_bit_exact(tpflax.unshard(sharded).to_pure_dict(), old)
    lr, eps, b1 = 1e-3, 1e-8, 0.9
    tx = optax.adamw(lr, b1=b1, eps=eps)
    opt = tpflax.shard_optimizer_state(nnx.Optimizer(sharded, tx, wrt=nnx.Param), None, plan, mesh)
    mu = opt.opt_state[0].mu["blocks"][0]["up"]["kernel"].get_value()
    assert mu.sharding.spec == plan.decisions["blocks/0/up/kernel"].spec
    batch = m.make_batch(1, 4)

    @nnx.jit
    def train_step(model, opt, batch):
        def loss_fn(model):
            return optax.softmax_cross_entropy_with_integer_labels(model(batch["x"]),
                                                                   batch["y"]).mean()
        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    ref_opt = nnx.Optimizer(ref_model, tx, wrt=nnx.Param)
    loss = train_step(sharded, opt, tpflax.shard_batch(batch, mesh))
    ref_loss = train_step(ref_model, ref_opt, batch)
    # the forward pass only reorders a few float32 sums: a few ulp of the loss
    np.testing.assert_allclose(float(loss), float(ref_loss), rtol=1e-6)
    k = sharded.blocks[0].up.kernel.get_value()
    assert k.sharding.spec == plan.decisions["blocks/0/up/kernel"].spec

    def grads(o):  # mu after one step is (1 - b1) * g
        mu_tree = tpflax.unshard(nnx.state(o).to_pure_dict()["opt_state"][0]["mu"])
        return jax.tree_util.tree_map(lambda x: np.asarray(x) / (1 - b1), mu_tree)

    assert_adam_first_step_close(old, tpflax.unshard(nnx.state(sharded).to_pure_dict()),
                                 jax.device_get(nnx.state(ref_model).to_pure_dict()),
                                 grads(opt), grads(ref_opt), lr, eps)


# ---------------------------------------------------------------------------
# batches and jit_step


def test_batch_sharding_of_a_batch_tree_replicates_its_scalars():
    # one sharding for the whole batch gives a scalar leaf (a step counter) a batch dim it lacks, and
    # jax.jit refuses it: given the batch, one sharding per leaf
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    batch = {"x": np.arange(32, dtype=np.float32).reshape(8, 4), "step": np.int32(3)}
    sh = tpflax.batch_sharding(mesh, batch)
    assert sh["x"].spec == P("data") and sh["step"].spec == P()
    out = jax.jit(lambda b: b["x"].sum(0) + b["step"], in_shardings=(sh,))(batch)
    assert np.array_equal(np.asarray(out), batch["x"].sum(0) + 3)
    abstract = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), batch)
    assert tpflax.batch_sharding(mesh, abstract) == sh
    with pytest.raises(tpflax.SpecError, match="not divisible"):
        tpflax.batch_sharding(mesh, {"x": np.ones((3, 4), np.float32)})


def test_batch_sharding_and_constraints():
    assert tpflax.batch_sharding(tpflax.make_mesh({"model": 8})).spec == P()
    assert tpflax.batch_sharding(tpflax.make_mesh({"fsdp": 2, "model": 4})).spec == P("fsdp")
    mesh = tpflax.make_mesh({"data": 2, "fsdp": 2, "model": 2})
    assert tpflax.batch_sharding(mesh).spec == P(("data", "fsdp"))
    b = tpflax.shard_batch({"x": np.ones((8, 3), np.float32), "n": np.int32(2)}, mesh)
    assert b["x"].sharding.spec == P(("data", "fsdp")) and b["n"].sharding.spec == P()
    local = tpflax.shard_batch({"x": np.ones((8, 3), np.float32)}, mesh, process_local=True)
    assert local["x"].sharding.spec == P(("data", "fsdp")) and local["x"].shape == (8, 3)
    with pytest.raises(tpflax.SpecError, match=r"x: batch dim .* 6, not divisible by .*data=2\*fsdp=2"):
        tpflax.shard_batch({"x": np.ones((6, 3))}, mesh)
    f = jax.jit(lambda b: tpflax.constrain_batch(b, mesh)["x"] * 2)
    assert f({"x": jnp.ones((8, 3))}).sharding.spec == P(("data", "fsdp"))


def test_shard_batch_narrows_in_range_64_bit_inputs_as_jax_does():
    """int64 ids within int32 and float64 inputs are placed as jax places them (32-bit); only ids that would
    wrap are refused (tests/test_bad_inputs.py)."""
    mesh = tpflax.make_mesh({"data": 2})
    ids = np.array([-2**31, 5, 7, 2**31 - 1], np.int64)
    x = np.linspace(0, 1, 8).reshape(4, 2)
    b = tpflax.shard_batch({"ids": ids, "x": x}, mesh)
    assert b["ids"].dtype == np.int32 and np.array_equal(np.asarray(b["ids"]), ids)
    assert b["x"].dtype == np.float32 and np.array_equal(np.asarray(b["x"]), x.astype(np.float32))


def test_a_plan_on_axes_with_custom_names_places_on_its_own_mesh():
    """Axes named ``rows``/``cols`` need ``axis_roles=`` to plan, not to build a jax Mesh: the default mesh
    (``mesh=None``: the plan's), ``make_mesh(plan.mesh.sizes)`` (the fix PlanMismatchError names) and the batch
    helpers given a shape and the roles all raised "axis 'rows' has no known role ... pass axis_roles=")."""
    roles = {"rows": "data", "cols": "tensor"}
    tree = {"up": {"kernel": np.arange(16 * 64, dtype=np.float32).reshape(16, 64)},
            "down": {"kernel": np.arange(64 * 16, dtype=np.float32).reshape(64, 16)}}
    plan = tpflax.plan(tree, {"rows": 2, "cols": 4}, axis_roles=roles)
    assert plan.spec("up/kernel") == P(None, "cols")
    placed = tpflax.shard(tree, plan)
    assert placed["up"]["kernel"].sharding.mesh.axis_names == ("rows", "cols")
    assert placed["up"]["kernel"].sharding.spec == P(None, "cols")
    assert np.array_equal(np.asarray(tpflax.unshard(placed)["down"]["kernel"]), tree["down"]["kernel"])
    made = tpflax.init_sharded(lambda: jax.tree.map(jnp.asarray, tree), plan)
    assert made["down"]["kernel"].sharding.spec == P("cols", None)
    state = tpflax.shard_optimizer_state(optax.adam(1e-3), None, plan)
    assert state[0].mu["up"]["kernel"].sharding.spec == P(None, "cols")
    mesh = tpflax.make_mesh(plan.mesh.sizes)
    assert dict(mesh.shape) == {"rows": 2, "cols": 4}
    assert tpflax.batch_sharding({"rows": 2, "cols": 4}, axis_roles=roles).spec == P("rows")
    batch = tpflax.shard_batch({"x": np.ones((8, 3), np.float32)}, "rows=2,cols=4", axis_roles=roles)
    assert batch["x"].sharding.spec == P("rows")


def test_make_mesh_takes_a_device_grid_and_rebuilds_a_mesh_it_is_asked_to_change():
    """``devices=`` as an array (``mesh.devices``, ``mesh_utils.create_device_mesh``): kept as laid out when it
    has the mesh's shape, else its devices in order (a bare ValueError or AttributeError before). A jax Mesh
    with ``devices=`` or ``explicit=True`` is rebuilt so (both were ignored: the Mesh came back as it was)."""
    d = jax.devices()
    grid = np.array(d[::-1], dtype=object).reshape(2, 4)
    m = tpflax.make_mesh({"data": 2, "model": 4}, devices=grid)
    assert [x.id for x in m.devices.flat] == [x.id for x in d[::-1]]
    assert [x.id for x in tpflax.make_mesh({"model": 2}, devices=grid).devices.flat] == [d[7].id, d[6].id]
    assert [x.id for x in tpflax.make_mesh({"data": 2, "model": 4}, devices=m.devices).devices.flat] == \
        [x.id for x in m.devices.flat]
    two = tpflax.make_mesh({"model": 2})
    assert [x.id for x in tpflax.make_mesh(two, devices=d[4:6]).devices.flat] == [d[4].id, d[5].id]
    assert tpflax.make_mesh(two, explicit=True).axis_types == (jax.sharding.AxisType.Explicit,)
    assert tpflax.make_mesh(tpflax.make_mesh(two, explicit=True), devices=d[2:4]).axis_types == \
        (jax.sharding.AxisType.Explicit,)
    assert tpflax.make_mesh(two) is two


def test_make_mesh_keeps_the_explicit_axes_of_an_abstract_mesh():
    # a concrete Mesh's Explicit axes were kept, an AbstractMesh's came back Auto
    E, A = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    explicit = jax.sharding.AbstractMesh((2, 4), ("data", "model"), axis_types=(E, E))
    m = tpflax.make_mesh(explicit)
    assert m.axis_types == (E, E) and dict(m.shape) == {"data": 2, "model": 4}
    assert tpflax.make_mesh(explicit, devices=jax.devices()[::-1]).axis_types == (E, E)
    auto = jax.sharding.AbstractMesh((2, 4), ("data", "model"), axis_types=(A, A))
    assert tpflax.make_mesh(auto).axis_types == (A, A)
    assert tpflax.make_mesh(auto, explicit=True).axis_types == (E, E)


def test_constrain_gathered_drops_only_fsdp_axes():
    # a hand-written step of a model without scanned or remat'd layers: params pinned for compute without their
    # fsdp split (the README teaches gathered_loss, which does this and gathers a scanned stack per layer)
    w = {"params": {"up": {"kernel": jax.ShapeDtypeStruct((64, 256), jnp.float32)}}}
    plan = tpflax.plan(w, {"fsdp": 2, "model": 4}, rules=[("kernel", P("fsdp", "model"))])
    mesh = tpflax.make_mesh({"fsdp": 2, "model": 4})
    x = tpflax.shard({"params": {"up": {"kernel": np.ones((64, 256), np.float32)}}}, plan, mesh)
    for gathered, spec in ((False, P("fsdp", "model")), (True, P(None, "model"))):
        out = jax.jit(lambda t, g=gathered: tpflax.constrain(t, plan, mesh, gathered=g))(x["params"])
        assert out["up"]["kernel"].sharding.spec == spec


def test_jit_step_shardings_and_donation(mesh):
    m = zoo.get("mlp")
    v = m.init(0)
    plan = tpflax.plan(v, DP_TP)
    tx = optax.sgd(0.1, momentum=0.9)

    def step(variables, opt_state, batch):
        p = variables["params"]
        loss, g = jax.value_and_grad(lambda q: m.loss({"params": q}, batch))(p)
        u, opt_state = tx.update(g, opt_state, p)
        return {"params": optax.apply_updates(p, u)}, opt_state, loss

    sv = tpflax.shard(v, plan, mesh)
    so = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    run = tpflax.jit_step(step, plan, mesh, optimizer=tx)
    batch = m.make_batch(2, 4)
    nv, no, loss = run(sv, so, batch)
    assert_placed(nv, plan, mesh)
    assert no[0].trace["head"]["kernel"].sharding == nv["params"]["head"]["kernel"].sharding
    assert jax.tree_util.tree_leaves(sv)[0].is_deleted()  # donated
    assert not any(x.is_deleted() for x in jax.tree_util.tree_leaves(v))  # the caller's stay
    assert np.isfinite(float(loss))
    nv2, no2, _ = run(nv, no, batch)  # cached: compiled once
    assert len(run.cache) == 1 and jax.tree_util.tree_leaves(nv2)[0].sharding.mesh == mesh
    hlo = run.lower(nv2, no2, batch).as_text()
    assert "sharding" in hlo
    with pytest.raises(tpflax.PlanMismatchError, match="2 outputs"):
        tpflax.jit_step(step, plan, mesh, out_roles=("params", "state"))(nv2, no2, batch)
    with pytest.raises(tpflax.PlanMismatchError, match="unknown role"):
        tpflax.jit_step(step, plan, mesh, in_roles=("params", "bogus", "batch"))


# ---------------------------------------------------------------------------
# errors: every difference named, nothing placed


def test_tree_mismatch_names_every_difference_and_places_nothing(mesh):
    params = small_params()
    plan = tpflax.plan(params, DP_TP)
    bad = {"up": {"kernel": params["up"]["kernel"][:, :32],            # shape changed
                  "bias": params["up"]["bias"].astype(np.float16)},    # dtype changed
           "down": {"kernel": params["down"]["kernel"]},
           "extra": {"w": np.zeros((4,), np.float32)}}                 # extra; norm missing
    live = len(jax.live_arrays())
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.shard(bad, plan, mesh)
    msg = str(e.value)
    for needle in ("up/kernel: shape (16, 32) but the plan has (16, 64)",
                   "up/bias: dtype float16 but the plan has float32",
                   "extra/w: in the tree but not in the plan",
                   "norm/scale: in the plan but missing from the tree"):
        assert needle in msg, msg
    assert len(e.value.problems) == 4
    assert len(jax.live_arrays()) == live  # nothing placed halfway
    with pytest.raises(tpflax.PlanMismatchError):
        tpflax.init_sharded(lambda: bad, plan, mesh)
    with pytest.raises(tpflax.PlanMismatchError):
        tpflax.shard_train_state(train_state.TrainState.create(
            apply_fn=None, params=bad, tx=optax.sgd(0.1)), plan, mesh)


def test_donate_is_best_effort_as_the_docstring_says():
    # the docstring said the inputs are deleted; on CPU jax keeps them, and the result shares a buffer
    params = {"w": jnp.arange(32.0).reshape(8, 4)}
    plan = tpflax.plan(params, {"model": 2}, rules=[("w", "replicate")])
    mesh = tpflax.make_mesh({"model": 2})

    def ptrs(a):
        return {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}

    assert not ptrs(tpflax.shard(params, plan, mesh)["w"]) & ptrs(params["w"])  # no donate: never shared
    out = tpflax.shard(params, plan, mesh, donate=True)
    assert out["w"].sharding.spec == P(None, None) and (np.asarray(out["w"]) == np.arange(32.0).reshape(8, 4)).all()
    assert params["w"].is_deleted() or ptrs(out["w"]) & ptrs(params["w"])  # consumed either way
    if jax.default_backend() == "cpu":
        assert not params["w"].is_deleted()


def test_placement_under_jax_set_mesh_copies_the_callers_shards_and_keeps_them(mesh):
    """Regression: under ``jax.set_mesh(mesh)`` (the README names it as a way to set the mesh), placing jax
    arrays raised jax's bare "incompatible devices" ValueError: the copy that keeps the result from sharing
    the caller's buffer was a jitted ``copy``, traced against the context mesh."""
    params = jax.tree_util.tree_map(jnp.asarray, small_params())
    plan = tpflax.plan(params, DP_TP)

    def ptrs(a):
        return {s.data.unsafe_buffer_pointer() for s in a.addressable_shards}

    with jax.set_mesh(mesh):
        placed = tpflax.shard(params, plan, mesh)
        batch = tpflax.shard_batch(jnp.ones((8, 16)), mesh)
        state = tpflax.shard_optimizer_state(optax.adam(1e-3), optax.adam(1e-3).init(params), plan, mesh)
    assert_placed(placed, plan, mesh)
    assert_bit_exact(tpflax.unshard(placed), jax.device_get(params))
    for got, given in zip(jax.tree_util.tree_leaves(placed), jax.tree_util.tree_leaves(params), strict=True):
        assert not ptrs(got) & ptrs(given)  # replicated leaves too: no buffer shared with the caller's
    assert batch.sharding.spec == P("data") and int(state[0].count) == 0


def test_placed_arrays_never_change_with_a_later_write_to_the_numpy_source(mesh):
    """Regression: XLA:CPU adopts an aligned numpy buffer as the device buffer, so ``shard`` / ``shard_batch``
    of numpy arrays gave arrays that changed when the caller refilled its buffer after the call (a data
    loader, an in-place host update); shard's docstring promises no buffer shared with the input."""
    plan = tpflax.plan({"w": np.zeros((64, 64), np.float32), "b": np.zeros((64,), np.float32)}, DP_TP,
                       rules=[("w", "row"), ("b", "replicate")])
    places = {
        "shard": lambda t: tpflax.shard(t, plan, mesh),
        "shard per_shard": lambda t: tpflax.shard(t, plan, mesh, per_shard=True),
        "shard_batch": lambda t: tpflax.shard_batch(t, mesh),
        "shard_batch process_local": lambda t: tpflax.shard_batch(t, mesh, process_local=True),
    }
    for name, place in places.items():
        for _ in range(10):  # the write raced the transfer on some runs; each must come out unchanged
            tree = {"w": np.zeros((64, 64), np.float32), "b": np.zeros((64,), np.float32)}
            out = place(tree)
            for x in tree.values():
                x += 1.0
            assert all(float(jnp.abs(a).sum()) == 0.0 for a in jax.tree_util.tree_leaves(out)), name


def test_mesh_mismatch_and_too_few_devices():
    params = small_params()
    plan = tpflax.plan(params, DP_TP)
    with pytest.raises(tpflax.PlanMismatchError, match=r"'model': 8.*differs from the plan's mesh"):
        tpflax.shard(params, plan, tpflax.make_mesh({"model": 8}))
    with pytest.raises(tpflax.PlanMismatchError, match="AbstractMesh"):
        tpflax.shard(params, plan, tpflax.abstract_mesh(DP_TP))
    big = tpflax.plan(params, {"data": 4, "model": 4})
    with pytest.raises(tpflax.DeviceError, match="needs 16 devices but only 8"):
        tpflax.shard(params, big)
    assert isinstance(tpflax.DeviceError("x"), tpflax.TpflaxError)


def test_shardings_and_constraints_describe_an_abstract_mesh():
    # a pod this host does not have: the layout is described on an AbstractMesh (as make_train_step
    # does) and a step using it lowers; only placing arrays needs devices
    am = tpflax.abstract_mesh({"data": 16, "model": 8})
    w = {"up": jax.ShapeDtypeStruct((64, 256), jnp.float32), "down": jax.ShapeDtypeStruct((256, 64), jnp.float32)}
    plan = tpflax.plan(w, am)
    sh, bsh = tpflax.shardings(plan, am), tpflax.batch_sharding(am)
    assert sh["up"].mesh == am and sh["up"].spec == plan.specs["up"] and bsh.spec == P("data")
    opt = tpflax.optimizer_shardings(optax.adam(1e-3), plan, am)  # refused an AbstractMesh before
    assert opt[0].mu["up"].mesh == am and opt[0].mu["up"].spec == plan.specs["up"] and opt[0].count.spec == P()

    def f(w, x):
        w = tpflax.constrain(w, plan, am)
        return tpflax.constrain_batch(jnp.tanh(x @ w["up"]) @ w["down"], am)

    args = (jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), w, sh),
            jax.ShapeDtypeStruct((32, 64), jnp.float32, sharding=bsh))
    text = jax.jit(f).trace(*args).lower(lowering_platforms=("cpu",)).as_text()
    assert 'sdy.mesh @mesh = <["data"=16, "model"=8]>' in text
    for spec in ('[{}, {"model"}]', '[{"model"}, {}]'):  # up's columns, down's rows, as constrained
        assert f"sharding_constraint %arg0 <@mesh, {spec}>" in text or f"sharding_constraint %arg1 <@mesh, {spec}>" in text
    assert '<@mesh, [{"data"}, {}]>' in text  # the batch
    with pytest.raises(tpflax.PlanMismatchError, match="no devices to place"):
        tpflax.shard({"up": jnp.ones((64, 256)), "down": jnp.ones((256, 64))}, plan, am)


class _EqualDims(nn.Module):
    """A square kernel and a (128, 128, 4) one: adafactor's two largest dims are equal in both."""

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(128, use_bias=False, name="sq")(x)
        return nn.DenseGeneral((128, 4), use_bias=False, name="g")(jnp.tanh(h)).sum(-1)


@pytest.mark.parametrize("split", ["row", "column"])
def test_adafactor_moments_of_equal_dims_follow_the_dim_they_keep(split, mesh):
    # optax factors over np.argsort(shape)[-2:] = d1, d0 (ties in index order): v_row averages d0
    # away and keeps d1, v_col the reverse; (128, 128, 4): v_row keeps dims 0, 2, v_col dims 1, 2.
    # Both are (128, 4) here, so shape matching had given both dim 1's entry.
    model = _EqualDims()
    x = np.random.default_rng(0).standard_normal((8, 128)).astype(np.float32)
    v = jax.device_get(model.init(jax.random.key(0), x))
    kernel = P("model", None) if split == "row" else P(None, "model")
    plan = tpflax.plan(v, DP_TP, rules=[("sq/kernel", kernel), ("g/kernel", P(*kernel, None))])
    tx = optax.adafactor(1e-2)
    state = tpflax.shard_optimizer_state(tx, None, plan, mesh)
    for name in ("sq", "g"):
        keep_row, keep_col = kernel[0], kernel[1]  # v_row keeps dim 0, v_col dim 1 (and dim 2 of g)
        rest = (None,) if name == "g" else ()
        assert state[0].v_row[name]["kernel"].sharding.spec == P(keep_row, *rest), name
        assert state[0].v_col[name]["kernel"].sharding.spec == P(keep_col, *rest), name

    # the estimate counts what the fullest device holds
    est = tpflax.estimate(plan, tx, {"x": (8, 128)})
    per_device: dict = {}
    for a in jax.tree_util.tree_leaves(state):
        for s in a.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    assert max(per_device.values()) == est.per_device.opt_state

    # a train step on the sharded state gives the unsharded step's params, up to reassociated sums
    # (partial-sum matmuls over model, the gradient all-reduce over data, adafactor's means over a
    # split dim): measured at most 1 ulp of the largest param (1.5e-8), moments within 28 ulps
    def step(variables, opt_state, batch):
        p = variables["params"]
        g = jax.grad(lambda q: jnp.mean(model.apply({"params": q}, batch["x"]) ** 2))(p)
        u, opt_state = tx.update(g, opt_state, p)
        return {"params": optax.apply_updates(p, u)}, opt_state

    want, want_state = jax.jit(step)(v, tx.init(v["params"]), {"x": x})
    got, got_state = tpflax.jit_step(step, plan, mesh, optimizer=tx, out_roles=("params", "state"))(
        tpflax.shard(v, plan, mesh), state, tpflax.shard_batch({"x": x}, mesh))
    for a, b in zip(jax.tree_util.tree_leaves(tpflax.unshard(got)), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2 * np.spacing(np.abs(b).max()))
    for a, b in zip(jax.tree_util.tree_leaves(tpflax.unshard(got_state)), jax.tree_util.tree_leaves(want_state),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5)


def test_unshard_returns_a_key_array_of_its_own_that_outlives_a_donation():
    """Typed PRNG keys have no numpy form: unshard gathers their key data and wraps it again, a new key array
    on one device. It returned the placed array itself, still sharded, which a step donating the placed tree
    deleted under the caller's "host copy"."""
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    tree = {"w": np.arange(64, dtype=np.float32).reshape(8, 8), "keys": jax.random.split(jax.random.key(0), 8)}
    plan = tpflax.plan(tree, mesh.shape, rules=[("w", P("data", "model")), ("keys", P("model"))])
    placed = tpflax.shard(tree, plan, mesh)
    host = tpflax.unshard(placed)
    assert host["keys"] is not placed["keys"] and len(host["keys"].sharding.device_set) == 1
    jax.jit(lambda t: t, donate_argnums=0)(placed)  # deletes every placed array
    assert placed["keys"].is_deleted() and not host["keys"].is_deleted()
    assert jax.random.key_impl(host["keys"]) == jax.random.key_impl(tree["keys"])
    assert same_bytes(jax.random.key_data(host["keys"]), jax.random.key_data(tree["keys"]))


def test_make_mesh_takes_axis_types_per_axis_and_keeps_a_meshs_mixed_ones():
    """``axis_types=`` as ``jax.make_mesh`` takes it (there was only ``explicit=``, every axis or none), and a
    jax mesh with some axes Explicit, rebuilt over other devices, keeps them (it came back all Auto)."""
    E, A = jax.sharding.AxisType.Explicit, jax.sharding.AxisType.Auto
    shape = {"data": 2, "model": 4}
    assert tpflax.make_mesh(shape, axis_types=(E, A)).axis_types == (E, A)
    assert tpflax.make_mesh(shape, axis_types=("explicit", "Auto")).axis_types == (E, A)
    mixed = jax.sharding.AbstractMesh((2, 4), ("data", "model"), axis_types=(E, A))
    assert tpflax.make_mesh(mixed).axis_types == (E, A)
    concrete = tpflax.make_mesh(mixed)
    assert tpflax.make_mesh(concrete) is concrete
    assert tpflax.make_mesh(concrete, devices=jax.devices()[::-1]).axis_types == (E, A)
    assert tpflax.make_mesh(concrete, axis_types=(A, A)).axis_types == (A, A)
    with pytest.raises(tpflax.MeshError, match=r"one jax.sharding.AxisType per axis \(2\)"):
        tpflax.make_mesh(shape, axis_types=(E,))
    with pytest.raises(tpflax.MeshError, match="names: 'auto', 'explicit'"):
        tpflax.make_mesh(shape, axis_types=("explicit", "sideways"))
    with pytest.raises(tpflax.MeshError, match="explicit=True asks for every axis Explicit"):
        tpflax.make_mesh(shape, explicit=True, axis_types=(E, A))
