"""tpflax's plans on MaxText's own models (PyPI ``maxtext`` 0.2.4), against the layout MaxText ships for them.

MaxText writes its decoders in NNX, wrapped for linen (``models.transformer_as_linen``): the layers scanned
(``param_scan_axis: 1``, so a stacked kernel's layers dim is its *second*), ``DenseGeneral`` attention kernels
``(embed, layers, heads, head_dim)``, every parameter boxed with MaxText's logical names, every activation
constrained by name inside the model (``maybe_shard_with_logical``). Its layout is its ``base.yml``'s
``logical_axis_rules`` over its twelve-axis mesh (``diloco``, ``data``, ``stage``, ``fsdp``, ..., ``tensor``,
..., ``autoregressive``), most axes of size 1. The **hand** column here is that layout: each parameter's logical
names through MaxText's own rules and its ``remove_size_one_mesh_axis``, as MaxText's trainer places them.

The models are built from MaxText's model configs (``configs/models/*.yml``) at tiny widths with the real
ratios (``MODELS`` below; ``mixtral`` runs MaxText's dense einsum over the experts, ``mixtral-sparse`` its
``sparse_matmul`` path: tokens sorted by expert into ``jax.lax.ragged_dot`` inside a ``shard_map``, with
``megablox=False``, as off TPU), through MaxText's own ``pyconfig``; each runs on MaxText's mesh, the CLI's
``data=2,tensor=4`` and ``fsdp=2,tensor=4`` with the other ten axes of size 1 (``expand``). The step is
``tpflax.make_train_step``'s adamw step on next-token cross-entropy, as the other probes measure it.

MaxText 0.2.4 declares Python 3.12 and imports much of Google's training stack; its models import on 3.11
with two PEP 695 ``type X = ...`` aliases rewritten (``_patch``) and these installed without their
dependencies:

    pip download --no-deps --python-version 3.12 --only-binary=:all: maxtext==0.2.4   # then unzip to T
    pip install --no-deps --target T jinja2 markupsafe pydantic pydantic-core typing-inspection \\
        annotated-types omegaconf antlr4-python3-runtime==4.9.3 pyyaml aqtp qwix tokamax typeguard==2.13.3 \\
        tqdm tensorboardx pathwaysutils fastapi starlette annotated-doc anyio opentelemetry-api uvicorn click \\
        immutabledict jaxtyping einshape grain cloudpickle portpicker array-record drjax wadler-lindig \\
        tiktoken sentencepiece sympy mpmath
    PYTHONPATH=T python benchmarks/probe_maxtext.py
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

T = 64  # tokens per example; one example per device, MaxText's per_device_batch_size=1
WIDTH = dict(base_emb_dim=256, head_dim=32, base_num_decoder_layers=2)
# Tiny widths with each config's ratios: heads to K/V heads, mlp to d, vocab to d (rounded to a multiple of 8).
MODELS = {
    "llama3": dict(model_name="llama3-8b", base_num_query_heads=16, base_num_kv_heads=4, head_dim=16,
                   base_mlp_dim=896, vocab_size=8016),
    "mixtral": dict(model_name="mixtral-8x7b", base_num_query_heads=16, base_num_kv_heads=4, head_dim=16,
                    base_mlp_dim=896, base_moe_mlp_dim=896, vocab_size=2000, sparse_matmul=False),
    "mixtral-sparse": dict(model_name="mixtral-8x7b", base_num_query_heads=16, base_num_kv_heads=4, head_dim=16,
                           base_mlp_dim=896, base_moe_mlp_dim=896, vocab_size=2000, sparse_matmul=True,
                           megablox=False),
    "gemma2": dict(model_name="gemma2-2b", base_num_query_heads=8, base_num_kv_heads=4, base_mlp_dim=1024,
                   vocab_size=28456, sliding_window_size=32),
    "gpt3": dict(model_name="gpt3-6b", base_num_query_heads=4, base_num_kv_heads=4, base_mlp_dim=1024,
                 head_dim=64, vocab_size=2736, trainable_position_size=T * 2, max_target_length=T),
}
# MaxText requires the K/V heads to divide its tensor axis (4 here), so llama3's and mixtral's 32:8 heads are
# 16:4 at head_dim 16, gemma2's 8:4 at head_dim 32.
NAMES = (*MODELS, *(f"{m}-off" for m in MODELS))  # -off: planned with use_annotations=False
SHAPES = ({"data": 2, "tensor": 4}, {"fsdp": 2, "tensor": 4})


def _patch() -> None:
    """Rewrite MaxText's PEP 695 ``type X = ...`` aliases (Python 3.12 syntax) as plain assignments, in place."""
    import re

    root = Path(importlib.util.find_spec("maxtext").origin).parent
    for path in root.rglob("*.py"):
        text = path.read_text()
        new = re.sub(r"(?m)^(\s*)type ([A-Za-z_]\w*) =", r"\1\2 =", text)
        if new != text:
            path.write_text(new)


