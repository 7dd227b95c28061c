"""Name-blind planning: the traced plan must not care what modules are called.

The zoo's GPT-2 and Llama are rebuilt with every module renamed ``layer_0`` ...
``layer_n`` and the MLP kernels stored transposed ``(out, in)`` and applied as
``x @ kernel.T``. The traced plan must give the same layout as for the
well-named model, and its compiled training step (8 CPU devices, data=2,
model=4) may move no more collective bytes and do no more flops per device.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import FAST_XLA, zoo_init
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax import hlo, zoo
from tpflax.zoo._base import xent
from tpflax.zoo._layers import causal_attention, rotary

MESH = {"data": 2, "model": 4}


class TDense(nn.Module):
    """A dense layer whose kernel is stored ``(out, in)`` and applied as ``x @ kernel.T``."""

    features: int
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        k = self.param("kernel", nn.initializers.lecun_normal(), (self.features, x.shape[-1]))
        y = x @ k.T
        if self.use_bias:
            y = y + self.param("bias", nn.initializers.zeros, (self.features,))
        return y


# -- GPT-2, name-blind ------------------------------------------------------

class BlindGPT2Block(nn.Module):
    c: object

    @nn.compact
    def __call__(self, x):
        c = self.c
        b, t, _ = x.shape
        h = nn.LayerNorm(epsilon=c.ln_eps, name="layer_0")(x)

        def heads(y):
            return y.reshape(b, t, c.n_heads, c.head_dim)

        q = heads(nn.Dense(c.d_model, name="layer_1")(h))
        k = heads(nn.Dense(c.d_model, name="layer_2")(h))
        v = heads(nn.Dense(c.d_model, name="layer_3")(h))
        x = x + nn.Dense(c.d_model, name="layer_4")(causal_attention(q, k, v).reshape(b, t, c.d_model))
        h = nn.LayerNorm(epsilon=c.ln_eps, name="layer_5")(x)
        h = nn.gelu(TDense(c.d_ff, name="layer_6")(h), approximate=True)
        return x + TDense(c.d_model, name="layer_7")(h)


class BlindGPT2(nn.Module):
    c: object

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        wte = nn.Embed(c.vocab, c.d_model, name="layer_0")
        x = wte(tokens) + nn.Embed(c.seq_len, c.d_model, name="layer_1")(jnp.arange(tokens.shape[1])[None])
        for i in range(c.n_layers):
            x = BlindGPT2Block(c, name=f"layer_{i + 2}")(x)
        x = nn.LayerNorm(epsilon=c.ln_eps, name=f"layer_{c.n_layers + 2}")(x)
        return wte.attend(x)


def gpt2_map(c) -> dict[str, tuple[str, bool]]:
    """Named path -> (blind path, stored transposed)."""
    m = {"params/wte/embedding": ("params/layer_0/embedding", False),
         "params/wpe/embedding": ("params/layer_1/embedding", False)}
    for leaf in ("scale", "bias"):
        m[f"params/ln_f/{leaf}"] = (f"params/layer_{c.n_layers + 2}/{leaf}", False)
    for i in range(c.n_layers):
        h, b = f"params/h_{i}", f"params/layer_{i + 2}"
        for name, j in (("ln_1", 0), ("ln_2", 5)):
            for leaf in ("scale", "bias"):
                m[f"{h}/{name}/{leaf}"] = (f"{b}/layer_{j}/{leaf}", False)
        for name, j in (("query", 1), ("key", 2), ("value", 3), ("out", 4)):
            for leaf in ("kernel", "bias"):
                m[f"{h}/attn/{name}/{leaf}"] = (f"{b}/layer_{j}/{leaf}", False)
        for name, j in (("c_fc", 6), ("c_proj", 7)):
            m[f"{h}/mlp/{name}/kernel"] = (f"{b}/layer_{j}/kernel", True)
            m[f"{h}/mlp/{name}/bias"] = (f"{b}/layer_{j}/bias", False)
    return m


# -- Llama, name-blind ------------------------------------------------------

class BlindLlamaLayer(nn.Module):
    c: object

    @nn.compact
    def __call__(self, x):
        c = self.c
        kw = dict(use_bias=False)
        h = nn.RMSNorm(epsilon=c.norm_eps, name="layer_0")(x)
        q = nn.DenseGeneral((c.n_heads, c.head_dim), name="layer_1", **kw)(h)
        k = nn.DenseGeneral((c.n_kv_heads, c.head_dim), name="layer_2", **kw)(h)
        v = nn.DenseGeneral((c.n_kv_heads, c.head_dim), name="layer_3", **kw)(h)
        y = causal_attention(rotary(q, c.rope_theta), rotary(k, c.rope_theta), v)
        x = x + nn.DenseGeneral(c.d_model, axis=(-2, -1), name="layer_4", **kw)(y)
        h = nn.RMSNorm(epsilon=c.norm_eps, name="layer_5")(x)
        g = TDense(c.d_ff, use_bias=False, name="layer_6")(h)
        u = TDense(c.d_ff, use_bias=False, name="layer_7")(h)
        return x + TDense(c.d_model, use_bias=False, name="layer_8")(nn.silu(g) * u)


class BlindLlama(nn.Module):
    c: object

    @nn.compact
    def __call__(self, tokens):
        c = self.c
        x = nn.Embed(c.vocab, c.d_model, name="layer_0")(tokens)
        for i in range(c.n_layers):
            x = BlindLlamaLayer(c, name=f"layer_{i + 1}")(x)
        x = nn.RMSNorm(epsilon=c.norm_eps, name=f"layer_{c.n_layers + 1}")(x)
        return nn.Dense(c.vocab, use_bias=False, name=f"layer_{c.n_layers + 2}")(x)


def llama_map(c) -> dict[str, tuple[str, bool]]:
    m = {"params/embed/embedding": ("params/layer_0/embedding", False),
         "params/norm/scale": (f"params/layer_{c.n_layers + 1}/scale", False),
         "params/lm_head/kernel": (f"params/layer_{c.n_layers + 2}/kernel", False)}
    for i in range(c.n_layers):
        h, b = f"params/layers_{i}", f"params/layer_{i + 1}"
        m[f"{h}/attention_norm/scale"] = (f"{b}/layer_0/scale", False)
        m[f"{h}/ffn_norm/scale"] = (f"{b}/layer_5/scale", False)
        for name, j in (("q_proj", 1), ("k_proj", 2), ("v_proj", 3), ("o_proj", 4)):
            m[f"{h}/attn/{name}/kernel"] = (f"{b}/layer_{j}/kernel", False)
        for name, j in (("gate_proj", 6), ("up_proj", 7), ("down_proj", 8)):
            m[f"{h}/mlp/{name}/kernel"] = (f"{b}/layer_{j}/kernel", True)
    return m


CASES = {"gpt2": (BlindGPT2, gpt2_map), "llama": (BlindLlama, llama_map)}


def _setup(family):
    named = zoo.get(family)
    cls, mapper = CASES[family]
    blind = cls(named.config)
    sample = named.sample_inputs(2)
    vb = jax.eval_shape(blind.init, jax.random.key(0), *sample)
    return named, blind, sample, vb, mapper(named.config)


def _to_blind(named_vars, mapping):
    out: dict = {}
    flat = {jax.tree_util.keystr(p, simple=True, separator="/"): x
            for p, x in jax.tree_util.tree_flatten_with_path(named_vars)[0]}
    for path, x in flat.items():
        bpath, transposed = mapping[path]
        node = out
        parts = bpath.split("/")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = x.T if transposed else x
    return out


@pytest.mark.parametrize("family", sorted(CASES))
def test_blind_model_is_the_same_function(family):
    named, blind, _, _, mapping = _setup(family)
    v = zoo_init(family)  # any variables do; compiled once per process
    tokens = named.make_batch(1, 2)["x"]
    # each forward compiled whole (FAST_XLA), not dispatched an op (and a compile) at a time
    blind_out = jax.jit(blind.apply, compiler_options=FAST_XLA)(_to_blind(v, mapping), tokens)
    named_out = jax.jit(named.apply, compiler_options=FAST_XLA)(v, tokens)
    np.testing.assert_allclose(np.asarray(blind_out), np.asarray(named_out), rtol=2e-5, atol=2e-5)


def _layout(plan, path, transposed):
    spec = tuple(plan.decisions[path].spec) + (None,) * len(plan.decisions[path].shape)
    spec = spec[:len(plan.decisions[path].shape)]
    return spec[::-1] if transposed else spec


@pytest.mark.parametrize("family", sorted(CASES))
def test_traced_layout_ignores_names_and_transposes(family):
    named, blind, sample, vb, mapping = _setup(family)
    pn = tpflax.plan(named.abstract_variables(), MESH, model=named)
    pb = tpflax.plan(vb, MESH, model=blind, sample=sample)
    assert set(pb.decisions) == {b for b, _ in mapping.values()}
    diffs = [(n, pn.decisions[n].spec, pb.decisions[b].spec) for n, (b, t) in mapping.items()
             if _layout(pn, n, False) != _layout(pb, b, t)]
    assert not diffs
    # The layout is the Megatron one, with the evidence in the reasons.
    c = named.config
    kernels = [(n, b) for n, (b, t) in mapping.items() if t and n.endswith("kernel")]
    assert kernels and all(pb.decisions[b].source == "trace" for _, b in kernels)
    down = mapping["params/h_0/mlp/c_proj/kernel" if family == "gpt2" else
                   "params/layers_0/mlp/down_proj/kernel"][0]
    assert pb.decisions[down].spec == P(None, "model")  # (out, in): the input dim is split
    assert pb.decisions[down].strategy == "row" and "traced" in pb.decisions[down].reason
    assert len(pb.pairs) == len(pn.pairs) == 2 * c.n_layers


def _step_cost(loss_fn, variables, plan, tokens_spec, mesh):
    """Per-device collective bytes and flops of one compiled training step (loss + grads)."""
    param_sh = jax.tree_util.tree_map(lambda s: NamedSharding(mesh, s), plan.specs,
                                      is_leaf=lambda x: isinstance(x, P))
    batch_sh = NamedSharding(mesh, P("data"))
    step = jax.jit(jax.value_and_grad(loss_fn), in_shardings=(param_sh, batch_sh, batch_sh),
                   out_shardings=(NamedSharding(mesh, P()), param_sh))
    # LLVM's optimisations off (FAST_XLA): the same HLO passes, so the same collectives and flops
    compiled = step.lower(variables, tokens_spec, tokens_spec).compile(FAST_XLA)
    coll = hlo.parse_collectives(compiled.as_text(), mesh)
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return sum(hlo.summarize(coll).values()), float(cost["flops"])


@pytest.mark.parametrize("family", sorted(CASES))
def test_blind_plan_compiles_no_worse(family, devices):
    named, blind, sample, vb, _ = _setup(family)
    mesh = tpflax.make_mesh(MESH)
    tokens = jax.ShapeDtypeStruct((8, named.config.seq_len), jnp.int32)
    pn = tpflax.plan(named.abstract_variables(), MESH, model=named)
    pb = tpflax.plan(vb, MESH, model=blind, sample=sample)

    def named_loss(v, x, y):
        return xent(named.apply(v, x), y)

    def blind_loss(v, x, y):
        return xent(blind.apply(v, x), y)

    bytes_n, flops_n = _step_cost(named_loss, named.abstract_variables(), pn, tokens, mesh)
    bytes_b, flops_b = _step_cost(blind_loss, vb, pb, tokens, mesh)
    assert bytes_n > 0 and flops_n > 0
    assert bytes_b <= bytes_n * 1.001, (bytes_b, bytes_n)
    assert flops_b <= flops_n * 1.001, (flops_b, flops_n)
