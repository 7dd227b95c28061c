"""The planner: strategies, pairing, divisibility, overrides, annotations, errors, JSON."""

from __future__ import annotations

import copy
import json

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax.core import freeze
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo
from tpflax._src.mesh import mesh_shape
from tpflax._src.specs import entries, spec_problems

S = jax.ShapeDtypeStruct
F32 = "float32"

MESHES = [{"model": 8}, {"data": 2, "model": 4}, {"fsdp": 4, "model": 2},
          {"data": 16, "fsdp": 16, "model": 8}]


def spec(p: tpflax.Plan, path: str) -> P:
    return p.decisions[path].spec


def assert_valid(p: tpflax.Plan) -> None:
    problems = []
    for path, d in p.decisions.items():
        problems += spec_problems(path, d.shape, entries(d.spec), p.mesh)
        assert len(tuple(d.spec)) <= len(d.shape), path
    assert not problems, problems


# --------------------------------------------------------------------------- zoo at real size

@pytest.fixture(scope="module")
def real_trees():
    names = ["mlp", "cnn", "gpt2", "llama", "llama-scan", "vit", "lstm", "gru", "moe", "nnx-mlp"]
    return {n: zoo.get(n, size="real").abstract_variables() for n in names}


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_every_real_size_zoo_spec_is_valid(real_trees, mesh):
    for name, tree in real_trees.items():
        p = tpflax.plan(tree, mesh)
        assert_valid(p)
        assert len(p.decisions) == len(jax.tree_util.tree_leaves(tpflax._src.facts.tree.unboxed(tree))), name


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: ",".join(f"{k}={v}" for k, v in m.items()))
def test_llama_7b_is_megatron_layout(real_trees, mesh):
    p = tpflax.plan(real_trees["llama"], mesh)
    t = "model"
    layer = "params/layers_3"
    assert spec(p, f"{layer}/attn/q_proj/kernel")[1] == t
    assert spec(p, f"{layer}/attn/k_proj/kernel")[1] == t
    assert spec(p, f"{layer}/attn/v_proj/kernel")[1] == t
    assert spec(p, f"{layer}/attn/o_proj/kernel")[0] == t
    assert spec(p, f"{layer}/mlp/gate_proj/kernel")[1] == t
    assert spec(p, f"{layer}/mlp/up_proj/kernel")[1] == t
    assert spec(p, f"{layer}/mlp/down_proj/kernel")[0] == t
    for norm in (f"{layer}/attention_norm/scale", f"{layer}/ffn_norm/scale", "params/norm/scale"):
        assert p.decisions[norm].strategy.startswith("replicate") or p.decisions[norm].strategy == "fsdp"
        assert t not in tpflax._src.specs.used_axes(entries(spec(p, norm)))
    emb = p.decisions["params/embed/embedding"]
    assert emb.strategy.startswith("vocab") and t in tuple(emb.spec)
    for path, d in p.decisions.items():  # the pair ids tie column and row of each block
        if "/mlp/" in path and path.endswith("kernel"):
            assert d.pair is not None, path
    if "fsdp" in mesh:  # big kernels also shard over fsdp, on the other dim
        assert spec(p, f"{layer}/mlp/up_proj/kernel") == P("fsdp", "model")
        assert spec(p, f"{layer}/mlp/down_proj/kernel") == P("model", "fsdp")


def test_gpt2_small_odd_vocab_is_replicated_because_split_features_sum_the_logits():
    # 50257 rows do not divide model=4; the embed-dim split divides the tied logits' flops by 4
    # but all-reduces the full float32 logits (785 MiB at 8192 tokens): step time keeps it whole
    p = tpflax.plan(zoo.get("gpt2-small").abstract_variables(), {"data": 2, "model": 4})
    d = p.decisions["params/wte/embedding"]
    assert d.shape == (50257, 768)
    assert d.spec == P(None, None)
    assert [a.name for a in d.alternatives] == ["embed-dim split", "replicate"]
    split = d.alternatives[0]
    assert split.spec == P(None, "model") and split.flops < d.alternatives[1].flops
    assert any("sum partial logits" in c for c in split.collectives)
    assert "runner-up embed-dim split" in d.reason


# --------------------------------------------------------------------------- tiny zoo, spec by spec

def test_llama_tiny_blocks_spec_by_spec():
    p = tpflax.plan(zoo.get("llama").abstract_variables(), {"data": 2, "model": 4})
    for i in range(2):
        b = f"params/layers_{i}"
        assert spec(p, f"{b}/attn/q_proj/kernel") == P(None, "model", None)
        # GQA: 2 kv heads do not divide model=4, so k/v stay whole; the reason says so.
        assert spec(p, f"{b}/attn/k_proj/kernel") == P(None, None, None)
        assert "GQA" in p.decisions[f"{b}/attn/k_proj/kernel"].reason
        assert spec(p, f"{b}/attn/o_proj/kernel") == P("model", None, None)
        assert spec(p, f"{b}/mlp/gate_proj/kernel") == P(None, "model")
        assert spec(p, f"{b}/mlp/up_proj/kernel") == P(None, "model")
        assert spec(p, f"{b}/mlp/down_proj/kernel") == P("model", None)
        assert spec(p, f"{b}/attention_norm/scale") == P(None)
        up = p.decisions[f"{b}/mlp/up_proj/kernel"]
        down = p.decisions[f"{b}/mlp/down_proj/kernel"]
        assert up.pair == down.pair is not None
        assert f"pair {up.pair}" in up.reason and "down_proj" in up.reason
    assert spec(p, "params/lm_head/kernel") == P(None, "model")
    # With 2-way tensor parallelism the kv heads divide and are split too.
    p2 = tpflax.plan(zoo.get("llama").abstract_variables(), {"model": 2})
    assert spec(p2, "params/layers_0/attn/k_proj/kernel") == P(None, "model", None)


