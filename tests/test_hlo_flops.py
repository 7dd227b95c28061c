"""Matmul flops read from compiled HLO, loop bodies once per iteration (``tpflax.hlo.dot_flops``, ``DryRun.flops``).

XLA's ``cost_analysis()`` counts a ``while`` body once, so before ``DryRun.flops``
added the further iterations a scanned layer stack read as one layer. Every
program here is really compiled on the 8-device CPU mesh.
"""

import functools

import jax
import jax.numpy as jnp
import optax
import pytest
from _util import FAST_XLA
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import zoo
from tpflax.hlo import dot_flops

L, B, D = 4, 64, 64  # layers, batch (8 rows per device on data=8), width
DOT = 2 * B * D * D  # one layer's forward matmul on the whole batch


def _scanned(ws, x):
    return jax.lax.scan(lambda h, w: (jnp.tanh(h @ w), None), x, ws)[0].sum()


def _unrolled(ws, x):
    for i in range(L):
        x = jnp.tanh(x @ ws[i])
    return x.sum()


def _grad(f):
    # gradients of both arguments: the unrolled program then computes every layer's
    # input gradient too, as the scan does, so both run the same 3 L matmuls
    return jax.grad(f, argnums=(0, 1))


ARGS = (jax.ShapeDtypeStruct((L, D, D), jnp.float32), jax.ShapeDtypeStruct((B, D), jnp.float32))


@functools.cache
def _text(fn):
    return jax.jit(fn).lower(*ARGS).compile().as_text()


@pytest.mark.parametrize("wrap, matmuls", [(lambda f: f, 1), (_grad, 3)], ids=["forward", "grad"])
def test_scan_counts_every_layer_exactly_like_the_unrolled_program(wrap, matmuls):
    scanned, unrolled = _text(wrap(_scanned)), _text(wrap(_unrolled))
    assert "while(" in scanned and "while(" not in unrolled
    assert dot_flops(scanned) == dot_flops(unrolled) == matmuls * L * DOT
    # what XLA's cost analysis sees: the loop body once
    assert dot_flops(scanned, loops=False) == matmuls * DOT
    assert dot_flops(unrolled, loops=False) == dot_flops(unrolled)


@functools.cache
def _dry(fn):
    """``tpflax.dry_run`` of ``fn`` (batch over data=8, weights replicated), and XLA's own cost analysis."""
    variables = {"params": {"w": ARGS[0]}}
    p = tpflax.plan(variables, {"data": 8})
    mesh = tpflax.make_mesh(p.mesh)
    shardings = ({"params": {"w": NamedSharding(mesh, P())}}, NamedSharding(mesh, P("data")))

    def step(v, x):
        return fn(v["params"]["w"], x)

    dr = tpflax.dry_run(step, p, mesh, (variables, ARGS[1]), in_shardings=shardings, keep_hlo=True)
    compiled = jax.jit(step, in_shardings=shardings).lower(variables, ARGS[1]).compile()
    return dr, compiled.cost_analysis()["flops"]


@pytest.mark.parametrize("wrap", [lambda f: f, _grad], ids=["forward", "grad"])
def test_dry_run_flops_of_a_scan_match_the_unrolled_layers(wrap):
    (scan, scan_xla), (unrolled, unrolled_xla) = _dry(wrap(_scanned)), _dry(wrap(_unrolled))
    per_device_dots = dot_flops(unrolled.hlo_text)
    assert dot_flops(scan.hlo_text) == per_device_dots
    # (b) a program without loops: exactly XLA's cost analysis
    assert unrolled.flops == unrolled_xla
    # the scan adds exactly its dots' further iterations to XLA's figure
    assert scan.flops == scan_xla + dot_flops(scan.hlo_text) - dot_flops(scan.hlo_text, loops=False)
    assert scan_xla < 0.5 * unrolled_xla  # before: the loop body counted once
    # Dots are exact; the loop body's elementwise ops (tanh and its derivative: O(B D)
    # per layer against the dots' O(B D^2)) stay counted once. So the two differ by at
    # most the unrolled program's non-dot flops.
    assert abs(scan.flops - unrolled.flops) <= unrolled.flops - per_device_dots


