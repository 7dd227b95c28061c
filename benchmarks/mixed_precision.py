"""tpflax's plans and estimates on the third-party models in mixed precision: bfloat16 compute, float32 parameters.

``benchmarks/third_party.py`` runs transformers' Flax models in float32, as they are configured by default.
Most training runs compute in bfloat16 over float32 parameters (``dtype=jnp.bfloat16`` on the model, the
weights as initialised). Then every matmul reads a cast copy of its kernel, which XLA's sharding propagation
lays out as the matmul prefers, where the parameter itself keeps its placed layout; a whole kernel beside
split features is then sliced and its partial sums all-reduced (``tests/test_cast_kernels.py``). This probe
runs the same architectures, meshes, plans and measurement as ``third_party.py`` in that setting:

    python benchmarks/mixed_precision.py                  # every architecture, both meshes
    python benchmarks/mixed_precision.py --arch mistral gemma --mesh data=2,model=4

A run of every architecture, mesh and plan writes ``results/mixed_precision.md`` (needs the ``thirdparty``
extra).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

NAMES: tuple[str, ...] = ()
try:
    from hf_models import ARCHS, BY_NAME

    NAMES = tuple(a.name for a in ARCHS)
except ImportError:  # transformers is not installed: main() says so
    pass


def mixed(arch):
    """``arch`` (an :class:`hf_build.Arch`) built computing in bfloat16 over its float32 parameters as
    initialised: the model and apply of ``dtype=bfloat16``, the parameters of the default build."""
    import jax.numpy as jnp
    from hf_build import Built

    half, full = arch.build(dtype=jnp.bfloat16), arch.build()
    return Built(half.name, half.model, full.params, half.sample, half.fn, half.loss)


def build(name: str):
    """(Built, hand(mesh) -> rules): ``name`` computing in bfloat16 over its float32 parameters."""
    from megatron_rules import megatron_rules
    from third_party import vocab_of

    arch = BY_NAME[name]
    kv = arch.kwargs.get("num_key_value_heads")
    return mixed(arch), (lambda mesh: megatron_rules(arch.name, mesh, vocab=vocab_of(arch), kv_heads=kv))


def available() -> str:
    return "" if NAMES else "transformers is not installed (pip install -e '.[thirdparty]')"


INTRO = ("`python benchmarks/mixed_precision.py` (generated). transformers 4.57's Flax models as "
         "`benchmarks/third_party.py` builds them (`benchmarks/hf_models.py`: tiny configs, batch 8 x 32), computing "
         "in bfloat16 (`dtype=jnp.bfloat16`) over float32 parameters as initialised; the adamw train step of "
         "`tpflax.make_train_step` compiled on 8 CPU-emulated devices and measured as that script measures. "
         "**x hand**: ratio to the Megatron layout by hand (`benchmarks/megatron_rules.py`), lower is better. "
         "**est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` collective bytes over the compiled ones "
         "(XLA:CPU moves bfloat16 collectives as float32).")


OBSERVATIONS = """
## Observations (by hand)

First run 2026-12-05 (issue 11's thirty-eighth round), 42 architectures x 2 meshes x 5 plans, XLA:CPU.

- **Estimates: 420 of 420 rows within 10% of the compiled collectives (0.965-1.004).** Before this round, a
  partial run of 17 architectures had one architecture out: Mistral at 0.886 (data=2,model=4) and 0.897
  (fsdp=2,model=4) on all three of its sharded plans. Its 2 key/value heads stay whole beside 4 split query
  heads. Their cast copies' input gradients are summed over the 2 pieces XLA splits them into, one tuple
  all-reduce per layer. The estimate had priced gathers of their output gradients, as for a float32 kernel read
  as placed (`tests/test_cast_kernels.py`).
- **Plans against the hand layout: the same rows as in float32** (`third_party.md`).
  - The fsdp splits of small tables trade 0.6-0.8% more collectives for 0.6-1.5% fewer bytes.
  - The 1022-row tables of distilbert-tok, bert-qa and xlm-roberta-cls are split on their features: about half
    the bytes and 0.92-0.94x the flops, but up to 1.16x the collectives on XLA:CPU. The chooser prices for
    tpu-v5e, where this is the faster plan.
- **Against the partial run on the round's starting code, one plan moved:** t5's `model=` plan on
  fsdp=2,model=4, now equal to its tree plan (-384 bytes per device, +128 bytes of collectives). The chooser now
  prices XLA:TPU's bfloat16 gradient reductions, which makes a small leaf's fsdp split cheaper.
- **On XLA:TPU** (v5e:2x4, the `estimate`'s default backend): `mixed_precision_tpu.py` compiles the `model=`
  plans for the TPU and checks the estimate there (`mixed_precision_tpu.md`, from the thirty-ninth round on).
  - each gradient is reduced in bfloat16 before its cast back, so the estimate of a data-parallel step had been
    twice the compiled collectives. transformers' GPT-2 and BERT on data=2,model=4: 1.497 / 1.526 -> 1.002 /
    1.005;
  - fsdp=8: 1.99 / 2.06 -> 1.27 / 1.30 in the thirty-eighth round, 0.967 / 1.010 in the thirty-ninth (a
    float32 table's bfloat16 gradient shards reduce-scatter in the table's own tiles, both parts alike);
  - HF Llama and Mistral on data=2,model=4: 0.63-0.66 on the tensor axis in the thirty-eighth round, 1.001 in
    the thirty-ninth. Each projection casts the float32 norm output for itself, and XLA:TPU all-reduces each
    column's bfloat16 partial input gradient apart (q, k and v in one tuple of three).
"""


def main(argv=None) -> int:
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "mixed_precision.md", title="# Third-party models in mixed precision",
                      intro=INTRO, tail=OBSERVATIONS, available=available)


if __name__ == "__main__":
    raise SystemExit(main())
