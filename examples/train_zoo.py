"""Train a built-in model (tpflax.zoo's tiny GPT-2) for a few steps on a {data: 2, model: 4} mesh.

Runs as written on a laptop: 8 CPU devices are emulated. Prints the plan (which
parameter is split how, and why) and the loss of each step.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # 8 CPU devices stand in for accelerators
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import optax

import tpflax
from tpflax import zoo

m = zoo.get("gpt2")                                   # tiny config; "gpt2-small" is the 124M one
plan = tpflax.plan(m.abstract_variables(), {"data": 2, "model": 4}, model=m)   # traced: pairs found
print(tpflax.report(plan))

mesh = tpflax.make_mesh(plan.mesh)
tx = optax.adamw(3e-3)
ts = tpflax.make_train_step(m, plan, mesh, tx, 8)     # the zoo model's own loss, batch 8
step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
               donate_argnums=ts.donate_argnums)

inputs = [jax.numpy.zeros(s.shape, s.dtype) for s in m.sample_inputs(1)]
variables = tpflax.init_sharded(m.module.init, plan, mesh, jax.random.key(0), *inputs)
# init_sharded: each device creates only its own slices, nothing is ever whole on one device
opt_state = tpflax.shard_optimizer_state(tx, None, plan, mesh)
batch = jax.device_put(m.make_batch(0, 8), ts.in_shardings[2])   # one batch, learnt by heart
for i in range(5):
    variables, opt_state, loss = step(variables, opt_state, batch)
    print(f"step {i}  loss {float(loss):.4f}")

kernel = variables["params"]["h_0"]["mlp"]["c_fc"]["kernel"]
print("h_0/mlp/c_fc/kernel", kernel.shape, "split", kernel.sharding.spec,
      "-> each device holds", kernel.addressable_shards[0].data.shape)
