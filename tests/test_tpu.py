"""TPU targets: meshes over libtpu's abstract devices, compiled by the TPU compiler.

The target-name checks run everywhere; the compiles need libtpu
(``pip install "tpflax[tpu]"``) and are skipped with that reason without it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest

import tpflax
from tpflax import zoo
from tpflax.cli import main

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason='libtpu is not installed (pip install "tpflax[tpu]")')


def test_unknown_topology_lists_the_known_ones():
    with pytest.raises(tpflax.MeshError, match=r"known tpu-v5e topologies: 1x1, 2x2, 2x4, 4x4, 4x8, 8x8, "
                                               r"8x16, 16x16"):
        tpflax.make_mesh({"model": 9}, target="tpu-v5e:3x3")
    with pytest.raises(tpflax.MeshError, match=r"generations: tpu-v4, tpu-v5e, tpu-v5p, tpu-v6e"):
        tpflax.make_mesh({"model": 8}, target="tpu-v9:2x4")


def test_mesh_must_cover_the_target_and_names_the_right_one():
    with pytest.raises(tpflax.MeshError, match=r"data=2,model=2 has 4 devices but target tpu-v5e:2x4 has 8.*"
                                               r"--target tpu-v5e:2x2"):
        tpflax.make_mesh({"data": 2, "model": 2}, target="tpu-v5e:2x4")


def test_missing_libtpu_says_how_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "libtpu" else real(name, *a))
    # v6e:1x1 is used by no other test, so no cached topology hides the check
    with pytest.raises(tpflax.DeviceError, match=r'pip install "tpflax\[tpu\]"'):
        tpflax.make_mesh({"model": 1}, target="tpu-v6e:1x1")


@pytest.fixture(scope="module")
def llama_on_v5e():
    """A small Llama train step compiled for a v5e:2x4 slice (8 chips): a few seconds."""
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4})
    mesh = tpflax.make_mesh(p.mesh.sizes, target="tpu-v5e:2x4")
    live = len(jax.live_arrays())
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 16)
    dr = tpflax.dry_run(ts, p, mesh)
    return mesh, ts, dr, len(jax.live_arrays()) - live


@needs_libtpu
def test_a_target_mesh_keeps_the_explicit_axes_of_the_mesh_given():
    # make_mesh(AbstractMesh, target=) came back Auto, as without a target
    E = jax.sharding.AxisType.Explicit
    explicit = jax.sharding.AbstractMesh((2, 4), ("data", "model"), axis_types=(E, E))
    assert tpflax.make_mesh(explicit, target="tpu-v5e:2x4").axis_types == (E, E)
    assert tpflax.make_mesh({"data": 2, "model": 4}, target="tpu-v5e:2x4").axis_types == (jax.sharding.AxisType.Auto,) * 2


@needs_libtpu
def test_target_mesh_is_the_topologys_abstract_devices(llama_on_v5e):
    mesh, ts, _, allocated = llama_on_v5e
    assert mesh.devices.size == 8 and mesh.devices.flat[0].platform == "tpu"
    assert mesh.devices.flat[0].device_kind == "TPU v5 lite"
    assert len({d.id for d in mesh.devices.flat}) == 8
    # the step's arguments are abstract: shapes with shardings over the TPU mesh, nothing allocated
    for leaf in jax.tree_util.tree_leaves(ts.args):
        assert isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding.mesh is mesh
    assert allocated == 0


@needs_libtpu
def test_dry_run_reports_the_tpu_peak_and_fit(llama_on_v5e):
    _, _, dr, _ = llama_on_v5e
    m = dr.memory
    assert dr.platform == "tpu"
    assert set(m) == {"argument", "output", "temp", "alias", "generated_code", "peak", "reserved"}
    # the peak counts every live argument and output, so it is never below them; this
    # small program reports temp as 0 and only a simulated peak, so temp is what the peak adds
    assert m["peak"] >= m["argument"] + m["output"] - m["alias"] > 0
    assert m["peak"] == m["argument"] + m["output"] - m["alias"] + m["temp"]
    assert m["reserved"] == 0  # no temp block reported, nothing set apart
    assert dr.fit.hardware == "tpu-v5e" and dr.fit.device_memory == 16 * 10**9  # the preset's HBM
    assert dr.fit.fits and dr.fit.peak == m["peak"]
    assert dr.collectives and dr.flops > 0
    assert any(line.strip().startswith("fits: peak") for line in dr.report_lines())


def test_tuple_values_counts_tuple_shaped_buffers_outside_fusion_bodies():
    # XLA:TPU gives each tuple-shaped value's index table a 16 KiB slot of its HBM temp heap: a multi-output
    # fusion and a copy-start have one, an async start with a nested tuple two (counted against the buffer dumps
    # of tpu_aot_notes.md, "Fifty-eighth round"); a fusion body's tuple, a parameter, a get-tuple-element and
    # the entry's root (the outputs' table, allocated with them) do not, nor a layout's brackets
    from tpflax._src.compiled import tuple_values

    text = """HloModule m, is_scheduled=true

%fused_computation (p0: f32[8], p1: f32[8]) -> (f32[8], f32[8]) {
  %p0 = f32[8]{0} parameter(0)
  %p1 = f32[8]{0} parameter(1)
  ROOT %t = (f32[8]{0}, f32[8]{0}) tuple(%p0, %p1)
}

ENTRY %main (a: (f32[8], f32[8])) -> (f32[8], f32[8]) {
  %a = (f32[8]{0}, f32[8]{0}) parameter(0)
  %x = f32[8]{0} get-tuple-element(%a), index=0
  %y = f32[8]{0} get-tuple-element(%a), index=1
  %f = (f32[8]{0}, f32[8]{0}) fusion(%x, %y), kind=kLoop, calls=%fused_computation
  %c = (f32[8]{0:T(128)S(1)}, f32[8]{0:T(128)}, u32[]{:S(2)}) copy-start(%x)
  %d = f32[8]{0:S(1)} copy-done(%c)
  %s = ((bf16[8]{0:T(128)(2,1)}), bf16[16]{0:T(128)(2,1)}, u32[]{:S(2)}) all-gather-start(%y), dimensions={0}
  %g = f32[8]{0} get-tuple-element(%f), index=0
  ROOT %r = (f32[8]{0}, f32[8]{0}) tuple(%g, %d)
}
"""
    assert tuple_values(text) == 4


def test_tuple_values_leave_out_applied_computations_and_a_loops_shared_state():
    # an argmax's variadic reduce applies a reducer whose root is an (f32[], s32[]) tuple, a sort a comparator:
    # code, no buffers; a while loop's state is one table, shared by its operand, the loop, its body's root and
    # the body's and condition's parameters. Counted against v5e:2x4 buffer dumps of a step with argmax (66
    # tables, read 68 before) and with argmax, a 3-step scan and a sort (73, read 77): tpu_aot_notes.md
    from tpflax._src.compiled import tuple_values

    text = """HloModule m, is_scheduled=true

%region_0 (a: f32[], b: s32[], c: f32[], d: s32[]) -> (f32[], s32[]) {
  %a = f32[] parameter(0)
  %b = s32[] parameter(1)
  %c = f32[] parameter(2)
  %d = s32[] parameter(3)
  %gt = pred[] compare(%a, %c), direction=GT
  %m = f32[] select(%gt, %a, %c)
  %i = s32[] select(%gt, %b, %d)
  ROOT %t = (f32[], s32[]) tuple(%m, %i)
}

%cmp (p0: f32[], p1: f32[], p2: s32[], p3: s32[]) -> pred[] {
  %p0 = f32[] parameter(0)
  %p1 = f32[] parameter(1)
  %p2 = s32[] parameter(2)
  %p3 = s32[] parameter(3)
  ROOT %lt = pred[] compare(%p0, %p1), direction=LT
}

%body (s: (s32[], f32[8])) -> (s32[], f32[8]) {
  %s = (s32[], f32[8]{0}) parameter(0)
  %k = s32[] get-tuple-element(%s), index=0
  %v = f32[8]{0} get-tuple-element(%s), index=1
  %one = s32[] constant(1)
  %k1 = s32[] add(%k, %one)
  %v1 = f32[8]{0} tanh(%v)
  ROOT %next = (s32[], f32[8]{0}) tuple(%k1, %v1)
}

%cond (s: (s32[], f32[8])) -> pred[] {
  %s = (s32[], f32[8]{0}) parameter(0)
  %k = s32[] get-tuple-element(%s), index=0
  %n = s32[] constant(3)
  ROOT %lt = pred[] compare(%k, %n), direction=LT
}

