"""User-written MoE blocks with stacked expert kernels on a mesh without an expert axis.

A Mixtral-style block (top-2 of the router, a capacity-bounded one-hot dispatch per sequence into
``(E, batch, C, d)``, gated experts ``w1``/``w3`` ``(E, d, f)`` and ``w2`` ``(E, f, d)``) and a Switch-style
one (top-1 over the batch's tokens as one group into ``(E, C, d)``, the batch summed away). On
data=2,model=4 the experts are cheaper split over the tensor axis (expert parallelism on ``model``) than
Megatron inside each expert: each device runs its own experts on its slice of the buffer, and only the
combine (forward) and the dispatch's transpose (backward) sum, at the layer's tokens, where Megatron sums
the buffer (2.5 rows per token here, capacity factor 1.25 times top-2) once forward and once per column
backward. The chooser prices both (and whole experts) and keeps the cheaper; the estimate prices what the
compiled step runs.
"""

from __future__ import annotations

import functools
import importlib.util

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA
from jax.sharding import PartitionSpec as P

import tpflax

MESH = {"data": 2, "model": 4}
E, D, F, V = 8, 32, 64, 64
TOK = jax.ShapeDtypeStruct((4, 8), jnp.int32)
INIT = nn.initializers.normal(0.02)


def _slots(onehot, capacity):
    """``(..., n, e)`` one-hot choices -> ``(..., n, e, capacity)`` one-hot slots; overflow dropped."""
    pos = (jnp.cumsum(onehot, axis=-2) - 1) * onehot
    return jax.nn.one_hot(pos.astype(jnp.int32), capacity) * (onehot * (pos < capacity))[..., None]


