"""Property tests: every plan tpflax emits is valid and deterministic, every
placement loses nothing, and the estimate counts what the devices really hold.

Random parameter trees (nested dicts and lists; 0-D to 5-D leaves; prime,
power-of-two and awkward sizes; several dtypes; boxed and unboxed leaves) on
random meshes of 1 to 4 axes (sizes 1..16, up to 2048 devices, abstract):

(a) every spec is valid; (b) planning is deterministic and free of dict order;
JSON round-trips; and, on meshes that fit the 8 emulated CPU devices, with
small concrete leaves (float32, bf16, fp16, fp8, int8, uint8, bool, typed PRNG
keys; random bit patterns, so NaN and inf too) and random forced specs:
(c) shard -> unshard is bit-exact (and NaN/inf warn); (d) the bytes the
estimate puts on the fullest device equal the bytes the placed arrays hold on
the fullest device, for parameters and optimizer state.

CI runs 200 examples per property (the "ci" profile in conftest.py). For a long
local run: ``python -m pytest tests/test_properties.py --hypothesis-profile=thorough``
(2000 examples each), or ``HYPOTHESIS_PROFILE=thorough python -m pytest ...``.
"""

from __future__ import annotations

import functools
import math
import re
import warnings

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from hypothesis import example, given
from hypothesis import strategies as st
from jax.sharding import PartitionSpec

import tpflax
from tpflax._src.planner.params import trainable
from tpflax._src.specs import entries, entry_axes, spec_problems

SIZES = st.sampled_from([1, 2, 3, 4, 5, 7, 8, 12, 13, 16, 24, 31, 32, 48, 64, 96, 97, 128, 250, 256,
                         384, 1000, 1024, 4096])
DTYPES = st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16, jnp.int8, jnp.bool_])
NAMES = st.sampled_from(["kernel", "bias", "scale", "embedding", "w", "wi", "wo", "mlp", "up", "down",
                         "up_proj", "down_proj", "gate_proj", "attn", "q_proj", "k_proj", "v_proj",
                         "o_proj", "query", "key", "value", "out", "norm", "ln_1", "layers", "conv1",
                         "conv2", "moe", "router", "head", "lm_head", "x", "layer_0", "layer_1"])
AXIS_NAMES = ["data", "fsdp", "model", "expert", "tp", "dp"]


@st.composite
def leaves(draw):
    shape = tuple(draw(st.lists(SIZES, min_size=0, max_size=5)))
    leaf = jax.ShapeDtypeStruct(shape, draw(DTYPES))
    if shape and draw(st.integers(0, 9)) == 0:  # boxed in flax metadata, sometimes
        names = tuple(draw(st.sampled_from([None, "model", "fsdp", "data", "nope"])) for _ in shape)
        if draw(st.booleans()):
            return nn.Partitioned(leaf, names=names)
        logical = tuple(draw(st.sampled_from([None, "embed", "mlp", "heads", "vocab", "kv"]))
                        for _ in shape)
        return nn.LogicallyPartitioned(leaf, names=logical)
    return leaf


trees = st.recursive(
    leaves(),
    lambda children: st.one_of(
        st.dictionaries(NAMES, children, min_size=1, max_size=5),
        st.lists(children, min_size=1, max_size=3)),
    max_leaves=24)


@st.composite
def meshes(draw):
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(AXIS_NAMES), min_size=n, max_size=n, unique=True))
    sizes = [draw(st.integers(1, 16)) for _ in names]
    while math.prod(sizes) > 2048:
        sizes[sizes.index(max(sizes))] //= 2
    return dict(zip(names, sizes, strict=True))


def _has_leaves(tree) -> bool:
    return bool(jax.tree_util.tree_leaves(tree, is_leaf=tpflax._src.facts.tree.is_box))


