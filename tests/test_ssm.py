"""A Mamba-style selective state-space LM, written in linen as public JAX/Flax Mamba ports write it.

Each block: RMSNorm -> ``in_proj`` (d -> [x | z]) -> depthwise causal conv1d on x -> SiLU -> ``x_proj``
(d_inner -> [dt | B | C]) -> ``dt_proj`` + softplus -> a selective scan (``jax.lax.associative_scan``)
with ``A_log`` and ``D`` -> y * silu(z) -> ``out_proj``. The Megatron layout splits d_inner: ``in_proj``
a column read by two rows (``x_proj`` and, through the scan, ``out_proj``), ``dt_proj`` a column into
``out_proj``, the conv, ``A_log`` and ``D`` per channel. Before: the trace hit a ZeroDivisionError on
the scan's empty slice; past it, every kernel stayed whole ("its output feeds 2 contractions"): 4.5x
the hand layout's flops per device and 3.8x its peak on data=2,model=4.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA
from jax.sharding import PartitionSpec as P

import tpflax

D, DI, DS, DTR, DC, V = 64, 128, 16, 8, 4, 128
SAMPLE = (jax.ShapeDtypeStruct((8, 16), jnp.int32),)


def selective_ssm(mod: nn.Module, h, x, z):
    """The block after ``in_proj``, inside ``mod``'s compact call: conv1d on x, x_proj, dt_proj, the selective
    scan with ``A_log`` and ``D``, gated by z, ``out_proj``, added to the residual ``h``
    (benchmarks/fused_xz.py calls it with other ways of computing x and z)."""
    x = nn.silu(nn.Conv(DI, (DC,), feature_group_count=DI, padding=((DC - 1, 0),), name="conv1d")(x))
    return h + nn.Dense(D, use_bias=False, name="out_proj")(_scan(mod, x) * nn.silu(z))


def _scan(mod: nn.Module, x):
    """The selective scan of the conv's output ``x``, inside ``mod``'s compact call: x_proj, dt_proj, ``A_log``
    and ``D``."""
    dt, b, c = jnp.split(nn.Dense(DTR + 2 * DS, use_bias=False, name="x_proj")(x), [DTR, DTR + DS], -1)
    dt = jax.nn.softplus(nn.Dense(DI, name="dt_proj")(dt))
    a = -jnp.exp(mod.param("A_log", lambda k, s: jnp.log(jnp.tile(jnp.arange(1.0, DS + 1), (DI, 1))),
                            (DI, DS)))
    da, dbx = jnp.exp(dt[..., None] * a), (dt * x)[..., None] * b[:, :, None, :]
    _, hs = jax.lax.associative_scan(lambda u, w: (u[0] * w[0], w[0] * u[1] + w[1]), (da, dbx), axis=1)
    return jnp.einsum("blds,bls->bld", hs, c) + x * mod.param("D", nn.initializers.ones, (DI,))


class MambaBlock(nn.Module):
    @nn.compact
    def __call__(self, h):
        x, z = jnp.split(nn.Dense(2 * DI, use_bias=False, name="in_proj")(nn.RMSNorm(name="norm")(h)), 2, -1)
        return selective_ssm(self, h, x, z)


class Mamba(nn.Module):
    block: type = MambaBlock

    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        for i in range(2):
            h = self.block(name=f"layers_{i}")(h)
        return nn.Dense(V, use_bias=False, name="lm_head")(nn.RMSNorm(name="norm_f")(h))


def _loss(out, ids):
    return jnp.mean(out ** 2)


# the hand layout's d_inner split (in_proj split naively over its fused [x | z], as the plan does)
HAND = [(r"in_proj/kernel$", P(None, "model")), (r"conv1d/kernel$", P(None, None, "model")),
        (r"conv1d/bias$", P("model")), (r"x_proj/kernel$", P("model", None)), (r"dt_proj/kernel$", P(None, "model")),
        (r"dt_proj/bias$", P("model")), (r"A_log$", P("model", None)), (r"/D$", P("model")),
        (r"out_proj/kernel$", P("model", None)), (r"lm_head/kernel$", P(None, "model"))]
MESH = {"data": 2, "model": 4}


@pytest.fixture(scope="module")
def plans():
    m = Mamba()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    traced = tpflax.plan(v, MESH, model=m, sample=SAMPLE)
    # the hand layout, with the planner's choices for what it leaves open (the table, the norms)
    hand = tpflax.plan(v, MESH, rules=HAND + [(p, d.spec) for p, d in traced.decisions.items()
                                              if not any(r in p for r in ("layers_", "lm_head"))])
    return m, traced, hand


def test_the_traced_plan_is_the_megatron_layout(plans):
    # x_proj and out_proj both sum in_proj's split output: one pair, two rows; dt_proj's output reaches only
    # out_proj: a column of the same pair; A_log and D meet dt_proj's and the conv's split channels
    _, traced, hand = plans
    for path, d in hand.decisions.items():
        assert traced.decisions[path].spec == d.spec, (path, traced.decisions[path].reason)
    d = traced.decisions
    assert d["params/layers_0/out_proj/kernel"].pair == d["params/layers_0/in_proj/kernel"].pair \
        == d["params/layers_0/x_proj/kernel"].pair == d["params/layers_0/dt_proj/kernel"].pair
    assert d["params/layers_0/A_log"].reason.startswith("per-channel parameter (traced: combined elementwise "
                                                        "with the output of layers_0/dt_proj/kernel)")


@pytest.fixture(scope="module")
def compiled(plans):
    """The traced plan's (the hand layout's) compiled step and estimate."""
    m, traced, _ = plans
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(m, traced, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, traced, mesh, compiler_options=COMM_XLA)
    return dr, tpflax.estimate(traced, optax.adamw(1e-3), model=m, sample=SAMPLE, loss=_loss, backend="cpu")


def test_the_traced_plan_compiles_to_the_hand_layouts_numbers(compiled):
    dr, e = compiled
    # kept whole, A_log and D had their updates split and gathered (39 KB of model all-gathers)
    assert "all-gather" not in dr.comm(), dr.comm()
    # measured -5.5% (the hand layout's too): the data-axis reductions XLA fuses, 22 KB under; since the scan's
    # B/C input gradients are priced, +0.3%
    assert abs(e.comm_total / dr.comm_total - 1) < 0.10, (e.comm, dr.comm())


def test_the_scans_b_and_c_input_gradients_are_summed_over_the_split_d_inner(compiled):
    # B is copied over d_inner ((dt * x)[..., None] * B[:, :, None, :]) and C summed against the states over it
    # (blds,bls->bld): backward, both gradients sum d_inner, split on the hand layout, and XLA all-reduces them
    # (f32[4, 16, 16] each per layer, in one tuple with dt_proj's input gradient). The estimate priced neither:
    # C's sum was dropped for reading in_proj's fused [x | z] (though dt_proj's and the conv's channels split it
    # too), B's broadcast product was not traced: the model all-reduces 12.7% low (V07: 15% on a Vim). Now to the
    # byte, but XLA's of the loss's scalar (6 B) and the split head's softmax statistics, priced for a
    # cross-entropy this mean-square loss does not compute (1,152 B)
    dr, e = compiled
    head = sum(i.ring_bytes * i.count for i in e.items if i.kind == "all-reduce" and "split softmax" in i.why)
    assert head == 3 * 2 * 3 / 4 * 256
    assert e.comm["all-reduce"]["model"] - head == dr.comm()["all-reduce"]["model"] - 6, (e.comm, dr.comm())


def test_associative_scan_traces():
    # the scan's odd elements of a length-1 level are an empty slice: it carries nothing (was 0 / 0)
    flow = tpflax.dataflow(Mamba(), SAMPLE, jax.eval_shape(Mamba().init, jax.random.key(0), *SAMPLE))
    assert ("params/layers_0/dt_proj/kernel", "params/layers_0/out_proj/kernel") in {(e.src, e.dst) for e in flow.edges}


def test_a_per_channel_leaf_split_on_fsdp_is_no_lone_column():
    # A_log P('model', 'fsdp'): its last dim split over fsdp, not the tensor axis; priced as a column
    # without a partner it added 32 KB of all-reduces and 6 KB of gathers (+17% of the compiled collectives)
    m = Mamba()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    p = tpflax.plan(v, {"fsdp": 2, "model": 4}, model=m, sample=SAMPLE)
    assert p.decisions["params/layers_0/A_log"].spec == P("model", "fsdp")
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=SAMPLE, loss=_loss, backend="cpu")
    assert not [i for i in e.items if "without a row partner" in i.why], [i.why for i in e.items]


def test_whole_leaves_beside_a_split_pair_price_their_update_gathers():
    # in_proj and out_proj split, the rest of the block whole (the old tree-only layout): x_proj reads
    # in_proj's split output, dt_proj's output reaches the split out_proj, the conv, A_log and D meet
    # them per channel: their gradients come out split, so XLA:CPU updates them split and gathers each
    # parameter and its two adam moments (160 KB here). The estimate had none of it: -28% of the compiled
    # collectives; now the gathers to the byte. XLA:CPU also sums those split gradients over the batch on their
    # shard (108 KB of data all-reduces, counted whole until the MM-DiT round: 57 KB over, which hid what follows).
    # x_proj, whole, contracts in_proj's split output and XLA sums its partial outputs (f32[4,16,40] per layer,
    # forward), and dt_proj's output is read split, so its input gradient comes out partial (backward): priced
    # since (cost/whole.py); before, 61 KB of model all-reduces were missing, -10.1% of the total; the scan's B/C
    # input gradients, partial sums over the split d_inner of two activations' product, summed in one tuple with
    # dt_proj's (24 KB, -3.9% of the total), since too
    m = Mamba()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    p = tpflax.plan(v, MESH, rules=[HAND[0], HAND[-2], HAND[-1], (r".*", "replicate")])
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    e = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=SAMPLE, loss=_loss, backend="cpu")
    assert e.comm["all-gather"]["model"] == dr.comm()["all-gather"]["model"], (e.comm, dr.comm())
    batch = sum(v for k, v in e.comm["all-reduce"].items() if "data" in k)
    assert batch == pytest.approx(dr.comm()["all-reduce"]["data"], rel=0.02), (e.comm, dr.comm())
    assert abs(e.comm_total / dr.comm_total - 1) < 0.10, (e.comm, dr.comm())


def test_update_gathers_count_the_optimizers_own_moments():
    # the same layout under sgd with momentum: XLA:CPU gathers each such leaf and its one momentum trace
    # (2 copies, 109,056 B); the estimate counted adam's three for any stateful optimizer (163,584 B, +50%)
    m = Mamba()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    p = tpflax.plan(v, MESH, rules=[HAND[0], HAND[-2], HAND[-1], (r".*", "replicate")])
    opt = optax.sgd(1e-2, momentum=0.9)
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(m, p, mesh, opt, sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    e = tpflax.estimate(p, opt, model=m, sample=SAMPLE, loss=_loss, backend="cpu")
    assert e.comm["all-gather"]["model"] == dr.comm()["all-gather"]["model"], (e.comm, dr.comm())


class _SplitInputBlock(nn.Module):
    # in_proj written as two kernels, in_x and in_z (d -> d_inner each), as some ports do
    @nn.compact
    def __call__(self, h):
        x = nn.RMSNorm(name="norm")(h)
        return selective_ssm(self, h, nn.Dense(DI, use_bias=False, name="in_x")(x),
                             nn.Dense(DI, use_bias=False, name="in_z")(x))


def test_the_tree_splits_the_causal_conv_and_x_proj_with_the_column_beside_them():
    # From the tree, the depthwise conv1d (4, 1, 128) follows in_x's split 128 features, x_proj (128 -> 40)
    # joins its pair as a row and dt_proj (8 -> 128) as a column, and D, inside the block, follows: the hand
    # layout. The tree kept the conv, x_proj, dt_proj and D whole, and XLA gathered in_x's output for them
    # (on a sibling Mamba with a separate A_log pairing: 1.20x the hand layout's collectives)
    m = Mamba(_SplitInputBlock)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    tree = tpflax.plan(v, MESH, batch=SAMPLE)
    hand = tpflax.plan(v, MESH, rules=[(r"in_(x|z)/kernel$", P(None, "model")), *HAND[1:]])
    for path, d in hand.decisions.items():
        if "layers_" in path:
            assert tree.decisions[path].spec == d.spec, (path, tree.decisions[path].reason)
    d = tree.decisions
    assert d["params/layers_0/x_proj/kernel"].pair == d["params/layers_0/in_x/kernel"].pair


def test_the_tree_splits_the_causal_conv_and_x_proj_beside_a_fused_in_proj():
    # The canonical mixer: one in_proj (d -> 2 d_inner, [x | z]) whose row out_proj reads d_inner. The conv1d,
    # x_proj, dt_proj and A_log followed only a column exactly d_inner wide (in_x above), so from the tree they
    # stayed whole beside the fused in_proj's split and XLA gathered its x piece for them (a Vision-Mamba with Vim's
    # names and an nn.Conv conv1d: 1.20x the hand layout's collectives, XLA:CPU data=2,model=4). They now follow
    # the fused column's d_inner-wide pieces: the hand layout.
    m = Mamba()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    tree = tpflax.plan(v, MESH, batch=SAMPLE)
    hand = tpflax.plan(v, MESH, rules=HAND)
    for path, d in hand.decisions.items():
        if "layers_" in path:
            assert tree.decisions[path].spec == d.spec, (path, tree.decisions[path].reason)
    d = tree.decisions
    assert d["params/layers_0/x_proj/kernel"].pair == d["params/layers_0/in_proj/kernel"].pair
    assert d["params/layers_0/dt_proj/kernel"].pair == d["params/layers_0/out_proj/kernel"].pair


class _SubScan(nn.Module):
    # the selective scan in a sub-module of its own (a bidirectional Vision-Mamba's fwd/bwd branch), with a raw
    # (taps, d_inner) causal conv weight, x_proj, dt_proj, A_log and D
    @nn.compact
    def __call__(self, x):
        w = self.param("conv1d_weight", nn.initializers.normal(0.2), (DC, DI))
        xp = jnp.pad(x, ((0, 0), (DC - 1, 0), (0, 0)))
        x = nn.silu(sum(xp[:, i:i + x.shape[1]] * w[i] for i in range(DC)))
        return _scan(self, x)


class _SubScanBlock(nn.Module):
    @nn.compact
    def __call__(self, h):
        x, z = jnp.split(nn.Dense(2 * DI, use_bias=False, name="in_proj")(nn.RMSNorm(name="norm")(h)), 2, -1)
        return h + nn.Dense(D, use_bias=False, name="out_proj")(_SubScan(name="scan")(x) * nn.silu(z))


def test_the_tree_splits_a_sub_modules_scan_kernels_with_the_inner_features():
    # The scan's kernels in a sub-module of the in_proj -> out_proj block: the conv weight and D followed the pair's
    # split inner features, but x_proj (128 -> 40), dt_proj (8 -> 128) and A_log (128, 16) stayed whole ("dense
    # layer without a column/row partner"): a bidirectional Vision-Mamba 1.18x the hand layout's collectives
    # (XLA:CPU data=2,model=4). Now x_proj and A_log join the pair as rows on them, dt_proj as a column.
    m = Mamba(_SubScanBlock)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    d = tpflax.plan(v, MESH, batch=SAMPLE).decisions
    want = {"in_proj/kernel": P(None, "model"), "out_proj/kernel": P("model", None),
            "scan/conv1d_weight": P(None, "model"), "scan/x_proj/kernel": P("model", None),
            "scan/dt_proj/kernel": P(None, "model"), "scan/dt_proj/bias": P("model"),
            "scan/A_log": P("model", None), "scan/D": P("model")}
    for leaf, spec in want.items():
        assert d[f"params/layers_0/{leaf}"].spec == spec, (leaf, d[f"params/layers_0/{leaf}"].reason)
    assert d["params/layers_0/scan/x_proj/kernel"].pair == d["params/layers_0/in_proj/kernel"].pair


class _GatedHeads(nn.Module):
    # attention whose output is gated per head dim by a gate shared by the heads, before a (heads, head_dim,
    # d) output projection: the gate's output reaches the row only on head_dim, which its pair does not split
    @nn.compact
    def __call__(self, ids):
        h = nn.Embed(V, D, name="embed")(ids)
        x = nn.RMSNorm(name="norm")(h)
        q, k, v = (nn.DenseGeneral((4, 16), use_bias=False, name=n)(x) for n in ("q", "k", "v"))
        o = jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k), -1), v)
        g = jax.nn.sigmoid(nn.Dense(16, use_bias=False, name="gate")(x))
        h = h + nn.DenseGeneral(D, axis=(-2, -1), use_bias=False, name="o")(o * g[:, :, None, :])
        return nn.Dense(V, use_bias=False, name="head")(h)


def test_a_column_joins_a_row_only_on_the_dim_its_pair_splits():
    # o is split on heads; the gate (output: head_dim) joined its pair split on head_dim, and XLA gathered
    # its output back (6,144 B of all-gathers, 218,378 B of collectives); whole: none, 190,730 B
    m = _GatedHeads()
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    p = tpflax.plan(v, MESH, model=m, sample=SAMPLE)
    assert p.decisions["params/o/kernel"].spec == P("model", None, None)
    assert p.decisions["params/gate/kernel"].spec == P(None, None), p.decisions["params/gate/kernel"].reason
    mesh = tpflax.make_mesh(MESH)
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=_loss)
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    assert "all-gather" not in dr.comm(), dr.comm()


def test_a_rule_forcing_the_row_beside_the_causal_conv_plans():
    # the tree's follow-up of in_x's split looked the pair's row up among the undecided leaves: forced by a rule,
    # out_proj was not there and plan() raised a bare StopIteration
    m = Mamba(_SplitInputBlock)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    p = tpflax.plan(v, MESH, rules=[(r"out_proj/kernel$", P("model", None))])
    assert p.spec("params/layers_0/conv1d/kernel") == P(None, None, "model")


class _ScanBlock(nn.Module):
    # MambaBlock with the selective scan of most JAX Mamba ports (Jamba's too): a jax.lax.scan over time whose
    # state starts from jnp.zeros and runs h = exp(dt * A) * h + dt * x * B
    @nn.compact
    def __call__(self, h):
        x, z = jnp.split(nn.Dense(2 * DI, use_bias=False, name="in_proj")(nn.RMSNorm(name="norm")(h)), 2, -1)
        x = nn.silu(nn.Conv(DI, (DC,), feature_group_count=DI, padding=((DC - 1, 0),), name="conv1d")(x))
        dt, b, c = jnp.split(nn.Dense(DTR + 2 * DS, use_bias=False, name="x_proj")(x), [DTR, DTR + DS], -1)
        dt = jax.nn.softplus(nn.Dense(DI, name="dt_proj")(dt))
        a = -jnp.exp(self.param("A_log", lambda k, s: jnp.log(jnp.tile(jnp.arange(1.0, DS + 1), (DI, 1))),
                                (DI, DS)))

        def step(s, inp):
            xt, dtt, bt, ct = inp
            s = jnp.exp(dtt[..., None] * a) * s + (dtt * xt)[..., None] * bt[:, None, :]
            return s, jnp.einsum("bds,bs->bd", s, ct)

        _, ys = jax.lax.scan(step, jnp.zeros((x.shape[0], DI, DS)), tuple(t.swapaxes(0, 1) for t in (x, dt, b, c)))
        y = ys.swapaxes(0, 1) + x * self.param("D", nn.initializers.ones, (DI,))
        return h + nn.Dense(D, use_bias=False, name="out_proj")(y * nn.silu(z))


def test_a_per_timestep_scan_is_the_megatron_layout(plans):
    # the state's first walk (zeros, no tags) made ``exp(dt A) * h + dt x B`` look like x_proj's, in_proj's and the
    # conv's outputs joining a residual stream, and ``y + x * D`` like dt_proj's: every mixer kernel stayed whole
    # (3.1x the hand layout's bytes, 4.3x its flops on the reproducer of this block, two layers)
    m = Mamba(_ScanBlock)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    traced = tpflax.plan(v, MESH, model=m, sample=SAMPLE)
    for path, d in plans[2].decisions.items():
        assert traced.decisions[path].spec == d.spec, (path, traced.decisions[path].reason)


def test_a_state_scanned_from_zeros_joins_no_stream():
    # walked again from the tags the body puts in it, the state holds x_proj's B: the add onto it joins nothing;
    # only the out_proj rows are added to the residual stream (was also x_proj's output, added to [])
    m = Mamba(_ScanBlock)
    flow = tpflax.dataflow(m, SAMPLE, jax.eval_shape(m.init, jax.random.key(0), *SAMPLE))
    paths = {u.id: u.path for u in flow.uses}
    assert {paths[k[0]] for k in flow.added} == {f"params/layers_{i}/out_proj/kernel" for i in range(2)}, flow.added


class _SSD(nn.Module):
    # a Mamba-2 (SSD) mixer: x's heads mixed over time by an einsum with the per-head dt, the per-head skip x * D,
    # a gated RMSNorm over the inner width, out_proj
    @nn.compact
    def __call__(self, h):
        u = nn.RMSNorm(name="norm_in")(h)
        b, s, _ = u.shape
        x = nn.Dense(DI, use_bias=False, name="in_x")(u).reshape(b, s, 8, DI // 8)
        z = nn.Dense(DI, use_bias=False, name="in_z")(u)
        dt = jax.nn.softplus(nn.Dense(8, name="in_dt")(u))
        w = jnp.exp(dt[:, :, None, :] - dt[:, None, :, :]) * jnp.tril(jnp.ones((s, s)))[None, :, :, None]
        y = jnp.einsum("bijh,bjhp->bihp", w, x) + x * self.param("D", nn.initializers.ones, (8,))[:, None]
        y = nn.RMSNorm(name="norm")(y.reshape(b, s, DI) * nn.silu(z))
        return h + nn.Dense(D, use_bias=False, name="out_proj")(y)


def test_a_per_head_skip_before_a_norm_is_no_stream_join():
    # at ``y + x * D`` y carried in_dt's head tag and the skip did not: taken for a branch joining a stream, the
    # norm after it ended every tag on the inner width and in_x, in_z, out_proj stayed whole (traced: 1.6-1.8x
    # the hand split's bytes, 2.6x its flops on a Mamba-2 LM; the tree pairs them by name)
    m = Mamba(_SSD)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    d = tpflax.plan(v, MESH, model=m, sample=SAMPLE).decisions
    specs = {k: d[f"params/layers_0/{k}"].spec for k in ("in_x/kernel", "in_z/kernel", "in_dt/kernel", "in_dt/bias",
                                                           "out_proj/kernel", "D", "norm/scale")}
    assert specs == {"in_x/kernel": P(None, "model"), "in_z/kernel": P(None, "model"), "in_dt/kernel": P(None, "model"),
                     "in_dt/bias": P("model"), "out_proj/kernel": P("model", None), "D": P("model"),
                     "norm/scale": P("model")}, d["params/layers_0/in_x/kernel"].reason


def test_a_traced_factor_per_head_is_split_with_the_heads():
    # in_dt (8 outputs, one per head) reaches out_proj unreshaped: traced, keys and values show their heads or end
    # at the scores, so it is no GQA key/value whose heads a split would cut; it was kept whole ("taken for GQA
    # key/value heads, whose count the trace shows none"), 1.02x the hand split's bytes, 1.06x its collectives (as
    # measured then; by the sixtieth round whole was 1.022 / 0.891 / 1.013 of the split, the same trade as xLSTM-7B's
    # input gates: cost alone cannot tell them apart, and the split stays, as the hand layout has it)
    m = Mamba(_SSD)
    v = jax.eval_shape(m.init, jax.random.key(0), *SAMPLE)
    d = tpflax.plan(v, MESH, model=m, sample=SAMPLE).decisions
    assert d["params/layers_0/in_dt/kernel"].spec == P(None, "model"), d["params/layers_0/in_dt/kernel"].reason
    assert d["params/layers_0/in_dt/kernel"].pair == d["params/layers_0/out_proj/kernel"].pair
