"""A PaLM-style parallel block: one fused input projection cut into unequal q | k | v | gate | up.

``y = x + attn(norm(x)) + mlp(norm(x))``: multi-query attention (one K/V head) and a SwiGLU MLP read
one fused kernel whose output ``jnp.split`` cuts into pieces of different widths; q reaches the
attention's output projection, gate and up reach the MLP's down projection. The traced plan splits
the fused kernel (naively, over its fused dim) as the column of both rows, and the estimate prices
XLA's reshard of the unequal pieces.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from _util import COMM_XLA, newer_xla
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax.hlo import parse_collectives

D, HEADS, HD, F, VOCAB, SEQ, BATCH = 64, 4, 16, 128, 64, 16, 8
MESH = {"data": 2, "model": 4}
IDS = (jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32),)
SIZES = (HEADS * HD, HD, HD, F, F)  # q | k | v | gate | up


class Parallel(nn.Module):
    fused: bool = True  # False: separate q, k, v, gate, up kernels reading the same norm output

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(VOCAB, D, name="embed")
        x = emb(ids)
        h = nn.RMSNorm(name="norm")(x)
        if self.fused:
            z = nn.Dense(sum(SIZES), use_bias=False, name="w_in")(h)
            q, k, v, gate, up = jnp.split(z, np.cumsum(SIZES)[:-1].tolist(), axis=-1)
        else:
            q, k, v, gate, up = (nn.Dense(n, use_bias=False, name=name)(h) for n, name in zip(
                SIZES, ("wq", "wk", "wv", "gate", "up"), strict=True))
        b, s, _ = x.shape
        p = jax.nn.softmax(jnp.einsum("bshd,btd->bhst", q.reshape(b, s, HEADS, HD), k) / 4.0, axis=-1)
        o = jnp.einsum("bhst,btd->bshd", p, v).reshape(b, s, HEADS * HD)
        x = x + nn.Dense(D, use_bias=False, name="w_o")(o) + nn.Dense(D, use_bias=False, name="w_down")(
            nn.silu(gate) * up)
        return emb.attend(x)


@pytest.fixture(scope="module")
def planned():
    model = Parallel()
    params = jax.eval_shape(model.init, jax.random.key(0), *IDS)
    return model, tpflax.plan(params, MESH, model=model, sample=IDS)


def test_fused_column_of_two_rows(planned):
    _, p = planned
    specs = {k.split("/")[1]: tuple(d.spec) for k, d in p.decisions.items() if k.endswith("kernel")}
    assert specs == {"w_in": (None, "model"), "w_o": ("model", None), "w_down": ("model", None)}
    assert [(q.columns, q.rows) for q in p.pairs if q.sharded] == [
        (("params/w_in/kernel",), ("params/w_o/kernel", "params/w_down/kernel"))]
    assert "unequal pieces" in p.decisions["params/w_in/kernel"].reason


@newer_xla("two (4, 15) float32 all-reduces over model more, of a norm's row statistics (720 bytes): compiled "
           "275,468 bytes against 0.10's 274,748 (the estimate 274,816)")
def test_unequal_pieces_reshard_priced_as_compiled(planned):
    model, p = planned
    mesh = tpflax.make_mesh(MESH)
    tx = optax.sgd(0.1)  # adamw's step has the same collectives and compiles slower
    dr = tpflax.dry_run(tpflax.make_train_step(model, p, mesh, tx, sample=IDS), p, mesh, compiler_options=COMM_XLA)
    e = tpflax.estimate(p, tx, model=model, sample=IDS, backend="cpu")

    def est(kind):
        return sum(i.total for i in e.items if i.kind == kind and i.why.startswith("fused"))

    def got(kind):
        return sum(c.ring_bytes * c.count for c in dr.collectives if c.kind == kind)

    # XLA's halo exchange of the five pieces and the all-to-alls of their gradients: exact
    assert est("collective-permute") == got("collective-permute") > 0
    assert est("all-to-all") == got("all-to-all") > 0
    # with the pairs' and the gradients' all-reduces, the step's collectives up to 68 B (read off the HLO: XLA
    # reduces the tied softmax's label logit with the lookup's gradient, 360 B of 1152, and the loss, 4 B)
    assert e.comm_total == pytest.approx(dr.comm_total, abs=128)


def test_piece_permutes_of_unequal_pieces_follow_xla():
    from tpflax._src.cost.reshard import piece_permutes

    n = 4
    mesh = Mesh(np.array(jax.devices()).reshape(8 // n, n), ("data", "model"))
    b, s, d = 8, 4, 16

    def loss(w, rows, x):  # each piece read by a row split over model, as the pair's rows read q, gate, up
        parts = jnp.split(x @ w, np.cumsum(SIZES)[:-1].tolist(), axis=-1)
        return sum(((jnp.tanh(q) @ r) ** 2).sum() for q, r in zip(parts, rows, strict=True))

    def sds(shape, spec):
        return jax.ShapeDtypeStruct(shape, "float32", sharding=NamedSharding(mesh, spec))

    args = (sds((d, sum(SIZES)), P(None, "model")), tuple(sds((n_, d), P("model")) for n_ in SIZES),
            sds((b, s, d), P("data")))
    text = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(*args).compile().as_text()
    cs = parse_collectives(text, mesh=mesh)
    column = b // (8 // n) * s * 4  # bytes of one column of the local rows
    assert sum(c.ring_bytes * c.count for c in cs if c.kind == "collective-permute") == \
        sum(piece_permutes(sum(SIZES), SIZES, n)) * column


@pytest.mark.parametrize("fused", [True, False])
def test_multi_query_scores_are_the_attention_product(fused):
    # jnp.einsum("bshd,btd->bhst") of an MQA key computes (b, t, s, heads): the heads come last. The scores
    # are that product, not probs @ v's (b, head_dim, heads, s), which was taken instead (and none at all
    # behind a fused kernel's unequal split)
    from tpflax._src.cost.peak import SCORES_SAVED

    model, seq = Parallel(fused), 2 * HD  # a sequence longer than the head dim: probs @ v is smaller
    ids = (jax.ShapeDtypeStruct((BATCH, seq), jnp.int32),)
    p = tpflax.plan(jax.eval_shape(model.init, jax.random.key(0), *ids), MESH, model=model, sample=ids)
    e = tpflax.estimate(p, optax.sgd(0.1), model=model, sample=ids)
    # batch over data=2, heads over model=4, float32 (split heads save their probabilities in float32)
    assert e.breakdown.scores == int(SCORES_SAVED * (BATCH // 2) * (HEADS // 4) * seq * seq * 4)
