"""Plan JSON: format 2 writes every fact a decision carries; format 1 still loads."""

import json
import pathlib
import pickle

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax

S = jax.ShapeDtypeStruct
V1 = pathlib.Path(__file__).parent / "data" / "plan_v1.json"


def _tree():
    """The tree tests/data/plan_v1.json was planned from (fsdp=2, model=2, fsdp_min_bytes=16384)."""
    f = "float32"
    return {"params": {
        "embed": {"embedding": S((512, 64), f)},
        "layers_0": {"attn": {"q": {"kernel": S((64, 4, 16), f)}, "o": {"kernel": S((4, 16, 64), f)}},
                     "mlp": {"up": {"kernel": S((64, 256), f), "bias": S((256,), f)},
                             "down": {"kernel": S((256, 64), f), "bias": S((64,), f)}},
                     "norm": {"scale": S((64,), f)}},
        "head": {"kernel": S((64, 512), f)}}}


# The v1 file split this 512-row table over model (a rule); the chooser now prices it and keeps
# so small a table whole (no all-reduce of activations per step; tests/test_choose.py).
CHOSEN_BY_COST = "params/embed/embedding"


@pytest.fixture(scope="module")
def fresh():
    return tpflax.plan(_tree(), {"fsdp": 2, "model": 2}, fsdp_min_bytes=1 << 14)


def test_format_1_loads_with_combined_strategies_split(fresh):
    text = V1.read_text()
    assert json.loads(text)["version"] == 1 and '"column+fsdp"' in text
    old = tpflax.Plan.from_json(text)
    up = old.decisions["params/layers_0/mlp/up/kernel"]
    assert (up.strategy, up.fsdp, up.label, up.spec) == ("column", True, "column+fsdp", P("fsdp", "model"))
    # the facts format 1 lacks are rebuilt from the paths and the pairs
    assert (up.role, up.unit, up.group) == ("column", "params/layers_0/mlp/up", "params/layers_*/mlp/up/kernel")
    assert old.decisions["params/layers_0/attn/o/kernel"].role == "row"
    assert old.decisions["params/layers_0/norm/scale"].fsdp is False
    # every spec, strategy and byte count is what this tpflax plans for the same tree
    for path, d in fresh.decisions.items():
        if path == CHOSEN_BY_COST:
            continue
        o = old.decisions[path]
        assert (o.spec, o.label, o.bytes, o.bytes_per_device, o.pair) == (
            d.spec, d.label, d.bytes, d.bytes_per_device, d.pair), path
        assert (o.role, o.unit, o.group, o.trainable) == (d.role, d.unit, d.group, d.trainable), path
    assert old.specs_for(_tree())["params"]["head"]["kernel"] == fresh.decisions["params/head/kernel"].spec


def test_format_2_round_trips_every_field(fresh):
    data = json.loads(fresh.to_json())
    assert data["version"] == 3
    row = next(d for d in data["decisions"] if d["path"] == "params/layers_0/mlp/up/kernel")
    assert (row["strategy"], row["fsdp"], row["role"]) == ("column", True, "column")
    assert not any("+" in d["strategy"] for d in data["decisions"])
    back = tpflax.Plan.from_json(fresh.to_json())
    assert back.decisions == fresh.decisions
    assert back.pairs == fresh.pairs and back.warnings == fresh.warnings
    # decisions is a dict whose missing path names the closest ones, through JSON and pickle alike
    again = pickle.loads(pickle.dumps(back))
    assert again.decisions == fresh.decisions and type(again.decisions) is type(fresh.decisions)
    assert again.to_json() == fresh.to_json()
    with pytest.raises(tpflax.UnknownPathError, match="did you mean 'params/head/kernel'"):
        again.spec("params/head/kernal")


