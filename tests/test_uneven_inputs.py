"""Inputs whose leading dims differ (a dual encoder's 8 images and 16 captions): the step splits each input's
leading dim over the batch axes, and the estimate prices each tower's activations so split (it priced the caption
tower's whole, 1.44x the compiled collectives). Rows a model gathers across that split (a graph's edges from its
nodes) are named in a note."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from jax.sharding import PartitionSpec as P

import tpflax
from tpflax._src.cost.fft import cpu_gathers_ffts

S = jax.ShapeDtypeStruct
# make_train_step's warning for the dual encoders' 8 images and 16 captions
DISAGREE = r"inputs disagree on their leading dim \(input 0 \(8, 16, 32\); input 1 \(16, 16, 32\)\)"


class Tower(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = nn.Dense(64, name="inp")(x)
        x = x + nn.Dense(64, name="down")(nn.gelu(nn.Dense(256, name="up")(nn.LayerNorm(name="ln")(x))))
        return x.mean(1)


class Dual(nn.Module):
    @nn.compact
    def __call__(self, img, txt):
        return Tower(name="img")(img), Tower(name="txt")(txt)


def contrastive(out, img, txt):
    a, b = out
    return ((a.mean(0) - b.mean(0)) ** 2).mean()


def test_each_inputs_leading_dim_is_split_as_the_step_splits_it():
    model, mesh = Dual(), {"data": 2, "model": 4}
    sample = (S((8, 16, 32), jnp.float32), S((16, 16, 32), jnp.float32))
    v = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b), *sample)
    p = tpflax.plan(v, mesh, model=model, sample=sample)
    assert p.spec("params/txt/up/kernel") == jax.sharding.PartitionSpec(None, "model")
    m = tpflax.make_mesh(mesh)
    with pytest.warns(tpflax.TpflaxWarning, match=DISAGREE):
        step = tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=contrastive)
    compiled = tpflax.dry_run(step, p, m).comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=contrastive, backend="cpu").comm
    # the towers' row sums over model, exactly: 4 per tower (forward and input gradient of each pair), the caption
    # tower's at 8 of its 16 captions per device
    assert est["all-reduce"]["model"] == compiled["all-reduce"]["model"]
    # the gradients' sum over data: the loss's scalars apart (a few hundred bytes of 152 KB)
    assert abs(est["all-reduce"]["data"] / compiled["all-reduce"]["data"] - 1) < 0.01


class MessagePassing(nn.Module):
    """Node features and edge index arrays as inputs: ``h[senders]`` and ``segment_sum(m, receivers)``."""

    @nn.compact
    def __call__(self, nodes, senders, receivers):
        h = nn.Dense(64, name="enc")(nodes)
        for i in range(2):
            m = nn.Dense(64, name=f"msg{i}")(h[senders])
            h = h + jax.ops.segment_sum(m, receivers, num_segments=nodes.shape[0])
        return h


def test_rows_gathered_across_the_batch_split_are_priced_as_xla_moves_them():
    """The step splits the node array and the edge arrays over data like a batch, so the gathered rows cross
    devices; XLA reshards the indexed arrays with collective-permutes, all-gathers and all-reduces (19x the gradient
    sums on XLA:CPU, measured). The estimate priced none of them (0.05 of the compiled collectives, then a note
    saying so); ``cost/crossing.py`` prices them per mesh: on data=2,model=4 XLA moves the node array onto two
    of the model devices, on data=8 it gathers it whole. A note still says the rows cross (batch whole graphs).
    Rows picked per example at ``(arange(b), idx)`` (BERT's masked positions, CLIP's pooling) are priced apart
    (below), lookups of parameters (embeddings) not at all: none of the 42 transformers models gets the note."""
    model = MessagePassing()
    sample = (S((256, 16), jnp.float32), S((1024,), jnp.int32), S((1024,), jnp.int32))
    v = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *sample)
    mse = lambda h, *_: (h ** 2).mean()  # noqa: E731
    for mesh in ({"data": 2, "model": 4}, {"data": 8}):
        p = tpflax.plan(v, mesh, rules=[(".*", "replicate")])
        est = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=mse, backend="cpu")
        noted = [n for n in est.notes if "cross devices" in n]
        assert len(noted) == 1 and "(256, 64) activation gathered at (1024,) indices" in noted[0]
        assert "(and 1 more)" in noted[0] and "priced" in noted[0] and "dry_run" in noted[0]
        m = tpflax.make_mesh(mesh)
        with pytest.warns(tpflax.TpflaxWarning, match=r"inputs disagree on their leading dim \(input 0 \(256, 16\); "
                                                      r"input 1 \(1024,\), input 2 \(1024,\)\)"):
            step = tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=mse)
        dr = tpflax.dry_run(step, p, m)
        # per kind and axis as compiled, the loss's scalars apart (a few bytes of 0.75-0.96 MB)
        assert est.comm.keys() == dr.comm().keys()
        assert abs(est.comm_total / dr.comm_total - 1) < 1e-4
        if "model" in mesh:
            assert est.comm["collective-permute"] == dr.comm()["collective-permute"]
            assert est.comm["all-reduce"]["model"] == dr.comm()["all-reduce"]["model"]
    # a batch that is not split: nothing crosses
    whole = tpflax.plan(v, {"model": 8}, rules=[(".*", "replicate")])
    est = tpflax.estimate(whole, optax.adamw(1e-3), model=model, sample=sample, loss=mse)
    assert not [n for n in est.notes if "cross devices" in n] and est.comm_total == 0


class RoutedTokens(nn.Module):
    """Mixture-of-Depths' routing: a router scores the tokens, ``top_k`` picks half of each sequence, an MLP runs on
    them (``take_along_axis``) and its output goes back at ``(arange(b)[:, None], idx)`` (``.at[].add``)."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(x.shape[-1], name="inp")(x)
        r = nn.Dense(1, use_bias=False, name="router")(x)[..., 0]
        idx = jnp.sort(jax.lax.top_k(r, x.shape[1] // 2)[1], -1)
        d = nn.Dense(x.shape[-1], name="down")(jax.nn.gelu(nn.Dense(64, name="up")(
            jnp.take_along_axis(x, idx[..., None], 1))))
        d = d * jax.nn.sigmoid(jnp.take_along_axis(r, idx, -1))[..., None]
        return x.at[jnp.arange(x.shape[0])[:, None], idx].add(d)


def _routed_priced_as_compiled(model):
    """``model``'s estimate on data=2,model=4 against its compiled adamw step: the permutes and model all-reduces
    equal, the all-gather only ``top_k``'s scores (half of the ``(8, 32)`` float32 scores per device), the data
    all-reduce short by the loss's scalars at most."""
    mesh = {"data": 2, "model": 4}
    sample = (S((8, 32, 32), jnp.float32),)
    v = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *sample)
    mse = lambda h, *_: (h ** 2).mean()  # noqa: E731
    p = tpflax.plan(v, mesh, model=model, sample=sample)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=mse, backend="cpu")
    m = tpflax.make_mesh(mesh)
    compiled = tpflax.dry_run(tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=mse),
                              p, m).comm()
    assert est.comm["collective-permute"] == compiled["collective-permute"]
    assert est.comm["all-reduce"]["model"] == compiled["all-reduce"]["model"]
    assert compiled["all-gather"] == {"data": 8 * 32 * 4 / 2}  # top_k's scores
    assert 0 <= compiled["all-reduce"]["data"] - est.comm["all-reduce"]["data"] <= 16  # the loss's scalars


