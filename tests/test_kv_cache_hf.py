"""transformers' Flax decoders' generation caches (``model.init_cache``) planned with their parameters:
split over the batch and like the key/value projections' heads (separate, fused ``[q|k|v]``), or over the
batch only where those projections are kept whole (GQA with fewer key/value heads than model ranks)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the thirdparty extra is not installed "
                    "(pip install -e '.[thirdparty]')")

import jax  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

import tpflax  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from hf_models import BY_NAME  # noqa: E402

MESH = {"data": 2, "model": 4}


@pytest.mark.parametrize(("arch", "layer", "spec"), [
    ("llama", "model/layers/0/self_attn", P("data", None, "model", None)),      # k_proj/v_proj columns
    ("gpt2", "transformer/h/0/attn", P("data", None, "model", None)),           # fused c_attn, head-aligned
    ("mistral", "model/layers/0/self_attn", P("data", None, None, None)),       # 2 kv heads, K/V kept whole
])
def test_generation_cache_follows_the_key_value_projections(arch, layer, spec):
    built = BY_NAME[arch].build()
    tree = jax.eval_shape(lambda: {"params": built.params, "cache": built.model.init_cache(8, 32)})
    plan = tpflax.plan(tree, MESH)
    for leaf in ("cached_key", "cached_value"):
        assert plan.decisions[f"cache/{layer}/{leaf}"].spec == spec, leaf
    assert plan.decisions[f"cache/{layer}/cache_index"].spec == P()
