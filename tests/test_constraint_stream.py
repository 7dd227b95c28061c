"""A residual stream a model's own constraint splits on its features, as MaxText's decoders do.

MaxText constrains its residual stream to ``('activation_batch', 'activation_norm_length', 'activation_embed')``,
``activation_embed`` over ``tensor``: between its layers the stream is split on its features. Under a Megatron
layout, whose pairs keep those dims whole, XLA gathers the stream before each column group's matmul (forward,
again in a remat recompute, and for the weight gradient) and each row's output gradient (backward); the rows'
partial outputs and the columns' partial input gradients are summed as without the constraint. The estimate
counted none of the gathers: 0.69 of the compiled collectives here, 0.46-0.65 on MaxText's own models
(``benchmarks/results/probe_maxtext.md``).
"""

from __future__ import annotations

import collections

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, FAST_XLA, assert_bit_exact
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}
D, H, HD, F, B, T = 256, 8, 32, 1024, 8, 64
X = jax.ShapeDtypeStruct((B, T, D), jnp.float32)


def make(mesh, *, scan: bool, remat: bool, dtype=jnp.float32, apart: bool = False, constrain: bool = True):
    def stream(x):
        if not constrain:
            return x
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, P("data", None, "model")))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            kw = {"dtype": dtype, "param_dtype": dtype}
            h = nn.RMSNorm(name="n1", **kw)(stream(x))
            hq, hkv = (stream(h), stream(h)) if apart else (h, h)  # MaxText constrains q's and k/v's inputs apart
            q, k, v = (nn.DenseGeneral((H, HD), use_bias=False, name=n, **kw)(a)
                       for n, a in (("q", hq), ("k", hkv), ("v", hkv)))
            w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / HD ** 0.5)
            x = stream(x + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o", **kw)(
                jnp.einsum("bhqk,bkhd->bqhd", w, v)))
            h = nn.RMSNorm(name="n2", **kw)(x)
            up = nn.Dense(F, use_bias=False, name="wi", **kw)
            return stream(x + nn.Dense(D, use_bias=False, name="wo", **kw)(nn.silu(up(h)))), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            block = nn.remat(Block) if remat else Block
            if scan:
                return nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True},
                               length=2)(name="layers")(x, None)[0]
            for i in range(2):
                x, _ = block(name=f"b{i}")(x, None)
            return x

    return Model()


def loss(y, x):
    return jnp.mean(y ** 2)


