"""Scanned layer stacks keep their fsdp split inside the scan (issue 12).

make_train_step gathers a stacked (``nn.scan``) parameter one layer at a time
inside the scan body, and reduce-scatters that layer's gradient there, instead of
gathering all layers before the loop. Checked on the CPU mesh: the compiled
step's all-gathers are per layer, never a whole stack, and the step equals the
unscanned model's step (same weights, stacked) to the bounds of
test_train_step.py; on the TPU compiler (when libtpu is installed) the
temporaries no longer grow with the layer count by a layer's gathered weights.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import RUN_XLA
from test_train_step import LOSS_ULPS, U, assert_first_sgd_step_close

import tpflax
from tpflax import zoo
from tpflax.hlo import parse_collectives, summarize

MESH = {"fsdp": 4, "model": 2}
LAYERS = 3  # not a size any other dim of the tiny Llama has, so a whole stack is recognisable in the HLO
TX = optax.sgd(0.1, momentum=0.9)


FAST = {"xla_backend_optimization_level": 0}  # as test_train_step.py: LLVM time only, same HLO passes


def _compiled(m, plan, mesh):
    # its collectives are read and its step is run against another (to test_train_step.py's bounds, which
    # compiles its steps so too): RUN_XLA, the same collectives as FAST (checked for the three steps compiled
    # here: the same parsed collectives, in about half the compile time)
    ts = tpflax.make_train_step(m, plan, mesh, TX, 8)
    return jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings).lower(
        *ts.args).compile(compiler_options=RUN_XLA)


@pytest.fixture(scope="module")
def scanned():
    m = zoo.get("llama", scan_layers=True, remat=True, n_layers=LAYERS)
    plan = tpflax.plan(m.abstract_variables(), MESH, fsdp_min_bytes=0)
    mesh = tpflax.make_mesh(MESH)
    return m, plan, mesh, _compiled(m, plan, mesh)


def assert_gathered_per_layer(plan, hlo: str, mesh, min_runs: int = LAYERS) -> None:
    """Every fsdp-split stacked kernel is all-gathered one layer at a time, LAYERS times, never whole.

    XLA:TPU may unroll a short loop, so a layer's gather may appear once per layer
    with the sliced layers dim kept as 1: shapes are compared without leading 1s
    and counts summed.
    """
    runs: dict[tuple[int, ...], int] = {}
    for c in parse_collectives(hlo, mesh):
        if c.kind == "all-gather":
            shape = tuple(c.shapes[0])
            shape = shape[1:] if len(shape) > 1 and shape[0] == 1 else shape
            runs[shape] = runs.get(shape, 0) + c.count
    for path, d in plan.decisions.items():
        spec = tuple(d.spec) + (None,) * (len(d.shape) - len(d.spec))
        if d.layers_dim != 0 or "fsdp" not in spec or len(d.shape) < 3:
            continue
        # one layer's local shape with its fsdp split gathered (its model split kept)
        layer = tuple(n // (plan.mesh.sizes["model"] if e == "model" else 1)
                      for n, e in zip(d.shape[1:], spec[1:], strict=True))
        assert (LAYERS, *layer) not in runs, (path, "the whole stack is gathered", runs)
        assert runs.get(layer, 0) >= min_runs, (path, layer, runs)


def test_stacks_are_gathered_per_layer_inside_the_scan(scanned):
    _, plan, mesh, compiled = scanned
    assert_gathered_per_layer(plan, compiled.as_text(), mesh)


def test_gathered_loss_constrains_inside_the_scan(scanned):
    """A hand-written step's loss wrapped in tpflax.gathered_loss: the gather sits in the scan body."""
    m, plan, mesh, _ = scanned
    v = m.abstract_variables()
    batch = jax.eval_shape(lambda: m.make_batch(0, 8))
    loss = tpflax.gathered_loss(lambda p, b: m.loss({**v, "params": p}, b), plan, mesh)
    jaxpr = jax.make_jaxpr(jax.grad(loss))(v["params"], batch).jaxpr
    scans = [e for e in jaxpr.eqns if e.primitive.name == "scan"]
    assert len(scans) == 2  # forward and backward loops
    for e in scans:
        assert "sharding_constraint" in str(e.params["jaxpr"]), e
    # outside the loops only unstacked leaves are constrained: none has a layers dim of LAYERS
    outer = [e for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]
    assert outer and all(x.aval.shape[:1] != (LAYERS,) for e in outer for x in e.invars)


@functools.cache
def _unscanned(remat: bool):
    """The unscanned LAYERS-layer Llama, its plan and compiled step: the remat one serves two tests."""
    m = zoo.get("llama", remat=remat, n_layers=LAYERS)
    plan = tpflax.plan(m.abstract_variables(), MESH, fsdp_min_bytes=0)
    return m, plan, _compiled(m, plan, tpflax.make_mesh(MESH))


def _fsdp_gathers(compiled, mesh) -> float:
    return summarize(parse_collectives(compiled.as_text(), mesh), by="axis")[("all-gather", "fsdp")]