def test_llama_scan_keeps_the_layers_dim_unsharded():
    p = tpflax.plan(zoo.get("llama-scan").abstract_variables(), {"fsdp": 2, "model": 4},
                    fsdp_min_bytes=0)
    assert spec(p, "params/layers/mlp/up_proj/kernel") == P(None, "fsdp", "model")
    assert spec(p, "params/layers/mlp/down_proj/kernel") == P(None, "model", "fsdp")
    assert spec(p, "params/layers/attn/q_proj/kernel") == P(None, "fsdp", "model", None)
    assert spec(p, "params/layers/attn/o_proj/kernel") == P(None, "model", None, "fsdp")
    for path, d in p.decisions.items():
        if path.startswith("params/layers/"):
            assert tuple(d.spec)[0] is None, path
            assert "nn.scan" in d.reason or d.strategy in ("replicate", "fsdp"), path


@pytest.mark.parametrize("name,prefix", [("gpt2", "params/h_0"), ("moe", "params/layers_0")])
def test_two_d_attention_pairs_q_k_v_with_out(name, prefix):
    p = tpflax.plan(zoo.get(name).abstract_variables(), {"model": 4})
    assert spec(p, f"{prefix}/attn/query/kernel") == P(None, "model")
    for proj in ("key", "value"):
        if name == "moe":  # GQA: 2-D key/value kernels narrower than the output stay whole
            assert spec(p, f"{prefix}/attn/{proj}/kernel") == P(None, None)
            assert "GQA" in p.decisions[f"{prefix}/attn/{proj}/kernel"].reason
        else:
            assert spec(p, f"{prefix}/attn/{proj}/kernel") == P(None, "model")
    assert spec(p, f"{prefix}/attn/out/kernel") == P("model", None)
    ids = {p.decisions[f"{prefix}/attn/{x}/kernel"].pair for x in ("query", "key", "value", "out")}
    assert len(ids) == 1 and None not in ids


def test_gpt2_mlp_and_biases_follow_their_kernels():
    p = tpflax.plan(zoo.get("gpt2").abstract_variables(), {"model": 4})
    assert spec(p, "params/h_1/mlp/c_fc/kernel") == P(None, "model")
    assert spec(p, "params/h_1/mlp/c_fc/bias") == P("model")
    assert spec(p, "params/h_1/mlp/c_proj/kernel") == P("model", None)
    assert spec(p, "params/h_1/mlp/c_proj/bias") == P(None)
    assert spec(p, "params/h_1/attn/query/bias") == P("model")
    assert spec(p, "params/h_1/attn/out/bias") == P(None)
    assert spec(p, "params/wte/embedding") == P("model", None)  # 256 divides: vocab split


def test_vit_heads_from_3d_kernels():
    p = tpflax.plan(zoo.get("vit").abstract_variables(), {"model": 4})
    b = "params/encoderblock_0"
    for proj in ("query", "key", "value"):
        assert spec(p, f"{b}/attn/{proj}/kernel") == P(None, "model", None)
        assert spec(p, f"{b}/attn/{proj}/bias") == P("model", None)
        assert p.decisions[f"{b}/attn/{proj}/kernel"].strategy == "heads"
    assert spec(p, f"{b}/attn/out/kernel") == P("model", None, None)
    assert spec(p, f"{b}/mlp/fc1/kernel") == P(None, "model")
    assert spec(p, f"{b}/mlp/fc2/kernel") == P("model", None)
    assert spec(p, "params/cls") == P(None, None, None)


def test_moe_experts_on_expert_axis_and_ffn_on_tensor_axis():
    tree = zoo.get("moe").abstract_variables()
    p = tpflax.plan(tree, {"expert": 4, "model": 2})
    assert spec(p, "params/layers_0/moe/wi") == P("expert", None, "model")
    assert spec(p, "params/layers_0/moe/wo") == P("expert", "model", None)
    assert p.decisions["params/layers_0/moe/wi"].strategy == "expert"
    assert spec(p, "params/layers_0/moe/router/kernel") == P(None, None)
    p = tpflax.plan(tree, {"model": 4})  # no expert axis: tensor parallel inside each expert
    assert spec(p, "params/layers_0/moe/wi") == P(None, None, "model")
    assert spec(p, "params/layers_0/moe/wo") == P(None, "model", None)


