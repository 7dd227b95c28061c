"""Quantized kernels: an int8 (or int4) kernel with a float scale is planned as the float kernel it
stands for, always frozen, its scale split with it (QLoRA's frozen base, AQT's serving weights).

Before, every integer leaf was replicated: the int8 kernels, most of a quantized model's bytes,
sat whole on every device with no warning.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import tpflax

D, F, R = 64, 256, 4
DP_TP = {"data": 2, "model": 4}
FSDP_TP = {"fsdp": 2, "model": 4}


class QLoRADense(nn.Module):
    """A frozen int8 kernel dequantized by a per-output-channel float32 scale, plus a LoRA adapter."""

    features: int
    dtype: str = "int8"

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        k = self.param("kernel", lambda key, s: jax.random.randint(key, s, -7, 8).astype(self.dtype),
                       (d, self.features))
        s = self.param("scale", lambda key, s: jax.random.uniform(key, s, minval=0.01, maxval=0.1), (self.features,))
        a = self.param("lora_a", nn.initializers.normal(0.1), (d, R))
        b = self.param("lora_b", nn.initializers.normal(0.1), (R, self.features))
        return x @ (k.astype(jnp.float32) * s) + (x @ a) @ b


class Block(nn.Module):
    dtype: str = "int8"

    @nn.compact
    def __call__(self, x):
        h = nn.relu(QLoRADense(F, self.dtype, name="up")(x))
        return x + QLoRADense(D, self.dtype, name="down")(h)


class Model(nn.Module):
    dtype: str = "int8"

    @nn.compact
    def __call__(self, x):
        return Block(self.dtype, name="b1")(Block(self.dtype, name="b0")(x))


X = jax.random.normal(jax.random.key(1), (8, D))


def _variables(dtype="int8"):
    v = Model(dtype).init(jax.random.key(0), X)
    # integer leaves that are no weights: a step counter and an index table stay whole
    return {"params": v["params"], "stats": {"step": jnp.zeros((), jnp.int32), "ids": jnp.zeros((16, 8), jnp.int32)}}


def _fn(dtype="int8"):
    return lambda v, x: Model(dtype).apply({"params": v["params"]}, x)


def _specs(plan):
    return {p: (tuple(d.spec), d.strategy) for p, d in plan.decisions.items() if "lora" not in p}


COLUMN, ROW = ((None, "model"), "column"), (("model", None), "row")
WANT = {
    "dp_tp": {
        **{f"params/b{i}/up/kernel": COLUMN for i in (0, 1)},
        **{f"params/b{i}/up/scale": (("model",), "column") for i in (0, 1)},
        **{f"params/b{i}/down/kernel": ROW for i in (0, 1)},
        **{f"params/b{i}/down/scale": ((None,), "replicate") for i in (0, 1)},
    },
    "fsdp_tp": {
        **{f"params/b{i}/up/kernel": (("fsdp", "model"), "column") for i in (0, 1)},
        **{f"params/b{i}/up/scale": (("model",), "column") for i in (0, 1)},
        **{f"params/b{i}/down/kernel": (("model", "fsdp"), "row") for i in (0, 1)},
        **{f"params/b{i}/down/scale": (("fsdp",), "row") for i in (0, 1)},
    },
}
WHOLE = {"stats/step": ((), "replicate"), "stats/ids": ((None, None), "replicate")}


@pytest.mark.parametrize("mesh", ["dp_tp", "fsdp_tp"])
@pytest.mark.parametrize("traced", [False, True], ids=["tree", "traced"])
def test_int8_kernels_are_planned_like_float_ones_and_frozen(mesh, traced):
    kw = {"model": _fn(), "sample": (X,)} if traced else {}
    plan = tpflax.plan(_variables(), DP_TP if mesh == "dp_tp" else FSDP_TP, trainable="lora", **kw)
    assert _specs(plan) == {**WANT[mesh], **WHOLE}
    for p, d in plan.decisions.items():
        assert d.trainable == ("lora" in p), p
        if p.endswith("kernel"):
            assert d.kind == "dense" and d.dtype == "int8", p


def test_the_trace_finds_an_int8_kernel_without_a_scale_sibling():
    # the scale renamed out of the tree heuristic's reach ("mult"): only the trace says the kernel is a weight
    v = _variables()
    tree = {"params": {b: {layer: {("mult" if k == "scale" else k): x for k, x in leaves.items()}
                               for layer, leaves in blocks.items()} for b, blocks in v["params"].items()}}

    def fn(t, x):
        back = {b: {layer: {("scale" if k == "mult" else k): x for k, x in leaves.items()}
                    for layer, leaves in blocks.items()} for b, blocks in t["params"].items()}
        return Model().apply({"params": back}, x)

    assert tpflax.plan(tree, DP_TP).decisions["params/b0/up/kernel"].strategy == "replicate"
    traced = tpflax.plan(tree, DP_TP, model=fn, sample=(X,))
    assert {p: tuple(d.spec) for p, d in traced.decisions.items() if p.endswith("kernel")} == {
        f"params/b{i}/{n}/kernel": spec for i in (0, 1) for n, spec in (("up", (None, "model")), ("down", ("model", None)))}


def test_shard_unshard_and_checkpoint_are_bit_exact_on_int8(tmp_path):
    v = _variables()
    plan = tpflax.plan(v, FSDP_TP, trainable="lora")
    mesh = tpflax.make_mesh(plan.mesh)
    sharded = tpflax.shard(v, plan, mesh)
    k = sharded["params"]["b0"]["up"]["kernel"]
    assert k.dtype == jnp.int8 and k.sharding.spec == plan.decisions["params/b0/up/kernel"].spec
    assert k.addressable_shards[0].data.shape == (D // 2, F // 4)
    back = tpflax.unshard(sharded)
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), back, v)
    tpflax.save_checkpoint(tmp_path / "ck", sharded, plan=plan)
    restored = tpflax.restore_checkpoint(tmp_path / "ck", plan, mesh)
    r = restored["params"]["b0"]["up"]["kernel"]
    assert r.dtype == jnp.int8 and r.sharding.spec == k.sharding.spec
    jax.tree_util.tree_map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                           tpflax.unshard(restored), v)


@pytest.mark.parametrize("mesh", [DP_TP, FSDP_TP], ids=["dp_tp", "fsdp_tp"])
def test_a_jitted_step_trains_the_adapters_and_carries_int8_through(mesh):
    v = _variables()
    plan = tpflax.plan(v, mesh, trainable="lora")
    m = tpflax.make_mesh(plan.mesh)
    tx = optax.adam(1e-2)

    def loss(out, x):
        return jnp.mean((out - 1.0) ** 2)

    ts = tpflax.make_train_step(_fn(), plan, m, tx, sample=(X,), loss=loss)
    opt = tpflax.shard_optimizer_state(tx, None, plan, m)
    assert opt[0].mu["b0"]["up"]["kernel"] is None and opt[0].mu["b0"]["up"]["scale"] is None
    sharded = tpflax.shard(v, plan, m)
    new, _, value = jax.jit(ts.fn)(sharded, opt, (X,))
    for path, x in jax.tree_util.tree_leaves_with_path(new):
        p = jax.tree_util.keystr(path, simple=True, separator="/")
        old = np.asarray(jax.tree_util.tree_leaves(v)[[jax.tree_util.keystr(q, simple=True, separator="/")
                                                         for q, _ in jax.tree_util.tree_leaves_with_path(v)].index(p)])
        assert x.dtype == old.dtype, p
        if "lora" in p:
            assert not np.array_equal(np.asarray(x), old), p  # it trained
        else:  # frozen (int8 kernels, their scales) and state: bit for bit, in the plan's layout
            np.testing.assert_array_equal(np.asarray(x), old)
            assert x.sharding.is_equivalent_to(jax.sharding.NamedSharding(m, plan.decisions[p].spec), x.ndim), p
    # the same loss as the unsharded float computation: reordered sums, a few ulps
    want = loss(_fn()(v, X), X)
    np.testing.assert_allclose(float(value), float(want), rtol=1e-5)


def test_fsdp_split_int8_kernels_are_gathered_as_int8():
    # gathered as stored for compute (ZeRO-3), as a frozen float base is: int8, not the dequantized float32
    from tpflax._src.step import frozen_fsdp

    v = _variables()
    plan = tpflax.plan(v, FSDP_TP, trainable="lora")
    leaves = jax.tree_util.tree_leaves_with_path(v)
    got = {jax.tree_util.keystr(leaves[i][0], simple=True, separator="/") for i, _ in frozen_fsdp(plan, v)}
    assert got == {f"params/b{i}/{n}" for i in (0, 1) for n in ("up/kernel", "down/kernel", "down/scale")}
    m = tpflax.make_mesh(plan.mesh)
    tx = optax.sgd(0.1)
    ts = tpflax.make_train_step(_fn(), plan, m, tx, sample=(X,), loss=lambda out, x: jnp.mean(out ** 2))
    hlo = jax.jit(ts.fn).lower(tpflax.shard(v, plan, m), tpflax.shard_optimizer_state(tx, None, plan, m),
                               (X,)).compile().as_text()
    gathers = [line for line in hlo.splitlines() if "all-gather(" in line or "all-gather-start(" in line]
    assert any("s8[" in line.split("=")[1].split("all-gather")[0] for line in gathers), gathers


@pytest.mark.parametrize("dtype", ["int8", "int4"])
def test_estimate_counts_quantized_bytes_at_their_itemsize_and_no_gradient(dtype):
    v = _variables(dtype)
    plan = tpflax.plan(v, FSDP_TP, trainable="lora")
    kernel = plan.decisions["params/b0/up/kernel"]
    assert kernel.bytes == D * F * (1 if dtype == "int8" else 0.5)
    assert kernel.bytes_per_device == kernel.bytes // 8
    e = tpflax.estimate(plan, optax.adam(1e-2), model=_fn(dtype), sample=(X,), backend="cpu")
    trained = sum(d.bytes_per_device for d in plan.decisions.values() if d.trainable)
    frozen = sum(d.bytes_per_device for d in plan.decisions.values() if not d.trainable)
    assert (e.per_device.params, e.per_device.grads, e.per_device.model_state) == (trained, trained, frozen)
    assert e.per_device.opt_state == 2 * trained + 4  # adam's mu and nu of the adapters, and its count


def test_a_trained_scale_is_priced_as_the_dequantized_kernels_gradient_sum():
    # scales trained (the adapters frozen): XLA sums the dequantized kernel's gradient x^T g over the batch (kernel-sized,
    # on the kernel's tensor shard) before the product with the int8 codes makes the scale's. Priced at the scale's
    # own size before: est/comp 0.60 on two int8 MLP blocks (int8 Llama 0.83); cost/gradients.py::expanded_bytes
    from _util import COMM_XLA

    v = {"params": _variables()["params"]}
    model = lambda w, x: Model().apply(w, x)  # noqa: E731
    plan = tpflax.plan(v, DP_TP, model=model, sample=(X,), trainable=r"scale")
    mesh = tpflax.make_mesh(DP_TP)
    loss = lambda out, *_: jnp.mean(out ** 2)  # noqa: E731
    dr = tpflax.dry_run(tpflax.make_train_step(model, plan, mesh, optax.adam(1e-2), sample=(X,), loss=loss), plan,
                        mesh, compiler_options=COMM_XLA)
    e = tpflax.estimate(plan, optax.adam(1e-2), model=model, sample=(X,), loss=loss, backend="cpu")
    kernels = 2 * (D * F // 4 + F // 4 * D) * 4  # each block's two float32 kernel shards, over model=4
    assert dr.comm()["all-reduce"]["data"] > kernels
    assert e.comm["all-reduce"]["data"] == pytest.approx(dr.comm()["all-reduce"]["data"], rel=0.02), (e.comm, dr.comm())
