"""estimate(): memory from real optax state shapes, communication from the plan's semantics."""

import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import COMM_XLA, FAST_XLA, newer_xla
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import EstimateError, estimate, trace_activations, zoo
from tpflax._src.cost import activations
from tpflax._src.cost.batch import parse_batch
from tpflax._src.cost.optstate import opt_state_specs

F32 = "float32"


def mlp_tree(d=64, f=256):
    sds = jax.ShapeDtypeStruct
    return {"params": {"mlp": {"up": {"kernel": sds((d, f), F32)}, "down": {"kernel": sds((f, d), F32)}},
                       "norm": {"scale": sds((d,), F32)}}}


def by(est, kind, axis):
    return est.comm.get(kind, {}).get(axis, 0.0)


def test_memory_adam_state_and_savings():
    p = tpflax.plan(mlp_tree(), {"model": 4})
    e = estimate(p, optax.adam(1e-3), {"x": (8, 64)})
    kernel = 64 * 256 * 4
    assert e.per_device.params == 2 * kernel // 4 + 64 * 4
    assert e.per_device.grads == e.per_device.params
    # mu + nu follow the params' specs; the int32 step count is replicated
    assert e.per_device.opt_state == 2 * e.per_device.params + 4
    assert e.unsharded.opt_state == 2 * e.unsharded.params + 4
    assert e.savings["params"] == pytest.approx(100 * (1 - e.per_device.params / e.unsharded.params))
    assert e.per_device.inputs == 8 * 64 * 4 + 8 * 4  # x and integer labels, replicated (no data axis)


def test_adafactor_factored_moments_and_bf16_grads():
    sds = jax.ShapeDtypeStruct
    tree = {"params": {"up": {"kernel": sds((256, 512), F32)}, "down": {"kernel": sds((512, 256), F32)}}}
    p = tpflax.plan(tree, {"model": 4})
    ada = estimate(p, optax.adafactor(1e-3), {"x": (8, 256)}, grad_dtype="bfloat16")
    adam = estimate(p, optax.adam(1e-3), {"x": (8, 256)})
    # factored second moments are rows + columns, far smaller than adam's two full moments
    assert ada.unsharded.opt_state < adam.unsharded.opt_state / 50
    assert ada.per_device.grads == adam.per_device.grads // 2
    state, specs = opt_state_specs(p, optax.adafactor(1e-3))
    leaves = jax.tree_util.tree_leaves(specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
    assert len(leaves) == len(jax.tree_util.tree_leaves(state))
    assert any("model" in tuple(s) for s in leaves)  # the surviving split dim keeps its axis


def test_tensor_pair_all_reduces_forward_and_backward():
    p = tpflax.plan(mlp_tree(), {"model": 4})
    e = estimate(p, None, {"x": (8, 64)})
    act = 8 * 64 * 4  # rows x d x f32
    assert by(e, "all-reduce", "model") == pytest.approx(2 * 2 * 3 / 4 * act)
    assert {i.why.split(":")[0] for i in e.items} == {"row params/mlp/down/kernel",
                                                      "columns params/mlp/up/kernel"}
    # remat saves less but re-issues no collectives (what XLA compiles; see the benchmark)
    remat = estimate(p, None, {"x": (8, 64)}, remat=True)
    assert by(remat, "all-reduce", "model") == by(e, "all-reduce", "model")


def test_tpu_fsdp_gradients_reduce_scatter_beside_a_tensor_axis_not_beside_a_data_axis():
    # measured (libtpu 0.0.42.1, v5e:2x4; tests/test_tpu.py): XLA:TPU reduce-scatters a pinned fsdp
    # gradient whose shard is whole tiles on fsdp=2,model=4 as on fsdp=8; with a data axis it sums
    # it over data+fsdp in one all-reduce; the 1-D norm scale is all-reduced whole either way
    tree = mlp_tree(256, 1024)
    leaf = 256 * 256 * 4  # each kernel's gradient on one tensor rank: (256, 1024) / model=4
    tp = estimate(tpflax.plan(tree, {"fsdp": 2, "model": 4}, fsdp_min_bytes=1024), optax.sgd(0.1),
                  {"x": (16, 256)}, backend="tpu")
    assert by(tp, "reduce-scatter", "fsdp") == pytest.approx(2 * 1 / 2 * leaf)
    assert by(tp, "all-reduce", "fsdp") == pytest.approx(2 * 1 / 2 * 256 * 4)  # the norm scale
    dp = estimate(tpflax.plan(tree, {"data": 2, "fsdp": 2, "model": 2}, fsdp_min_bytes=1024), optax.sgd(0.1),
                  {"x": (16, 256)}, backend="tpu")
    assert "reduce-scatter" not in dp.comm and by(dp, "all-reduce", "data+fsdp") > 0
    # on v5e:4x4 XLA:TPU runs fsdp=16's reductions N-dimensionally (all-reduced whole), but an fsdp
    # group of 4 beside model=4 on one ring: reduce-scatters (the tiny zoo Llama: 490 KB compiled,
    # 488 KB estimated; 617 KB when the whole slice decided)
    for mesh, scattered in (({"fsdp": 4, "model": 4}, True), ({"fsdp": 16}, False)):
        e = estimate(tpflax.plan(tree, mesh, fsdp_min_bytes=1024), optax.sgd(0.1), {"x": (16, 256)},
                     backend="tpu", target="tpu-v5e:4x4")
        assert ("reduce-scatter" in e.comm) == scattered, (mesh, e.comm)


class _TiedLM(nn.Module):
    vocab: int

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(self.vocab, 768, name="embed")
        return emb.attend(nn.Dense(768, name="mid", use_bias=False)(emb(ids)))


@pytest.mark.parametrize("vocab, scattered", [(32128, False), (50272, False), (32768, True), (20000, True)])
def test_tpu_all_reduces_a_big_vocab_split_tables_gradient_whole_when_its_shard_rows_are_off_64(vocab, scattered):
    # measured (libtpu 0.0.42.1, v5e:2x4, fsdp=2,model=4; this model): XLA:TPU all-reduces the
    # lookup's and the logits' fsdp gradients of a tied P('model', 'fsdp') table whole when its
    # tensor shard is over ~17 MiB with rows not a multiple of 64 (T5-base's 8032, OPT-125m's 12568
    # rows); 8192-row shards and 5000-row ones (15 MiB) reduce-scatter the one and all-reduce the other
    ids = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    m = _TiedLM(vocab)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), {"fsdp": 2, "model": 4},
                    rules=[("embed", P("model", "fsdp")), ("mid", P("fsdp", None))])
    e = estimate(p, optax.adamw(1e-3), model=m, sample=(ids,), loss=lambda out, *_: jnp.mean(out ** 2),
                 backend="tpu")
    shard = vocab // 4 * 768 * 4
    table = [i for i in e.items if i.source.endswith("embed/embedding") and "fsdp" in i.axes and i.kind != "all-gather"]
    assert sum(i.ring_bytes * i.count for i in table) == pytest.approx(shard * (1.5 if scattered else 2))
    assert any(i.kind == "reduce-scatter" for i in table) == scattered


def test_remat_sums_the_attention_output_again():
    """XLA recomputes a remat'd block's attention output to rebuild its MLP's input, so that row
    all-reduce runs twice; the MLP's, the block output, once (measured: benchmarks/results/tpu_aot.md,
    Llama-2-7B fsdp=2,model=4 remat on; XLA:CPU alike, test_remat_resums_on_cpu_as_compiled)."""
    sds = jax.ShapeDtypeStruct
    attn = {n: {"kernel": sds((64, 64), F32)} for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
    tree = {"params": {"attn": attn, **mlp_tree()["params"]}}
    p = tpflax.plan(tree, {"model": 4})
    act = 8 * 64 * 4 * 3 / 4  # one (rows, d) float32 all-reduce over 4, ring bytes per device
    for backend, extra in (("tpu", 2 * act), ("cpu", 2 * act)):
        off = estimate(p, None, {"x": (8, 64)}, backend=backend)
        on = estimate(p, None, {"x": (8, 64)}, backend=backend, remat=True)
        assert by(on, "all-reduce", "model") - by(off, "all-reduce", "model") == pytest.approx(extra)


def test_remat_sums_a_normalised_conv_output_again():
    """A remat'd conv block's second conv is a row whose output the next BatchNorm's backward reads: XLA:TPU sums
    it again in the recompute (ResNet-18 fsdp=2,model=4 bf16 remat on, v5e:2x4: +0.27 GiB of all-reduces,
    -30.6% without this); XLA:CPU too (the toy cnn remat fsdp=2,model=4, batch 16: a ``rematted_computation``
    all-reduce of ``block_2/conv2``'s output beside the forward one). Every row of the toy cnn is a conv, none
    feeds only a residual add, so remat doubles exactly the forward sums. Exact"""
    for backend in ("tpu", "cpu"):
        e = {}
        for remat in (False, True):
            m = zoo.get("cnn", remat=remat)
            p = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "model": 4})
            e[remat] = estimate(p, optax.sgd(0.1), jax.eval_shape(lambda m=m: m.make_batch(0, 16)), model=m,
                                backend=backend)
        fwd = [i for i in e[False].items if i.why.startswith("row") and "forward" in i.why]
        assert fwd and all("conv" in i.why for i in fwd)
        extra = sum(i.ring_bytes * i.count for i in fwd)
        assert by(e[True], "all-reduce", "model") - by(e[False], "all-reduce", "model") == pytest.approx(extra)


def test_remat_on_tpu_a_scanned_stack_sums_its_rows_as_the_unrolled_one():
    """The residual rule reads a scanned stack as a repeated block (``layers``, from the stacked leaves'
    layers dim) as it reads the indexed blocks (``layers_*``): the MLP's row feeds only its residual add, so
    neither re-sums it in the recompute (the llama-2-7b-scan remat step compiled for v5e-256 all-reduces
    17.7 GiB over model, as estimated; counting the MLP's row again read 21.2), and neither counts its
    output in the recompute (the scanned one did: 286720 bytes against 155648). Exact"""
    from tpflax._src.cost.activations import trace_activations
    from tpflax._src.cost.leaves import merge
    from tpflax._src.cost.residual import alike_path, residual_outputs

    got, rec, res = {}, {}, {}
    for name in ("llama", "llama-scan"):  # 4 key/value heads: the two plans split them alike (see test_choose)
        m = zoo.get(name, remat=True, n_kv_heads=4)
        p = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "model": 4})
        e = estimate(p, optax.adamw(1e-3), jax.eval_shape(lambda m=m: m.make_batch(0, 8)), model=m)
        got[name], rec[name] = by(e, "all-reduce", "model"), e.breakdown.recompute
        acts = trace_activations(m, 2)
        res[name] = [alike_path(r).replace("layers_*", "layers") for r in residual_outputs(merge(p.decisions, acts), acts)]
    assert got["llama"] == got["llama-scan"] > 0, got
    assert rec["llama"] == rec["llama-scan"] > 0, rec
    assert res["llama-scan"] == ["layers/attn/o_proj", "layers/attn", "layers/mlp/down_proj", "layers/mlp"]
    assert res["llama"] == 2 * res["llama-scan"]  # the unrolled stack's two blocks


