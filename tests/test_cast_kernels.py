"""Kernels a model casts before its matmul (``Dense(dtype=bfloat16)`` over float32 parameters).

The matmul then reads a copy an op made of the parameter (:attr:`tpflax._src.trace.records.Dataflow.derived`),
which XLA's sharding propagation lays out as the matmul prefers, where the parameter keeps the layout it was
placed in. A whole kernel beside split features is then sliced to them and its partial sums all-reduced, as
inside a scan or a rematerialised call, where an uncast float32 kernel gathers the narrower side instead
(``tests/test_stream_ends.py`` has the output head's case).
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, FAST_XLA

import tpflax
from tpflax import zoo

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

MESH = {"data": 2, "model": 4}
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install "tpflax[tpu]")')


def _numbers(m, p):
    mesh = tpflax.make_mesh(MESH)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), batch=8), p, mesh,
                        compiler_options=FAST_XLA)
    mem = dr.memory
    return dr, (mem["argument"] + mem["temp"] + mem["output"] - mem["alias"], dr.comm_total, dr.flops)


def test_a_whole_key_value_cast_to_bfloat16_sums_its_input_gradient_over_its_pieces(devices):
    # the zoo Llama's 2 key/value heads beside 4 query heads split over model=4, kept whole: XLA splits their
    # cast copies in 2 pieces and sums their (4, 32, 64) input gradients over the 2 ranks holding different
    # pieces, one tuple all-reduce per layer; float32, it gathers the (4, 32, 2, 16) output gradients instead
    m = zoo.get("llama", "tiny", dtype=jnp.bfloat16)
    whole = tpflax.plan(m.abstract_variables(), MESH, model=m, rules=[(r".*/(k|v)_proj/.*", "replicate")])
    e = tpflax.estimate(whole, optax.adamw(1e-3), model=m, batch=8, backend="cpu")
    sums = [i for i in e.items if "k_proj" in i.source and i.kind == "all-reduce" and "model" in i.axes]
    assert [(i.group_size, i.ring_bytes) for i in sums] == [(2, 4 * 32 * 64 * 4)]
    dr, kept = _numbers(m, whole)
    summed = [c for c in dr.collectives if c.kind == "all-reduce" and c.axes == ("model",) and "k_proj" in c.op_name]
    assert [(c.group_size, c.shapes) for c in summed] == [(2, ((4, 32, 64), (4, 32, 64)))] * 2
    # measured 0.982; 0.893 with the output gradients' gathers priced, 1.053 with the sums over 4 ranks
    assert abs(e.comm_total / dr.comm_total - 1) < 0.03

    # priced so, the chooser splits their head_dim instead: fewer bytes, collectives and flops (measured 0.966 /
    # 0.960 / 0.998 of the whole layout), where it kept them whole, as it does the float32 model's
    p = tpflax.plan(m.abstract_variables(), MESH, model=m)
    kv = {path: tuple(d.spec) for path, d in p.decisions.items() if path.endswith(("k_proj/kernel", "v_proj/kernel"))}
    assert set(kv.values()) == {(None, None, "model")} and len(kv) == 4
    _, split = _numbers(m, p)
    assert all(a < b for a, b in zip(split, kept, strict=True))


@pytest.mark.parametrize("mesh,backend", [(MESH, "cpu"), ({"fsdp": 2, "model": 4}, "cpu"),
                                          pytest.param(MESH, "tpu", marks=needs_libtpu)],
                         ids=["data", "fsdp", "data-tpu"])
def test_mixed_precision_mistral_whole_key_value_estimate(mesh, backend, devices):
    # transformers' Mistral computing in bfloat16 over its float32 parameters (dtype=bfloat16, weights as
    # initialised): its 2 key/value heads stay whole beside 4 split query heads, and their cast copies' input
    # gradients are summed over the 2 pieces; on fsdp=2,model=4 too, where tpflax's step gathers the kernel
    # before the cast (measured 1.000 on both; 0.886 / 0.897 with the output gradients' gathers priced). XLA:TPU
    # sums them too (a float32 key/value kept whole it gathers over every rank instead): measured 1.001, 0.842
    # with the gathers priced and q, gate and up's input gradients summed once (below)
    pytest.importorskip("transformers", reason="the thirdparty extra is not installed")
    from hf_models import BY_NAME, with_layers
    from mixed_precision import mixed
    from third_party import make_plans

    arch = with_layers(BY_NAME["mistral"], 1)
    b = mixed(arch)
    p = make_plans(arch, b, b.params, mesh)["model"]
    kv = [d.spec for path, d in p.decisions.items() if path.endswith(("k_proj/kernel", "v_proj/kernel"))]
    assert len(kv) == 2 and not any("model" in tuple(s) for s in kv)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=b.fn, sample=b.sample, loss=b.loss, backend=backend)
    sums = [i for i in e.items if "k_proj" in i.why and i.kind == "all-reduce" and i.group_size == 2]
    assert any("(backward)" in i.why and "input gradients" in i.why for i in sums), [i.why for i in e.items]
    m = tpflax.make_mesh(mesh, target="tpu-v5e:2x4" if backend == "tpu" else None)
    dr = tpflax.dry_run(tpflax.make_train_step(b.fn, p, m, optax.adamw(1e-3), sample=b.sample, loss=b.loss), p, m,
                        compiler_options=COMM_XLA if backend == "cpu" else None)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.01


class _Block(nn.Module):
    """A pre-norm gated MLP computing in bfloat16 behind a float32 norm, as transformers' Flax decoders do."""
    once: bool

    @nn.compact
    def __call__(self, x):
        scale = self.param("scale", nn.initializers.ones, (x.shape[-1],))
        h = x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6) * scale
        if self.once:
            h = h.astype(jnp.bfloat16)  # cast once for both projections: their Dense casts nothing
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=jnp.bfloat16, name=name)  # noqa: E731
        y = nn.silu(dense(256, "gate")(h)) * dense(256, "up")(h)
        return x + dense(x.shape[-1], "down")(y).astype(jnp.float32)


