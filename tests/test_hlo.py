"""HLO collective parsing: hand-made snippets for every spelling, and real compiled programs."""

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from tpflax.hlo import (
    Collective,
    group_axes,
    parse_collectives,
    parse_replica_groups,
    ring_bytes,
    summarize,
)

MESH = {"data": 2, "model": 4}


def module(*lines, header="HloModule m, num_partitions=8"):
    return "\n".join([header, "", "ENTRY %main (p: f32[8]) -> f32[8] {", *[f"  {x}" for x in lines], "}"])


def test_tuple_all_reduce_explicit_groups():
    hlo = module("%ar = (f32[16,32]{1,0}, bf16[32,16]{1,0}) all-reduce(%a, %b), channel_id=2, "
                 "replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, to_apply=%add, "
                 'metadata={op_name="jit(f)/dot"}')
    (c,) = parse_collectives(hlo, MESH)
    assert c.kind == "all-reduce" and c.shapes == ((16, 32), (32, 16)) and c.dtypes == ("f32", "bf16")
    assert c.bytes == 16 * 32 * 4 + 32 * 16 * 2
    assert c.group_size == 2 and c.axes == ("data",)
    assert c.ring_bytes == pytest.approx(2 * (1 / 2) * c.bytes)
    assert c.op_name == "jit(f)/dot"


def test_iota_groups_with_transpose_map_to_axes():
    assert parse_replica_groups("[2,4]<=[8]") == ((0, 1, 2, 3), (4, 5, 6, 7))
    groups = parse_replica_groups("[4,2]<=[2,4]T(1,0)")
    assert groups == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert group_axes(groups, MESH) == ("data",)
    assert group_axes(parse_replica_groups("[1,8]<=[8]"), MESH) == ("data", "model")


def test_mesh_axes_groups_and_sub_axes():
    assert parse_replica_groups("mesh['axis_0'=2,'axis_1'=4] {'axis_0'}") == ((0, 4), (1, 5), (2, 6), (3, 7))
    assert parse_replica_groups("mesh['axis_0'=2,'axis_1'=4] {'axis_1'}") == ((0, 1, 2, 3), (4, 5, 6, 7))
    # sub-axis 'a':(pre)size: pre is the product of the sub-axes major to it, so
    # 'axis_1':(1)2 is the major half of axis_1 and 'axis_1':(2)2 the minor half
    assert parse_replica_groups("mesh['axis_0'=2,'axis_1'=4] {'axis_1':(1)2}") == (
        (0, 2), (1, 3), (4, 6), (5, 7))
    assert parse_replica_groups("mesh['axis_0'=2,'axis_1'=4] {'axis_1':(2)2}") == (
        (0, 1), (2, 3), (4, 5), (6, 7))
    hlo = module("%ag = f32[32,16]{1,0} all-gather(%p), channel_id=1, "
                 "replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}, "
                 "use_global_device_ids=true")
    (c,) = parse_collectives(hlo, MESH)
    assert (c.kind, c.group_size, c.axes, c.dimensions) == ("all-gather", 2, ("data",), (0,))
    assert c.ring_bytes == pytest.approx(0.5 * 32 * 16 * 4)


def test_mesh_groups_over_devices_in_iota_form():
    # XLA:CPU lists a reordered mesh's devices as an iota, ``device_ids=([2,4]T(1,0))``: devices 0 4 1 5 2 6 3 7,
    # so the mesh's axis_0 (4) is the model axis; read as 0..7 it spanned data+model
    text = "mesh['axis_0'=4,'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}"
    assert parse_replica_groups(text) == ((0, 1, 2, 3), (4, 5, 6, 7))
    assert group_axes(parse_replica_groups(text), MESH) == ("model",)
    assert parse_replica_groups("mesh['axis_0'=4,'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}") == (
        (0, 4), (1, 5), (2, 6), (3, 7))
    hlo = module("%ar = f32[4,32,64]{2,1,0} all-reduce(%p), channel_id=4, replica_groups=mesh['axis_0'=4,"
                 "'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, use_global_device_ids=true, "
                 "to_apply=%add")
    (c,) = parse_collectives(hlo, MESH)
    assert (c.group_size, c.axes) == (4, ("model",))


