"""A remat'd block's forward sums its recompute reads, against what XLA:CPU compiles.

XLA recomputes a remat'd block in the backward pass, and the recompute needs the summed output of any
tensor-split row the rest of the block reads (a pre-norm block's first residual branch feeds the second
branch's norm): that all-reduce runs again (``rematted_computation`` in the HLO's op names). A row feeding
only the block's residual output is saved and summed once. Measured on XLA:CPU for the nnx.scan +
nnx.remat decoder of ``benchmarks/probe_nnx.py`` (``scan``), the zoo's llama / llama-scan / cnn remat
steps, and here on a small NNX stack.
"""

import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA
from flax import linen as nn
from flax import nnx
from jax.sharding import PartitionSpec as P

import tpflax

D, F, LAYERS, ROWS, T = 32, 64, 2, 4, 8


class Block(nnx.Module):
    """A pre-norm decoder block: the attention output's sum feeds ``norm2``, the MLP's only the block output."""

    def __init__(self, rngs):
        kw = dict(use_bias=False, rngs=rngs)
        self.norm1, self.norm2 = nnx.RMSNorm(D, rngs=rngs), nnx.RMSNorm(D, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(4, D, use_bias=False, decode=False, rngs=rngs)
        self.up, self.down = nnx.Linear(D, F, **kw), nnx.Linear(F, D, **kw)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.down(nnx.relu(self.up(self.norm2(x))))


class Stack(nnx.Module):
    """The Flax "scan over layers" pattern: nnx.vmap-made blocks run by nnx.scan over nnx.remat."""

    def __init__(self, remat, rngs):
        @nnx.split_rngs(splits=LAYERS)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make(r):
            return Block(r)

        self.blocks, self.remat = make(rngs), remat

    def __call__(self, x):
        def run(x, blk):
            return blk(x)

        run = nnx.remat(run) if self.remat else run
        return nnx.scan(run, in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)(x, self.blocks)


def _loss(out, *_):
    return jnp.mean(out ** 2)


@pytest.mark.parametrize("remat", [False, True])
def test_remat_resums_on_cpu_as_compiled(remat):
    """Under remat XLA:CPU sums the attention output once more per layer, not the MLP's (the block output).
    The estimate counts exactly the compiled all-reduces (before counting the recompute's sum on XLA:CPU it
    priced 6 of the compiled 7 per layer under remat). Exact: every collective is an all-reduce of one
    ``(ROWS, T, D)`` activation."""
    m = Stack(remat, nnx.Rngs(0))
    x = jax.ShapeDtypeStruct((ROWS, T, D), jnp.float32)
    p = tpflax.plan(nnx.state(m), {"model": 4}, model=m, sample=(x,))
    mesh = tpflax.make_mesh(p.mesh)
    ts = tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), sample=(x,), loss=_loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    e = tpflax.estimate(p, optax.sgd(0.1), model=m, sample=(x,), loss=_loss, backend="cpu")
    one = 2 * 3 / 4 * ROWS * T * D * 4  # ring bytes of one (ROWS, T, D) f32 all-reduce over 4
    recomputed = [c for c in dr.collectives if "rematted_computation" in c.op_name]
    assert sum(c.count for c in recomputed) == (LAYERS if remat else 0)
    # per layer: out's and down's forward sums, q's, k's, v's and up's input-gradient sums, out's again
    assert dr.comm_total == pytest.approx(LAYERS * (6 + remat) * one)
    assert e.comm_total == pytest.approx(dr.comm_total)
    again = [i for i in e.items if "again in the remat recompute" in i.why]
    assert [i.why.split(":")[0] for i in again] == (["row blocks/attn/out/kernel"] if remat else [])


