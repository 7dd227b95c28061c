"""Checkpoints: sharded save, restore onto other meshes bit-exact, conversion, atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from _util import assert_bit_exact, nnx_mlp, zoo_init
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo

WORKER = Path(__file__).with_name("_ckpt_kill_worker.py")


@pytest.fixture(scope="module")
def host_tree():
    """A tiny Llama's variables plus leaves of every narrow dtype, on the host."""
    v = zoo_init("llama")  # any values do: what is saved must come back bit-exact
    f = np.random.default_rng(0).standard_normal((16, 32)).astype(np.float32)
    v["extra"] = {"bf16": f.astype(ml_dtypes.bfloat16), "f16": f.astype(np.float16),
                  "i8": (f * 20).astype(np.int8), "e4m3": f.astype(ml_dtypes.float8_e4m3fn)}
    return v


RULES = [(r"extra/(bf16|i8)", P(None, "model")), (r"extra/(f16|e4m3)", P("model", None))]


def test_restore_onto_other_meshes_bit_exact(host_tree, tmp_path):
    plan_a = tpflax.plan(host_tree, {"data": 2, "model": 4}, rules=RULES)
    mesh_a = tpflax.make_mesh({"data": 2, "model": 4})
    sharded = tpflax.shard(host_tree, plan_a, mesh_a)
    path = tpflax.save_checkpoint(tmp_path / "a", sharded, plan=plan_a)
    assert (path / "tpflax.json").exists()

    plan_b = tpflax.plan(host_tree, {"model": 8}, rules=RULES)
    mesh_b = tpflax.make_mesh({"model": 8})
    on_b = tpflax.restore_checkpoint(path, plan_b, mesh_b)
    for key, d in plan_b.decisions.items():
        node = on_b
        for part in key.split("/"):
            node = node[part]
        assert node.sharding.spec == d.spec and node.sharding.mesh == mesh_b, key
    assert any(e is not None for d in plan_b.decisions.values() for e in d.spec)
    assert_bit_exact(tpflax.unshard(on_b), host_tree)

    # {model: 8} -> save -> one device.
    path_b = tpflax.save_checkpoint(tmp_path / "b", on_b)
    one = tpflax.restore_checkpoint(path_b)
    assert all(x.sharding.num_devices == 1 for x in jax.tree_util.tree_leaves(one))
    assert_bit_exact(one, host_tree)
    # like= gives the caller's structure back.
    like = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), host_tree)
    assert jax.tree_util.tree_structure(tpflax.restore_checkpoint(path_b, like=like)) == \
        jax.tree_util.tree_structure(host_tree)


def test_unsharded_checkpoint_converts_into_plan_layout(host_tree, tmp_path):
    src = tpflax.save_checkpoint(tmp_path / "plain", host_tree)  # numpy: no sharding at all
    stored = tpflax.checkpoint_tree(src)
    assert stored["params"]["embed"]["embedding"].shape == (256, 64)
    plan = tpflax.plan(host_tree, {"fsdp": 2, "model": 4}, rules=RULES, fsdp_min_bytes=0)
    mesh = tpflax.make_mesh({"fsdp": 2, "model": 4})
    dst = tpflax.convert_checkpoint(src, tmp_path / "sharded", plan, mesh)
    back = tpflax.restore_checkpoint(dst, plan, mesh)
    emb = back["params"]["embed"]["embedding"]
    assert emb.sharding.spec == plan.decisions["params/embed/embedding"].spec
    # Each device holds only its slice: no full copy was assembled on one device.
    assert all(s.data.size < emb.size for s in emb.addressable_shards)
    assert_bit_exact(tpflax.unshard(back), host_tree)


def test_nnx_state_round_trip(tmp_path):
    m = zoo.get("nnx-mlp")
    state = m.init(0)
    plan = tpflax.plan(state, {"model": 8})
    mesh = tpflax.make_mesh({"model": 8})
    path = tpflax.save_checkpoint(tmp_path / "nnx", tpflax.shard(state, plan, mesh))
    back = tpflax.restore_checkpoint(path, plan, mesh, like=m.abstract_variables())
    assert isinstance(back, nnx.State)
    assert back["blocks"][0]["up"]["kernel"].get_value().sharding.spec == \
        plan.decisions["blocks/0/up/kernel"].spec
    assert_bit_exact(tpflax.unshard(back), jax.device_get(state))


def test_an_nnx_module_and_optimizer_are_saved_as_their_state(tmp_path):
    """Regression: save_checkpoint(path, module) wrote flax's own ``_pytree__state`` fields as leaves, so
    restoring with like=nnx.state(module), the usual NNX restore, failed on orbax's structure mismatch."""
    import optax

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    model = Net(nnx.Rngs(0))
    plan = tpflax.plan(nnx.state(model), {"data": 2, "model": 4})
    placed = tpflax.shard(model, plan, mesh)
    path = tpflax.save_checkpoint(tmp_path / "m", placed, plan=plan)
    assert set(tpflax.checkpoint_tree(path)) == {"up", "down"}
    back = tpflax.restore_checkpoint(path, plan, mesh, like=nnx.state(placed))
    assert isinstance(back, nnx.State) and back["up"]["kernel"].get_value().sharding.spec == plan.spec("up/kernel")
    assert_bit_exact(tpflax.unshard(back), jax.device_get(nnx.state(model)))
    opt = nnx.Optimizer(placed, optax.adam(1e-3), wrt=nnx.Param)
    opath = tpflax.save_checkpoint(tmp_path / "o", opt)
    assert "_pytree__state" not in str(tpflax.checkpoint_tree(opath))
    restored = tpflax.restore_checkpoint(opath, like=nnx.state(opt))
    assert_bit_exact(tpflax.unshard(restored), tpflax.unshard(nnx.state(opt)))