def test_prng_key_bytes_are_the_key_data_bytes():
    from tpflax._src.facts.tree import itemsize

    key = jax.random.key(0)
    assert itemsize(key.dtype) == itemsize(str(key.dtype)) == jax.random.key_data(key).nbytes == 8
    rbg = jax.random.key(0, impl="rbg")
    assert itemsize(str(rbg.dtype)) == jax.random.key_data(rbg).nbytes == 16
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1024))
    p = tpflax.plan({"rng": keys, "w": S((8, 8), "float32")}, {"model": 2})
    assert p.decisions["rng"].bytes == p.decisions["rng"].bytes_per_device == 1024 * 8
    assert tpflax.Plan.from_json(p.to_json()).decisions["rng"].bytes == 8192  # byte counts are checked on load


def test_int4_bytes_are_packed_as_xla_stores_them():
    # counted at 1 byte per element before (numpy's itemsize); XLA packs two per byte, rounding up
    tree = {"q": S((1023, 3), jnp.int4), "u": S((1024, 64), jnp.uint4)}
    p = tpflax.plan(tree, {"model": 2}, rules=[("u", P("model"))])
    assert (p.decisions["q"].bytes, p.decisions["u"].bytes, p.decisions["u"].bytes_per_device) == (1535, 32768, 16384)
    whole = jax.jit(lambda t: t).lower(tree).compile().memory_analysis()
    assert whole.argument_size_in_bytes == p.total_bytes == 1535 + 32768
    mesh = tpflax.make_mesh({"model": 2})
    placed = jax.jit(lambda t: t, in_shardings=(tpflax.shardings(p, mesh),)).lower(tree).compile()
    assert placed.memory_analysis().argument_size_in_bytes == p.bytes_per_device == 1535 + 16384
    assert tpflax.estimate(p, None, {"x": (2, 4)}).per_device.model_state == 1535 + 16384
    assert tpflax.Plan.from_json(p.to_json()).decisions == p.decisions  # byte counts are checked on load


def test_unknown_vocabulary_in_json_is_named(fresh):
    data = json.loads(fresh.to_json())
    data["decisions"][0]["strategy"] = "diagonal"
    data["decisions"][1]["role"] = "sideways"
    with pytest.raises(tpflax.PlanFormatError) as e:
        tpflax.Plan.from_json(json.dumps(data))
    assert "strategy 'diagonal' is not one of" in str(e.value) and "role 'sideways'" in str(e.value)


def test_specs_keep_the_planned_trees_containers_through_json():
    # lists, tuples, a FrozenDict and an empty subtree come back as they were planned, so the
    # reloaded plan's shardings are jit in_shardings for the params themselves
    from flax.core import FrozenDict

    params = {"layers": [{"up": jnp.ones((64, 256)), "down": jnp.ones((256, 64))} for _ in range(2)],
              "norm": (jnp.ones(64), None), "extra": {}, "head": FrozenDict({"w": jnp.ones((64, 8))})}
    plan = tpflax.plan(params, {"data": 2, "model": 4})
    same = tpflax.Plan.from_json(plan.to_json())
    assert jax.tree_util.tree_structure(same.specs) == jax.tree_util.tree_structure(plan.specs)
    assert same.specs == plan.specs and same.decisions == plan.decisions
    mesh = tpflax.make_mesh(plan.mesh)
    out = jax.jit(lambda t: t, in_shardings=(tpflax.shardings(same, mesh),))(params)
    assert out["layers"][1]["down"].sharding.is_equivalent_to(tpflax.shardings(plan, mesh)["layers"][1]["down"], 2)
    # an nnx State comes back as a State (its shardings are jit in_shardings for the state itself)
    from flax import nnx

    state = nnx.state(nnx.Linear(8, 16, rngs=nnx.Rngs(0)))
    back = tpflax.Plan.from_json(tpflax.plan(state, {"model": 2}).to_json())
    assert set(back.specs) == {"bias", "kernel"} and isinstance(back.specs, nnx.State)
    # a skeleton that does not list exactly the decisions' paths (hand-edited) is ignored
    data = json.loads(plan.to_json())
    data["tree"]["d"]["extra"] = "no/such/leaf"
    assert isinstance(tpflax.Plan.from_json(json.dumps(data)).specs["layers"], dict)


