"""tpflax.aligned: a model run on head-aligned stored fused kernels computes its own values, without reshards.

Plans get their layouts by hand here (a naive plan with the fused kernel's and bias's Decision given an
Interleave), the parameters are put in stored order with ``to_storage``.
"""

import dataclasses
from functools import partial

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import FAST_XLA

import tpflax
from tpflax import hlo
from tpflax._src.layout import Interleave, from_storage, to_storage
from tpflax._src.planner.decision import Decision
from tpflax._src.step import plan_decisions

D, H, K, HD = 32, 8, 4, 4  # GQA: 8 query heads, 4 kv heads; on 4 tensor ranks every rank holds whole heads
GQA = (H * HD, K * HD, K * HD)  # unequal pieces (32 | 16 | 16)
MESH = {"data": 2, "model": 4}


def attend(q, k, v):
    b, t = q.shape[:2]
    q, k, v = (a.reshape(b, t, -1, HD) for a in (q, k, v))
    rep = q.shape[2] // k.shape[2]
    k, v = jnp.repeat(k, rep, axis=2), jnp.repeat(v, rep, axis=2)
    w = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k) / HD ** 0.5, -1)
    return jnp.einsum("bhqk,bkhd->bqhd", w, v).reshape(b, t, -1)


class Fused(nn.Module):
    """GPT-2-style block, q|k|v fused in one nn.Dense and cut with jnp.split (GQA pieces)."""

    @nn.compact
    def __call__(self, x):
        q, k, v = jnp.split(nn.Dense(sum(GQA), name="qkv")(x), [GQA[0], GQA[0] + GQA[1]], -1)
        x = x + nn.Dense(D, name="out")(attend(q, k, v))
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(x)))


class Sliced(nn.Module):
    """Fused's q|k|v cut by static slices, as Phi-3's ``qkv_proj`` is."""

    @nn.compact
    def __call__(self, x):
        qkv = nn.Dense(sum(GQA), name="qkv")(x)
        q, k, v = qkv[..., :GQA[0]], qkv[..., GQA[0]:GQA[0] + GQA[1]], qkv[..., GQA[0] + GQA[1]:]
        return x + nn.Dense(D, name="out")(attend(q, k, v))


class Separate(nn.Module):
    """The same block with separate q, k, v kernels."""

    @nn.compact
    def __call__(self, x):
        q, k, v = (nn.Dense(n, name=s)(x) for n, s in zip(GQA, "qkv", strict=True))
        x = x + nn.Dense(D, name="out")(attend(q, k, v))
        return x + nn.Dense(D, name="down")(nn.gelu(nn.Dense(4 * D, name="up")(x)))


class Conv(nn.Module):
    """HF FlaxConv1D style: the fused kernel stored (3d, d) and transposed, then split in three."""

    @nn.compact
    def __call__(self, x):
        w = self.param("c_attn", nn.initializers.normal(0.02), (3 * D, D))
        b = self.param("c_attn_bias", nn.initializers.normal(0.02), (3 * D,))
        q, k, v = jnp.split(jnp.dot(x, w.T) + b, 3, axis=2)
        return x + nn.Dense(D, name="out")(attend(q, k, v))


class Relu(nn.Module):
    """A custom_jvp (jax.nn.relu) on the fused output: aligned materializes it there (the fallback)."""

    @nn.compact
    def __call__(self, x):
        qkv = jax.nn.relu(nn.Dense(sum(GQA), name="qkv")(x))
        q, k, v = jnp.split(qkv, [GQA[0], GQA[0] + GQA[1]], -1)
        return x + nn.Dense(D, name="out")(attend(q, k, v))


class Layer(nn.Module):
    @nn.compact
    def __call__(self, h, _):
        return Fused()(h), None


class LM(nn.Module):
    blocks: tuple = (Fused, Fused)

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, D, name="embed")(ids)
        for i, b in enumerate(self.blocks):
            h = b(name=f"b{i}")(h)
        return nn.Dense(64, name="head")(h)


class Deep(nn.Module):
    """nn.remat layer, a fallback layer and an nn.scan over remat layers (stacked fused kernels)."""

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(64, D, name="embed")(ids)
        h = nn.remat(Fused, prevent_cse=False)(name="r")(h)
        h = Relu(name="j")(h)
        h, _ = nn.scan(nn.remat(Layer), variable_axes={"params": 0}, split_rngs={"params": True},
                       length=2)(name="s")(h, None)
        return nn.Dense(64, name="head")(h)


FUSED = {"qkv/kernel": (GQA, 1), "qkv/bias": (GQA, 0), "c_attn": ((D,) * 3, 0), "c_attn_bias": ((D,) * 3, 0)}


