"""Shard and train a model of your own, written in flax.nnx, on a {data: 2, model: 4} mesh.

Runs as written on a laptop: 8 CPU devices are emulated. tpflax plans the module's
state from its forward pass, returns a new module and optimizer whose arrays sit on
the mesh, and an ordinary ``nnx.jit`` step trains them.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # 8 CPU devices stand in for accelerators
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import jax
import optax
from flax import nnx

import tpflax


class MLP(nnx.Module):
    def __init__(self, d_in: int, hidden: int, classes: int, rngs: nnx.Rngs):
        self.up = nnx.Linear(d_in, hidden, rngs=rngs)
        self.down = nnx.Linear(hidden, d_in, rngs=rngs)
        self.norm = nnx.LayerNorm(d_in, rngs=rngs)
        self.head = nnx.Linear(d_in, classes, rngs=rngs)

    def __call__(self, x):
        x = x + self.down(nnx.relu(self.up(self.norm(x))))
        return self.head(x)


model = MLP(64, 512, 16, rngs=nnx.Rngs(0))
x = jax.random.normal(jax.random.key(1), (32, 64))
y = jax.random.randint(jax.random.key(2), (32,), 0, 16)

plan = tpflax.plan(nnx.state(model), {"data": 2, "model": 4}, model=model, sample=(x,))
for path in ("up/kernel", "down/kernel", "head/kernel"):
    print(f"{path}: {plan.decisions[path].spec}  ({plan.decisions[path].strategy})")

mesh = tpflax.make_mesh(plan.mesh)
model = tpflax.shard(model, plan, mesh)                          # a new module on the mesh
opt = tpflax.shard_optimizer_state(nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param),
                                   None, plan, mesh)             # its moments laid out alike


@nnx.jit
def train_step(model, opt, x, y):
    def loss_fn(model):
        return optax.softmax_cross_entropy_with_integer_labels(model(x), y).mean()

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    opt.update(model, grads)
    return loss


x, y = tpflax.shard_batch(x, mesh), tpflax.shard_batch(y, mesh)   # batch over the data axis
for i in range(5):
    print(f"step {i}  loss {float(train_step(model, opt, x, y)):.4f}")
print("up/kernel", model.up.kernel.get_value().sharding.spec,
      "adam mu", opt.opt_state[0].mu["up"]["kernel"].get_value().sharding.spec)