def test_routed_tokens_written_back_per_example_are_priced_as_xla_moves_them():
    """``x.at[arange(b)[:, None], idx].add(d)`` indexes the batch dim with data, not as a batching dim, so XLA moves
    the updates and their indices as across the batch split: on data=2,model=4 it permutes them onto two of the
    model devices and all-reduces the partial stream there, and backward gathers the updates' gradient the same
    way (measured on XLA:CPU). The estimate priced none of it (0.44 of the compiled collectives; the review's
    Mixture-of-Depths 0.91); ``cost/crossing.py`` prices it. Left unpriced: ``top_k``'s scores, which XLA:CPU
    all-gathers over data (half of the ``(8, 32)`` float32 scores sent per device), and the loss's scalars."""
    _routed_priced_as_compiled(RoutedTokens())


class RoutedPick(nn.Module):
    """Mixture-of-Depths written with one index: the router's ``top_k`` tokens picked at ``(arange(b)[:, None], idx)``
    (no ``take_along_axis``), run through a dense and added back at the same place."""

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(32, name="inp")(x)
        idx = jnp.sort(jax.lax.top_k(nn.Dense(1, use_bias=False, name="router")(x)[..., 0], x.shape[1] // 2)[1], -1)
        b = jnp.arange(x.shape[0])[:, None]
        return x.at[b, idx].add(nn.Dense(32, name="mlp")(x[b, idx]))


def test_rows_picked_per_example_at_router_chosen_indices_are_priced_as_at_input_indices():
    """The per-example pick ``x[b, idx]`` was recorded only for indices from the inputs (BERT's masked positions):
    with ``idx`` from the router's ``top_k`` (computed from parameters) the write back (the "spread") was priced and
    the pick dropped, though XLA compiles the same collectives whoever computed the indices. data=2,model=4: the
    estimate read 16,896 B of collective-permute, 16,384 of model all-reduce and 16,640 of data all-reduce against
    33,792 / 32,768 / 24,836 compiled. Left unpriced: ``top_k``'s scores all-gathered over data, the loss's
    scalars."""
    _routed_priced_as_compiled(RoutedPick())


class Windows(nn.Module):
    """Mixes 4 windows of 4 tokens apart: ``(b, 16, c)`` read as ``(b * 4, 4, c)`` (Swin's window partition)."""

    @nn.compact
    def __call__(self, x):
        b = x.shape[0]
        h = nn.Dense(32, name="down")(nn.gelu(nn.Dense(128, name="up")(x.reshape(b * 4, 4, 32))))
        return h.reshape(b, 16, 32).mean(1)


class DualWindows(nn.Module):
    @nn.compact
    def __call__(self, img, txt):
        return nn.Dense(32, name="img")(img).mean(1), Windows(name="txt")(txt)


WINDOWS = [(r"up/kernel$", P(None, "model")), (r"up/bias$", P("model")), (r"down/kernel$", P("model", None)),
           (".*", "replicate")]


def test_the_batch_is_followed_from_every_input_not_the_first_alone():
    # the trace followed the batch only from inputs as long as the first (8 images): the 16 captions' windows
    # (64, 4, 32) carried no batch, and the caption pair's sum was priced whole on every device (est 1.65x the
    # compiled collectives; the step splits the captions over data like the images)
    model, mesh = DualWindows(), {"data": 2, "model": 4}
    sample = (S((8, 16, 32), jnp.float32), S((16, 16, 32), jnp.float32))
    v = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b), *sample)
    p = tpflax.plan(v, mesh, rules=WINDOWS)
    m = tpflax.make_mesh(mesh)
    with pytest.warns(tpflax.TpflaxWarning, match=DISAGREE):
        step = tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=contrastive)
    compiled = tpflax.dry_run(step, p, m).comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=contrastive, backend="cpu").comm
    # one forward sum of the caption pair: 32 of the 64 windows per device, (32, 4, 32) float32
    assert est["all-reduce"]["model"] == compiled["all-reduce"]["model"] == 32 * 4 * 32 * 4 * 1.5