class Mixtral(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        top_w, top_i = jax.lax.top_k(nn.Dense(E, use_bias=False, name="gate")(x), 2)
        top_w = jax.nn.softmax(top_w, axis=-1)
        cap = int(1.25 * t * 2 / E)
        slots = _slots(jax.nn.one_hot(top_i, E).reshape(b, t * 2, E), cap).reshape(b, t, 2, E, cap)
        dispatch, combine = slots.sum(2), (slots * top_w[..., None, None]).sum(2)
        w1, w3 = (self.param(n, INIT, (E, d, F)) for n in ("w1", "w3"))
        w2 = self.param("w2", INIT, (E, F, d))
        xe = jnp.einsum("btd,btec->ebcd", x, dispatch)
        h = nn.silu(jnp.einsum("ebcd,edf->ebcf", xe, w1)) * jnp.einsum("ebcd,edf->ebcf", xe, w3)
        return jnp.einsum("ebcd,btec->btd", jnp.einsum("ebcf,efd->ebcd", h, w2), combine)


class Switch(nn.Module):
    @nn.compact
    def __call__(self, x):
        b, t, d = x.shape
        tok = x.reshape(b * t, d)
        gate, idx = jax.lax.top_k(jax.nn.softmax(nn.Dense(E, use_bias=False, name="router")(tok)), 1)
        dispatch = _slots(jax.nn.one_hot(idx[:, 0], E), b * t // E)  # (n, e, c): capacity grows with the batch
        wi, wo = self.param("wi", INIT, (E, d, F)), self.param("wo", INIT, (E, F, d))
        xe = jnp.einsum("nd,nec->ecd", tok, dispatch)
        ye = jnp.einsum("ecf,efd->ecd", nn.relu(jnp.einsum("ecd,edf->ecf", xe, wi)), wo)
        return jnp.einsum("ecd,nec->nd", ye, dispatch * gate[:, :, None]).reshape(b, t, d)


class LM(nn.Module):
    moe: type
    block: str = "moe"

    @nn.compact
    def __call__(self, tok):
        x = nn.Embed(V, D, name="embed")(tok)
        x = x + self.moe(name=self.block)(nn.RMSNorm(name="norm")(x))
        return nn.Dense(V, use_bias=False, name="head")(x)


KERNELS = {Mixtral: ("w1", "w3", "w2"), Switch: ("wi", "wo")}


@pytest.fixture(scope="module", params=[Mixtral, Switch], ids=["mixtral", "switch"])
def traced(request):
    m = LM(request.param)
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    p = tpflax.plan(v, MESH, model=m, sample=(TOK,), batch=(TOK,))
    return m, v, p, KERNELS[request.param]


def test_experts_split_over_the_tensor_axis(traced):
    _, _, p, kernels = traced
    assert {k: p.decisions[f"params/moe/{k}"].spec for k in kernels} == dict.fromkeys(kernels, P("model", None, None))
    assert {p.decisions[f"params/moe/{k}"].strategy for k in kernels} == {"expert"}
    pair = {p.decisions[f"params/moe/{k}"].pair for k in kernels}
    assert len(pair) == 1 and next(pr for pr in p.pairs if pr.id in pair).sharded


def test_the_runner_up_is_megatron_inside_each_expert(traced):
    _, _, p, kernels = traced
    d = p.decisions[f"params/moe/{kernels[-1]}"]
    alts = {a.name: a for a in d.alternatives}
    assert set(alts) == {"Megatron in each expert", "experts over the tensor axis", "replicate"}
    chosen, runner = alts["experts over the tensor axis"], alts["Megatron in each expert"]
    assert chosen.chosen and not runner.chosen
    assert runner.spec == (P(None, "model", None))  # the row's ffn dim
    # the same bytes and flops per device; Megatron sums the buffer (more rows than tokens) and once per column
    assert runner.bytes_per_device == chosen.bytes_per_device and runner.flops == chosen.flops
    assert runner.comm_bytes > chosen.comm_bytes
    assert "runner-up Megatron in each expert" in d.reason


def test_the_tree_alone_keeps_megatron_inside_each_expert(traced):
    # untraced, the chooser cannot tell a dispatched buffer from an einsum over every token (where the two
    # sum alike): it keeps the first of the tied layouts, as before
    _, v, _, kernels = traced
    p = tpflax.plan(v, MESH, batch=(TOK,))
    assert p.decisions[f"params/moe/{kernels[0]}"].spec == P(None, None, "model")
    assert p.decisions[f"params/moe/{kernels[-1]}"].spec == P(None, "model", None)
    # and says why: the tree cannot tell a dispatch from sorted or looped experts, the trace can
    assert "untraced: experts over the tensor axis" in p.decisions[f"params/moe/{kernels[-1]}"].reason


def _estimated_and_compiled(m, p, shape=MESH, target=None):
    """``(estimate, dry run)`` of the adamw step of ``m`` under ``p`` on ``shape`` (:data:`MESH`; XLA:CPU,
    collectives; or compiled for a TPU ``target``)."""
    mesh = tpflax.make_mesh(shape, target=target)
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(TOK,))
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=None if target else COMM_XLA)
    return tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(TOK,), backend="tpu" if target else "cpu",
                           target=target), dr


def test_the_estimate_matches_the_compiled_collectives(traced, devices):
    m, _, p, _ = traced
    est, dr = _estimated_and_compiled(m, p)
    # over model: the combine's and the dispatch transpose's f32[tokens, d] sums (and the embedding's and the
    # head's); unmodelled, the router weights' gradient sum (top-k x 4 B a token) and the loss's softmax max and sum
    got, want = est.comm["all-reduce"]["model"], dr.comm()["all-reduce"]["model"]
    assert abs(got / want - 1) < 0.05, (got, want, dr.comm(), est.comm)
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())
    assert not any("product of two activations" in n for n in est.notes), est.notes


@pytest.mark.parametrize("rules", [[(r".*", "replicate")], [(r"moe/w", P(None, "data", None)), (r".*", "replicate")]],
                         ids=["replicated", "experts-fsdp"])
def test_a_rules_layout_of_batch_free_experts_is_estimated_as_compiled(rules, devices):
    # no pair holds the experts here: each device of the batch axis still runs them on the whole summed
    # buffer, so XLA sums the dispatch (forward) and the output's gradient (backward), f32[E, C, d] over
    # data, and no expert weight's gradient; before, the estimate summed those gradients: 2.7x the compiled
    m = LM(Switch)
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    p = tpflax.plan(v, MESH, rules=rules)
    est, dr = _estimated_and_compiled(m, p)
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())