def test_restore_like_an_nnx_module_gives_a_new_module_holding_the_checkpoint(tmp_path):
    """Regression: ``restore_checkpoint(path, plan, mesh, like=module)`` (a module, concrete or from
    ``nnx.eval_shape``, or an ``nnx.Optimizer``) failed with orbax's structure mismatch on flax's own
    ``_pytree__state`` fields, wrapped as a CheckpointError. It now restores the object's state and
    merges it into a new object of that structure, as ``tpflax.shard(module, ...)`` gives one; the
    object passed is left as it was."""
    import optax

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up, self.drop = nnx.Linear(16, 64, rngs=rngs), nnx.Dropout(0.1, rngs=rngs)
            self.down = nnx.Linear(64, 16, rngs=rngs)

        def __call__(self, x):
            return self.down(self.drop(nnx.relu(self.up(x))))

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    model, other = Net(nnx.Rngs(0, dropout=1)), Net(nnx.Rngs(5, dropout=7))
    plan = tpflax.plan(nnx.state(model), {"data": 2, "model": 4})
    path = tpflax.save_checkpoint(tmp_path / "m", model)
    keys = lambda t: jax.tree_util.tree_map(_key_data_or_value, tpflax.unshard(t))  # noqa: E731
    before = keys(other)
    for like in (other, nnx.eval_shape(lambda: Net(nnx.Rngs(0, dropout=1)))):
        back = tpflax.restore_checkpoint(path, plan, mesh, like=like)
        assert isinstance(back, Net) and back is not like
        assert back.up.kernel.get_value().sharding.spec == plan.spec("up/kernel")
        assert_bit_exact(keys(back), keys(model))
        back(np.ones((2, 16), np.float32))  # a usable module
    assert_bit_exact(keys(other), before)  # like= is not written
    assert isinstance(tpflax.restore_checkpoint(path, like=other), Net)
    opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)
    opath = tpflax.save_checkpoint(tmp_path / "o", opt)
    got = tpflax.restore_checkpoint(opath, like=nnx.Optimizer(other, optax.adam(1e-3), wrt=nnx.Param))
    assert isinstance(got, nnx.Optimizer)
    assert_bit_exact(keys(got), keys(opt))


def _key_data_or_value(x):
    return jax.random.key_data(x) if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key) else x


def test_typed_prng_keys_restore_with_the_plan_and_like(tmp_path):
    # orbax stores a key as its uint32 key data; the plan and like= hold the key itself.
    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(64, 256, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)
            self.down = nnx.Linear(256, 64, rngs=rngs)

        def __call__(self, x):
            return self.down(self.drop(nnx.relu(self.up(x))))

    model = Net(nnx.Rngs(0, dropout=1))
    state = nnx.state(model)
    plan = tpflax.plan(state, {"data": 2, "model": 4}, model=model, sample=(np.ones((16, 64), np.float32),))
    assert plan.decisions["drop/rngs/key"].dtype == "key<fry>"
    mesh = tpflax.make_mesh(plan.mesh)
    path = tpflax.save_checkpoint(tmp_path / "nnx", tpflax.shard(state, plan, mesh), plan=plan)
    want = jax.tree_util.tree_map(_key_data_or_value, jax.device_get(state))
    for back in (tpflax.restore_checkpoint(path, plan, mesh),
                 tpflax.restore_checkpoint(path, plan, mesh, like=state)):
        key = back["drop"]["rngs"]["key"]
        key = getattr(key, "get_value", lambda k=key: k)()
        assert key.dtype == state["drop"]["rngs"]["key"].get_value().dtype
        for p, d in plan.decisions.items():
            node = back
            for part in p.split("/"):
                node = node[part]
            x = getattr(node, "get_value", lambda n=node: n)()
            assert x.sharding.mesh == mesh and x.sharding.spec == d.spec, p
        assert_bit_exact(jax.tree_util.tree_map(_key_data_or_value, tpflax.unshard(back)), want)

    # Several implementations, and a key array split over the mesh, in a plain tree.
    tree = {"k": jax.random.key(3, impl="rbg"), "ks": jax.random.split(jax.random.key(1), 8)}
    plan = tpflax.plan(tree, {"model": 8}, rules=[("ks", P("model"))])
    mesh = tpflax.make_mesh(plan.mesh)
    path = tpflax.save_checkpoint(tmp_path / "keys", tpflax.shard(tree, plan, mesh))
    for back in (tpflax.restore_checkpoint(path, plan, mesh), tpflax.restore_checkpoint(path, like=tree)):
        for k, x in tree.items():
            assert back[k].dtype == x.dtype, k
            assert_bit_exact(jax.random.key_data(back[k]), jax.random.key_data(x))
    assert tpflax.restore_checkpoint(path, plan, mesh)["ks"].sharding.spec == P("model")
    # Bare key data (no key metadata from orbax) restores as the key like= asks for.
    raw = tpflax.save_checkpoint(tmp_path / "raw", {"k": jax.random.key_data(tree["ks"])})
    got = tpflax.restore_checkpoint(raw, like={"k": tree["ks"]})["k"]
    assert got.dtype == tree["ks"].dtype
    assert_bit_exact(jax.random.key_data(got), jax.random.key_data(tree["ks"]))
    # A key of another implementation is refused, in the form it is stored in.
    with pytest.raises(tpflax.PlanMismatchError, match=r"k: the checkpoint holds \(4,\) uint32 but the "
                       r"target tree has \(\) key<fry> \(stored as its key data \(2,\) uint32\)"):
        tpflax.restore_checkpoint(path, like=dict(tree, k=jax.random.key(0)))