@given(tree=trees, mesh=meshes(), fsdp_min=st.sampled_from([0, 1024, 1 << 18]))
def test_every_spec_is_valid(tree, mesh, fsdp_min):
    if not _has_leaves(tree):
        return
    p = tpflax.plan(tree, mesh, fsdp_min_bytes=fsdp_min)
    leaves_, _ = tpflax._src.facts.tree.walk(tree)
    assert set(p.decisions) == {leaf.path for leaf in leaves_}
    sizes = p.mesh.sizes
    for path, d in p.decisions.items():
        spec = entries(d.spec)
        assert len(spec) <= len(d.shape), path
        assert not spec_problems(path, d.shape, spec, p.mesh), path
        used = [a for e in spec for a in entry_axes(e)]
        assert len(used) == len(set(used)), path
        for dim, e in enumerate(spec):
            n = math.prod(sizes[a] for a in entry_axes(e))
            assert d.shape[dim] % n == 0, path
        assert d.reason, path
        assert d.bytes_per_device * math.prod(
            math.prod(sizes[a] for a in entry_axes(e)) for e in spec) == d.bytes


@given(tree=trees, mesh=meshes())
def test_plan_is_deterministic_and_order_free(tree, mesh):
    if not _has_leaves(tree):
        return
    a = tpflax.plan(tree, mesh)
    b = tpflax.plan(tree, mesh)
    assert a.to_json() == b.to_json()
    c = tpflax.plan(_reverse_dicts(tree), mesh)
    assert {k: v.spec for k, v in c.decisions.items()} == {k: v.spec for k, v in a.decisions.items()}
    assert {k: v.reason for k, v in c.decisions.items()} == {k: v.reason for k, v in a.decisions.items()}


def _reverse_dicts(tree):
    if isinstance(tree, dict):
        return {k: _reverse_dicts(tree[k]) for k in reversed(list(tree))}
    if isinstance(tree, list):
        return [_reverse_dicts(x) for x in tree]
    return tree


@given(tree=trees, mesh=meshes())
# found by hypothesis on a clean machine: a candidate with no collectives priced its comm as int 0,
# which came back from JSON as 0.0 and re-serialised differently
@example(tree={"kernel": {"head": jax.ShapeDtypeStruct((2, 2), jnp.float32)}}, mesh={"model": 2})
def test_json_round_trips(tree, mesh):
    if not _has_leaves(tree):
        return
    p = tpflax.plan(tree, mesh)
    q = tpflax.Plan.from_json(p.to_json())
    assert q.decisions == p.decisions and q.to_json() == p.to_json()


# ---------------------------------------------------------------------------
# (c) and (d): concrete arrays on meshes that fit 8 emulated devices

SMALL_SIZES = st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
SMALL_DTYPES = st.sampled_from([np.float32, jnp.bfloat16, np.float16, ml_dtypes.float8_e4m3fn,
                                ml_dtypes.float8_e5m2, np.int8, np.uint8, np.bool_, "key"])
MAX_ELEMENTS = 512  # tiny leaves: the property is about layouts, not bandwidth


def _values(shape, dtype, seed):
    """Random bit patterns of ``dtype`` (NaN/inf included for floats), or typed PRNG keys."""
    rng = np.random.default_rng(seed)
    if dtype == "key":
        return jax.random.split(jax.random.key(seed), math.prod(shape)).reshape(shape)
    if dtype is np.bool_:
        return rng.integers(0, 2, size=shape).astype(np.bool_)
    dt = np.dtype(dtype)
    raw = rng.integers(0, 256, size=math.prod(shape) * dt.itemsize, dtype=np.uint8)
    return raw.view(dt).reshape(shape)


@st.composite
def small_leaves(draw):
    shape = list(draw(st.lists(SMALL_SIZES, min_size=0, max_size=5)))
    while math.prod(shape) > MAX_ELEMENTS:
        shape[shape.index(max(shape))] //= 2
    dtype = draw(SMALL_DTYPES)
    if dtype == "key":
        shape = shape[:2]
    value = _values(tuple(shape), dtype, draw(st.integers(0, 2**31 - 1)))
    if dtype != "key" and draw(st.integers(0, 4)) == 0:
        value = jnp.asarray(value)  # a jax array on one device, not only host numpy
    if shape and dtype != "key" and draw(st.integers(0, 7)) == 0:  # boxed in flax metadata
        names = tuple(draw(st.sampled_from([None, "model", "data", "fsdp", "nope"])) for _ in shape)
        return nn.Partitioned(value, names=names)
    return value