ENTRY %main (x: f32[4,8], y: s32[4,8]) -> (s32[4], f32[8]) {
  %x = f32[4,8]{1,0} parameter(0)
  %y = s32[4,8]{1,0} parameter(1)
  %inf = f32[] constant(-inf)
  %zero = s32[] constant(0)
  %r = (f32[4]{0}, s32[4]{0}) reduce(%x, %y, %inf, %zero), dimensions={1}, to_apply=%region_0
  %o = (f32[4,8]{1,0}, s32[4,8]{1,0}) sort(%x, %y), dimensions={1}, to_apply=%cmp
  %row = f32[8]{0} constant({0, 0, 0, 0, 0, 0, 0, 0})
  %init = (s32[], f32[8]{0}) tuple(%zero, %row)
  %w = (s32[], f32[8]{0}) while(%init), condition=%cond, body=%body
  %idx = s32[4]{0} get-tuple-element(%r), index=1
  %last = f32[8]{0} get-tuple-element(%w), index=1
  ROOT %out = (s32[4]{0}, f32[8]{0}) tuple(%idx, %last)
}
"""
    # the reduce's, the sort's and the loop's tables
    assert tuple_values(text) == 3


class _TinyLM(nn.Module):
    """A 2-layer pre-norm MLP LM whose 1003-row token table model=4 does not divide (``benchmarks/tpu_tiny_temp.py``)."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(1003, 128, name="embed")(ids)
        for i in range(2):
            h = nn.RMSNorm(name=f"norm_{i}")(x)
            x = x + nn.Dense(128, name=f"down_{i}")(nn.gelu(nn.Dense(512, name=f"up_{i}")(h)))
        return nn.Dense(1003, name="head")(nn.RMSNorm(name="norm_f")(x))


@needs_libtpu
def test_a_tiny_steps_temp_slots_of_tuple_tables_are_reported_apart_on_tpu():
    # a tiny step's arrays live on chip; XLA:TPU's HBM temp heap holds only the index tables of its tuple
    # values, each in a 16 KiB slot, and its temp block counts that heap twice. The step with the token table
    # split on its features reported that block (4,290,048 B) and the whole-table step did not, so dry_run's
    # peak read the split at 5.89 MB against 4.98 where XLA's own heap simulation has it at 4.05
    # (benchmarks/tpu_tiny_temp.py, tpu_aot_notes.md "Fifty-eighth round"): now the slots are set apart
    from jax.sharding import PartitionSpec as P

    ms = {"fsdp": 2, "model": 4}
    ids = (jax.ShapeDtypeStruct((8, 32), jnp.int32),)
    m = _TinyLM()
    v = jax.eval_shape(m.init, jax.random.key(0), *ids)
    mesh = tpflax.make_mesh(ms, target="tpu-v5e:2x4")
    chosen = tpflax.plan(v, ms, batch=ids)
    mem, fits = {}, {}
    for name, spec in (("whole", P(None, "fsdp")), ("split", P(None, "model"))):
        p = tpflax.plan(v, ms, rules=[("^" + k + "$", spec if k == "params/embed/embedding" else d.spec)
                                      for k, d in chosen.decisions.items()])
        dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=ids, variables=v), p, mesh)
        mem[name], fits[name] = dr.memory, dr.fit
    split, whole = mem["split"], mem["whole"]
    assert split["peak"] < whole["peak"]  # XLA's heap simulation: the split holds less (4.05 against 4.98 MB)
    assert whole.get("reserved") == 0 and split.get("reserved", 0) > 0
    for name, m_ in mem.items():
        assert m_["peak"] == m_["argument"] + m_["output"] - m_["alias"] + m_["temp"]
        assert (fits[name].peak, fits[name].reserved) == (m_["peak"], m_["reserved"])
    # nothing is lost: peak + reserved is XLA:TPU's own argument + output - alias + temp
    assert split["peak"] + split["reserved"] == 5889536


def _fsdp_llama(n: int, target: str, batch: int):
    """The tiny zoo Llama planned fsdp-only over ``n`` devices and its adamw step compiled for ``target``."""
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": n})
    mesh = tpflax.make_mesh({"fsdp": n}, target=target)
    return m, p, tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), batch), p, mesh)


@needs_libtpu
def test_fsdp_gradients_reduce_scatter_on_tpu_and_the_estimate_counts_them():
    # tpflax's step pins each gradient to its shards, so XLA:TPU reduce-scatters it (an
    # all-reduce moves twice the bytes) and gathers float32 kernels as bfloat16; the estimate
    # models both. Its error is a few KiB of norm-scale all-reduces (1-D leaves) in ~590 KiB.
    m, p, dr = _fsdp_llama(8, "tpu-v5e:2x4", 8)
    comm = dr.comm()
    assert comm["reduce-scatter"]["fsdp"] > 10 * comm.get("all-reduce", {}).get("fsdp", 0)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu")
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total


@needs_libtpu
@pytest.mark.parametrize("shape", [{"data": 8}, {"fsdp": 8}], ids=["data", "fsdp"])
def test_a_bfloat16_models_float32_gradients_are_reduced_as_bfloat16_on_tpu(shape):
    # computing in bfloat16 over float32 parameters (the zoo Llama, dtype=bfloat16): each weight gradient comes
    # out of a bfloat16 matmul or lookup and XLA:TPU sums or scatters it before casting it back, half the
    # float32 bytes; the estimate took the leaves' width: 1.994 (data=8) and 1.412 (fsdp=8) of the compiled
    # collectives
    m = zoo.get("llama", dtype=jnp.bfloat16)
    p = tpflax.plan(m.abstract_variables(), shape, model=m)
    mesh = tpflax.make_mesh(shape, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh)
    sums = [c for c in dr.collectives if c.kind in ("all-reduce", "reduce-scatter") and c.bytes > 4096]
    assert sums and all(set(c.dtypes) == {"bf16"} for c in sums)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu", target="tpu-v5e:2x4")
    if "data" in shape:
        assert abs(est.comm_total / dr.comm_total - 1) < 0.01  # measured 1.000
        return
    # the fsdp gathers, bfloat16 too (the kernels' and the table's), to the byte; the 3-D attention kernels'
    # bfloat16 gradients are laid out in 16-row tiles whatever their dims, and their [8, 4, 16], [8, 2, 16] and
    # [4, 16, 8] shards all-reduced whole (0.931 of the compiled bytes before round 41, which laid q, k and v out
    # as their float32 parameters and reduce-scattered them); all of it to the byte but the loss's scalar
    gathers = sum(i.ring_bytes * i.count for i in est.items if i.kind == "all-gather")
    assert gathers == sum(c.ring_bytes * c.count for c in dr.collectives if c.kind == "all-gather")
    assert dr.comm_total - est.comm_total == 2 * 7 / 8 * 4


@needs_libtpu
def test_fsdp_gradients_reduce_scatter_beside_a_tensor_axis_on_tpu():
    # with a tensor axis in the mesh XLA:TPU reduce-scatters the pinned fsdp gradients too (its
    # all-reduce-scatter fusions look the shard index up in a table, which the HLO parser once
    # took for a slice and read as all-reduces); the 1-D norm scales and the shards that are not
    # whole tiles (q's [32, 1, 16], down's [32, 32]) are all-reduced whole, as on fsdp-only meshes
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "model": 4})
    tmesh = tpflax.make_mesh(p.mesh.sizes, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, tmesh, optax.adamw(1e-3), 8), p, tmesh)
    comm = dr.comm()
    scattered = [c for c in dr.collectives if c.kind == "reduce-scatter"]
    assert comm["reduce-scatter"]["fsdp"] > 0.4 * comm["all-reduce"]["fsdp"], comm
    assert any(s == (128, 64) for c in scattered for s in c.shapes)  # the embedding's fsdp shard
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu")
    assert est.comm["reduce-scatter"]["fsdp"] == pytest.approx(comm["reduce-scatter"]["fsdp"], rel=0.01)
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total


class _Table(nn.Module):
    @nn.compact
    def __call__(self, ids):
        return nn.Dense(64, name="head")(nn.Embed(1000, 256, name="embed")(ids))


@needs_libtpu
def test_fsdp_gradient_of_rows_not_whole_tiles_is_padded_and_reduce_scattered_on_tpu():
    # a (1000, 256) table split over fsdp=8: shards of 125 rows, not whole 8-row tiles; XLA:TPU pads
    # the gradient to 128-row shards and reduce-scatters it, then collective-permutes move each device's
    # rows into place (3 rows per device before it); it does not all-reduce it whole
    from jax.sharding import PartitionSpec as P

    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    v = jax.eval_shape(_Table().init, jax.random.key(0), ids)
    p = tpflax.plan(v, {"fsdp": 8}, rules=[("embed", P("fsdp", None)), ("head", "replicate")])
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(_Table(), p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh)
    (rs,) = [c for c in dr.collectives if c.kind == "reduce-scatter"]
    assert rs.shapes == ((128, 256),)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=_Table(), sample=(ids,), loss=loss, backend="tpu")
    assert est.comm["reduce-scatter"]["fsdp"] == rs.ring_bytes  # 128 rows (priced as 125 before round 41)
    (cp,) = [c for c in dr.collectives if c.kind == "collective-permute"]
    assert cp.shapes == ((21, 256),) and est.comm["collective-permute"]["fsdp"] == cp.ring_bytes == 21 * 256 * 4


