"""An MLP-Mixer's token-mixing MLP, as wide as the model: the tree reads it backwards, the trace does not.

The token-mixing MLP runs over the token axis (a swapaxes before and after it):
its kernels are ``(tokens, tokens_mlp)`` and ``(tokens_mlp, tokens)``. When
``tokens_mlp`` equals the model width, the tree's widths say the first kernel
"narrows back to the residual width" (a row) and the second "widens it" (a
column): the pair turned around. A plan forced by rules gets its pairs from
that reading, so ``estimate(plan, model=...)`` priced a hand Megatron layout's
all-reduces at the wrong width (+45% at tokens 64, width 128; the compiled step
matches the traced plan's estimate to 4 bytes). With ``model=``, the trace's
pair replaces the tree's for forced leaves it places whole.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import tpflax

S = jax.ShapeDtypeStruct
MESH = {"data": 2, "model": 4}
TOKENS, HIDDEN, TOKENS_MLP, CHANNELS_MLP = 16, 32, 32, 64  # tokens_mlp == hidden: the ambiguous widths


class MlpBlock(nn.Module):
    mlp_dim: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.mlp_dim)(x))
        return nn.Dense(x.shape[-1])(y)


class Mixer(nn.Module):
    """big_vision's MLP-Mixer, two blocks: patch conv, token mixing over swapped axes, channel mixing, head."""

    @nn.compact
    def __call__(self, images):
        x = nn.Conv(HIDDEN, (4, 4), strides=(4, 4), name="stem")(images)
        x = x.reshape(x.shape[0], -1, HIDDEN)
        for i in range(2):
            y = jnp.swapaxes(nn.LayerNorm()(x), 1, 2)
            x = x + jnp.swapaxes(MlpBlock(TOKENS_MLP, name=f"token_mixing_{i}")(y), 1, 2)
            x = x + MlpBlock(CHANNELS_MLP, name=f"channel_mixing_{i}")(nn.LayerNorm()(x))
        return nn.Dense(10, name="head")(nn.LayerNorm()(x).mean(axis=1))


SAMPLE = (S((8, 16, 16, 3), jnp.float32),)  # 16x16 images, patch 4: 16 tokens
HAND = [(r"Dense_0/kernel$", P(None, "model")), (r"Dense_0/bias$", P("model")),
        (r"Dense_1/kernel$", P("model", None)), (r".*", "replicate")]


def _loss(out, images):
    return jnp.mean(out ** 2)


def test_hand_layout_estimate_follows_the_trace_not_the_tree():
    model = Mixer()
    variables = jax.eval_shape(model.init, jax.random.key(0), *SAMPLE)
    traced = tpflax.plan(variables, MESH, model=model, sample=SAMPLE)
    hand = tpflax.plan(variables, MESH, rules=HAND)
    # the planner with the trace chooses the hand layout: Megatron column -> row in both MLPs
    assert {p: tuple(d.spec) for p, d in traced.decisions.items()} == {p: tuple(d.spec) for p, d in hand.decisions.items()}
    est = [tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=SAMPLE, loss=_loss, backend="cpu")
           for p in (traced, hand)]
    # same specs, same model: the same collectives, to the byte
    assert est[1].comm == est[0].comm
    # the token-mixing row sums (batch 4 per device) x hidden 32 x tokens 16 floats, not x 32
    rows = [i for i in est[1].items if "token_mixing" in i.why and "partial outputs" in i.why]
    assert rows and all(i.size == 4 * HIDDEN * TOKENS * 4 for i in rows)


def test_tree_reads_the_token_mlp_by_linen_numbering():
    """Tree only: the norms' width (32) says the token MLP narrows (32 -> 16); linen's numbering says it widens
    (16 -> 32), as MLPs do: the numbering wins, so the tree plan is the hand layout (it was row -> column)."""
    variables = jax.eval_shape(Mixer().init, jax.random.key(0), *SAMPLE)
    tree = tpflax.plan(variables, MESH)
    hand = tpflax.plan(variables, MESH, rules=HAND)
    got = {p: tuple(d.spec) for p, d in tree.decisions.items() if "mixing" in p}
    assert got == {p: tuple(d.spec) for p, d in hand.decisions.items() if "mixing" in p}
    assert tree.decisions["params/token_mixing_0/Dense_0/kernel"].role == "column"


def test_nested_dense_still_reads_by_widths():
    """``nn.Dense(d)(gelu(nn.Dense(4 * d)(x)))`` creates the outer (row) layer first: the numbering is wrong
    there, and the widths' reading widens, so the widths still decide."""

    class Nested(nn.Module):
        @nn.compact
        def __call__(self, x):
            for _ in range(2):
                x = x + nn.Dense(32)(nn.gelu(nn.Dense(128)(nn.LayerNorm()(x))))
            return x

    variables = jax.eval_shape(Nested().init, jax.random.key(0), S((8, 16, 32), jnp.float32))
    d = tpflax.plan(variables, MESH).decisions
    assert d["params/Dense_0/kernel"].shape == (128, 32) and d["params/Dense_0/kernel"].role == "row"
    assert d["params/Dense_1/kernel"].role == "column"
