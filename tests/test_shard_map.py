"""Models that call ``jax.shard_map`` in their forward pass (MaxText's attention op, context-parallel
attention, a row layer written by hand with ``psum``): the trace walks the body like a call, with
the in_specs' shards, and the collectives inside keep what each dim is."""

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, FAST_XLA
from jax.sharding import PartitionSpec as P

import tpflax

D, H, HD, F, V, S, B = 64, 4, 16, 128, 128, 16, 8


def _core(q, k, v):
    s = jnp.einsum("bqhd,bkhd->bhqk", q, k) / jnp.sqrt(q.shape[-1]).astype(q.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(s, -1), v)


def _context_parallel(mesh):
    """Sequence split over ``model``; keys and values gathered inside the body."""
    spec = P(tuple(a for a in mesh.axis_names if a != "model"), "model", None, None)

    def body(q, k, v):
        k = jax.lax.all_gather(k, "model", axis=1, tiled=True)
        v = jax.lax.all_gather(v, "model", axis=1, tiled=True)
        return _core(q, k, v)

    return lambda q, k, v, wo: jnp.einsum("bshd,hdm->bsm", jax.shard_map(
        body, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)(q, k, v), wo)


def _hand_row(mesh):
    """Heads split over ``model``; the out projection a row layer written with ``psum``."""
    batch = tuple(a for a in mesh.axis_names if a != "model")
    spec = P(batch, None, "model", None)

    def body(q, k, v, wo):
        return jax.lax.psum(jnp.einsum("bshd,hdm->bsm", _core(q, k, v), wo), "model")

    return jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 3 + (P("model", None, None),),
                         out_specs=P(batch, None, None))


class _LM(nn.Module):
    attn: object

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        h = nn.LayerNorm(name="ln")(x)
        q, k, v = (nn.DenseGeneral((H, HD), use_bias=False, name=n)(h) for n in "qkv")
        x = x + self.attn(q, k, v, self.param("o", nn.initializers.lecun_normal(), (H, HD, D)))
        return nn.Dense(V, use_bias=False, name="head")(x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(F, name="up")(x))))


def _model(attn):
    m = _LM(attn)
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    return (lambda p, x: m.apply(p, x)), (ids,), jax.eval_shape(lambda x: m.init(jax.random.key(0), x), ids)


MESHES = [{"data": 2, "model": 4}, {"fsdp": 2, "model": 4}]


@pytest.mark.parametrize("shape", MESHES, ids=["data", "fsdp"])
@pytest.mark.parametrize("attn", [_context_parallel, _hand_row], ids=["all_gather", "psum_row"])
def test_pairs_through_shard_map_collectives(shape, attn):
    # before: all_gather/pvary ended every chain (k, v or all of q/k/v/o replicated), and the row's
    # kernel, one head per device inside the body, capped its pair at no split
    fn, sample, params = _model(attn(tpflax.make_mesh(shape)))
    plan = tpflax.plan(params, shape, model=fn, sample=sample)
    specs = {p: tuple(d.spec)[:3] for p, d in plan.decisions.items()}
    for n in "qkv":
        assert specs[f"params/{n}/kernel"][1] == "model", plan.decisions[f"params/{n}/kernel"].reason
    assert specs["params/o"][0] == "model"
    assert plan.decisions["params/q/kernel"].pair == plan.decisions["params/o"].pair


def _compiled_and_estimated(body, shape=MESHES[0]):
    """The sgd step of ``_model(body(mesh))``, planned with ``model=`` on ``shape``: its dry run
    (compiled without LLVM's optimisations: the same HLO) and its estimate."""
    mesh = tpflax.make_mesh(shape)
    fn, sample, params = _model(body(mesh))
    plan = tpflax.plan(params, shape, model=fn, sample=sample)
    loss = lambda out, x: (out ** 2).mean()  # noqa: E731
    ts = tpflax.make_train_step(fn, plan, mesh, optax.sgd(0.1), sample=sample, loss=loss)
    return (tpflax.dry_run(ts, plan, mesh, compiler_options=FAST_XLA),
            tpflax.estimate(plan, optax.sgd(0.1), model=fn, sample=sample, loss=loss, backend="cpu"))