class FFTCaptions(nn.Module):
    @nn.compact
    def __call__(self, img, txt):
        h = nn.Dense(32, name="up")(txt)
        return nn.Dense(32, name="img")(img).mean(1), jnp.fft.irfft(jnp.fft.rfft(h, axis=1), n=16, axis=1).mean(1)


def test_an_fft_of_a_later_input_is_gathered_over_the_batch_as_its_input_is_split():
    # XLA:CPU gathers an FFT's operand whole over the batch axes (cost/fft.py); one reading the 16 captions was
    # taken for no batch's (its leading dim not the first input's 8) and no gather was priced
    model = FFTCaptions()
    sample = (S((8, 16, 32), jnp.float32), S((16, 16, 32), jnp.float32))
    v = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b), *sample)
    p = tpflax.plan(v, {"data": 2, "model": 4}, rules=[(".*", "replicate")])
    est = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=contrastive, backend="cpu")
    batch = [i for i in est.items if "FFT" in i.why and "over the batch" in i.why]
    if not cpu_gathers_ffts():  # jaxlib 0.12's XLA:CPU splits an FFT over its batch: nothing to gather
        assert batch == []
        return
    # the rfft's float32 (16, 16, 32) operand, forward, and the irfft's complex64 (16, 9, 32) one; backward, the
    # gradients of their outputs (the same shapes the other way round)
    assert sorted(i.size for i in batch) == sorted([16 * 16 * 32 * 4, 16 * 9 * 32 * 8] * 2)
    assert {i.axes for i in batch} == {("data",)}


class Positional(nn.Module):
    """A batch ``x`` (8, 32) and a table ``pe`` (16, 32) shared by every example, through a split up/down pair."""

    @nn.compact
    def __call__(self, x, pe):
        p = nn.Dense(32, name="down")(nn.gelu(nn.Dense(128, name="up")(pe)))
        return nn.Dense(32, name="inp")(x) + p.mean(0)


