"""Experts run as ``jax.lax.ragged_dot`` inside a ``jax.shard_map``, as EasyDeL's (and MaxText's, off TPU) are.

The tokens come sorted by expert, each run of rows contracting its expert's slice of an ``(experts, d, f)``
kernel; the body takes the kernels as its in_specs lay them out and reduce-scatters the partial outputs by hand.
The trace did not know ``ragged_dot_general``, so the experts had no uses and were planned from names alone
(here: each expert's hidden dim split, whatever the in_specs say). Traced as batched dots, a layout other than
the in_specs' would be resharded into them at every call (EasyDeL's Mixtral, its experts split on the experts
dim by cost: 2.1x the collectives of its own layout); the plan now takes the in_specs'. The estimate priced the
pair's sums as XLA would insert them, beside the body's own: 1.11x the compiled collectives on EasyDeL's
Mixtral (``benchmarks/results/probe_easydel.md``); the body's input gradient, which the shard_map's transpose
sums once, is now its columns' one sum.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA
from jax.sharding import PartitionSpec as P

import tpflax

V, D, F, E, B, T = 128, 64, 256, 8, 8, 16
MESH = {"data": 2, "model": 4}


def make(mesh, w1_spec, w2_spec, remat=False, batch="data"):
    def body(x, w1, w2):
        sizes = jnp.full((w1.shape[0],), x.shape[0] // w1.shape[0], jnp.int32)  # this shard's rows, by expert
        y = jax.lax.ragged_dot(jax.nn.silu(jax.lax.ragged_dot(x, w1, sizes)), w2, sizes)
        return jax.lax.psum_scatter(y, "model", scatter_dimension=1, tiled=True)

    experts = jax.shard_map(body, mesh=mesh, in_specs=(P(batch, None), w1_spec, w2_spec),
                            out_specs=P(batch, "model"))
    if remat:  # the backward runs the body again, its reduce-scatter too
        experts = jax.checkpoint(experts)

    def stream(x):  # EasyDeL's hidden states, split on their features over the tensor axis
        return jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, P(batch, None, "model")))

    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = stream(nn.Embed(V, D, name="embed")(ids))
            init = nn.initializers.lecun_normal()
            w1, w2 = self.param("w1", init, (E, D, F)), self.param("w2", init, (E, F, D))
            h = nn.RMSNorm(name="norm")(x)
            x = stream(x + experts(h.reshape(-1, D), w1, w2).reshape(x.shape))
            return nn.Dense(V, use_bias=False, name="head")(nn.RMSNorm(name="final")(x))

    return LM()


def loss(logits, ids):
    return -jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1).mean()


# each expert's hidden dim split (EasyDeL's layout), or the experts split (expert parallelism, as written here
# without its all-to-all: the layout is what is checked)
LAYOUTS = {"hidden": (P(None, None, "model"), P(None, "model", None)), "experts": (P("model", None, None),) * 2}


@pytest.mark.parametrize("remat", [False, True], ids=["", "remat"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_ragged_experts_take_the_shard_maps_layout_and_its_collectives(devices, layout, remat):
    mesh = tpflax.make_mesh(MESH)
    m, ids = make(mesh, *LAYOUTS[layout], remat), jax.ShapeDtypeStruct((B, T), jnp.int32)
    params = jax.eval_shape(m.init, jax.random.key(0), ids)

    def fn(v, ids):
        return m.apply(v, ids)

    p = tpflax.plan(params, MESH, model=fn, sample=(ids,), batch=(ids,))
    for path, spec in zip(("params/w1", "params/w2"), LAYOUTS[layout], strict=True):
        d = p.decisions[path]
        assert d.spec == spec and d.source == "trace", (path, d.spec, d.reason)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=(ids,), loss=loss, backend="cpu")
    whys = " | ".join(i.why for i in e.items)
    assert "reduce_scatter inside shard_map, as written" in whys
    assert [i.count for i in e.items if i.source == "reduce_scatter"] == [1 + remat]
    assert "params/w2: sum partial outputs" not in whys  # the body's psum_scatter is that sum
    dr = tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=loss), p, mesh,
                        compiler_options=COMM_XLA)
    # measured 0.996 both layouts, 1.028 under remat (before: hidden 0.95, the experts' input gradient summed at
    # half its rows; experts split as the in_specs do 0.93, no input-gradient sum priced)
    assert abs(e.comm_total / dr.comm_total - 1) < 0.05, e.comm_total / dr.comm_total


def test_a_shard_maps_layout_keeps_the_plans_fsdp_split_of_the_dims_it_leaves_whole(devices):
    """The in_specs split the experts over ``model`` and leave the rest whole: the plan's fsdp split of another dim
    stays (XLA gathers it at the body's boundary, as for any compute). MaxText's sparse experts, whose in_specs name
    no fsdp axis, lost it: 1.47x the bytes per device of MaxText's layout."""
    shape = {"fsdp": 2, "model": 4}
    m, ids = make(tpflax.make_mesh(shape), *LAYOUTS["experts"], batch="fsdp"), jax.ShapeDtypeStruct((B, T), jnp.int32)
    params = jax.eval_shape(m.init, jax.random.key(0), ids)
    p = tpflax.plan(params, shape, model=lambda v, ids: m.apply(v, ids), sample=(ids,), batch=(ids,))
    for path in ("params/w1", "params/w2"):
        spec = tuple(p.decisions[path].spec)
        assert spec[0] == "model" and "fsdp" in spec[1:], (path, spec)
