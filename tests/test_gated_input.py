"""A kernel's output gating the input it was computed from (VAN's large-kernel attention, ``u * attn``).

VAN's attention projects its input (``proj_1``), runs depthwise and dilated depthwise convs over it and a 1x1 conv
(``conv1``), multiplies the result with the projected input and projects back (``proj_2``). The trace pairs
``conv1`` with ``proj_2`` through the product, and keeps ``proj_1`` and the depthwise convs whole. The gradient
of the product's other operand is the split ``conv1`` output times the output's gradient, so it comes out split:
``proj_1``'s and the depthwise convs' weight gradients come out split, and XLA:CPU runs their update split and
gathers them back, which the estimate did not count (jax-models' VAN traced, data=2,model=4: 0.869 of the
compiled collectives; 0.976 now). The trace now records kernels whose outputs are multiplied
(``Dataflow.gated``) as meeting (``Dataflow.meets``), and the estimate follows the split there.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _util import COMM_XLA

import tpflax

MESH = {"data": 2, "model": 4}
SAMPLE = (jax.ShapeDtypeStruct((8, 8, 8, 64), jnp.float32),)


class LargeKernelAttention(nn.Module):
    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        u = nn.gelu(nn.Conv(c, (1, 1), name="proj_1")(x))
        a = nn.Conv(c, (5, 5), feature_group_count=c, name="conv0")(u)
        a = nn.Conv(c, (7, 7), feature_group_count=c, kernel_dilation=3, name="conv_spatial")(a)
        a = nn.Conv(c, (1, 1), name="conv1")(a)
        return x + nn.Conv(c, (1, 1), name="proj_2")(u * a)


def _loss(out, x):
    return jnp.mean(out ** 2)


def test_a_split_output_gating_a_whole_input_splits_its_producers_gradients():
    model = LargeKernelAttention()
    variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
    plan = tpflax.plan(variables, MESH, model=model, sample=SAMPLE, batch=SAMPLE)
    specs = {p.split("/")[1]: tuple(d.spec) for p, d in plan.decisions.items() if p.endswith("kernel")}
    assert specs["conv1"] == (None, None, None, "model") and specs["proj_2"] == (None, None, "model", None)
    assert specs["proj_1"] == specs["conv0"] == specs["conv_spatial"] == (None,) * 4
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(model, plan, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, plan, mesh, compiler_options=COMM_XLA)
    est = tpflax.estimate(plan, optax.adamw(1e-3), model=model, sample=SAMPLE, loss=_loss, backend="cpu")
    # proj_1's kernel, (1, 1, 64, 64), whole: XLA:CPU gathers it and its two adam moments back after the split
    # update; the estimate's update gathers of it are those, to the byte
    compiled = sum(c.ring_bytes * c.count for c in dr.collectives
                   if c.kind == "all-gather" and c.shapes == ((1, 1, 64, 64),))
    gathered = sum(i.total for i in est.items if i.source == "params/proj_1/kernel" and i.kind == "all-gather")
    assert compiled == gathered == 3 * 12288, (compiled, gathered)
    # conv0, the depthwise conv reading proj_1's output, likewise (XLA:CPU also runs the depthwise chain on split
    # channels forward and gathers conv1's input, and gathers conv_spatial's update: not modelled, 0.73 of the
    # compiled collectives in all here, 0.98 on jax-models' VAN, where its batch norms and MLP weigh more)
    compiled = sum(c.ring_bytes * c.count for c in dr.collectives
                   if c.kind == "all-gather" and c.shapes == ((5, 5, 1, 64),))
    gathered = sum(i.total for i in est.items if i.source == "params/conv0/kernel" and i.kind == "all-gather")
    assert compiled == gathered > 0, (compiled, gathered)
