"""Any model: plan(model=) traces a linen Module, an nnx Module, or a plain fn(variables, *sample).

Every case is abstract (``jax.ShapeDtypeStruct``): nothing is allocated or
compiled, and each spec is checked exactly.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

import tpflax

S = jax.ShapeDtypeStruct
F32 = jnp.float32
MESH = {"data": 2, "model": 4}


def specs(plan):
    return {k: d.spec for k, d in plan.decisions.items()}


def assert_traced_pair(plan, column, row):
    """``column`` feeds ``row`` in one pair, both decided by the trace."""
    c, r = plan.decisions[column], plan.decisions[row]
    assert (c.strategy, c.role, r.strategy, r.role) == ("column", "column", "row", "row")
    assert c.pair == r.pair is not None and c.source == r.source == "trace"
    pair = next(p for p in plan.pairs if p.id == c.pair)
    assert (pair.columns, pair.rows, pair.sharded) == ((column,), (row,), True)


# -- a linen Module of the user's own, and the same through a function ------------

class Net(nn.Module):
    """Names that say nothing: only the dataflow says a feeds b."""

    @nn.compact
    def __call__(self, x):
        return nn.Dense(16, name="b")(nn.relu(nn.Dense(64, name="a")(x)))


X = S((2, 16), F32)
NET_SPECS = {"a/kernel": P(None, "model"), "a/bias": P("model"),
             "b/kernel": P("model", None), "b/bias": P(None)}


def test_linen_module_of_ones_own():
    v = jax.eval_shape(Net().init, jax.random.key(0), X)
    p = tpflax.plan(v, MESH, model=Net(), sample=(X,))
    assert specs(p) == {f"params/{k}": s for k, s in NET_SPECS.items()}
    assert_traced_pair(p, "params/a/kernel", "params/b/kernel")


def test_plain_function_over_a_bare_params_tree():
    params = jax.eval_shape(Net().init, jax.random.key(0), X)["params"]
    p = tpflax.plan(params, MESH, model=lambda v, x: Net().apply({"params": v}, x), sample=(X,))
    assert specs(p) == NET_SPECS
    assert_traced_pair(p, "a/kernel", "b/kernel")


# -- an nnx Module ----------------------------------------------------------------

class NNet(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.up = nnx.Linear(16, 64, rngs=rngs)
        self.down = nnx.Linear(64, 16, rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.gelu(self.up(x)))


def test_nnx_module():
    model = nnx.eval_shape(lambda: NNet(nnx.Rngs(0)))
    p = tpflax.plan(nnx.state(model), MESH, model=model, sample=(X,))
    assert specs(p) == {"up/kernel": P(None, "model"), "up/bias": P("model"),
                        "down/kernel": P("model", None), "down/bias": P(None)}
    assert_traced_pair(p, "up/kernel", "down/kernel")


# -- a Hugging Face-style function: torch layout (out, in), used as x @ w.T ----------

VOCAB, D, FF, LAYERS = 128, 32, 64, 2


def hf_params() -> dict:
    p = {"wte": {"weight": S((VOCAB, D), F32)}, "ln_f": {"weight": S((D,), F32)},
         "lm_head": {"weight": S((VOCAB, D), F32)}}
    for i in range(LAYERS):
        p[f"h.{i}"] = {"ln": {"weight": S((D,), F32)},
                       "fc_in": {"weight": S((FF, D), F32), "bias": S((FF,), F32)},
                       "fc_out": {"weight": S((D, FF), F32), "bias": S((D,), F32)}}
    return p


def rms_norm(x, w):
    return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w


def hf_forward(params, ids):
    """Not a flax module: raw jnp ops, kernels stored (out, in) as in torch checkpoints."""
    x = params["wte"]["weight"][ids]
    for i in range(LAYERS):
        b = params[f"h.{i}"]
        h = jax.nn.gelu(rms_norm(x, b["ln"]["weight"]) @ b["fc_in"]["weight"].T + b["fc_in"]["bias"])
        x = x + h @ b["fc_out"]["weight"].T + b["fc_out"]["bias"]
    return rms_norm(x, params["ln_f"]["weight"]) @ params["lm_head"]["weight"].T


IDS = S((2, 8), jnp.int32)


def test_hugging_face_style_function():
    p = tpflax.plan(hf_params(), MESH, model=hf_forward, sample=(IDS,), batch=(IDS,))
    want = {"wte/weight": P("model", None), "lm_head/weight": P("model", None), "ln_f/weight": P(None)}
    for i in range(LAYERS):
        want.update({f"h.{i}/ln/weight": P(None),
                     # (out, in): the column splits dim 0, the row its input dim 1
                     f"h.{i}/fc_in/weight": P("model", None), f"h.{i}/fc_in/bias": P("model"),
                     f"h.{i}/fc_out/weight": P(None, "model"), f"h.{i}/fc_out/bias": P(None)})
    assert specs(p) == want
    for i in range(LAYERS):
        assert_traced_pair(p, f"h.{i}/fc_in/weight", f"h.{i}/fc_out/weight")
    assert p.decisions["wte/weight"].strategy == "vocab"
    # The names and shapes alone read the (out, in) kernels the wrong way round: a pair narrowing to 32
    # features, which the chooser prices (a bottleneck pair) and keeps whole, where the trace splits it
    tree = tpflax.plan(hf_params(), MESH)
    assert tree.decisions["h.0/fc_in/weight"].spec == P(None, None)
    assert tree.decisions["h.0/fc_in/weight"].reason.startswith("column of pair")


def test_hugging_face_style_call_with_params_keyword():
    """``model(ids, params=p)``, the Hugging Face Flax calling convention, wrapped as fn(v, ids)."""

    def hf_model(ids, params):
        return hf_forward(params, ids)

    p = tpflax.plan(hf_params(), MESH, model=lambda v, ids: hf_model(ids, params=v), sample=(IDS,))
    assert_traced_pair(p, "h.1/fc_in/weight", "h.1/fc_out/weight")


# -- errors that name the model and the fix ------------------------------------------

def test_function_without_sample_is_a_clear_error():
    with pytest.raises(tpflax.TraceError, match=r"model function hf_forward needs sample inputs: pass sample="):
        tpflax.plan(hf_params(), MESH, model=hf_forward)


def test_function_called_the_wrong_way_is_a_clear_error():
    with pytest.raises(tpflax.TraceError, match=r"hf_model .*called as fn\(variables, \*sample\)"):
        def hf_model(ids, params):
            return hf_forward(params, ids)

        tpflax.plan(hf_params(), MESH, model=hf_model, sample=(IDS,))


@pytest.mark.parametrize("model, shown", [(42, r"not 42 \(int\)"),
                                          ("gpt2", r"tpflax\.zoo\.get\('gpt2'\)")])
def test_not_a_model_is_a_clear_error(model, shown):
    with pytest.raises(tpflax.TraceError, match=r"model= must be .*" + shown):
        tpflax.plan(hf_params(), MESH, model=model, sample=(IDS,))
    with pytest.raises(tpflax.TraceError, match="fn\\(variables, \\*sample\\)"):
        tpflax.dataflow(model, (IDS,), hf_params())


def test_dataflow_of_a_function_needs_its_variables():
    with pytest.raises(tpflax.TraceError, match="hf_forward needs its variables: pass variables="):
        tpflax.dataflow(hf_forward, (IDS,))
    flow = tpflax.dataflow(hf_forward, (IDS,), hf_params())
    assert isinstance(flow, tpflax.Dataflow)
    assert ("h.0/fc_in/weight", "h.0/fc_out/weight") in {(e.src, e.dst) for e in flow.edges}