def test_checkpoint_tree_reports_prng_keys_as_keys(tmp_path):
    # orbax's metadata holds a key as its key data ((2,) uint32 for one threefry key); tpflax's record
    # of the saved tree knows the key, so checkpoint_tree reports what was saved, as plans and
    # facts/tree.key_kinds name keys, and restoring without a plan or like= gives the keys back
    import orbax.checkpoint as ocp

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(64, 256, rngs=rngs)
            self.drop = nnx.Dropout(0.1, rngs=rngs)

    state = nnx.state(Net(nnx.Rngs(0, dropout=1)))
    tree = {"k": jax.random.key(3, impl="rbg"), "ks": jax.random.split(jax.random.key(1), 8),
            "w": np.ones((8, 4), np.float32)}
    plan = tpflax.plan(tree, {"model": 8}, rules=[("ks", P("model"))])
    mesh = tpflax.make_mesh(plan.mesh)
    want = {"k": "ShapeDtypeStruct(shape=(), dtype=key<rbg>)", "ks": "ShapeDtypeStruct(shape=(8,), dtype=key<fry>)",
            "w": "ShapeDtypeStruct(shape=(8, 4), dtype=float32)"}
    for path in (tpflax.save_checkpoint(tmp_path / "keys", tpflax.shard(tree, plan, mesh)),
                 tpflax.save_checkpoint(tmp_path / "run", tree, step=2).parent):  # a manager root
        stored = tpflax.checkpoint_tree(path)
        assert {k: repr(x) for k, x in stored.items()} == want
        for back in (tpflax.restore_checkpoint(path), tpflax.restore_checkpoint(path, like=stored)):
            for k in ("k", "ks"):
                assert back[k].dtype == tree[k].dtype, k
                assert_bit_exact(jax.random.key_data(back[k]), jax.random.key_data(tree[k]))
    path = tpflax.save_checkpoint(tmp_path / "nnx", state)
    key = tpflax.checkpoint_tree(path)["drop"]["rngs"]["key"]
    assert key.shape == () and str(key.dtype) == "key<fry>"
    assert tpflax.checkpoint_tree(path)["drop"]["rngs"]["count"].dtype == np.uint32
    # orbax alone keeps no record of the keys: their key data is what the checkpoint holds
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp_path / "bare", {"k": jax.random.key(0)})
    assert tpflax.checkpoint_tree(tmp_path / "bare")["k"].shape == (2,)


def test_params_of_planned_linen_variables_restore_with_that_plan(tmp_path):
    # shard() accepts variables["params"] for a plan of the full variables; so must restore.
    from _util import tiny_lm

    m, ids = tiny_lm(), np.zeros((8, 16), np.int32)
    v = jax.device_get(m.init(jax.random.key(0), ids))
    plan = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(ids,))
    mesh = tpflax.make_mesh(plan.mesh)
    path = tpflax.save_checkpoint(tmp_path / "p", tpflax.shard(v["params"], plan, mesh), plan=plan)
    back = tpflax.restore_checkpoint(path, plan, mesh)
    for name in ("up", "down"):
        got = back[name]["kernel"].sharding
        assert got.mesh == mesh and got.spec == plan.decisions[f"params/{name}/kernel"].spec
    assert any(e is not None for e in back["up"]["kernel"].sharding.spec)
    assert_bit_exact(tpflax.unshard(back), v["params"])
    # A part of the collection is still refused, naming the missing leaf with its prefix.
    part = tpflax.save_checkpoint(tmp_path / "part", {k: v["params"][k] for k in ("up", "down")})
    with pytest.raises(tpflax.PlanMismatchError, match="params/head/kernel: in the plan but not in the checkpoint"):
        tpflax.restore_checkpoint(part, plan, mesh)


def _claims_unfinished(error: Exception) -> bool:
    text = str(error).lower()
    return any(w in text for w in ("did not finish", "finished save", "interrupted", "incomplete"))


def test_checkpoint_errors(host_tree, tmp_path):
    path = tpflax.save_checkpoint(tmp_path / "c", {"w": np.ones((8, 4), np.float32)})
    with pytest.raises(tpflax.CheckpointError, match="already exists; pass overwrite=True"):
        tpflax.save_checkpoint(path, {"w": np.ones((8, 4), np.float32)})
    with pytest.raises(tpflax.CheckpointError, match="no checkpoint at"):
        tpflax.restore_checkpoint(tmp_path / "missing")
    (tmp_path / "half").mkdir()
    with pytest.raises(tpflax.CheckpointError, match="holds no checkpoint") as e:
        tpflax.restore_checkpoint(tmp_path / "half")
    assert not _claims_unfinished(e.value)  # nothing says a save was ever attempted here
    other = tpflax.plan({"w": np.ones((8, 8), np.float32), "v": np.ones(3, np.float32)},
                        {"model": 8})
    with pytest.raises(tpflax.PlanMismatchError) as e:
        tpflax.restore_checkpoint(path, other, tpflax.make_mesh({"model": 8}))
    # the checkpoint is what differs from the plan (a model changed since the save): said so, with
    # its path, and no advice to re-plan or to pass a fuller tree (the plan is for today's model)
    assert str(e.value).startswith(f"the checkpoint {path} does not match the plan:")
    assert "w: the checkpoint holds shape (8, 4) but the plan has (8, 8); the leaf changed" in str(e.value)
    assert "v: in the plan but not in the checkpoint (a leaf added since the save?)" in str(e.value)
    assert "re-plan" not in str(e.value) and "full tree" not in str(e.value)
    gone = tpflax.plan({"w": np.ones((8, 4), np.float32)}, {"model": 8})  # and one the model lost
    extra = tpflax.save_checkpoint(tmp_path / "x", {"w": np.ones((8, 4), np.float32), "u": np.ones(2, np.float32)})
    with pytest.raises(tpflax.PlanMismatchError, match=r"u: in the checkpoint but not in the plan \(shape \(2,\)\); "
                       "the planned model has no such leaf"):
        tpflax.restore_checkpoint(extra, gone, tpflax.make_mesh({"model": 8}))
    with pytest.raises(tpflax.PlanMismatchError, match="u: expected by the target tree"):
        tpflax.restore_checkpoint(path, like={"w": np.ones((8, 4), np.float32),
                                              "u": np.ones(2, np.float32)})