def test_a_plan_whose_paths_nest_in_each_other_reads_back_from_json():
    """A tree the JSON skeleton cannot write (a NamedTuple) with keys holding '/' (``"a"`` beside ``"a/b"``):
    the specs come back flat, keyed by path, with every decision (a bare TypeError before, or with the keys
    in the other order a spec silently overwritten)."""
    from typing import NamedTuple

    class Pair(NamedTuple):
        w: object

    s = jax.ShapeDtypeStruct
    for tree in ({"a": s((8, 16), "float32"), "a/b": s((16, 8), "float32"), "nt": Pair(s((4, 4), "float32"))},
                 {"a/b": s((16, 8), "float32"), "a": s((8, 16), "float32"), "nt": Pair(s((4, 4), "float32"))}):
        plan = tpflax.plan(tree, {"model": 2})
        back = tpflax.Plan.from_json(plan.to_json())
        assert back.decisions == plan.decisions
        assert back.specs == {p: d.spec for p, d in plan.decisions.items()}


def test_int_keys_and_nnx_state_survive_json():
    # layers kept in a dict by index, or in an nnx.List (whose state is keyed 0, 1, ...): jax tells the
    # key 0 from "0", so a reloaded plan whose specs had string keys (or nested dicts for an
    # nnx.State) gave shardings that jit refused as in_shardings for the very tree that was planned
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.layers = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(3)])
            self.norm = nnx.BatchNorm(32, rngs=rngs)

        def __call__(self, x):
            for layer in self.layers:
                x = nnx.relu(layer(x))
            return self.norm(x)

    state = nnx.state(Net(nnx.Rngs(0)))
    plain = {0: {"up": jnp.ones((32, 128)), "down": jnp.ones((128, 32))},
             1: {"up": jnp.ones((32, 128)), "down": jnp.ones((128, 32))}}
    for tree in (plain, state):
        plan = tpflax.plan(tree, {"data": 2, "model": 4})
        same = tpflax.Plan.from_json(plan.to_json())
        assert same.decisions == plan.decisions and same.specs == plan.specs
        assert jax.tree_util.tree_structure(same.specs) == jax.tree_util.tree_structure(plan.specs)
        mesh = tpflax.make_mesh(plan.mesh)
        shardings = tpflax.shardings(same, mesh)
        assert jax.tree_util.tree_structure(shardings) == jax.tree_util.tree_structure(tpflax.shardings(plan, mesh))
        out = jax.jit(lambda t: jax.tree.map(lambda a: a * 2, t), in_shardings=(shardings,))(tree)
        for (path, x), d in zip(jax.tree_util.tree_flatten_with_path(out)[0], plan.decisions.values(), strict=True):
            assert x.sharding.is_equivalent_to(NamedSharding(mesh, d.spec), x.ndim), jax.tree_util.keystr(path)
    # JSON object keys are strings: a dict with an int key is written as [key, node] pairs
    assert json.loads(tpflax.plan(plain, {"model": 2}).to_json())["tree"]["d"][0][0] == 0


def test_from_json_takes_the_loaded_document_and_says_a_path_is_not_text(tmp_path):
    # Plan.from_json(json.load(f)) was "the JSON object must be str, bytes or bytearray, not dict", and a file's
    # path "plan JSON does not parse: Expecting value: line 1 column 1 (char 0)"
    tree = {"mlp": {"up": {"kernel": jax.ShapeDtypeStruct((32, 128), "float32")},
                    "down": {"kernel": jax.ShapeDtypeStruct((128, 32), "float32")}}}
    p = tpflax.plan(tree, {"data": 2, "model": 4})
    path = tmp_path / "plan.json"
    path.write_text(p.to_json())
    doc = json.loads(path.read_text())
    again = tpflax.Plan.from_json(doc)
    assert again.decisions == p.decisions and again.specs == p.specs
    assert doc == json.loads(p.to_json())  # the caller's document is left as it was
    for given in (path, str(path)):
        with pytest.raises(tpflax.PlanFormatError, match="takes the JSON text, not a file path") as e:
            tpflax.Plan.from_json(given)
        assert "Plan.from_json(pathlib.Path(path).read_text())" in str(e.value)