def aligned_plan(m, v, ids):
    """The naive plan, with an Interleave on every fused leaf (dims shift by one under the scan's stack)."""
    plan = tpflax.plan(v, MESH, model=m, sample=(ids,))
    decs = {}
    for path, d in plan.decisions.items():
        hit = [lay for key, lay in FUSED.items() if path.endswith("/" + key)]
        if hit:
            pieces, dim = hit[0]
            dim += len(d.shape) - (2 if path.endswith(("kernel", "c_attn")) else 1)
            assert d.spec[dim] == "model", (path, d.spec)  # the naive split of the fused dim
            d = dataclasses.replace(d, layout=Interleave(dim=dim, pieces=pieces, ranks=4))
        decs[path] = d
    return plan, dataclasses.replace(plan, decisions=decs)


def _decisions(plan, v):
    return jax.tree_util.tree_leaves(plan_decisions(plan, v), is_leaf=lambda x: isinstance(x, Decision))


def stored(plan, v):
    leaves, tree = jax.tree_util.tree_flatten(v)
    return tree.unflatten([x if d.layout is None else to_storage(x, d.layout)
                           for x, d in zip(leaves, _decisions(plan, v), strict=True)])


def _loss(m):
    return lambda v, ids: jnp.std(m.apply(v, ids))


def _run(f, *args):
    return jax.jit(f).lower(*args).compile(FAST_XLA)(*args)


def _check(m, n_laid):
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (4, 8)))
    v = jax.jit(m.init)(jax.random.key(0), ids)
    _, plan = aligned_plan(m, v, ids)
    assert sum(d.layout is not None for d in plan.decisions.values()) == n_laid
    sv, loss = stored(plan, v), _loss(m)
    g = tpflax.aligned(loss, plan)
    want, gn = _run(jax.value_and_grad(loss), v, ids)
    got, ga = _run(jax.value_and_grad(g), sv, ids)
    assert float(got) == float(want)  # the forward pass: the same ops on the same numbers
    assert float(_run(loss, sv, ids)) != float(want)  # the stored tree really is in another order
    # the backward pass contracts over the fused dim in stored order (dx = dy @ W.T): float32 sums of
    # at most 128 products reordered, so each entry may differ by a few ulps of the largest gradient
    for a, b, d in zip(jax.tree_util.tree_leaves(gn), jax.tree_util.tree_leaves(ga), _decisions(plan, v),
                       strict=True):
        b = b if d.layout is None else from_storage(np.asarray(b), d.layout)
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * float(np.abs(a).max()))
    return g, sv, ids


def test_values_and_grads_fused_dense_gqa_and_conv1d(devices):
    _check(LM((Fused, Conv)), 4)


def test_scan_remat_and_fallback(devices):
    g, sv, ids = _check(Deep(), 6)
    text = str(jax.make_jaxpr(g)(sv, ids))
    assert "scan[" in text and "remat" in text and "custom_jvp_call" in text  # re-issued, not unrolled


def test_static_slices_of_unequal_pieces_are_stored_head_aligned(devices):
    """Slices ``[:32]``, ``[32:48]``, ``[48:]`` cut the fused dim into q, k and v. Each is a whole number of
    pieces of its own size, so the trace took the dim for 4 equal pieces of 16: stored rank by rank, rank ``r``
    held query heads ``r`` and ``r + 4`` beside key/value head ``r``, and XLA permuted the pieces back (Phi-3's
    GQA block: 1.46x the collectives of the slices' own layout, the estimate 0.69 of compiled). The slices tile
    the dim: three unequal pieces, the layout the applier runs without a reshard."""
    m = LM((Sliced, Sliced))
    g, sv, ids = _check(m, 4)
    v = jax.jit(m.init)(jax.random.key(0), ids)
    plan = tpflax.plan(v, MESH, model=m, sample=(ids,), fused="aligned")
    for b in ("b0", "b1"):
        assert plan.decisions[f"params/{b}/qkv/kernel"].layout == Interleave(dim=1, pieces=GQA, ranks=4)
        assert plan.decisions[f"params/{b}/qkv/bias"].layout == Interleave(dim=0, pieces=GQA, ranks=4)
    _, cs, *_ = _comm(m, plan, v, ids)
    assert not [c for c in cs if c.kind == "collective-permute"], [(c.kind, c.op_name) for c in cs]


def _comm(m, plan, v, ids):
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(m, plan, mesh, optax.adamw(1e-3), sample=(ids,), variables=v)
    c = jax.jit(ts.fn, in_shardings=ts.in_shardings, out_shardings=ts.out_shardings).lower(*ts.args).compile(
        FAST_XLA)
    cs = hlo.parse_collectives(c.as_text(), mesh)
    return sum(hlo.summarize(cs).values()), cs, ts, c


def test_step_comm_no_more_than_separate_kernels(devices):
    ids = jnp.asarray(np.random.RandomState(0).randint(0, 64, (8, 8)))
    fused, sep = LM((Fused,)), LM((Separate,))
    v, vs = jax.jit(fused.init)(jax.random.key(0), ids), jax.jit(sep.init)(jax.random.key(0), ids)
    naive, plan = aligned_plan(fused, v, ids)
    got, cs, ts, compiled = _comm(fused, plan, v, ids)
    split, *_ = _comm(fused, naive, v, ids)
    separate, *_ = _comm(sep, tpflax.plan(vs, MESH, model=sep, sample=(ids,)), vs, ids)
    assert got <= separate and got < split, (got, separate, split)
    assert not [c for c in cs if "split" in c.op_name or "concatenate" in c.op_name]
    # the step trains the stored tree: its loss is the model's on the natural tree
    args = jax.device_put((stored(plan, v), optax.adamw(1e-3).init(v["params"]), (ids,)), ts.in_shardings)
    _, _, loss = compiled(*args)
    assert float(loss) == pytest.approx(float(_run(partial(_next_token, fused), v, ids)), rel=1e-6)