def test_resnet_conv_chain_is_channel_then_input_channel():
    p = tpflax.plan(zoo.get("cnn", size="real").abstract_variables(), {"model": 8})
    assert spec(p, "params/block_0/conv1/kernel") == P(None, None, None, "model")
    assert p.decisions["params/block_0/conv1/kernel"].strategy == "channel"
    assert spec(p, "params/block_0/conv2/kernel") == P(None, None, "model", None)
    assert "input-channel" in p.decisions["params/block_0/conv2/kernel"].reason
    assert spec(p, "params/conv_init/kernel") == P(None, None, None, None)
    assert spec(p, "batch_stats/block_0/bn1/mean") == P(None)


def test_conv_channel_floor_is_an_option_and_pairs_above_it_are_priced():
    tree = zoo.get("cnn").abstract_variables()  # tiny: 16/32/64 channels
    default = tpflax.plan(tree, {"model": 4})
    assert default.decisions["params/block_0/conv1/kernel"].strategy == "replicate"
    assert "min_channels=64" in default.decisions["params/block_0/conv1/kernel"].reason
    low = tpflax.plan(tree, {"model": 4}, min_channels=0)
    d = low.decisions["params/block_0/conv1/kernel"]
    # priced like any column -> row pair: split or whole, both costs kept on the decision
    assert d.strategy == "channel" and "chosen by cost" in d.reason
    assert sorted(a.name for a in d.alternatives) == ["channel split", "replicate"]
    assert spec(low, "params/block_0/conv2/kernel") == P(None, None, "model", None)


def test_mlp_and_nnx_mlp_pair_up_down():
    for name, prefix in (("mlp", "params/block_0/mlp/"), ("nnx-mlp", "blocks/0/")):
        p = tpflax.plan(zoo.get(name).abstract_variables(), {"data": 2, "model": 4})
        assert spec(p, prefix + "up/kernel") == P(None, "model"), name
        assert spec(p, prefix + "down/kernel") == P("model", None), name
        assert spec(p, prefix + "up/bias") == P("model"), name
        assert spec(p, prefix + "down/bias") == P(None), name


def test_recurrent_kernels_are_not_tensor_split():
    p = tpflax.plan(zoo.get("lstm").abstract_variables(), {"model": 4})
    rec = [d for path, d in p.decisions.items() if "/cell/" in path and path.endswith("kernel")]
    assert rec and all(d.kind == "recurrent" and d.strategy == "replicate" for d in rec)
    assert "time step" in rec[0].reason


def test_pairing_uses_shapes_not_names():
    """Meaningless names: the residual width (from the norm) decides column vs row."""
    tree = {"params": {
        "blk": {"n": {"scale": S((64,), F32)},
                "x1": {"kernel": S((64, 256), F32), "bias": S((256,), F32)},
                "x2": {"kernel": S((256, 64), F32), "bias": S((64,), F32)}}}}
    p = tpflax.plan(tree, {"model": 4})
    assert spec(p, "params/blk/x1/kernel") == P(None, "model")
    assert spec(p, "params/blk/x2/kernel") == P("model", None)
    assert "residual width 64" in p.decisions["params/blk/x1/kernel"].reason
    # Without a norm, a mirrored pair still pairs: the widening side is column.
    bare = {"a": {"kernel": S((64, 256), F32)}, "b": {"kernel": S((256, 64), F32)}}
    p = tpflax.plan(bare, {"model": 4})
    assert spec(p, "a/kernel") == P(None, "model") and spec(p, "b/kernel") == P("model", None)


def test_never_row_then_column_for_a_standard_block():
    for name in ("mlp", "gpt2", "llama", "vit", "moe"):
        p = tpflax.plan(zoo.get(name).abstract_variables(), {"model": 2})
        for pair in p.pairs:
            for c in pair.columns:
                assert p.decisions[c].strategy in ("column", "heads", "channel", "expert", "replicate"), c
            for r in pair.rows:
                assert p.decisions[r].strategy in ("row", "heads", "expert", "replicate"), r


# --------------------------------------------------------------------------- divisibility

def test_pair_whose_hidden_dim_does_not_divide_is_left_whole():
    tree = {"n": {"scale": S((64,), F32)}, "mlp": {"up": {"kernel": S((64, 100), F32)},
                                                   "down": {"kernel": S((100, 64), F32)}}}
    p = tpflax.plan(tree, {"model": 8})
    for k in ("mlp/up/kernel", "mlp/down/kernel"):
        assert spec(p, k) == P(None, None)
        assert "100 not divisible by model=8" in p.decisions[k].reason
    assert not p.pairs[0].sharded


def test_fsdp_fallback_threshold_and_free_dims():
    tree = {"big": S((1024, 30), F32), "small": S((16, 16), F32), "odd": S((1023, 7), F32)}
    p = tpflax.plan(tree, {"fsdp": 4}, fsdp_min_bytes=1 << 14)
    assert spec(p, "big") == P("fsdp", None) and p.decisions["big"].strategy == "fsdp"
    assert spec(p, "small") == P(None, None) and "below fsdp_min_bytes" in p.decisions["small"].reason
    assert spec(p, "odd") == P(None, None) and "no free dim divisible" in p.decisions["odd"].reason
    assert p.decisions["big"].bytes_per_device == 1024 * 30 * 4 // 4