def test_64_bit_host_leaves_are_refused_at_save_not_narrowed_on_restore(tmp_path):
    """Regression: numpy int64/float64 leaves and a Python int past int32 were written as 64 bits and came
    back as jax's 32 bits (a count of 5e9 as 705032704, 2**40 + 7 as 7) without a word. save_checkpoint now
    refuses them as shard() does, naming each leaf, before anything is written."""
    tree = {"w": np.arange(4.0, dtype=np.float32), "tokens_seen": 5_000_000_000,
            "ids": np.array([2**40 + 7, 3], np.int64), "loss_ema": np.float64(0.1234567890123)}
    for kw in ({}, {"step": 3}):
        with pytest.raises(tpflax.TreeError) as e:
            tpflax.save_checkpoint(tmp_path / "ck", tree, **kw)
        for words in (("ids:", "int64", "(2,)", "int32", ".astype('int32')"),
                      ("loss_ema:", "float64", "float32", "jax_enable_x64"),
                      ("tokens_seen:", "5000000000", "int32")):
            assert all(w in str(e.value) for w in words), str(e.value)
        assert "cannot be saved bit-exact" in str(e.value)
        assert not (tmp_path / "ck").exists()
    assert type(tree["tokens_seen"]) is int and tree["ids"].dtype == np.int64  # the caller's tree untouched


@pytest.mark.parametrize("step", [-1, 1.5, "3", True])
def test_a_step_that_is_no_step_number_is_refused_before_anything_is_written(tmp_path, step):
    """Regression: save_checkpoint(root, tree, step=-1) let orbax write a "-1" step directory, then failed
    with a bare KeyError(-1), leaving a root restore_checkpoint called no checkpoint; 1.5 was saved as 1."""
    with pytest.raises(tpflax.OptionError, match=r"step=.* is not a step number: pass a whole number >= 0"):
        tpflax.save_checkpoint(tmp_path / "run", {"w": np.ones(2, np.float32)}, step=step)
    assert not (tmp_path / "run").exists()


def test_python_scalars_are_saved_as_the_32_bit_values_jax_holds(tmp_path):
    """A Python int / float leaf (a step count, linen's ``self.param("t", lambda _: 0.07)``) is written as the
    int32 / float32 jax and the plan make of it: orbax wrote it as 64 bits, so the checkpoint disagreed with
    the plan made from the very tree saved (restore refused it) and with what restore returned."""
    tree = {"w": np.arange(8.0, dtype=np.float32), "step": 3, "temperature": 0.07, "flag": True}
    path = tpflax.save_checkpoint(tmp_path / "ck", tree)
    saved = tpflax.checkpoint_tree(path)
    assert {k: str(v.dtype) for k, v in saved.items()} == {"w": "float32", "step": "int32",
                                                           "temperature": "float32", "flag": "bool"}
    plan = tpflax.plan(tree, {"model": 2})
    back = tpflax.restore_checkpoint(path, plan, tpflax.make_mesh({"model": 2}))
    assert int(back["step"]) == 3 and bool(back["flag"])
    assert np.asarray(back["temperature"]).tobytes() == np.float32(0.07).tobytes()
    assert back["w"].sharding.spec == plan.spec("w")