def test_a_batch_size_given_keeps_inputs_of_another_leading_dim_whole_as_the_step_does():
    # make_train_step(batch=8) keeps the (16, 32) table replicated; the estimate took every input's leading dim
    # for the batch, batch=8 or not: the pair's sums at 8 of the 16 rows, and its kernels' gradients summed over
    # data though alike on every device (est 14,208 bytes, 1.91x the compiled 7,428)
    model, mesh = Positional(), {"data": 2, "model": 4}
    sample = (S((8, 32), jnp.float32), S((16, 32), jnp.float32))
    v = jax.eval_shape(lambda a, b: model.init(jax.random.key(0), a, b), *sample)
    p = tpflax.plan(v, mesh, rules=WINDOWS)
    mse = lambda out, *_: (out ** 2).mean()  # noqa: E731
    m = tpflax.make_mesh(mesh)
    compiled = tpflax.dry_run(tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=mse,
                                                     batch=8), p, m).comm()
    est = tpflax.estimate(p, optax.adamw(1e-3), 8, model=model, sample=sample, loss=mse, backend="cpu").comm
    # the pair's sums at all 16 rows on every device (1,536 bytes at 8 rows before)
    assert est["all-reduce"]["model"] == compiled["all-reduce"]["model"] == 3072
    # over data only inp's gradient (kernel and bias: 4,224 bytes); the compiled also sums p's (32,) gradient and
    # the loss (132 bytes)
    assert est["all-reduce"]["data"] == (32 * 32 + 32) * 4 and compiled["all-reduce"]["data"] == 4224 + 132
    # not given, every input's leading dim is the batch, as the step without batch= splits both
    whole = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=mse, backend="cpu").comm
    assert whole["all-reduce"]["model"] == 1536 and whole["all-reduce"]["data"] > 12_000


class MaskedLM(nn.Module):
    """BERT's masked-LM head: predict only at the masked positions, ``x[arange(b)[:, None], pos]``."""

    @nn.compact
    def __call__(self, ids, pos):
        x = nn.Embed(512, 64, name="wte")(ids)
        x = x + nn.Dense(64, name="down")(nn.gelu(nn.Dense(256, name="up")(x)))
        x = x[jnp.arange(ids.shape[0])[:, None], pos]
        return nn.Dense(512, name="head")(x)


def test_rows_picked_per_example_are_priced_as_the_rows_xla_moves():
    """``x[arange(b)[:, None], pos]`` (8 examples of 32 tokens, 6 masked positions each, width 64) indexes the batch
    dim with data, so XLA moves the picked rows and their indices, not the stream: on data=2,model=4 it permutes
    the (8, 6, 2) indices' and the picked rows' halves (12,480 B), sums the picked rows over data, and backward
    sums the stream's partial gradient over two model devices; on data=8 it all-gathers the indices and the rows'
    gradient and all-reduces the picked rows. Priced as a graph net's gather (the whole stream permuted forward
    and backward) the estimate read 65,536 B of permutes (est/compiled 1.06 in the review's 2-layer model)."""
    from tpflax._src.cost.crossing import SOURCE

    model = MaskedLM()
    sample = (S((8, 32), jnp.int32), S((8, 6), jnp.int32))
    v = jax.eval_shape(lambda *a: model.init(jax.random.key(0), *a), *sample)
    mse = lambda h, *_: (h ** 2).mean()  # noqa: E731
    rows, indices = 8 * 6 * 64 * 4, 8 * 6 * 2 * 4
    for mesh, kinds in (({"data": 2, "model": 4}, ("collective-permute",)), ({"data": 8}, ("all-gather",))):
        p = tpflax.plan(v, mesh, model=model, sample=sample)
        est = tpflax.estimate(p, optax.adamw(1e-3), model=model, sample=sample, loss=mse, backend="cpu")
        crossing = [(i.kind, i.size) for i in est.items if i.source == SOURCE]
        if "model" in mesh:  # indices and rows permuted forward, the rows' gradient backward, halves of each
            assert [s for k, s in crossing if k == "collective-permute"] == [indices / 2, rows / 2, rows / 2]
        else:
            assert crossing == [("all-gather", indices), ("all-reduce", rows), ("all-gather", rows)]
        assert not [n for n in est.notes if "cross devices" in n]  # a per-example pick, not a graph's rows
        m = tpflax.make_mesh(mesh)
        dr = tpflax.dry_run(tpflax.make_train_step(model, p, m, optax.adamw(1e-3), sample=sample, loss=mse), p, m)
        for kind in kinds:
            assert est.comm[kind] == dr.comm()[kind]
        # the rest as compiled to 0.3% (the loss's scalars, the head's input gradient summed over model)
        assert abs(est.comm_total / dr.comm_total - 1) < 3e-3