class _Tables(nn.Module):
    """Tables of (rows, width, param dtype), each looked up and summed over its features."""

    tables: tuple

    @nn.compact
    def __call__(self, ids):
        h = sum(nn.Embed(r, w, param_dtype=dt, name=f"t{r}_{w}")(ids % r).sum(-1, keepdims=True)
                for r, w, dt in self.tables)
        return nn.Dense(64, name="head")(h)


@needs_libtpu
def test_fsdp_row_shards_pad_by_the_lanes_they_fill_on_tpu():
    # XLA:TPU pads a reduce-scattered sublane shard to a multiple of 8 rows holding a multiple of 2048 elements:
    # 8 rows at a time beside 256 lanes (a 4000-row table's 500-row shards as 504, 21-row shards as 24), 16 beside
    # 128 (21 rows would be 32: a third padding, all-reduced whole), for a bfloat16 gradient too (8-row shards of
    # 256 lanes reduce-scattered as they are; of 128, all-reduced whole). The estimate had padded 16 rows at a
    # time and taken bfloat16's 16-row tiles
    net = _Tables(((4000, 256, jnp.float32), (168, 256, jnp.float32), (168, 128, jnp.float32),
                   (64, 256, jnp.bfloat16), (64, 128, jnp.bfloat16)))
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    v = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(v, {"fsdp": 8}, rules=[("t\\d", jax.sharding.PartitionSpec("fsdp", None)), ("head", "replicate")])
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh)
    scattered = sorted(s for c in dr.collectives if c.kind == "reduce-scatter" for s in c.shapes)
    assert scattered == [(8, 256), (24, 256), (504, 256)]
    whole = sorted(s for c in dr.collectives if c.kind == "all-reduce" for s in c.shapes if len(s) == 2)
    assert whole == [(1, 64), (64, 128), (168, 128)]  # and the replicated head's kernel
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), loss=loss, backend="tpu")
    comm = dr.comm()
    assert est.comm["reduce-scatter"]["fsdp"] == comm["reduce-scatter"]["fsdp"]
    assert est.comm["collective-permute"]["fsdp"] == comm["collective-permute"]["fsdp"] == 7 * (4 + 3) * 256 * 4
    assert comm["all-reduce"]["fsdp"] - est.comm["all-reduce"]["fsdp"] == 2 * 7 / 8 * 4  # the loss's scalar


@needs_libtpu
@pytest.mark.parametrize("mesh, scattered, whole", [({"fsdp": 2, "model": 4}, 9, 20), ({"fsdp": 4, "model": 2}, 21, 20)])
def test_fsdp_row_shards_padding_depends_on_the_fsdp_devices_on_tpu(mesh, scattered, whole):
    # 64 columns (16-row grain): XLA:TPU pads a shard when the n padded shards are at most 1.5x the whole gradient's
    # rows in 8-row tiles. On fsdp=2 a 9-row shard is padded to 16 (32 rows for 18 -> 24), on fsdp=4 a 21-row one to
    # 32 (128 for 84 -> 88); fsdp=8's "less than a third padding" would all-reduce both whole. 20-row shards are
    # all-reduced whole on both (64 for 40, 128 for 80)
    n = mesh["fsdp"]
    net = _Tables(((n * scattered, 64, jnp.float32), (n * whole, 64, jnp.float32)))
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32)
    v = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(v, mesh, rules=[("t\\d", jax.sharding.PartitionSpec("fsdp", None)), ("head", "replicate")])
    tmesh = tpflax.make_mesh(mesh, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, tmesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, tmesh)
    padded = 16 * -(-scattered // 16)
    assert [s for c in dr.collectives if c.kind == "reduce-scatter" for s in c.shapes] == [(padded, 64)]
    assert (n * whole, 64) in {s for c in dr.collectives if c.kind == "all-reduce" for s in c.shapes}
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), loss=loss, backend="tpu")
    comm = dr.comm()
    assert est.comm["reduce-scatter"]["fsdp"] == comm["reduce-scatter"]["fsdp"] == (n - 1) * padded * 64 * 4
    assert est.comm["collective-permute"]["fsdp"] == comm["collective-permute"]["fsdp"] == (
        (n - 1) * (padded - scattered) * 64 * 4)


class _Stacked(nn.Module):
    """``(3, 128, f)`` kernels read by an einsum over their first two dims, one per width."""

    widths: tuple

    @nn.compact
    def __call__(self, x):
        return sum(jnp.einsum("btkc,kcf->btf", x, self.param(f"w{f}", nn.initializers.normal(0.02), (3, 128, f))).sum(-1)
                   for f in self.widths)


@needs_libtpu
def test_fsdp_shards_of_three_dims_are_never_padded_on_tpu():
    # (3, 128, 8 s) kernels split on 8 s over fsdp=8: the parameter's layout puts 128 in the lanes and 3 on the
    # sublanes, so the split dim is a major one. XLA:TPU reduce-scatters the 8-row shards and all-reduces the 11-
    # and 21-row ones whole; it pads no shard of three dims (the estimate had reduce-scattered all three)
    net, x = _Stacked((64, 88, 168)), jax.ShapeDtypeStruct((8, 32, 3, 128), jnp.float32)
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(v, {"fsdp": 8}, rules=[("w", jax.sharding.PartitionSpec(None, None, "fsdp"))])
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh)
    assert [s for c in dr.collectives if c.kind == "reduce-scatter" for s in c.shapes] == [(3, 128, 8)]
    assert {(3, 128, 88), (3, 128, 168)} <= {s for c in dr.collectives if c.kind == "all-reduce" for s in c.shapes}
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), loss=loss, backend="tpu")
    comm = dr.comm()
    assert est.comm["reduce-scatter"]["fsdp"] == comm["reduce-scatter"]["fsdp"]
    assert comm["all-reduce"]["fsdp"] - est.comm["all-reduce"]["fsdp"] == 2 * 7 / 8 * 4  # the loss's scalar


class _Grouped(nn.Module):
    """A 4-group 3x3 convolution between two 1x1 ones (RegNet's bottleneck, no norms)."""

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(32, (1, 1), name="a")(x)
        h = nn.Conv(32, (3, 3), feature_group_count=4, name="g")(nn.relu(h))
        return nn.Conv(32, (1, 1), name="b")(nn.relu(h)).mean((1, 2))


@needs_libtpu
@pytest.mark.parametrize("split", [False, True], ids=["whole", "tensor-split"])
def test_a_grouped_convolution_splits_its_batch_on_tpu(split):
    # XLA:CPU gathers a grouped convolution's input and output gradient over the batch and sums its kernel's
    # gradient over every device; XLA:TPU splits its batch like any convolution's: its kernel's gradient is summed
    # over data alone, and a kernel split over model has only its input gathered, once, in bfloat16. The estimate
    # priced the CPU's everywhere: RegNet 1.362 and Wav2Vec2 1.126 of the compiled bytes on data=2,model=4
    net, x = _Grouped(), jax.ShapeDtypeStruct((16, 8, 8, 32), jnp.float32)
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    P = jax.sharding.PartitionSpec
    p = tpflax.plan(v, {"data": 2, "model": 4}, model=net, sample=(x,),
                    rules=[("g/kernel", P(None, None, None, "model"))] if split else [(".*", "replicate")])
    mesh = tpflax.make_mesh({"data": 2, "model": 4}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), loss=loss, backend="tpu")
    assert not [c for c in dr.collectives if c.kind == "all-gather" and "data" in c.axes]
    assert not [i for i in est.items if i.kind == "all-gather" and "data" in i.axes]
    if not split:  # every gradient summed over data, the grouped kernel's too; nothing else
        assert set(dr.comm()) == set(est.comm) == {"all-reduce"}
        assert dr.comm()["all-reduce"]["data"] - est.comm["all-reduce"]["data"] == 2 * 1 / 2 * 4  # the loss's scalar
        return
    (gathered,) = [c for c in dr.collectives if c.kind == "all-gather" and c.shapes == ((8, 8, 8, 32),)]
    assert gathered.dtypes == ("bf16",)
    (priced,) = [i for i in est.items if i.source == "params/g/kernel" and i.kind == "all-gather"]
    assert (priced.axes, priced.ring_bytes) == (("model",), gathered.ring_bytes)


