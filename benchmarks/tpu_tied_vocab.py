"""Whether XLA:TPU reduce-scatters a tied table's lookup gradient, by vocabulary size (a finding, not modelled).

Run: python benchmarks/tpu_tied_vocab.py   (needs libtpu: pip install -e ".[tpu]"; about 40 s a vocabulary)
Writes benchmarks/results/tpu_tied_vocab.md. One toy per vocabulary ``V``: a ``(V, 768)`` table looked up at
8 x 512 ids, a learned position table, a layer norm, a 768 -> 3072 -> 768 MLP split over model, and logits tied
to the table; the table ``P(None, 'fsdp')`` on fsdp=2,model=4 (v5e:2x4), the adamw step of
``tpflax.make_train_step`` compiled by the TPU compiler (no TPU used). Per vocabulary: how many of the table's
two gradients (the lookup's scatter-add and the logits') the compiled program reduce-scatters and all-reduces
whole over fsdp, and the estimate's collective bytes over the compiled ones. GPT-2's and BERT's tables (50257 and 30522 rows) are reduce-scattered for the lookup;
BART's (50265) is all-reduced whole (benchmarks/tpu_aot_notes.md, forty-second round).

Options: ``--vocab 50257 50265`` (default: the 22 sizes of the notes), ``--out -`` (print only).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpflax  # noqa: E402

OUT = Path(__file__).parent / "results" / "tpu_tied_vocab.md"
VOCABS = (1001, 1005, 4005, 20005, 25000, 30005, 30522, 35000, 40000, 40005, 45000, 45005, 50250, 50255, 50257,
          50258, 50259, 50260, 50263, 50265, 50270, 50275)
MESH = {"fsdp": 2, "model": 4}
WIDTH, BATCH, SEQ = 768, 8, 512


class Tied(nn.Module):
    vocab: int

    @nn.compact
    def __call__(self, ids):
        emb = nn.Embed(self.vocab, WIDTH, name="shared")
        h = emb(ids) + self.param("pos", nn.initializers.normal(0.02), (SEQ, WIDTH))[None]
        h = nn.LayerNorm(name="ln")(h)
        h = nn.Dense(WIDTH, name="down")(nn.gelu(nn.Dense(4 * WIDTH, name="up")(h)))
        return emb.attend(h)


def _loss(logits, ids):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[..., None], -1))


def measure(vocab: int) -> tuple[int, int, float]:
    """``(reduce-scatters, all-reduces of the table's gradient, estimated / compiled collective bytes)``."""
    net, ids = Tied(vocab), jax.ShapeDtypeStruct((BATCH, SEQ), jnp.int32)
    v = jax.eval_shape(net.init, jax.random.key(0), ids)
    p = tpflax.plan(v, MESH, rules=[("shared/embedding", P(None, "fsdp")), ("up/kernel", P("fsdp", "model")),
                                    ("down/kernel", P("model", "fsdp")), ("up/bias", P("model")),
                                    ("down/bias", P())])
    mesh = tpflax.make_mesh(MESH, target="tpu-v5e:2x4")
    dr = tpflax.dry_run(tpflax.make_train_step(net, p, mesh, optax.adamw(1e-3), sample=(ids,), loss=_loss), p, mesh)
    est = tpflax.estimate(p, optax.adamw(1e-3), model=net, sample=(ids,), loss=_loss, backend="tpu")
    # the table's gradient pieces: one per use (XLA may combine an all-reduce with other leaves' into one op)
    pieces = [c.kind for c in dr.collectives for s in c.shapes if vocab in s and c.kind != "all-gather"]
    return pieces.count("reduce-scatter"), pieces.count("all-reduce"), est.comm_total / dr.comm_total


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--vocab", type=int, nargs="*", default=list(VOCABS))
    ap.add_argument("--out", default=str(OUT))
    args = ap.parse_args(argv)
    from tpu_compile import libtpu_missing, write_result

    if (why := libtpu_missing()):
        print(why)
        return 1
    t0, lines = time.perf_counter(), []
    for vocab in args.vocab:
        scattered, whole, ratio = measure(vocab)
        lines.append(f"| {vocab} | {scattered} | {whole} | {ratio:.3f} |")
        print(lines[-1], flush=True)
    text = "\n".join([
        "# A tied table's fsdp gradient on XLA:TPU, by vocabulary size", "",
        f"`python benchmarks/tpu_tied_vocab.py` (generated; {time.perf_counter() - t0:.0f} s). The toy of the script's "
        "docstring per vocabulary: how many of the table's two gradients (its lookup's and its tied logits') XLA:TPU "
        "reduce-scatters and all-reduces whole over fsdp, and the estimate's collective bytes over the compiled ones "
        "(it reduce-scatters the lookup's and all-reduces the logits').", "",
        "| vocabulary | reduce-scattered | all-reduced whole | est. / compiled |", "|---|---|---|---|", *lines]) + "\n"
    write_result(text, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