def test_reasons_of_fsdp_split_leaves_do_not_say_they_stay_whole():
    # fsdp_min_bytes=0 split norms after their reason said "tiny and needed whole by every device"
    tree = zoo.get("mlp").abstract_variables()
    for mesh in ({"fsdp": 2, "model": 4}, {"fsdp": 8}):
        p = tpflax.plan(tree, mesh, fsdp_min_bytes=0)
        split = {path: d.reason for path, d in p.decisions.items() if d.fsdp}
        assert split and not [r for r in split.values() if "so replicated" in r or "needed whole" in r], mesh
    assert p.decisions["params/block_0/norm/scale"].reason == (
        "norm parameter: tiny, not split over the tensor axes; fsdp: dim 0 (64) split over fsdp=8 "
        "(leaf 256 B >= fsdp_min_bytes)")
    assert p.decisions["params/block_0/mlp/up/bias"].reason == (
        "bias of block_0/mlp/up/kernel (replicate): its output is not tensor-split, so neither is the bias; "
        "fsdp: dim 0 (256) split over fsdp=8 (leaf 1024 B >= fsdp_min_bytes)")


def test_integer_bool_and_key_leaves_are_replicated():
    tree = {"step": jnp.zeros((), jnp.int32), "mask": S((1024, 1024), jnp.bool_),
            "ids": S((4096, 64), jnp.int32), "rng": jax.random.key(0)}
    p = tpflax.plan(tree, {"fsdp": 2, "model": 4}, fsdp_min_bytes=0)
    for path in tree:
        assert spec(p, path) == P(*([None] * len(p.decisions[path].shape))), path
    assert p.decisions["rng"].kind == "int"


def test_multiple_tensor_axes_combine():
    tree = {"n": {"scale": S((64,), F32)}, "mlp": {"up": {"kernel": S((64, 256), F32)},
                                                   "down": {"kernel": S((256, 64), F32)}}}
    p = tpflax.plan(tree, {"tp": 2, "model": 4})
    assert spec(p, "mlp/up/kernel") == P(None, ("tp", "model"))
    assert p.decisions["mlp/up/kernel"].bytes_per_device == 64 * 256 * 4 // 8


# --------------------------------------------------------------------------- user control

LLAMA = None


def llama_tree():
    global LLAMA
    if LLAMA is None:
        LLAMA = zoo.get("llama").abstract_variables()
    return LLAMA


def test_rules_beat_heuristics_first_match_wins():
    rules = [(r"mlp/up_proj/kernel$", P("model", None)), (r"mlp/", "replicate"),
             (r"embed/embedding", "replicate")]
    p = tpflax.plan(llama_tree(), {"model": 4}, rules=rules)
    d = p.decisions["params/layers_0/mlp/up_proj/kernel"]
    assert d.spec == P("model", None) and d.source == "rule" and "rule 0" in d.reason
    assert spec(p, "params/layers_0/mlp/down_proj/kernel") == P(None, None)
    assert p.decisions["params/layers_0/mlp/down_proj/kernel"].strategy == "replicate"
    assert spec(p, "params/embed/embedding") == P(None, None)
    assert not p.warnings


def test_strategy_rules_and_warnings_for_unmatched_and_shadowed_rules():
    rules = [(r"lm_head", "row"), (r"nothing_matches_this", "replicate"), (r"lm_head/kernel", "column")]
    p = tpflax.plan(llama_tree(), {"model": 4}, rules=rules)
    assert spec(p, "params/lm_head/kernel") == P("model", None)
    text = "\n".join(p.warnings)
    assert "nothing_matches_this" in text and "matches no leaf" in text
    assert "never wins" in text and "lm_head/kernel" in text


def test_invalid_forced_specs_are_collected_into_one_error():
    rules = [(r"q_proj/kernel", P(None, None, "model")),        # head_dim 16 ok... on model=4
             (r"lm_head/kernel", P(None, None, None)),          # rank 3 > 2
             (r"down_proj/kernel", P("model", "model"))]        # axis twice
    p_ok = tpflax.plan(llama_tree(), {"model": 4}, rules=rules[:1])
    assert spec(p_ok, "params/layers_0/attn/q_proj/kernel") == P(None, None, "model")
    with pytest.raises(tpflax.SpecError) as e:
        tpflax.plan(llama_tree(), {"model": 3}, rules=rules)
    msg = str(e.value)
    assert "params/layers_0/attn/q_proj/kernel" in msg and "not divisible" in msg and "model=3" in msg
    assert "params/lm_head/kernel" in msg and "rank 2" in msg
    assert "params/layers_1/mlp/down_proj/kernel" in msg and "twice" in msg
    assert len(e.value.problems) >= 5


def test_rule_naming_unknown_axis_or_strategy():
    with pytest.raises(tpflax.RuleError, match="'tensor'.*mesh is model=4"):
        tpflax.plan(llama_tree(), {"model": 4}, rules=[("up", P(None, "tensor"))])
    with pytest.raises(tpflax.RuleError, match="strategy 'colum' is unknown"):
        tpflax.plan(llama_tree(), {"model": 4}, rules=[("up", "colum")])
    with pytest.raises(tpflax.RuleError, match="does not compile"):
        tpflax.plan(llama_tree(), {"model": 4}, rules=[("up(", "column")])
    with pytest.raises(tpflax.SpecError, match="no fsdp axis"):
        tpflax.plan(llama_tree(), {"model": 4}, rules=[("up_proj", "fsdp")])