class _LinenBlock(nn.Module):
    """A linen block with plain 2-D Dense projections right under it (no ``attn`` sub-module, so the o
    projection is kind "dense"): ``flat`` is a sequential pre-norm block (o's sum feeds ``ln2``), ``parallel``
    a PaLM block (one norm, both rows added to the output), ``mlp`` a norm and an MLP only, ``post`` a norm after
    each residual add too (a post-norm block's, here behind the pre-norm ``ln1``)."""

    shape: str

    @nn.compact
    def __call__(self, x):
        b, t, _ = x.shape
        y = nn.RMSNorm(name="ln1")(x)
        if self.shape == "mlp":
            return x + nn.Dense(D, use_bias=False, name="wo")(nn.relu(nn.Dense(F, use_bias=False, name="wi")(y)))
        q, k, v = (nn.Dense(D, use_bias=False, name=n)(y).reshape(b, t, 4, D // 4) for n in ("q", "k", "v"))
        a = nn.Dense(D, use_bias=False, name="o")(jax.nn.dot_product_attention(q, k, v, is_causal=True)
                                                   .reshape(b, t, D))
        if self.shape == "post":
            x = nn.RMSNorm(name="ln2")(x + a)
            return nn.RMSNorm(name="ln3")(x + nn.Dense(D, use_bias=False, name="wo")(
                nn.relu(nn.Dense(F, use_bias=False, name="wi")(x))))
        if self.shape == "flat":
            x, y = x + a, nn.RMSNorm(name="ln2")(x + a)
        else:
            x = x + a
        return x + nn.Dense(D, use_bias=False, name="wo")(nn.relu(nn.Dense(F, use_bias=False, name="wi")(y)))


class _LinenStack(nn.Module):
    shape: str

    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = nn.remat(_LinenBlock)(self.shape, name=f"layers_{i}")(x)
        return x


_HAND = [(r"(q|k|v|wi)/kernel$", P(None, "model")), (r"(o|wo)/kernel$", P("model", None)), (r".*", P())]


@pytest.mark.parametrize("shape,resummed", [("flat", ["o"]), ("parallel", []), ("mlp", []), ("post", ["o", "wo"])])
def test_linen_remat_resums_rows_a_later_norm_reads(shape, resummed):
    """Under ``nn.remat`` XLA:CPU sums a flat pre-norm block's o output again in the recompute (its add feeds
    ``ln2``, whose backward the recompute serves), and both rows of a post-norm block, not a PaLM parallel
    block's rows nor an MLP block's (they feed only the block output). The estimate redoes exactly those rows, read off the trace's call order: before, a
    2-D o Dense (kind "dense", a residual output) was never redone, est/comp 0.905 (data=2,model=4, review V02).
    Exact: the model axis's bytes (before: 36,864 of the flat block's 43,008, 27,648 of the post-norm's 39,936)."""
    m = _LinenStack(shape)
    x = jax.ShapeDtypeStruct((ROWS, T, D), jnp.float32)
    v = jax.eval_shape(m.init, jax.random.key(0), x)
    p = tpflax.plan(v, {"data": 2, "model": 4}, rules=_HAND)
    mesh = tpflax.make_mesh(p.mesh)
    dr = tpflax.dry_run(tpflax.make_train_step(m, p, mesh, optax.sgd(0.1), sample=(x,), loss=_loss), p, mesh,
                        compiler_options=COMM_XLA)
    e = tpflax.estimate(p, optax.sgd(0.1), model=m, sample=(x,), loss=_loss, backend="cpu")
    recomputed = [c for c in dr.collectives if "rematted_computation" in c.op_name and "model" in c.axes]
    assert sum(c.count for c in recomputed) == LAYERS * len(resummed)
    assert e.comm["all-reduce"]["model"] == dr.comm()["all-reduce"]["model"]
    again = [i for i in e.items if "again in the remat recompute" in i.why]
    assert sorted({i.why.split(":")[0] for i in again}) == [f"row params/layers_*/{r}/kernel" for r in resummed]


@pytest.mark.parametrize("shape,resummed", [("flat", ["o"]), ("parallel", []), ("mlp", []), ("post", ["o", "wo"])])
def test_chooser_prices_the_remat_resum_as_the_estimate(shape, resummed):
    """plan(model=) prices a split row's sum twice where the estimate does (``cost/residual.py`` ``Recompute``, one
    rule read by both): under ``nn.remat`` a flat pre-norm block's o, both rows of a post-norm block, no row of a
    parallel or an MLP-only block. Before, the chooser priced every row sum once under remat (the estimate's
    ``again in the remat recompute`` rows were missing from the candidates' costs). Exact: the count of the
    Megatron candidate's row all-reduce, the rows the estimate of that plan sums again, and the chosen specs (the hand
    layout's either way: the whole pair holds more bytes and flops per device, ``choose.best``). No compile."""
    m = _LinenStack(shape)
    x = jax.ShapeDtypeStruct((ROWS, T, D), jnp.float32)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2, "model": 4}, model=m, sample=(x,))
    twice = []
    for row in ("o", "wo") if shape != "mlp" else ("wo",):
        d = p.decisions[f"params/layers_0/{row}/kernel"]
        split = next(a for a in d.alternatives if a.name == "Megatron split")
        sums = [c for c in split.collectives if "row: sum partial outputs" in c]
        assert len(sums) == 1 and split.chosen and d.spec == P("model", None)
        if sums[0].endswith(" x2 (row: sum partial outputs (forward, again in the remat recompute))"):
            twice.append(row)
    assert twice == resummed
    e = tpflax.estimate(p, optax.sgd(0.1), model=m, sample=(x,), loss=_loss, backend="cpu")
    again = {i.why.split(":")[0] for i in e.items if "again in the remat recompute" in i.why}
    assert sorted(again) == [f"row params/layers_*/{r}/kernel" for r in resummed]


