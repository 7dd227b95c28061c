"""Shard and train a model of your own, written in flax.linen, on a {data: 2, model: 4} mesh.

Runs as written on a laptop: 8 CPU devices are emulated. The layers have meaningless
names (dense_0, dense_1, ...) and one kernel is stored transposed, so names and shapes
alone would not tell which layers pair up; passing the model lets tpflax trace it.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # 8 CPU devices stand in for accelerators
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import tpflax


class Block(nn.Module):
    width: int

    @nn.compact
    def __call__(self, h):
        x = nn.LayerNorm(name="norm")(h)
        x = nn.gelu(nn.Dense(4 * self.width, name="dense_0")(x))
        w_out = self.param("dense_1", nn.initializers.lecun_normal(), (self.width, 4 * self.width))
        return h + x @ w_out.T                        # stored (out, in), applied transposed


class MyLM(nn.Module):
    vocab: int = 512
    width: int = 64
    depth: int = 2

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.width, name="tok")(ids)
        for i in range(self.depth):
            h = Block(self.width, name=f"layer_{i}")(h)
        return nn.Dense(self.vocab, use_bias=False, name="out")(nn.LayerNorm(name="norm")(h))


model = MyLM()
ids = jax.random.randint(jax.random.key(1), (8, 32), 0, 512)
sample = (jax.ShapeDtypeStruct(ids.shape, ids.dtype),)       # shapes are enough to plan
abstract = jax.eval_shape(model.init, jax.random.key(0), *sample)
plan = tpflax.plan(abstract, {"data": 2, "model": 4}, model=model, sample=sample)
for path in ("params/layer_0/dense_0/kernel", "params/layer_0/dense_1"):
    d = plan.decisions[path]
    print(f"{path}: {d.spec}  {d.reason}")

mesh = tpflax.make_mesh(plan.mesh)
tx = optax.adamw(3e-3)
ts = tpflax.make_train_step(model, plan, mesh, tx, sample=(ids,))   # next-token cross-entropy
step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
               donate_argnums=ts.donate_argnums)
variables = tpflax.init_sharded(model.init, plan, mesh, jax.random.key(0), jnp.zeros_like(ids))
opt_state = tpflax.shard_optimizer_state(tx, None, plan, mesh)
for i in range(5):
    variables, opt_state, loss = step(variables, opt_state, (tpflax.shard_batch(ids, mesh),))
    print(f"step {i}  loss {float(loss):.4f}")