def _spawn(path: Path, mode: str) -> subprocess.Popen:
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    return subprocess.Popen([sys.executable, str(WORKER), str(path), mode], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


OLD = {"w": np.full((64, 64), 3.0, np.float32), "b": np.arange(8, dtype=np.int8)}


def test_zero_size_leaves_and_their_optimizer_state_round_trip_onto_another_mesh(tmp_path):
    """Regression: orbax refuses arrays with no elements ("Cannot save arrays with zero size"), so
    a tree with a (0, 64) leaf, or adam's moments of one, could not be saved at all. They are left
    out of the files and remade from tpflax.json (a zero-size array has no bytes to lose)."""
    import optax

    r = np.random.default_rng(0)
    params = {"empty": np.zeros((0, 64), np.float32), "up": {"kernel": r.standard_normal((64, 256), np.float32)},
              "down": {"kernel": r.standard_normal((256, 64), np.float32)}}
    tx = optax.adam(1e-3)
    a, b = {"fsdp": 2, "model": 4}, {"data": 2, "model": 4}
    plan_a, plan_b = tpflax.plan(params, a, fsdp_min_bytes=0), tpflax.plan(params, b, fsdp_min_bytes=0)
    tree = {"params": tpflax.shard(params, plan_a, tpflax.make_mesh(a)),
            "opt_state": tpflax.shard_optimizer_state(tx, tx.init(params), plan_a, tpflax.make_mesh(a))}
    mesh_b = tpflax.make_mesh(b)
    want = {"params": tpflax.shardings(plan_b, mesh_b), "opt_state": tpflax.optimizer_shardings(tx, plan_b, mesh_b)}
    abstract = jax.eval_shape(lambda: tree)
    for path in (tpflax.save_checkpoint(tmp_path / "ck", tree, plan=plan_a),
                 tpflax.save_checkpoint(tmp_path / "run", tree, step=1)):
        saved = tpflax.checkpoint_tree(path)
        assert saved["params"]["empty"] == jax.ShapeDtypeStruct((0, 64), np.float32)
        assert saved["opt_state"][0]["mu"]["empty"].shape == (0, 64)  # nested dicts as stored
        back = tpflax.restore_checkpoint(path, like=abstract, shardings=want)
        assert_bit_exact(tpflax.unshard(back), tpflax.unshard(tree))
        assert jax.tree.leaves(jax.tree.map(lambda x: x.sharding, back)) == jax.tree.leaves(want)
        assert back["opt_state"][0].nu["empty"].shape == (0, 64)
    params_only = tpflax.save_checkpoint(tmp_path / "p", tree["params"], plan=plan_a)
    back = tpflax.restore_checkpoint(params_only, plan_b, mesh_b)
    assert_bit_exact(tpflax.unshard(back), params)
    assert back["empty"].sharding == NamedSharding(mesh_b, P(None, None))


def test_killed_save_leaves_the_previous_checkpoint(tmp_path):
    path = tpflax.save_checkpoint(tmp_path / "ck", OLD)
    proc = _spawn(path, "external")
    try:
        assert proc.stdout.readline().strip() == "SAVING"
        tmp = tmp_path / ".ck.tpflax-tmp"
        deadline = time.monotonic() + 60
        while not any(tmp.parent.glob(".ck.tpflax-tmp*")) and time.monotonic() < deadline:
            time.sleep(0.005)  # kill as soon as orbax starts writing the hidden directory
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert "SAVED" not in out, "the save finished before the kill; the test did not interrupt it"
    assert any(tmp_path.glob(".ck.tpflax-tmp*")), "the kill came before the save started writing"
    assert_bit_exact(tpflax.restore_checkpoint(path), OLD)
    # The next save cleans up the dead one's leftovers and succeeds.
    new = {"w": np.full((64, 64), 5.0, np.float32), "b": np.arange(8, dtype=np.int8)}
    tpflax.save_checkpoint(path, new, overwrite=True)
    assert_bit_exact(tpflax.restore_checkpoint(path), new)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def test_save_killed_between_renames_never_restores_wrong(tmp_path):
    path = tpflax.save_checkpoint(tmp_path / "ck", OLD)
    proc = _spawn(path, "between-renames")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, err[-2000:]
    assert "SAVED" not in out
    # The path is gone, the previous checkpoint is intact beside it, and restore says so.
    with pytest.raises(tpflax.CheckpointError, match="previous complete checkpoint is at"):
        tpflax.restore_checkpoint(path)
    old = tmp_path / ".ck.tpflax-old"
    assert_bit_exact(tpflax.restore_checkpoint(old), OLD)


# ---------------------------------------------------------------------------
# orbax CheckpointManager layouts

def _tree(scale: float) -> dict:
    return {"w": np.arange(16 * 32, dtype=np.float32).reshape(16, 32) * scale,
            "b": np.arange(8, dtype=np.int8)}


MGR_RULES = [(r"^w$", P("data", "model"))]


@pytest.fixture(scope="module")
def manager_root(tmp_path_factory):
    """A real, finished CheckpointManager directory: steps 0..2 saved async, max_to_keep=2."""
    ocp = pytest.importorskip("orbax.checkpoint")
    plan = tpflax.plan(_tree(1.0), {"data": 2, "model": 4}, rules=MGR_RULES)
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    root = tmp_path_factory.mktemp("mgr") / "run"
    with ocp.CheckpointManager(root, options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mgr:
        for step in range(3):
            mgr.save(step, args=ocp.args.StandardSave(tpflax.shard(_tree(step + 1.0), plan, mesh)))
        mgr.wait_until_finished()
    return root


def test_manager_root_step_and_item_restore_onto_another_mesh(manager_root):
    plan_b = tpflax.plan(_tree(1.0), {"model": 8}, rules=[(r"^w$", P(None, "model"))])
    mesh_b = tpflax.make_mesh({"model": 8})
    cases = {"root: latest": (manager_root, {}, 3.0), "root, step=1": (manager_root, {"step": 1}, 2.0),
             "step directory": (manager_root / "1", {}, 2.0),
             "item directory": (manager_root / "1" / "default", {}, 2.0)}
    for name, (path, kw, scale) in cases.items():
        got = tpflax.restore_checkpoint(path, plan_b, mesh_b, **kw)
        assert got["w"].sharding.spec == P(None, "model") and got["w"].sharding.mesh == mesh_b, name
        assert_bit_exact(tpflax.unshard(got), _tree(scale))
    assert tpflax.checkpoint_tree(manager_root, step=1)["w"].shape == (16, 32)
    with pytest.raises(tpflax.CheckpointError, match=r"no step 0 in .*finished steps are \[1, 2\]"):
        tpflax.restore_checkpoint(manager_root, step=0)  # deleted by max_to_keep=2
    with pytest.raises(tpflax.CheckpointError, match="one step's directory; drop step="):
        tpflax.restore_checkpoint(manager_root / "1", step=1)


def test_unfinished_is_said_only_when_a_temporary_directory_shows_it(manager_root, tmp_path):
    import shutil

    # A finished save next to one in flight: the finished latest is restored, the tmp ignored.
    root = tmp_path / "run"
    shutil.copytree(manager_root / "2", root / "2")
    shutil.copytree(manager_root / "1", root / "3.orbax-checkpoint-tmp-1796024449")
    assert_bit_exact(tpflax.restore_checkpoint(root), _tree(3.0))
    # Only saves in flight: that, and only that, is called unfinished.
    shutil.rmtree(root / "2")
    with pytest.raises(tpflax.CheckpointError, match="only saves did not finish"):
        tpflax.restore_checkpoint(root)
    # Not a checkpoint at all: said so, without claiming any save.
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("x")
    with pytest.raises(tpflax.CheckpointError, match="holds no checkpoint.*holds readme.txt") as e:
        tpflax.restore_checkpoint(tmp_path / "notes")
    assert not _claims_unfinished(e.value)


def test_composite_items_and_step_names(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    tree = _tree(1.0)
    opts = ocp.CheckpointManagerOptions(step_prefix="ckpt", step_format_fixed_length=6)
    with ocp.CheckpointManager(tmp_path / "run", options=opts) as mgr:
        mgr.save(7, args=ocp.args.Composite(params=ocp.args.StandardSave(tree),
                                            extra=ocp.args.StandardSave({"n": np.int32(3)})))
        mgr.wait_until_finished()
    assert (tmp_path / "run" / "ckpt_000007" / "params").is_dir()
    both = tpflax.restore_checkpoint(tmp_path / "run")
    assert sorted(both) == ["extra", "params"] and int(both["extra"]["n"]) == 3
    assert_bit_exact(both["params"], tree)
    plan = tpflax.plan(tree, {"data": 2, "model": 4}, rules=MGR_RULES)
    got = tpflax.restore_checkpoint(tmp_path / "run", plan, step=7, item="params")
    assert got["w"].sharding.spec == P("data", "model")
    with pytest.raises(tpflax.OptionError, match="several items .*pass item="):
        tpflax.restore_checkpoint(tmp_path / "run", plan)
    with pytest.raises(tpflax.CheckpointError, match=r"no item 'opt'.*\['extra', 'params'\]"):
        tpflax.restore_checkpoint(tmp_path / "run", item="opt")


def test_save_checkpoint_steps_keep_and_plain_orbax_reads_them(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    root = tmp_path / "run"
    for step in (10, 20, 30):
        out = tpflax.save_checkpoint(root, _tree(step), step=step, keep=2)
        assert out == root / str(step)
    assert sorted(p.name for p in root.iterdir()) == ["20", "30"]
    with pytest.raises(tpflax.CheckpointError, match="step 30 already exists"):
        tpflax.save_checkpoint(root, _tree(0.0), step=30)
    tpflax.save_checkpoint(root, _tree(31.0), step=30, overwrite=True)
    assert_bit_exact(tpflax.restore_checkpoint(root), _tree(31.0))
    with ocp.CheckpointManager(root) as mgr:  # orbax's own manager reads and extends the directory
        assert mgr.latest_step() == 30
        assert_bit_exact(jax.device_get(mgr.restore(20, args=ocp.args.StandardRestore())), _tree(20.0))
    with pytest.raises(tpflax.OptionError, match="keep=2 needs step="):
        tpflax.save_checkpoint(tmp_path / "x", _tree(0.0), keep=2)


# ---------------------------------------------------------------------------
# the resume recipe: params + optimizer state, restored onto another mesh

class _Resume:
    """3 steps on {data: 2, model: 4}, a checkpoint, then 3 more on any mesh; compiled once per mesh."""

    def __init__(self):
        import optax

        self.m, self.tx = zoo.get("mlp"), optax.adamw(1e-2)
        self.variables = zoo_init("mlp")
        self.trainers = {}

    def trainer(self, shape):
        key = tuple(shape.items())
        if key not in self.trainers:
            plan = tpflax.plan(self.m.abstract_variables(), shape)
            mesh = tpflax.make_mesh(shape)
            ts = tpflax.make_train_step(self.m, plan, mesh, self.tx, 8)
            self.trainers[key] = plan, mesh, ts, jax.jit(
                ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
                donate_argnums=(0, 1))
        return self.trainers[key]

    def run(self, shape, v, opt, n, start=0):
        _, _, ts, step = self.trainer(shape)
        losses = []
        for i in range(start, start + n):  # batch i at step i, however the run is split
            v, opt, loss = step(v, opt, jax.device_put(self.m.make_batch(i % 2, 8), ts.in_shardings[2]))
            losses.append(float(loss))
        return v, opt, losses

    def fresh(self, shape):
        plan, mesh, *_ = self.trainer(shape)
        return (tpflax.shard(self.variables, plan, mesh),
                tpflax.shard_optimizer_state(self.tx, self.tx.init(self.variables["params"]), plan, mesh))


@pytest.mark.slow
def test_resume_on_another_mesh_matches_the_uninterrupted_run(tmp_path):
    r, a = _Resume(), {"data": 2, "model": 4}
    *_, straight = r.run(a, *r.fresh(a), 6)
    v, opt, first = r.run(a, *r.fresh(a), 3)
    saved = tpflax.unshard({"variables": v, "opt_state": opt})
    tpflax.save_checkpoint(tmp_path / "run", {"variables": v, "opt_state": opt}, step=3, keep=1)
    for b in ({"fsdp": 2, "model": 4}, a):
        ts_b = r.trainer(b)[2]
        back = tpflax.restore_checkpoint(  # the step's own shardings: params per plan, moments alike
            tmp_path / "run", like={"variables": ts_b.args[0], "opt_state": ts_b.args[1]},
            shardings={"variables": ts_b.in_shardings[0], "opt_state": ts_b.in_shardings[1]})
        assert_bit_exact(tpflax.unshard(back), saved)  # the checkpoint itself is exact on any mesh
        assert jax.tree.map(lambda x: x.sharding, back) == {"variables": ts_b.in_shardings[0],
                                                             "opt_state": ts_b.in_shardings[1]}
        *_, rest = r.run(b, back["variables"], back["opt_state"], 3, start=3)
        if b != a:
            # Another mesh sums the matmuls' and gradients' partial products in another order:
            # float32 rounding differs by ~1e-7 relative per reduction, and 3 adamw steps (updates
            # of size lr = 1e-2 whatever the gradients' last bits) move the loss far less than 1e-5.
            np.testing.assert_allclose(first + rest, straight, rtol=1e-5)
        else:  # the same layout runs the same compiled program on the same values: bit-exact
            assert first + rest == straight


def test_shardings_without_like_are_matched_to_the_stored_leaves_by_path(tmp_path):
    """Restored without ``like=``, the stored tree is orbax's nested dicts, whose leaves need not come in the
    caller's order: layers keyed 0..10 are stored as "0", "1", "10", "2", ... Each sharding goes to the leaf
    at its path (they were paired by position: layer 10 came back with layer 2's layout), and shardings that
    do not cover the stored leaves are a PlanMismatchError naming them, not jax's bare error."""
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    params = {i: jax.numpy.full((8, 8), float(i)) for i in range(11)}
    plan = tpflax.plan(params, mesh.shape, rules=[("^[0-5]$", P("data", "model")), (".", P("model", "data"))])
    tpflax.save_checkpoint(tmp_path / "p", tpflax.shard(params, plan, mesh))
    want = tpflax.shardings(plan, mesh, params)
    got = tpflax.restore_checkpoint(tmp_path / "p", shardings=want)
    assert sorted(got, key=int) == [str(i) for i in range(11)]
    for i in range(11):
        assert got[str(i)].sharding == want[i], i
        assert_bit_exact(got[str(i)], params[i])
    with pytest.raises(tpflax.PlanMismatchError) as info:
        tpflax.restore_checkpoint(tmp_path / "p", shardings={i: want[i] for i in range(10)})
    assert "no sharding for stored leaf 10" in str(info.value) and "like=" in str(info.value)


def test_boxed_shardings_without_like_are_matched_by_the_boxes_paths(tmp_path):
    """Shardings read off a placed boxed tree (``jax.tree.map(lambda x: x.sharding, placed)`` keeps each
    ``nn.Partitioned`` or nnx ``Variable`` around its sharding) name their leaves by the box's path, as the
    stored tree does, not by the box's field (``kernel/value``)."""
    import flax.linen as nn

    class Boxed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(8, kernel_init=nn.with_partitioning(nn.initializers.lecun_normal(), (None, "model")))(x)

    mesh = tpflax.make_mesh({"model": 4})
    v = Boxed().init(jax.random.key(0), jax.numpy.ones((2, 4)))
    plan = tpflax.plan(v, mesh.shape)
    placed = tpflax.shard(v, plan, mesh)
    tpflax.save_checkpoint(tmp_path / "b", placed)
    boxed = jax.tree_util.tree_map(lambda x: x.sharding, placed)
    got = tpflax.restore_checkpoint(tmp_path / "b", shardings=boxed)
    assert got["params"]["Dense_0"]["kernel"].sharding.spec == P(None, "model")
    assert_bit_exact(got, tpflax.unshard(placed))

    layer = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    state = nnx.state(layer)
    placed = tpflax.shard(state, tpflax.plan(state, mesh.shape, rules=[("kernel", "column")]), mesh)
    tpflax.save_checkpoint(tmp_path / "n", placed)
    got = tpflax.restore_checkpoint(tmp_path / "n", shardings=jax.tree_util.tree_map(lambda x: x.sharding, placed))
    assert got["kernel"].sharding.spec == P(None, "model") and got["bias"].sharding.spec == P("model")


def test_restore_without_a_plan_uses_no_deprecated_single_device_sharding(tmp_path, monkeypatch):
    """Regression: jax 0.12 deprecates jax.sharding.SingleDeviceSharding (use make_single_device_sharding);
    checkpoint.py imported and constructed it, so every import warned and a restore with no plan built one.
    Here the class warns as jax 0.12's does, and the restore must not touch it."""
    import warnings

    import tpflax._src.checkpoint as ckpt

    class Deprecated(jax.sharding.SingleDeviceSharding):
        def __init__(self, *a, **k):
            warnings.warn("jax.sharding.SingleDeviceSharding is deprecated", DeprecationWarning, stacklevel=2)
            super().__init__(*a, **k)

    monkeypatch.setattr(jax.sharding, "SingleDeviceSharding", Deprecated)
    monkeypatch.setattr(ckpt, "SingleDeviceSharding", Deprecated, raising=False)  # the old module-level import
    w = np.arange(32, dtype=np.float32).reshape(8, 4)
    path = tpflax.save_checkpoint(tmp_path / "c", {"w": w})
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        out = tpflax.restore_checkpoint(path)
    assert out["w"].sharding.is_fully_replicated and len(out["w"].sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(out["w"]), w)


def test_derived_state_given_a_params_plan_is_told_how_to_place_it(tmp_path):
    """Regression: an optimizer state given to shard() with its parameters' plan was told to "re-plan" every
    leaf, and an nnx.Optimizer's checkpoint restored with the model's plan that "the planned model has no such
    leaf"; neither said the fix, deriving the shardings from the plan. The hint's recipe restores it."""
    import optax

    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    model = nnx_mlp(16, 64)
    plan = tpflax.plan(model, mesh)
    params = tpflax.unshard(nnx.state(model, nnx.Param))
    with pytest.raises(tpflax.PlanMismatchError, match=r"does not match the plan \(its leaves are the planned "
                       r"parameters' under other roots.*tpflax.shard_optimizer_state"):
        tpflax.shard(optax.adam(1e-3).init(params), plan, mesh)
    with pytest.raises(tpflax.PlanMismatchError) as e:  # not every stray leaf is derived: no hint
        tpflax.shard({"up": {"kernel": np.ones((16, 64), np.float32)}, "other": np.ones(3, np.float32)}, plan, mesh)
    assert "derived" not in str(e.value)
    opt = tpflax.shard_optimizer_state(nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param), None, plan, mesh)
    path = tpflax.save_checkpoint(tmp_path / "o", opt)
    like = nnx.Optimizer(nnx_mlp(16, 64, seed=1), optax.adam(1e-3), wrt=nnx.Param)
    with pytest.raises(tpflax.PlanMismatchError, match=r"\(it holds the planned parameters' paths under other roots.*"
                       r"shardings=tpflax.state_shardings\(like, plan, mesh\), or "
                       r"tpflax.optimizer_shardings\(like, plan, mesh\) for an nnx.Optimizer\)"):
        tpflax.restore_checkpoint(path, plan, mesh)  # no like=: nothing to derive the layout from
    back = tpflax.restore_checkpoint(path, like=like, shardings=tpflax.optimizer_shardings(like, plan, mesh))
    assert nnx.state(back)["opt_state"][0]["mu"]["up"]["kernel"].get_value().sharding.spec == plan.spec("up/kernel")
    assert_bit_exact(tpflax.unshard(nnx.state(back)), tpflax.unshard(nnx.state(opt)))
    # with like= the parameters' plan lays the state out as the recipe does (it was refused with the hint)
    derived = tpflax.restore_checkpoint(path, plan, mesh, like=like)
    assert jax.tree_util.tree_map(lambda x: x.sharding, nnx.state(derived)) == \
        jax.tree_util.tree_map(lambda x: x.sharding, nnx.state(back))
    assert_bit_exact(tpflax.unshard(nnx.state(derived)), tpflax.unshard(nnx.state(opt)))


def test_leaves_a_checkpoint_cannot_hold_are_named_before_anything_is_written(tmp_path, capfd):
    """Regression: a str, an object or a jax.ShapeDtypeStruct leaf reached orbax, whose error ("saving ... failed:
    ValueError: Unsupported type: <class 'str'> for key: ('meta', 'name')") named one leaf as a key tuple,
    while its threads logged tracebacks ("cannot schedule new futures after shutdown") on stderr."""
    tree = {"w": np.ones((4, 2), np.float32), "meta": {"name": "run-7", "tags": np.array(["a", "b"])},
            "later": jax.ShapeDtypeStruct((3,), np.float32), "step": 3}
    with pytest.raises(tpflax.TreeError, match="the tree has leaves a checkpoint cannot hold") as e:
        tpflax.save_checkpoint(tmp_path / "c", tree)
    assert [p.split(":")[0] for p in e.value.problems] == ["later", "meta/name", "meta/tags"]
    assert "leaf of type str is not an array" in e.value.problems[1]
    assert "dtype <U1" in e.value.problems[2]
    with pytest.raises(tpflax.TreeError):
        tpflax.save_checkpoint(tmp_path / "m", tree, step=1)
    assert list(tmp_path.iterdir()) == []
    assert "Traceback" not in capfd.readouterr().err


def test_save_under_a_file_is_a_checkpoint_error(tmp_path):
    # a file where the checkpoint's directory goes was a bare "FileExistsError: [Errno 17] File exists: '.../f'"
    # (with step=, a CheckpointError already)
    (tmp_path / "f").write_text("")
    with pytest.raises(tpflax.CheckpointError, match=r"cannot save .*/f/ck: its directory .*/f cannot be made"):
        tpflax.save_checkpoint(tmp_path / "f" / "ck", {"w": np.ones(3, np.float32)})
    assert (tmp_path / "f").read_text() == ""


def test_a_mesh_without_a_plan_is_refused_not_dropped(tmp_path):
    # restore_checkpoint(path, mesh=mesh) restored everything onto device 0, the mesh ignored without a word
    tpflax.save_checkpoint(tmp_path / "c", {"w": np.ones((8, 8), np.float32)})
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    with pytest.raises(tpflax.OptionError, match=r"without a plan has no layout for the mesh.*restore_checkpoint\(path, "
                                                 r"plan, mesh\)"):
        tpflax.restore_checkpoint(tmp_path / "c", mesh=mesh)
    plan = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, mesh, rules=[("w", ("data", "model"))])
    assert tpflax.restore_checkpoint(tmp_path / "c", plan, mesh)["w"].sharding.spec == P("data", "model")
    shardings = {"w": jax.sharding.NamedSharding(mesh, P("model"))}
    assert tpflax.restore_checkpoint(tmp_path / "c", mesh=mesh, shardings=shardings)["w"].sharding.spec == P("model")


def test_save_checkpoint_with_a_plan_or_path_of_another_kind_says_what_it_takes(tmp_path):
    # plan={"x": 1} was a bare AttributeError ("'dict' object has no attribute 'decisions'"), a path of 123
    # pathlib's bare TypeError; the tree and the path swapped, the same TypeError
    tree = {"v": np.ones(3, np.float32)}
    with pytest.raises(tpflax.OptionError, match=r"plan is a dict, not a tpflax.Plan"):
        tpflax.save_checkpoint(tmp_path / "a", tree, plan={"x": 1})
    for path in (123, tree):
        with pytest.raises(tpflax.OptionError, match=r"not a directory path: the order is save_checkpoint\(path, tree"):
            tpflax.save_checkpoint(path, tree if path is not tree else tmp_path / "b")
    assert not any(tmp_path.iterdir())


def test_restore_takes_one_sharding_for_all_and_names_what_is_no_sharding(tmp_path):
    # shardings=P(...) leaves failed in orbax ("the context mesh cannot be empty"), a single NamedSharding was
    # "no sharding for stored leaf w; sharding for , which is not stored", and a path of 123 pathlib's TypeError
    tpflax.save_checkpoint(tmp_path / "c", {"w": np.arange(64, dtype=np.float32).reshape(8, 8)})
    mesh = tpflax.make_mesh({"model": 2})
    with pytest.raises(tpflax.OptionError, match=r"shardings= holds a PartitionSpec at w, not a jax Sharding; pass "
                                                 r"NamedShardings \(NamedSharding\(mesh, spec\)\)"):
        tpflax.restore_checkpoint(tmp_path / "c", shardings={"w": P("model")})
    with pytest.raises(tpflax.OptionError, match=r"shardings= holds str at the root"):
        tpflax.restore_checkpoint(tmp_path / "c", shardings="model")
    with pytest.raises(tpflax.OptionError, match=r"path is int, not a checkpoint directory"):
        tpflax.restore_checkpoint(123)
    got = tpflax.restore_checkpoint(tmp_path / "c", shardings=NamedSharding(mesh, P("model")))
    assert got["w"].sharding.spec == P("model") and np.array_equal(got["w"], np.arange(64).reshape(8, 8))


def test_a_train_state_restores_onto_the_parameters_plan_given_as_like(tmp_path):
    # restore_checkpoint(path, plan, mesh, like=train_state) was refused: "restore it with like= that object and
    # shardings=tpflax.state_shardings(like, plan, mesh)", though like= was given and the plan is the params'
    import jax.numpy as jnp
    import optax
    from flax.training import train_state

    params = {"w": jnp.arange(16 * 32, dtype=jnp.float32).reshape(16, 32), "b": jnp.ones((32,))}
    saving, restoring = tpflax.make_mesh({"data": 2, "model": 4}), tpflax.make_mesh({"model": 8})
    p1 = tpflax.plan(params, saving, rules=[("w", "column")])
    p2 = tpflax.plan(params, restoring, rules=[("w", "row")])
    ts = train_state.TrainState.create(apply_fn=None, params=params, tx=optax.adam(1e-3))
    ts = ts.apply_gradients(grads=jax.tree_util.tree_map(lambda x: x / 3, params))
    tpflax.save_checkpoint(tmp_path / "ts", tpflax.shard_train_state(ts, p1, saving))
    got = tpflax.restore_checkpoint(tmp_path / "ts", p2, restoring, like=ts)
    assert type(got) is type(ts) and int(got.step) == 1
    assert got.params["w"].sharding.spec == P("model", None) == got.opt_state[0].mu["w"].sharding.spec
    assert got.opt_state[0].count.sharding.spec == P()
    for a, b in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ts), strict=True):
        a = np.asarray(a)  # (the step: a Python int saved as the int32 jax makes of it)
        assert a.tobytes() == np.asarray(b, a.dtype).tobytes()
    # a like= holding a leaf neither planned nor derived is still refused
    with pytest.raises(tpflax.PlanMismatchError):
        tpflax.restore_checkpoint(tmp_path / "ts", p2, restoring, like={"params": params, "other": jnp.ones(3)})