class SharedExperts(nn.Module):
    """DeepSeek's shared experts beside the routed ones, square (two experts of ``D / 2``) and named
    ``shared_w1``, ``shared_w3`` and ``shared_w2``."""

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.Dense(D, use_bias=False, name="shared_w1")(x)) * nn.Dense(D, use_bias=False, name="shared_w3")(x)
        return Mixtral(name="routed")(x) + nn.Dense(D, use_bias=False, name="shared_w2")(h)


def test_prefixed_names_tell_square_kernels_roles_from_the_tree():
    # square kernels take their roles from their names: 'shared_w1' is Llama's 'w1' with a prefix, a column.
    # Unread, the three were left whole (1.60x the hand layout's bytes, 1.83x its flops on a DeepSeek block)
    m = LM(SharedExperts)
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), TOK), MESH, batch=(TOK,))
    assert [p.spec(f"params/moe/shared_w{i}/kernel") for i in (1, 3, 2)] == [P(None, "model")] * 2 + [P("model", None)]


def test_rules_forcing_the_runner_up_keep_the_pairs_roles(traced):
    # traced, the chooser splits the experts over model; rules forcing Megatron inside each expert (its
    # runner-up) still make a column -> row pair, which the estimate prices as one (Megatron's sums). Matched
    # only against the chooser's pick, the forced kernels were left without a pair
    m, v, _, kernels = traced
    *cols, row = kernels
    rules = [(rf"moe/({'|'.join(cols)})$", P(None, None, "model")), (rf"moe/{row}$", P(None, "model", None))]
    p = tpflax.plan(v, MESH, model=m, sample=(TOK,), batch=(TOK,), rules=rules)
    got = {k: (p.decisions[f"params/moe/{k}"].role, p.decisions[f"params/moe/{k}"].pair) for k in kernels}
    pid = got[row][1]
    assert pid is not None and got == {**{c: ("column", pid) for c in cols}, row: ("row", pid)}
    assert next(pr for pr in p.pairs if pr.id == pid).sharded


class FlatExperts(nn.Module):
    """DBRX's experts: ``w1``, ``v1`` and ``w2`` stored flat ``(E * f, d)`` and reshaped to ``(E, f, d)`` where they
    are read, every token through every expert (``btd,efd->btef``), weighted by its top-2 gates. ``n``: the
    experts."""

    n: int = E

    @nn.compact
    def __call__(self, x):
        w1, v1, w2 = (self.param(k, INIT, (self.n * F, D)).reshape(self.n, F, D) for k in ("w1", "v1", "w2"))
        gates = jax.nn.softmax(nn.Dense(self.n, use_bias=False, name="router")(x), -1)
        mask = jax.nn.one_hot(jax.lax.top_k(gates, 2)[1], self.n).sum(-2) * gates
        h = nn.silu(jnp.einsum("btd,efd->btef", x, w1)) * jnp.einsum("btd,efd->btef", x, v1)
        return jnp.einsum("bted,bte->btd", jnp.einsum("btef,efd->bted", h, w2), mask)


@pytest.fixture(scope="module")
def flat():
    m = LM(FlatExperts)
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    return m, tpflax.plan(v, MESH, model=m, sample=(TOK,), batch=(TOK,))


def test_experts_stored_flat_split_on_the_stored_dim(flat):
    # the reshape (E * f, d) -> (E, f, d) lost f: w1 and v1 read as dense layers without a partner (kept whole) and
    # w2 split on d, 2.20x the bytes and 5.21x the collectives of the experts over model. f is the minor part of the
    # stored dim, so its contraction pairs the three on it, and a split of it over model (dividing E) holds whole
    # experts: expert parallelism on the tensor axis, as written by hand
    _, p = flat
    assert {k: p.decisions[f"params/moe/{k}"].spec for k in ("w1", "v1", "w2")} == dict.fromkeys(
        ("w1", "v1", "w2"), P("model", None))
    assert len({p.decisions[f"params/moe/{k}"].pair for k in ("w1", "v1", "w2")}) == 1


def test_flat_experts_are_estimated_as_compiled(flat, devices):
    # the layout by hand (the traced plan's, above): before, its estimate priced a loose pair gathering w1's output
    # and w2's input gradient, 2.29x the compiled collectives; compiled, the combine sums f32[tokens, d] forward and
    # w1's and v1's input gradients backward, over model
    m, _ = flat
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    p = tpflax.plan(v, MESH, rules=[(r"moe/(w1|v1|w2)$", P("model", None)), (r"embed", P("model", None)),
                                    (r"head", P(None, "model")), (r".*", P())])
    est, dr = _estimated_and_compiled(m, p)
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())