small_trees = st.recursive(
    small_leaves(),
    lambda children: st.one_of(
        st.dictionaries(NAMES, children, min_size=1, max_size=4),
        st.lists(children, min_size=1, max_size=3)),
    max_leaves=10)


@st.composite
def device_meshes(draw):
    """1 to 4 axes whose product fits the 8 emulated devices."""
    n = draw(st.integers(1, 4))
    names = draw(st.lists(st.sampled_from(AXIS_NAMES), min_size=n, max_size=n, unique=True))
    sizes, used = [], 1
    for _ in names:
        size = draw(st.sampled_from([s for s in (1, 2, 3, 4, 8) if used * s <= 8]))
        sizes.append(size)
        used *= size
    return tuple(zip(names, sizes, strict=True))


@functools.cache
def _mesh(axes):
    return tpflax.make_mesh(dict(axes))  # one Mesh per shape: placement caches key on it


def _random_spec(data, shape, sizes):
    """A random valid spec: each dim unsharded, or split over unused axes whose product divides it."""
    free = list(sizes)
    spec = []
    for dim in shape:
        fits = [a for a in free if sizes[a] > 1 and dim % sizes[a] == 0]
        choice = data.draw(st.sampled_from([None, *fits, *([tuple(fits[:2])] if len(fits) > 1 else [])]))
        if isinstance(choice, tuple) and dim % (sizes[choice[0]] * sizes[choice[1]]):
            choice = choice[0]
        spec.append(choice)
        free = [a for a in free if a not in entry_axes(choice)]
    return PartitionSpec(*spec)


def _plan_with_random_rules(data, tree, axes):
    sizes = dict(axes)
    rules = []
    for leaf in tpflax._src.facts.tree.walk(tree)[0]:
        if data.draw(st.integers(0, 2)) == 0:
            rules.append(("^" + re.escape(leaf.path) + "$", _random_spec(data, leaf.shape, sizes)))
    return tpflax.plan(tree, sizes, rules=rules,
                       fsdp_min_bytes=data.draw(st.sampled_from([0, 64, 1 << 18])))


def _bits(x):
    """A leaf's exact bytes (typed PRNG keys by their key data)."""
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
        x = jax.random.key_data(x)
    return np.asarray(x).tobytes()


def _nonfinite(x) -> bool:
    dtype = getattr(x, "dtype", None)
    if dtype is None or not jax.dtypes.issubdtype(dtype, np.inexact):
        return False
    with np.errstate(invalid="ignore"):
        return not np.isfinite(np.asarray(x)).all()


@given(tree=small_trees, axes=device_meshes(), data=st.data())
def test_shard_then_gather_is_bit_exact(tree, axes, data):
    boxed = jax.tree_util.tree_leaves(tree, is_leaf=tpflax._src.facts.tree.is_box)
    if not boxed:
        return
    mesh = _mesh(axes)
    p = _plan_with_random_rules(data, tree, axes)
    values = [tpflax._src.facts.tree.unbox(b) for b in boxed]
    before = [_bits(v) for v in values]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        placed = tpflax.shard(tree, p, mesh, per_shard=data.draw(st.booleans()))
    nan_warnings = [w for w in caught if issubclass(w.category, tpflax.TpflaxWarning)]
    assert bool(nan_warnings) == any(_nonfinite(v) for v in values)

    assert jax.tree_util.tree_structure(placed) == jax.tree_util.tree_structure(tree)
    leaves = tpflax._src.facts.tree.walk(tree)[0]
    out = [tpflax._src.facts.tree.unbox(b) for b in jax.tree_util.tree_leaves(placed, is_leaf=tpflax._src.facts.tree.is_box)]
    for leaf, x in zip(leaves, out, strict=True):
        assert isinstance(x, jax.Array) and x.sharding.mesh == mesh, leaf.path
        assert entries(x.sharding.spec, x.ndim) == entries(p.decisions[leaf.path].spec, x.ndim), leaf.path

    gathered = tpflax.unshard(placed)
    back = [tpflax._src.facts.tree.unbox(b) for b in jax.tree_util.tree_leaves(gathered, is_leaf=tpflax._src.facts.tree.is_box)]
    for leaf, v, g, b in zip(leaves, values, back, before, strict=True):
        assert np.shape(g) == np.shape(v) and g.dtype == v.dtype, leaf.path
        assert _bits(g) == b, leaf.path
        assert _bits(v) == b, leaf.path  # the caller's arrays are untouched
        if isinstance(v, jax.Array):
            assert not v.is_deleted(), leaf.path