class _Annotated(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(256, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("embed", "mlp")), name="wi")(x)
        h = nn.Dense(64, kernel_init=nn.with_logical_partitioning(
            nn.initializers.lecun_normal(), ("mlp", "embed")), name="wo")(h)
        return nn.Dense(64, kernel_init=nn.with_partitioning(
            nn.initializers.lecun_normal(), ("model", None)), name="direct")(h)


def test_logical_and_mesh_axis_annotations():
    tree = jax.eval_shape(_Annotated().init, jax.random.key(0), S((2, 64), F32))
    p = tpflax.plan(tree, {"fsdp": 2, "model": 4})
    assert spec(p, "params/wi/kernel") == P("fsdp", "model")
    assert spec(p, "params/wo/kernel") == P("model", "fsdp")
    assert spec(p, "params/direct/kernel") == P("model", None)
    assert p.decisions["params/wi/kernel"].source == "annotation"
    assert "logical annotation ('embed', 'mlp')" in p.decisions["params/wi/kernel"].reason
    # User logical rules replace the defaults; the specs tree has boxes unwrapped.
    p = tpflax.plan(tree, {"fsdp": 2, "model": 4}, logical_rules=[("embed", None), ("mlp", "model")])
    assert spec(p, "params/wi/kernel") == P(None, "model")
    assert p.specs["params"]["wi"]["kernel"] == P(None, "model")
    # Rules still beat annotations.
    p = tpflax.plan(tree, {"fsdp": 2, "model": 4}, rules=[("wi", "replicate")])
    assert spec(p, "params/wi/kernel") == P(None, None)


def test_annotations_that_do_not_divide_are_dropped_with_a_warning():
    tree = jax.eval_shape(_Annotated().init, jax.random.key(0), S((2, 64), F32))
    p = tpflax.plan(tree, {"model": 3})
    assert spec(p, "params/wi/kernel") == P(None, None)
    assert any("params/wi/kernel" in w and "not divisible" in w for w in p.warnings)