@pytest.mark.parametrize("n", [4, 6])
def test_the_tree_splits_all_three_flat_experts_like_the_hand_layout(n):
    # untraced, w1 (a column by name, stored (out, in)) paired with w2 (a row by shape), and v1, stored (E * f, d) like
    # w1 and named like nothing, read as a second row of nothing and stayed whole: 1.25x the bytes and 1.83x the
    # collectives of the hand split (4 experts on model=4; 1.21x/1.36x for 6). Stored like w1, it joins w1's pair;
    # 6 experts over 4 ranks straddle (the tree cannot see the reshape), which XLA compiles as the hand layout does
    m = LM(functools.partial(FlatExperts, n=n))
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), TOK), MESH, batch=(TOK,))
    ds = {k: p.decisions[f"params/moe/{k}"] for k in ("w1", "v1", "w2")}
    assert {k: d.spec for k, d in ds.items()} == dict.fromkeys(ds, P("model", None))
    assert len({d.pair for d in ds.values()}) == 1 and (ds["v1"].role, ds["w2"].role) == ("column", "row")


def test_six_flat_experts_over_four_ranks_split_in_straddling_blocks():
    # 6 experts stored flat (6 * f, d) over model=4: the reshape's 6 did not divide 4, taken for attention heads a split
    # would cut, and the pair was kept whole unpriced: 1.95x the bytes, 1.14x the collectives, 1.84x the flops of the
    # flat split written by hand (DBRX-style, d=64, f=128, data=2,model=4). XLA gathers the straddling blocks into 2
    # parts of 3 whole experts: priced so, the split wins
    m = LM(functools.partial(FlatExperts, n=6))
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), TOK), MESH, model=m, sample=(TOK,), batch=(TOK,))
    ds = {k: p.decisions[f"params/moe/{k}"] for k in ("w1", "v1", "w2")}
    assert {k: d.spec for k, d in ds.items()} == dict.fromkeys(ds, P("model", None))
    assert len({d.pair for d in ds.values()}) == 1 and ds["w2"].role == "row"
    alts = {a.name: a for a in ds["w2"].alternatives}
    assert set(alts) == {"experts straddled", "replicate"} and alts["experts straddled"].chosen
    assert alts["experts straddled"].bytes_per_device < alts["replicate"].bytes_per_device


def test_six_flat_experts_over_four_ranks_are_estimated_as_compiled(devices):
    # the estimate priced the straddling split as if each rank held its block: no gather of the blocks into whole
    # experts, each gradient summed over data at a quarter of the kernel, the combine over 4: 0.56x the compiled
    # collectives
    m = LM(functools.partial(FlatExperts, n=6))
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    p = tpflax.plan(v, MESH, rules=[(r"moe/(w1|v1|w2)$", P("model", None)), (r"embed", P("model", None)),
                                    (r"head", P(None, "model")), (r".*", P())])
    est, dr = _estimated_and_compiled(m, p)
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())
    gathers = [i for i in est.items if "straddle experts: gathered" in i.why]
    assert len(gathers) == 3 and {i.group_size for i in gathers} == {2}


