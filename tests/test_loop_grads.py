"""Gradients of leaves a scan body uses at every step (a recurrent cell, a table looked up by the ids
the scan slices): where the compiler reduces them, per step inside the backward loop or once after it
(tpflax._src.cost.gradients.loop_reps), against programs XLA really compiles."""

from __future__ import annotations

import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, FAST_XLA
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo

STEPS = 16
needs_libtpu = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                  reason='libtpu is not installed (pip install "tpflax[tpu]")')


class ScannedLookup(nn.Module):
    """An embedding 256 x 128 looked up inside ``nn.scan``'s body by the token the scan slices, then a
    recurrent cell: every parameter is used inside the loop."""

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(256, 128, name="embed")

        class Step(nn.Module):
            @nn.compact
            def __call__(self, carry, tok):
                return nn.SimpleCell(128, name="cell")(carry, emb(tok))

        scan = nn.scan(Step, variable_broadcast="params", split_rngs={"params": False}, in_axes=1, out_axes=1)
        _, ys = scan(name="rnn")(jnp.zeros((ids.shape[0], 128)), ids)
        return ys



class DiagonalRecurrence(nn.Module):
    """Griffin's recurrent block, small: Dense layers named under ``recurrent_block`` around a diagonal
    linear recurrence (``h = a_t * h + x_t``, a ``lax.scan`` over time of activations only). No kernel is
    used inside the loop body, whatever the names say."""

    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(256, 128, name="embed")(ids)

        class Block(nn.Module):
            @nn.compact
            def __call__(self, x):
                y = nn.gelu(nn.Dense(128, name="linear_y")(x))
                u = nn.Dense(128, name="linear_x")(x)
                # per token, as the RG-LRU's gated decay: the body reads it sliced, not closed over
                a = jnp.broadcast_to(jax.nn.sigmoid(self.param("a_param", nn.initializers.ones, (128,))), u.shape)

                def step(h, xs):
                    h = xs[1] * h + xs[0]
                    return h, h

                _, hs = jax.lax.scan(step, jnp.zeros_like(u[:, 0]), (jnp.swapaxes(u, 0, 1), jnp.swapaxes(a, 0, 1)))
                return nn.Dense(128, name="linear_out")(jnp.swapaxes(hs, 0, 1) * y)

        return x + Block(name="recurrent_block")(x)


def _compiled(net, batch, target=None, sizes=None):
    opt = optax.adamw(1e-3)
    if isinstance(net, str):
        m = zoo.get(net)
        p = tpflax.plan(m.abstract_variables(), sizes or {"fsdp": 8}, fsdp_min_bytes=1024)
        mesh = tpflax.make_mesh(p.mesh.sizes, target=target)
        ts = tpflax.make_train_step(m, p, mesh, opt, batch)
        est = tpflax.estimate(p, opt, ts.args[2], model=m, backend="tpu" if target else "cpu", target=target)
    else:
        ids = jax.ShapeDtypeStruct((batch, STEPS), jnp.int32)
        v = jax.eval_shape(net.init, jax.random.key(0), ids)
        p = tpflax.plan(v, sizes or {"fsdp": 8}, model=net, sample=(ids,), fsdp_min_bytes=1024)
        mesh = tpflax.make_mesh(p.mesh.sizes, target=target)
        ts = tpflax.make_train_step(net, p, mesh, opt, sample=(ids,), loss=lambda out, *_: jnp.mean(out ** 2),
                                    variables=v)
        est = tpflax.estimate(p, opt, model=net, sample=(ids,), backend="tpu" if target else "cpu", target=target)
    # on XLA:CPU without LLVM's optimisations (FAST_XLA): the same HLO passes, so the same collectives
    return est, tpflax.dry_run(ts, p, mesh, compiler_options=None if target else FAST_XLA)


def _embed_reductions(est, dr):
    """(estimated, compiled) executions of the embedding gradient's reduction (the table's shape)."""
    hlo = sum(c.count for c in dr.collectives if c.kind != "all-gather" and (256, 128) in c.shapes)
    return sum(i.count for i in est.items if i.kind != "all-gather" and i.source == "params/embed/embedding"), hlo