def _fullest_device_bytes(tree) -> int:
    per_device: dict = {}
    for x in jax.tree_util.tree_leaves(tree):
        for s in x.addressable_shards:
            per_device[s.device] = per_device.get(s.device, 0) + s.data.nbytes
    return max(per_device.values(), default=0)


OPTIMIZERS = {"none": None, "sgd+momentum": optax.sgd(0.1, momentum=0.9), "adam": optax.adam(1e-3),
              "adafactor": optax.adafactor(1e-3, min_dim_size_to_factor=4)}


@given(tree=small_trees, axes=device_meshes(), opt=st.sampled_from(sorted(OPTIMIZERS)), data=st.data())
def test_estimated_bytes_equal_bytes_on_the_fullest_device(tree, axes, opt, data):
    if not jax.tree_util.tree_leaves(tree, is_leaf=tpflax._src.facts.tree.is_box):
        return
    mesh = _mesh(axes)
    p = _plan_with_random_rules(data, tree, axes)
    optimizer = OPTIMIZERS[opt]
    est = tpflax.estimate(p, optimizer, {"x": (mesh.devices.size * 2, 4)})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", tpflax.TpflaxWarning)
        placed = tpflax.shard(tree, p, mesh)
    assert _fullest_device_bytes(placed) == p.bytes_per_device
    assert est.per_device.params + est.per_device.model_state == p.bytes_per_device
    if optimizer is None:
        return
    params = tpflax._src.facts.tree.unboxed(tree)
    if any(jax.dtypes.issubdtype(getattr(x, "dtype", np.float32), jax.dtypes.prng_key)
           for x in jax.tree_util.tree_leaves(params)):
        return  # optax cannot build moments of PRNG keys
    # the state of the float leaves, as tpflax's step makes it (integer leaves are not trained)
    params = trainable(params)[0]
    state = jax.tree_util.tree_map(lambda s: np.zeros(s.shape, s.dtype),
                                   jax.eval_shape(optimizer.init, params))
    placed_state = tpflax.shard_optimizer_state(optimizer, state, p, mesh, params=params)
    assert _fullest_device_bytes(placed_state) == est.per_device.opt_state


# ---------------------------------------------------------------------------
# scale without devices: a 2048-chip abstract mesh (timings: benchmarks/scale.py)

POD = {"data": 16, "fsdp": 16, "model": 8}


def _decoder(n_layers: int) -> dict:
    S, bf = jax.ShapeDtypeStruct, "bfloat16"
    d, h, hd, f = 1024, 16, 64, 4096
    return {"params": {f"layers_{i}": {
        "attention_norm": {"scale": S((d,), bf)}, "ffn_norm": {"scale": S((d,), bf)},
        "attn": {"q_proj": {"kernel": S((d, h, hd), bf)}, "k_proj": {"kernel": S((d, h, hd), bf)},
                 "v_proj": {"kernel": S((d, h, hd), bf)}, "o_proj": {"kernel": S((h, hd, d), bf)}},
        "mlp": {"gate_proj": {"kernel": S((d, f), bf)}, "up_proj": {"kernel": S((d, f), bf)},
                "down_proj": {"kernel": S((f, d), bf), "bias": S((d,), bf)}}} for i in range(n_layers)}}