@pytest.mark.parametrize("norm", [True, False])
def test_remat_on_tpu_a_scanned_gpt_stack_prices_as_the_unrolled_one(norm):
    """A GPT-2-like stack of remat'd pre-norm MLP blocks (``h_0``.. unrolled, ``h`` under nn.scan): with a
    LayerNorm the row ``proj`` feeds only the residual add and is summed once; without one the rule re-sums it
    in the recompute. Scanned and unrolled give the same all-reduces and the same recompute either way (before
    the residual rule read scanned stacks, the norm-free scanned stack skipped the re-sum and the normed one
    counted ``proj``'s output in its recompute). Exact"""
    d, n = 64, 3

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.LayerNorm(name="ln")(x) if norm else x
            return x + nn.Dense(d, name="proj")(nn.gelu(nn.Dense(4 * d, name="fc")(h))), None

    class Net(nn.Module):
        scan: bool

        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(100, d, name="wte")(ids)
            if self.scan:
                stack = nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True}, length=n)
                h, _ = stack(name="h")(h, None)
            else:
                for i in range(n):
                    h, _ = nn.remat(Block)(name=f"h_{i}")(h, None)
            return nn.Dense(100, name="head")(h)

    ids = jax.ShapeDtypeStruct((8, 16), "int32")
    got = {}
    for scan in (False, True):
        m = Net(scan)
        p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), {"fsdp": 2, "model": 4}, model=m, sample=(ids,))
        e = estimate(p, optax.adamw(1e-3), model=m, sample=(ids,), remat=True)
        rows = [i for i in e.items if i.why.startswith("row")]
        assert len(rows) == 1 and "proj" in rows[0].why, rows
        # the row's forward sums: once per layer, and again in each layer's recompute without a norm
        assert rows[0].count == n * (1 if norm else 2), rows[0]
        got[scan] = (by(e, "all-reduce", "model"), e.breakdown.recompute)
    assert got[False] == got[True], got


def test_data_parallel_and_fsdp_gradients():
    p = tpflax.plan(mlp_tree(), {"data": 2, "fsdp": 4}, fsdp_min_bytes=1024)
    up = p.decisions["params/mlp/up/kernel"]
    assert "fsdp" in str(up.spec)
    e = estimate(p, optax.sgd(0.1), {"x": (16, 64)}, backend="gpu")
    g = up.bytes_per_device
    # fsdp leaves: all-gather forward, reduce-scatter of the gradient, all-reduce of the shard over data
    assert by(e, "all-gather", "fsdp") == pytest.approx(2 * 3 / 4 * 4 * g)
    assert by(e, "reduce-scatter", "fsdp") == pytest.approx(2 * 3 / 4 * 4 * g)
    norm = 64 * 4
    assert by(e, "all-reduce", "data") == pytest.approx(2 * g + 0)  # 2(n-1)/n with n=2 -> 1x each
    assert by(e, "all-reduce", "data+fsdp") == pytest.approx(2 * 7 / 8 * norm)
    cpu = estimate(p, optax.sgd(0.1), {"x": (16, 64)}, backend="cpu")
    assert "reduce-scatter" not in cpu.comm
    assert by(cpu, "all-reduce", "data+fsdp") == pytest.approx(2 * 7 / 8 * (norm + 2 * 4 * g))
    # XLA:TPU too sums the whole fsdp gradient over data+fsdp in one all-reduce when a data axis
    # is free, and gathers float32 kernels as bfloat16 (measured on libtpu, tests/test_tpu.py)
    tpu = estimate(p, optax.sgd(0.1), {"x": (16, 64)}, backend="tpu")
    assert by(tpu, "all-reduce", "data+fsdp") == by(cpu, "all-reduce", "data+fsdp")
    assert by(tpu, "all-gather", "fsdp") == pytest.approx(by(cpu, "all-gather", "fsdp") / 2)
    # on an fsdp-only mesh it reduce-scatters the pinned gradient of a 2-D leaf
    only = estimate(tpflax.plan(mlp_tree(), {"fsdp": 8}, fsdp_min_bytes=1024), optax.sgd(0.1),
                    {"x": (16, 64)}, backend="tpu")
    assert by(only, "reduce-scatter", "fsdp") == pytest.approx(2 * 7 / 8 * 4 * g)
    assert by(only, "all-reduce", "fsdp") == pytest.approx(2 * 7 / 8 * norm)  # the unsplit norm scale
    remat = estimate(p, optax.sgd(0.1), {"x": (16, 64)}, remat=True, backend="gpu")
    assert by(remat, "all-gather", "fsdp") == by(e, "all-gather", "fsdp")


def test_expert_parallel_all_to_all():
    m = zoo.get("moe")
    p = tpflax.plan(m.abstract_variables(), {"expert": 8})
    assert any(d.strategy.startswith("expert") for d in p.decisions.values())
    e = estimate(p, optax.adam(1e-3), "16x16", model=m, expert_dispatch="all-to-all")
    assert e.comm["all-to-all"]["expert"] > 0
    dense = estimate(p, optax.adam(1e-3), "16x16", model=m)  # the default: what XLA compiles for an einsum
    assert "all-to-all" not in dense.comm and dense.comm["all-reduce"]["expert"] > 0
    assert dense.comm["all-gather"]["expert"] > 0


def test_traced_activations_and_report():
    m = zoo.get("gpt2")
    acts = trace_activations(m, 8)
    assert acts["h_0/mlp/c_fc"][0].output == (8, 32, 256)
    assert "wte:attend" in acts  # the tied output projection is seen
    p = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    e = estimate(p, optax.adamw(1e-3), jax.eval_shape(lambda: m.make_batch(0, 8)), model=m,
                 activations=acts, optimizer_name="adamw")
    assert e.settings["activations"] == "traced" and e.per_device.activations > 0
    assert e.per_device.activations < e.unsharded.activations
    text = tpflax.report(p, e)
    assert "estimate per training step" in text and "all-reduce" in text and "adamw" in text
    data = json.loads(tpflax.report(p, e, fmt="json"))
    assert data["estimate"]["per_device"]["params"] == e.per_device.params


def test_formula_activations_without_a_trace():
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"model": 4})
    e = estimate(p, None, "8x32", config=m.config)
    assert e.per_device.activations > 0 and any("Korthikanti" in n for n in e.notes)
    assert estimate(p, None, "8x32", config=m.config, remat=True).per_device.activations < \
        e.per_device.activations


def test_batch_forms():
    assert parse_batch((4, 8)).leaves[0] == ("x", (4, 8), "float32")
    b = parse_batch({"x": (32, 1024), "dtype": "bfloat16"})
    assert b.act_dtype == "bfloat16" and b.size == 32
    tree = parse_batch({"x": jax.ShapeDtypeStruct((4, 3), "float16"), "y": jax.ShapeDtypeStruct((4,), "int32")})
    assert tree.act_dtype == "float16" and tree.nbytes() == 4 * 3 * 2 + 16


@pytest.mark.parametrize("batch, match", [
    (None, "needs a batch"), ("4xq", "NxM"), ({"x": (0, 3)}, "positive"), ({"x": (6, 64)}, "multiple of 4")])
def test_bad_input_is_a_tpflax_error(batch, match):
    p = tpflax.plan(mlp_tree(), {"data": 4})
    with pytest.raises(tpflax.TpflaxError, match=match):
        estimate(p, None, batch)


def test_bad_options_and_optimizer():
    p = tpflax.plan(mlp_tree(), {"model": 2})
    with pytest.raises(EstimateError, match="backend"):
        estimate(p, None, (8, 64), backend="fpga")
    with pytest.raises(EstimateError, match="optimizer.init failed"):
        estimate(p, optax.masked(optax.adam(1e-3), {"wrong": True}), (8, 64))


def test_estimate_is_pure_and_does_not_touch_the_plan():
    p = tpflax.plan(mlp_tree(), {"data": 2, "model": 4})
    before = p.to_json()
    e1 = estimate(p, optax.adamw(1e-3), (8, 64))
    e2 = estimate(p, optax.adamw(1e-3), (8, 64))
    assert p.to_json() == before and e1.to_dict() == e2.to_dict()


def test_bare_batch_size_uses_the_models_sequence_length():
    assert parse_batch(8, {"vocab": 100, "seq_len": 16}).leaves == (
        ("x", (8, 16), "int32"), ("y", (8, 16), "int32"))
    with pytest.raises(EstimateError, match="needs the model"):
        parse_batch(8)
    with pytest.raises(EstimateError, match=">= 1"):
        parse_batch(0, {"seq_len": 16})


def _linen_mlp():
    import flax.linen as nn

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(64, name="down")(nn.relu(nn.Dense(256, name="up")(x)))

    return Net()


def test_linen_module_with_a_sample_takes_the_batch_from_it():
    # regression: model=<linen Module> raised a bare TypeError ('int' object is not iterable)
    net, x = _linen_mlp(), jax.ShapeDtypeStruct((8, 64), "float32")
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), x)
    p = tpflax.plan(variables, {"data": 2, "model": 4})
    e = estimate(p, optax.adam(1e-3), model=net, sample=(x,))
    assert e.batch["size"] == 8 and e.batch["leaves"] == [["0", [8, 64], "float32"]]
    assert e.settings["activations"] == "traced"  # linen layers are intercepted
    assert e.per_device.activations > 0 and e.per_device.inputs == 8 * 64 * 4 // 2
    # the same numbers as with the batch spelled out and the layer shapes traced separately
    acts = trace_activations(net, sample=(x,))
    assert acts["up"][0].output == (8, 256)
    same = estimate(p, optax.adam(1e-3), (x,), activations=acts)
    assert same.per_device == e.per_device
    # but the model's trace also says "up" reads the model's input, whose gradient the step never computes:
    # its partial input gradients are not summed (the layer shapes alone cannot tell)
    extra = [i for i in same.items if i not in e.items]
    assert [i.why for i in extra] == ["columns params/up/kernel: sum partial input gradients (backward)"]
    assert same.comm_total - e.comm_total == extra[0].total > 0


