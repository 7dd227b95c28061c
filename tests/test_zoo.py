"""Tests for the model zoo: abstract shapes for real sizes, numerics for tiny ones."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from _util import RUN_XLA

from tpflax import zoo


def flat(tree) -> dict[str, tuple[int, ...]]:
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p, simple=True, separator="/"): tuple(x.shape) for p, x in leaves}


# XLA's CPU backend optimisations dominate this file's run time (3x); the tests
# check numerics, not speed, so compile without them, with the older loop emitters (tests/_util.py).
def fast_jit(fn, *args):
    """``jax.jit(fn)`` compiled for ``args`` with ``RUN_XLA`` (LLVM's optimisations off, the older emitters)."""
    return jax.jit(fn).lower(*args).compile(compiler_options=RUN_XLA)


_ABSTRACT: dict[str, object] = {}


def abstract(name: str):
    """Abstract variables of a named model, traced once per test session (405B takes ~2 s)."""
    if name not in _ABSTRACT:
        _ABSTRACT[name] = zoo.get(name).abstract_variables()
    return _ABSTRACT[name]


TINY = [n for n in zoo.names() if "tiny" in zoo._REGISTRY[n].presets]

# name -> (expected params, relative tolerance)
REAL_COUNTS = {
    "gpt2-small": (124.4e6, 0.01),
    "llama-2-7b": (6.74e9, 0.01),
    "llama-2-7b-scan": (6.74e9, 0.01),
    "llama-70b": (69e9, 0.02),
    "llama-405b": (405e9, 0.03),
    "vit-b16": (86e6, 0.02),
    "resnet18": (11.69e6, 0.01),
}


def test_names_contract():
    required = {
        "mlp",
        "cnn",
        "gpt2",
        "gpt2-small",
        "llama",
        "llama-scan",
        "llama-2-7b",
        "llama-2-7b-scan",
        "llama-70b",
        "llama-405b",
        "vit",
        "lstm",
        "gru",
        "moe",
        "nnx-mlp",
    }
    assert required <= set(zoo.names())
    assert len(set(zoo.names())) == len(zoo.names())


@pytest.mark.parametrize("name", zoo.names())
def test_abstract_variables_never_allocate(name):
    m = zoo.get(name)
    assert m.name == name and m.framework in ("linen", "nnx")
    before = len(jax.live_arrays())
    variables = _ABSTRACT[name] = m.abstract_variables()
    assert len(jax.live_arrays()) <= before
    leaves = jax.tree_util.tree_leaves(variables)
    assert leaves and all(isinstance(x, jax.ShapeDtypeStruct) for x in leaves)
    assert all(x.dtype == jnp.float32 for x in leaves)
    count = zoo.count_params(variables, m.framework)
    if name in REAL_COUNTS:
        expected, tol = REAL_COUNTS[name]
        assert abs(count - expected) / expected < tol, f"{name}: {count:,} params"
    for spec in m.sample_inputs(batch=3):
        assert isinstance(spec, jax.ShapeDtypeStruct) and spec.shape[0] == 3


@pytest.mark.parametrize("name", [n for n in TINY if "real" in zoo._REGISTRY[n].presets])
def test_family_real_size_is_abstract_only(name):
    m = zoo.get(name, size="real")
    assert m.size == "real"
    assert m.param_count() > 10 * zoo.get(name).param_count()


def test_aliases_are_real_family_sizes():
    assert zoo.get("gpt2", size="real").config == zoo.get("gpt2-small").config
    assert zoo.get("llama", size="real").config == zoo.get("llama-2-7b").config
    c = zoo.get("gpt2-small").config
    assert (c.vocab, c.seq_len, c.d_model, c.n_heads, c.n_layers) == (50257, 1024, 768, 12, 12)
    assert zoo.get("llama-2-7b-scan").config.scan_layers


@pytest.mark.slow
@pytest.mark.parametrize("name", TINY)
def test_tiny_forward_grad_deterministic(name):
    m = zoo.get(name)
    assert m.size == "tiny"
    batch = m.make_batch(jax.random.key(1), batch=2)
    (x,) = m.sample_inputs(batch=2)
    assert batch["x"].shape == x.shape and batch["x"].dtype == x.dtype
    nnx_model = m.framework == "nnx"

    # One jit per model keeps the file fast: init, forward, loss and grad compile together.
    def run(rng, batch):
        variables = m.init(rng)
        logits = m.apply(variables, batch["x"])
        params = variables if nnx_model else variables["params"]

        def loss_of_params(params):
            return m.loss(params if nnx_model else {**variables, "params": params}, batch)

        loss, grads = jax.value_and_grad(loss_of_params)(params)
        return logits, loss, grads

    run = fast_jit(run, jax.random.key(0), batch)
    logits, loss, grads = run(jax.random.key(0), batch)
    cfg = m.config
    expected = (2, cfg.seq_len, cfg.vocab) if hasattr(cfg, "vocab") else (2, cfg.n_classes)
    assert logits.shape == expected
    assert bool(jnp.isfinite(logits).all())
    assert loss.shape == () and loss.dtype == jnp.float32 and bool(jnp.isfinite(loss))
    grad_leaves = jax.tree_util.tree_leaves(grads)
    assert grad_leaves and all(bool(jnp.isfinite(g).all()) for g in grad_leaves)
    assert any(float(jnp.abs(g).max()) > 0 for g in grad_leaves)
    assert flat(grads) == flat(zoo.params_of(abstract(name), m.framework))
    # Same rng and batch -> same variables -> bit-identical loss.
    _, loss_again, _ = run(jax.random.key(0), batch)
    assert float(loss) == float(loss_again)


# One block's param paths per model: the planner's name heuristics depend on these.
EXPECTED_PATHS = {
    "mlp": {
        "params/embed_in/kernel": (32, 64),
        "params/block_0/norm/scale": (64,),
        "params/block_0/mlp/up/kernel": (64, 256),
        "params/block_0/mlp/down/kernel": (256, 64),
        "params/head/kernel": (64, 10),
    },
    "cnn": {
        "params/conv_init/kernel": (3, 3, 3, 16),
        "params/block_0/conv1/kernel": (3, 3, 16, 16),
        "params/block_2/conv2/kernel": (3, 3, 64, 64),
        "params/block_1/proj_conv/kernel": (1, 1, 16, 32),
        "params/block_1/proj_bn/scale": (32,),
        "batch_stats/block_0/bn1/mean": (16,),
        "params/head/kernel": (64, 10),
    },
    "gpt2": {
        "params/wte/embedding": (256, 64),
        "params/wpe/embedding": (32, 64),
        "params/h_0/ln_1/scale": (64,),
        "params/h_0/attn/query/kernel": (64, 64),
        "params/h_0/attn/value/bias": (64,),
        "params/h_0/attn/out/kernel": (64, 64),
        "params/h_0/mlp/c_fc/kernel": (64, 256),
        "params/h_0/mlp/c_proj/kernel": (256, 64),
        "params/ln_f/bias": (64,),
    },
    "llama": {
        "params/embed/embedding": (256, 64),
        "params/layers_0/attention_norm/scale": (64,),
        "params/layers_0/attn/q_proj/kernel": (64, 4, 16),
        "params/layers_0/attn/k_proj/kernel": (64, 2, 16),
        "params/layers_0/attn/o_proj/kernel": (4, 16, 64),
        "params/layers_0/mlp/gate_proj/kernel": (64, 128),
        "params/layers_0/mlp/down_proj/kernel": (128, 64),
        "params/norm/scale": (64,),
        "params/lm_head/kernel": (64, 256),
    },
    "llama-scan": {
        "params/layers/attn/q_proj/kernel": (2, 64, 4, 16),
        "params/layers/attn/v_proj/kernel": (2, 64, 2, 16),
        "params/layers/attn/o_proj/kernel": (2, 4, 16, 64),
        "params/layers/mlp/up_proj/kernel": (2, 64, 128),
        "params/layers/ffn_norm/scale": (2, 64),
    },
    "vit": {
        "params/patch_embed/kernel": (8, 8, 3, 64),
        "params/cls": (1, 1, 64),
        "params/pos_embed": (1, 17, 64),
        "params/encoderblock_0/attn/query/kernel": (64, 4, 16),
        "params/encoderblock_0/attn/out/kernel": (4, 16, 64),
        "params/encoderblock_0/mlp/fc1/kernel": (64, 256),
        "params/head/kernel": (64, 10),
    },
    "lstm": {
        "params/embed/embedding": (128, 64),
        "params/rnn_0/cell/ii/kernel": (64, 64),
        "params/rnn_1/cell/hf/kernel": (64, 64),
        "params/head/kernel": (64, 128),
    },
    "gru": {"params/rnn_0/cell/iz/kernel": (64, 64), "params/rnn_1/cell/hn/bias": (64,)},
    "moe": {
        "params/layers_0/moe/router/kernel": (64, 8),
        "params/layers_0/moe/wi": (8, 64, 128),
        "params/layers_0/moe/wo": (8, 128, 64),
        "params/layers_0/attn/query/kernel": (64, 64),
        "params/layers_0/attn/key/kernel": (64, 32),
        "params/layers_0/norm/scale": (64,),
        "params/lm_head/kernel": (64, 256),
    },
    "nnx-mlp": {
        "embed_in/kernel/value": (32, 64),
        "blocks/0/norm/scale/value": (64,),
        "blocks/0/up/kernel/value": (64, 256),
        "blocks/1/down/kernel/value": (256, 64),
        "head/kernel/value": (64, 10),
    },
}


@pytest.mark.parametrize("name", sorted(EXPECTED_PATHS))
def test_param_paths(name):
    paths = flat(abstract(name))
    for path, shape in EXPECTED_PATHS[name].items():
        assert paths.get(path) == shape, f"{name}: {path} -> {paths.get(path)}"


def test_real_llama_shapes():
    p = flat(abstract("llama-405b"))
    assert p["params/layers_125/attn/k_proj/kernel"] == (16384, 8, 128)
    assert p["params/embed/embedding"] == (128256, 16384)
    p = flat(abstract("llama-2-7b-scan"))
    assert p["params/layers/mlp/gate_proj/kernel"] == (32, 4096, 11008)


def test_scanned_llama_matches_unrolled():
    plain, scanned = zoo.get("llama"), zoo.get("llama-scan")
    key = jax.random.key(0)
    variables = fast_jit(plain.init, key)(key)
    params = dict(variables["params"])
    layers = [params.pop(f"layers_{i}") for i in range(plain.config.n_layers)]
    params["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *layers)
    stacked = {"params": params}
    assert flat(stacked) == flat(abstract("llama-scan"))
    batch = plain.make_batch(1)
    np.testing.assert_allclose(
        fast_jit(plain.loss, variables, batch)(variables, batch),
        fast_jit(scanned.loss, stacked, batch)(stacked, batch),
        rtol=1e-5,
    )


def test_nnx_model_helpers():
    m = zoo.get("nnx-mlp")
    model = m.make_model(0)
    from flax import nnx

    assert isinstance(model, nnx.Module) and isinstance(m.module(nnx.Rngs(params=0)), nnx.Module)
    state = nnx.state(model)
    assert flat(state) == flat(abstract("nnx-mlp"))
    x = m.make_batch(0)["x"]
    np.testing.assert_allclose(model(x), m.apply(state, x), rtol=1e-6)


def test_cnn_train_mode_updates_batch_stats():
    m = zoo.get("cnn")
    (x,) = m.sample_inputs(batch=2)

    def train_apply(variables, x):
        return m.apply(variables, x, train=True, mutable=["batch_stats"])

    logits, updates = jax.eval_shape(train_apply, abstract("cnn"), x)
    assert logits.shape == (2, 10)
    assert flat(updates["batch_stats"]) == flat(abstract("cnn")["batch_stats"])


def test_overrides_and_dtypes():
    m = zoo.get("llama", n_layers=1, param_dtype=jnp.bfloat16)
    assert m.config.n_layers == 1
    leaves = jax.tree_util.tree_leaves(m.abstract_variables())
    assert {x.dtype for x in leaves} == {jnp.dtype(jnp.bfloat16)}


def test_bad_requests_raise():
    with pytest.raises(ValueError, match="unknown zoo model"):
        zoo.get("nope")
    with pytest.raises(ValueError, match="no size"):
        zoo.get("llama-70b", size="tiny")
    with pytest.raises(ValueError, match="unknown config field"):
        zoo.get("gpt2", n_layer=3)
