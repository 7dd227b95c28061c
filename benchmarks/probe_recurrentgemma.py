"""tpflax's plans on recurrentgemma's JAX Griffin (RG-LRU recurrent blocks, a temporal Conv1D, local MQA
attention, a gated MLP, a tied embedder), tiny configs keeping the published ratios.

Five plans per model and mesh, measured like ``benchmarks/linen_probe.py`` (its ``measure``): tree-only,
traced (``model=``), a hand Megatron layout, replicated, pure FSDP.

    pip install --no-deps recurrentgemma einops jaxtyping "typeguard<3" sentencepiece
    python benchmarks/probe_recurrentgemma.py                  # every model, both meshes
    python benchmarks/probe_recurrentgemma.py --arch griffin --mesh fsdp=2,model=4

A run of every model, mesh and plan writes ``results/probe_recurrentgemma.md`` (table only: the
observations under it are written by hand; ``--write PATH`` for another file, ``--no-write`` to print).
recurrentgemma is no tpflax dependency: without it the script says so and exits 0.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import functools
import itertools
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402
from third_party import Built  # noqa: E402

B, S, V = 8, 16, 1000  # vocab not a power of two (the published one is 256,000), divides the tensor axis


def _xent(logits, *_):
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])


def configs() -> dict[str, Any]:
    """Tiny Griffin configs keeping each preset's ratios: mlp 3x width, lru width 1x (RecurrentGemma) or
    1.375x (the Griffin paper's 7B: 5632 / 4096), the blocks (recurrent, recurrent, attention) repeated,
    one key/value head (MQA), a local window shorter than the sequence."""
    from recurrentgemma import common

    R, A = common.TemporalBlockType.RECURRENT, common.TemporalBlockType.ATTENTION
    pattern = itertools.cycle([R, R, A])
    base = dict(vocab_size=V, width=128, mlp_expanded_width=384, num_heads=4, attention_window_size=8,
                scan_type=common.ScanType.LINEAR_NATIVE)
    return {
        # RecurrentGemma-2B/9B: lru_width = width, embeddings scaled by sqrt(width), logits soft-capped
        "rgemma": common.GriffinConfig(**base, block_types=tuple(itertools.islice(pattern, 3)),
                                       embeddings_scale_by_sqrt_dim=True, logits_soft_cap=30.0, lru_width=128),
        # the Griffin paper's 7B: a wider RG-LRU (1.375x), no soft cap, no embedding scale
        "griffin7b": common.GriffinConfig(**base, block_types=(R, R, A, R, R, A),
                                          embeddings_scale_by_sqrt_dim=False, logits_soft_cap=0.0, lru_width=176),
        # Hawk: recurrent blocks only
        "hawk": common.GriffinConfig(**base, block_types=(R,) * 3, embeddings_scale_by_sqrt_dim=False,
                                     logits_soft_cap=0.0, lru_width=128),
    }


def griffin_hand(mesh, layers=False):
    """Megatron as the Griffin paper shards it: the RG-LRU's gates, a_param and the Conv1D split with the
    lru width (its heads), linear_x/linear_y columns, linear_out a row; attention's q a column, its one
    key/value head whole, proj_final a row; the gated MLP's up einsum split on its hidden dim; the tied
    embedding vocab-parallel."""
    f = "fsdp" if "fsdp" in mesh else None
    rules = [(r"input_embedding$", P("model", f)),
            (r"proj_q/kernel$", P(f, "model")), (r"proj_[kv]/kernel$", P(f, None)),
            (r"proj_final/kernel$", P("model", f)),
            (r"linear_[xy]/kernel$", P(f, "model")), (r"linear_[xy]/bias$", P("model")),
            (r"linear_out/kernel$", P("model", f)),
            (r"conv_1d/w$", P(None, "model")), (r"conv_1d/b$", P("model")),
            (r"rg_lru/a_param$", P("model")),
            (r"rg_lru/(input|a)_gate/w$", P("model", None, None)), (r"rg_lru/(input|a)_gate/b$", P("model", None)),
            (r"ffw_up/w$", P(None, f, "model")), (r"ffw_up/b$", P(None, None, None, "model")),
            (r"ffw_down/kernel$", P("model", f)),
            (r".*", P())]
    if layers:  # nn.scan's leading layers dim, never split
        rules = [(r"^params/layers/.*" + rx, P(None, *spec)) for rx, spec in rules[:-1]] + rules
    return rules


def scanned_hawk(cfg):
    """Hawk's recurrent blocks stacked with ``nn.scan(nn.remat(...))`` (recurrentgemma ships a Python list of
    blocks, which may differ in type; a user stacking alike blocks writes this), its embedder and final norm."""
    import flax.linen as nn
    from recurrentgemma.jax import layers, modules

    class Body(nn.Module):
        @nn.compact
        def __call__(self, x, pos):
            x, _ = modules.ResidualBlock(
                width=cfg.width, mlp_expanded_width=cfg.mlp_expanded_width, num_heads=cfg.num_heads,
                attention_window_size=cfg.attention_window_size, temporal_block_type=cfg.block_types[0],
                lru_width=cfg.lru_width, scan_type=cfg.scan_type, name="block")(x, pos, None, False)
            return x, None

    class ScannedHawk(nn.Module):
        @nn.compact
        def __call__(self, tokens, pos, return_cache=False):
            emb = modules.Embedder(cfg.vocab_size, cfg.width, cfg.embeddings_scale_by_sqrt_dim, name="embedder")
            stack = nn.scan(nn.remat(Body), variable_axes={"params": 0}, split_rngs={"params": True},
                            in_axes=nn.broadcast, length=cfg.num_layers)
            x, _ = stack(name="layers")(emb.encode(tokens), pos)
            return emb.decode(layers.RMSNorm(cfg.width, name="final_norm")(x)), None

    return ScannedHawk()


def build(name: str) -> tuple[Built, Any]:
    from recurrentgemma import jax as rg

    cfg = configs()[name.removesuffix("-scan")]
    # gradient_checkpointing=True (nn.remat per block), as shipped
    model = scanned_hawk(cfg) if name.endswith("-scan") else rg.Griffin(cfg)
    tokens = jax.ShapeDtypeStruct((B, S), jnp.int32)
    sample = (tokens, jax.ShapeDtypeStruct((B, S), jnp.int32))

    def fn(variables, toks, pos):
        return model.apply(variables, toks, pos, return_cache=False)[0]

    pos = jnp.broadcast_to(jnp.arange(S, dtype=jnp.int32), (B, S))
    variables = model.init(jax.random.key(0), jnp.zeros((B, S), jnp.int32), pos, return_cache=False)
    hand = functools.partial(griffin_hand, layers=name.endswith("-scan"))
    return Built(name, model, variables, sample, fn, _xent), hand


PLANS = ("tree", "model", "megatron", "replicated", "fsdp")
DESCRIPTION = ("`python benchmarks/probe_recurrentgemma.py` (generated; recurrentgemma 1.0.1's `recurrentgemma.jax.Griffin`, "
               "`gradient_checkpointing=True` as shipped, the RG-LRU's native linear scan). Configs: width 128, 4 heads "
               "and one key/value head, mlp 3x, vocab 1,000, window 8 < 16 tokens; **rgemma** RecurrentGemma's ratios "
               "(lru = width, blocks R R A), **griffin7b** the Griffin paper's 7B (lru 1.375x, R R A R R A), **hawk** "
               "three recurrent blocks. The adamw step of `tpflax.make_train_step`, compiled on 8 CPU-emulated devices "
               "and measured as `benchmarks/third_party.py` measures. **x hand**: ratio to the Megatron layout by "
               "hand (`griffin_hand`). **est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` collective bytes "
               "over the compiled ones.")


def main(argv=None):
    from linen_probe import probe_main

    try:
        import recurrentgemma.jax  # noqa: F401
    except ImportError as e:
        print(f"recurrentgemma is not installed ({e}); skipping. "
              "pip install --no-deps recurrentgemma einops jaxtyping 'typeguard<3' sentencepiece")
        return 0
    return probe_main(argv, (*configs(), "hawk-scan"), build, "probe_recurrentgemma.md",
                      title="# tpflax on recurrentgemma's Griffin", intro=DESCRIPTION)


if __name__ == "__main__":
    sys.exit(main())