def test_plain_function_model_with_a_sample():
    net, x = _linen_mlp(), jax.ShapeDtypeStruct((16, 64), "float32")
    variables = jax.eval_shape(lambda x: net.init(jax.random.key(0), x), x)
    p = tpflax.plan(variables, {"data": 4})
    e = estimate(p, optax.sgd(0.1), model=lambda v, x: net.apply(v, x), sample=(x,))
    assert e.batch["size"] == 16 and e.batch["shards"] == 4
    # a plain function has no layers to intercept: its parameters' contractions stand for them
    assert e.settings["activations"] == "contractions"
    assert e.per_device.activations == (16 * 256 + 16 * 64) * 4 // 4  # up's and down's outputs, by hand
    # the same bytes as the linen module's own trace (its Dense calls are those contractions)
    assert e.per_device.activations == estimate(p, optax.sgd(0.1), model=net, sample=(x,)).per_device.activations
    grads = (64 * 256 + 256 + 256 * 64 + 64) * 4
    assert e.comm == {"all-reduce": {"data": pytest.approx(2 * 3 / 4 * grads)}}  # ring all-reduce, by hand


def test_prng_key_bytes_agree_with_the_plan():
    # regression: a 1,024-key leaf counted 4,096 bytes here and 8,192 in the plan
    keys = jax.eval_shape(lambda: jax.random.split(jax.random.key(0), 1024))
    p = tpflax.plan({**mlp_tree(), "rng": keys}, {"model": 4})
    e = estimate(p, optax.adam(1e-3), (8, 64))
    assert p.decisions["rng"].bytes == 1024 * 8
    assert e.per_device.model_state == e.unsharded.model_state == 1024 * 8


def test_optimizer_state_layout_matches_the_placed_specs():
    # the estimate reads the state layout once; it must give the specs the state is placed with
    from jax.sharding import PartitionSpec

    from tpflax._src.cost.optstate import opt_entries, opt_layout
    from tpflax._src.specs import entries

    m = zoo.get("llama-scan")
    for mesh in ({"fsdp": 2, "model": 4}, {"data": 2, "model": 2}):
        p = tpflax.plan(m.abstract_variables(), mesh, fsdp_min_bytes=1024)
        for opt in (optax.adamw(1e-3), optax.adafactor(1e-3)):
            state, specs = opt_state_specs(p, opt)
            placed = [entries(s, len(x.shape)) for s, x in zip(
                jax.tree_util.tree_leaves(specs, is_leaf=lambda s: isinstance(s, PartitionSpec)),
                jax.tree_util.tree_leaves(state), strict=True)]
            spec_of = {k: entries(d.spec, len(d.shape)) for k, d in p.decisions.items()}
            assert opt_entries(opt_layout(p, opt), spec_of) == placed


def test_repeated_layers_are_priced_once_and_counted():
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    e = estimate(p, None, "8x32", config=m.config)
    n_layers = m.config.n_layers
    rows = [i for i in e.items if "mlp" in i.why and i.why.startswith("row")]
    assert len(rows) == 1 and rows[0].count == n_layers and "and" in rows[0].source


def _tied_lm(v, ids):
    """A tied-embedding language model as a plain function: lookup, one pair, logits by the table."""
    h = v["emb"][ids]
    h = h + jax.nn.relu(h @ v["up"]) @ v["down"]
    return h @ v["emb"].T


def _tied_loss(logits, ids):
    return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])


@pytest.mark.slow
def test_tied_table_and_forced_specs_match_the_compiled_step():
    tree = {"emb": jax.ShapeDtypeStruct((1001, 64), "float32"), "up": jax.ShapeDtypeStruct((64, 256), "float32"),
            "down": jax.ShapeDtypeStruct((256, 64), "float32")}
    sample = (jax.ShapeDtypeStruct((8, 16), "int32"),)
    mesh_sizes = {"data": 2, "model": 4}
    mesh = tpflax.make_mesh(mesh_sizes)
    tx = optax.adamw(1e-3)
    plans = {"replicated": tpflax.plan(tree, mesh_sizes, rules=[(".*", "replicate")]),
             # the planner's own Megatron pair, forced by rules: the same specs must price the same
             "forced": tpflax.plan(tree, mesh_sizes, rules=[("up", P(None, "model")), ("down", P("model", None)),
                                                             (".*", P())])}
    for name, p in plans.items():
        ts = tpflax.make_train_step(_tied_lm, p, mesh, tx, sample=sample, loss=_tied_loss)
        got = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA).comm_total
        est = estimate(p, tx, model=_tied_lm, sample=sample, backend="cpu").comm_total
        # exact up to the loss scalar XLA reduces with the gradients (4 bytes)
        assert est == pytest.approx(got, abs=16), (name, est, got)
    d = plans["forced"].decisions
    assert (d["up"].role, d["down"].role) == ("column", "row") and d["up"].pair == d["down"].pair


class _AnnotatedLM(nn.Module):
    """MaxText's names and logical annotations: a token table, one MLP pair, an untied ``logits_dense``."""

    @nn.compact
    def __call__(self, ids):
        lp = nn.with_logical_partitioning
        emb = self.param("token_embedder", lp(nn.initializers.normal(), ("vocab", "embed")), (1000, 64))
        h = jnp.take(emb, ids, axis=0)
        up = nn.Dense(256, use_bias=False, kernel_init=lp(nn.initializers.lecun_normal(), ("embed", "mlp")), name="wi")
        down = nn.Dense(64, use_bias=False, kernel_init=lp(nn.initializers.lecun_normal(), ("mlp", "embed")), name="wo")
        h = h + down(nn.relu(up(h)))
        return nn.DenseGeneral(1000, use_bias=False, name="logits_dense",
                               kernel_init=lp(nn.initializers.lecun_normal(), ("embed", "vocab")))(h)


class _Experts(nn.Module):
    """A gated expert MLP under names without "expert" in them: (E, d, f) up and gate, (E, f, d) down."""

    @nn.compact
    def __call__(self, x):  # (tokens, d), every expert on every token (dense dispatch)
        init = nn.initializers.lecun_normal()
        w_in, w_gate = (self.param(n, init, (4, 64, 128)) for n in ("w_in", "w_gate"))
        w_out = self.param("w_out", init, (4, 128, 64))
        h = jax.nn.silu(jnp.einsum("td,edf->etf", x, w_gate)) * jnp.einsum("td,edf->etf", x, w_in)
        return x + jnp.einsum("etf,efd->td", h, w_out)


@pytest.mark.parametrize("case", ["annotated head", "rule-forced experts"])
def test_a_spec_prices_the_same_whoever_chose_it(case):
    # a rule or an annotation forces a spec, not what the leaf is: forced (annotated) output heads were priced
    # as a column without a partner (an all-gather of the whole logits) and rule-forced expert kernels lost
    # their pair (no pair all-reduces), so the same specs estimated 0.63x-1.25x apart
    mesh = {"data": 2, "model": 4}
    if case == "annotated head":
        m, x = _AnnotatedLM(), jax.ShapeDtypeStruct((8, 32), jnp.int32)
        rules = [("logits_dense", P(None, "model")), ("token_embedder", P("model", None)),
                 ("wi", P(None, "model")), ("wo", P("model", None))]
    else:
        m, x = _Experts(), jax.ShapeDtypeStruct((64, 64), jnp.float32)
        rules = [("w_(in|gate)", P(None, None, "model")), ("w_out", P(None, "model", None))]
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    # the planner prices its choices at the step's 256 tokens, as the estimate does
    traced = {"batch": (x,)} if case == "annotated head" else {"model": m, "sample": (x,)}
    plans = {"planner": tpflax.plan(v, mesh, use_annotations=False, **traced),
             "rules": tpflax.plan(v, mesh, rules=rules, use_annotations=False, **traced)}
    if case == "annotated head":
        plans["annotations"] = tpflax.plan(v, mesh)
    specs = {k: {p: d.spec for p, d in q.decisions.items()} for k, q in plans.items()}
    assert all(s == specs["planner"] for s in specs.values()), specs
    facts = {k: {p: (d.kind, d.role) for p, d in q.decisions.items()} for k, q in plans.items()}
    assert all(f == facts["planner"] for f in facts.values()), facts
    tx = optax.adamw(1e-3)
    comm = {k: estimate(q, tx, model=m, sample=(x,), backend="cpu").comm_total for k, q in plans.items()}
    assert len(set(comm.values())) == 1, comm


def test_a_bare_shape_batch_sets_the_traced_sequence_length():
    # estimate(batch=(8, 64)) of a model sampled at (8, 16) prices 64 tokens per example, as a
    # sample of (8, 64) does (it priced 16: a quarter of the activations); a zoo config fixes its
    # length, so a batch of another length is an error that says how to build the model at it
    from _util import tiny_lm

    short, long = (jax.ShapeDtypeStruct((8, n), jnp.int32) for n in (16, 64))
    m = tiny_lm()
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), short), {"data": 2, "model": 4}, model=m, sample=(short,))
    by_batch = estimate(p, optax.sgd(0.1), (8, 64), model=m, sample=(short,))
    by_sample = estimate(p, optax.sgd(0.1), model=m, sample=(long,))
    assert by_batch.per_device.activations == by_sample.per_device.activations > 0
    assert by_batch.comm_total == by_sample.comm_total
    llama = zoo.get("llama")  # seq_len 32
    lp = tpflax.plan(llama.abstract_variables(), {"data": 2, "model": 4})
    x = jax.ShapeDtypeStruct((8, 128), jnp.int32)
    with pytest.raises(EstimateError, match=r"seq_len=128"):
        estimate(lp, optax.sgd(0.1), {"x": x, "y": x}, model=llama)


def test_a_bare_batch_size_resizes_the_sample_of_a_model():
    # estimate(plan, tx, 32, model=m, sample=(x,)) with x of 8 examples prices 32 (it raised that a
    # bare size needs the model, which was given)
    import flax.linen as nn

    m, x = nn.Dense(256), jax.ShapeDtypeStruct((8, 64), jnp.float32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2, "model": 4}, model=m, sample=(x,))
    e8, e32 = (estimate(p, optax.sgd(0.1), n, model=m, sample=(x,)) for n in (8, 32))
    assert (e8.batch["size"], e32.batch["size"]) == (8, 32)
    assert e32.per_device.inputs == 4 * e8.per_device.inputs > 0


def test_a_models_inputs_given_as_the_batch_are_its_sample():
    """``estimate(plan, tx, (ids,), model=module)``: the batch is the module's inputs, as ``sample=(ids,)`` says
    (it raised "needs sample inputs: pass sample=(x,)" though the inputs were given)."""
    import flax.linen as nn

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            return nn.Dense(128)(nn.gelu(nn.Dense(256)(nn.Embed(128, 64)(ids))))

    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    p = tpflax.plan(jax.eval_shape(LM().init, jax.random.key(0), ids), {"data": 2, "model": 4},
                    model=LM(), sample=(ids,))
    want = estimate(p, optax.adamw(1e-3), model=LM(), sample=(ids,), backend="cpu")
    for batch in ((ids,), ids, [ids]):
        got = estimate(p, optax.adamw(1e-3), batch, model=LM(), backend="cpu")
        assert (got.per_device, got.comm, got.batch["size"]) == (want.per_device, want.comm, 8)