def test_nnx_state_with_partitioning_metadata():
    from flax import nnx

    class Model(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(64, 256, rngs=rngs, kernel_init=nnx.with_partitioning(
                nnx.initializers.lecun_normal(), (None, "model")))
            self.down = nnx.Linear(256, 64, rngs=rngs)
            self.norm = nnx.LayerNorm(64, rngs=rngs)

    abstract = jax.sharding.AbstractMesh((4,), ("model",),
                                         axis_types=(jax.sharding.AxisType.Auto,))
    with jax.sharding.use_abstract_mesh(abstract):
        model = nnx.eval_shape(lambda: Model(nnx.Rngs(0)))
    state = nnx.state(model)
    p = tpflax.plan(state, abstract)
    assert spec(p, "up/kernel") == P(None, "model") and p.decisions["up/kernel"].source == "annotation"
    assert spec(p, "down/kernel") == P("model", None)  # paired by the heuristics
    assert isinstance(p.specs, nnx.State)
    assert p.specs["down"]["kernel"] == P("model", None)


# --------------------------------------------------------------------------- inputs

def test_inputs_concrete_frozen_boxed_and_collections_agree():
    m = zoo.get("mlp")
    concrete = m.init(0)
    abstract = m.abstract_variables()
    before = jax.tree_util.tree_map(np.asarray, concrete)
    plans = [tpflax.plan(t, {"data": 2, "model": 4}) for t in
             (concrete, abstract, freeze(abstract), abstract["params"])]
    base = {k.removeprefix("params/"): v.spec for k, v in plans[0].decisions.items()}
    for p in plans[1:]:
        assert {k.removeprefix("params/"): v.spec for k, v in p.decisions.items()} == base
    # The caller's tree is untouched.
    jax.tree_util.tree_map(np.testing.assert_array_equal, before,
                           jax.tree_util.tree_map(np.asarray, concrete))


def test_variable_collections_include_batch_stats():
    p = tpflax.plan(zoo.get("cnn").abstract_variables(), {"model": 4})
    assert any(k.startswith("batch_stats/") for k in p.decisions)
    assert p.decisions["batch_stats/block_0/bn1/mean"].kind == "state"


def test_plan_is_deterministic_and_ignores_insertion_order():
    tree = llama_tree()["params"]
    shuffled = {k: tree[k] for k in reversed(list(tree))}
    a = tpflax.plan(tree, {"fsdp": 2, "model": 4})
    b = tpflax.plan(shuffled, {"fsdp": 2, "model": 4})
    assert a.to_json() == b.to_json()


def test_tree_is_not_mutated_and_deepcopy_equal():
    tree = {"a": {"kernel": np.ones((8, 16), np.float32)}, "b": {"kernel": np.ones((16, 8), np.float32)}}
    snapshot = copy.deepcopy(tree)
    tpflax.plan(tree, {"model": 2})
    assert tree.keys() == snapshot.keys()
    for k in tree:
        np.testing.assert_array_equal(tree[k]["kernel"], snapshot[k]["kernel"])


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize("mesh,words", [
    ({"model": 0}, "sizes must be integers >= 1"),
    ({"model": -2}, "sizes must be integers >= 1"),
    ([("model", 2), ("model", 2)], "appears twice"),
    ({"weird": 2}, "axis_roles"),
    ({}, "no axes"),
    ("model=two", "is not name=size"),
    (42, "cannot read a mesh"),
])
def test_bad_meshes(mesh, words):
    with pytest.raises(tpflax.MeshError, match=words):
        tpflax.plan({"w": S((8, 8), F32)}, mesh)


def test_axis_roles_override_unknown_names():
    tree = {"n": {"scale": S((64,), F32)}, "up": {"kernel": S((64, 256), F32)},
            "down": {"kernel": S((256, 64), F32)}}
    p = tpflax.plan(tree, {"x": 2, "y": 4}, axis_roles={"x": "data", "y": "tensor"})
    assert spec(p, "up/kernel") == P(None, "y")


def test_empty_tree_and_non_array_leaves():
    with pytest.raises(tpflax.TreeError, match="empty"):
        tpflax.plan({}, {"model": 2})
    with pytest.raises(tpflax.TreeError) as e:
        tpflax.plan({"a": "hello", "b": {"c": object()}, "ok": S((2,), F32)}, {"model": 2})
    assert "a: leaf of type str" in str(e.value) and "b/c: leaf of type object" in str(e.value)


def test_every_error_is_a_tpflax_error():
    for cls in (tpflax.MeshError, tpflax.RuleError, tpflax.SpecError, tpflax.TreeError,
                tpflax.PlanMismatchError, tpflax.PlanFormatError, tpflax.DeviceError,
                tpflax.ModelLoadError, tpflax.CompileError):
        assert issubclass(cls, tpflax.TpflaxError)


# --------------------------------------------------------------------------- JSON and report

def test_json_round_trip():
    p = tpflax.plan(llama_tree(), {"fsdp": 2, "model": 4}, fsdp_min_bytes=0,
                    rules=[("lm_head", "replicate")])
    q = tpflax.Plan.from_json(p.to_json())
    assert q.decisions == p.decisions
    assert q.pairs == p.pairs and q.warnings == p.warnings and q.mesh == p.mesh
    assert q.specs["params"]["layers_0"]["mlp"]["up_proj"]["kernel"] == P("fsdp", "model")
    assert q.to_json() == p.to_json()
    # The rebuilt plan lays out on the original tree by path.
    laid = q.specs_for(llama_tree())
    assert laid["params"]["lm_head"]["kernel"] == P(None, None)


@pytest.mark.parametrize("mutate,words", [
    (lambda d: d.update(version=99), "version 99 is not supported"),
    (lambda d: d.update(format="other"), "not a tpflax plan"),
    (lambda d: d["decisions"][0].update(spec=["nope", "nope"]), "invalid"),
    (lambda d: d["decisions"][0].pop("shape"), "malformed"),
])
def test_bad_plan_json(mutate, words):
    data = json.loads(tpflax.plan(llama_tree(), {"model": 4}).to_json())
    mutate(data)
    with pytest.raises(tpflax.PlanFormatError, match=words):
        tpflax.Plan.from_json(json.dumps(data))
    with pytest.raises(tpflax.PlanFormatError, match="does not parse"):
        tpflax.Plan.from_json("{not json")


def test_specs_for_a_changed_tree_names_the_difference():
    p = tpflax.plan(llama_tree(), {"model": 4})
    changed = jax.tree_util.tree_map(lambda x: x, llama_tree())
    changed["params"]["lm_head"]["kernel"] = S((64, 512), F32)
    del changed["params"]["norm"]
    with pytest.raises(tpflax.PlanMismatchError) as e:
        p.specs_for(changed)
    assert "params/lm_head/kernel: shape (64, 512)" in str(e.value)
    assert "params/norm/scale: in the plan but missing" in str(e.value)


def test_report_has_table_totals_and_warnings():
    tree = {"big": S((2048, 1000), F32), "n": {"scale": S((64,), F32)}}
    p = tpflax.plan(tree, {"model": 8}, rules=[("zzz", "replicate")])
    text = tpflax.report(p, pairs=True)
    for word in ("path", "kind", "shape", "dtype", "strategy", "spec", "per device", "reason",
                 "parameters without sharding", "fullest device", "savings per device", "warnings",
                 "zzz", "replicated on every device"):
        assert word in text, word
    data = json.loads(tpflax.report(p, fmt="json"))
    assert data["totals"]["bytes"] == p.total_bytes
    assert 0 <= p.savings < 100


def test_savings_and_bytes_per_device_are_exact():
    p = tpflax.plan({"n": {"scale": S((64,), F32)}, "up": {"kernel": S((64, 256), F32)},
                     "down": {"kernel": S((256, 64), F32)}}, {"model": 4})
    assert p.total_bytes == (64 + 2 * 64 * 256) * 4
    assert p.bytes_per_device == (64 + 2 * 64 * 256 // 4) * 4


def test_mesh_shape_reads_jax_meshes():
    m = tpflax.make_mesh({"data": 2, "model": 4})
    assert m.axis_types == (jax.sharding.AxisType.Auto,) * 2
    assert mesh_shape(m).sizes == {"data": 2, "model": 4}
    assert mesh_shape(tpflax.abstract_mesh("data=2,model=4")).sizes == {"data": 2, "model": 4}
    with pytest.raises(tpflax.DeviceError, match="xla_force_host_platform_device_count=64"):
        tpflax.make_mesh({"data": 8, "model": 8})


def test_a_norm_inside_the_ffn_does_not_flip_the_pair():
    """NormFormer-style FFN norm over the hidden width: names win, and the plan says so."""
    tree = {"mlp": {"up": {"kernel": S((512, 2048), F32)}, "ffn_ln": {"scale": S((2048,), F32)},
                    "down": {"kernel": S((2048, 512), F32)}}}
    p = tpflax.plan(tree, {"model": 4})
    assert spec(p, "mlp/up/kernel") == P(None, "model")
    assert spec(p, "mlp/down/kernel") == P("model", None)
    assert any("mlp/up/kernel" in w and "pass model=" in w for w in p.warnings)
    # With residual norms around it, the most common norm width is the residual one.
    tree["ln_1"] = {"scale": S((512,), F32)}
    tree["ln_2"] = {"scale": S((512,), F32)}
    p = tpflax.plan(tree, {"model": 4})
    assert spec(p, "mlp/up/kernel") == P(None, "model") and not p.warnings


def test_two_mlps_in_one_block_pair_by_name():
    blk = {"n": {"scale": S((64,), F32)}}
    for m in ("a", "b"):
        blk[f"{m}_up"] = {"kernel": S((64, 256), F32)}
        blk[f"{m}_down"] = {"kernel": S((256, 64), F32)}
    p = tpflax.plan({"blk": blk}, {"model": 4})
    assert p.decisions["blk/a_up/kernel"].pair == p.decisions["blk/a_down/kernel"].pair
    assert p.decisions["blk/b_up/kernel"].pair == p.decisions["blk/b_down/kernel"].pair
    assert p.decisions["blk/a_up/kernel"].pair != p.decisions["blk/b_up/kernel"].pair
    assert spec(p, "blk/b_down/kernel") == P("model", None)


def test_tree_only_mirror_pair_follows_linens_numbering_over_a_hidden_norm():
    # Dense(64 -> 256) -> BatchNorm(256) -> Dense(256 -> 64), a layer per statement: the one norm's
    # width (256) is no residual width; linen numbers the unnamed layers in creation order, here
    # call order, so Dense_0 is the column (it was split as a row, "fed" by Dense_1, before), as
    # the trace says. Both are guesses without the trace: the plan says so.
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.Dense(256)(x)
            h = nn.BatchNorm(use_running_average=True)(h)
            return nn.Dense(64)(nn.relu(h))

    m, x = M(), jax.ShapeDtypeStruct((16, 64), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    tree = tpflax.plan(v, {"data": 2, "model": 4})
    traced = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(x,))
    for k, spec in (("params/Dense_0/kernel", P(None, "model")), ("params/Dense_1/kernel", P("model", None))):
        assert tree.decisions[k].spec == traced.decisions[k].spec == spec
    assert "created before its mirror" in tree.decisions["params/Dense_0/kernel"].reason
    assert any("linen's layer numbering" in w and "pass model=" in w for w in tree.warnings)


def test_mesh_papercuts():
    # numpy integer sizes (np.prod, mesh.devices.shape) were "not integers"; report(fmt=) left 'html'
    # out of its message; make_mesh(a Mesh, target=) returned the Mesh, ignoring the target
    import importlib.util

    m = tpflax.make_mesh({"data": np.int64(2), "model": 4})
    assert dict(m.shape) == {"data": 2, "model": 4} and type(tpflax.plan(
        {"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": np.int32(2)}).mesh.sizes["model"]) is int
    p = tpflax.plan({"w": jax.ShapeDtypeStruct((8, 8), "float32")}, {"model": 2})
    with pytest.raises(tpflax.OptionError, match="'text', 'json' or 'html'"):
        tpflax.report(p, fmt="htm")
    if importlib.util.find_spec("libtpu") is not None:
        t = tpflax.make_mesh(tpflax.make_mesh({"data": 2, "model": 4}), target="tpu-v5e:2x4")
        assert t.devices.flat[0].platform == "tpu" and dict(t.shape) == {"data": 2, "model": 4}


def test_an_nnx_module_plans_as_its_state():
    # plan(module) walked the Module as a bare pytree: its BatchNorm statistics lost their BatchStat type,
    # so the plan priced and built optimizer state for them and refused tx.init(nnx.state(m, nnx.Param))
    import optax
    from flax import nnx

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(32, 128, rngs=rngs)
            self.bn = nnx.BatchNorm(128, rngs=rngs)
            self.l2 = nnx.Linear(128, 16, rngs=rngs)

    m = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    mesh = {"data": 2, "model": 4}
    of_module, of_state = tpflax.plan(m, mesh), tpflax.plan(nnx.state(m), mesh)
    assert of_module.decisions == of_state.decisions
    assert not of_module.decisions["bn/mean"].trainable
    tx = optax.adam(1e-3)
    made = jax.eval_shape(tx.init, nnx.state(m, nnx.Param))
    sh = tpflax.optimizer_shardings(tx, of_module, tpflax.make_mesh(mesh), opt_state=made)
    assert "mean" not in sh[0].mu["bn"]
    est = [tpflax.estimate(p, tx, {"x": (8, 32)}).per_device.opt_state for p in (of_module, of_state)]
    assert est[0] == est[1]


def test_walk_once_plans_every_mesh_as_plan_does():
    # suggest_mesh plans one tree on every candidate mesh inside walk_once(): the tree is walked and
    # classified once (the facts do not depend on the mesh), and each plan is the one plan() makes
    from tpflax import zoo
    from tpflax._src.planner.plan import _walked, walk_once

    tree = zoo.get("llama").abstract_variables()
    meshes = ({"data": 2, "model": 4}, {"fsdp": 8}, {"fsdp": 2, "model": 4})
    with walk_once():
        inside = [tpflax.plan(tree, m) for m in meshes]
        assert _walked(tree, None, None)[2] is _walked(tree, None, None)[2]
    for m, p in zip(meshes, inside, strict=True):
        assert p.to_json() == tpflax.plan(tree, m).to_json()
    assert _walked(tree, None, None)[2] is not _walked(tree, None, None)[2]  # no cache outside the block


def test_plan_takes_a_bare_batch_size_with_a_sample_as_estimate_does():
    """plan(..., model=, sample=, batch=8) of a model whose input is no token ids raised "a bare batch size (8)
    needs the model ...; pass model=" with model= given (estimate takes the same batch=8): the sample's
    leading dim is the batch size, for the price too."""

    class Mlp(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16)(nn.gelu(nn.Dense(256)(x)))

    m, x = Mlp(), jax.ShapeDtypeStruct((2, 32, 64), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    sized = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(x,), batch=8)
    shaped = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(x,),
                         batch=(jax.ShapeDtypeStruct((8, 32, 64), jnp.float32),))
    assert [d.reason for d in sized.decisions.values()] == [d.reason for d in shaped.decisions.values()]
    assert "256 tokens per step" in sized.decisions["params/Dense_0/kernel"].reason


class _Layer(nn.Module):
    """A Llama-shaped layer (q/k/v/o by heads, gate/up/down) at tiny width, for the name-matching count below."""

    @nn.compact
    def __call__(self, x):
        h = nn.RMSNorm(name="attention_norm")(x)
        q = nn.DenseGeneral((4, 8), name="q_proj")(h)
        k = nn.DenseGeneral((2, 8), name="k_proj")(h)
        v = nn.DenseGeneral((2, 8), name="v_proj")(h)
        a = jnp.repeat(k, 2, axis=-2) * q + jnp.repeat(v, 2, axis=-2)
        x = x + nn.DenseGeneral(32, axis=(-2, -1), name="o_proj")(a)
        h = nn.RMSNorm(name="ffn_norm")(x)
        up = nn.silu(nn.Dense(64, name="gate_proj")(h)) * nn.Dense(64, name="up_proj")(h)
        return x + nn.Dense(32, name="down_proj")(up)


class _Stack(nn.Module):
    layers: int

    @nn.compact
    def __call__(self, x):
        for i in range(self.layers):
            x = _Layer(name=f"layers_{i}")(x)
        return x


def test_a_deep_stack_matches_its_layer_names_once_per_name(monkeypatch):
    """The role passes ask each layer's role name (``role_name``) and match it against the column and row name
    patterns many times per block; a deep stack's layers share their names, so the patterns run once per distinct
    name, not per layer: before, a 16-layer stack matched them 768 times against a 2-layer one's 96 (the 70B tree's
    plan spent ~12k such regex calls, 395.7k Python calls per plan -> 342.0k with the widths memo). Same plan."""
    from tpflax._src.facts import classify
    from tpflax._src.planner import roles

    class Counted:
        def __init__(self, rx):
            self.rx, self.n = rx, 0

        def match(self, name):
            self.n += 1
            return self.rx.match(name)

    def matches(layers):
        for names in (classify.COLUMN_NAMES, classify.ROW_NAMES):
            getattr(names, "_seen", {}).clear()
        if hasattr(roles, "_role_name"):
            roles._role_name.cache_clear()
        counted = [Counted(classify.COLUMN_NAMES.rx), Counted(classify.ROW_NAMES.rx)]
        monkeypatch.setattr(classify.COLUMN_NAMES, "rx", counted[0])
        monkeypatch.setattr(classify.ROW_NAMES, "rx", counted[1])
        params = jax.eval_shape(_Stack(layers).init, jax.random.key(0), jnp.zeros((2, 32)))
        plan = tpflax.plan(params, {"data": 2, "model": 4}, tensor_min_bytes=0)
        monkeypatch.undo()
        return sum(c.n for c in counted), plan

    shallow, p2 = matches(2)
    deep, p16 = matches(16)
    assert deep == shallow
    for i in (0, 15):  # the layers still pair as Megatron's: q/k/v/gate/up on their heads/outputs, o/down on inputs
        d = p16.decisions
        assert d[f"params/layers_{i}/q_proj/kernel"].spec == P(None, "model", None)
        assert d[f"params/layers_{i}/o_proj/kernel"].spec == P("model", None, None)
        assert d[f"params/layers_{i}/up_proj/kernel"].spec == P(None, "model")
        assert d[f"params/layers_{i}/down_proj/kernel"].spec == P("model", None)
    assert p2.decisions["params/layers_1/q_proj/kernel"].spec == P(None, "model", None)