def measured(m, x, mesh, wrap=None, **plan_kw):
    """(plan, estimate, dry run, the stream's gathers as estimated, as compiled) of the linen module ``m``'s adamw
    step on ``x``, planned with ``plan_kw`` (``wrap``: a context its forward runs in)."""
    import contextlib

    params = jax.eval_shape(m.init, jax.random.key(0), x)

    def fn(v, x):
        with wrap() if wrap else contextlib.nullcontext():
            return m.apply(v, x)

    p = tpflax.plan(params, MESH, model=fn, sample=(x,), batch=(x,), **plan_kw)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=(x,), loss=loss, backend="cpu")
    dr = tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh,
                        compiler_options=FAST_XLA)
    compiled = sum(c.ring_bytes * c.count for c in dr.collectives if c.kind == "all-gather"
                   and c.shapes == ((B // 2, T, D),))
    estimated = sum(i.ring_bytes * i.count for i in e.items if i.kind == "all-gather" and "stream" in i.why)
    return p, e, dr, estimated, compiled


@pytest.mark.parametrize("scan,remat,dtype,apart", [(True, True, jnp.float32, False), (False, False, jnp.float32, False),
                                                    (True, True, jnp.bfloat16, False), (True, True, jnp.float32, True)])
def test_the_gathers_of_a_constrained_stream_are_estimated(devices, scan, remat, dtype, apart):
    mesh = tpflax.make_mesh(MESH)
    p, e, dr, estimated, compiled = measured(make(mesh, scan=scan, remat=remat, dtype=dtype, apart=apart),
                                             jax.ShapeDtypeStruct(X.shape, dtype), mesh)
    assert p.decisions[next(k for k in p.decisions if k.endswith("wi/kernel"))].spec[-1] == "model"  # Megatron
    # one (rows, D) stream, gathered over model=4: 8 gathers a layer with remat, 6 without, 3 more where q's
    # input and k/v's are constrained apart; in float32 either way, as XLA:CPU converts bfloat16 operands
    stream = B // 2 * T * D * 4 * 3 / 4
    per_layer = (8 if remat else 6) + 3 * apart
    assert estimated == compiled == 2 * per_layer * stream
    # measured 0.998 each way: everything else is the pairs' sums and the data-parallel gradients
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05


def test_norm_scales_split_on_their_features_split_the_stream_alike(devices):
    # MaxText's layout splits its norm scales over tensor (its ``norm`` rule); its GPT-3 constrains no residual,
    # and XLA carries the scales' split into the normed stream: the same gathers (measured there, 0.995 of its
    # compiled collectives with them, 0.72 without)
    mesh = tpflax.make_mesh(MESH)
    _, e, dr, estimated, compiled = measured(make(mesh, scan=True, remat=True, constrain=False), X, mesh,
                                             rules=[(r"n\d/scale$", P(None, "model"))])
    assert estimated == compiled == 2 * 8 * (B // 2 * T * D * 4 * 3 / 4)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05  # measured 0.998


def test_flax_logical_constraints_are_traced_under_the_plans_mesh(devices):
    # flax's nn.with_logical_constraint constrains nothing without a mesh set (MaxText's GPT-3 writes every
    # constraint so); the step runs under its mesh, so the trace does too: before, the estimate saw no
    # constraint, priced no gather of the stream, and was 0.70 of MaxText's GPT-3's compiled collectives
    rules = (("batch", "data"), ("embed", "model"))

    class Block(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            def stream(y):
                return nn.with_logical_constraint(y, ("batch", None, "embed"))

            h = nn.RMSNorm(name="n1")(stream(x))
            return stream(x + nn.Dense(D, use_bias=False, name="wo")(
                nn.silu(nn.Dense(F, use_bias=False, name="wi")(h)))), None

    class Model(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.scan(nn.remat(Block), variable_axes={"params": 0}, split_rngs={"params": True},
                           length=2)(name="layers")(x, None)[0]

    mesh = tpflax.make_mesh(MESH)
    # as a MaxText or T5X step sets its rules around the forward
    _, e, dr, estimated, compiled = measured(Model(), X, mesh, wrap=lambda: nn.logical_axis_rules(rules))
    stream = B // 2 * T * D * 4 * 3 / 4
    assert estimated == compiled == 2 * 3 * stream  # an MLP block with remat: 3 gathers a layer
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05


def test_bare_partition_specs_and_reshard_trace_under_the_plans_mesh():
    # a bare PartitionSpec needs a mesh set (jax.set_mesh), as the step sets it; the trace raised "Using
    # PartitionSpec when you are not under a mesh context is not allowed". jax.sharding.reshard (which jax
    # also inserts itself under a mesh: MaxText's rotary embedding) is an identity for the dataflow, as
    # with_sharding_constraint is: the pair through it stays a pair
    from tpflax._src.trace.dataflow import dataflow

    v = {"up": jax.ShapeDtypeStruct((64, 256), jnp.float32), "down": jax.ShapeDtypeStruct((256, 64), jnp.float32)}

    def fn(v, x):
        h = jax.lax.with_sharding_constraint(jax.nn.relu(x @ v["up"]), P("data", "model"))
        return jax.sharding.reshard(h, P()) @ v["down"]

    x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
    p = tpflax.plan(v, MESH, model=fn, sample=(x,))
    assert (p.decisions["up"].spec, p.decisions["down"].spec) == (P(None, "model"), P("model", None))
    assert p.decisions["up"].source == "trace"
    flow = dataflow(fn, (x,), v, MESH)
    assert {(flow.uses[u].path, d, a) for u, d, a in flow.constraints} >= {("up", 1, ("model",)), ("up", 1, ())}


class BareSpecs(nn.Module):
    """A token model constraining its activations with bare PartitionSpecs, as the JAX sharding guide writes them
    under ``jax.set_mesh``: it traces only under a mesh of those axis names."""

    axis: str = "model"

    @nn.compact
    def __call__(self, ids):
        x = jax.lax.with_sharding_constraint(nn.Embed(512, 64, name="embed")(ids), P("data", None, None))
        h = jax.lax.with_sharding_constraint(nn.Dense(256, name="up")(x), P("data", None, self.axis))
        return nn.Dense(512, name="head")(x + nn.Dense(64, name="down")(nn.gelu(h)))


IDS = jnp.zeros((8, 16), jnp.int32)


def _token_loss(logits, ids):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], axis=-1))


def test_a_model_constraining_with_bare_partition_specs_is_estimated_and_run_without_a_mesh_set(devices):
    # tpflax knows the mesh, so every trace it makes of the model runs under it, as the step does: before,
    # estimate(model=) (its init, its layer trace, its loss trace), init_sharded and suggest_mesh raised jax's
    # "with_sharding_constraint requires a non-empty mesh in context" unless the caller had set one
    from tpflax._src import model_cache

    m, mesh = BareSpecs(), tpflax.make_mesh(MESH)
    with jax.set_mesh(mesh):
        want = m.init(jax.random.key(0), IDS)
    p = tpflax.plan(want, MESH, model=m, sample=(IDS,))
    model_cache.clear()  # no trace made under a mesh serves the calls below
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(IDS,), loss=_token_loss, backend="cpu")
    got = tpflax.init_sharded(lambda k: m.init(k, IDS), p, mesh, jax.random.key(0))
    s = tpflax.suggest_mesh(m, 8, "16GiB", sample=(IDS,), variables=want)
    model_cache.clear()
    with jax.set_mesh(mesh):
        e_in = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(IDS,), loss=_token_loss, backend="cpu")
    assert (e.per_device, e.comm) == (e_in.per_device, e_in.comm)  # the same trace as under the caller's mesh
    assert_bit_exact(jax.device_get(got), jax.device_get(want))
    assert got["params"]["up"]["kernel"].sharding.spec == p.decisions["params/up/kernel"].spec == P(None, "model")
    assert s.ranked and all(set(c.mesh.names) >= {"data", "model"} for c in s.ranked)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(IDS,), loss=_token_loss),
                        p, mesh, compiler_options=COMM_XLA)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.10  # the estimate's target