def test_nnx_model_layers_are_traced_like_its_linen_twin():
    # an nnx module's submodule calls are recorded like linen's intercepted ones: the same saved
    # activations for the same model written either way (it estimated none before)
    import flax.linen as nn
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln, self.up = nnx.LayerNorm(64, rngs=rngs), nnx.Linear(64, 256, rngs=rngs)
            self.down = nnx.Linear(256, 64, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.gelu(self.up(self.ln(x))))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.emb, self.blocks = nnx.Embed(100, 64, rngs=rngs), nnx.List([Block(rngs), Block(rngs)])
            self.head = nnx.Linear(64, 100, rngs=rngs)

        def __call__(self, ids):
            h = self.emb(ids)
            for b in self.blocks:
                h = b(h)
            return self.head(h)

    class LBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(64, name="down")(nn.gelu(nn.Dense(256, name="up")(nn.LayerNorm(name="ln")(x))))

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(100, 64, name="emb")(ids)
            for i in range(2):
                h = LBlock(name=f"blocks_{i}")(h)
            return nn.Dense(100, name="head")(h)

    ids = jax.ShapeDtypeStruct((8, 16), "int32")
    mesh = {"data": 2, "model": 4}
    m = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    acts = trace_activations(m, sample=(ids,))
    assert acts["blocks/1/up"][0].output == (8, 16, 256) and acts["blocks/0"][0].output == (8, 16, 64)
    # the classes are restored: no wrapper left on a method, none added to a class
    assert not any(hasattr(t.__call__, "__wrapped__") for t in (nnx.Linear, nnx.LayerNorm, Block, Net))
    assert "attend" not in Block.__dict__ and "__call__" not in nnx.Module.__dict__
    p = tpflax.plan(m, mesh, model=m, sample=(ids,))  # the module as its own tree and as the model
    lin = LNet()
    lp = tpflax.plan(jax.eval_shape(lin.init, jax.random.key(0), ids), mesh, model=lin, sample=(ids,))
    assert {k.replace("blocks/", "blocks_"): d.spec for k, d in p.decisions.items()} == {
        k.removeprefix("params/"): d.spec for k, d in lp.decisions.items()}
    for remat in (False, True):
        e = estimate(p, optax.adam(1e-3), model=m, sample=(ids,), remat=remat)
        le = estimate(lp, optax.adam(1e-3), model=lin, sample=(ids,), remat=remat)
        assert e.settings["activations"] == "traced" and e.per_device.activations > 0
        assert (e.per_device.activations, e.peak) == (le.per_device.activations, le.peak)


def test_nnx_scanned_layers_are_traced_like_linens_scan():
    # the recommended nnx stack (nnx.vmap to create, nnx.scan to call) runs copies of the block:
    # they are placed by their variables' shapes at the stack's path, so the estimate counts the
    # block's calls once per layer, as for the same model written with linen's nn.scan
    import flax.linen as nn
    from flax import nnx

    d, layers = 64, 3

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.ln, self.up = nnx.LayerNorm(d, rngs=rngs), nnx.Linear(d, 4 * d, rngs=rngs)
            self.down = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.gelu(self.up(self.ln(x))))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.emb, self.head = nnx.Embed(100, d, rngs=rngs), nnx.Linear(d, 100, rngs=rngs)

            @nnx.split_rngs(splits=layers)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(rngs):
                return Block(rngs)

            self.blocks = make(rngs)

        def __call__(self, ids):
            @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
            def run(block, h):
                return block(h)

            return self.head(run(self.blocks, self.emb(ids)))

    class LBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            h = nn.Dense(d, name="down")(nn.gelu(nn.Dense(4 * d, name="up")(nn.LayerNorm(name="ln")(x))))
            return x + h, None

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, ids):
            h = nn.Embed(100, d, name="emb")(ids)
            stack = nn.scan(LBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
            h, _ = stack(name="blocks")(h, None)
            return nn.Dense(100, name="head")(h)

    ids = jax.ShapeDtypeStruct((8, 16), "int32")
    mesh = {"data": 2, "model": 4}
    m = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    acts = trace_activations(m, sample=(ids,))
    assert acts["blocks/up"][0].output == (8, 16, 4 * d) and "blocks" in acts
    p = tpflax.plan(m, mesh, sample=(ids,))
    lin = LNet()
    lp = tpflax.plan(jax.eval_shape(lin.init, jax.random.key(0), ids), mesh, model=lin, sample=(ids,))
    e = estimate(p, optax.adam(1e-3), model=m, sample=(ids,))
    le = estimate(lp, optax.adam(1e-3), model=lin, sample=(ids,))
    assert e.per_device.activations > layers * 8 * 16 * 4 * d * 4 // 2 // 4  # every layer's up output
    assert (e.per_device.activations, e.peak) == (le.per_device.activations, le.peak)
    # what neither counts, said: a scan without remat saves its residuals (nnx_estimate.md)
    assert any("scanned layer stack without remat" in n for n in e.notes)


def test_a_sample_input_that_is_no_batch_keeps_its_shape():
    # a per-layer scale (like HF's head_mask) was resized to the batch too: the estimate's trace
    # failed with flax's raw ScopeParamNotFoundError, make_train_step(batch=16) built a wrong step
    import flax.linen as nn

    class M(nn.Module):
        @nn.compact
        def __call__(self, x, layer_scale):  # layer_scale: (layers, d), one row per layer
            for i in range(layer_scale.shape[0]):
                x = x + layer_scale[i] * nn.Dense(16, name=f"d{i}")(x)
            return x

    x, scale = jax.ShapeDtypeStruct((8, 16), "float32"), jax.ShapeDtypeStruct((2, 16), "float32")
    m = M()
    v = jax.eval_shape(m.init, jax.random.key(0), x, scale)
    p = tpflax.plan(v, {"data": 2, "model": 4}, model=m, sample=(x, scale))
    e = estimate(p, optax.sgd(0.1), model=m, sample=(x, scale))
    assert e.settings["activations"] == "traced" and e.per_device.activations > 0
    assert estimate(p, optax.sgd(0.1), 32, model=m, sample=(x, scale)).per_device.activations == 4 * \
        e.per_device.activations
    ts = tpflax.make_train_step(m, p, tpflax.make_mesh(p.mesh), optax.sgd(0.1), 16, sample=(x, scale),
                                loss=lambda out, x, s: (out ** 2).mean())
    assert [a.shape for a in ts.args[2]] == [(16, 16), (2, 16)]


@pytest.mark.parametrize("how, remat", [("remat", True), ("nothing_saveable", True), ("dots_saveable", False),
                                         ("none", False)])
def test_a_traced_models_own_remat_turns_remat_on(how, remat):
    # nn.scan(nn.remat(Block)): the step recomputes every block, which the estimate only knew from a
    # zoo config's remat field (a user's model was priced as saving every activation). A policy that saves
    # nothing (big_vision's and MaxText's full remat) is a full remat too (it read as none); one that saves
    # the dots is not. A scan's body counts once per layer against the contractions outside it (a head of
    # three layers outweighed three scanned blocks counted once)
    import flax.linen as nn

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(64, name="down")(nn.gelu(nn.Dense(256, name="up")(nn.LayerNorm()(x)))), None

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(128, 64)(ids)
            policy = {"nothing_saveable": jax.checkpoint_policies.nothing_saveable,
                      "dots_saveable": jax.checkpoint_policies.dots_saveable}.get(how)
            block = Block if how == "none" else nn.remat(Block, policy=policy)
            x, _ = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=3)(
                name="blocks")(x, None)
            for i in range(2):
                x = nn.tanh(nn.Dense(64, name=f"pool_{i}")(x))
            return nn.Dense(128)(x)

    ids = jax.ShapeDtypeStruct((8, 32), "int32")
    m = LM()
    v = jax.eval_shape(m.init, jax.random.key(0), ids)
    p = tpflax.plan(v, {"fsdp": 2, "model": 4}, model=m, sample=(ids,))
    e = estimate(p, optax.adam(1e-3), model=m, sample=(ids,))
    assert e.settings["remat"] is remat
    assert any("scanned layer stack without remat" in n for n in e.notes) is not remat
    said = estimate(p, optax.adam(1e-3), model=m, sample=(ids,), remat=True)
    assert (e.per_device, e.peak, e.comm) == (said.per_device, said.peak, said.comm) or not remat


def test_cpu_backend_says_16_bit_collectives_run_in_float32():
    p = tpflax.plan({"w": jax.ShapeDtypeStruct((64, 64), "bfloat16")}, {"data": 2})
    note = "XLA:CPU runs 16-bit collectives in float32"
    assert any(note in n for n in estimate(p, optax.sgd(0.1), {"x": (8, 64)}, backend="cpu").notes)
    assert not any(note in n for n in estimate(p, optax.sgd(0.1), {"x": (8, 64)}).notes)


