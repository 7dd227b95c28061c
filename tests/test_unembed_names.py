"""A raw leaf named for a projection is a kernel, whatever "embed" is in its name. Gemma 3n's AltUp stores its
(d, d) stream projections as raw einsum weights named ``altup_projection_i`` and ``altup_unembed_projection_i``:
the tree plan read the unembed ones as 128-row lookup tables ("vocab: 128 rows split") and, a vocabulary of
128 then found, the others as output heads over it, splitting all six over the tensor axis: 1.44x the hand
layout's collectives (gemma's Gemma3n-E2B shape, benchmarks/probe_gemma.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import tpflax

V, D = 512, 64


class AltUpLM(nn.Module):
    d: int = D

    @nn.compact
    def __call__(self, ids):
        init, D = nn.initializers.normal(), self.d
        table = self.param("embedding", init, (V, D))
        x = table[ids]
        xs = [x] + [x @ self.param(f"altup_projection_{i}", init, (D, D)) for i in range(2)]
        h = nn.RMSNorm(name="norm")(sum(xs))
        ys = [h] + [y @ self.param(f"altup_unembed_projection_{i}", init, (D, D)) for i, y in enumerate(xs[1:])]
        h = nn.RMSNorm(name="final_norm")(sum(ys))
        return h @ self.param("unembed", init, (D, V))  # an untied output head named "unembed"


def test_projections_named_with_embed_are_kernels_not_tables():
    params = jax.eval_shape(lambda: AltUpLM().init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)))
    p = tpflax.plan(params, {"data": 2, "model": 4})
    for i in range(2):
        for name in (f"altup_projection_{i}", f"altup_unembed_projection_{i}"):
            d = p.decisions[f"params/{name}"]
            assert d.spec == P(None, None), (name, d.reason)
            assert "vocab" not in d.reason and "output head" not in d.reason, (name, d.reason)
    assert p.decisions["params/unembed"].spec == P(None, "model")


def test_traced_stream_projections_stay_whole_when_later_kernels_read_their_output():
    # traced, the AltUp projections are lone dense kernels on every token: split, their output is a
    # feature-split stream that the later kernels reading it (the norms' consumers, the output head) gather,
    # forward and backward, which the chooser now prices (trace/spread.py reader_streams); it priced one
    # gather and one all-reduce and split them (1.4x the hand layout's collectives on the Gemma3n shape)
    ids = jax.ShapeDtypeStruct((8, 16), jnp.int32)
    m = AltUpLM(d=128)  # Gemma3n-E2B's tiny width: at 64 the split saves too few bytes to be taken
    params = jax.eval_shape(lambda: m.init(jax.random.key(0), jnp.zeros(ids.shape, ids.dtype)))
    p = tpflax.plan(params, {"data": 2, "model": 4}, model=m.apply, sample=(ids,), batch=(ids,))
    for i in range(2):
        for name in (f"altup_projection_{i}", f"altup_unembed_projection_{i}"):
            assert p.decisions[f"params/{name}"].spec == P(None, None), (name, p.decisions[f"params/{name}"].reason)
