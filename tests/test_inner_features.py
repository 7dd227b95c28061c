"""Tree-only: parameters inside a split pair's block that act on its inner features follow the split.

Griffin's recurrence block (``linear_x``/``linear_y`` columns, ``linear_out`` their row) holds a depthwise
temporal conv ``(taps, F)``, per-feature decays ``(F,)`` and block-diagonal gates ``(heads, F/h, F/h)``
between them. Left whole beside the split features, XLA gathers their gradients every step.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from jax.sharding import PartitionSpec as P

import tpflax


class BlockDiagonal(nn.Module):
    heads: int

    @nn.compact
    def __call__(self, x):
        *lead, width = x.shape
        n = width // self.heads
        w = self.param("w", nn.initializers.normal(0.02), (self.heads, n, n))
        b = self.param("b", nn.initializers.zeros, (self.heads, n))
        y = jnp.einsum("...hi,hij->...hj", x.reshape(*lead, self.heads, n), w) + b
        return y.reshape(*lead, width)


class Recurrence(nn.Module):
    width: int
    heads: int = 4

    @nn.compact
    def __call__(self, x):
        a_param = self.param("a_param", nn.initializers.ones, (self.width,))
        gate_x = nn.sigmoid(BlockDiagonal(self.heads, name="input_gate")(x))
        gate_a = nn.sigmoid(BlockDiagonal(self.heads, name="a_gate")(x))
        a = jnp.exp(-8.0 * gate_a * nn.softplus(a_param))
        h = jnp.zeros(x.shape[:1] + x.shape[2:])
        outs = []
        for t in range(x.shape[1]):
            h = a[:, t] * h + (1 - a[:, t]) * gate_x[:, t] * x[:, t]
            outs.append(h)
        return jnp.stack(outs, axis=1)


class Conv1D(nn.Module):
    width: int
    taps: int = 4

    @nn.compact
    def __call__(self, x):
        w = self.param("w", nn.initializers.normal(0.02), (self.taps, self.width))
        b = self.param("b", nn.initializers.zeros, (self.width,))
        pad = jnp.pad(x, ((0, 0), (self.taps - 1, 0), (0, 0)))
        return sum(pad[:, i:i + x.shape[1]] * w[i] for i in range(self.taps)) + b


class RecurrentBlock(nn.Module):
    d: int
    width: int

    @nn.compact
    def __call__(self, x):
        y = nn.gelu(nn.Dense(self.width, name="linear_y")(x))
        x = nn.Dense(self.width, name="linear_x")(x)
        x = Recurrence(self.width, name="rg_lru")(Conv1D(self.width, name="conv_1d")(x))
        return nn.Dense(self.d, name="linear_out")(x * y)


class Model(nn.Module):
    @nn.compact
    def __call__(self, ids):
        x = nn.Embed(96, 64, name="embed")(ids)
        for i in range(2):
            x = x + RecurrentBlock(64, 128, name=f"block_{i}")(nn.RMSNorm(name=f"norm_{i}")(x))
        return x @ self.variables["params"]["embed"]["embedding"].T


def _setup():
    ids = jnp.zeros((8, 8), jnp.int32)
    return Model(), jax.eval_shape(Model().init, jax.random.key(0), ids), ids


def test_inner_parameters_follow_the_split_features():
    _, variables, _ = _setup()
    p = tpflax.plan(variables, {"data": 2, "model": 4})
    b = "params/block_0/"
    assert p.decisions[b + "linear_x/kernel"].spec == P(None, "model")
    assert p.decisions[b + "linear_out/kernel"].spec == P("model", None)
    assert p.decisions[b + "conv_1d/w"].spec == P(None, "model")
    assert p.decisions[b + "conv_1d/b"].spec == P("model")
    assert p.decisions[b + "rg_lru/a_param"].spec == P("model")
    for gate in ("input_gate", "a_gate"):
        assert p.decisions[b + f"rg_lru/{gate}/w"].spec == P("model", None, None)
        assert p.decisions[b + f"rg_lru/{gate}/b"].spec == P("model", None)
    # the residual stream's norm, beside the block, stays whole
    assert p.decisions["params/norm_0/scale"].spec == P(None)


def test_following_the_split_holds_fewer_compiled_bytes():
    model, variables, ids = _setup()
    mesh = tpflax.make_mesh({"data": 2, "model": 4})
    opt = optax.adamw(1e-3)

    def step(v, s, ids):
        g = jax.grad(lambda v: jnp.mean(model.apply(v, ids) ** 2))(v)
        u, s = opt.update(g, s, v)
        return optax.apply_updates(v, u), s

    def argument_bytes(p):
        state = jax.eval_shape(opt.init, variables)
        return tpflax.dry_run(step, p, mesh, (variables, state, ids), optimizer=opt).memory["argument"]

    follow = tpflax.plan(variables, mesh)
    whole = tpflax.plan(variables, mesh, rules=[(r"(conv_1d|rg_lru)/", "replicate")])
    # per block: taps 4 x 128 + 128, decays 128, two gates 4 x 32 x 32 + 4 x 32: 9,216 floats; two blocks,
    # each with its two adam moments, a quarter on each tensor rank instead of whole. (Their collectives are
    # benchmarks/probe_recurrentgemma.py's to measure: Hawk's tree plan went from 1.13x to 1.00x the hand
    # layout's; this model is too small for XLA:CPU to gather their gradients.)
    assert argument_bytes(whole) - argument_bytes(follow) == 2 * 9216 * 4 * 3 * 3 // 4


class TimeMix(nn.Module):
    """RWKV-4's time-mix: ``time_mix_k/v`` mix the block's whole input with its token shift before the columns,
    ``time_decay`` acts on their split outputs; all are as wide as the residual stream."""

    @nn.compact
    def __call__(self, x):
        xx = jnp.pad(x, ((0, 0), (1, 0), (0, 0)))[:, :-1]
        mk = self.param("time_mix_k", nn.initializers.constant(0.5), (x.shape[-1],))
        mv = self.param("time_mix_v", nn.initializers.constant(0.5), (x.shape[-1],))
        decay = self.param("time_decay", nn.initializers.constant(-1.0), (x.shape[-1],))
        k = nn.Dense(x.shape[-1], use_bias=False, name="key")(x * mk + xx * (1 - mk))
        v = nn.Dense(x.shape[-1], use_bias=False, name="value")(x * mv + xx * (1 - mv))
        return nn.Dense(x.shape[-1], use_bias=False, name="output")(jnp.exp(decay) * k * v)


def test_a_vector_the_block_holds_as_wide_as_the_stream_stays_whole():
    # split with the inner features, RWKV's time_mix_k/v/r feature-split the block's whole input: 2.12x the
    # collectives of the hand layout (m07, XLA:CPU data=2,model=4); the tree cannot tell them from time_decay
    class LM(nn.Module):
        @nn.compact
        def __call__(self, ids):
            x = nn.Embed(96, 64, name="embed")(ids)
            for i in range(2):
                x = x + TimeMix(name=f"att_{i}")(nn.LayerNorm(name=f"ln_{i}")(x))
            return x @ self.variables["params"]["embed"]["embedding"].T

    v = jax.eval_shape(LM().init, jax.random.key(0), jnp.zeros((8, 8), jnp.int32))
    p = tpflax.plan(v, {"data": 2, "model": 4})
    assert p.decisions["params/att_0/key/kernel"].spec == P(None, "model")
    assert p.decisions["params/att_0/output/kernel"].spec == P("model", None)
    for leaf in ("time_mix_k", "time_mix_v", "time_decay"):
        assert p.decisions[f"params/att_0/{leaf}"].spec == P(None), leaf