def available() -> str:
    """'' if MaxText's models import, else why not."""
    if importlib.util.find_spec("maxtext") is None:
        return "maxtext is not installed (see the script's docstring)"
    try:
        import maxtext.models.models  # noqa: F401
    except SyntaxError:
        _patch()
    try:
        import maxtext.models.models  # noqa: F401, F811
    except Exception as e:  # noqa: BLE001 - say why it does not import
        return f"maxtext.models.models does not import: {type(e).__name__}: {e}"
    return ""


def _config(name: str, shape: dict[str, int]):
    import maxtext
    from maxtext.configs import pyconfig

    base = str(Path(maxtext.__file__).parent / "configs" / "base.yml")
    kw = dict(run_name="probe", enable_checkpointing=False, hardware="cpu", skip_jax_distributed_system=True,
              max_target_length=T, per_device_batch_size=1, attention="dot_product", enable_dropout=False,
              override_model_config=True, **WIDTH)
    kw.update(MODELS[name])
    kw.update({f"ici_{a}_parallelism": shape.get(a, 1) for a in ("data", "fsdp", "tensor")})
    return pyconfig.initialize([None, base], **kw)


def expand(shape: dict[str, int]) -> dict[str, int]:
    """MaxText's mesh for ``shape``: its twelve axes in its order, those ``shape`` lacks of size 1."""
    return {a: shape.get(a, 1) for a in _config("llama3", shape).mesh_axes}


def maxtext_rules(variables, mesh: dict[str, int], config):
    """MaxText's layout: each parameter's logical names through ``config.logical_axis_rules`` (flax's
    resolution, then MaxText's ``remove_size_one_mesh_axis``), one rule per leaf."""
    import re

    import flax.linen as nn
    import jax
    from flax.core import meta
    from jax.sharding import PartitionSpec as P
    from third_party import mesh_entry

    rules = []
    leaves = jax.tree_util.tree_flatten_with_path(variables, is_leaf=lambda x: isinstance(x, meta.Partitioned))[0]
    for path, x in leaves:
        spec = P(*(mesh_entry(e, mesh) for e in nn.logical_to_mesh_axes(x.names, config.logical_axis_rules)))
        rules.append((f"^{re.escape(jax.tree_util.keystr(path, simple=True, separator='/'))}$", spec))
    return rules


def build(name: str, mesh: dict[str, int]):
    """(Built, MaxText's rules, extra plan kwargs): the model on MaxText's mesh, its boxed variables; a name
    ending ``-off`` plans the same model with ``use_annotations=False`` (tpflax's own layout)."""
    base = name.removesuffix("-off")
    key = (base, tuple(mesh.items()))
    if key not in _CACHE:
        _CACHE[key] = _build(base, mesh)
    built, hand = _CACHE[key]
    return built, hand, ({"use_annotations": False} if name.endswith("-off") else {})


_CACHE: dict = {}