def test_20k_leaves_plan_on_2048_abstract_devices():
    # 20k leaves (about 4 s on 2 cores; the chooser prices every group): the checks below are per
    # leaf and per layer, so a larger tree adds time, not coverage. Planning time at 1k-100k leaves
    # is benchmarks/scale.py's job (benchmarks/results/scale.md).
    tree = _decoder(2_000)
    p = tpflax.plan(tree, POD)
    assert len(p.decisions) == 20_000
    by_unit, valid = {}, set()
    for path, d in p.decisions.items():
        # spec_problems reads the path only for its messages: one check per distinct (shape, spec)
        if (d.shape, d.spec) not in valid:
            assert not spec_problems(path, d.shape, entries(d.spec), p.mesh), path
            valid.add((d.shape, d.spec))
        by_unit.setdefault(path.split("/", 2)[2], set()).add((d.spec, d.label))
    assert all(len(v) == 1 for v in by_unit.values())  # every layer planned alike
    assert by_unit["mlp/up_proj/kernel"] == {(PartitionSpec("fsdp", "model"), "column+fsdp")}
    assert p.bytes_per_device * 64 < p.total_bytes
    assert tpflax.report(p).count("\n") < 200  # alike layers share a row (full=True: one per leaf)


def test_405b_decoder_plan_estimate_report_on_2048_abstract_devices():
    from tpflax import zoo

    m = zoo.get("llama-405b")
    assert m.config.n_layers == 126
    p = tpflax.plan(m.abstract_variables(), POD)
    est = tpflax.estimate(p, optax.adamw(1e-3), {"x": (512, m.config.seq_len)}, config=m.config)
    assert est.unsharded.params > 400e9 * 4  # ~405B float32 parameters on one device
    assert est.per_device.params * 128 <= est.unsharded.params * 1.01  # split over fsdp*model = 128
    weights = est.per_device.params + est.per_device.grads + est.per_device.opt_state
    assert weights < 64 * 2**30  # params, grads and adamw moments fit one accelerator
    text = tpflax.report(p, est)
    assert "savings per device" in text and "all-gather" in text


# ---------------------------------------------------------------------------
# pairing direction: never row -> column for an MLP block, whatever its names

UP_NAMES = st.sampled_from(["up", "fc1", "wi", "c_fc", "dense_0", "x", "layer_3", "proj_a"])
DOWN_NAMES = st.sampled_from(["down", "fc2", "wo", "c_proj", "dense_1", "y", "layer_4", "proj_b"])


@given(d=st.sampled_from([64, 96, 128, 512, 768]), mult=st.sampled_from([2, 3, 4, 8]),
       up=UP_NAMES, down=DOWN_NAMES, blocks=st.integers(1, 3), t=st.sampled_from([2, 4, 8]),
       fsdp=st.sampled_from([1, 2]))
def test_mlp_blocks_pair_column_then_row(d, mult, up, down, blocks, t, fsdp):
    f = d * mult
    tree = {"embed": {"embedding": jax.ShapeDtypeStruct((1000, d), jnp.float32)}}
    for i in range(blocks):
        tree[f"block_{i}"] = {
            "ln_1": {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)},
            "ln_2": {"scale": jax.ShapeDtypeStruct((d,), jnp.float32)},
            "mlp": {up: {"kernel": jax.ShapeDtypeStruct((d, f), jnp.float32)},
                    down: {"kernel": jax.ShapeDtypeStruct((f, d), jnp.float32)}}}
    mesh = {"fsdp": fsdp, "model": t} if fsdp > 1 else {"model": t}
    p = tpflax.plan(tree, mesh, fsdp_min_bytes=0)
    for i in range(blocks):
        u = p.decisions[f"block_{i}/mlp/{up}/kernel"]
        w = p.decisions[f"block_{i}/mlp/{down}/kernel"]
        assert tuple(u.spec)[1] == "model" and tuple(u.spec)[0] != "model", (u.spec, u.reason)
        assert tuple(w.spec)[0] == "model" and tuple(w.spec)[1] != "model", (w.spec, w.reason)
        assert u.pair == w.pair is not None
