"""A U-ViT's root: long-skip projections (2d -> d) beside an output head (d -> p^2 c). The tree guessed
the head a fused [a|b] column of one of the skips, by shape alone (p^2 c = 2 x 2d)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from _util import COMM_XLA

import tpflax

D, B, T = 64, 8, 16
X = (jax.ShapeDtypeStruct((B, T, D), jnp.float32),)


class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(nn.LayerNorm()(x))))


class LongSkips(nn.Module):
    @nn.compact
    def __call__(self, x):
        skips = []
        for i in range(2):
            x = Block(name=f"down_block_{i}")(x)
            skips.append(x)
        for i in range(2):
            x = nn.Dense(D, name=f"up_dense_{i}")(jnp.concatenate([x, skips.pop()], axis=-1))
            x = Block(name=f"up_block_{i}")(x)
        return nn.Dense(4 * D, name="final_proj")(nn.LayerNorm(name="final_norm")(x))  # 8x8 patches of 4 channels


def _loss(out, x):
    return jnp.mean(out ** 2)


def test_tree_does_not_pair_the_head_with_one_of_two_alike_skips():
    # flaxdiff's UViT, tree-only, data=2,model=4: final_proj column "fused by shape" with up_dense_0 as its row
    # (up_dense_1 alike, left whole): the concatenated skip gathered and the head's output gathered, 2.23x the
    # hand layout's collectives
    mesh = {"data": 2, "model": 4}
    v = jax.eval_shape(LongSkips().init, jax.random.key(0), *X)
    plan = tpflax.plan(v, mesh, batch=X)
    d = plan.decisions
    assert d["params/up_dense_0/kernel"].pair is None and d["params/final_proj/kernel"].pair is None
    assert tuple(d["params/up_dense_0/kernel"].spec) == tuple(d["params/up_dense_1/kernel"].spec)
    assert tuple(d["params/down_block_0/up/kernel"].spec) == (None, "model")  # the blocks' MLPs stay Megatron
    # and the step costs no more than the blocks' Megatron with everything else whole
    m = tpflax.make_mesh(mesh)
    hand = tpflax.plan(v, mesh, rules=[(r"up/kernel", jax.sharding.PartitionSpec(None, "model")),
                                       (r"up/bias", jax.sharding.PartitionSpec("model")),
                                       (r"down/kernel", jax.sharding.PartitionSpec("model", None)), (".*", "replicate")])
    comm = {}
    for name, p in (("tree", plan), ("hand", hand)):
        ts = tpflax.make_train_step(LongSkips(), p, m, optax.adamw(1e-3), sample=X, loss=_loss, variables=v)
        comm[name] = tpflax.dry_run(ts, p, m, compiler_options=COMM_XLA).comm_total
    assert comm["tree"] <= comm["hand"] * 1.001, comm