class _Pointwise(nn.Module):
    """A chain of 1x1 convolutions over float32 kernels, computing in ``dtype`` (bfloat16: RegNet's in mixed
    precision)."""

    widths: tuple[int, ...]
    dtype: str

    @nn.compact
    def __call__(self, x):
        for i, c in enumerate(self.widths):
            x = nn.relu(nn.Conv(c, (1, 1), use_bias=False, dtype=jnp.dtype(self.dtype), name=f"c{i}")(x))
        return x


@needs_libtpu
@pytest.mark.parametrize("dtype, expected", [
    ("bfloat16", {0: "f32", 1: "bf16", 2: "f32", 3: "bf16", 4: "f32", 5: "bf16", 6: "f32", 7: "bf16"}),
    ("float32", {0: "f32", 1: "f32", 2: "f32", 3: "bf16", 4: "f32", 5: "f32", 6: "f32", 7: "bf16"}),
])
def test_a_1x1_kernel_is_gathered_as_float32_where_its_layout_change_is_a_bitcast_on_tpu(dtype, expected):
    # XLA:TPU converts a float32 kernel to bfloat16 before its fsdp gather, except a 1x1 convolution kernel whose
    # gathered layout (the split dim major, 1-row tiles: shards not whole 8-row tiles) is a bitcast of the one the
    # convolution reads (the other dim minor, within 128 lanes): its convert then fuses into the convolution and
    # the gather stays float32. RegNet on fsdp=8 in mixed precision was 0.960 of the compiled collectives, four
    # such kernels priced as bfloat16. Kernels (in -> out, split dim): 32->32 on in; 32->48 on out (bfloat16
    # reads the 48 minor, float32 the smaller 32); 48->48 on in; 48->128 on out (16-row shards: whole tiles);
    # 128->200 on out (the 128 is minor); 200->96 on in (bfloat16: the 200 pads less as the rows; float32: the
    # 96 is smaller); 96->144 on out (the 96 minor: 144 pads to 256 lanes); 144->256 on out (the other dim
    # wider than a lane tile; its 32-row shards are whole tiles too)
    net = _Pointwise((32, 48, 48, 128, 200, 96, 144, 256), dtype)
    x = jax.ShapeDtypeStruct((8, 4, 4, 32), jnp.float32)
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(v, {"fsdp": 8}, model=net, sample=(x,))
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), loss=loss, backend="tpu")
    got = {}
    for i, shape in enumerate([(32, 32), (32, 48), (48, 48), (48, 128), (128, 200), (200, 96), (96, 144),
                               (144, 256)]):
        (gathered,) = [c for c in dr.collectives if c.kind == "all-gather" and c.shapes == ((1, 1) + shape,)]
        (priced,) = [e for e in est.items if e.source == f"params/c{i}/kernel" and e.kind == "all-gather"]
        assert priced.ring_bytes == gathered.ring_bytes
        got[i] = gathered.dtypes[0]
    assert got == expected


@needs_libtpu
def test_a_float32_1x1_kernel_split_over_model_is_read_with_its_split_dim_minor_on_tpu():
    # in float32 a convolution reads a 1x1 kernel with its smaller feature dim minor, unless a tensor axis splits
    # one: then that one. A 24 -> 160 column over model=4 (local 24 -> 40) split on its input over fsdp=2, and the
    # 160 -> 24 row back: both 40s are minor, their gathers' layouts bitcasts of it, both gathered as float32
    P = jax.sharding.PartitionSpec
    net, x = _Pointwise((160, 24), "float32"), jax.ShapeDtypeStruct((8, 4, 4, 24), jnp.float32)
    v = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(v, {"fsdp": 2, "model": 4}, rules=[("c0/kernel", P(None, None, "fsdp", "model")),
                                                       ("c1/kernel", P(None, None, "model", "fsdp"))])
    mesh = tpflax.make_mesh({"fsdp": 2, "model": 4}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), loss=loss, backend="tpu")
    for i, shape in enumerate([(1, 1, 24, 40), (1, 1, 40, 24)]):
        (gathered,) = [c for c in dr.collectives if c.kind == "all-gather" and c.shapes == (shape,)]
        (priced,) = [e for e in est.items if e.source == f"params/c{i}/kernel" and e.kind == "all-gather"]
        assert gathered.dtypes == ("f32",) and priced.ring_bytes == gathered.ring_bytes


@needs_libtpu
def test_fsdp_gradients_all_reduce_whole_where_the_slice_is_not_one_ring():
    # the same step as above on v5p:2x2x2: XLA:TPU runs its collectives over the 3-D slice as
    # N-dimensional all-reduces, which it does not turn into reduce-scatters, so every gradient is
    # all-reduced whole (twice the bytes); estimate(target=) knows the slice, and its generation too
    m, p, dr = _fsdp_llama(8, "tpu-v5p:2x2x2", 8)
    comm = dr.comm()
    assert "reduce-scatter" not in comm and comm["all-reduce"]["fsdp"] > 3 * comm["all-gather"]["fsdp"]
    for target in ("tpu-v5p:2x2x2", "tpu-v5p"):
        est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu", target=target)
        assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total
        assert "reduce-scatter" not in est.comm and est.settings["target"] == target
    ring = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu", target="tpu-v5e:2x4")
    assert ring.comm_total < 0.7 * dr.comm_total and "reduce-scatter" in ring.comm
    with pytest.raises(tpflax.EstimateError, match="unknown TPU target"):
        tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, target="tpu-v9")


@needs_libtpu
def test_default_estimate_prices_the_plans_slice_of_sixteen_devices():
    # v5e:4x4 is no one ring (two torus dims of 4): XLA:TPU all-reduces every fsdp gradient whole, and
    # the estimate with no target= prices the plan's preset (tpu-v5e) at the mesh's 16 devices
    m, p, dr = _fsdp_llama(16, "tpu-v5e:4x4", 16)
    assert "reduce-scatter" not in dr.comm() and dr.comm()["all-reduce"]["fsdp"] > 3 * dr.comm()["all-gather"]["fsdp"]
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=16)
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total and "reduce-scatter" not in est.comm


@needs_libtpu
def test_default_estimate_prices_gathers_over_a_whole_64_device_slice_as_all_reduces():
    # on v5e:8x8 XLA:TPU compiles the fsdp parameter gathers over all 64 devices as one all-reduce of
    # the zero-padded shards (no all-gather in the HLO: twice the ring bytes); the default estimate
    # prices them so (it was -18.3%)
    m, p, dr = _fsdp_llama(64, "tpu-v5e:8x8", 64)
    assert "all-gather" not in dr.comm() and "reduce-scatter" not in dr.comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=64)
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total and "all-gather" not in est.comm


@needs_libtpu
def test_fsdp_gathers_of_one_row_shards_travel_as_float32_on_tpu():
    # fsdp=64,model=2 on v5e:8x16: a device holds one row of each MLP kernel (64 rows split 64 ways, 128
    # columns 2 ways), one key/value head and one row of the head. A bfloat16 tile packs two rows, so
    # XLA:TPU gathers such a shard as stored (f32[64,1,64]) and converts after, while the queries' shard
    # (two heads) travels as bfloat16; the estimate priced every kernel as bfloat16 (-9.3%)
    m = zoo.get("llama")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 64, "model": 2}, hardware="tpu-v5e")
    mesh = tpflax.make_mesh(p.mesh.sizes, target="tpu-v5e:8x16")
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 128), p, mesh)
    gathers = {(c.shapes, c.dtypes) for c in dr.collectives if c.kind == "all-gather"}
    assert (((64, 1, 64),), ("f32",)) in gathers and (((64, 2, 16),), ("bf16",)) in gathers
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=128, target="tpu-v5e:8x16")
    assert est.comm["all-gather"]["fsdp"] == pytest.approx(dr.comm()["all-gather"]["fsdp"], rel=1e-3)
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total


@needs_libtpu
@pytest.mark.slow
def test_v4_devices_are_tensorcores_with_half_a_chips_hbm():
    m = zoo.get("mlp")
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v4:2x2x1")  # 4 chips, 2 devices each
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), 8), p, mesh)
    assert dr.fit.hardware == "tpu-v4" and dr.fit.device_memory == 16 * 2**30


@needs_libtpu
@pytest.mark.slow
def test_suggest_verify_compiles_for_the_presets_topology():
    s = tpflax.suggest_mesh(zoo.get("llama"), 8, hardware="tpu-v5e", optimizer=optax.sgd(0.1), batch=8,
                            verify=1)
    (v,) = s.verified
    assert v.target == "tpu-v5e:2x4" and v.compiled is not None
    assert v.fits_compiled and v.agree
    assert "XLA:tpu-v5e:2x4" in "\n".join(s.report_lines())