def _build(name: str, mesh: dict[str, int]):
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    from maxtext.layers import quantizations
    from maxtext.models import models
    from third_party import Built, next_token_loss

    import tpflax

    config = _config(name, {a: s for a, s in mesh.items() if s > 1})
    m = models.transformer_as_linen(config, tpflax.make_mesh(mesh), quantizations.configure_quantization(config))
    batch = config.global_batch_size_to_train_on

    rules = config.logical_axis_rules

    def fn(v, ids):
        # MaxText's trainer runs its model under its rules (``nn_partitioning.axis_rules``): every activation
        # constraint inside resolves through them; without them each would replicate its activation
        pos = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
        with nn.logical_axis_rules(rules):
            return m.apply(v, ids, pos, jnp.ones_like(ids), enable_dropout=False)

    ids = jnp.zeros((batch, T), jnp.int32)
    keys = {"params": jax.random.key(0), "dropout": jax.random.key(1), "aqt": jax.random.key(2)}
    with nn.logical_axis_rules(rules):
        variables = jax.jit(lambda: m.init(keys, ids, jnp.broadcast_to(jnp.arange(T), ids.shape),
                                           jnp.ones_like(ids), enable_dropout=False))()
    sample = (jax.ShapeDtypeStruct((batch, T), jnp.int32),)
    built = Built(name, m, variables, sample, fn, next_token_loss)
    return built, (lambda mesh: maxtext_rules(variables, mesh, config))


INTRO = ("`python benchmarks/probe_maxtext.py` (generated; maxtext 0.2.4 with jax 0.10). MaxText's own models "
         "(`MODELS` in the script: its llama3-8b, mixtral-8x7b (its dense and its ragged-dot `sparse_matmul` "
         "experts), gemma2-2b and gpt3-6b configs at tiny widths, 2 layers, scanned), on MaxText's twelve-axis mesh (the ten axes not named of size 1); the adamw train "
         "step of `tpflax.make_train_step` on next-token cross-entropy, compiled on 8 CPU-emulated devices and "
         "measured as `benchmarks/third_party.py` measures (`measure`). **x hand**: ratio to MaxText's own "
         "layout, its logical names through its `logical_axis_rules` (`maxtext_rules`); lower is better. "
         "**est.**: `tpflax.estimate(..., model=fn, backend=\"cpu\")` collective bytes over the compiled ones.")

