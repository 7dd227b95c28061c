"""plan(..., fused="aligned"): fused [q|k|v] kernels stored head-aligned, and tpflax's placement and IO.

The stored order (``Decision.layout``) puts rank r's share of every piece in rank r's contiguous
block; shard/init_sharded/restore give that order, unshard/save_checkpoint the model's.
"""

import json
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpflax
from tpflax._src.errors import OptionError
from tpflax._src.layout import Interleave, to_storage

D, H, K = 64, 8, 4  # width, query heads, GQA key/value heads
HD = D // H
MESH = {"data": 2, "model": 4}


class Block(nn.Module):
    """GPT-2's fused c_attn (nn.Dense(3d) + jnp.split), then a GQA fused [q|k|v] of unequal pieces, then an MLP."""

    @nn.compact
    def __call__(self, x):
        B, T, _ = x.shape
        q, k, v = jnp.split(nn.Dense(3 * D, name="c_attn")(x), 3, axis=-1)
        q, k, v = (t.reshape(B, T, H, HD) for t in (q, k, v))
        a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), -1)
        x = x + nn.Dense(D, name="c_proj")(jnp.einsum("bhts,bshd->bthd", a, v).reshape(B, T, D))
        q, k, v = jnp.split(nn.Dense((H + 2 * K) * HD, name="wqkv")(x), [H * HD, (H + K) * HD], axis=-1)
        q, k, v = q.reshape(B, T, K, H // K, HD), k.reshape(B, T, K, HD), v.reshape(B, T, K, HD)
        a = jax.nn.softmax(jnp.einsum("btkgd,bskd->bkgts", q, k), -1)
        x = x + nn.Dense(D, name="wo")(jnp.einsum("bkgts,bskd->btkgd", a, v).reshape(B, T, D))
        return x + nn.Dense(D, name="proj")(nn.gelu(nn.Dense(4 * D, name="fc")(x)))


MODEL = Block()
X = jnp.ones((2, 8, D))
QKV = Interleave(1, (D, D, D), 4)
GQA = Interleave(1, (H * HD, K * HD, K * HD), 4)
WANT = {"params/c_attn/kernel": QKV, "params/c_attn/bias": Interleave(0, QKV.pieces, 4),
        "params/wqkv/kernel": GQA, "params/wqkv/bias": Interleave(0, GQA.pieces, 4)}


@pytest.fixture(scope="module")
def plans():
    abstract = jax.eval_shape(MODEL.init, jax.random.key(0), X)
    return {mode: tpflax.plan(abstract, MESH, model=MODEL, sample=(X,), fused=mode) for mode in ("split", "aligned")}


@pytest.fixture(scope="module")
def host():
    return jax.tree_util.tree_map(np.asarray, jax.jit(MODEL.init)(jax.random.key(1), X))


@pytest.fixture(scope="module")
def mesh():
    return tpflax.make_mesh(MESH)


def _stored(tree):
    """The host tree with the laid-out leaves in stored order (what tpflax places)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    out = {}
    for path, x in flat:
        key = "/".join(str(getattr(k, "key", k)) for k in path)
        out[key] = to_storage(x, WANT[key]) if key in WANT else x
    return out


def _flat(tree):
    return {"/".join(str(getattr(k, "key", k)) for k in p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _same(got, want):
    got, want = _flat(got), _flat(want)
    assert got.keys() == want.keys()
    for k in got:
        assert got[k].dtype == want[k].dtype and np.array_equal(got[k], want[k]), k


def test_aligned_plan_sets_layouts_and_keeps_the_specs(plans):
    split, aligned = plans["split"], plans["aligned"]
    assert {p: d.spec for p, d in split.decisions.items()} == {p: d.spec for p, d in aligned.decisions.items()}
    assert {p: d.layout for p, d in aligned.decisions.items() if d.layout} == WANT
    assert not any(d.layout for d in split.decisions.values())
    assert "head-aligned: stored rank by rank" in aligned.decisions["params/wqkv/kernel"].reason
    assert "[16 | 8 | 8]" in aligned.decisions["params/wqkv/kernel"].reason
    assert "fused='aligned' would store it head-aligned" in split.decisions["params/c_attn/kernel"].reason
    assert aligned.options["fused"] == "aligned" and split.options["fused"] == "split"
    back = tpflax.Plan.from_json(aligned.to_json())
    assert {p: d.layout for p, d in back.decisions.items() if d.layout} == WANT
    assert json.loads(back.to_json())["options"]["fused"] == "aligned"
    with pytest.raises(OptionError, match="'split', 'aligned'"):
        tpflax.plan(jax.eval_shape(MODEL.init, jax.random.key(0), X), MESH, fused="heads")


@pytest.mark.parametrize("edit, words", [
    ({"ranks": 2}, "layout over 2 ranks but spec"),          # the spec splits the dim over 4
    ({"pieces": [32, 32, 32]}, "holds 96 but the leaf's shape"),
    ({"pieces": [-4, 36, 32]}, "positive pieces"),
])
def test_a_hand_edited_layout_is_refused_when_read(plans, edit, words):
    doc = json.loads(plans["aligned"].to_json())
    d = next(x for x in doc["decisions"] if x["path"] == "params/wqkv/kernel")
    d["layout"].update(edit)
    with pytest.raises(tpflax.PlanFormatError, match=re.escape(words)):
        tpflax.Plan.from_json(json.dumps(doc))


def test_pieces_that_do_not_divide_keep_the_naive_split():
    class MQA(nn.Module):  # one key/value head of 6: (48 | 6 | 6) over 4 ranks
        @nn.compact
        def __call__(self, x):
            B, T, d = x.shape
            q, k, v = jnp.split(nn.Dense(60, name="wqkv")(x), [48, 54], axis=-1)
            a = jax.nn.softmax(jnp.einsum("bthd,bsd->bhts", q.reshape(B, T, 8, 6), k), -1)
            return x + nn.Dense(d, name="wo")(jnp.einsum("bhts,bsd->bthd", a, v).reshape(B, T, 48))

    x = jnp.ones((2, 8, 48))
    p = tpflax.plan(jax.eval_shape(MQA().init, jax.random.key(0), x), MESH, model=MQA(), sample=(x,),
                    fused="aligned")
    d = p.decisions["params/wqkv/kernel"]
    assert d.spec == jax.sharding.PartitionSpec(None, "model") and d.layout is None
    assert "its pieces (48, 6, 6) do not divide by the 4 ranks" in d.reason
    assert not any(x.layout for x in p.decisions.values())


def _bloom_tree(layers=2):
    """The parameter tree of transformers' FlaxBloom blocks (width D): a fused query_key_value (D, 3D)."""
    f = jax.ShapeDtypeStruct
    block = {"input_layernorm": {"scale": f((D,), "float32"), "bias": f((D,), "float32")},
             "self_attention": {"query_key_value": {"kernel": f((D, 3 * D), "float32"), "bias": f((3 * D,), "float32")},
                                "dense": {"kernel": f((D, D), "float32"), "bias": f((D,), "float32")}},
             "post_attention_layernorm": {"scale": f((D,), "float32"), "bias": f((D,), "float32")},
             "mlp": {"dense_h_to_4h": {"kernel": f((D, 4 * D), "float32"), "bias": f((4 * D,), "float32")},
                     "dense_4h_to_h": {"kernel": f((4 * D, D), "float32"), "bias": f((D,), "float32")}}}
    return {"transformer": {"h": {str(i): block for i in range(layers)}}}


def test_tree_only_plans_leave_fused_kernels_in_the_models_order():
    # The tree sees 3 pieces side by side, not their order. BLOOM views the output (heads, 3, head_dim), so its
    # naive split is head-aligned already; stored rank by rank, the model's reshape cut it apart and the step
    # materialized it: benchmarks/results/fused_qkv.md measured 1.6x the naive split's collectives.
    tree, split = tpflax.plan(_bloom_tree(), MESH, fused="aligned"), tpflax.plan(_bloom_tree(), MESH)
    assert not any(d.layout for d in tree.decisions.values())
    assert {p: d.spec for p, d in tree.decisions.items()} == {p: d.spec for p, d in split.decisions.items()}
    d = tree.decisions["transformer/h/0/self_attention/query_key_value/kernel"]
    assert d.spec == jax.sharding.PartitionSpec(None, "model")
    assert "kept in the model's order, the tree does not show how the model cuts it" in d.reason


def test_shard_unshard_round_trip_and_rank_blocks(plans, host, mesh):
    plan = plans["aligned"]
    before = jax.tree_util.tree_map(np.copy, host)
    placed = tpflax.shard(host, plan, mesh)
    _same(host, before)  # the caller's tree is untouched
    _same(tpflax.unshard(placed, plan), host)
    _same(tpflax.unshard(placed), _stored(host))  # without the plan: as stored
    for name, lay in (("c_attn", QKV), ("wqkv", GQA)):
        w = host["params"][name]["kernel"]
        starts = np.cumsum((0,) + lay.pieces[:-1])
        for s in placed["params"][name]["kernel"].addressable_shards:
            r = s.index[1].start // (lay.size // 4)
            want = np.concatenate([w[:, a + r * n // 4:a + (r + 1) * n // 4]
                                   for a, n in zip(starts, lay.pieces, strict=True)], 1)
            assert np.array_equal(np.asarray(s.data), want)
    # a device array is reordered on device, bit-exact, and the caller's array is kept
    dev = jax.tree_util.tree_map(jnp.asarray, host)
    _same(tpflax.unshard(tpflax.shard(dev, plan, mesh), plan), host)
    _same(dev, host)


def test_init_sharded_is_the_stored_plain_init(plans, host, mesh):
    made = tpflax.init_sharded(MODEL.init, plans["aligned"], mesh, jax.random.key(1), X, chunk_bytes=None)
    assert made["params"]["c_attn"]["kernel"].sharding.spec == plans["aligned"].spec("params/c_attn/kernel")
    _same(tpflax.unshard(made), _stored(host))


def test_checkpoints_hold_the_model_order_across_plans(plans, host, mesh, tmp_path):
    split, aligned = plans["split"], plans["aligned"]
    path = tpflax.save_checkpoint(tmp_path / "a", tpflax.shard(host, aligned, mesh), plan=aligned)
    _same(tpflax.restore_checkpoint(path, split, mesh), host)  # model order on disk
    _same(tpflax.unshard(tpflax.restore_checkpoint(path)), host)
    back = tpflax.restore_checkpoint(path, aligned, mesh)
    _same(tpflax.unshard(back), _stored(host))
    _same(tpflax.unshard(back, aligned), host)
    from_split = tpflax.save_checkpoint(tmp_path / "s", tpflax.shard(host, split, mesh), plan=split)
    _same(tpflax.unshard(tpflax.restore_checkpoint(from_split, aligned, mesh)), _stored(host))
    conv = tpflax.convert_checkpoint(from_split, tmp_path / "c", aligned, mesh)
    _same(tpflax.unshard(tpflax.restore_checkpoint(conv)), host)
    # restored with explicit shardings (a TrainState's path): the plan given too puts them into its order
    by_shardings = tpflax.restore_checkpoint(path, aligned, like=host,
                                             shardings=tpflax.shardings(aligned, mesh, host))
    _same(tpflax.unshard(by_shardings), _stored(host))


def test_optimizer_state_in_the_model_order_is_stored_like_its_parameters(plans, host, mesh):
    plan = plans["aligned"]
    tx = optax.adam(1e-3)
    state = tx.init(host)
    state = (state[0]._replace(mu=host, nu=jax.tree_util.tree_map(lambda x: x * 2, host)),) + state[1:]
    placed = tpflax.shard_optimizer_state(tx, state, plan, mesh)  # order="model"
    _same(tpflax.unshard(placed[0].mu), _stored(host))
    _same(tpflax.unshard(placed, plan)[0].nu, state[0].nu)
    kept = tpflax.shard_optimizer_state(tx, state, plan, mesh, order="stored")
    _same(tpflax.unshard(kept[0].mu), host)
    with pytest.raises(OptionError, match="order="):
        tpflax.shard_optimizer_state(tx, state, plan, mesh, order="natural")
    from flax.training import train_state

    ts = train_state.TrainState.create(apply_fn=None, params=host, tx=tx).replace(opt_state=state)
    placed_ts = tpflax.shard_train_state(ts, plan, mesh)
    _same(tpflax.unshard(placed_ts.params), _stored(host))
    _same(tpflax.unshard(placed_ts.opt_state[0].mu), _stored(host))
    # initialised from parameters in the model's order: a copy of them (optax's lookahead-like states)
    copy = optax.GradientTransformation(lambda p: p, lambda u, s, p=None: (u, s))
    made = tpflax.shard_optimizer_state(copy, None, plan, mesh, params=host)
    _same({"params": tpflax.unshard(made)}, _stored(host))  # of the variables, their params collection


def _bits(tree):
    """Each leaf's dtype, shape and bytes: np.array_equal takes -0.0 for 0.0 and no NaN for itself."""
    return {k: (v.dtype, v.shape, v.tobytes()) for k, v in _flat(tree).items()}


def _signed(host):
    """``host`` with -0.0 and NaNs of two payloads all over each laid-out leaf, so they cross ranks."""
    out = jax.tree_util.tree_map(np.copy, host)
    nans = np.array([0x7FC01234, 0xFFC00ABC], np.uint32).view(np.float32)
    for name in ("c_attn", "wqkv"):
        for leaf in ("kernel", "bias"):
            x = out["params"][name][leaf].reshape(-1)  # a view of the fresh copy
            x[::3], x[1::7], x[2::11] = -0.0, nans[0], nans[1]
    return out


def test_signed_zeros_and_nan_payloads_are_moved_bit_exact(plans, host, mesh, tmp_path):
    # a jnp.take over the split fused dim was partitioned as masked shards summed by an all-reduce:
    # -0.0 + 0.0 came back +0.0 (every -0.0 of a saved or restored aligned bias was lost)
    plan, odd = plans["aligned"], _signed(host)
    path = tpflax.save_checkpoint(tmp_path / "a", tpflax.shard(odd, plan, mesh, check_finite=False), plan=plan)
    assert _bits(tpflax.restore_checkpoint(path)) == _bits(odd)
    assert _bits(tpflax.unshard(tpflax.restore_checkpoint(path, plan, mesh))) == _bits(_stored(odd))
    # already-sharded device arrays in the model's order are reordered where they are
    sharded = jax.device_put(odd, tpflax.shardings(plan, mesh, odd))
    tx = optax.adam(1e-3)
    state = tx.init(odd)
    state = (state[0]._replace(mu=sharded, nu=sharded),) + state[1:]
    assert _bits(tpflax.unshard(tpflax.shard_optimizer_state(tx, state, plan, mesh)[0].mu)) == _bits(_stored(odd))
    from flax.training import train_state

    ts = train_state.TrainState.create(apply_fn=None, params=sharded, tx=tx)
    assert _bits(tpflax.unshard(tpflax.shard_train_state(ts, plan, mesh).params)) == _bits(_stored(odd))
    copy = optax.GradientTransformation(lambda p: p, lambda u, s, p=None: (u, s))
    made = tpflax.shard_optimizer_state(copy, None, plan, mesh, params=sharded)
    assert _bits({"params": tpflax.unshard(made)}) == _bits(_stored(odd))


def test_the_reorder_of_a_split_fused_dim_compiles_to_data_movement(mesh):
    from tpflax._src.apply.permute import program

    s = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data", "model"))
    for index in (GQA.order(), GQA.inverse()):
        hlo = program(index.astype(np.int64).tobytes(), 1, s).lower(
            jax.ShapeDtypeStruct((D, GQA.size), jnp.float32, sharding=s)).compile().as_text()
        assert "all-to-all" in hlo and "all-reduce" not in hlo
        assert not re.findall(r"= f32\[[^\]]*\]\S* (add|subtract|multiply|select|maximum|minimum)\(", hlo)


def test_estimate_prices_no_fused_reshard_when_aligned(plans):
    est = {m: tpflax.estimate(p, model=MODEL, sample=(X,), backend="cpu") for m, p in plans.items()}
    fused = {m: [i for i in e.items if i.why.startswith("fused")] for m, e in est.items()}
    assert {i.source for i in fused["split"]} == {"params/c_attn/kernel", "params/wqkv/kernel"}
    assert fused["aligned"] == []
    rest = {m: sorted((i.kind, i.size, i.why) for i in e.items if not i.why.startswith("fused")) for m, e in est.items()}
    assert rest["split"] == rest["aligned"]


USERPKG = """
import jax, jax.numpy as jnp

S = jax.ShapeDtypeStruct


def fn(v, x):
    q, k, w = jnp.split(x @ v["qkv"], 3, axis=-1)
    return x + (q * k + w) @ v["proj"]


def make():
    return fn, {"qkv": S((64, 192), jnp.float32), "proj": S((64, 64), jnp.float32)}, S((8, 16, 64), jnp.float32)
"""


def test_cli_plans_with_fused_aligned(tmp_path, monkeypatch, capsys):
    from tpflax._src.cli import main

    (tmp_path / "userpkg_fused.py").write_text(USERPKG)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["plan", "userpkg_fused:make", "--mesh", "model=4", "--trace", "--fused", "aligned", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"]["fused"] == "aligned"
    assert {d["path"]: d.get("layout") for d in out["decisions"]}["qkv"] == {"dim": 1, "pieces": [64] * 3, "ranks": 4}


def _nnx_attn():
    from flax import nnx

    class Attn(nnx.Module):
        def __init__(self, rngs):
            self.qkv, self.out = nnx.Linear(D, 3 * D, rngs=rngs), nnx.Linear(D, D, rngs=rngs)

        def __call__(self, x):
            B, T, _ = x.shape
            q, k, v = (t.reshape(B, T, H, HD) for t in jnp.split(self.qkv(x), 3, axis=-1))
            a = jax.nn.softmax(jnp.einsum("bthd,bshd->bhts", q, k), -1)
            return self.out(jnp.einsum("bhts,bshd->bthd", a, v).reshape(B, T, D))

    return Attn(nnx.Rngs(0))


def test_nnx_module_is_placed_stored_and_unsharded_back(mesh):
    from flax import nnx

    m = _nnx_attn()
    plan = tpflax.plan(nnx.state(m), MESH, model=m, sample=(X,), fused="aligned")
    assert plan.decisions["qkv/kernel"].layout == QKV and plan.decisions["qkv/bias"].layout.dim == 0
    host = tpflax.unshard(m)
    placed = tpflax.shard(m, plan, mesh)
    assert np.array_equal(np.asarray(placed.qkv.kernel.get_value()), to_storage(host["qkv"]["kernel"].get_value(), QKV))
    back = tpflax.unshard(placed, plan)
    assert all(np.array_equal(np.asarray(back[n][w].get_value()), np.asarray(host[n][w].get_value()))
               for n in ("qkv", "out") for w in ("kernel", "bias"))


def test_nnx_optimizer_made_from_placed_params_is_kept_with_order_stored(mesh):
    from flax import nnx

    m = _nnx_attn()
    plan = tpflax.plan(nnx.state(m), MESH, model=m, sample=(X,), fused="aligned")
    assert plan.decisions["qkv/kernel"].layout == QKV
    placed = tpflax.shard(m, plan, mesh)
    opt = nnx.Optimizer(placed, optax.adam(1e-3), wrt=nnx.Param)
    opt.update(placed, nnx.state(placed, nnx.Param))  # moments of the stored kernel, in stored order
    got = tpflax.shard_optimizer_state(opt, None, plan, mesh, order="stored")
    for a, b in zip(jax.tree_util.tree_leaves(tpflax.unshard(opt)), jax.tree_util.tree_leaves(tpflax.unshard(got)),
                    strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_nnx_model_and_optimizer_of_a_placed_model_keeps_its_weights_by_default(mesh):
    """Regression: the README's NNX recipe, ``shard_optimizer_state(nnx.ModelAndOptimizer(tpflax.shard(model,
    plan, mesh), tx), None, plan, mesh)``, put the already-stored model into the stored order a second time
    (the default order was "model"): its fused kernel came back scrambled without a word. The placed arrays
    are now known as stored, so the default keeps them; order="model" for them is refused."""
    from flax import nnx

    m = _nnx_attn()
    plan = tpflax.plan(nnx.state(m), MESH, model=m, sample=(X,), fused="aligned")
    host = tpflax.unshard(m)
    placed = tpflax.shard(m, plan, mesh)
    got = tpflax.shard_optimizer_state(nnx.ModelAndOptimizer(placed, optax.adam(1e-3), wrt=nnx.Param),
                                       None, plan, mesh)
    back = tpflax.unshard(got.model, plan)
    assert all(np.asarray(back[n][w].get_value()).tobytes() == np.asarray(host[n][w].get_value()).tobytes()
               for n in ("qkv", "out") for w in ("kernel", "bias"))
    with pytest.raises(OptionError, match=r"already put into the plan's stored order(.|\n)*qkv/kernel"):
        tpflax.shard_optimizer_state(nnx.ModelAndOptimizer(placed, optax.adam(1e-3), wrt=nnx.Param),
                                     None, plan, mesh, order="model")
    # a flax TrainState of tpflax-placed params
    from flax.training import train_state

    params = tpflax.shard(host, plan, mesh)
    ts = tpflax.shard_train_state(train_state.TrainState.create(apply_fn=None, params=params,
                                                                tx=optax.adam(1e-3)), plan, mesh)
    assert np.asarray(tpflax.unshard(ts.params, plan)["qkv"]["kernel"].get_value()).tobytes() == \
        np.asarray(host["qkv"]["kernel"].get_value()).tobytes()


def test_placing_an_already_stored_tree_again_does_not_reorder_it(plans, host, mesh):
    """Regression: ``tpflax.shard`` of a tree tpflax had already put into the stored order (the output of
    ``shard``, ``init_sharded``) put it into that order a second time: its fused kernels came back scrambled
    (unshard(..., plan) no longer gave the model's weights). Arrays known as stored are now taken from their
    order: placed again on the aligned plan they stay, bit for bit; on a plan without the layout (``"split"``)
    they come back in the model's order."""
    plan, odd = plans["aligned"], _signed(host)
    placed = tpflax.shard(odd, plan, mesh, check_finite=False)
    again = tpflax.shard(placed, plan, mesh, check_finite=False)
    assert _bits(tpflax.unshard(again)) == _bits(_stored(odd))
    assert _bits(tpflax.unshard(tpflax.shard(again, plan, mesh, check_finite=False), plan)) == _bits(odd)
    assert _bits(tpflax.unshard(tpflax.shard(placed, plans["split"], mesh, check_finite=False))) == _bits(odd)
    assert _bits(tpflax.unshard(placed)) == _bits(_stored(odd))  # the input is kept
    made = tpflax.init_sharded(MODEL.init, plan, mesh, jax.random.key(1), X)
    assert _bits(tpflax.unshard(tpflax.shard(made, plan, mesh), plan)) == _bits(host)
    from flax import nnx

    m = _nnx_attn()
    nplan = tpflax.plan(nnx.state(m), MESH, model=m, sample=(X,), fused="aligned")
    twice = tpflax.shard(tpflax.shard(m, nplan, mesh), nplan, mesh)
    assert _bits(tpflax.unshard(twice, nplan)) == _bits(tpflax.unshard(m))


def test_report_refuses_the_split_plans_estimate_under_the_aligned_plan(plans):
    # the two plans have the same specs, so an estimate of one passed under the other, though they price other
    # collectives (the split plan's fused kernels are resharded, 90.2 KiB a step against 78.1 KiB here)
    est = {mode: tpflax.estimate(p, optax.adam(1e-3), (X,), model=MODEL) for mode, p in plans.items()}
    assert est["split"].comm_total > est["aligned"].comm_total
    with pytest.raises(tpflax.PlanMismatchError, match="made for another plan") as e:
        tpflax.report(plans["aligned"], est["split"])
    assert any(p.startswith("params/c_attn/kernel: float32[64, 192] P(None, 'model') stored Interleave(") and
               p.endswith("priced as float32[64, 192] P(None, 'model')") for p in e.value.problems), e.value.problems
    assert "estimate per training step" in tpflax.report(plans["aligned"], est["aligned"])
