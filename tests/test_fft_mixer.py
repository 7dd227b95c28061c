"""A long convolution by FFT between two projections (Hyena, FNO, FNet mixers): ``jnp.fft`` mixes the sequence
and leaves the features in place, so the projections pair through it (the trace took the fft for an opaque op
and kept both kernels whole). Compiled for a TPU v5e:2x4 slice, the pair is the cheaper plan on all three
numbers. XLA:CPU gathers every fft's operand whole (its SPMD partitioner does not split an fft), so the CPU
compile is not the measure here."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
import pytest
from _util import COMM_XLA, newer_xla
from jax.sharding import PartitionSpec as P

import tpflax

D, F, T = 64, 256, 32
S = jax.ShapeDtypeStruct


class LongConv(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = nn.Dense(F, name="up")(nn.LayerNorm(name="ln")(x))
        filt = self.param("filter", nn.initializers.normal(0.02), (T, F))
        n = 2 * T
        h = jnp.fft.irfft(jnp.fft.rfft(h, n=n, axis=1) * jnp.fft.rfft(filt, n=n, axis=0)[None], n=n, axis=1)[:, :T]
        return x + nn.Dense(D, name="down")(nn.gelu(h))


def mean_square(y, x):
    return (y ** 2).mean()


SAMPLE = (S((8, T, D), jnp.float32),)
MESH = {"data": 2, "model": 4}


def traced_plan():
    v = jax.eval_shape(LongConv().init, jax.random.key(0), *SAMPLE)
    return v, tpflax.plan(v, MESH, model=LongConv(), sample=SAMPLE)


@pytest.fixture(scope="module")
def compiled():
    """The traced plan and its adamw step compiled for XLA:CPU, once for the module's tests that read it (COMM_XLA:
    the same collectives, to the byte, as the default options)."""
    v, p = traced_plan()
    mesh = tpflax.make_mesh(MESH)
    step = tpflax.make_train_step(LongConv(), p, mesh, optax.adamw(1e-3), sample=SAMPLE, loss=mean_square)
    return v, p, tpflax.dry_run(step, p, mesh, compiler_options=COMM_XLA)


def fft_gathers(dr):
    """The compiled step's all-gathers made by an FFT (forward or its transpose), by op_name."""
    return [c for c in dr.collectives if c.kind == "all-gather" and (c.op_name or "").endswith("/fft")]


def test_projections_pair_through_an_fft_over_the_sequence():
    _, p = traced_plan()
    up, down = p.decisions["params/up/kernel"], p.decisions["params/down/kernel"]
    assert (up.spec, down.spec) == (P(None, "model"), P("model", None))
    assert up.pair is not None and up.pair == down.pair and up.source == down.source == "trace"
    # the filter is read on the features the pair splits: split with them
    assert p.spec("params/filter") == P(None, "model")


@pytest.mark.slow
def test_the_pair_through_an_fft_is_the_cheaper_plan_on_tpu():
    pytest.importorskip("libtpu")
    v, p = traced_plan()
    whole = tpflax.plan(v, MESH, model=LongConv(), sample=SAMPLE, rules=[("up|down|filter", "replicate")])
    mesh = tpflax.make_mesh(MESH, target="tpu-v5e:2x4")
    runs = [tpflax.dry_run(tpflax.make_train_step(LongConv(), q, mesh, optax.adamw(1e-3), sample=SAMPLE,
                                                  loss=mean_square), q, mesh) for q in (p, whole)]
    (pair, kept) = runs
    assert pair.memory["peak"] < kept.memory["peak"]
    assert pair.flops < kept.flops / 2
    assert pair.comm_total < kept.comm_total


@newer_xla("XLA:CPU gathers no FFT operand: no all-gather at all (148,996 collective bytes, all all-reduces), where "
           "0.10's gathers them whole and the CPU estimate prices those gathers")