def _next_token(m, v, ids):
    from tpflax._src.step import next_token_loss

    return next_token_loss(m.apply(v, ids), ids)


def test_constraint_and_name_keep_the_stored_order(devices):
    """with_sharding_constraint and checkpoint_name between the matmul and the split are identities:
    the pieces are still cut per rank, with no gather back to the model's order."""
    from jax.ad_checkpoint import checkpoint_name
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from tpflax._src.apply.aligned import aligned_layouts
    from tpflax._src.layout import Interleave, to_storage

    mesh = jax.make_mesh((8,), ("model",), axis_types=(AxisType.Auto,))
    lay = Interleave(dim=1, pieces=(16, 8, 8), ranks=4)
    w = np.random.RandomState(0).standard_normal((8, 32)).astype(np.float32)
    x = np.ones((2, 8), np.float32)

    def f(p, x):
        y = checkpoint_name(x @ p["w"], "qkv")
        y = jax.lax.with_sharding_constraint(y, NamedSharding(mesh, PartitionSpec(None, "model")))
        q, k, v = jnp.split(y, [16, 24], -1)
        return q.sum(-1) + 2 * k.sum(-1) + 3 * v.sum(-1)

    g = aligned_layouts(f, lambda p: {"w": lay})
    stored_w = {"w": to_storage(w, lay)}
    assert "gather" not in str(jax.make_jaxpr(g)(stored_w, x))  # without the rules: a gather to natural order
    np.testing.assert_array_equal(np.asarray(jax.jit(g)(stored_w, x)), np.asarray(jax.jit(f)({"w": w}, x)))


def test_a_scan_body_keeps_the_stored_order():
    """The fused matmul and its split inside a ``lax.scan`` body (the stored kernel one of its consts): the body
    is evaluated in stored order too, with no gather to the model's order. jax 0.12's scan has no
    ``num_consts``/``num_carry`` parameters: the rule raised KeyError 'num_consts' there."""
    from tpflax._src.apply.aligned import aligned_layouts

    lay = Interleave(dim=1, pieces=(16, 8, 8), ranks=4)
    rs = np.random.RandomState(0)
    w, x = rs.standard_normal((8, 32)).astype(np.float32), rs.standard_normal((3, 2, 8)).astype(np.float32)

    def block(w, x):
        q, k, v = jnp.split(x @ w, [16, 24], -1)
        return q.sum(-1) + 2 * k.sum(-1) + 3 * v.sum(-1)

    def f(p, x):
        return jax.lax.scan(lambda c, xi: (c + block(p["w"], xi), block(p["w"], xi)), jnp.zeros(2), x)

    g = aligned_layouts(f, lambda p: {"w": lay})
    stored_w = {"w": to_storage(w, lay)}
    assert "gather" not in str(jax.make_jaxpr(g)(stored_w, x))
    # the same products summed in another order: a few ulps
    for a, b in zip(jax.tree_util.tree_leaves(jax.jit(g)(stored_w, x)),
                    jax.tree_util.tree_leaves(jax.jit(f)({"w": w}, x)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5)


def test_operands_broadcast_along_the_stored_dim():
    """lax broadcasts size-1 dims (jax.nn.softmax's x - max(x, keepdims=True), jnp.outer's (8, 1) * (1, 8)):
    such an operand is the same in every order along the stored dim, so it is used as it is."""
    from tpflax._src.apply.aligned import aligned_layouts

    lay, blay = Interleave(dim=1, pieces=(4, 2, 2), ranks=2), Interleave(dim=0, pieces=(4, 2, 2), ranks=2)
    rs = np.random.RandomState(0)
    p = {"w": rs.standard_normal((3, 8)).astype(np.float32), "b": rs.standard_normal(8).astype(np.float32)}
    x = rs.standard_normal((2, 5, 3)).astype(np.float32)
    sp = {"w": to_storage(p["w"], lay), "b": to_storage(p["b"], blay)}
    for f in (lambda p, x: jax.nn.softmax(x @ p["w"], -1), lambda p, x: jnp.outer(p["b"], p["b"]),
              lambda p, x: (x @ p["w"]) / (x @ p["w"]).sum(-1, keepdims=True)):
        g = aligned_layouts(f, lambda t: {"w": lay, "b": blay})
        # the same ops on the same numbers, fused differently by XLA around the gathers: a few ulps
        np.testing.assert_allclose(np.asarray(jax.jit(g)(sp, x)), np.asarray(jax.jit(f)(p, x)), rtol=1e-6)