def test_explicit_collectives_priced_as_compiled():
    # the keys' and values' all_gathers (and their reduce-scatter transposes) were missing from the
    # estimate; XLA:CPU gives them all channel 1, and the dry run counted one of each
    dr, est = _compiled_and_estimated(_context_parallel)
    compiled = sorted((c.kind, c.ring_bytes * c.count) for c in dr.collectives if "shard_map" in (c.op_name or ""))
    priced = sorted((i.kind, i.total) for i in est.items if "shard_map" in i.why)
    # local keys (4, 4, 4, 16) f32 gathered over model=4 into S = 16384 B; (4 - 1) / 4 of S sent, both ways
    assert compiled == priced == [("all-gather", 12288.0)] * 2 + [("reduce-scatter", 12288.0)] * 2
    assert any("shard_map" in n for n in est.notes)


@pytest.mark.parametrize("shape", MESHES, ids=["data", "fsdp"])
def test_context_parallel_row_split_priced_as_compiled(shape):
    # before: the estimate priced the plan's tensor pairs over model (all-reduces of q/k/v/o, up/down,
    # the head) and none of what XLA compiled: the in_specs' sequence split over model propagates
    # through the residual stream, so every kernel split over model is gathered whole for its matmul
    # and every gradient is summed over model; the estimate was 45% under the compiled bytes
    dr, est = _compiled_and_estimated(_context_parallel, shape)
    assert not [i.why for i in est.items if i.why.startswith(("row ", "column "))]
    # the gathers (kernels and biases split over model, fsdp leaves, the body's keys and values) are
    # exact; a leaf kept whole over model has its gradient summed over model, then over data or fsdp
    # (two rings, not one of 8: 5% of the total); the rest is the loss's scalar all-reduces
    gathers = lambda comm: sum(comm.get("all-gather", {}).values())  # noqa: E731
    assert gathers(est.comm) == gathers(dr.comm())
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total
    assert any("rows over model" in n for n in est.notes)
    embed = sorted((i.kind, i.axes, i.total) for i in est.items if i.source == "params/embed/embedding")
    assert embed[-1] == ("all-reduce", ("model",), 1.5 * V * D * 4)  # the whole table's partial gradients


def _no_mesh_fn():
    """A model whose shard_map has no mesh= (a fresh body: jax has no cached trace of it)."""
    spec = P("data", None, "model", None)
    attn = jax.shard_map(lambda q, k, v: _core(q, k, v), in_specs=(spec,) * 3, out_specs=spec)
    m = _LM(lambda q, k, v, wo: jnp.einsum("bshd,hdm->bsm", attn(q, k, v), wo))
    return lambda p, x: m.apply(p, x)


def test_shard_map_without_mesh_uses_the_steps():
    shape = {"data": 2, "model": 4}
    fn = _no_mesh_fn()
    _, sample, params = _model(_hand_row(tpflax.make_mesh(shape)))  # the same tree
    # traced under the plan's mesh, as the step runs (it raised "shard_map without mesh=" before: no mesh set)
    alone = tpflax.plan(params, shape, model=fn, sample=sample)
    assert tuple(alone.decisions["params/o"].spec)[0] == "model"
    mesh = tpflax.make_mesh(shape)
    with jax.set_mesh(mesh):
        plan = tpflax.plan(params, shape, model=fn, sample=sample)
    assert tuple(plan.decisions["params/o"].spec)[0] == "model"
    loss = lambda out, x: (out ** 2).mean()  # noqa: E731
    # a fresh model: jax would serve the step the trace made under set_mesh above
    ts = tpflax.make_train_step(_no_mesh_fn(), plan, mesh, optax.sgd(0.1), sample=sample, loss=loss)
    # compiled outside any jax.set_mesh
    assert tpflax.dry_run(ts, plan, mesh, compiler_options=COMM_XLA).comm_total > 0


def test_shard_map_over_another_mesh():
    fn, sample, params = _model(_hand_row(tpflax.make_mesh({"data": 2, "model": 4})))
    shape = {"fsdp": 2, "model": 4}
    plan = tpflax.plan(params, shape, model=fn, sample=sample)  # a plan for another mesh is fine
    with pytest.raises(tpflax.PlanMismatchError, match="another mesh"):
        tpflax.make_train_step(fn, plan, tpflax.make_mesh(shape), optax.sgd(0.1), sample=sample,
                               loss=lambda out, x: (out ** 2).mean())