def test_trace_activations_takes_the_mesh_a_bare_partition_spec_model_needs():
    from tpflax._src import model_cache

    m = BareSpecs()
    with jax.set_mesh(tpflax.make_mesh(MESH)):
        v = jax.eval_shape(m.init, jax.random.key(0), IDS)
        want = tpflax.trace_activations(m, (IDS,), v)
    model_cache.clear()
    with pytest.raises(tpflax.TraceError, match=r"bare PartitionSpecs.*jax\.set_mesh.*mesh="):
        tpflax.trace_activations(m, (IDS,), v)
    assert tpflax.trace_activations(m, (IDS,), v, mesh=MESH) == want


def test_a_constraint_over_an_axis_the_mesh_lacks_is_a_trace_error_naming_the_fix():
    m = BareSpecs(axis="tp")
    with jax.set_mesh(tpflax.make_mesh({"data": 2, "tp": 4})):
        v = jax.eval_shape(m.init, jax.random.key(0), IDS)
    p = tpflax.plan(v, MESH)
    for call in (lambda: tpflax.plan(v, MESH, model=m, sample=(IDS,)),
                 lambda: tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(IDS,)),
                 lambda: tpflax.estimate(p, optax.adamw(1e-3), model=BareSpecs(axis="tp"), sample=(IDS,))):
        with pytest.raises(tpflax.TraceError, match=r"'tp'.*mesh lacks: name the mesh's axes"):
            call()