OBSERVATIONS = """
## Observations (by hand)

All numbers from the table above unless said otherwise. Round 34 (7151a36 -> 8e7b578) added the probe; round 35
(from 8e7b578) the `mixtral-sparse` rows and the estimate fixes below.

- **Annotations read (the first five models)**: `tpflax.plan(variables, mesh)` lays out every leaf as MaxText's
  own rules do, tree-only and traced, on both meshes: the same program, 1.000 / 1.000 / 1.000. Before round 34,
  the mesh raised "axis 'diloco' has no known role"; given roles, mixtral's MoE kernels (`embed_moe`, `mlp_moe`,
  names MaxText 0.2 added) were whole: 2.58 / 5.85 / 1.02 of MaxText's layout (data=2,tensor=4) and 5.10 / 3.21
  / 1.04 (fsdp=2,tensor=4), where the embedding and the output head (`embed_vocab`) were whole too.
- **Annotations off (`-off`)**: tpflax's own plans are within 1.04x of MaxText's layout on every number, and
  traced they are below it on collectives wherever they differ:
  - mixtral-off: 0.973 / 0.624 / 0.999 (data=2,tensor=4) and 0.930 / 0.711 / 0.999: tpflax splits the 8 experts
    over the tensor axis where MaxText splits each expert's hidden dim, so the experts' outputs are whole on each
    device and only their weighted sum is summed.
  - llama3-off 1.000 / 0.946 / 0.999 and 0.999 / 0.955 / 0.999, mixtral-sparse-off 1.000 / 0.961 / 1.000 and
    1.000 / 0.973 / 1.000 (round 35): MaxText constrains its residual stream on its features over `tensor`, and
    tpflax now splits the token table the same way, where MaxText splits its rows (the vocab split sums the
    looked-up rows and reshards them into the constraint's layout). gemma2's table is tied to its logits and
    stays vocab-split.
  - mixtral-sparse-off: its experts run in MaxText's `shard_map` over ragged dots; tpflax lays them out as its
    in_specs do (round 35: before, the ragged dots were not traced).
- **gpt3-off, above MaxText's layout on bytes (1.037 / 1.029)**: tpflax keeps the 128-row learned position
  table whole where MaxText splits its rows, a trade the chooser takes for 0.7-1.8% fewer collectives. Before
  round 34, the fused `qkv_proj` `(d, layers, 3, heads, head_dim)` was taken for a conv window tree-only:
  1.454 / 1.376.
- **Estimates of MaxText's layout and tpflax's plans**: 0.943-1.074 of the compiled collectives on every tree,
  `model=` and MaxText-layout row. Round 35: mixtral's own layout 0.765 / 0.812 -> 1.006 / 0.997 (a hidden-split
  expert row sums its outputs again in the remat recompute, and gathers their gradient under the split stream);
  mixtral-off traced 0.964 -> 0.997. Round 36: mixtral-sparse's own layout 0.919 / 0.945 -> 0.966 / 0.977 (the
  bfloat16 expert outputs its `shard_map` body reduce-scatters by hand move as float32 on XLA:CPU, as the plan's
  own collectives were already priced; what is left is an all-to-all and a permute of the expert weights around
  the body, not priced); the lowest gemma2's own layout on data=2,tensor=4, 0.943; the highest llama3-off
  traced, 1.074 (the split stream's
  gathers per pair, 11 per layer priced, measured on MaxText's own layout, where the feature-split table
  changes a few).
- **The replicated and pure-FSDP rows** (no hand layout uses them): 0.58-1.07, from 0.32-0.93. Round 35 finds
  the whole embedding and output head at the ends of the constrained stream (past the norms, where it carries
  no tag: their dims are found by the widths the constraint splits): llama3 replicated 0.507 -> 0.883, mixtral
  0.318 -> 0.710. Two are lower in total and closer by axis: gemma2 pure-FSDP 0.781 -> 0.744 prices the data
  axis at 18.52 MB for 18.51 compiled (62.2 before, which hid the missing tensor-axis items). Round 37: a
  parameter a `shard_map` takes split where the plan keeps it whole (mixtral-sparse's experts under the
  replicated plan) has its gradient summed on that shard, updated split and gathered with its moments:
  mixtral-sparse replicated on data=2,tensor=4 0.630 -> 0.951.
- **Round 38: a whole kernel its matmul reads through a cast.** MaxText computes in bfloat16 over float32
  parameters, so each matmul reads a converted copy of its kernel. XLA lays that copy out as the matmul prefers,
  split like the stream features it contracts (the parameter itself stays whole), and all-reduces the partial
  outputs: the output head's `f32[4,64,8016]` partial logits, where the estimate had priced gathering its 256-wide
  input, as XLA does for a float32 kernel read as placed (`tests/test_stream_ends.py` has both). The trace now
  records which matmuls read their kernel through an op (`Dataflow.derived`). Estimates of the replicated and
  pure-FSDP rows, before -> after:
  - llama3 0.791-0.883 -> 1.027-1.035, gemma2 0.683-0.792 -> 1.016-1.024, mixtral-sparse 0.894-0.951 ->
    0.940-0.972: all within 10% now;
  - mixtral 0.583-0.710 -> 0.600-0.722: still under (its dense experts' einsums, not looked into);
  - **gpt3 0.955-1.068 -> 1.060-1.256, worse.** Its tied table's logits sum is now priced and matches the
    compiled all-reduce; what it had hidden is an over-estimate inside the scanned, rematerialised layers. There
    the estimate sums each whole MLP kernel's partial outputs (1024 wide), but XLA gathers the 256-wide input and
    the 1024-wide hidden instead (`f32[4,64,1024]`; llama3 likewise, `f32[4,64,896]`). A small stack under
    the same stream constraint does sum them (measured: two `nn.scan`'d 256 -> 1024 -> 256 MLP blocks under
    `P('data', None, 'model')` on data=2,model=4, bfloat16 or not, the `f32[4,64,1024]` partial outputs
    all-reduced), so the trigger is something MaxText's layer adds; not found this round.
  No tree, `model=` or MaxText-layout row moved.
- **Round 43: a whole kernel between two constraints** (the table regenerated: every compiled number and every
  tree, `model=` and MaxText-layout row are unchanged; only the `est.` column of the replicated and pure-FSDP
  rows moved). MaxText constrains both the stream (`activation_embed`) and the MLP's hidden
  (`activation_mlp`) over `tensor`, so a kernel the plan keeps whole has both its input and its output split.
  XLA then partitions the matmul by its output's split: it gathers the input forward (the 1024-wide hidden
  before `wo`, where summing its 256-wide partial outputs would move less) and, unless the matmul reads a copy
  cast to bfloat16, the output gradient backward. The estimate had summed the narrower side, or in the scan
  summed whatever the width (`tests/test_constraint_stream.py`
  `test_a_whole_kernel_between_two_constraints_gathers_what_it_contracts`, which reproduces both on a 2-layer
  model: 0.868 / 1.198 before, unrolled / scanned). Before -> after:
  - gpt3 1.060-1.256 -> 0.947-1.053: all within 10% now;
  - llama3 1.027-1.035 -> 0.944-0.974, gemma2 1.016-1.024 -> 0.938-0.959 (their gated MLPs read bfloat16
    copies; what is left is not looked into);
  - mixtral 0.600-0.722 -> 0.598-0.720 (its dense experts, still not looked into).
- **Round 44: whole kernels under MaxText's full remat, and its experts' batched `wo`** (the table regenerated;
  every compiled number is unchanged, and only the `est.` column moved: the replicated and pure-FSDP rows, and
  mixtral's and mixtral-sparse's own-layout rows by 0.001, their router's whole kernel summing its partial
  outputs again in the recompute). Under the replicated plan mixtral's
  `wo` (`BSEH,EHM->BSEM`) has its input gradient summed, `f32[4,64,8,896]` per layer, because the constrained
  stream splits its output's gradient; the estimate skipped it, as its matmul batches over the experts. And the
  recompute of each rematerialised layer sums `wi_0`/`wi_1`'s per-expert partial outputs again
  (`rematted_computation`), which was not priced. Measured on MLPs between two constraints
  (`tests/test_constraint_stream.py`): the recompute also gathers again an input no wider than its output (gpt3's
  256-wide stream before `qkv_proj`, `out` and `wi`; not `wo`'s 1024-wide hidden), the input gradient takes the
  narrower way, and a gated pair's second kernel (`wi_1`) is recomputed by summing its outputs, then gathers its
  output gradient and its input again for its weight gradient. Before -> after:
  - mixtral 0.598-0.720 -> 0.980-0.986;
  - llama3 0.944-0.974 -> 0.952-0.979, gemma2 0.938-0.959 -> 0.950-0.967;
  - gpt3 0.947-1.053 -> 0.896-0.971. Its data=2,tensor=4 replicated row, 0.896, is the one outside 10%: there
    XLA recomputes `wi` by summing its `f32[4,64,1024]` partial outputs (fused with a norm's row sums), while on
    fsdp=2,tensor=4, the same layout, it gathers the 256-wide input again, as the estimate says; why it chooses
    differently is not found.
- **Round 45** (the table regenerated; every compiled number unchanged): only mixtral-sparse's replicated and
  pure-FSDP rows moved, 0.974-0.988 -> 0.968-0.985. Its attention `out` kernel adds its output onto the residual
  stream MaxText constrains past the next norm, so the estimate now prices that output split too (as for
  EasyDeL's `o_proj`, `tests/test_constraint_block.py`): its input gathered forward and in the recompute and its
  output gradient gathered, where it had summed the partial outputs. The other models' `out` was priced so
  already (the split reached its output along the trace); the shared input gathers of kernels reading one
  activation are not priced under remat, where each kernel's recompute runs its own: every other row is as it was.
"""


def main(argv=None) -> int:
    from linen_probe import probe_main

    return probe_main(argv, NAMES, build, "probe_maxtext.md", title="# tpflax on MaxText's models", intro=INTRO,
                      tail=OBSERVATIONS, per_mesh=True, available=available, meshes=SHAPES, expand=expand)


if __name__ == "__main__":
    sys.exit(main())