def test_hand_row_priced_as_compiled():
    # the row kernel's use inside the body read one device's rows (the batch split over data): its
    # pair's all-reduce was priced at half the buffer XLA sums
    dr, est = _compiled_and_estimated(_hand_row)
    row = [i.size for i in est.items if i.why.startswith("row params/o:")]
    assert row == [B * S * D * 4 / 2]  # the whole batch's outputs, f32, over data=2
    # the rest: the loss's scalar all-reduces, which the estimate prices at their ring size
    assert abs(est.comm_total - dr.comm_total) <= 0.01 * dr.comm_total


def test_shard_map_over_the_same_devices_without_the_size_one_axes():
    """EasyDeL builds its experts' shard_map over ``(dp, ep, tp)`` beside its ``(dp, fsdp, ep, tp, sp)`` mesh:
    the same devices, its axes of size 1 dropped (or its fsdp devices named ``ep``). jax refuses such a shard_map
    under another context mesh, so the step raised "another mesh"; it now runs without one. Devices in another
    order still raise, as axes the step's mesh lacks do (test_shard_map_over_another_mesh)."""
    import numpy as np
    from jax.sharding import Mesh

    shape = {"data": 2, "fsdp": 1, "model": 4}
    mesh = tpflax.make_mesh(shape)
    fn, sample, params = _model(_hand_row(tpflax.make_mesh({"data": 2, "model": 4})))
    plan = tpflax.plan(params, shape, model=fn, sample=sample)
    loss = lambda out, x: (out ** 2).mean()  # noqa: E731
    ts = tpflax.make_train_step(fn, plan, mesh, optax.sgd(0.1), sample=sample, loss=loss)
    assert tpflax.dry_run(ts, plan, mesh, compiler_options=COMM_XLA).comm_total > 0
    ids = jax.random.randint(jax.random.key(1), (B, S), 0, V)
    real = jax.jit(lambda x: _LM(_hand_row(tpflax.make_mesh({"data": 2, "model": 4}))).init(jax.random.key(0), x))(ids)
    step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings, compiler_options=FAST_XLA)
    _, _, value = step(tpflax.shard(real, plan, mesh), jax.device_put(optax.sgd(0.1).init(real["params"]),
                                                                      ts.in_shardings[1]), (ids,))
    # the same float32 loss as the model's own forward: only the order of its sums differs (a 64-wide row sum and
    # a 4-way psum; relative error a few float32 epsilons)
    assert jnp.allclose(value, loss(jax.jit(fn)(real, ids), ids), rtol=1e-5)
    flipped = Mesh(np.asarray(mesh.devices).reshape(2, 4)[::-1], ("data", "model"))
    fn, _, _ = _model(_hand_row(flipped))
    with pytest.raises(tpflax.PlanMismatchError, match="another mesh"):
        tpflax.make_train_step(fn, plan, mesh, optax.sgd(0.1), sample=sample, loss=loss)


_HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


class _Dispatch(nn.Module):
    """A column -> row pair around a ``shard_map`` over ``data`` that takes and gives its activation with the
    features whole (``P('data')``): a ragged all-to-all's token dispatch (EasyDeL's and MaxText's experts), or
    an identity for XLA:CPU, which has no ragged all-to-all; ``relu``: an op between the body and the row."""

    mesh: object
    ragged: bool
    relu: bool

    @nn.compact
    def __call__(self, ids):
        h = nn.Dense(1024, name="up")(nn.Embed(512, 256, name="embed")(ids).reshape(-1, 256))

        def body(h):
            if not self.ragged:
                return h * 2.0
            n, rows = jax.lax.axis_size("data"), h.shape[0]
            sizes = jnp.full((n,), rows // n, jnp.int32)
            offsets = jnp.arange(n, dtype=jnp.int32) * (rows // n)
            return jax.lax.ragged_all_to_all(h, jnp.zeros_like(h), offsets, sizes, offsets, sizes, axis_name="data")

        h = jax.shard_map(body, mesh=self.mesh, in_specs=P("data"), out_specs=P("data"))(h)
        return nn.Dense(512, name="down")(jax.nn.relu(h) if self.relu else h)


def _dispatch(mesh, ragged, relu):
    m, ids = _Dispatch(mesh, ragged, relu), jax.ShapeDtypeStruct((8, 64), jnp.int32)

    def loss(logits, ids):
        return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids.reshape(-1)[:, None], -1).mean()

    shape = dict(mesh.shape)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), shape, model=m, sample=(ids,))
    assert p.decisions["params/up/kernel"].spec == P(None, "model")  # the pair is split: its boundary reshards
    return m, ids, loss, p


