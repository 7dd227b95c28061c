"""Plan and train a Hugging Face Flax model (GPT-2) through its apply function.

Runs as written on a laptop: 8 CPU devices are emulated. The model is built from a
tiny config class (nothing is downloaded). Hugging Face's GPT-2 stores its kernels
transposed ``(out, in)`` and fuses q/k/v into one ``c_attn`` kernel, so tpflax reads
the forward pass of ``model(ids, params=params)`` to pair the layers. Without
transformers (or with transformers 5, which dropped Flax) it says so and exits 0.
"""

import os
import sys

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # 8 CPU devices stand in for accelerators
os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

try:
    from transformers import FlaxGPT2LMHeadModel, GPT2Config
except ImportError as e:  # not installed, or transformers >= 5 (no Flax models)
    print(f"skipped: needs transformers with Flax models (pip install 'transformers<5'): {e}")
    sys.exit(0)

import jax
import optax

import tpflax

config = GPT2Config(vocab_size=512, n_positions=64, n_embd=64, n_layer=2, n_head=4)
hf = FlaxGPT2LMHeadModel(config, input_shape=(1, 32), seed=0)   # random weights from the config


def apply(params, ids):                               # the shape tpflax takes: fn(variables, *sample)
    return hf(ids, params=params).logits


ids = jax.random.randint(jax.random.key(1), (8, 32), 0, config.vocab_size)
plan = tpflax.plan(hf.params, {"data": 2, "model": 4}, model=apply, sample=(ids,))
for path in ("transformer/h/0/attn/c_attn/kernel", "transformer/h/0/attn/c_proj/kernel",
             "transformer/h/0/mlp/c_fc/kernel", "transformer/h/0/mlp/c_proj/kernel",
             "transformer/wte/embedding"):
    d = plan.decisions[path]
    print(f"{path:38s} {str(d.shape):11s} {str(d.spec):18s} {d.strategy}")
print("c_attn:", plan.decisions["transformer/h/0/attn/c_attn/kernel"].reason)

mesh = tpflax.make_mesh(plan.mesh)
tx = optax.adamw(3e-3)
ts = tpflax.make_train_step(apply, plan, mesh, tx, sample=(ids,))   # next-token cross-entropy
step = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings,
               donate_argnums=ts.donate_argnums)
params = tpflax.shard(hf.params, plan, mesh)
opt_state = tpflax.shard_optimizer_state(tx, None, plan, mesh)
for i in range(3):
    params, opt_state, loss = step(params, opt_state, (tpflax.shard_batch(ids, mesh),))
    print(f"step {i}  loss {float(loss):.4f}")