def test_nnx_remat_copies_super_calls_and_a_failing_forward():
    # nnx.remat calls a copy of each block with the original's shapes: placed at the first path of
    # that structure not yet taken (it recorded nothing, and the contractions counted 5x the linen
    # twin's saved activations); a subclass calling super().__call__ is one call; a forward that
    # raises leaves the classes as they were
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.relu(self.up(x)))

    class Scaled(nnx.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    class Net(nnx.Module):
        def __init__(self, rngs, fail=False):
            self.b0, self.b1, self.out = Block(rngs), Block(rngs), Scaled(16, 16, rngs=rngs)
            self.fail = fail

        def __call__(self, x):
            for b in (self.b0, self.b1):
                x = nnx.remat(lambda blk, h: blk(h))(b, x)
            if self.fail:
                raise RuntimeError("boom")
            return self.out(x)

    x = jax.ShapeDtypeStruct((4, 16), "float32")
    acts = trace_activations(nnx.eval_shape(lambda: Net(nnx.Rngs(0))), sample=(x,))
    assert {k: [a.output for a in v] for k, v in acts.items()} == {
        "b0/up": [(4, 64)], "b0/down": [(4, 16)], "b0": [(4, 16)], "b1/up": [(4, 64)], "b1/down": [(4, 16)],
        "b1": [(4, 16)], "out": [(4, 16)]}
    with pytest.raises(tpflax.TraceError, match="RuntimeError: boom"):  # as plan(model=) words it
        trace_activations(nnx.eval_shape(lambda: Net(nnx.Rngs(0), fail=True)), sample=(x,))
    assert not any(hasattr(t.__call__, "__wrapped__") for t in (nnx.Linear, Block, Scaled, Net))
    assert activations._FRESH.value is None  # the trace-cache context is back to its default too


def _twin_estimates(m, lin, sample, mesh=None):
    """The estimates of an nnx model and its linen twin (each planned on its own tree), with and without remat."""
    mesh = mesh or {"data": 2, "model": 4}
    p = tpflax.plan(m, mesh, model=m, sample=sample)
    lp = tpflax.plan(jax.eval_shape(lin.init, jax.random.key(0), *sample), mesh, model=lin, sample=sample)
    return [(estimate(p, optax.adam(1e-3), model=m, sample=sample, remat=r).per_device.activations,
             estimate(lp, optax.adam(1e-3), model=lin, sample=sample, remat=r).per_device.activations)
            for r in (False, True)]


@pytest.mark.parametrize("how", ["remat", "jit", "remat method", "jit method"])
def test_one_remat_or_jit_wrapper_for_every_block_traces_every_block(how):
    # jax caches a jit's or a checkpoint's jaxpr by its inputs' structure: one nnx.remat / nnx.jit
    # wrapper applied to alike blocks (a function made once, a decorated method) ran its Python body
    # for the first block only, and the estimate saved one block's activations (nnx.remat: 0.38x the
    # linen twin's; nn.jit's linen twin undercounted the same way)
    import flax.linen as nn
    from flax import nnx

    d, n = 16, 3
    wrap = {"remat": (nnx.remat, nn.remat), "jit": (nnx.jit, nn.jit)}[how.split()[0]]

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            return x + self.mlp(x) if how.endswith("method") else x + self.down(nnx.relu(self.up(x)))

        @wrap[0]
        def mlp(self, x):
            return self.down(nnx.relu(self.up(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.blocks = nnx.List([Block(rngs) for _ in range(n)])
            self.head = nnx.Linear(d, d, rngs=rngs)

        def __call__(self, x):
            f = (lambda blk, h: blk(h)) if how.endswith("method") else wrap[0](lambda blk, h: blk(h))
            for b in self.blocks:
                x = f(b, x)
            return self.head(x)

    class LBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + self.mlp(x)

        @wrap[1]
        @nn.compact
        def mlp(self, x):
            return nn.Dense(d, name="down")(nn.relu(nn.Dense(4 * d, name="up")(x)))

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = LBlock if how.endswith("method") else wrap[1](LBlock)
            for i in range(n):
                x = block(name=f"blocks_{i}")(x)
            return nn.Dense(d, name="head")(x)

    x = jax.ShapeDtypeStruct((4, 8, d), F32)
    m = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    for model, sep in ((m, "/"), (LNet(), "_")):
        for _ in range(2):  # a second trace of the same model is not served by the first's caches either
            acts = trace_activations(model, sample=(x,))
            assert {k: len(v) for k, v in acts.items()} == {
                **{f"blocks{sep}{i}{s}": 1 for i in range(n) for s in ("", "/up", "/down")}, "head": 1}, model
    assert activations._FRESH.value is None  # each trace undoes its settings of jax's trace context
    (plain, lplain), (rem, lrem) = _twin_estimates(m, LNet(), (x,))
    up = 4 * 8 * 4 * d * 4 // 2 // 4  # one block's up output on a device: data halves it, model splits it
    assert plain == lplain > n * up and rem == lrem


def test_one_scan_for_two_alike_towers_traces_both():
    # an encoder and a decoder stack of alike blocks run through one nnx.scan function: jax's cache of
    # the scan body's jaxpr served the second tower, which was not recorded (and a second trace of the
    # model recorded neither): the estimate saved the head's activations only (256 B against the linen
    # twin's 18688 B)
    import flax.linen as nn
    from flax import nnx

    d, layers = 16, 3

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.relu(self.up(x)))

    @nnx.split_rngs(splits=layers)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def tower(rngs):
        return Block(rngs)

    @nnx.scan(in_axes=(0, nnx.Carry), out_axes=nnx.Carry)
    def run(block, h):
        return block(h)

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.enc_layers, self.dec_layers = tower(rngs), tower(rngs)
            self.head = nnx.Linear(d, d, rngs=rngs)

        def __call__(self, x):
            return self.head(run(self.dec_layers, run(self.enc_layers, x)))

    class LBlock(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            return x + nn.Dense(d, name="down")(nn.relu(nn.Dense(4 * d, name="up")(x))), None

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            stack = nn.scan(LBlock, variable_axes={"params": 0}, split_rngs={"params": True}, length=layers)
            x, _ = stack(name="enc_layers")(x, None)
            x, _ = stack(name="dec_layers")(x, None)
            return nn.Dense(d, name="head")(x)

    x = jax.ShapeDtypeStruct((4, 8, d), F32)
    m = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    for _ in range(2):
        assert {k: len(v) for k, v in trace_activations(m, sample=(x,)).items()} == {
            **{f"{t}_layers{s}": 1 for t in ("enc", "dec") for s in ("", "/up", "/down")}, "head": 1}
    (plain, lplain), (rem, lrem) = _twin_estimates(m, LNet(), (x,))
    assert plain == lplain > 2 * layers * 4 * 8 * 4 * d * 4 // 2 // 4 and rem == lrem


def test_a_shared_block_called_through_one_remat_wrapper_counts_each_call():
    # ALBERT-style: one block applied three times through one nnx.remat function; jax's cache served the
    # second and third calls, recorded once (the linen twin, nn.remat of one instance, records three)
    import flax.linen as nn
    from flax import nnx

    class Block(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(16, 64, rngs=rngs), nnx.Linear(64, 16, rngs=rngs)

        def __call__(self, x):
            return x + self.down(nnx.relu(self.up(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            self.shared = Block(rngs)

        def __call__(self, x):
            f = nnx.remat(lambda blk, h: blk(h))
            for _ in range(3):
                x = f(self.shared, x)
            return x

    class LBlock(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + nn.Dense(16, name="down")(nn.relu(nn.Dense(64, name="up")(x)))

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = nn.remat(LBlock)(name="shared")
            for _ in range(3):
                x = block(x)
            return x

    x = jax.ShapeDtypeStruct((4, 16), F32)
    for model in (nnx.eval_shape(lambda: Net(nnx.Rngs(0))), LNet()):
        assert {k: len(v) for k, v in trace_activations(model, sample=(x,)).items()} == {
            "shared": 3, "shared/up": 3, "shared/down": 3}


@pytest.mark.parametrize("how", ["one input", "an input per member", "remat inside the vmap"])
def test_a_vmapped_ensemble_counts_every_member(how):
    # a layer called inside nnx.vmap / nn.vmap sees one member's shapes but runs for every member: the
    # estimate saved one member's activations (832 B against 3136 B here, for nnx and linen alike)
    import flax.linen as nn
    from flax import nnx

    d, members = 16, 4
    axis = 0 if how == "an input per member" else None

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.up, self.down = nnx.Linear(d, 4 * d, rngs=rngs), nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            return self.down(nnx.relu(self.up(x)))

    class Net(nnx.Module):
        def __init__(self, rngs):
            @nnx.split_rngs(splits=members)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return MLP(r)

            self.members, self.head = make(rngs), nnx.Linear(d, d, rngs=rngs)

        def __call__(self, x):
            def run(m, h):
                return m(h)

            run = nnx.vmap(nnx.remat(run) if how.startswith("remat") else run, in_axes=(0, axis), out_axes=0)
            return self.head(run(self.members, x).mean(0))

    class LMLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(d, name="down")(nn.relu(nn.Dense(4 * d, name="up")(x)))

    class LNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            member = nn.remat(LMLP) if how.startswith("remat") else LMLP
            ensemble = nn.vmap(member, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=axis,
                               out_axes=0, axis_size=members)
            return nn.Dense(d, name="head")(ensemble(name="members")(x).mean(0))

    x = jax.ShapeDtypeStruct((members, 8, d) if axis == 0 else (8, d), F32)
    m = nnx.eval_shape(lambda: Net(nnx.Rngs(0)))
    for model in (m, LNet()):
        acts = trace_activations(model, sample=(x,))
        assert {k: [a.output for a in v] for k, v in acts.items()} == {
            "members/up": [(8, 4 * d)] * members, "members/down": [(8, d)] * members,
            "members": [(8, d)] * members, "head": [(8, d)]}, model
    (plain, lplain), (rem, lrem) = _twin_estimates(m, LNet(), (x,))
    # the members are split over model (experts over the tensor axis, cheaper by cost than their ffn dim: the
    # compiled step sums the members' mean, not every member's output): each device runs members // 4 of them,
    # and holds per member up, down and its output whole, then the head's output (whole: a (d, d) head's input
    # gradient is as wide as its outputs, and splitting it is slower by step time): f32, data halves
    lp = tpflax.plan(jax.eval_shape(LNet().init, jax.random.key(0), x), {"data": 2, "model": 4}, model=LNet(),
                     sample=(x,))
    assert lp.decisions["params/members/up/kernel"].spec == P("model", None, None)
    assert lp.decisions["params/head/kernel"].spec == P(None, None)
    full = (members // 4 * 8 * (4 * d + d + d) + 8 * d) * 4 // 2
    top = (members // 4 * 8 * d + 8 * d) * 4 // 2  # under remat: the top-level outputs
    assert plain == lplain == (top if how.startswith("remat") else full)  # the model's own remat: on
    assert rem == lrem == top


def test_an_ensemble_in_each_scanned_layer_counts_its_members_per_layer():
    # nn.scan over layers that each hold an nn.vmap ensemble: a scanned layer's call counts once per layer
    # (the stack), and each with its members, as in the unrolled twin (before: one member per layer)
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="down")(nn.relu(nn.Dense(64, name="up")(x)))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _=None):
            ens = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                          out_axes=0, axis_size=4)
            return x + ens(name="ens")(x).mean(0), None

    class Net(nn.Module):
        scan: bool

        @nn.compact
        def __call__(self, x):
            if self.scan:
                x, _ = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                               length=3)(name="layers")(x, None)
            else:
                for i in range(3):
                    x, _ = Block(name=f"layers_{i}")(x)
            return nn.Dense(16, name="head")(x)

    x = jax.ShapeDtypeStruct((8, 32, 16), F32)
    got = []
    for scan in (False, True):
        m = Net(scan)
        p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 8}, model=m, sample=(x,))
        got.append(tpflax.estimate(p, optax.adam(1e-3), model=m, sample=(x,)).per_device.activations)
    assert got[0] == got[1] > 0


def test_a_per_example_vmap_follows_the_batch_size():
    # an nn.vmap over the examples runs once per example: with_batch_size (suggest_mesh's smaller-batch
    # search) scales its calls as a re-trace at that size does
    import flax.linen as nn

    from tpflax._src.cost.workload import prepare, with_batch_size

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):  # one example
            return nn.Dense(16, name="down")(nn.relu(nn.Dense(64, name="up")(x)))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            per = nn.vmap(MLP, variable_axes={"params": None}, split_rngs={"params": False}, in_axes=0, out_axes=0)
            return nn.Dense(16, name="head")(x + per(name="per")(x))

    m = Net()
    x8 = jax.ShapeDtypeStruct((8, 32, 16), F32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x8), {"data": 8}, model=m, sample=(x8,))
    small = with_batch_size(prepare(p, optax.adam(1e-3), model=m, sample=(x8,)), 32)
    big = prepare(p, optax.adam(1e-3), model=m, sample=(jax.ShapeDtypeStruct((32, 32, 16), F32),))
    assert {k: len(v) for k, v in small.activations.items()} == {k: len(v) for k, v in big.activations.items()}
    assert len(big.activations["per/up"]) == 32


def test_an_ensemble_split_over_devices_counts_each_devices_members():
    # members stacked on dim 0 and split over an expert axis: each device runs its own member's calls
    # (before the split was read: every member on every device, 2.2x the compiled peak)
    import flax.linen as nn

    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="down")(nn.relu(nn.Dense(64, name="up")(x)))

    class Net(nn.Module):
        @nn.compact
        def __call__(self, x):
            ens = nn.vmap(MLP, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=None,
                          out_axes=0, axis_size=4)
            return nn.Dense(16, name="head")(x + ens(name="members")(x).mean(0))

    m, x = Net(), jax.ShapeDtypeStruct((8, 32, 16), F32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2, "expert": 4}, model=m, sample=(x,))
    assert tuple(p.decisions["params/members/up/kernel"].spec)[0] == "expert"
    acts = trace_activations(m, sample=(x,))
    # the batch splits over data and expert (8 ways); a member's layers gather their tokens over expert, so
    # each device holds its member's outputs for the data slice: also 1/8 of all members'
    want = sum(math.prod(a.output) * 4 / 8 for path, calls in acts.items() for a in calls)
    assert tpflax.estimate(p, optax.adam(1e-3), model=m, sample=(x,)).per_device.activations == int(want)


def test_a_vmapped_ensemble_row_split_on_its_features_sums_every_members_output():
    # an NNX MoE whose experts, stacked by nnx.vmap, run densely over every token (nnx.vmap(in_axes=(0, None))),
    # split on their ffn dim: each device's partial outputs of all 4 experts are summed, one f32[4,4,8,16]
    # all-reduce; priced at one expert's before (the review_w W08 MoE: est/comp 0.72). Their input gradient,
    # the tokens every expert reads, is summed over the experts on the device first: one f32[4,8,16]
    from flax import nnx

    d, f, e = 16, 32, 4

    class Expert(nnx.Module):
        def __init__(self, rngs):
            self.up = nnx.Linear(d, f, use_bias=False, rngs=rngs)
            self.down = nnx.Linear(f, d, use_bias=False, rngs=rngs)

        def __call__(self, x):
            return self.down(jax.nn.gelu(self.up(x)))

    class MoE(nnx.Module):
        def __init__(self, rngs):
            self.inp, self.router = nnx.Linear(d, d, rngs=rngs), nnx.Linear(d, e, use_bias=False, rngs=rngs)

            @nnx.split_rngs(splits=e)
            @nnx.vmap(in_axes=(0,), out_axes=0)
            def make(r):
                return Expert(r)

            self.experts = make(rngs)

        def __call__(self, x):
            x = jnp.tanh(self.inp(x))
            ys = nnx.vmap(lambda ex, h: ex(h), in_axes=(0, None), out_axes=0)(self.experts, x)
            return x + jnp.einsum("ebsd,bse->bsd", ys, jax.nn.softmax(self.router(x), -1))

    m, mesh_sizes = MoE(nnx.Rngs(0)), {"data": 2, "model": 4}
    sample = (jax.ShapeDtypeStruct((8, 8, d), F32),)
    rules = [(r"experts/up/kernel$", P(None, None, "model")), (r"experts/down/kernel$", P(None, "model", None)),
             (r".*", P())]
    p = tpflax.plan(nnx.state(m), mesh_sizes, rules=rules)
    mesh, tx = tpflax.make_mesh(mesh_sizes), optax.adamw(1e-3)
    e_ = estimate(p, tx, model=m, sample=sample, backend="cpu")
    tokens = 4 * 8 * d * 4  # a device's 4 examples x 8 tokens x d, f32
    sums = sorted((i.size, i.count) for i in e_.items if i.axes == ("model",) and i.kind == "all-reduce")
    assert sums == [(tokens, 1), (e * tokens, 1)]
    run = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, tx, sample=sample,
                                               loss=lambda out, *_: jnp.mean(out ** 2)), p, mesh, compiler_options=COMM_XLA)
    got = sum(c.ring_bytes * c.count for c in run.collectives if c.kind == "all-reduce" and c.axes == ("model",))
    assert sum(i.total for i in e_.items if i.kind == "all-reduce" and i.axes == ("model",)) == pytest.approx(got, rel=0.02)