class _CutHeads(nn.Module):
    """A pre-norm block whose fused qkv holds 6 heads of 24 (144 wide): on model=4 its pair is cut across heads or
    kept whole, and step time decides (``choose.best``: the cut moves whole outputs)."""

    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        qkv = nn.Dense(3 * d, name="qkv")(nn.LayerNorm(name="ln1")(x)).reshape(b, t, 3, 6, d // 6)
        x = x + nn.Dense(d, name="proj")(jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
                                         .reshape(b, t, d))
        return x + nn.Dense(d, name="fc2")(nn.gelu(nn.Dense(4 * d, name="fc1")(nn.LayerNorm(name="ln2")(x))))


class _CutHeadsStack(nn.Module):
    remat: bool

    @nn.compact
    def __call__(self, x):
        for i in range(LAYERS):
            x = (nn.remat(_CutHeads) if self.remat else _CutHeads)(name=f"layers_{i}")(x)
        return x


def test_remat_resum_tips_a_cut_heads_pair_whole():
    """The one choice the re-sum changes: a heads-cut attention pair priced against keeping it whole by step time
    (tpu-v5e). Without remat the cut is the cheaper (3.48 against 3.60 us for the pair); under ``nn.remat`` its proj
    sum runs again in the recompute (4.03 us) and the pair stays whole, as the estimate prices the cut. Before,
    both plans cut the heads. Measured on XLA:CPU data=2,model=4 (8 x 32 tokens, adamw): whole, 0.57x the cut's
    compiled collectives for 1.63x its bytes and 2.00x its flops per device. No compile."""
    x = jax.ShapeDtypeStruct((8, 32, 144), jnp.float32)
    specs = {}
    for remat in (False, True):
        m = _CutHeadsStack(remat)
        p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), x), {"data": 2, "model": 4}, model=m,
                        sample=(x,), batch=(x,))
        specs[remat] = (p.decisions["params/layers_0/qkv/kernel"].spec, p.decisions["params/layers_0/proj/kernel"].spec)
    assert specs == {False: (P(None, "model"), P("model", None)), True: (P(None, None), P(None, None))}


def test_unread_rows_of_a_deep_stack_take_one_pass(monkeypatch):
    """``Recompute.unread`` reads a deep model's layer calls once, not once per (row, norm) pair: an 80-layer
    Llama's ``suggest_mesh`` (the README's 256-device example) spent a third of its pricing there, pairwise
    (~1,200 ``repeated_block`` calls per layer over 46 candidates). The answer is the same: a pre-norm block's
    attention output is read by its MLP norm (summed again), its MLP output by no norm of its own block."""
    from tpflax._src.cost import residual
    from tpflax._src.cost.records import Act

    layers, act = 80, Act(((2, 8, 16),), (2, 8, 16), "float32", 4)
    calls = {"embed": [act]}
    for i in range(layers):
        for name in ("attention_norm", "attn/q_proj", "attn/o_proj", "attn", "ffn_norm", "mlp/up_proj",
                     "mlp/down_proj", "mlp"):
            calls[f"layers_{i}/{name}"] = [act]
        calls[f"layers_{i}"] = [act]
    norms = frozenset(f"layers_{i}/{n}" for i in range(layers) for n in ("attention_norm", "ffn_norm"))
    seen = []
    counted = residual.repeated_block
    monkeypatch.setattr(residual, "repeated_block", lambda *a: seen.append(a) or counted(*a))
    unread = residual.Recompute(calls, norms, {}).unread({"layers_0/attn/o_proj": "attention",
                                                          "layers_0/mlp/down_proj": "dense"})
    assert unread == {"layers_*/mlp/down_proj", "layers_*/mlp"}
    assert len(seen) <= 2 * len(calls)  # pairwise: 26,242 for these 721 calls