def test_six_flat_experts_over_four_ranks_beside_fsdp_are_estimated_as_compiled(devices):
    # beside an fsdp split the straddling blocks were priced gathered from their fsdp shard: XLA gathers the fsdp
    # split first, for compute, then the tensor blocks into parts (f32[192, 64] over fsdp, then f32[384, 64] over
    # model, DBRX-style d=64, f=128): the estimate's model gathers were half the compiled, 0.91x its collectives
    m = LM(functools.partial(FlatExperts, n=6))
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    mesh = {"fsdp": 2, "model": 4}
    p = tpflax.plan(v, mesh, rules=[(r"moe/(w1|v1|w2)$", P("model", "fsdp")), (r"embed", P("model", "fsdp")),
                                    (r"head", P("fsdp", "model")), (r"router", P("fsdp", None)), (r".*", P())])
    est, dr = _estimated_and_compiled(m, p, mesh)
    gathers = [i for i in est.items if "straddle experts: gathered" in i.why]
    assert {i.size for i in gathers} == {6 * F * D * 4 // 4 * 2} and len(gathers) == 3  # a tensor block, 2 of them
    assert abs(est.comm["all-gather"]["model"] / dr.comm()["all-gather"]["model"] - 1) < 0.05, (est.comm, dr.comm())
    assert abs(est.comm_total / dr.comm_total - 1) < 0.05, (est.comm, dr.comm())


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="libtpu is not installed")
def test_six_flat_experts_over_four_ranks_beside_fsdp_are_estimated_as_tpu_compiled():
    # XLA:TPU all-reduces each straddled kernel's gradient over fsdp as its part (f32[384, 64], d=64, f=128), no
    # reduce-scatter of its block, and gathers the blocks into parts as bfloat16: the estimate priced a reduce-scatter
    # of the block and a float32 gather, 0.78x the compiled collectives (v5e:2x4 fsdp=2,model=4)
    m = LM(functools.partial(FlatExperts, n=6))
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    mesh = {"fsdp": 2, "model": 4}
    p = tpflax.plan(v, mesh, rules=[(r"moe/(w1|v1|w2)$", P("model", "fsdp")), (r"embed", P("model", "fsdp")),
                                    (r"head", P("fsdp", "model")), (r"router", P("fsdp", None)), (r".*", P())])
    est, dr = _estimated_and_compiled(m, p, mesh, target="tpu-v5e:2x4")
    grads = [i for i in est.items if "summed as the 2 part" in i.why]
    assert {(i.kind, i.size) for i in grads} == {("all-reduce", 6 * F * D * 4 // 2)} and len(grads) == 3
    gathers = [i for i in est.items if "straddle experts: gathered" in i.why]
    assert {i.size for i in gathers} == {6 * F * D * 2 // 4 * 2}  # a tensor block, 2 of them, bfloat16
    for kind, axis in (("all-reduce", "fsdp"), ("all-gather", "model")):
        assert abs(est.comm[kind][axis] / dr.comm()[kind][axis] - 1) < 0.05, (kind, axis, est.comm, dr.comm())
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())


def test_the_chooser_prices_straddled_blocks_beside_fsdp_as_compiled():
    # the chooser's price of a straddled kernel also split over fsdp gathered the parts from the fsdp shard (half the
    # compiled gather over model) and the fsdp gather at a whole part (twice the compiled f32[192, 64] blocks)
    from tpflax._src.cost.price import Context, LeafLayout, price
    from tpflax._src.hardware import get_hardware
    from tpflax._src.mesh import mesh_shape

    ctx = Context(mesh_shape({"fsdp": 2, "model": 4}), get_hardware("a100"), tokens=64)
    words = price((LeafLayout((768, 64), 4, ("model", "fsdp"), matmul=True, held=2),), (), ctx).collectives
    assert [w.split(" (")[0] for w in words] == ["all-gather 96.0 KiB over model in groups of 2",
                                                 "all-gather 48.0 KiB over fsdp", "reduce-scatter 96.0 KiB over fsdp"]
    # XLA:TPU gathers the blocks as bfloat16, as it gathers fsdp splits (v5e:2x4: bf16[2, 192, 64])
    ctx = Context(mesh_shape({"fsdp": 2, "model": 4}), get_hardware("tpu-v5e"), tokens=64)
    words = price((LeafLayout((768, 64), 4, ("model", "fsdp"), matmul=True, held=2),), (), ctx).collectives
    assert words[0].split(" (")[0] == "all-gather 48.0 KiB over model in groups of 2"


class FineGrained(nn.Module):
    """DeepSeek-MoE's fine-grained experts: 16 experts of ffn 16, top-4, every expert reading every token and the
    combine weights contracted with the experts' outputs (``bsef,efd,bse->bsd``)."""

    @nn.compact
    def __call__(self, tok):
        x = nn.Embed(V, D, name="embed")(tok)
        w, idx = jax.lax.top_k(jax.nn.softmax(nn.Dense(16, use_bias=False, name="gate")(x), -1), 4)
        comb = jnp.sum(jax.nn.one_hot(idx, 16) * w[..., None], -2)
        wg, wu = (self.param(n, INIT, (16, D, 16)) for n in ("experts_gate_proj", "experts_up_proj"))
        wd = self.param("experts_down_proj", INIT, (16, 16, D))
        h = nn.silu(jnp.einsum("bsd,edf->bsef", x, wg)) * jnp.einsum("bsd,edf->bsef", x, wu)
        return nn.Dense(V, use_bias=False, name="head")(x + jnp.einsum("bsef,efd,bse->bsd", h, wd, comb))


def test_fine_grained_experts_price_the_combine_sum_megatron_adds():
    # review_t f03: Megatron in each expert and the experts over the tensor axis priced alike to the byte and the
    # tie kept Megatron's ffn slivers; split over the ffn, the combine's routing-weight gradient is summed (the
    # estimate's "product of two activations" item), which compiled 3% more bytes and 0.8% more collectives than
    # the experts over the tensor axis (16 x ffn 64, data=2,model=4). The reason said "no expert axis" as if no
    # layout could split the experts: it is the mesh that has none
    m = FineGrained()
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), TOK), MESH, model=m, sample=(TOK,), batch=(TOK,))
    d = p.decisions["params/experts_gate_proj"]
    assert d.spec == P("model", None, None) and d.reason.startswith("expert column: the mesh has no expert axis")
    mega = next(a for a in d.alternatives if a.name == "Megatron in each expert")
    assert any("sums the split ffn" in c for c in mega.collectives) and mega.step_time > next(a for a in d.alternatives if a.chosen).step_time