@pytest.mark.parametrize("relu", [False, True], ids=["direct", "relu"])
def test_a_boundary_that_keeps_split_features_whole_is_priced_as_compiled(relu):
    # The column's output, split over model, enters a body that takes its features whole and leaves it whole:
    # XLA gathers it on the way in and gathers back on the way out, for the backward, either the row's kernel
    # (the row reads the body's output as it is) or its split input gradient (through a relu). Before, neither
    # was priced (the estimate of the ragged dispatch on TPU was 0.69 of the compiled collectives). Measured
    # per device: the (256, 1024) f32 activation, 3/4 of 1 MiB; the (1024, 512) f32 kernel, 3/4 of 2 MiB
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    m, ids, loss, p = _dispatch(mesh, False, relu)
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(ids,), loss=loss, backend="cpu")
    gathers = sorted(c.ring_bytes * c.count for c in dr.collectives if c.kind == "all-gather")
    assert gathers == sorted(i.total for i in est.items if i.kind == "all-gather")
    assert gathers == ([786432.0] * 2 if relu else [786432.0, 1572864.0])
    model = [(c.kind, c.ring_bytes * c.count) for c in dr.collectives if c.axes == ("model",)]
    assert sum(b for _, b in model) == sum(i.total for i in est.items if tuple(i.axes) == ("model",))


@pytest.mark.skipif(not _HAS_LIBTPU, reason='libtpu is not installed (pip install "tpflax[tpu]")')
def test_a_ragged_all_to_all_is_read_and_priced_on_tpu_and_named_on_cpu():
    # XLA:CPU has no ragged all-to-all: the dry run's error says so and names the way out (the TPU compiler).
    # On v5e:2x4 the compiled program reads it as an all-to-all of its operand, (256, 1024) f32 per device over
    # data=2 (1/2 of 1 MiB), forward and backward, which the estimate's trace prices the same; the row reads the
    # body's output as it is, so XLA:TPU gathers its float32 kernel for the backward product as bfloat16
    cpu = tpflax.make_mesh({"data": 2, "model": 4})
    m, ids, loss, p = _dispatch(cpu, True, False)
    with pytest.raises(tpflax.CompileError, match="does not implement `ragged-all-to-all`.*target="):
        tpflax.dry_run(tpflax.make_train_step(m, p, cpu, optax.adamw(1e-3), sample=(ids,), loss=loss), p, cpu)
    mesh = tpflax.make_mesh({"data": 2, "model": 4}, target="tpu-v5e:2x4")
    m, ids, loss, p = _dispatch(mesh, True, False)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(ids,), loss=loss, target="tpu-v5e:2x4")
    ragged = [c.ring_bytes * c.count for c in dr.collectives if c.op_name.endswith("ragged_all_to_all")]
    assert ragged == [524288.0] * 2
    assert ragged == [i.total for i in est.items if i.kind == "all-to-all"]
    model = sorted((c.kind, c.ring_bytes * c.count) for c in dr.collectives if c.axes == ("model",))
    assert model == sorted((i.kind, i.total) for i in est.items if tuple(i.axes) == ("model",))
    # the activation on the way in, and the row's kernel (2 MiB as float32) gathered as 1 MiB of bfloat16
    assert [b for k, b in model if k == "all-gather"] == [786432.0] * 2


class _ScatterBf16(nn.Module):
    """A bfloat16 layer whose output a ``shard_map`` body reduce-scatters over ``data`` by hand."""

    mesh: object

    @nn.compact
    def __call__(self, ids):
        h = nn.Dense(256, dtype=jnp.bfloat16, name="up")(nn.Embed(512, 128, name="embed")(ids).reshape(-1, 128))
        h = jax.shard_map(lambda h: jax.lax.psum_scatter(h, "data", scatter_dimension=0, tiled=True),
                          mesh=self.mesh, in_specs=P("data"), out_specs=P("data"))(h)
        return nn.Dense(64, dtype=jnp.bfloat16, name="down")(h)