@needs_libtpu
@pytest.mark.slow
def test_cli_dry_run_target(capsys):
    assert main(["dry-run", "mlp", "--mesh", "fsdp=8", "--target", "tpu-v5p:2x2x2", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["dry_run"]["platform"] == "tpu"
    assert out["dry_run"]["fit"]["fits"] is True
    assert out["dry_run"]["memory"]["peak"] == out["dry_run"]["fit"]["peak"]
    # the estimate beside it is for the same slice: v5p:2x2x2 all-reduces the fsdp gradients whole
    # (before, the CLI's estimate priced the reduce-scatter of a one-ring slice)
    assert out["estimate"]["settings"]["target"] == "tpu-v5p:2x2x2"
    rows = {r["name"]: r for r in out["estimate_vs_compiled"]["rows"] if r["section"] == "comm"}
    assert not any("reduce-scatter" in n for n in rows)
    assert abs(rows["all-reduce over fsdp"]["rel_error"]) < 0.01


@needs_libtpu
@pytest.mark.slow  # a fresh python process: ~5 s
def test_no_libtpu_start_up_warnings_without_a_tpu():
    # a fresh process, without the settings this one's `import tpflax` made, runs a CLI plan
    # (which starts jax's backends, and with them libtpu)
    env = {k: v for k, v in os.environ.items()
           if k not in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "TPU_SKIP_MDS_QUERY")}
    env["PYTHONPATH"] = str(Path(__file__).parent.parent)
    run = subprocess.run([sys.executable, "-m", "tpflax.cli", "plan", "mlp", "--mesh", "model=2"],
                         env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "tpflax plan" in run.stdout
    for noise in ("TPU_ACCELERATOR_TYPE", "TPU_WORKER_HOSTNAMES", "InitGoogle", "E0000"):
        assert noise not in run.stderr


class _Block(nn.Module):
    """An attention block, post-norm (BERT: the residual reads the q/k/v input) or pre-norm (Llama)."""

    post: bool

    @nn.compact
    def __call__(self, x):
        d, heads = x.shape[-1], 4
        y = x if self.post else nn.LayerNorm()(x)
        q, k, v = (nn.Dense(d, name=n)(y).reshape(*x.shape[:-1], heads, d // heads)
                   for n in ("query", "key", "value"))
        a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
        x = x + nn.Dense(d, name="out")(jnp.einsum("bhqk,bkhd->bqhd", a, v).reshape(x.shape))
        return nn.LayerNorm()(x) if self.post else x


class _Encoder(nn.Module):
    post: bool

    @nn.compact
    def __call__(self, x):
        x = nn.LayerNorm(name="embed_norm")(x)  # parameters upstream: layer 0 needs its input gradient
        for i in range(2):
            x = _Block(self.post, name=f"layer_{i}")(x)
        return x


@needs_libtpu
@pytest.mark.parametrize("post", [True, False], ids=["post-norm", "pre-norm"])
def test_post_norm_qkv_input_gradients_reduce_apart_on_tpu(post):
    # XLA:TPU adds q, k and v's partial input gradients and all-reduces the sum once, unless a
    # residual also reads their input (post-norm): then each is added to the residual's gradient and
    # reduced apart. The trace sees which (tpflax._src.trace.sharing); the count of activation
    # all-reduces over model is exact: 2 layers x (1 forward + 3 or 1 backward) of f32[4, 128, 256].
    net, x = _Encoder(post), jax.ShapeDtypeStruct((8, 128, 256), jnp.float32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(variables, {"data": 2, "model": 4}, model=net, sample=(x,))
    mesh = tpflax.make_mesh({"data": 2, "model": 4}, target="tpu-v5e:2x4")
    ts = tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=lambda out, *_: jnp.mean(out ** 2))
    compiled = tpflax.dry_run(ts, p, mesh).comm()["all-reduce"]["model"]
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), backend="tpu")
    one = 4 * 128 * 256 * 4 * 2 * 3 / 4  # ring all-reduce over 4 of one device's f32 activation
    assert compiled == est.comm["all-reduce"]["model"] == (8 if post else 4) * one


class _Heads(nn.Module):
    """One attention-style projection: a ``[d, d // 64, 64]`` kernel (ViT's q/k/v)."""

    @nn.compact
    def __call__(self, x):
        return nn.DenseGeneral((x.shape[-1] // 64, 64), name="query")(x)


@needs_libtpu
@pytest.mark.parametrize("d", [512, 640])
def test_fsdp_gradient_reduce_scatters_only_in_whole_tiles_of_its_layout(d):
    # The kernel's fsdp=8 shard is [d/8, d/64, 64]. The TPU lays it out padding least: at 512 the
    # 64-wide dim goes in the lanes and the split dim (shards of 64) on the sublanes, whole (8, 128)
    # tiles, so XLA:TPU reduce-scatters its gradient; at 640 the split dim goes in the lanes (shards
    # of 80, not a multiple of 128) and the gradient is all-reduced whole (ViT-B at 768: shards of 96).
    # The estimate prices both from the shapes; what it misses is the bias's 2 KiB at 640.
    net, x = _Heads(), jax.ShapeDtypeStruct((8, 16, d), jnp.float32)
    variables = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(variables, {"fsdp": 8}, model=net, sample=(x,))
    assert p.specs["params"]["query"]["kernel"] == jax.sharding.PartitionSpec("fsdp", None, None)
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    ts = tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=lambda out, *_: jnp.mean(out ** 2))
    compiled = tpflax.dry_run(ts, p, mesh).comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), backend="tpu")
    kernel = d * d * 4 * 7 / 8  # a ring reduce-scatter over 8 of the f32 kernel; an all-reduce moves twice that
    if d == 512:
        assert compiled["reduce-scatter"]["fsdp"] == est.comm["reduce-scatter"]["fsdp"] == kernel
    else:
        assert "reduce-scatter" not in compiled and compiled["all-reduce"]["fsdp"] > 2 * kernel
    assert abs(est.comm_total - sum(v for by in compiled.values() for v in by.values())) <= 0.002 * est.comm_total


class _Reduced(nn.Module):
    """Gradients whose fsdp shards are whole tiles but which XLA:TPU all-reduces whole: a position table
    looked up at ``arange`` positions (GPT-2's ``wpe``), a ``[1, T, d]`` table (ViT's), a ``[64, 16]``
    kernel whose shard is one tile; the token table (looked up by ids) and the rest reduce-scatter."""

    @nn.compact
    def __call__(self, ids):
        t = ids.shape[1]
        x = nn.Embed(1024, 256, name="tok")(ids) + nn.Embed(t, 256, name="wpe")(jnp.arange(t)[None, :])
        x = x + jnp.tile(nn.Dense(16, use_bias=False, name="small")(x[..., :64]), 16)
        x = nn.Dense(256, name="mix")(x) + self.param("pos", nn.initializers.normal(0.02), (1, t, 256))
        return nn.Dense(1024, name="head")(x)


@needs_libtpu
def test_fsdp_gradients_of_positions_one_tile_and_a_leading_one_all_reduce_whole_on_tpu():
    # Compiled on v5e:2x4 with fsdp=8: the shards of wpe [128, 32] and pos [1, 128, 32] are whole
    # (8, 128) tiles (the split 256 on the sublanes), small's [8, 16] is one tile; all three are
    # all-reduced whole (wpe's gradient is a sum over the batch, as a bias's). The estimate prices
    # each collective kind to the byte (the loss's scalar all-reduce aside).
    # wpe's split is forced: priced with the estimate's rule, the chooser keeps a table looked up at
    # batch-free positions whole (tests/test_choose.py); this test is about the estimate of the split one
    from jax.sharding import PartitionSpec as P

    net, ids = _Reduced(), jax.ShapeDtypeStruct((8, 128), jnp.int32)
    variables = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(variables, {"fsdp": 8}, model=net, sample=(ids,), rules=[(r"wpe/embedding$", P(None, "fsdp"))])
    assert p.decisions["params/wpe/embedding"].spec == P(None, "fsdp")
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    ts = tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss)
    compiled = tpflax.dry_run(ts, p, mesh).comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), backend="tpu").comm
    whole = (128 * 256 * 2 + 64 * 16) * 4 * 2 * 7 / 8  # wpe, pos and small: ring all-reduces over 8 of f32
    assert est["reduce-scatter"]["fsdp"] == compiled["reduce-scatter"]["fsdp"]
    assert est["all-reduce"]["fsdp"] - whole == pytest.approx(compiled["all-reduce"]["fsdp"] - whole, abs=8)
    assert est["all-reduce"]["fsdp"] > whole