@pytest.fixture(scope="module")
def halves():
    """Four experts stored flat on model=8: half an expert per device, as a hand layout splits the stored dim."""
    m = LM(functools.partial(FlatExperts, n=4))
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    return m, tpflax.plan(v, {"model": 8}, model=m, sample=(TOK,), batch=(TOK,))


def test_fewer_experts_than_ranks_split_into_each_expert(halves):
    # the split of the stored dim stopped at whole experts (4 of them): over model=8 the three were kept whole,
    # 3.93x the bytes and 5.12x the flops of the stored dim split over 8 (the reproducer's sizes). 8 ranks over
    # (4 experts x f) rows in order hold one slice of one expert each (trace.reshape.spill), so the split runs on
    _, p = halves
    assert {k: p.decisions[f"params/moe/{k}"].spec for k in ("w1", "v1", "w2")} == dict.fromkeys(
        ("w1", "v1", "w2"), P("model", None))


def test_fewer_experts_than_ranks_are_estimated_as_compiled(halves, devices):
    # XLA sums in two steps: over the 2 ranks of one expert (the down projection's partial outputs forward, each
    # column's input gradient backward), then over the 4 experts (the combine forward, the input gradients again
    # backward). Priced as one sum over 8 (and the row's none): 0.78x the compiled collectives; the layout written
    # by hand (the traced plan's, above), 0.63x
    m, _ = halves
    p = tpflax.plan(jax.eval_shape(m.init, jax.random.key(0), TOK), {"model": 8},
                    rules=[(r"moe/(w1|v1|w2)$", P("model", None)), (r"embed", P("model", None)),
                           (r"head", P(None, "model")), (r".*", P())])
    mesh = tpflax.make_mesh({"model": 8})
    ts = tpflax.make_train_step(m, p, mesh, optax.adamw(1e-3), sample=(TOK,))
    dr = tpflax.dry_run(ts, p, mesh, compiler_options=COMM_XLA)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=m, sample=(TOK,), backend="cpu")
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())
    assert {i.group_size for i in est.items if "sum partial input gradients over" in i.why} == {2}


class StackedExperts(nn.Module):
    """DBRX's experts as its checkpoints hold them: ``w1``, ``v1`` and ``w2`` all stored ``(E, f, d)`` in a block
    named ``ffn`` (no name, and no mirrored sibling, tells the tree they are experts), every token
    through every expert (``btd,efd->btef``), the down projection keeping the experts (``btef,efd->bted``) for the
    top-2 gates to combine. ``combine="row"``: the gates scale the hidden units and the down projection sums the
    experts with f (``btef,efd->btd``)."""

    combine: str = "gates"
    n: int = E

    @nn.compact
    def __call__(self, x):
        w1, v1, w2 = (self.param(n, INIT, (self.n, F, D)) for n in ("w1", "v1", "w2"))
        gates = jax.nn.softmax(nn.Dense(self.n, use_bias=False, name="router")(x), -1)
        mask = jax.nn.one_hot(jax.lax.top_k(gates, 2)[1], self.n).sum(-2) * gates
        h = nn.silu(jnp.einsum("btd,efd->btef", x, w1)) * jnp.einsum("btd,efd->btef", x, v1)
        if self.combine == "row":
            return jnp.einsum("btef,efd->btd", h * mask[..., None], w2)
        return jnp.einsum("bted,bte->btd", jnp.einsum("btef,efd->bted", h, w2), mask)