@pytest.mark.parametrize("sizes", [{"fsdp": 8}, {"data": 2, "fsdp": 4}])
def test_cpu_reduces_every_leaf_used_in_the_body_at_each_step(sizes):
    # XLA:CPU all-reduces the lookup's and the cell's partial gradients inside the backward loop, 16
    # times; the estimate charged the table once (-18% of the step's bytes at fsdp=8)
    est, dr = _compiled(ScannedLookup(), 8, sizes=sizes)
    assert _embed_reductions(est, dr) == (STEPS, STEPS)
    assert abs(dr.compare(est).comm_error) < 1e-3, "\n".join(dr.compare(est).report_lines())


@needs_libtpu
@pytest.mark.parametrize("batch", [8, 32])
def test_tpu_reduces_a_lookup_in_the_body_per_step_only_at_one_example_per_device(batch):
    # XLA:TPU sums the cell's partial gradients in the loop and reduces them once after it; the table's
    # one-row scatter-add (one example per device) it all-reduces whole at every step, more rows once
    est, dr = _compiled(ScannedLookup(), batch, target="tpu-v5e:2x4")
    per_step = [c for c in dr.collectives if c.count > 1]
    if batch == 8:
        assert _embed_reductions(est, dr) == (STEPS, STEPS) and [c.shapes for c in per_step] == [((256, 128),)]
    else:  # the table's gradient is reduce-scattered in one tuple with the cell's, after the loop
        assert _embed_reductions(est, dr)[0] == 1 and not per_step
    if batch == 8:  # at 32 XLA:TPU gathers the float32 kernels as bfloat16, which the estimate does not see
        assert abs(dr.compare(est).comm_error) < 1e-3, "\n".join(dr.compare(est).report_lines())


@needs_libtpu
def test_tpu_reduces_a_zoo_rnns_gradients_once_after_the_loop():
    # the estimate charged every LSTM leaf at each of the 16 steps: +875% of the step's bytes
    est, dr = _compiled("lstm", 8, target="tpu-v5e:2x4")
    assert all(c.count == 1 for c in dr.collectives), [(c.count, c.shapes, c.name) for c in dr.collectives]
    assert all(i.count <= 2 for i in est.items)  # the two layers' leaves, once each
    assert abs(dr.compare(est).comm_error) < 1e-3, "\n".join(dr.compare(est).report_lines())


def test_traced_leaves_outside_the_loop_body_are_reduced_once_whatever_their_names():
    # the estimate took every leaf under a unit named like a recurrent cell for one used at each of the 16
    # steps (2.7x the compiled bytes of a replicated Griffin); the body reads only activations
    est, dr = _compiled(DiagonalRecurrence(), 8, sizes={"data": 2, "fsdp": 4})
    counts = {i.source: i.count for i in est.items if i.kind == "all-reduce" and "recurrent_block" in i.source}
    assert set(counts.values()) == {1} and len(counts) == 7, counts
    assert all(c.count == 1 for c in dr.collectives), [(c.count, c.shapes, c.name) for c in dr.collectives]
    assert abs(dr.compare(est).comm_error) < 0.02, "\n".join(dr.compare(est).report_lines())


class SharedBlock(nn.Module):
    """A Universal Transformer: one block's weights at each of 4 steps of ``nn.scan`` (``variable_broadcast``),
    every token at every step."""

    @nn.compact
    def __call__(self, ids):
        class Block(nn.Module):
            @nn.compact
            def __call__(self, x, _):
                h = nn.LayerNorm(name="ln")(x)
                q, k, v = (nn.DenseGeneral((4, 32), name=n)(h) for n in ("query", "key", "value"))
                a = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1)
                x = x + nn.DenseGeneral(128, axis=(-2, -1), name="out")(jnp.einsum("bhqk,bkhd->bqhd", a, v))
                return x + nn.Dense(128, name="ffn_out")(nn.relu(nn.Dense(512, name="ffn_in")(x))), None

        x = nn.Embed(256, 128, name="embed")(ids)
        x, _ = nn.scan(Block, variable_broadcast="params", split_rngs={"params": False}, length=4)(name="block")(
            x, None)
        return nn.Dense(256, name="lm_head")(x)


