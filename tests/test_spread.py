"""A small per-example output scaling the residual stream (DiT's adaLN): XLA splits the stream."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax

D = 32
X = (jax.ShapeDtypeStruct((8, 16, D), jnp.float32), jax.ShapeDtypeStruct((8, D), jnp.float32))


class Block(nn.Module):
    @nn.compact
    def __call__(self, x, c):
        shift, scale, gate = jnp.split(nn.Dense(3 * D, name="ada")(nn.silu(c)), 3, axis=-1)
        h = nn.LayerNorm(use_bias=False, use_scale=False)(x) * (1 + scale[:, None]) + shift[:, None]
        return x + gate[:, None] * nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(h)))


class AdaBlock(nn.Module):
    @nn.compact
    def __call__(self, x, c):
        for i in range(2):
            x = Block(name=f"block_{i}")(x, c)
        return x


def _loss(out, x, c):
    return jnp.mean(out ** 2)


def test_split_modulation_prices_the_stream_xla_splits():
    # the adaLN kernels split on their outputs (a hand layout): XLA carries the split into the residual
    # stream and gathers it for the kernels reading or writing it (a 2-block DiT, data=2,model=4: 8 gathers
    # per block, the estimate within 1% of the compiled collectives, /tmp probe); the estimate had
    # counted only the small modulation's gather. Here: 2 gathers for each of up and down, per block
    mesh = {"data": 2, "model": 4}
    v = jax.eval_shape(AdaBlock().init, jax.random.key(0), *X)
    rules = [(r"ada/kernel", P(None, "model")), (r"ada/bias", P("model")), (r"up/kernel", P(None, "model")),
             (r"up/bias", P("model")), (r"down/kernel", P("model", None)), (".*", "replicate")]
    plan = tpflax.plan(v, mesh, rules=rules)
    est = tpflax.estimate(plan, optax.adamw(1e-3), X, model=AdaBlock(), sample=X, loss=_loss, backend="cpu")
    stream = [i for i in est.items if "scales the residual stream" in i.why]
    # one stream on a device: 8 / 2 examples x 16 tokens x 32 features x 4 bytes
    assert [(i.kind, i.size, i.count) for i in stream] == [("all-gather", 4 * 16 * D * 4, 8)]
    whole = tpflax.plan(v, mesh, rules=[(r"ada/.*", "replicate")] + rules[2:])
    est = tpflax.estimate(whole, optax.adamw(1e-3), X, model=AdaBlock(), sample=X, loss=_loss, backend="cpu")
    assert not [i for i in est.items if "scales the residual stream" in i.why]


class FinalLayer(nn.Module):
    """An MLP block on the stream, then DiT's final layer: shift and scale from the conditioning."""

    @nn.compact
    def __call__(self, x, c):
        x = x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(x)))
        shift, scale = jnp.split(nn.Dense(2 * D, name="ada")(nn.silu(c)), 2, axis=-1)
        h = nn.LayerNorm(use_bias=False, use_scale=False)(x) * (1 + scale[:, None]) + shift[:, None]
        return nn.Dense(8, name="linear")(h)


@pytest.mark.parametrize("model", [AdaBlock(), FinalLayer()], ids=["alone", "before-a-row"])
def test_traced_plan_keeps_a_stream_modulation_whole(model):
    # split, the modulation's kernel leaves XLA a feature-split stream (a 2-block DiT: 1.36x the
    # collectives of the layout that keeps it whole); paired with the linear that reads the modulated
    # stream it was split as a Megatron column -> row, alone its stream gathers were not priced
    v = jax.eval_shape(model.init, jax.random.key(0), *X)
    d = tpflax.plan(v, {"data": 2, "model": 4}, model=model, sample=X, batch=X).decisions
    ada = [p for p in d if p.endswith("ada/kernel")]
    assert ada and all(tuple(d[p].spec) == (None, None) for p in ada), [(p, d[p].spec) for p in ada]
    ups = [p for p in d if p.endswith("up/kernel")]  # the MLP's pair stays split
    assert ups and all(tuple(d[p].spec) == (None, "model") for p in ups)


class Modulation(nn.Module):
    """The modulation projection in a submodule of its own (flaxdiff's ``AdaLNParams``), or two of them
    summed (MM-DiT's time and text projections, flaxdiff's ``MMAdaLNZero``)."""

    two: bool

    @nn.compact
    def __call__(self, c):
        m = nn.Dense(3 * D, name="ada")(nn.silu(c))
        if self.two:
            m = m + nn.Dense(3 * D, name="ada_text")(c)
        return m[:, None]


class NestedBlock(nn.Module):
    two: bool

    @nn.compact
    def __call__(self, x, c):
        shift, scale, gate = jnp.split(Modulation(self.two, name="modulation")(c), 3, axis=-1)
        h = nn.LayerNorm(use_bias=False, use_scale=False)(x) * (1 + scale) + shift
        return x + gate * nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(h)))


class NestedAda(nn.Module):
    two: bool = False

    @nn.compact
    def __call__(self, x, c):
        for i in range(2):
            x = NestedBlock(self.two, name=f"block_{i}")(x, c)
        return x


@pytest.mark.parametrize("two", [False, True], ids=["one", "time-and-text"])
def test_modulation_in_its_own_submodule_prices_the_stream(two):
    # the stream's readers and writers were looked for beside the kernel's layer only (its parent
    # module): a modulation Dense one submodule deeper (block_i/modulation/ada) found none, so its split
    # was priced as a small output's gather; flaxdiff's SimpleDiT, data=2,model=4, traced: 1.26x the
    # hand layout's collectives and an estimate 0.64x of the compiled ones; two projections in it
    # (SimpleMMDiT) each stopped the other's walk up to the block
    mesh = {"data": 2, "model": 4}
    model = NestedAda(two)
    v = jax.eval_shape(model.init, jax.random.key(0), *X)
    rules = [(r"ada(_text)?/kernel", P(None, "model")), (r"ada(_text)?/bias", P("model")),
             (r"up/kernel", P(None, "model")), (r"up/bias", P("model")), (r"down/kernel", P("model", None)),
             (".*", "replicate")]
    est = tpflax.estimate(tpflax.plan(v, mesh, rules=rules), optax.adamw(1e-3), X, model=model, sample=X,
                          loss=_loss, backend="cpu")
    stream = [i for i in est.items if "scales the residual stream" in i.why]
    # each split projection prices the stream it splits (the chooser weighs one kernel at a time)
    assert [(i.kind, i.size, i.count) for i in stream] == [("all-gather", 4 * 16 * D * 4, 8)] * (1 + two)
    d = tpflax.plan(v, mesh, model=model, sample=X, batch=X).decisions
    ada = [p for p in d if "/ada" in p and p.endswith("/kernel")]
    assert len(ada) == 2 * (1 + two) and all(tuple(d[p].spec) == (None, None) for p in ada), [(p, d[p].spec) for p in ada]