def _both_sides(scan: bool, dtype, width: int = 64, hidden: int = 256, remat: bool = False, gated: bool = False):
    """A replicated MLP between two constraints over model: the stream split on its ``width`` features, the
    ``hidden``-wide hidden on its own (MaxText's ``activation_embed`` and ``activation_mlp``); ``gated``: a
    ``silu(x @ wi_0) * (x @ wi_1)`` hidden, constrained after the product, as MaxText's llama3's; ``remat``: each
    layer under ``nn.remat``."""

    def split(x):
        return jax.lax.with_sharding_constraint(x, P("data", None, "model"))

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _):
            y = nn.LayerNorm(name="ln")(x)
            if gated:
                h = split(nn.silu(nn.Dense(hidden, dtype=dtype, name="wi_0")(y))
                          * nn.Dense(hidden, dtype=dtype, name="wi_1")(y))
            else:
                h = nn.gelu(split(nn.Dense(hidden, dtype=dtype, name="wi")(y)))
            return split(x + split(nn.Dense(width, dtype=dtype, name="wo")(h))), None

    block = nn.remat(Layer) if remat else Layer

    class Model(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = split(nn.Embed(512, width, name="embed")(ids))
            if scan:
                x = nn.scan(block, variable_axes={"params": 0}, split_rngs={"params": True}, length=2)(
                    name="layers")(x, None)[0]
            else:
                for i in range(2):
                    x = block(name=f"layer{i}")(x, None)[0]
            return nn.Dense(512, name="head")(nn.LayerNorm(name="lnf")(x))

    return Model()


def measured_both_sides(scan: bool, dtype, target: str | None = None, **kw):
    """(estimate, dry run) of :func:`_both_sides`'s adamw step under a replicated plan, on the CPU mesh or for the
    TPU ``target``."""
    m = _both_sides(scan, dtype, **kw)
    ids = jax.ShapeDtypeStruct((8, 64), jnp.int32)
    with jax.set_mesh(tpflax.make_mesh(MESH)):
        params = jax.eval_shape(m.init, jax.random.key(0), ids)
    p = tpflax.plan(params, MESH, rules=[(r".*", "replicate")])
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(ids,), loss=_token_loss,
                        backend="tpu" if target else "cpu", target=target)
    mesh = tpflax.make_mesh(MESH, target=target)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=_token_loss),
                        p, mesh, compiler_options=None if target else FAST_XLA)
    return e, dr


def activation_moves(e, dr):
    """``(compiled, their dtypes, estimated)``: the ring bytes by (kind, bytes moved) of the collectives that move
    an activation of the MLP's tokens (``(4, 64, features)`` on a device), compiled and as the estimate prices
    the whole kernels' reads."""
    compiled, dtypes, estimated = collections.Counter(), set(), collections.Counter()
    for c in dr.collectives:
        if len(c.shapes) == 1 and len(c.shapes[0]) == 3 and c.shapes[0][:2] == (4, 64):
            compiled[c.kind, c.bytes] += c.ring_bytes * c.count
            dtypes.add(c.dtypes)
    for i in e.items:
        if "whole kernel" in i.why:
            estimated[i.kind, i.size] += i.ring_bytes * i.count
    return compiled, dtypes, estimated


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_a_whole_kernel_between_two_constraints_gathers_what_it_contracts(devices, scan, dtype):
    # both sides of a whole kernel split over model: XLA partitions its matmul by its output's split, gathering
    # its input forward (wo's 256-wide hidden, where summing its 64-wide partial outputs moves less); backward,
    # its output gradient (wi's hidden gradient) or, reading a cast copy, its partial input gradients summed (wo's
    # hidden's); and its weight gradient gathers the narrower side again (the 64-wide stream for wi, its gradient
    # for wo). Every activation these kernels move is priced, by kind and size: the estimate came to 0.868 / 1.198
    # (f32) and 1.079 / 1.057 (bf16) of the compiled collectives before 0acd0d8, to 0.915 / 0.929 before r44
    e, dr = measured_both_sides(scan, dtype)
    compiled, _, estimated = activation_moves(e, dr)
    assert compiled and compiled == estimated, (compiled, estimated)
    # the rest: the kernels' split updates gathered (priced exactly) and the norms' row sums (not: 18 KiB of 2.2 MiB)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.02


@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_a_rematerialised_layer_runs_its_whole_kernels_collectives_again(devices, gated):
    # under remat the recompute gathers again an input no wider than the output (wi's 256-wide stream: its weight
    # gradient takes it), the input gradient moves the narrower of its two ways, and a gated pair's second kernel
    # is recomputed by summing its partial outputs; MaxText's models rematerialise every layer (before r44 the
    # estimate missed mixtral's experts' recomputed sums: 0.60-0.72 of the compiled collectives)
    e, dr = measured_both_sides(True, jnp.bfloat16, width=256, hidden=1024, remat=True, gated=gated)
    compiled, _, estimated = activation_moves(e, dr)
    assert compiled and compiled == estimated, (compiled, estimated)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.02