@given(st.lists(st.integers(1, 3), min_size=1, max_size=3), st.data())
def test_iota_matches_numpy_reference(dims, data):
    perm = data.draw(st.permutations(range(len(dims))))
    n = int(np.prod(dims))
    group = data.draw(st.sampled_from([d for d in range(1, n + 1) if n % d == 0]))
    text = f"[{n // group},{group}]<=[{','.join(map(str, dims))}]T({','.join(map(str, perm))})"
    want = np.arange(n).reshape(dims).transpose(perm).reshape(n // group, group)
    assert parse_replica_groups(text) == tuple(tuple(int(x) for x in r) for r in want)


def test_async_pairs_count_once_with_done_shape():
    hlo = module(
        "%ars = f32[64]{0} all-reduce-start(%p), replica_groups=[2,4]<=[8], to_apply=%add",
        "%ard = f32[64]{0} all-reduce-done(%ars)",
        "%ags = (f32[8,4]{1,0}, f32[32,4]{1,0}) all-gather-start(%q), replica_groups={{0,1,2,3},{4,5,6,7}}, "
        "dimensions={0}",
        "%agd = f32[32,4]{1,0} all-gather-done(%ags)",
        "%cps = (f32[16]{0}, f32[16]{0}, u32[], u32[]) collective-permute-start(%r), "
        "source_target_pairs={{0,1},{1,0}}",
        "%cpd = f32[16]{0} collective-permute-done(%cps)")
    cs = parse_collectives(hlo, MESH)
    assert [c.kind for c in cs] == ["all-reduce", "all-gather", "collective-permute"]
    assert all(c.is_async for c in cs)
    assert cs[0].bytes == 256 and cs[0].axes == ("model",)
    assert cs[1].shapes == ((32, 4),) and cs[1].ring_bytes == pytest.approx(0.75 * 32 * 4 * 4)
    assert cs[2].ring_bytes == 64 and cs[2].axes == ("model",)


def test_reduce_scatter_all_to_all_and_empty_groups():
    hlo = module(
        "%rs = f32[4,32]{1,0} reduce-scatter(%p), replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}, "
        "to_apply=%add",
        "%a2a = (f32[4,32]{1,0}, f32[4,32]{1,0}) all-to-all(%a, %b), replica_groups={{0,1},{2,3},{4,5},{6,7}}",
        "%ar = f32[10]{0} all-reduce(%p), replica_groups={}, to_apply=%add")
    rs, a2a, ar = parse_collectives(hlo, MESH)
    assert rs.bytes == 512 and rs.ring_bytes == pytest.approx(3 / 4 * 512 * 4)
    assert a2a.group_size == 2 and a2a.ring_bytes == pytest.approx(0.5 * 1024)
    assert ar.group_size == 8 and ar.axes == ("data", "model")


def test_while_trip_count_and_async_wrapper():
    hlo = "\n".join([
        "HloModule m, num_partitions=8",
        "%body (x: f32[8]) -> f32[8] {",
        "  %ar = f32[8]{0} all-reduce(%x), replica_groups=[4,2]<=[8], to_apply=%add",
        "}",
        "%wrapped (y: f32[8]) -> f32[2] {",
        "  %rs = f32[2]{0} reduce-scatter(%y), replica_groups=[2,4]<=[8], dimensions={0}, to_apply=%add",
        "}",
        "ENTRY %main (p: f32[8]) -> f32[8] {",
        '  %w = f32[8]{0} while(%p), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}',
        "  %s = ((f32[8]), f32[2]) async-start(%p), calls=%wrapped",
        "  %d = f32[2]{0} async-done(%s), calls=%wrapped",
        "}"])
    ar, rs = parse_collectives(hlo, MESH)
    assert ar.count == 5 and ar.total_ring_bytes == pytest.approx(5 * ar.ring_bytes)
    assert rs.count == 1 and rs.is_async
    assert summarize([ar, rs]) == {"all-reduce": pytest.approx(5 * ar.ring_bytes),
                                   "reduce-scatter": pytest.approx(rs.ring_bytes)}


def test_tpu_async_collective_fusion_counts_once():
    # An excerpt of a real TPU HLO (libtpu 0.0.42.1, v5e:2x4, fsdp=8, a 2-layer width-512 bf16
    # Llama train step): one fsdp all-gather of an MLP kernel split into an async-collective-start
    # fusion, four continuation fusions and a done fusion (six all-gather copies on channel 9), a
    # plain async all-gather of the embedding, and the gradients' one tuple all-reduce (the TPU
    # all-reduces the whole fsdp gradient and slices it inside the optimizer's fusions).
    text = (Path(__file__).parent / "data" / "tpu_v5e_fsdp8_llama.hlo").read_text()
    cs = parse_collectives(text, {"fsdp": 8})
    assert [(c.kind, c.channel_id, c.pieces) for c in cs] == [
        ("all-gather", 9, 6), ("all-gather", 1, 1), ("all-reduce", 23, 1)]
    ag, emb, grads = cs
    assert ag.shapes == ((512, 1408),) and ag.is_async and ag.group_size == 8 and ag.axes == ("fsdp",)
    assert ag.ring_bytes == 7 / 8 * 512 * 1408 * 2  # one gather of the whole kernel, not six
    assert emb.shapes == ((4096, 512),) and emb.ring_bytes == 7 / 8 * 4096 * 512 * 2
    assert len(grads.shapes) == 16 and grads.axes == ("fsdp",)
    assert grads.bytes == 2 * (4096 * 512 * 2 + 8 * 512 * 512 + 6 * 512 * 1408)  # every trainable matrix
    assert grads.ring_bytes == 2 * 7 / 8 * grads.bytes


def test_tpu_all_reduce_scatter_fusion_is_a_reduce_scatter():
    # The same step with its gradients constrained to their fsdp shards: the TPU compiler emits
    # ``all-reduce-scatter.N`` fusions (an all-reduce, then each device's dynamic-slice). Two of
    # them share channel 1 with each other and with an all-gather, yet are three collectives.
    text = (Path(__file__).parent / "data" / "tpu_v5e_fsdp8_llama_reduce_scatter.hlo").read_text()
    cs = parse_collectives(text, {"fsdp": 8})
    assert sorted((c.kind, c.channel_id, len(c.shapes)) for c in cs) == [
        ("all-gather", 1, 1), ("reduce-scatter", 1, 6), ("reduce-scatter", 1, 7), ("reduce-scatter", 42, 1)]
    head = next(c for c in cs if c.channel_id == 42)
    assert head.shapes == ((512, 512),) and head.bytes == 512 * 512 * 2  # this device's slice
    assert head.ring_bytes == 7 / 8 * 512 * 4096 * 2  # a reduce-scatter of the whole bf16[512, 4096]
    assert all(c.ring_bytes == 7 / 8 * 8 * c.bytes for c in cs if c.kind == "reduce-scatter")


def test_tpu_all_reduce_scatter_fusion_with_a_shard_id_table_is_a_reduce_scatter():
    # On a mesh with a tensor axis (fsdp=2,model=4, v5e:2x4, libtpu 0.0.42.1: the fsdp groups are
    # {0,4},{1,5},...) the fusion looks this device's shard index up in a u32[8] table with a
    # dynamic-slice of a constant. Only the slices of the reduced buffer are the scatter's shards:
    # counting the table's u32[1] too read it as an all-reduce (twice the bytes).
    text = "\n".join([
        "HloModule m, num_partitions=8", "",
        "%all-reduce-scatter.2 (input_0: f32[256,256], input_1: f32[256,256]) -> (f32[256,128], f32[128,256]) {",
        "  %input_0 = f32[256,256]{1,0:T(8,128)} parameter(0)",
        "  %input_1 = f32[256,256]{1,0:T(8,128)} parameter(1)",
        "  %all-reduce.6 = (f32[256,256]{1,0:T(8,128)}, f32[256,256]{1,0:T(8,128)}) all-reduce(%input_0, "
        "%input_1), channel_id=1, replica_groups={{0,4},{1,5},{2,6},{3,7}}, use_global_device_ids=true, "
        "to_apply=%add",
        "  %get-tuple-element = f32[256,256]{1,0:T(8,128)} get-tuple-element(%all-reduce.6), index=0",
        "  %constant.141 = u32[] constant(0)",
        "  %constant.shard_id_table.2 = u32[8]{0:T(128)} constant({0, 0, 0, 0, 1, 1, 1, 1})",
        "  %partition-id.3 = u32[] partition-id()",
        "  %dynamic-slice.28 = u32[1]{0:T(128)} dynamic-slice(%constant.shard_id_table.2, %partition-id.3), "
        "dynamic_slice_sizes={1}",
        "  %bitcast.3 = u32[]{:T(128)} bitcast(%dynamic-slice.28)",
        "  %constant.142 = u32[] constant(128)",
        "  %multiply.15 = u32[]{:T(128)} multiply(%bitcast.3, %constant.142)",
        "  %dynamic-slice.29 = f32[256,128]{1,0:T(8,128)} dynamic-slice(%get-tuple-element, %constant.141, "
        "%multiply.15), dynamic_slice_sizes={256,128}",
        "  %get-tuple-element.1 = f32[256,256]{1,0:T(8,128)} get-tuple-element(%all-reduce.6), index=1",
        "  %dynamic-slice.30 = f32[128,256]{1,0:T(8,128)} dynamic-slice(%get-tuple-element.1, %multiply.15, "
        "%constant.141), dynamic_slice_sizes={128,256}",
        "  ROOT %tuple.3 = (f32[256,128]{1,0:T(8,128)}, f32[128,256]{1,0:T(8,128)}) tuple(%dynamic-slice.29, "
        "%dynamic-slice.30)",
        "}", "",
        "ENTRY %main (a: f32[256,256], b: f32[256,256]) -> (f32[256,128], f32[128,256]) {",
        "  %a = f32[256,256]{1,0} parameter(0)",
        "  %b = f32[256,256]{1,0} parameter(1)",
        "  ROOT %fusion.68 = (f32[256,128]{1,0}, f32[128,256]{1,0}) fusion(%a, %b), kind=kCustom, "
        "calls=%all-reduce-scatter.2",
        "}"])
    (c,) = parse_collectives(text, {"fsdp": 2, "model": 4})
    assert c.kind == "reduce-scatter" and c.axes == ("fsdp",) and c.group_size == 2
    assert c.shapes == ((256, 128), (128, 256)) and c.bytes == 2 * 128 * 256 * 4  # this device's slices
    assert c.ring_bytes == 1 / 2 * 2 * 256 * 256 * 4  # a reduce-scatter of both whole f32[256, 256]


def test_chain_pieces_merge_and_fusions_that_read_each_other_not_do_not():
    # The shape of XLA:TPU's programs, written out of order: an async all-gather on channel 3 in
    # three fusions, each reading the one before through get-tuple-element (start, continuation,
    # done: one gather), and two reduce-scatter-like fusions on channel 1 with the same shapes
    # that each read their own gradient (two collectives, as GPT-2's two layers' were).
    ag = "bf16[64,8]{1,0} all-gather(%a), channel_id=3, replica_groups=[1,8]<=[8], dimensions={0}"
    ar = "bf16[64,8]{1,0} all-reduce(%g), channel_id=1, replica_groups=[1,8]<=[8], to_apply=%add"
    text = "\n".join([
        "HloModule m, num_partitions=8",
        "%done (a: bf16[8,8], b: bf16[64,8]) -> bf16[64,8] {", "  %a = bf16[8,8]{1,0} parameter(0)",
        f"  ROOT %x = {ag}", "}",
        "%start (a: bf16[8,8]) -> (bf16[8,8], bf16[64,8]) {", "  %a = bf16[8,8]{1,0} parameter(0)",
        f"  %x = {ag}", "  ROOT %t = (bf16[8,8]{1,0}, bf16[64,8]{1,0}) tuple(%a, %x)", "}",
        "%step (a: bf16[8,8], b: bf16[64,8]) -> (bf16[8,8], bf16[64,8]) {", "  %a = bf16[8,8]{1,0} parameter(0)",
        f"  %x = {ag}", "  ROOT %t = (bf16[8,8]{1,0}, bf16[64,8]{1,0}) tuple(%a, %x)", "}",
        *[line for i in (1, 2) for line in (
            f"%rs.{i} (g: bf16[64,8]) -> bf16[64,8] {{", "  %g = bf16[64,8]{1,0} parameter(0)",
            f"  ROOT %y = {ar}", "}")],
        "ENTRY %main (p: bf16[8,8], g: bf16[64,8], h: bf16[64,8]) -> bf16[64,8] {",
        "  %p = bf16[8,8]{1,0} parameter(0)", "  %g = bf16[64,8]{1,0} parameter(1)",
        "  %h = bf16[64,8]{1,0} parameter(2)",
        "  %s = (bf16[8,8]{1,0}, bf16[64,8]{1,0}) fusion(%p), kind=kCustom, calls=%start",
        "  %s0 = bf16[8,8]{1,0} get-tuple-element(%s), index=0",
        "  %s1 = bf16[64,8]{1,0} get-tuple-element(%s), index=1",
        "  %c = (bf16[8,8]{1,0}, bf16[64,8]{1,0}) fusion(bf16[8,8]{1,0} %s0, /*index=1*/%s1), kind=kOutput, calls=%step",
        "  %c0 = bf16[8,8]{1,0} get-tuple-element(%c), index=0",
        "  %c1 = bf16[64,8]{1,0} bitcast(%c)",
        "  %d = bf16[64,8]{1,0} fusion(%c0, %c1), kind=kCustom, calls=%done",
        "  %r1 = bf16[64,8]{1,0} fusion(%g), kind=kCustom, calls=%rs.1",
        "  %r2 = bf16[64,8]{1,0} fusion(%h), kind=kCustom, calls=%rs.2",
        "  ROOT %o = bf16[64,8]{1,0} add(%r1, %r2)", "}"])
    cs = parse_collectives(text, {"fsdp": 8})
    assert [(c.kind, c.channel_id, c.pieces, c.computation) for c in cs] == [
        ("all-gather", 3, 3, "done"), ("all-reduce", 1, 1, "rs.1"), ("all-reduce", 1, 1, "rs.2")]
    assert cs[0].is_async and summarize(cs)["all-gather"] == 7 / 8 * 64 * 8 * 2


def test_ring_bytes_convention_and_bad_args():
    assert ring_bytes("all-reduce", 800, 8) == pytest.approx(1400)
    assert ring_bytes("reduce-scatter", 800, 8) == pytest.approx(700)
    assert ring_bytes("all-gather", 800, 1) == 0
    with pytest.raises(ValueError, match="unknown collective"):
        ring_bytes("broadcast", 1, 2)
    c = Collective("all-gather", "x", ((4,),), ("f32",), 16, ((0, 1),), 2, 8.0, axes=("model",))
    assert summarize([c], by="axis") == {("all-gather", "model"): 8.0}
    with pytest.raises(ValueError):
        summarize([c], by="nope")


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((2, 4), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def test_real_shard_map_program(mesh):
    def f(x):
        a = jax.lax.psum_scatter(x, "model", scatter_dimension=0, tiled=True)
        b = jax.lax.all_gather(a, "data", axis=0, tiled=True)
        c = jax.lax.all_to_all(x, "model", 0, 1, tiled=True)
        d = jax.lax.ppermute(x, "model", [(i, (i + 1) % 4) for i in range(4)])
        e = jax.lax.psum(x, ("data", "model"))
        return a.sum() + b.sum() + c.sum() + d.sum() + e.sum()

    g = jax.shard_map(f, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False)
    text = jax.jit(g).lower(jax.ShapeDtypeStruct((16, 32), jnp.float32)).compile().as_text()
    got = {c.kind: c for c in parse_collectives(text, mesh)}
    assert set(got) == {"all-reduce", "reduce-scatter", "all-gather", "all-to-all", "collective-permute"}
    full = 16 * 32 * 4
    assert got["reduce-scatter"].axes == ("model",) and got["reduce-scatter"].ring_bytes == pytest.approx(0.75 * full)
    assert got["all-gather"].axes == ("data",) and got["all-gather"].bytes == full // 2
    assert got["all-to-all"].axes == ("model",) and got["all-to-all"].ring_bytes == pytest.approx(0.75 * full)
    assert got["collective-permute"].ring_bytes == full
    assert got["all-reduce"].axes == ("data", "model") and got["all-reduce"].group_size == 8


def test_real_vocab_split_lookup_sums_over_its_tensor_axis(mesh):
    # a lookup in a table split over model, ids over data: each device sums its rows' share over model
    # (XLA:CPU spells the groups with devices in iota form)
    table = jax.ShapeDtypeStruct((1000, 64), jnp.float32, sharding=NamedSharding(mesh, P("model", None)))
    ids = jax.ShapeDtypeStruct((8, 32), jnp.int32, sharding=NamedSharding(mesh, P("data", None)))
    step = jax.jit(lambda t, i: jnp.tanh(t[i]), out_shardings=NamedSharding(mesh, P("data")))
    (c,) = parse_collectives(step.lower(table, ids).compile().as_text(), mesh)
    assert (c.kind, c.axes, c.bytes) == ("all-reduce", ("model",), 4 * 32 * 64 * 4)


def test_real_gspmd_program_in_a_scan(mesh):
    def loss(w, x):
        def body(h, wi):
            return jnp.tanh(h @ wi), None
        return jax.lax.scan(body, x, w)[0].sum()

    w = jax.ShapeDtypeStruct((3, 32, 32), jnp.float32, sharding=NamedSharding(mesh, P(None, None, "model")))
    x = jax.ShapeDtypeStruct((16, 32), jnp.float32, sharding=NamedSharding(mesh, P("data", None)))
    cs = parse_collectives(jax.jit(jax.grad(loss)).lower(w, x).compile().as_text(), mesh)
    assert cs and all(c.count == 3 for c in cs if c.computation != "main")
    assert {c.axis_label for c in cs} <= {"model", "data", "data+model"}


@pytest.mark.parametrize("typed", [True, False], ids=["typed-operands", "tpu-names-only"])
def test_ragged_all_to_all_is_an_all_to_all_of_the_smaller_of_its_operand_and_output(typed):
    # the rows it sends depend on the routing (at most its operand); its output buffer may be larger (a capacity)
    # or smaller. The TPU compiler prints operands by name only: their shape is looked up in the computation
    x = "f32[64,128]{1,0} %x" if typed else "%x"
    text = module("%x = f32[64,128]{1,0} parameter(0)",
                  "%out = f32[96,128]{1,0} broadcast(f32[] %z), dimensions={}",
                  f"%r = f32[96,128]{{1,0}} ragged-all-to-all({x}, %out, %o, %s, %o, %s), channel_id=1, "
                  "replica_groups={{0,1,2,3},{4,5,6,7}}")
    (c,) = parse_collectives(text, MESH)
    assert (c.kind, c.shapes, c.bytes, c.axes, c.group_size) == ("all-to-all", ((64, 128),), 32768, ("model",), 4)
    assert c.ring_bytes == 3 / 4 * 32768
    (small,) = parse_collectives(text.replace("f32[96,128]{1,0} ragged", "f32[32,128]{1,0} ragged"), MESH)
    assert small.shapes == ((32, 128),)
