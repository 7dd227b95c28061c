"""XLA:CPU gathers a bfloat16 parameter split over fsdp as float32: it converts 16-bit operands to float32 around its
collectives (``cost.explicit.cpu_wire``), whether the matmul reads the parameter as bfloat16 or promoted to float32.

Measured on Tunix's Gemma 3 (bfloat16 parameters, ``fsdp=2,tp=4``): ``f32`` all-gathers of every fsdp-split kernel,
where the estimate had priced them at two bytes an element (0.892 of the compiled collectives, 0.984 after).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA

import tpflax

MESH = {"fsdp": 8}
D, F, B = 256, 512, 8


class MLP(nn.Module):
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        dense = lambda n, name: nn.Dense(n, dtype=self.dtype, param_dtype=jnp.bfloat16, name=name)  # noqa: E731
        return dense(D, "down")(nn.relu(dense(F, "up")(x))).astype(jnp.float32)


def _loss(y, x):
    return jnp.mean((y - x) ** 2)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["promoted", "bf16"])
def test_fsdp_gathers_of_bfloat16_kernels_move_float32_on_cpu(devices, dtype):
    m, x = MLP(dtype), jax.ShapeDtypeStruct((B, D), jnp.float32)
    params = jax.eval_shape(m.init, jax.random.key(0), x)
    p = tpflax.plan(params, MESH, rules=[(r"kernel$", "fsdp"), (r".*", "replicate")])
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(x,), loss=_loss, backend="cpu")
    mesh = tpflax.make_mesh(MESH)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(x,), loss=_loss), p, mesh,
                        compiler_options=COMM_XLA)
    kernels = {(D, F), (F, D)}
    compiled = [c for c in dr.collectives if c.kind == "all-gather" and set(c.shapes) <= kernels]
    assert compiled and all(t == "f32" for c in compiled for t in c.dtypes), [(c.shapes, c.dtypes) for c in compiled]
    estimated = [i for i in e.items if i.kind == "all-gather" and i.why.startswith("fsdp")]
    # each kernel gathered once whole, 4 bytes an element: (n - 1) / n of D * F * 4 bytes per kernel
    assert sum(c.ring_bytes * c.count for c in compiled) == sum(i.ring_bytes * i.count for i in estimated) \
        == 2 * 7 / 8 * D * F * 4