def _conv(x, k, groups, padding):
    return jax.lax.conv_general_dilated(x, k, (1, 1), padding, dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                        feature_group_count=groups).sum()


# (output position, kernel tap) pairs reading real input over a 10x10 image and a 3x3
# kernel: VALID 8 outputs x 3 taps per dim; SAME 10 x 3 less the 2 taps in the padding
TAPS = {"VALID": (8 * 3) ** 2, "SAME": (10 * 3 - 2) ** 2}


@pytest.mark.parametrize("groups, padding", [(1, "VALID"), (1, "SAME"), (4, "SAME")])
def test_convolutions_count_like_xla_with_padding_groups_and_backward(groups, padding):
    x = jax.ShapeDtypeStruct((2, 10, 10, 8), jnp.float32)
    k = jax.ShapeDtypeStruct((3, 3, 8 // groups, 16), jnp.float32)
    fn = functools.partial(_conv, groups=groups, padding=padding)
    forward = jax.jit(fn).lower(x, k).compile().as_text()
    assert dot_flops(forward) == 2 * 2 * 16 * (8 // groups) * TAPS[padding]  # batch, out and in features
    # the backward convolutions are padded (input gradient) and lhs-dilated (grouped
    # kernel gradient); XLA counts only taps on real input, and so must we. Its figure
    # also holds the few non-convolution flops (the broadcast gradient of the sum).
    compiled = jax.jit(jax.grad(fn, argnums=(0, 1))).lower(x, k).compile()
    backward = compiled.as_text()
    assert "convolution(" in backward and "dot(" not in backward
    assert 0 <= compiled.cost_analysis()["flops"] - dot_flops(backward) <= 2 * 10 * 10 * 16


@functools.cache
def _llama(scan, target=None):
    """The zoo's tiny Llama (2 layers, remat) stepped with sgd on data=8, compiled by ``tpflax.dry_run``."""
    m = zoo.get("llama", scan_layers=scan, remat=True)
    v = m.abstract_variables()
    p = tpflax.plan(v, {"data": 8})
    mesh = tpflax.make_mesh(p.mesh, target=target)
    # on XLA:CPU without LLVM's optimisations (FAST_XLA): the same HLO passes, so the same dots and flops
    return tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), 8, variables=v), p, mesh,
                          keep_hlo=True, compiler_options=None if target else FAST_XLA)


@pytest.mark.slow
def test_zoo_llama_scan_counts_its_layers_through_dry_run():
    """(c) the zoo's scanned Llama against the same layers unscanned."""
    scan, unrolled = _llama(True), _llama(False)
    assert dot_flops(scan.hlo_text) == dot_flops(unrolled.hlo_text)
    assert dot_flops(scan.hlo_text, loops=False) < dot_flops(scan.hlo_text)
    # measured: 1.7% apart (the scan's per-layer norms, rotary and softmax counted once);
    # 5% bounds what 2 layers' elementwise work can add to an 8-device step
    assert scan.flops == pytest.approx(unrolled.flops, rel=0.05)


@pytest.mark.slow
def test_tpu_compiled_scan_reads_the_same_matmuls():
    """XLA:TPU drops ``known_trip_count`` and writes dots as convolutions inside fusions."""
    pytest.importorskip("libtpu", reason="libtpu is not installed: pip install 'tpflax[tpu]'")
    tpu = _llama(True, "tpu-v5e:2x4")
    assert tpu.platform == "tpu"
    assert dot_flops(tpu.hlo_text) == dot_flops(_llama(False).hlo_text)
    assert tpu.flops == pytest.approx(_llama(False).flops, rel=0.05)  # measured 0.5% (TPU vs CPU elementwise)