class _Buckets(nn.Module):
    """T5's relative-position bias: a ``(buckets, heads)`` table looked up at ``(query, key)`` buckets, added to
    the scores of every example."""

    @nn.compact
    def __call__(self, ids):
        t, h = ids.shape[1], 8
        x = nn.Embed(1000, 256, name="tok")(ids)
        q = nn.DenseGeneral((h, 32), name="q")(x)
        k = nn.DenseGeneral((h, 32), name="k")(x)
        v = nn.DenseGeneral((h, 32), name="v")(x)
        buckets = jnp.clip(jnp.arange(t)[None, :] - jnp.arange(t)[:, None] + 16, 0, 31)
        bias = nn.Embed(32, h, name="relative_attention_bias")(buckets)  # (t, t, h)
        s = jnp.einsum("bqhd,bkhd->bhqk", q, k) + bias.transpose(2, 0, 1)[None]
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s), v)
        return nn.Dense(1000, name="head")(x + nn.DenseGeneral(256, axis=(-2, -1), name="o")(o))


@needs_libtpu
@pytest.mark.parametrize("mesh_shape", [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}], ids=["data", "fsdp"])
def test_a_batch_free_lookups_rows_are_all_reduced_over_the_batch_on_tpu(mesh_shape):
    # The bias table's gradient is never reduced: XLA:TPU sums the looked-up (query, key, heads / 4)
    # rows over the batch axes (f32[256,256,2], 512 KiB, in the biases' tuple all-reduce) and scatters
    # them into the table after. The estimate counts those rows (it counted the (32, 2) table: 256 B),
    # to the byte over the batch axis.
    net, ids = _Buckets(), jax.ShapeDtypeStruct((8, 256), jnp.int32)
    variables = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(variables, mesh_shape, model=net, sample=(ids,))
    mesh = tpflax.make_mesh(mesh_shape, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh)
    batch = next(iter(mesh_shape))
    rows = [c for c in dr.collectives if c.kind == "all-reduce" and (256, 256, 2) in c.shapes]
    assert len(rows) == 1 and rows[0].axes == (batch,)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), backend="tpu")
    assert est.comm["all-reduce"][batch] == dr.comm()["all-reduce"][batch]


@needs_libtpu
def test_two_layers_reduce_scatters_sharing_a_channel_are_two_on_tpu():
    # XLA:TPU reduce-scatters each GPT-2 layer's q/k/v/out and c_proj gradients in its own
    # all-reduce-scatter fusion; the two layers' fusions carry the same channel_id and shapes.
    # Unlike the pieces of an async all-gather (fusions each reading the one before), neither
    # reads the other, so the parser counts both: one reduce-scatter per layer, to the byte.
    d, vocab = 768, 1024  # at this width XLA:TPU does not combine the layers' reduce-scatters
    m = zoo.get("gpt2", d_model=d, d_ff=4 * d, n_heads=12, n_layers=2, seq_len=32, vocab=vocab,
                dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh)
    layer = 7 / 8 * (4 * d * d + 4 * d * d) * 2  # a ring reduce-scatter over 8 of q, k, v, out and c_proj
    rs = [c for c in dr.collectives if c.kind == "reduce-scatter" and c.ring_bytes == layer]
    assert len(rs) == 2 and rs[0].channel_id == rs[1].channel_id and rs[0].shapes == rs[1].shapes
    assert rs[0].computation != rs[1].computation and rs[0].pieces == rs[1].pieces == 1
    wte = 7 / 8 * vocab * d * 2
    assert dr.comm()["reduce-scatter"]["fsdp"] == 2 * layer + wte
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu")
    assert est.comm["reduce-scatter"]["fsdp"] == 2 * layer + wte


class _Stack(nn.Module):
    """Two scanned layers of one ``[d, d]`` kernel: a ``(2, d, d)`` stack."""

    @nn.compact
    def __call__(self, x):
        layer = nn.scan(_Square, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)
        return layer(name="layers")(x, None)[0]


class _Square(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return x + 0.1 * nn.Dense(x.shape[-1], use_bias=False, name="kernel")(x), None


@needs_libtpu
@pytest.mark.parametrize("d", [64, 128])
def test_a_scanned_stacks_fsdp_gradient_reduces_one_layers_tiles_on_tpu(d):
    # fsdp=8 on v5e:2x4 splits the stack's (2, d, d) kernel on its first body dim. The backward scan reduces
    # each layer's gradient in its step, so the tile rule reads one layer's shard: [8, 64] at 64 is one
    # tile and XLA:TPU all-reduces it whole; [16, 128] at 128 reduce-scatters. The estimate read the whole
    # (2, 8, 64) stack's shard, two rows of tiles, and priced a reduce-scatter at 64.
    net, x = _Stack(), jax.ShapeDtypeStruct((8, 16, d), jnp.float32)
    p = tpflax.plan(jax.eval_shape(net.init, jax.random.key(0), x), {"fsdp": 8}, model=net, sample=(x,))
    assert p.specs["params"]["layers"]["kernel"]["kernel"] == jax.sharding.PartitionSpec(None, "fsdp", None)
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    ts = tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(x,), loss=lambda out, *_: jnp.mean(out ** 2))
    compiled = tpflax.dry_run(ts, p, mesh).comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(x,), backend="tpu").comm
    kernels = 2 * d * d * 4 * 7 / 8  # ring reduce-scatters over 8 of both layers' f32 kernels
    if d == 64:
        assert "reduce-scatter" not in compiled and "reduce-scatter" not in est
        assert est["all-reduce"]["fsdp"] == 2 * kernels and compiled["all-reduce"]["fsdp"] - 2 * kernels < 8
    else:
        assert est["reduce-scatter"]["fsdp"] == compiled["reduce-scatter"]["fsdp"] == kernels


@needs_libtpu
def test_tpu_keeps_every_layers_gathered_weights_and_the_estimate_counts_them():
    # Without remat XLA:TPU keeps each layer's fsdp-gathered weights from its forward to its backward pass
    # (the backward matmul reads them): the compiled peak grows per layer by the layer's share of every
    # other term plus its gathered weights (Peak.gathered_kept; benchmarks/tpu_aot_notes.md). A 512-wide
    # bf16 Llama whose weights outweigh its activations, compiled at 4 layers (~10 s): from 2 to 4 layers
    # its compiled peak grows 26.8 MiB, the estimate 25.8 with the kept 16 MiB, 9.8 without; so with the
    # term the 4-layer estimate is within the 2-layer row's error (-7.5%: per step, the head's gathers and
    # fragmentation), and without it a third under (-33.9%).
    m = zoo.get("llama", vocab=1024, seq_len=128, d_model=512, n_heads=4, n_kv_heads=4, head_dim=128,
                d_ff=2048, n_layers=4, remat=False, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    peak = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8), p, mesh).memory["peak"]
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, batch=8, backend="tpu")
    kept = est.breakdown.gathered_kept
    assert kept == 16 * 2**20  # two layers beyond the working set's two, 8 MiB each
    assert abs(est.peak - peak) <= 0.1 * peak and est.peak - kept < 0.8 * peak


def _kept(hlo: str, shape: tuple[int, ...]) -> set[tuple[str, str]]:
    """``{(dtype, the jax op that made it)}`` of the forward's values of ``shape`` that the backward reads, in a
    compiled step's entry computation: made by an instruction whose op_name is in the forward (not the recompute,
    ``checkpoint``, nor the backward, ``transpose(``), read by one in the backward."""
    import re

    lines = hlo[hlo.index("\nENTRY"):].splitlines()
    dims = ",".join(map(str, shape))
    kept = set()
    for i, line in enumerate(lines):
        m = re.match(rf"\s+%(\S+) = (\w+)\[{dims}\]", line)
        op = re.search(r'op_name="([^"]+)"', line)
        if m and op and "transpose(" not in op.group(1) and "checkpoint" not in op.group(1):
            use = re.compile(rf"%{re.escape(m.group(1))}[,)\s]")
            if any(use.search(x) and "transpose(" in x for x in lines[i + 1:]):
                kept.add((m.group(2), op.group(1)))
    return kept