def test_the_cpu_estimate_prices_xla_cpus_fft_gathers(compiled):
    """XLA:CPU gathers every FFT operand whole over every axis that splits it, the batch's too, and backward each
    output's gradient (its transpose's operand): the estimate priced none, 0.49 of the compiled collectives of a
    Hyena LM and 0.07 here (0.95 now); the CPU estimate prices them, the TPU one does not (XLA:TPU partitions an FFT)."""
    v, p, dr = compiled
    tx = optax.adamw(1e-3)
    cpu, tpu = (tpflax.estimate(p, tx, model=LongConv(), sample=SAMPLE, loss=mean_square, backend=b)
                for b in ("cpu", "tpu"))
    assert cpu.comm["all-gather"]["data"] == pytest.approx(dr.comm()["all-gather"]["data"], rel=0.01)
    # the filter's own FFT XLA splits over model to meet the split activation, which no term prices (5%)
    assert cpu.comm_total == pytest.approx(dr.comm_total, rel=0.1), "\n".join(dr.compare(cpu).report_lines())
    assert not [i for i in tpu.items if "FFT" in i.why]
    noted = [n for n in cpu.notes if "does not partition an FFT" in n]
    assert len(noted) == 1 and noted[0].startswith("2 FFT(s) of activations (RFFT of float32[8, 256, 64]")
    assert not [n for n in tpu.notes if "FFT" in n]
    # nothing split, nothing gathered: a replicated plan on a tensor axis alone
    whole = tpflax.plan(v, {"model": 8}, rules=[(".*", "replicate")])
    e = tpflax.estimate(whole, tx, model=LongConv(), sample=SAMPLE, loss=mean_square, backend="cpu")
    assert not [n for n in e.notes if "FFT" in n] and not [i for i in e.items if "FFT" in i.why]


def test_the_cpu_estimate_prices_fft_gathers_where_the_running_xla_compiles_them(compiled):
    """jaxlib 0.12's XLA:CPU splits an FFT over the dims it does not transform (no gather), 0.10's gathers every FFT
    operand whole: the estimate asks the running XLA (cost/fft.py ``cpu_gathers_ffts``, one tiny compile) and prices
    the gathers only where it makes them. On 0.12 it priced 0.10's gathers, which that XLA does not compile."""
    _, p, dr = compiled
    cpu = tpflax.estimate(p, optax.adamw(1e-3), model=LongConv(), sample=SAMPLE, loss=mean_square, backend="cpu")
    gathers = fft_gathers(dr)
    assert bool([i for i in cpu.items if "FFT" in i.why]) == bool(gathers)
    assert bool([n for n in cpu.notes if "does not partition an FFT" in n]) == bool(gathers)
    assert cpu.comm_total == pytest.approx(dr.comm_total, rel=0.1), "\n".join(dr.compare(cpu).report_lines())
    from tpflax._src.cost.fft import cpu_gathers_ffts

    assert cpu_gathers_ffts() == bool(gathers)


def test_a_failed_fft_probe_is_not_kept_for_the_process(monkeypatch):
    """cost/fft.py ``cpu_gathers_ffts`` was cached whole (functools.cache): a probe that failed once (here the CPU
    devices asked for raise, as a backend busy for a moment would) fixed the jaxlib-version fallback for the rest of
    the process. Now the fallback answers that call only, the next call probes again, and a probe's answer is kept."""
    from tpflax._src.cost import fft

    monkeypatch.setattr(fft, "_PROBED", None)  # as in a fresh process
    asked, devices = [], jax.devices

    def flaky(*args, **kwargs):
        asked.append(args)
        if len(asked) == 1:
            raise RuntimeError("the CPU backend is busy")
        return devices(*args, **kwargs)

    monkeypatch.setattr(jax, "devices", flaky)
    assert fft.cpu_gathers_ffts() == (jax.__version_info__ < (0, 11))  # the failed probe: the version decides
    probed = fft.cpu_gathers_ffts()
    assert len(asked) == 2  # probed again
    assert fft.cpu_gathers_ffts() == probed and len(asked) == 2  # the probe's answer is kept: not asked again
