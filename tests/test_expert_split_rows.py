"""An expert MLP split over the tensor axis on its experts dim, written as einsums over stacked kernels.

``y = einsum('btef,efd->bted', h, wo)`` batches over the experts ``e``: split on ``e``, each device's
outputs are whole for its experts, and only the weighted sum over ``e`` (``'bted,bte->btd'``, a product of
two activations) is summed. The estimate priced ``wo`` as a row summing its partial outputs too: 1.66x the
compiled collectives here; mixtral's traced plan in ``benchmarks/results/probe_maxtext.md`` (its experts
split over ``tensor``) was 1.16x.
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

D, F, E, B, T = 64, 256, 8, 8, 16
MESH = {"data": 2, "model": 4}


class DenseMoe(nn.Module):
    @nn.compact
    def __call__(self, x):
        init = nn.initializers.lecun_normal()
        gate = self.param("gate", init, (D, E))
        wi = self.param("wi", init, (E, D, F))
        wo = self.param("wo", init, (E, F, D))
        h = jax.nn.silu(jnp.einsum("btd,edf->btef", x, wi))
        return x + jnp.einsum("bted,bte->btd", jnp.einsum("btef,efd->bted", h, wo), jax.nn.softmax(x @ gate))


def estimated(m, rules):
    """(estimate, compiled collective bytes) of the linen module ``m``'s adamw step, planned with ``rules``."""
    x = jax.ShapeDtypeStruct((B, T, D), jnp.float32)
    params = jax.eval_shape(m.init, jax.random.key(0), x)

    def fn(v, x):
        return m.apply(v, x)

    def loss(y, x):
        return jnp.mean(y ** 2)

    p = tpflax.plan(params, MESH, model=fn, sample=(x,), batch=(x,), rules=rules)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=(x,), loss=loss, backend="cpu")
    mesh = tpflax.make_mesh(MESH)
    dr = tpflax.dry_run(tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss), p, mesh,
                        compiler_options=COMM_XLA)
    return e, dr.comm_total


def _remat_stack(scan: bool = False):
    """Two rematerialised layers of an expert MLP, the stream constrained on its features over model (MaxText's
    ``activation_embed``); ``scan``: under ``nn.scan``, as MaxText's mixtral runs its dense experts."""
    mesh = tpflax.make_mesh(MESH)

    class Layer(nn.Module):
        @nn.compact
        def __call__(self, x, _=None):
            x = jax.lax.with_sharding_constraint(x, jax.sharding.NamedSharding(mesh, P("data", None, "model")))
            h0 = nn.LayerNorm(use_bias=False)(x)
            init = nn.initializers.lecun_normal()
            gate = self.param("gate", init, (D, E))
            wi = self.param("wi", init, (E, D, F))
            wo = self.param("wo", init, (E, F, D))
            h = jax.nn.silu(jnp.einsum("btd,edf->btef", h0, wi))
            y = x + jnp.einsum("bted,bte->btd", jnp.einsum("btef,efd->bted", h, wo), jax.nn.softmax(h0 @ gate))
            return (y, None) if scan else y

    class Stack(nn.Module):
        @nn.compact
        def __call__(self, x):
            if scan:
                return nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True},
                               length=2)(name="layers")(x, None)[0]
            for i in range(2):
                x = nn.remat(Layer)(name=f"l{i}")(x)
            return x

    return Stack()


def test_a_row_split_on_the_experts_it_batches_over_sums_nothing(devices):
    e, compiled = estimated(DenseMoe(), [("wi", P("model", None, None)), ("wo", P("model", None, None))])
    assert not [i for i in e.items if "sum partial outputs" in i.why]
    # compiled: the weighted sum's f32[4,16,64] over model and the gradients over data; measured 0.986 (the
    # softmax's row statistics, a few hundred bytes, and the gate's update gathers are not priced)
    assert abs(e.comm_total / compiled - 1) < 0.05


def test_a_hidden_split_expert_row_sums_again_in_the_remat_and_gathers_its_output_gradient(devices):
    """Split on each expert's hidden dim (MaxText's layout), ``wo`` is a row whose per-expert outputs are weighted
    by the router: the product's backward reads them, so a remat recompute sums them again; and under a stream
    constrained on its features their gradient arrives split and is gathered. Neither was priced (0.62 of the
    compiled collectives here; MaxText's mixtral, 0.77-0.81)."""
    e, compiled = estimated(_remat_stack(), [("wi", P(None, None, "model")), ("wo", P(None, "model", None))])
    whys = {i.why for i in e.items}
    assert "row params/l*/wo: sum partial outputs (forward, again in the remat recompute)" in whys
    assert "row params/l*/wo: gather the output gradient the split stream splits on its features (backward)" in whys
    # measured 0.982: the router's and the norm's row statistics and the gate's update gathers are not priced
    assert abs(e.comm_total / compiled - 1) < 0.05


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scan"])
def test_expert_kernels_kept_whole_against_a_split_stream_sum_their_outputs_again_in_the_remat(devices, scan):
    """Replicated, the experts' kernels meet the constrained stream: ``wi`` contracts it split, gathering it
    (unrolled) or summing its per-expert partial outputs (scanned: a sliced copy), and the remat recompute sums
    them (the silu's backward reads them); ``wo``'s input gradient, its output's gradient split by the stream,
    is summed (backward). ``wo``'s matmul batches over the experts, which kept it out of the estimate's whole
    kernels; the recompute was not priced either (0.65 unrolled, 0.68 scanned of the compiled collectives here;
    MaxText's mixtral replicated and pure FSDP, 0.60-0.72)."""
    e, compiled = estimated(_remat_stack(scan), [(".*", "replicate")])
    wi, wo = ("params/layers/wi", "params/layers/wo") if scan else ("params/l*/wi", "params/l*/wo")
    whys = {(i.source, i.why) for i in e.items}
    recompute = ("sum its partial outputs (forward), again in the remat recompute" if scan
                 else "sum its partial outputs in the remat recompute (forward)")
    assert (wi, f"a whole kernel contracting split features: {recompute}") in whys
    assert (wo, "a whole kernel whose output is read split: sum its partial input gradients (backward)") in whys
    # measured 0.999 both: the router's and the norm's row statistics are not priced
    assert abs(e.comm_total / compiled - 1) < 0.02
