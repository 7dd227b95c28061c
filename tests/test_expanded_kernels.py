"""A parameter a model expands into a larger kernel before its matmul, and the batch sum of its gradient.

NetKet's group-equivariant networks build their kernels from smaller parameters: ``DenseSymm`` looks its
``(features, in, sites)`` kernel up at the symmetry group's constant site permutations (``jnp.take``, one
``(features, in, group, sites)`` kernel), and its equivariant layers contract theirs with the group's irreps
(constants). The matmul's weight gradient sums over the batch, so XLA all-reduces it where the matmul makes it,
at the expanded kernel's size, before the transpose of the op that made it (a scatter-add, a product with the
constants) brings it back to the parameter's size. The estimate summed the parameter's gradient: 0.17-0.24 of
GCNN's compiled collectives (``benchmarks/results/probe_netket.md``). Measured on XLA:CPU.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import FAST_XLA

import tpflax

MESH = {"data": 2, "model": 4}
B, C, N, F, G = 16, 4, 32, 8, 24
PERMS = np.stack([np.roll(np.arange(N), g) for g in range(G)])  # G translations of N sites: a constant table
IRREPS = np.linspace(-1.0, 1.0, G * 3 * G).reshape(G, 3 * G).astype(np.float32)  # G -> 3G, constants


class Expanded(nn.Module):
    """A layer whose kernel is looked up at constant permutations, then one whose kernel is multiplied by constants,
    each contracted with the batch; ``plain``: the same products with kernels stored at the expanded size."""

    plain: bool = False

    @nn.compact
    def __call__(self, x):
        if self.plain:
            k1 = self.param("k1", nn.initializers.lecun_normal(), (F, C, G, N))
        else:
            k1 = jnp.take(self.param("k1", nn.initializers.lecun_normal(), (F, C, N)), jnp.asarray(PERMS), axis=2)
        h = jnp.tanh(jax.lax.dot_general(x, k1, (((1, 2), (1, 3)), ((), ()))))  # (B, F, G)
        if self.plain:
            k2 = self.param("k2", nn.initializers.lecun_normal(), (F, F, 3 * G))
        else:
            k2 = self.param("k2", nn.initializers.lecun_normal(), (F, F, G)) @ jnp.asarray(IRREPS)  # (F, F, 3G)
        y = jnp.einsum("bfg,ofgh->boh", h, k2.reshape(F, F, G, 3))
        # the activations and k3 taken to the irreps' space and contracted there, batched over its 3G dims: a
        # batch dim no parameter dim makes that is not the examples' (GCNN's equivariant layers)
        if self.plain:
            k3 = self.param("k3", nn.initializers.lecun_normal(), (3 * G, F, F))
        else:
            k3 = jnp.einsum("ofg,gk->kof", self.param("k3", nn.initializers.lecun_normal(), (F, F, G)),
                            jnp.asarray(IRREPS))
        z = jnp.einsum("kbf,kof->bo", jnp.einsum("bfg,gk->kbf", h, jnp.asarray(IRREPS)), k3)
        return y.sum(axis=(1, 2)) + z.sum(axis=1)


def _loss(y, x):
    return jnp.mean(y ** 2)


def measured(m: nn.Module):
    """(estimate, dry run) of ``m``'s adamw step under a replicated plan: every collective is a batch sum."""
    x = jax.ShapeDtypeStruct((B, C, N), jnp.float32)
    params = jax.eval_shape(m.init, jax.random.key(0), x)
    p = tpflax.plan(params, MESH, rules=[(r".*", "replicate")])
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(x,), loss=_loss, backend="cpu")
    mesh = tpflax.make_mesh(MESH)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(x,), loss=_loss), p, mesh,
                        compiler_options=FAST_XLA)
    return e, dr


@pytest.mark.parametrize("plain", [False, True], ids=["expanded", "stored"])
def test_the_batch_sum_of_an_expanded_kernels_gradient_runs_at_its_expanded_size(devices, plain):
    # k1 (8, 4, 32) looked up at 24 constant permutations: f32[8,4,24,32] summed, 24x the parameter; k2 (8, 8, 24)
    # times a constant (24, 72): f32[8,8,72], 3x; k3 likewise, read batched over the 72: f32[72,8,8]. Stored at
    # those sizes (``plain``), the same sums: the compiled collectives are the same either way. Before, the estimate
    # summed the parameters' own gradients, 0.121 of the compiled collectives for the expanded kernels
    e, dr = measured(Expanded(plain=plain))
    assert {c.kind for c in dr.collectives} == {"all-reduce"}
    # one ring over data=2 moves each float32 gradient once; the loss's float32 scalar (4 B) is not priced
    assert e.comm_total == dr.comm_total - 4 == (F * C * G * N + 2 * F * F * 3 * G) * 4, (e.items, dr.collectives)


class Latents(nn.Module):
    """Learned latents broadcast over the batch and read by a batched matmul (a Perceiver's cross-attention): the
    kernel the matmul reads is larger than the parameter by the batch, which is split, not summed."""

    @nn.compact
    def __call__(self, x):
        lat = jnp.broadcast_to(self.param("lat", nn.initializers.normal(), (8, N)), (x.shape[0], 8, N))
        return jnp.einsum("bnd,bcd->bnc", lat, x).sum(axis=(1, 2))


def test_a_parameter_broadcast_over_the_batch_is_summed_at_its_own_size(devices):
    # the broadcast kernel's batch dim is the batch's split: XLA sums the parameter's own gradient, 8 x 32 floats
    e, dr = measured(Latents())
    assert e.comm_total == dr.comm_total - 4 == 8 * N * 4, (e.items, dr.collectives)