@pytest.mark.slow
def test_unrolled_remat_layers_gather_inside_the_remat():
    """Unrolled nn.remat layers: each layer's fsdp weights are gathered inside its remat.

    Remat then saves the shard, not the gathered weight, and the backward's recompute
    gathers the layer again: exactly the layers' gathers once more than without remat
    (the embedding, final norm and head are outside the remat, gathered once), which is
    what the estimate counts, to the byte.
    """
    mesh = tpflax.make_mesh(MESH)
    got = {}
    for remat in (False, True):
        m, plan, compiled = _unscanned(remat)
        got[remat] = _fsdp_gathers(compiled, mesh)
        est = tpflax.estimate(plan, TX, 8, model=m, backend="cpu")
        assert est.comm["all-gather"]["fsdp"] == got[remat], (remat, est.comm, got)
    n = plan.mesh.sizes["fsdp"]  # a ring all-gather of a shard sends (n - 1) shards
    layers = sum(d.bytes_per_device * (n - 1) for path, d in plan.decisions.items()
                 if "layers_" in path and "fsdp" in str(d.spec))
    assert got[True] - got[False] == layers


class _Layer(nn.Module):
    @nn.compact
    def __call__(self, x, _):
        return nn.Dense(64)(x), None


class _ScanDim1(nn.Module):
    """MaxText's param_scan_axis=1: nn.scan transposes each stack's layers dim to the front."""

    @nn.compact
    def __call__(self, x):
        scan = nn.scan(_Layer, variable_axes={"params": 1}, split_rngs={"params": True}, length=LAYERS)
        return scan(name="layers")(x, None)[0]


def test_stack_on_dim_1_is_followed_through_the_transpose():
    x = jax.ShapeDtypeStruct((8, 64), jnp.float32)
    v = jax.eval_shape(_ScanDim1().init, jax.random.key(0), x)
    plan = tpflax.plan(v, MESH, fsdp_min_bytes=0, stacked="layers:1")
    assert plan.decisions["params/layers/Dense_0/kernel"].layers_dim == 1
    loss = tpflax.gathered_loss(lambda p, x: _ScanDim1().apply({"params": p}, x).sum(), plan,
                                tpflax.make_mesh(MESH))
    jaxpr = jax.make_jaxpr(jax.grad(loss))(v["params"], x).jaxpr
    outer = [e for e in jaxpr.eqns if e.primitive.name == "sharding_constraint"]
    assert not outer, outer  # nothing gathered whole before the loop
    assert all("sharding_constraint" in str(e.params["jaxpr"]) for e in jaxpr.eqns if e.primitive.name == "scan")


def _stacked(unscanned_params):
    """The unscanned model's params as the scanned model's tree (layers_i stacked on dim 0)."""
    layers = [unscanned_params[f"layers_{i}"] for i in range(LAYERS)]
    rest = {k: v for k, v in unscanned_params.items() if not k.startswith("layers_")}
    return {**rest, "layers": jax.tree_util.tree_map(lambda *xs: np.stack(xs), *layers)}


@pytest.mark.slow
def test_scanned_step_equals_unscanned_step(scanned):
    """One sgd step of the scanned model (per-layer gathers) equals the unscanned model's step.

    Both run on the same mesh from the same weights. The scan and the per-layer
    gathers only reorder float32 sums, so the bounds are test_train_step.py's.
    """
    m, plan, mesh, fn = scanned
    flat, p_flat, fn_flat = _unscanned(True)  # the step test_unrolled_remat_layers_... compiles
    key = jax.random.key(0)  # any weights do (both steps start from them): the init compiled with FAST
    v_flat = jax.device_get(jax.jit(flat.init).lower(key).compile(FAST)(key))
    v_scan = {**v_flat, "params": _stacked(v_flat["params"])}
    batch = jax.device_get(m.make_batch(1, 8))

    def run(f, p, v):
        sv = tpflax.shard(v, p, mesh)
        so = tpflax.shard_optimizer_state(TX, None, p, mesh, params=sv["params"])
        new, opt, loss = f(sv, so, tpflax.shard_batch(batch, mesh))
        return tpflax.unshard(new)["params"], tpflax.unshard(opt[0].trace), float(loss)

    new_s, g_s, loss_s = run(fn, plan, v_scan)
    new_f, g_f, loss_f = run(fn_flat, p_flat, v_flat)
    assert abs(loss_s - loss_f) <= LOSS_ULPS * U * abs(loss_f), (loss_s, loss_f)
    assert_first_sgd_step_close(v_scan["params"], new_s, _stacked(new_f), g_s, _stacked(g_f))


def test_tpu_compiler_gathers_stacks_per_layer():
    """The same on XLA:TPU (v5e:2x4 compile-only devices), read from the dry run's HLO."""
    pytest.importorskip("libtpu", reason='needs libtpu (pip install "tpflax[tpu]")')
    m = zoo.get("llama", scan_layers=True, remat=True, n_layers=LAYERS)
    plan = tpflax.plan(m.abstract_variables(), MESH, fsdp_min_bytes=0)
    mesh = tpflax.make_mesh(MESH, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(m, plan, mesh, TX, 8), plan, mesh, keep_hlo=True)
    # XLA:TPU's while loops carry no trip count the HLO parser reads (a gather in a loop body
    # counts once), so only "per layer, never whole" is checked here
    assert_gathered_per_layer(plan, dr.hlo_text, mesh, min_runs=1)
