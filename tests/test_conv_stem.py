"""A model's top-level stem and output convs are not a channel chain (diffusers' UNet: ``conv_in``, ``conv_out``).

Tree-only, the convs of one block are chained in name order where one's output channels are the next one's
input channels. At the model's top level ``conv_in`` (4 -> 64) and ``conv_out`` (64 -> 4) have mirror shapes,
so they were paired as a column and its row, with the whole body between them. XLA then carried the stem's
channel split into the body and gathered it at every whole reader, forward and backward, which no row sums:
diffusers' UNet's tree-only estimate was 0.72 of the compiled collectives (benchmarks/probe_diffusers.py).
Where the body's convs read the stem's channels, the stem and the output conv now stay out of the chains.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}


class ResnetBlock(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        h = nn.Conv(self.features, (3, 3), name="conv1")(nn.swish(nn.GroupNorm(8, name="norm1")(x)))
        h = nn.Conv(self.features, (3, 3), name="conv2")(nn.swish(nn.GroupNorm(8, name="norm2")(h)))
        return x + h


class Body(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = ResnetBlock(64, name="resnets_0")(x)
        return nn.Conv(64, (3, 3), name="downsampler")(x)


class UNetLike(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Conv(64, (3, 3), name="conv_in")(x)
        h = Body(name="down_blocks_0")(h)
        h = ResnetBlock(64, name="mid_block")(h)
        return nn.Conv(4, (3, 3), name="conv_out")(nn.swish(nn.GroupNorm(8, name="conv_norm_out")(h)))


@functools.cache
def _setup():
    """The model, its variables (one init compile per process: both tests read them, neither changes them) and
    its input."""
    m = UNetLike()
    x = jnp.zeros((8, 16, 16, 4))
    return m, jax.jit(m.init)(jax.random.key(0), x), x


def test_the_stem_and_the_output_conv_around_the_body_stay_out_of_the_chains():
    _, variables, _ = _setup()
    p = tpflax.plan(jax.eval_shape(lambda: variables), MESH)
    for conv in ("conv_in", "conv_out"):
        assert all(e is None for e in p.decisions[f"params/{conv}/kernel"].spec), conv
    # the blocks' own chains are still found
    for block in ("down_blocks_0/resnets_0", "mid_block"):
        assert p.decisions[f"params/{block}/conv1/kernel"].spec == P(None, None, None, "model")
        assert p.decisions[f"params/{block}/conv2/kernel"].spec == P(None, None, "model", None)


def test_top_level_convs_with_no_body_between_them_still_chain():
    # a flat model's top-level convs are its layers, read in order: conv_0 feeds conv_1
    class Flat(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Conv(4, (3, 3), name="conv_1")(nn.relu(nn.Conv(64, (3, 3), name="conv_0")(x)))

    v = jax.eval_shape(Flat().init, jax.random.key(0), jnp.zeros((8, 16, 16, 4)))
    p = tpflax.plan(v, MESH)
    assert p.decisions["params/conv_0/kernel"].spec == P(None, None, None, "model")
    assert p.decisions["params/conv_1/kernel"].spec == P(None, None, "model", None)


@pytest.mark.slow
def test_the_tree_plans_estimate_follows_the_compiled_collectives():
    # the estimate with the model's trace against the compiled adamw step; with the stem chained to the
    # output conv the estimate counted one gather of the stem's output where XLA gathered at every reader
    m, variables, x = _setup()
    p = tpflax.plan(variables, MESH)
    mesh = tpflax.make_mesh(MESH)

    def loss(pred, x):
        return (pred ** 2).mean()

    fn = lambda v, x: m.apply(v, x)  # noqa: E731
    step = tpflax.make_train_step(fn, p, mesh, optax.adamw(1e-3), sample=(x,), loss=loss)
    dr = tpflax.dry_run(step, p, mesh, compiler_options={"xla_backend_optimization_level": 0})
    est = tpflax.estimate(p, optax.adamw(1e-3), model=fn, sample=(x,), loss=loss, backend="cpu")
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm_total, dr.comm_total)


class TimeResnetBlock(nn.Module):
    """A diffusion ResNet block: the time embedding's projection is added to conv1's output channels."""

    @nn.compact
    def __call__(self, x, temb):
        h = nn.Conv(64, (3, 3), name="conv1")(nn.swish(nn.GroupNorm(8, name="norm1")(x)))
        h = h + nn.Dense(64, name="time_emb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.Conv(64, (3, 3), name="conv2")(nn.swish(nn.GroupNorm(8, name="norm2")(h)))
        return x + h + nn.Dense(64, name="proj")(temb)[:, None, None, :]


def test_a_time_embedding_projection_splits_with_the_conv_whose_channels_it_is_added_to():
    # tree-only, by name and shape: the hand layout's split (diffusers' UNet: 1.058x its collectives while it
    # stayed whole, 1.000 split). A dense not named for an embedding (proj, added to the block's input) stays out
    class Net(nn.Module):
        @nn.compact
        def __call__(self, x, t):
            temb = nn.Dense(256, name="time_embedding")(t)
            for i in range(2):
                x = TimeResnetBlock(name=f"resnets_{i}")(x, temb)
            return x

    v = jax.eval_shape(Net().init, jax.random.key(0), jnp.zeros((8, 16, 16, 64)), jnp.zeros((8, 32)))
    d = tpflax.plan(v, MESH).decisions
    for i in range(2):
        b = f"params/resnets_{i}"
        assert d[f"{b}/conv1/kernel"].spec == P(None, None, None, "model")
        assert (d[f"{b}/time_emb_proj/kernel"].spec, d[f"{b}/time_emb_proj/bias"].spec) == (P(None, "model"), P("model"))
        assert d[f"{b}/time_emb_proj/kernel"].pair == d[f"{b}/conv1/kernel"].pair
        assert all(e is None or e == "data" for e in d[f"{b}/proj/kernel"].spec)