def test_a_per_example_vmapped_mlp_sharing_its_kernels_sums_every_examples_output():
    # nn.vmap over the examples with the parameters broadcast (variable_axes={"params": None}): the row's kernel is
    # 2-D, so its split contracted dim was read as a split stacked dim and the sum priced for one example's output
    # (est/comp 0.487, the re-read); every example's partial output is summed, as for a stacked ensemble
    class MLP(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(16, name="down")(nn.gelu(nn.Dense(64, name="up")(x)))

    class PerExample(nn.Module):
        @nn.compact
        def __call__(self, x):
            vm = nn.vmap(MLP, in_axes=0, out_axes=0, variable_axes={"params": None}, split_rngs={"params": False})
            return x + vm(name="mlp")(x)

    m, mesh_sizes, sample = PerExample(), {"data": 2, "model": 4}, (jax.ShapeDtypeStruct((8, 8, 16), F32),)
    rules = [(r"up/kernel", P(None, "model")), (r"up/bias", P("model")), (r"down/kernel", P("model", None)),
             (".*", "replicate")]
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), *sample), mesh_sizes, rules=rules)
    mesh, tx = tpflax.make_mesh(mesh_sizes), optax.adamw(1e-3)
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    e_ = estimate(p, tx, model=m, sample=sample, loss=loss, backend="cpu")
    row = [i.size for i in e_.items if i.kind == "all-reduce" and "down/kernel: sum partial outputs" in i.why]
    assert row == [4 * 8 * 16 * 4]  # a device's 4 examples x 8 tokens x 16 features, f32 (was one example's)
    run = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, tx, sample=sample, loss=loss), p, mesh,
                         compiler_options=COMM_XLA)
    assert abs(e_.comm_total / run.comm_total - 1) < 0.01

def _compiled_and_estimated(model, sample, mesh_sizes, loss=None):
    """``(plan, dry run, estimate)`` of an nnx model's adamw step on 8 CPU devices."""
    from flax import nnx

    p = tpflax.plan(nnx.state(model), mesh_sizes, model=model, sample=sample)
    mesh = tpflax.make_mesh(mesh_sizes)
    tx = optax.adamw(1e-3)
    run = tpflax.dry_run(tpflax.make_train_step(model, p, mesh, tx, sample=sample, loss=loss), p, mesh, compiler_options=FAST_XLA)
    return p, run, estimate(p, tx, model=model, sample=sample, backend="cpu", loss=loss)