def test_a_block_shared_by_every_step_of_a_scan_is_planned_and_priced_as_a_layer():
    # kept whole as a "recurrent cell kernel" (2.08x the bytes and 3.73x the flops of Megatron, XLA:CPU
    # data=2,model=4), and split by hand its sums were priced once for the 4 steps (0.46x the compiled bytes)
    net, mesh, ids = SharedBlock(), {"data": 2, "model": 4}, jax.ShapeDtypeStruct((8, STEPS), jnp.int32)
    p = tpflax.plan(jax.eval_shape(net.init, jax.random.key(0), ids), mesh, model=net, sample=(ids,))
    specs = {k: tuple(d.spec) for k, d in p.decisions.items() if "block/" in k and k.endswith("kernel")}
    assert specs == {"params/block/query/kernel": (None, "model", None), "params/block/key/kernel": (None, "model", None),
                     "params/block/value/kernel": (None, "model", None), "params/block/out/kernel": ("model", None, None),
                     "params/block/ffn_in/kernel": (None, "model"), "params/block/ffn_out/kernel": ("model", None)}
    est, dr = _compiled(net, 8, sizes=mesh)
    per_step = [c for c in dr.collectives if c.axes == ("model",) and c.count == 4]
    assert len(per_step) == 4  # the two rows' sums forward, the two column sets' backward, at each step
    # the norm's gradient, summed at each step too, is priced once: 3 KiB of the 3.4 MB
    assert abs(dr.compare(est).comm_error) < 0.01, "\n".join(dr.compare(est).report_lines())


class PairCell(nn.Module):
    """A recurrence whose step is an MLP on one row per sequence (``h <- h + W2 relu(W1 (h + x_t))``), scanned
    over time batch- or time-major: each position once, whichever way the input is laid out."""

    time_major: bool

    @nn.compact
    def __call__(self, x):
        class Step(nn.Module):
            @nn.compact
            def __call__(self, h, xt):
                h = h + nn.Dense(128, name="w_out")(nn.relu(nn.Dense(512, name="w_in")(h + xt)))
                return h, h

        ax = 0 if self.time_major else 1
        scan = nn.scan(Step, variable_broadcast="params", split_rngs={"params": False}, in_axes=ax, out_axes=ax)
        return scan(name="cell")(jnp.zeros((x.shape[1 - ax], 128)), x)[1]


@pytest.mark.parametrize("time_major", [False, True])
def test_a_cell_stepping_over_the_positions_stays_whole_in_either_layout(time_major):
    # the block-as-a-layer rule compared a step's rows with the sample's leading dim: time-major, that is the
    # time steps, and a cell's batch rows read as "more than one per example" (split, 33 collectives per step
    # where the whole cell has one: 7x the collectives)
    m = PairCell(time_major)
    x = jax.ShapeDtypeStruct((STEPS, 64, 128) if time_major else (64, STEPS, 128), jnp.float32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2, "model": 4}, model=m, sample=(x,))
    for k in ("params/cell/w_in/kernel", "params/cell/w_out/kernel"):
        assert p.decisions[k].spec == P(None, None) and "recurrent cell" in p.decisions[k].reason, k


def test_parameters_a_scan_body_reads_elementwise_are_reduced_at_each_step():
    # a diagonal SSM (Mamba's A_log and B read in a per-timestep lax.scan): no contraction reads them in the
    # body, but XLA:CPU all-reduces each step's gradient contribution over the batch inside the backward loop,
    # 16 times; the estimate charged them once (0.21x the compiled collectives at data=8). Every collective is
    # modelled on data=8, so the bound is 1% (it matches to 0.01%)
    def fn(p, x):
        a = -jnp.exp(p["A_log"])  # made outside the loop, read inside it

        def step(h, ut):
            h = jnp.exp(a) * h + ut[..., None] * p["B"]
            return h, h.sum(-1)
        _, ys = jax.lax.scan(step, jnp.zeros((x.shape[0], 32, 8)), (x @ p["in"]).swapaxes(0, 1))
        return ys.swapaxes(0, 1) @ p["out"]

    sds = lambda *s: jax.ShapeDtypeStruct(s, jnp.float32)  # noqa: E731
    params = {"in": sds(32, 32), "A_log": sds(32, 8), "B": sds(8), "out": sds(32, 32)}
    x, opt = sds(8, STEPS, 32), optax.adamw(1e-3)
    p = tpflax.plan(params, {"data": 8}, model=fn, sample=(x,))
    mesh = tpflax.make_mesh(p.mesh.sizes)
    ts = tpflax.make_train_step(fn, p, mesh, opt, sample=(x,), loss=lambda out, *_: jnp.mean(out ** 2),
                                variables=params)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    est = tpflax.estimate(p, opt, model=fn, sample=(x,), backend="cpu")
    assert {i.source: i.count for i in est.items if i.source in ("A_log", "B")} == {"A_log": STEPS, "B": STEPS}
    assert abs(dr.compare(est).comm_error) < 0.01, "\n".join(dr.compare(est).report_lines())