STACKED = ("w1", "v1", "w2")
BY_HAND = [(r"ffn/(w1|v1|w2)$", P("model", None, None)), (r"embed", P("model", None)), (r"head", P(None, "model")),
           (r".*", P())]


def _stacked(combine, n=E):
    m = LM(functools.partial(StackedExperts, combine=combine, n=n), block="ffn")
    return m, jax.eval_shape(m.init, jax.random.key(0), TOK)


def test_experts_stored_e_f_d_split_over_the_tensor_axis():
    # the columns (E, f, d) were no expert pair (only (E, d, f) columns were): paired as dense layers, Megatron inside
    # each expert summed the down projection's f32[b, t, E, d] partial outputs, 1.19x the collectives of the experts
    # over model. Priced as an expert pair, the experts over model sum only the combine's f32[b, t, d]
    m, v = _stacked("gates")
    p = tpflax.plan(v, MESH, model=m, sample=(TOK,), batch=(TOK,))
    assert {k: p.decisions[f"params/ffn/{k}"].spec for k in STACKED} == dict.fromkeys(STACKED, P("model", None, None))
    assert len({p.decisions[f"params/ffn/{k}"].pair for k in STACKED}) == 1
    alts = {a.name: a for a in p.decisions["params/ffn/w2"].alternatives}
    megatron, chosen = alts["Megatron in each expert"], alts["experts over the tensor axis"]
    assert chosen.chosen and megatron.spec == P(None, "model", None)  # the ffn dim of (E, f, d)
    assert megatron.comm_bytes > chosen.comm_bytes


def test_experts_stored_e_f_d_summed_with_f_keep_megatron_and_rules_pair_them():
    # the down projection summing the experts with f: the two layouts tie (each sums f32[b, t, d] forward and each
    # column's input gradient backward) and Megatron is kept. A rule splitting the experts over model still makes
    # the pair the trace found (the tree calls the three dense): unpaired, the estimate priced no sum of w1's and
    # v1's input gradients (0.78x the compiled collectives)
    m, v = _stacked("row")
    p = tpflax.plan(v, MESH, model=m, sample=(TOK,), batch=(TOK,))
    assert {k: p.decisions[f"params/ffn/{k}"].spec for k in STACKED} == dict.fromkeys(STACKED, P(None, "model", None))
    h = tpflax.plan(v, MESH, rules=BY_HAND)
    h = tpflax.estimate(h, optax.adamw(1e-3), model=m, sample=(TOK,), backend="cpu")
    why = {i.why for i in h.items if i.kind == "all-reduce" and i.axes == ("model",)}
    assert {f"column params/ffn/{k}: sum partial input gradients (backward)" for k in ("w1", "v1")} <= why, why


def test_experts_stored_e_f_d_are_estimated_as_compiled(devices):
    # the layout by hand: unpaired, its estimate priced the combine's sum and no input gradient sum of w1 and v1,
    # 0.85x the compiled collectives
    m, v = _stacked("gates")
    p = tpflax.plan(v, MESH, rules=BY_HAND)
    est, dr = _estimated_and_compiled(m, p)
    assert abs(est.comm_total / dr.comm_total - 1) < 0.10, (est.comm, dr.comm())