@needs_libtpu
def test_a_float32_projection_blocks_input_is_kept_in_bfloat16_under_remat_on_tpu():
    # XLA:TPU, a float32 conv net under remat: a block whose input only its convs read (a projection shortcut) keeps
    # that input in bfloat16, the dtype its convs multiply in; a block adding its input to its output keeps it in
    # float32 (the ResNet-18 f32 fsdp=2,model=4 and fsdp=8 remat dumps, benchmarks/tpu_aot_notes.md, twentieth
    # round). The images: relaid out in bfloat16 and kept for the stem conv's weight gradient at 32 images per
    # device, not at 128 (the argument is read in place). The zoo cnn (~20-30 s a compile, so one: 128 images per
    # device; the 32-image side is the grid's ResNet-18 rows): block_0 adds its input (the max-pool's output),
    # block_1 and block_2 project theirs. The estimate's side, exactly: test_peak.py's
    # test_remat_conv_net_keeps_its_stem_and_block_inputs_laid_out_as_whole_maps
    n = 128
    m = zoo.get("cnn", max_pool=True, remat=True)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), 8 * n), p, mesh, keep_hlo=True)
    acts = tpflax.trace_activations(m, 8 * n)
    blocks = [calls[0] for path, calls in acts.items() if path.startswith("block_") and "/" not in path]
    assert [a.inputs[0] == a.output for a in blocks] == [True, False, False]
    # each block's input as kept: made before block_0 (the max-pool), in block_0, in block_1
    made_in = ["jvp(ResNet)/reduce_window", "jvp(ResNet)/block_0/", "jvp(ResNet)/block_1/"]
    kept = [{d for d, op in _kept(dr.hlo_text, (n, *a.inputs[0][1:])) if where in op}
            for a, where in zip(blocks, made_in, strict=True)]
    assert kept == [{"f32"}, {"bf16"}, {"bf16"}], kept
    (stem,) = acts["conv_init"]
    images = {d for d, op in _kept(dr.hlo_text, (n, *stem.inputs[0][1:])) if "batch" in op}
    assert images == set()


class _TwoLookups(nn.Module):
    """One table looked up by two id arrays (an encoder's and a decoder's) and tied to the logits."""

    vocab: int

    @nn.compact
    def __call__(self, src, tgt):
        emb = nn.Embed(self.vocab, 256, name="shared")
        h = emb(src) + nn.Dense(256, name="mix")(emb(tgt))
        return emb.attend(nn.Dense(256, name="body")(h))


@needs_libtpu
@pytest.mark.parametrize("vocab", [2048, 2056])
def test_two_lookups_of_a_tied_table_are_resharded_by_all_to_alls_on_tpu(vocab):
    # XLA:TPU folds the two lookups' scatter-adds into one scatter onto the logits' weight gradient, its ids
    # and updates concatenated along the batch and resharded over the batch axis by two rounds of
    # all-to-alls: 2 (n-1)/n * local rows * (width * 4 + 4) bytes; only while the lookups' 2048 rows are
    # fewer than the table's (2056 rows; at 2048 the scatters stay apart). XLA:CPU compiles no all-to-all.
    from jax.sharding import PartitionSpec as P

    net, ids = _TwoLookups(vocab), (jax.ShapeDtypeStruct((8, 128), jnp.int32),) * 2
    v = jax.eval_shape(net.init, jax.random.key(0), *ids)
    p = tpflax.plan(v, {"fsdp": 2, "model": 4}, rules=[("shared", P(None, "fsdp")), ("mix", "replicate"),
                                                       ("body", "replicate")], model=net, sample=ids)
    mesh = tpflax.make_mesh(p.mesh.sizes, target="tpu-v5e:2x4")
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    ts = tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=ids, loss=loss)
    compiled = tpflax.dry_run(ts, p, mesh).comm().get("all-to-all", {})
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=ids, loss=loss, backend="tpu").comm
    rows = 2 * 8 * 128 // 2  # both lookups' rows on one device
    assert compiled == est.get("all-to-all", {}) == ({"fsdp": 2 * 1 / 2 * rows * (256 * 4 + 4)} if vocab > 2048 else {})
    cpu = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=ids, loss=loss, backend="cpu").comm
    assert "all-to-all" not in cpu


@needs_libtpu
def test_a_scanned_remat_stacks_backward_loop_carries_its_gradients_and_the_temp_counts_them_again(tmp_path):
    # XLA:TPU compiles a scanned stack's backward pass as a while loop that carries every layer's gradient
    # stack from its first iteration and the saved inputs stack, and its compiled temp is 2 heap - L', L' the
    # largest live set without the loops' carried values and the async collectives' (benchmarks/tpu_aot_notes.md,
    # twentieth round). Llama-2-7B's width, 2 scanned bf16 layers of 1024 tokens (~45 s), read off its buffer dump:
    # at the HBM peak (the last layer's backward) the loop carries exactly the estimate's scan_grads and scan_stack,
    # its loop_carried counts them again, and the temp follows the law (to 1 MiB: small values XLA pads apart)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tpu_live

    m = zoo.get("llama-2-7b-scan", "real", n_layers=2, seq_len=1024, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    # this one compile dumps its buffers (compiler options, not XLA_FLAGS: no subprocess)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-4), 8), p, mesh,
                        compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True})
    b = tpflax.estimate(p, optax.adamw(1e-4), 8, model=m, target="tpu-v5e:2x4", remat=True).breakdown
    r = {"temp": dr.memory["temp"], "grads": b.scan_grads, "stack": b.scan_stack, "phase": b.phase()}
    vals, heap = tpu_live.read(str(tmp_path))
    loop = tpu_live.carried(str(tmp_path), vals)
    peak = max(tpu_live.starts(vals), key=lambda t: tpu_live.in_use(vals, t))  # the first peak step of all
    held = [v for v in vals if v[0] in loop and v[4] <= peak <= v[5] and v[3].startswith("bf16[")]  # not the counter
    stack = [v for v in held if len(v[3].split(",")) == 4 and v[3].endswith(",1024,4096]")]  # bf16[2,1,1024,4096]
    assert sum(v[2] for v in stack) == r["stack"] == 2 * 1024 * 4096 * 2
    assert sum(v[2] for v in held) - r["stack"] == r["grads"]  # the seven kernels' and two norms' gradient stacks
    name, terms = r["phase"]
    assert name == "backward start: last layer" and terms["scan_grads"] == r["grads"]
    assert terms["loop_carried"] == r["grads"] + r["stack"]
    flat_vals = [v for v in vals if v[0] not in loop and not v[0].startswith("async-collective")]
    flat = max(tpu_live.in_use(flat_vals, t) for t in tpu_live.starts(flat_vals))
    assert abs(r["temp"] - (2 * heap - flat)) < 2**20
    sync_vals = [v for v in vals if not v[0].startswith("async-collective")]
    without = max(tpu_live.in_use(sync_vals, t) for t in tpu_live.starts(sync_vals))
    # the law read without the loop's values (ninth round) falls short by what the loop carries
    assert abs(r["temp"] - (2 * heap - without) - (r["grads"] + r["stack"])) < 2**20



@needs_libtpu
def test_a_scanned_remat_steps_loss_value_is_read_after_the_backward_loop_when_the_vocabulary_is_whole(tmp_path):
    # XLA:TPU schedules the loss's value (the labels' logits gathered by take_along_axis, which no gradient reads)
    # after a scanned stack's backward while loop, so the float32 logits live through it: Peak.scan_logits
    # (benchmarks/tpu_aot_notes.md, twenty-first round). The zoo's tiny scanned remat Llama with 1024 tokens and a
    # 16384 vocabulary, fsdp=8, read off its compile's schedule and live ranges: 64 MiB logits a device, in HBM (at
    # 32 MiB and less v5e keeps them on chip; its own 32 x 256 logits are even gathered before the loop). With the
    # vocabulary split (model=4) the gather runs at the loss (measured too, not compiled here): no such term
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tpu_live

    m = zoo.get("llama", "tiny", scan_layers=True, remat=True, vocab=16384, seq_len=1024)
    p = tpflax.plan(m.abstract_variables(), {"fsdp": 8})
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-4), 8), p, mesh,
                   compiler_options={"xla_dump_to": str(tmp_path), "xla_dump_hlo_as_text": True})
    (hlo,) = tmp_path.glob("*jit_step*after_optimizations.txt")
    entry = hlo.read_text().split("\nENTRY ", 1)[1].split("\n}\n", 1)[0].splitlines()
    backward = [line.split(" = ")[0].strip()[1:] for line in entry if " while(" in line][-1]
    (gather,) = [line for line in entry if "take_along_axis))/gather" in line and "kind=kCustom" in line]
    _, lr = tpu_live.step_files(str(tmp_path))
    order = {}
    for line in open(lr):
        if "BufferLiveRange" in line:
            break
        if ":" in line and line.strip().split(":")[0].isdigit():
            n, name = line.strip().split(":", 1)
            order[name] = int(n)
    assert order[backward] < order[gather.split(" = ")[0].strip()[1:]]  # the loss's value after the backward loop
    vals, _ = tpu_live.read(str(tmp_path))
    held = [v for v in vals if v[3] == "f32[1024,16384]" and v[4] < order[backward] < v[5]]  # the logits
    b = tpflax.estimate(p, optax.adamw(1e-4), 8, model=m, target="tpu-v5e:2x4", remat=True).breakdown
    assert [v[2] for v in held] == [b.scan_logits] == [b.logits] == [1024 * 16384 * 4]
    split = tpflax.plan(m.abstract_variables(), {"fsdp": 2, "model": 4})
    assert tpflax.estimate(split, optax.adamw(1e-4), 8, model=m, target="tpu-v5e:2x4",
                           remat=True).breakdown.scan_logits == 0


