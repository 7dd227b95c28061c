"""Einsum attention whose heads times head_dim is not d (Gemma 3: 4 heads of 256 on d=1152, 8 of 256 on
2560): its ``(heads, d, head_dim)`` query and ``(heads, head_dim, d)`` output kernels mirror each other like
an expert MLP's ``(E, d, f)``/``(E, f, d)``. The tree plan read them as experts ("expert column: no expert
axis"), split head_dim instead of heads and left the ``(2, kv_heads, d, head_dim)`` key/value stack whole:
gemma's Gemma3-1B shape compiled to 1.20x the hand layout's collectives, its 4B shape to 1.14x the bytes
and 1.39x the collectives (benchmarks/probe_gemma.py). The key/value kernel beside them tells heads from
experts."""

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

import tpflax

D, H, HD = 80, 4, 16  # heads * head_dim = 64 != d


class Mix(nn.Module):
    """gemma's Attention, names kept generic (no 'attn' in the path): q (H, d, hd), k/v (2, kv, d, hd)."""

    kv: int

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal()
        wq = self.param("wq", init, (H, D, HD))
        wkv = self.param("wkv", init, (2, self.kv, D, HD))
        wo = self.param("wo", init, (H, HD, D))
        q = jnp.einsum("btd,ndh->btnh", x, wq)
        k, v = jnp.einsum("bsd,ckdh->cbskh", x, wkv)
        k, v = (jnp.repeat(a, H // self.kv, axis=2) for a in (k, v))
        p = jax.nn.softmax(jnp.einsum("btnh,bsnh->btns", q, k), axis=-1)
        return jnp.einsum("btnh,nhd->btd", jnp.einsum("btns,bsnh->btnh", p, v), wo)


class Experts(nn.Module):
    """A mirrored expert MLP under plain names: (E, d, f) up, (E, f, d) down, all experts dense."""

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal()
        up = self.param("up", init, (4, D, 160))
        down = self.param("down", init, (4, 160, D))
        return jnp.einsum("btef,efd->btd", jax.nn.gelu(jnp.einsum("btd,edf->btef", x, up)), down)


class Net(nn.Module):
    kv: int

    @nn.compact
    def __call__(self, x):
        x = x + Mix(self.kv, name="mix")(nn.RMSNorm(name="n0")(x))
        return x + Experts(name="ffn")(nn.RMSNorm(name="n1")(x))


def _plan(kv):
    params = jax.eval_shape(lambda: Net(kv).init(jax.random.key(0), jnp.zeros((2, 8, D))))
    return tpflax.plan(params, {"data": 2, "model": 4})


def test_mirrored_einsum_heads_beside_a_kv_stack_split_heads_not_head_dim():
    p = _plan(kv=4)
    specs = {k: p.decisions[f"params/mix/{k}"].spec for k in ("wq", "wkv", "wo")}
    assert specs == {"wq": P("model", None, None), "wkv": P(None, "model", None, None),
                     "wo": P("model", None, None)}
    assert p.decisions["params/mix/wq"].strategy == "heads"
    # the expert MLP beside it, with no key/value kernel, is still read as experts
    assert p.decisions["params/ffn/up"].reason.startswith("expert")
    assert p.decisions["params/ffn/down"].reason.startswith("expert")


def test_one_kv_head_still_marks_the_pair_as_heads():
    # MQA (Gemma3-1B's one key/value head): the stack cannot split its heads, but q and the output still do
    p = _plan(kv=1)
    assert p.decisions["params/mix/wq"].spec == P("model", None, None)
    assert p.decisions["params/mix/wo"].spec == P("model", None, None)


def test_a_per_head_gate_beside_einsum_heads_is_no_router():
    # the router's evidence for experts (a 2-D kernel whose outputs are the 3-D kernels' leading dim) is not asked of
    # a block holding a key/value stack: the query and output, under names no attention layer has, stay heads
    class Gated(nn.Module):
        @nn.compact
        def __call__(self, x):
            init = nn.initializers.normal()
            wq, wo = self.param("p_in", init, (H, D, HD)), self.param("p_out", init, (H, HD, D))
            wkv = self.param("p_kv", init, (2, 4, D, HD))
            g = jax.nn.sigmoid(nn.Dense(H, use_bias=False, name="gate")(x))
            q = jnp.einsum("btd,ndh->btnh", x, wq)
            k, v = jnp.einsum("bsd,ckdh->cbskh", x, wkv)
            p = jax.nn.softmax(jnp.einsum("btnh,bsnh->btns", q, k), axis=-1)
            return jnp.einsum("btnh,nhd->btd", jnp.einsum("btns,bsnh->btnh", p, v) * g[..., None], wo)

    class GatedNet(nn.Module):
        @nn.compact
        def __call__(self, x):
            return x + Gated(name="mix")(nn.RMSNorm(name="n0")(x))

    params = jax.eval_shape(lambda: GatedNet().init(jax.random.key(0), jnp.zeros((2, 8, D))))
    p = tpflax.plan(params, {"data": 2, "model": 4})
    ds = [p.decisions[f"params/mix/{k}"] for k in ("p_in", "p_kv", "p_out")]
    assert [d.kind for d in ds] == ["dense", "attention", "dense"]
    assert len({d.pair for d in ds}) == 1 and (ds[0].role, ds[2].role) == ("column", "row")