class _TwoBlocks(nn.Module):
    once: bool

    @nn.compact
    def __call__(self, x):
        return _Block(self.once, name="b1")(_Block(self.once, name="b0")(x))


@needs_libtpu
@pytest.mark.parametrize("once", [False, True], ids=["each", "once"])
def test_columns_casting_their_input_each_for_itself_are_reduced_apart_on_tpu(once, devices):
    # gate and up each cast the float32 normed input to bfloat16 (transformers' Llama, Mistral, Gemma with
    # dtype=): their partial input gradients are two bfloat16 values, each cast back before the float32 sum,
    # and XLA:TPU all-reduces the two apart (one tuple all-reduce of two bf16[4,32,64] per layer) where it sums
    # one cast's gradient once. Measured (v5e:2x4, data=2,model=4) to the byte; each cast was priced once:
    # transformers' Llama in mixed precision at 0.712 of the compiled collectives, now 1.001
    net, x = _TwoBlocks(once), jnp.ones((8, 32, 64), jnp.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(params, MESH, model=net.apply, sample=x)
    assert tuple(p.specs["params"]["b0"]["up"]["kernel"]) == (None, "model")
    loss = lambda out, batch: jnp.mean(out ** 2)  # noqa: E731
    mesh = tpflax.make_mesh(MESH, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net.apply, p, mesh, optax.adamw(1e-3), sample=x, loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net.apply, sample=x, batch=x, loss=loss, backend="tpu",
                          target="tpu-v5e:2x4")
    sums = [c for c in dr.collectives if c.kind == "all-reduce" and c.axes == ("model",)]
    # two rows' outputs forward, and the columns' input gradients: two apart, or one
    assert sorted(len(c.shapes) for c in sums) == ([1, 1, 1, 1] if once else [1, 1, 2, 2])
    assert est.comm["all-reduce"]["model"] == dr.comm()["all-reduce"]["model"] == 24576 * (4 if once else 6)


class _TiedHalfCast(nn.Module):
    """GPT-Neo's table: looked up as it is (float32), its transpose cast to bfloat16 for the logits."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(1000, 64, name="wte")
        x = emb(ids)
        x = x + nn.Dense(64, dtype=jnp.bfloat16, name="mix")(x).astype(jnp.float32)
        return x.astype(jnp.bfloat16) @ emb.embedding.T.astype(jnp.bfloat16)


class _SharedCastTable(nn.Module):
    """BART's and T5's shared table in mixed precision: looked up by the encoder and the decoder, and tied to the
    logits, every read a bfloat16 copy."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(1000, 64, dtype=jnp.bfloat16, name="shared")
        x = emb(ids) + emb(ids[:, ::-1])
        return emb.attend(nn.Dense(64, dtype=jnp.bfloat16, name="mix")(x))


class _CastConvs(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Conv(32, (3, 3), dtype=jnp.bfloat16, name="c0")(x)
        x = nn.Conv(32, (3, 3), dtype=jnp.bfloat16, name="c1")(nn.relu(x))
        return nn.Dense(10, dtype=jnp.bfloat16, name="head")(x.mean((1, 2)))


@needs_libtpu
@pytest.mark.parametrize("net,x", [(_TiedHalfCast(), jnp.ones((8, 32), jnp.int32)),
                                   (_SharedCastTable(), jnp.ones((16, 16), jnp.int32)),
                                   (_CastConvs(), jnp.ones((8, 16, 16, 3)))], ids=["tied-table", "shared-table", "convs"])
def test_each_read_of_a_leaf_has_its_gradient_reduced_in_the_dtype_it_reads_on_tpu(net, x, devices):
    # XLA:TPU sums a weight gradient in the dtype the op that made it computes in. A float32 table looked up as
    # it is and cast to bfloat16 for the tied logits (transformers' GPT-Neo and XGLM in mixed precision) has two:
    # one float32 (the lookup's) and one bfloat16 (the logits'), both priced as float32 before (1.327 of the
    # compiled collectives here, 1.28 on GPT-Neo's data axis). A bfloat16 convolution over float32 kernels (ViT's
    # patch embedding) sums its gradient as bfloat16, priced as float32 before (1.969 here). A table looked up
    # twice and tied, every read cast (BART's and T5's shared table): each lookup's scatter-add is reduced apart,
    # where float32 it scatters both as one after all-to-alls (cost/lookups.py; BART's data axis 0.887, now 1.005)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    loss = lambda out, batch: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    p = tpflax.plan(params, {"data": 8}, model=net.apply, sample=x)
    mesh = tpflax.make_mesh({"data": 8}, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net.apply, p, mesh, optax.adamw(1e-3), sample=x, loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net.apply, sample=x, batch=x, loss=loss, backend="tpu",
                          target="tpu-v5e:2x4")
    ring = 2 * 7 / 8  # an all-reduce over 8 devices moves this much of its operand on each

    operands = sorted((t, s) for c in dr.collectives for t, s in zip(c.dtypes, c.shapes, strict=True))
    if isinstance(net, _TiedHalfCast):
        assert [t for t, s in operands if s == (1000, 64)] == ["bf16", "f32"]
        assert sorted(i.ring_bytes for i in est.items if "wte" in i.source) == [64000 * 2 * ring, 64000 * 4 * ring]
    elif isinstance(net, _SharedCastTable):
        assert [t for t, s in operands if s == (1000, 64)] == ["bf16"] * 3
        assert not [c for c in dr.collectives if c.kind == "all-to-all"]
        assert [(i.ring_bytes, i.count) for i in est.items if "shared" in i.source] == [(64000 * 2 * ring, 1),
                                                                                       (64000 * 2 * ring, 2)]
    else:
        assert [(t, s) for t, s in operands if len(s) == 4] == [("bf16", (3, 3, 3, 32)), ("bf16", (3, 3, 32, 32))]
        assert [i.ring_bytes for i in est.items if "/c1/kernel" in i.source] == [3 * 3 * 32 * 32 * 2 * ring]
    assert abs(est.comm_total / dr.comm_total - 1) < 0.01  # measured 1.0003 and 1.0069: the small sums' padding


@needs_libtpu
def test_a_shared_cast_tables_gradient_parts_are_reduce_scattered_alike_on_tpu(devices):
    # fsdp-split (fsdp=2,model=4: the table P('model', 'fsdp')), each of the three bfloat16 parts of a shared table
    # read only through casts is reduce-scattered, one tuple reduce-scatter of three (250, 32) shards; a float32
    # table's dense part is all-reduced whole beside its one scatter. Priced as all-reduced whole before:
    # transformers' BART in mixed precision at 1.287 of the compiled fsdp-axis bytes, 0.988 now
    net, x = _SharedCastTable(), jnp.ones((16, 16), jnp.int32)
    shape = {"fsdp": 2, "model": 4}
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(params, shape, model=net.apply, sample=x)
    assert tuple(p.specs["params"]["shared"]["embedding"]) == ("model", "fsdp")
    loss = lambda out, batch: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    mesh = tpflax.make_mesh(shape, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net.apply, p, mesh, optax.adamw(1e-3), sample=x, loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net.apply, sample=x, batch=x, loss=loss, backend="tpu",
                          target="tpu-v5e:2x4")
    parts = [(c.kind, s) for c in dr.collectives for s in c.shapes if s == (250, 32)]
    assert parts == [("reduce-scatter", (250, 32))] * 3
    table = [(i.kind, i.ring_bytes, i.count) for i in est.items if "shared" in i.source and i.axes == ("fsdp",)]
    assert sorted(table) == [("all-gather", 16000, 1), ("reduce-scatter", 16000, 1), ("reduce-scatter", 16000, 2)]
    assert est.comm["reduce-scatter"]["fsdp"] == dr.comm()["reduce-scatter"]["fsdp"]


class _TiedCastTable(nn.Module):
    """GPT-2's and BERT's table in mixed precision: 1022 rows (not divisible by 8), looked up and tied, both cast."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(1022, 64, dtype=jnp.bfloat16, name="wte")
        x = emb(ids)
        return emb.attend(x + nn.Dense(64, dtype=jnp.bfloat16, name="mix")(x))


@needs_libtpu
def test_a_cast_tables_narrow_fsdp_shards_are_reduce_scattered_in_its_float32_tiles_on_tpu(devices):
    # fsdp=8 splits the (1022, 64) table's features: bf16[1022, 8] gradient shards, 8 sublanes. A bfloat16 leaf's
    # shard of 8 sublanes is half a 16-bit tile and XLA:TPU all-reduces it whole; a float32 leaf's bfloat16 gradient
    # takes the leaf's tiles, and both parts are reduce-scattered. Priced as two whole all-reduces before: 1.628 of
    # the compiled collectives here, transformers' BERT and GPT-2 in mixed precision at 1.295 and 1.265
    net, x = _TiedCastTable(), jnp.ones((16, 32), jnp.int32)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(params, {"fsdp": 8}, model=net.apply, sample=x)
    assert tuple(p.specs["params"]["wte"]["embedding"]) == (None, "fsdp")
    loss = lambda out, batch: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net.apply, p, mesh, optax.adamw(1e-3), sample=x, loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net.apply, sample=x, batch=x, loss=loss, backend="tpu",
                          target="tpu-v5e:2x4")
    assert [(c.kind, c.dtypes, c.shapes) for c in dr.collectives if (1022, 8) in c.shapes] == [
        ("reduce-scatter", ("bf16", "bf16"), ((1022, 8), (1022, 8)))]
    assert [(i.kind, i.count) for i in est.items if "wte" in i.source and i.kind != "all-gather"] == [
        ("reduce-scatter", 1), ("reduce-scatter", 1)]
    assert est.comm["reduce-scatter"]["fsdp"] == dr.comm()["reduce-scatter"]["fsdp"]