def test_a_kernel_stacked_gate_and_up_sums_each_slices_input_gradient():
    # Gemma's FeedForward stores gate and up as one (2, d, f) kernel and contracts w[0] and w[1]: its input
    # is d wide (not 2), and XLA:CPU all-reduces the two slices' partial input gradients apart (two
    # f32[4, 16, 64] per step, priced at 1/32 of that before)
    from flax import nnx

    class GatedMLP(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.inp = nnx.Linear(64, 64, use_bias=False, rngs=rngs)  # the pair's input has a gradient to sum
            self.gating = nnx.Param(init(rngs.params(), (2, 64, 256)))
            self.linear = nnx.Param(init(rngs.params(), (256, 64)))
            self.head = nnx.Linear(64, 10, use_bias=False, rngs=rngs)

        def __call__(self, x):
            x = jnp.tanh(self.inp(x))
            w = self.gating[...]
            return self.head(x + (jax.nn.gelu(x @ w[0]) * (x @ w[1])) @ self.linear[...])

    model, x = GatedMLP(nnx.Rngs(0)), jax.ShapeDtypeStruct((8, 16, 64), F32)
    p, run, e = _compiled_and_estimated(model, (x,), {"data": 2, "model": 4}, loss=lambda out, _: jnp.mean(out ** 2))
    assert (p.decisions["gating"].spec, p.decisions["linear"].spec) == (P(None, None, "model"), P("model", None))
    gating = [i for i in e.items if "gating" in i.why]
    assert [(i.size, i.count) for i in gating] == [(8 // 2 * 16 * 64 * 4, 2)]  # local rows x d x f32, per slice
    # exact up to the loss scalar XLA reduces with the gradients (4 bytes)
    assert e.comm_total == pytest.approx(run.comm_total, abs=16), (e.comm, run.comm())


@newer_xla("two (4, 15) float32 all-reduces over model more, of a norm's row statistics (720 bytes): compiled "
           "261,388 bytes against 0.10's 260,668")
def test_a_table_contracted_outside_attend_is_tied_though_layers_are_traced():
    # Gemma's Embedder: ``decode`` is ``x @ table.T``, no ``attend`` call and no layer call for the logits;
    # the traced tied table counted only when no layer call was traced, so an nnx model (whose layers
    # are) lost the vocab-split logits' softmax sums and input-gradient all-reduce, and the peak its logits
    from flax import nnx

    class Embedder(nnx.Module):
        def __init__(self, rngs):
            self.table = nnx.Param(nnx.initializers.normal()(rngs.params(), (1000, 64)))

        def encode(self, ids):
            return self.table[...][ids]

        def decode(self, x):
            return x @ self.table[...].T

    class TiedLM(nnx.Module):
        def __init__(self, rngs):
            self.embedder = Embedder(rngs)
            self.up, self.down = nnx.Linear(64, 256, rngs=rngs), nnx.Linear(256, 64, rngs=rngs)

        def __call__(self, ids):
            x = self.embedder.encode(ids)
            return self.embedder.decode(x + self.down(nnx.gelu(self.up(x))))

    model, ids = TiedLM(nnx.Rngs(0)), jax.ShapeDtypeStruct((8, 16), jnp.int32)
    p, run, e = _compiled_and_estimated(model, (ids,), {"data": 2, "model": 4})
    assert p.decisions["embedder/table"].spec == P("model", None)
    assert e.settings["activations"] == "traced"
    assert set(run.comm()["all-reduce"]) == {"data", "model"}  # the lookup's sum is over model (tpflax.hlo)
    assert e.breakdown.logits == 8 // 2 * 16 * 1000 // 4 * 4  # local rows x the table's local rows x f32
    tied = [i for i in e.items if i.why.startswith("tied output embedding")]
    assert sorted((i.size, i.count) for i in tied) == [(8 // 2 * 16 * 4, 3), (8 // 2 * 16 * 64 * 4, 1)]
    # the next-token loss's softmax sums cover 15 of the 16 positions (72 bytes), and the loss scalar (4)
    assert e.comm_total == pytest.approx(run.comm_total, abs=80), (e.comm, run.comm())


def _gshard(router_logits, capacity):
    """GShard's top-1 dispatch and combine ``(batch, seq, experts, capacity)``: one-hot slots in each expert's buffer."""
    probs = jax.nn.softmax(router_logits, -1)
    mask = jax.nn.one_hot(jnp.argmax(probs, -1), probs.shape[-1])
    slot = (jnp.cumsum(mask, axis=1) - 1) * mask
    dispatch = (mask * (slot < capacity))[..., None] * jax.nn.one_hot(slot.sum(-1).astype(jnp.int32), capacity)[..., None, :]
    return dispatch, dispatch * (probs * mask).sum(-1)[..., None, None]


def _gshard_lm(blocks: int = 1):
    """A language model of ``blocks`` GShard expert blocks (nnx): a router, gated experts ``(4, 64, 128)`` on a
    one-hot dispatch of capacity 8, their combine added back."""
    from flax import nnx

    class Experts(nnx.Module):
        def __init__(self, rngs):
            init = nnx.initializers.lecun_normal()
            self.router = nnx.Linear(64, 4, use_bias=False, rngs=rngs)
            self.w_in, self.w_gate = (nnx.Param(init(rngs.params(), (4, 64, 128))) for _ in range(2))
            self.w_out = nnx.Param(init(rngs.params(), (4, 128, 64)))

        def __call__(self, x):
            dispatch, combine = _gshard(self.router(x), 8)
            xe = jnp.einsum("btec,btd->ecd", dispatch, x)
            h = jax.nn.silu(jnp.einsum("ecd,edf->ecf", xe, self.w_gate[...])) * jnp.einsum(
                "ecd,edf->ecf", xe, self.w_in[...])
            return x + jnp.einsum("btec,ecd->btd", combine, jnp.einsum("ecf,efd->ecd", h, self.w_out[...]))

    class MoELM(nnx.Module):
        def __init__(self, rngs):
            self.embed = nnx.Embed(256, 64, rngs=rngs)
            self.ffn = nnx.List([Experts(rngs) for _ in range(blocks)]) if blocks > 1 else Experts(rngs)
            self.head = nnx.Linear(64, 256, use_bias=False, rngs=rngs)

        def __call__(self, ids):
            x = self.embed(ids)
            for f in (self.ffn if blocks > 1 else [self.ffn]):
                x = f(x)
            return self.head(x)

    return MoELM(nnx.Rngs(0)), jax.ShapeDtypeStruct((16, 16), jnp.int32)


@newer_xla("two (8, 15) float32 all-reduces over model more, of a norm's row statistics (1,440 bytes): model "
           "89,616 bytes against 0.10's 88,176")
@pytest.mark.parametrize("mesh", [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}])
def test_experts_on_a_dispatched_buffer_move_the_buffer(mesh):
    # a one-hot dispatch ``btec,btd->ecd`` sums the batch into (experts, capacity, d): the expert pair's
    # all-reduces move that buffer, whole on every device (not the 128 local tokens: 4x here, 1.63x at
    # 256 x 32 tokens), XLA sums the buffer over the batch axes at the dispatch and at the combine's
    # transpose, and the expert weights' gradients, alike on every device of them, are not reduced
    model, ids = _gshard_lm()
    p, run, e = _compiled_and_estimated(model, (ids,), mesh)
    assert [p.decisions[f"ffn/{n}"].role for n in ("w_in", "w_gate", "w_out")] == ["column", "column", "row"]
    assert p.decisions["ffn/w_out"].spec[1] == "model"
    buffer = 4 * 8 * 64 * 4  # experts x capacity x d x f32
    batch = "data" if "data" in mesh else "fsdp"
    pair = [i for i in e.items if "ffn" in i.why and i.axes == ("model",)]
    assert [i.size for i in pair] == [buffer] * 3
    assert sorted(i.size for i in e.items if "batch-free expert" in i.why and i.axes == (batch,)) == [buffer] * 2
    assert not [i for i in e.items if i.source.startswith("ffn/w_") and i.kind == "all-reduce"]
    compiled = {a: b for k, x in run.comm().items() for a, b in x.items() if k == "all-reduce"}
    # the loss scalar (4 bytes) reduces with the gradients; the head's softmax sums for the next-token loss
    # cover 15 of the 16 positions (144 bytes)
    for axis, bound in ((batch, 16), ("model", 160)):
        assert e.comm["all-reduce"][axis] == pytest.approx(compiled[axis], abs=bound), (e.comm, run.comm())


@pytest.mark.parametrize("mesh", [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}])
def test_experts_a_rule_keeps_whole_sum_each_blocks_buffer_once(mesh):
    # experts no pair holds (a rule keeps them whole) still read a batch-free buffer: XLA sums each block's
    # dispatch once (its gate and up read the same one) and its output's gradient once, in every block. The
    # estimate summed the dispatch for each first kernel and counted alike blocks once: 0.95x of the compiled
    from flax import nnx

    model, ids = _gshard_lm(blocks=2)
    sample = (ids,)
    p = tpflax.plan(nnx.state(model), mesh, model=model, sample=sample, rules=[(r"w_(in|gate|out)$", P())])
    tpflax_mesh = tpflax.make_mesh(mesh)
    tx = optax.adamw(1e-3)
    run = tpflax.dry_run(tpflax.make_train_step(model, p, tpflax_mesh, tx, sample=sample), p, tpflax_mesh,
                         compiler_options=COMM_XLA)
    e = estimate(p, tx, model=model, sample=sample, backend="cpu")
    batch = "data" if "data" in mesh else "fsdp"
    buffer = 4 * 8 * 64 * 4  # experts x capacity x d x f32
    sums = [(i.size, i.count) for i in e.items if "batch-free expert" in i.why]
    assert sorted(sums) == [(buffer, 2), (buffer, 2)], sums
    compiled = run.comm()["all-reduce"][batch]
    # the loss scalar (4 bytes) reduces with the gradients
    assert e.comm["all-reduce"][batch] == pytest.approx(compiled, abs=4), (e.comm, run.comm())


class _Diffusers(nn.Module):
    """A transformer block under diffusers' names, which the tree pass does not know as a pair."""

    @nn.compact
    def __call__(self, x):
        h = nn.LayerNorm(name="norm1")(x)
        q, k, v = (nn.Dense(64, name=n)(h).reshape(*x.shape[:2], 4, 16) for n in ("to_q", "to_k", "to_v"))
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        x = x + nn.Dense(64, name="to_out_0")(jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape))
        return x + nn.Dense(64, name="ff_out")(nn.gelu(nn.Dense(256, name="ff_in")(nn.LayerNorm(name="norm2")(x))))


@pytest.mark.slow
def test_a_rules_only_plan_is_estimated_with_the_pairs_the_trace_finds():
    # plan(rules=...) without model= knows forced leaves by their names only: a block named as nothing the tree
    # pass knows had its forced columns priced as gathering their outputs (+14% to +38% on a diffusion UNet's
    # hand layout); estimate(model=) now asks the trace what the forced leaves are
    m, x = _Diffusers(), jax.ShapeDtypeStruct((8, 16, 64), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    mesh_sizes = {"data": 2, "model": 4}
    rules = [("(to_(q|k|v)|ff_in)/kernel", P(None, "model")), ("(to_out_0|ff_out)/kernel", P("model", None))]
    p = tpflax.plan(v, mesh_sizes, rules=rules)
    tx = optax.adamw(1e-3)
    e = estimate(p, tx, model=m, sample=(x,), backend="cpu")
    assert not any("without a partner" in i.why or "without a row partner" in i.why for i in e.items)
    traced = estimate(tpflax.plan(v, mesh_sizes, rules=rules, model=m, sample=(x,)), tx, model=m, sample=(x,),
                      backend="cpu")
    assert e.comm == traced.comm
    mesh = tpflax.make_mesh(mesh_sizes)
    ts = tpflax.make_train_step(m, p, mesh, tx, sample=(x,), loss=lambda out, x: jnp.mean(out ** 2), variables=v)
    got = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA).comm_total
    assert e.comm_total == pytest.approx(got, rel=0.02), (e.comm_total, got)


def test_an_expert_axis_splits_the_batch_and_the_estimate_prices_the_gathered_tokens():
    # the expert axis is a batch axis (GShard, MaxText's activation_batch): before, tpflax's step kept every
    # non-expert layer's work the same on all 4 expert ranks; its dense expert einsums now gather the tokens
    # over expert alone (the batch's minor axis) and sum the outputs back, which the estimate prices
    # (before: one all-reduce of the local rows, 0.15-0.48x of the compiled collectives once the batch split)
    m, tx, mesh_sizes = zoo.get("moe", n_layers=1), optax.adamw(1e-3), {"expert": 4, "data": 2}
    mesh = tpflax.make_mesh(mesh_sizes)
    p = tpflax.plan(m.abstract_variables(), mesh_sizes, model=m)
    ts = tpflax.make_train_step(m, p, mesh, tx, 8)
    assert ts.in_shardings[2]["x"].spec == P(("data", "expert"))
    run = tpflax.dry_run(ts, p, mesh, compiler_options=FAST_XLA)
    # the hand GShard layout (experts on E over expert, the rest replicated, the batch over data and expert)
    # compiles to these same numbers (measured: flops, peak and collectives equal); on main the step's
    # expert ranks repeated the attention, embedding and head work
    assert run.flops < 2.0e7, run.flops  # 1.73e7; main: 2.66e7 (the peak 1.67 MB, main 1.91)
    e = estimate(p, tx, 8, model=m, backend="cpu")
    assert e.comm_total == pytest.approx(run.comm_total, rel=0.1), (e.comm, run.comm())


def test_default_tpu_estimate_prices_the_plans_slice_of_the_mesh():
    # XLA:TPU reduce-scatters a pinned fsdp gradient only where it reduces over the mesh on one ring:
    # a v5e-8 (2x4) does, a v5e-16 (4x4) all-reduces it whole (tests/test_tpu.py compiles both). With
    # no target= the estimate takes the plan's hardware preset at the mesh's device count
    g, norm = 2 * 64 * 256 * 4, 64 * 4  # the two kernels' and the norm scale's gradient bytes
    batch = {"x": (16, 64)}
    sixteen = tpflax.plan(mlp_tree(), {"fsdp": 16})  # hardware: tpu-v5e, the default
    e = estimate(sixteen, optax.sgd(0.1), batch)
    assert "reduce-scatter" not in e.comm
    assert by(e, "all-reduce", "fsdp") == 2 * 15 / 16 * (g + norm)  # whole, then sliced
    assert e.comm == estimate(sixteen, optax.sgd(0.1), batch, target="tpu-v5e:4x4").comm
    assert any(n.startswith("tpu-v5e:4x4: XLA:TPU reduces over these devices as an N-dimensional") for n in e.notes)
    eight = estimate(tpflax.plan(mlp_tree(), {"fsdp": 8}), optax.sgd(0.1), batch)
    assert by(eight, "reduce-scatter", "fsdp") == 7 / 8 * g and not any("N-dimensional" in n for n in eight.notes)
    # the preset's generation decides: v5p's 4 chips (2x2x1) are one ring, its 8 (2x2x2) are not
    v5p = {n: estimate(tpflax.plan(mlp_tree(), {"fsdp": n}, hardware="tpu-v5p"), optax.sgd(0.1), batch)
           for n in (4, 8)}
    # (on 4 the up kernel's [64, 64] shard keeps its split dim in the lanes, 64 wide: not whole tiles,
    # so XLA:TPU all-reduces that gradient whole; compiled for v5p:2x2x1, its all-reduce is the estimate's)
    assert by(v5p[4], "reduce-scatter", "fsdp") == 3 / 4 * g / 2 and "reduce-scatter" not in v5p[8].comm
    assert by(v5p[4], "all-reduce", "fsdp") == 2 * 3 / 4 * (g / 2 + norm)
    # a GPU reduce-scatters, whatever the plan's preset; a count with no known slice stays one ring
    assert by(estimate(sixteen, optax.sgd(0.1), batch, backend="gpu"), "reduce-scatter", "fsdp") == 15 / 16 * g
    twelve = estimate(tpflax.plan(mlp_tree(96, 384), {"fsdp": 12}), optax.sgd(0.1), {"x": (12, 96)})
    assert by(twelve, "reduce-scatter", "fsdp") == pytest.approx(11 / 12 * 2 * 96 * 384 * 4)


def test_a_target_topology_of_another_device_count_is_an_error():
    # a v5p:2x2x4 (16 devices, no one ring) given for an 8-device mesh was silently priced as one ring
    # (reduce-scatters); make_mesh(target=) refuses such a mesh, and so does the estimate now
    p = tpflax.plan(mlp_tree(), {"fsdp": 8})
    with pytest.raises(tpflax.EstimateError, match="tpu-v5p:2x2x4 has 16 devices but the plan's mesh has 8"):
        estimate(p, optax.sgd(0.1), {"x": (16, 64)}, target="tpu-v5p:2x2x4")
    assert "reduce-scatter" not in estimate(p, optax.sgd(0.1), {"x": (16, 64)}, target="TPU-v5p:2x2x2").comm


def test_default_tpu_estimate_prices_gathers_over_a_whole_pod_slice_as_all_reduces():
    # XLA:TPU runs an fsdp gather over every device of a slice of 64 or more (v5e:8x8 and up) as an
    # all-reduce of the zero-padded shard: twice a gather's ring bytes (tests/test_tpu.py compiles one).
    # A gather over part of the slice, over 32 devices, or of a leaf over 16 MiB (as stored) stays a gather
    kernel, grads = 64 * 256 * 2, 2 * 64 * 256 * 4 + 64 * 4  # a kernel gathered in bfloat16; the gradients
    pod = estimate(tpflax.plan(mlp_tree(), {"fsdp": 64}), optax.sgd(0.1), {"x": (64, 64)})
    assert "all-gather" not in pod.comm
    assert by(pod, "all-reduce", "fsdp") == 2 * 63 / 64 * (2 * kernel + grads)
    assert all("zero-padded shard" in i.why for i in pod.items if i.size == kernel)
    half = estimate(tpflax.plan(mlp_tree(), {"fsdp": 32, "data": 2}), optax.sgd(0.1), {"x": (64, 64)})
    assert by(half, "all-gather", "fsdp") == 31 / 32 * 2 * kernel
    v5e32 = estimate(tpflax.plan(mlp_tree(), {"fsdp": 32}), optax.sgd(0.1), {"x": (32, 64)})
    assert by(v5e32, "all-gather", "fsdp") == 31 / 32 * 2 * kernel
    # the leaf's stored bytes decide (measured: float32 16 MiB all-reduced, 24 MiB gathered)
    edge = estimate(tpflax.plan(mlp_tree(1024, 4096), {"fsdp": 64}), optax.sgd(0.1), {"x": (64, 1024)})
    assert "all-gather" not in edge.comm
    big = estimate(tpflax.plan(mlp_tree(1024, 6144), {"fsdp": 64}), optax.sgd(0.1), {"x": (64, 1024)})
    assert by(big, "all-gather", "fsdp") == 63 / 64 * 2 * 1024 * 6144 * 2  # 24 MiB each as stored: gathered
    # a GPU, or a TPU estimate with backend="cpu", gathers
    assert "all-gather" in estimate(tpflax.plan(mlp_tree(), {"fsdp": 64}), optax.sgd(0.1), {"x": (64, 64)},
                                    backend="gpu").comm


class _UserMoE(nn.Module):
    """A user MoE (benchmarks/tpu_aot_notes.md, twenty-first round): ``combine_after`` keeps the expert dim through
    the down projection and sums it with the router weights (``bsed,bse->bsd``); else the zoo's form."""

    combine_after: bool

    @nn.compact
    def __call__(self, x):  # (b, s, d)
        x = nn.Dense(32, name="inp")(x)
        w = jax.nn.softmax(nn.Dense(8, use_bias=False, name="router")(x), axis=-1)  # (b, s, e)
        wi = self.param("wi", nn.initializers.lecun_normal(), (8, 32, 64))
        wo = self.param("wo", nn.initializers.lecun_normal(), (8, 64, 32))
        h = nn.silu(jnp.einsum("bsd,edf->bsef", x, wi))
        if self.combine_after:
            return jnp.einsum("bsed,bse->bsd", jnp.einsum("bsef,efd->bsed", h, wo), w)
        return jnp.einsum("bsef,efd->bsd", h * w[..., None], wo)


@pytest.mark.parametrize("combine_after", [True, False])
def test_experts_summed_by_a_product_of_activations_are_noted_as_unpriced(combine_after):
    # measured: the bsed,bse->bsd combine compiles to 4-8x the estimate's collectives (all-gathers and
    # all-to-alls of a partitioner fallback); the zoo's combine is priced within a few percent
    x = jax.ShapeDtypeStruct((8, 16, 32), "float32")
    m = _UserMoE(combine_after)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"expert": 4, "data": 2}, model=m, sample=(x,))
    assert tuple(p.decisions["params/wo"].spec)[0] == "expert"
    e = estimate(p, optax.adamw(1e-3), model=m, sample=(x,))
    noted = [n for n in e.notes if "product of two activations" in n]
    if combine_after:
        assert len(noted) == 1 and "params/wi (over expert)" in noted[0] and "params/wo (over expert)" in noted[0]
        assert "lower bound" in noted[0] and "tpflax/zoo/moe.py" in noted[0]
    else:
        assert not noted
    zoo_moe = zoo.get("moe")
    zp = tpflax.plan(zoo_moe.abstract_variables(), {"expert": 4, "data": 2}, model=zoo_moe)
    assert not any("product of two" in n for n in estimate(zp, optax.adam(1e-3), "16x16", model=zoo_moe).notes)


