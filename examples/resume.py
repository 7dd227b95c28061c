"""Save a TrainState on one mesh, restore it onto another, and resume with the same losses.

Runs as written on a laptop: 8 CPU devices are emulated. Training 6 steps straight
on {data: 2, model: 4} gives the same losses as 3 steps there, a checkpoint, and 3
more steps after restoring onto {data: 4, model: 2}.
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # 8 CPU devices stand in for accelerators
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

import tempfile

import flax.linen as nn
import jax
import numpy as np
import optax
from flax.training import train_state

import tpflax


class TinyLM(nn.Module):
    vocab: int = 256
    width: int = 64

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(self.vocab, self.width, name="embed")(ids)
        up = nn.Dense(4 * self.width, use_bias=False, name="up")(nn.LayerNorm(name="norm")(h))
        h = h + nn.Dense(self.width, use_bias=False, name="down")(nn.gelu(up))
        return nn.Dense(self.vocab, use_bias=False, name="head")(h)


model, tx = TinyLM(), optax.adamw(1e-2)
ids = jax.random.randint(jax.random.key(1), (8, 16), 0, 256)           # one fixed batch
params = model.init(jax.random.key(0), ids)["params"]


def loss_fn(p, batch):
    logits = model.apply({"params": p}, batch)[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def train_step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, batch)
    return state.apply_gradients(grads=grads), loss


def trainer(mesh_shape):
    """The plan, the mesh and a jitted step whose TrainState is laid out for ``mesh_shape``."""
    plan = tpflax.plan(params, mesh_shape, model=model, sample=(ids,))
    mesh = tpflax.make_mesh(mesh_shape)
    abstract = jax.eval_shape(lambda: train_state.TrainState.create(
        apply_fn=model.apply, params=params, tx=tx))
    state_sh = tpflax.train_state_shardings(abstract, plan, mesh)   # params per plan, moments alike
    step = jax.jit(train_step, in_shardings=(state_sh, tpflax.batch_sharding(mesh)),
                   out_shardings=(state_sh, None), donate_argnums=0)
    return plan, mesh, abstract, state_sh, step


def fresh_state(plan, mesh):
    state = train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)
    return tpflax.shard_train_state(state, plan, mesh)


def run(state, step, mesh, n):
    losses = []
    for _ in range(n):
        state, loss = step(state, tpflax.shard_batch(ids, mesh))
        losses.append(float(loss))
    return state, losses


# 1. Six steps straight on {data: 2, model: 4}.
plan_a, mesh_a, abstract, _, step_a = trainer({"data": 2, "model": 4})
_, straight = run(fresh_state(plan_a, mesh_a), step_a, mesh_a, 6)

# 2. Three steps, save as step 3 of a CheckpointManager directory (keep the newest 2).
state, first = run(fresh_state(plan_a, mesh_a), step_a, mesh_a, 3)
root = os.path.join(tempfile.mkdtemp(), "run")
tpflax.save_checkpoint(root, state, step=int(state.step), keep=2, plan=plan_a)

# 3. A new job on another mesh: restore the latest step straight into its layout, go on.
plan_b, mesh_b, abstract, state_sh_b, step_b = trainer({"data": 4, "model": 2})
state = tpflax.restore_checkpoint(root, like=abstract, shardings=state_sh_b)  # latest step: 3
print("restored step", int(state.step), "onto", dict(mesh_b.shape),
      "up/kernel:", state.params["up"]["kernel"].sharding.spec,
      "its adam mu:", state.opt_state[0].mu["up"]["kernel"].sharding.spec)
_, rest = run(state, step_b, mesh_b, 3)

print("straight      ", " ".join(f"{x:.6f}" for x in straight))
print("saved+resumed ", " ".join(f"{x:.6f}" for x in first + rest))
# Another mesh splits the matmuls' sums differently, so float32 rounding differs in the
# last bits (about 1e-7 relative per reduction); on the same mesh the losses are bit-exact.
np.testing.assert_allclose(first + rest, straight, rtol=1e-5)
print("loss after resume matches the uninterrupted run")
