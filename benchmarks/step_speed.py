"""How long ``make_train_step`` takes on a third-party model, in traces of its forward pass.

Run: python benchmarks/step_speed.py [--repeat 3]   (needs transformers: pip install -e ".[thirdparty]")
Writes benchmarks/results/step_speed.md.

``make_train_step`` on a model that is not the zoo's traces its forward pass to check the step before
``dry_run`` or ``jax.jit`` traces it again: for the shard_maps it calls (over the step's mesh or not), the
loss's output (one float scalar) and, without ``loss=``, the default loss the output chooses. Each row sets
the median ``make_train_step`` time beside the median time of one abstract forward pass
(``jax.eval_shape`` of the same function, a fresh closure each call so that jax's trace cache does not
answer it) measured in the same run: the ratio is the figure to read, the seconds move with the machine's
load. Transformers' Flax GPT-2 (124M, 12 layers) and Llama at Llama-2-7B's width (2 layers), abstract
parameters, 8 CPU-emulated devices, ``data=2,model=4``, adamw, 8 sequences of 512 tokens.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

import tpflax  # noqa: E402

MESH = {"data": 2, "model": 4}
IDS = jax.ShapeDtypeStruct((8, 512), jnp.int32)


def models():
    """``{name: (forward(variables, ids) -> logits, abstract variables)}``."""
    from transformers import FlaxGPT2LMHeadModel, FlaxLlamaForCausalLM, GPT2Config, LlamaConfig

    out = {}
    for name, cls, cfg in (
            ("gpt2 (124M)", FlaxGPT2LMHeadModel, GPT2Config()),
            ("llama-2-7b width, 2 layers", FlaxLlamaForCausalLM, LlamaConfig(num_hidden_layers=2))):
        hf = cls(cfg, _do_init=False)
        params = jax.eval_shape(lambda hf=hf: hf.init_weights(jax.random.key(0), (1, 8)))
        out[name] = (lambda v, ids, hf=hf: hf(ids, params=v).logits), params
    return out


def median_seconds(fn, repeat: int) -> float:
    """Median of ``repeat`` calls after a first one (imports and one-time set-up)."""
    fn()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    mesh = tpflax.make_mesh(MESH)
    rows = []
    for name, (fn, params) in models().items():
        plan = tpflax.plan(params, MESH)
        forward = median_seconds(lambda fn=fn, p=params: jax.eval_shape(lambda v, x: fn(v, x), p, IDS), args.repeat)
        step = median_seconds(lambda fn=fn, p=plan: tpflax.make_train_step(
            fn, p, mesh, optax.adamw(1e-3), sample=(IDS,)), args.repeat)
        rows.append((name, forward, step, step / forward))
        print(f"{name:28s} forward {forward:6.2f} s  make_train_step {step:6.2f} s  ratio {step / forward:5.2f}",
              flush=True)
    lines = ["# make_train_step speed: its time in abstract forward passes", "",
             f"`python benchmarks/step_speed.py` (median of {args.repeat} after a first call, jax {jax.__version__}, "
             f"8 CPU-emulated devices, mesh {','.join(f'{k}={v}' for k, v in MESH.items())}, adamw, default loss, "
             "ids (8, 512)). The ratio is measured within one run; the seconds move with the machine's load.", "",
             "| model | forward pass (s) | make_train_step (s) | ratio |", "|---|---:|---:|---:|"]
    lines += [f"| {n} | {f:.2f} | {s:.2f} | {r:.2f} |" for n, f, s, r in rows]
    out = Path(__file__).parent / "results" / "step_speed.md"
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