@pytest.mark.parametrize("n", [E, 6])
def test_the_tree_reads_experts_stored_e_f_d_off_their_router(n):
    # no name and no mirrored sibling said experts: the tree kept the three (E, f, d) kernels whole (DBRX with 6
    # experts on data=2,model=4: 2.59x the bytes, 1.47x the collectives, 3.03x the flops of Megatron inside each
    # expert). Their leading dim is the width of the router beside them: one expert pair, Megatron inside each
    # expert (untraced, the tie with the experts over model keeps it; 6 experts do not divide 4 anyway)
    _, v = _stacked("gates", n)
    p = tpflax.plan(v, MESH, batch=(TOK,))
    ds = {k: p.decisions[f"params/ffn/{k}"] for k in STACKED}
    assert {k: d.spec for k, d in ds.items()} == dict.fromkeys(STACKED, P(None, "model", None))
    assert {d.kind for d in ds.values()} == {"expert"} and len({d.pair for d in ds.values()}) == 1
    assert (ds["w1"].role, ds["v1"].role, ds["w2"].role) == ("column", "column", "row")


def test_experts_stored_e_f_d_sum_their_input_gradients_at_d(devices):
    # the estimate read an expert column's input width off its body as (E, d, f): DBRX's (E, f, d) columns summed
    # f32[tokens, f] input gradients (twice the compiled f32[tokens, d]; 1.09x the compiled collectives overall)
    m, v = _stacked("gates", 6)
    p = tpflax.plan(v, MESH, batch=(TOK,))
    est, dr = _estimated_and_compiled(m, p)
    sums = {i.size for i in est.items if "sum partial input gradients" in i.why and "ffn" in i.why}
    assert sums == {TOK.shape[0] // MESH["data"] * TOK.shape[1] * D * 4}, sums
    assert abs(est.comm_total / dr.comm_total - 1) < 0.05, (est.comm, dr.comm())


def test_a_stacked_dim_is_never_taken_for_the_experts():
    # _experts read the experts' count before asking whether the dim leads the body: a stacked leaf's
    # trailing layers dim (body_dim maps it past the body's end) raised IndexError instead of "no experts"
    from tpflax._src.facts.classify import _classify_one
    from tpflax._src.facts.tree import Leaf
    from tpflax._src.planner.dataflow_rules import _experts

    for at in (0, 3):
        shape = (4, 16, 32)[:at] + (2,) + (4, 16, 32)[at:]
        f = _classify_one(Leaf("params/moe/down", shape, "float32", 4), at)
        assert _experts(None, f, at, 1, []) is False


def test_experts_the_trace_keeps_whole_are_not_priced_in_halves():
    # 6 experts over 12 ranks: the trace does not run the split on into the experts (trace.reshape.spill: 6 is no
    # prime power, a 2-rank split of one expert cuts the limit's other divisors unevenly), and the estimate priced
    # the layout's sums in two steps (over 2 ranks, then 6 experts) all the same: both ask spill now
    m = LM(functools.partial(FlatExperts, n=6))
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    rules = [(r"moe/(w1|v1|w2)$", P("model", None)), (r".*", P())]
    est = tpflax.estimate(tpflax.plan(v, {"model": 12}, rules=rules), optax.adamw(1e-3), model=m, sample=(TOK,),
                          backend="cpu")
    assert not [i for i in est.items if "ranks holding one expert" in i.why]
    # 4 experts over 8 ranks (4 a prime power, 2 dividing f): the two-step sums stay
    m = LM(functools.partial(FlatExperts, n=4))
    v = jax.eval_shape(m.init, jax.random.key(0), TOK)
    est = tpflax.estimate(tpflax.plan(v, {"model": 8}, rules=rules), optax.adamw(1e-3), model=m, sample=(TOK,),
                          backend="cpu")
    assert {i.group_size for i in est.items if "ranks holding one expert" in i.why} == {2}


def test_a_limit_on_another_dim_keeps_a_moved_experts_part():
    # Val.parts of a flat-stored expert weight read (E, f, d): f (dim 1) a minor part of the experts (dim 0, 4 of them).
    # Moved one dim right (a new leading dim) with the last output dim limited, the experts' input dim 0 was looked
    # up in the output-keyed limit ({0: 1}, the new dim's) and the part ended; the experts' own output dim limited
    # (sliced, one expert read) still ends it
    from tpflax._src.trace.interpreter import moved_parts

    parts = (("params/moe/w1", (None, (0, 0, 4), None)),)
    assert moved_parts(parts, [None, 0, 1, 2], {0: 1}) == (("params/moe/w1", (None, None, (0, 1, 4), None)),)
    assert moved_parts(parts, [None, 0, 1, 2], {1: 1}) == ()