class _ParallelBlocks(nn.Module):
    """GPT-J's parallel block in mixed precision: attention-like and MLP pairs reading one bfloat16 norm, their
    outputs added to the float32 stream apart; a float32 table looked up as it is."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(1000, 64, name="wte")(ids)
        dense = lambda n, name: nn.Dense(n, use_bias=False, dtype=jnp.bfloat16, name=name)  # noqa: E731
        for i in range(2):
            h = nn.LayerNorm(dtype=jnp.bfloat16, name=f"ln{i}")(x)
            a = dense(64, f"a_out{i}")(nn.relu(dense(256, f"a_in{i}")(h)))
            m = dense(64, f"m_out{i}")(nn.gelu(dense(256, f"m_in{i}")(h)))
            x = x + a.astype(jnp.float32) + m.astype(jnp.float32)
        return dense(1000, "head")(x)


@needs_libtpu
def test_a_parallel_blocks_two_pairs_sum_their_shared_inputs_gradient_once_on_tpu():
    # XLA:TPU adds the partial input gradients of every column reading one value before it all-reduces them, across
    # pairs too: GPT-J's attention and MLP columns read one norm, one bf16[4,32,64] all-reduce per layer (priced
    # once per pair before: transformers' GPT-J at 1.249 of the compiled tensor-axis bytes in float32, 1.112 in
    # mixed precision; 1.000 and 1.002 now). A vocab-split float32 table looked up as it is sums float32 rows
    # (priced at the bfloat16 the model computes in before)
    net, x = _ParallelBlocks(), jnp.ones((8, 32), jnp.int32)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(params, {"data": 2, "model": 4}, model=net.apply, sample=x, rules=[(r"wte", "vocab")])
    assert [tuple(p.specs["params"][k]["kernel"]) for k in ("a_in0", "m_in0")] == [(None, "model")] * 2
    loss = lambda out, batch: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    mesh = tpflax.make_mesh({"data": 2, "model": 4}, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net.apply, p, mesh, optax.adamw(1e-3), sample=x, loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net.apply, sample=x, batch=x, loss=loss, backend="tpu",
                          target="tpu-v5e:2x4")
    sums = sorted((c.dtypes, c.shapes) for c in dr.collectives if c.axes == ("model",))
    act, f32 = (4, 32, 64), ("f32",)
    # the table's rows; the head's input gradient and the two layers' column input gradients; the rows' outputs
    assert sums == sorted([(f32, (act,))] + [(("bf16",), (act,))] * 3 + [(("bf16", "bf16"), (act, act))] * 2)
    inputs = [i for i in est.items if "input gradients" in i.why and "pair" in i.source]
    assert [(i.ring_bytes, i.count) for i in inputs] == [(24576, 2)] and "m_in" in inputs[0].why
    assert [i.ring_bytes for i in est.items if "wte" in i.source and i.axes == ("model",)] == [49152]
    # all of it, but the split softmax's reductions the estimate prices for any output head (this loss has none)
    softmax = sum(i.ring_bytes * i.count for i in est.items if "softmax" in i.why)
    assert est.comm["all-reduce"]["model"] - softmax == dr.comm()["all-reduce"]["model"]


class _MLPs(nn.Module):
    """Residual ReLU MLPs ``64 -> width -> 64`` of the given widths, float32, no biases."""

    widths: tuple[int, ...]

    @nn.compact
    def __call__(self, x):
        for f in self.widths:
            x = x + nn.Dense(64, use_bias=False, name=f"down{f}")(nn.relu(nn.Dense(f, use_bias=False, name=f"up{f}")(x)))
        return x


@needs_libtpu
def test_fsdp_shards_padded_by_a_third_or_more_are_all_reduced_whole_on_tpu():
    # fsdp=8 splits each kernel's width: shards of 10, 11, 21 and 22 rows on the sublanes beside 64 columns
    # (128 lanes), none whole float32 tiles of 8. XLA:TPU pads a reduce-scattered shard to 16 rows at a time
    # there, and does so for 11 (to 16) and 22 (to 32); 10 and 21 would be a third or more padding, and their
    # gradients are all-reduced whole (mT5's 21-row MLP shards: the estimate was 0.894 of the compiled bytes on
    # fsdp=8). The estimate had reduce-scattered all four
    net, x = _MLPs((80, 88, 168, 176)), jax.ShapeDtypeStruct((64, 32, 64), jnp.float32)
    params = jax.eval_shape(net.init, jax.random.key(0), x)
    p = tpflax.plan(params, {"fsdp": 8}, fsdp_min_bytes=0)
    assert {k: tuple(d.spec) for k, d in p.decisions.items()} == {
        **{f"params/up{f}/kernel": (None, "fsdp") for f in net.widths},
        **{f"params/down{f}/kernel": ("fsdp", None) for f in net.widths}}
    loss = lambda out, batch: jnp.mean(out ** 2)  # noqa: E731
    mesh = tpflax.make_mesh({"fsdp": 8}, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net.apply, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net.apply, sample=(x,), batch=(x,), loss=loss, backend="tpu",
                          target="tpu-v5e:2x4")
    whole = {s for c in dr.collectives if c.kind == "all-reduce" for s in c.shapes if len(s) == 2}
    assert whole == {(64, 80), (80, 64), (64, 168), (168, 64)}
    kinds = {}
    for i in est.items:
        kinds.setdefault(i.source, set()).add(i.kind)
    assert kinds == {**{f"params/{m}{f}/kernel": {"all-gather", "all-reduce"} for f in (80, 168) for m in ("up", "down")},
                     **{f"params/{m}{f}/kernel": {"all-gather", "reduce-scatter", "collective-permute"}
                        for f in (88, 176) for m in ("up", "down")}}
    # the one whole all-reduce also sums the loss, a float32 scalar (2 x 7/8 x 4 bytes on the 8-device ring)
    comm = dr.comm()
    assert comm["all-reduce"]["fsdp"] - est.comm["all-reduce"]["fsdp"] == 2 * 7 / 8 * 4
    # the reduce-scattered shards move padded: 16 and 32 rows of 64 float32 columns, each kernel's (the estimate
    # priced them unpadded, 118272 bytes, before round 41), and collective-permutes move each device's rows into
    # place: 7 devices x (16 - 11) and 7 x (32 - 22) rows
    assert comm["reduce-scatter"]["fsdp"] == est.comm["reduce-scatter"]["fsdp"] == 2 * 7 * (16 + 32) * 64 * 4
    assert comm["collective-permute"]["fsdp"] == est.comm["collective-permute"]["fsdp"] == 2 * 7 * (5 + 10) * 64 * 4


@needs_libtpu
def test_a_whole_kernel_between_two_constraints_gathers_its_float32_operands_as_bfloat16_on_tpu(devices):
    # tests/test_constraint_stream.py's MLP between two constraints, float32, replicated, on v5e:2x4: XLA:TPU
    # gathers the same activations as XLA:CPU (wo's hidden forward, wi's hidden gradient backward), each a matmul
    # operand at default precision, so in bfloat16. Before: priced in float32 and, forward, summed (1.021 of the
    # compiled collectives unrolled, 1.747 scanned)
    from test_constraint_stream import activation_moves, measured_both_sides

    e, dr = measured_both_sides(scan=False, dtype=jnp.float32, target="tpu-v5e:2x4")
    compiled, dtypes, estimated = activation_moves(e, dr)
    assert dtypes == {("bf16",)}
    hidden = ("all-gather", 4 * 64 * 256 * 2)  # one device's bf16[4,64,256]: wo's input, wi's output gradient
    assert compiled[hidden] == estimated[hidden] == 4 * 4 * 64 * 256 * 2 * 3 / 4, (compiled, estimated)
    # the target; measured 1.008 (0.957 before the weight gradients' second gathers of the stream were priced:
    # XLA:TPU runs 7 of the 9 XLA:CPU does)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.10


@needs_libtpu
@pytest.mark.parametrize("fused", [False, True], ids=["separate", "fused"])
def test_whole_kernels_around_easydel_style_constraints_are_estimated_for_tpu(fused):
    # tests/test_constraint_block.py's block compiled by the TPU compiler for v5e:2x4: the shared input gathers,
    # the output projection split by the stream and the fused kernel's reshard hold there too. Measured 1.013
    # (separate) and 1.032 (fused), 1.040 and 0.922 before they were priced; XLA:TPU moves the fused pieces with
    # half the permutes' bytes XLA:CPU does, and gathers its activations in bfloat16
    from test_constraint_block import measured

    e, dr = measured(fused=fused, target="tpu-v5e:2x4")
    assert any(c.kind == "collective-permute" for c in dr.collectives) == fused
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05