@pytest.mark.parametrize("name", ["mlp", "cnn", "nnx-mlp", "vit", "gpt2"])
def test_a_bare_batch_size_is_a_zoo_models_own_batch(name):
    """A zoo model estimated at a bare batch size prices its own batch of that many examples, as
    ``jax.eval_shape(lambda: m.make_batch(0, n))`` does: an MLP, a CNN and an nnx MLP (no sequence length in
    their configs: it asked for a shape, "pass model=", though the model was given), ViT (its config's
    sequence length, patches + 1, made the batch ``(16, 17)`` float ids, not ``(16, 32, 32, 3)`` images) and
    an LM, whose own batch is the ``(16, seq_len)`` tokens it was priced at before."""
    m = zoo.get(name)
    p = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    bare = tpflax.estimate(p, optax.adamw(1e-3), 16, model=m)
    given = tpflax.estimate(p, optax.adamw(1e-3), jax.eval_shape(lambda: m.make_batch(0, 16)), model=m)
    assert bare.per_device == given.per_device and bare.comm == given.comm and bare.peak == given.peak
    assert bare.batch == given.batch


def test_a_batch_of_numbers_or_an_unknown_dtype_says_how_to_write_shapes():
    # ((8, 64), (8,)) and {"x": (8, 64), "y": 8} were trees of 0-d leaves: "the global batch 1 does not divide";
    # "dtype": "bf16" was numpy's bare TypeError, and "dtype": jnp.bfloat16 made the mapping a tree too
    p = tpflax.plan({"w": jax.ShapeDtypeStruct((64, 256), "float32")}, {"data": 2, "model": 4})
    for batch in (((8, 64), (8,)), [(8, 64)], {"x": (8, 64), "y": 8}):
        with pytest.raises(EstimateError, match=r"holds numbers, not shapes or arrays; write the inputs' shapes as a "
                                                r"mapping of name to shape"):
            estimate(p, None, batch)
    with pytest.raises(EstimateError, match=r"batch\['dtype'\] = 'bf16' is not a dtype jax knows"):
        estimate(p, None, {"x": (8, 64), "dtype": "bf16"})
    for dtype in ("bfloat16", jnp.bfloat16):
        assert estimate(p, None, {"x": (8, 64), "dtype": dtype}).batch["leaves"][0] == ["x", [8, 64], "bfloat16"]


def test_trace_activations_refuses_a_batch_it_would_misread():
    # "4x32" and True traced a batch of 1, 0 a batch of none, all without a word; (4, 32) was taken for the sample
    # inputs (the model called on two ints); np.int64(4) is a size as 4 is
    m = zoo.get("mlp")
    for batch, words in (("4x32", r"batch='4x32' is a shape; .*e.g. batch=4"), ((4, 32), r"is a shape"),
                         (0, "is not a positive whole number"), (True, "is not a positive whole number")):
        with pytest.raises(EstimateError, match=words):
            trace_activations(m, batch)
    assert trace_activations(m, np.int64(4))["block_0/mlp/up"][0].output == (4, 256)