def test_a_bfloat16_collective_written_by_hand_moves_float32_on_cpu():
    # XLA:CPU widens a 16-bit buffer to float32 around its collectives, as the estimate prices the plan's own
    # (cpu_wire); the body's reduce-scatter and its all-gather transpose were priced at the jaxpr's bfloat16,
    # half the compiled bytes (MaxText's sparse experts: 0.945 -> 0.977 of the compiled collectives)
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    m, ids = _ScatterBf16(mesh), jax.ShapeDtypeStruct((8, 64), jnp.int32)

    def loss(out, ids):
        return jnp.mean(out.astype(jnp.float32) ** 2)

    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), ids), {"data": 2, "model": 4}, model=m, sample=(ids,))
    ts = tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), sample=(ids,), loss=loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    est = tpflax.estimate(p, optax.sgd(0.1), model=m, sample=(ids,), loss=loss, backend="cpu")
    compiled = sorted((c.kind, c.ring_bytes * c.count) for c in dr.collectives if "shard_map" in (c.op_name or ""))
    priced = sorted((i.kind, i.total) for i in est.items if i.source.startswith("reduce_scatter"))
    # (256 rows, 256) f32 = 256 KiB per device: 1/2 of it sent each way over data=2
    assert compiled == priced == [("all-gather", 131072.0), ("reduce-scatter", 131072.0)]


def _mapped_mlp(mesh):
    """An MLP pair inside a shard_map whose in_specs split its kernels over ``model`` (a column's output
    features, a row's input features), its output summed by hand."""
    def body(x, w1, w2):
        return jax.lax.psum(jax.nn.relu(x @ w1) @ w2, "model")

    return jax.shard_map(body, mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model", None)),
                         out_specs=P("data"))


class _MappedMLP(nn.Module):
    mlp: object

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(V, D, name="embed")(ids)
        w1 = self.param("w1", nn.initializers.lecun_normal(), (D, 4 * D))
        w2 = self.param("w2", nn.initializers.lecun_normal(), (4 * D, D))
        return nn.Dense(V, use_bias=False, name="head")(x + self.mlp(nn.LayerNorm(name="ln")(x), w1, w2))


def test_a_whole_kernel_a_shard_map_takes_split_is_updated_split_and_gathered():
    # a plan keeping the kernels whole (replicated) under a body that takes them split over model (EasyDeL's and
    # MaxText's expert shard_maps under a replicated plan): the body's transpose hands each gradient back split,
    # so XLA sums it over data on its (64, 64) shard, runs adamw on the shard and gathers the kernel and its two
    # moments over model. The body sums the pair's output as written (its psum) and its transpose the input's
    # gradient, whatever the plan. Before, the estimate summed both gradients whole over data and priced nothing
    # over model (0.445 of the compiled collectives)
    shape = {"data": 2, "model": 4}
    mesh = tpflax.make_mesh(shape)
    m = _MappedMLP(_mapped_mlp(mesh))
    ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
    params = jax.eval_shape(lambda x: m.init(jax.random.key(0), x), ids)
    fn = lambda p, x: m.apply(p, x)  # noqa: E731
    plan = tpflax.plan(params, shape, rules=[(r".*", "replicate")])
    loss = lambda out, ids: out.mean()  # noqa: E731
    est = tpflax.estimate(plan, optax.adamw(1e-3), model=fn, sample=(ids,), loss=loss, backend="cpu")
    dr = tpflax.dry_run(tpflax.make_train_step(fn, plan, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), plan,
                        mesh, compiler_options=COMM_XLA)

    def by(items, kind, axes):
        return sum(i.ring_bytes * i.count for i in items if i.kind == kind and tuple(i.axes) == axes)

    # 2 kernels x 3 copies, each f32[64,256] gathered over 4 ranks: 6 x 3/4 x 65536 B
    assert by(est.items, "all-gather", ("model",)) == by(dr.collectives, "all-gather", ("model",)) == 294912
    # the data all-reduce: every gradient, the two kernels' as (64, 64) shards; compiled adds the f32 loss scalar
    assert by(dr.collectives, "all-reduce", ("data",)) - by(est.items, "all-reduce", ("data",)) == 4
    assert {i.source for i in est.items if "update runs split" in i.why} == {"params/w1", "params/w2"}
    # the psum forward, the input gradient's sum backward: f32[4,16,64] each, all-reduced over 4 ranks
    assert by(est.items, "all-reduce", ("model",)) == by(dr.collectives, "all-reduce", ("model",)) == 2 * 24576
