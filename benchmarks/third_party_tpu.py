"""The third-party benchmark at published widths, compiled by the TPU compiler for a v5e:2x4 topology.

``benchmarks/third_party.py`` measures tiny configs on 8 CPU devices; tiny configs
distort every size threshold. This module takes the same transformers 4.57 Flax
classes (``benchmarks/hf_models.py``) at their published widths (the well-known
checkpoint's hidden size, heads, K/V heads, MLP width, vocabulary and position
table) with 2 layers per stack, abstract parameters (``jax.eval_shape``; nothing
is allocated at full size), and compiles the adamw train step of
``tpflax.make_train_step`` with ``tpflax.dry_run`` on a mesh over the 8 abstract
devices of ``tpu-v5e:2x4`` (libtpu's compile-only devices; no TPU needed).

Plans: ``tree`` (``tpflax.plan(params, mesh, batch=sample)``), ``model`` (``...,
model=fn, sample=...``) and ``megatron`` (the hand layout, ``benchmarks/megatron_rules.py``).
Numbers per plan: bytes per device (argument + temp + output - alias, each kept),
collective bytes per step (the compiled HLO, ``tpflax.hlo``), flops per device,
and ``tpflax.estimate(plan, adamw, model=fn, sample=..., backend="tpu")``'s
collective bytes beside the compiled ones. Plans whose specs equal an already
compiled plan's reuse its numbers (the compile is the same program).

    pip install -e ".[thirdparty,tpu]"
    python benchmarks/third_party_tpu.py --arch bert gpt2 --mesh data=2,model=4
    python benchmarks/third_party.py --tpu-widths          # the same, every published arch
    python benchmarks/third_party_tpu.py --table-only      # rewrite the table from the json
    python benchmarks/third_party_tpu.py --redo --arch vit --mesh fsdp=2,model=4   # compile those rows again

Results: ``benchmarks/results/third_party_tpu.md`` and ``third_party_tpu.json``
(the raw rows; a rerun resumes from it).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_models import BY_NAME, Arch  # noqa: E402
from megatron_rules import megatron_rules  # noqa: E402
from plan_diff import diff_plans  # noqa: E402
from third_party import plan_each  # noqa: E402

TARGET = "tpu-v5e:2x4"
PLANS = ("tree", "model", "megatron")
MESHES = ({"data": 2, "model": 4}, {"fsdp": 2, "model": 4})
RESULTS = Path(__file__).resolve().parent / "results"
_BERT_BASE = dict(hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
                  max_position_embeddings=512)


@dataclass(frozen=True)
class Published:
    """One architecture at its published width (2 layers per stack).

    Attributes:
        name: the architecture's name in ``hf_models.BY_NAME``.
        checkpoint: the published model whose numbers these are.
        kwargs: its config fields (layers set to 2).
        vocab: the vocabulary (or class count) the hand layout splits.
        dtype: ``"float32"`` or ``"bfloat16"``: parameters and compute, as released.
        batch: global batch of the compiled step.
        seq: tokens per example (decoder tokens for Whisper; images set their own).
        kv_heads: K/V heads, when fewer than the query heads.
    """

    name: str
    checkpoint: str
    kwargs: dict
    vocab: int
    dtype: str = "float32"
    batch: int = 8
    seq: int = 512
    kv_heads: int | None = None

    def arch(self) -> Arch:
        """The benchmark's :class:`hf_models.Arch` with the published config."""
        return replace(BY_NAME[self.name], kwargs=self.kwargs, note=self.checkpoint)

    def build(self) -> Any:
        """The built model (abstract parameters) at ``batch`` x ``seq``."""
        import jax.numpy as jnp

        dtype = None if self.dtype == "float32" else getattr(jnp, self.dtype)
        return self.arch().build(batch=self.batch, seq=self.seq, dtype=dtype)


PUBLISHED: dict[str, Published] = {p.name: p for p in (
    Published("bert", "bert-base-uncased", dict(_BERT_BASE, vocab_size=30522, type_vocab_size=2), 30522),
    Published("gpt2", "gpt2 (124M)", dict(vocab_size=50257, n_positions=1024, n_embd=768, n_layer=2,
                                          n_head=12), 50257),
    Published("llama", "Llama-2-7b", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                                          num_hidden_layers=2, num_attention_heads=32,
                                          num_key_value_heads=32, max_position_embeddings=4096),
              32000, "bfloat16"),
    Published("mistral", "Mistral-7B-v0.1", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                                 num_hidden_layers=2, num_attention_heads=32,
                                                 num_key_value_heads=8, max_position_embeddings=32768,
                                                 sliding_window=4096), 32000, "bfloat16", kv_heads=8),
    Published("opt", "opt-125m", dict(vocab_size=50272, max_position_embeddings=2048, hidden_size=768,
                                      num_hidden_layers=2, ffn_dim=3072, num_attention_heads=12,
                                      word_embed_proj_dim=768), 50272),
    Published("vit", "vit-base-patch16-224 (ViT-B/16)", dict(
        hidden_size=768, num_hidden_layers=2, num_attention_heads=12, intermediate_size=3072,
        image_size=224, patch_size=16, num_labels=1000), 1000, batch=32),
    Published("t5", "t5-base", dict(vocab_size=32128, d_model=768, d_kv=64, d_ff=3072, num_layers=2,
                                    num_heads=12, relative_attention_num_buckets=32), 32128),
    Published("bloom", "bloom-560m", dict(vocab_size=250880, hidden_size=1024, n_layer=2, n_head=16), 250880),
    Published("gemma", "gemma-2b", dict(vocab_size=256000, hidden_size=2048, intermediate_size=16384,
                                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=1,
                                        head_dim=256, max_position_embeddings=8192),
              256000, "bfloat16", kv_heads=1),
    Published("bart", "bart-base", dict(vocab_size=50265, max_position_embeddings=1024, d_model=768,
                                        encoder_layers=2, decoder_layers=2, encoder_attention_heads=12,
                                        decoder_attention_heads=12, encoder_ffn_dim=3072,
                                        decoder_ffn_dim=3072), 50265),
    Published("clip", "clip-vit-base-patch32", dict(
        text_config=dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=2,
                         num_attention_heads=8, max_position_embeddings=77),
        vision_config=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=2,
                           num_attention_heads=12, image_size=224, patch_size=32),
        projection_dim=512), 49408, batch=32, seq=77),
    Published("whisper", "whisper-base", dict(
        vocab_size=51865, num_mel_bins=80, d_model=512, encoder_layers=2, decoder_layers=2,
        encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048, decoder_ffn_dim=2048,
        max_source_positions=1500, max_target_positions=448), 51865, seq=448),
    # a 2*odd vocabulary whose untied table tpflax splits on its features by cost (the tiny
    # config's CPU row is above the hand layout on comm; this is the width that decides)
    Published("distilbert-tok", "distilbert-base-uncased, a 9-label token-classification head", dict(
        vocab_size=30522, dim=768, n_layers=2, n_heads=12, hidden_dim=3072, max_position_embeddings=512,
        num_labels=9), 30522),
)}
ORDER = ("bert", "gpt2", "llama", "mistral", "opt", "vit", "t5", "bloom", "gemma", "bart", "clip", "whisper",
         "distilbert-tok")


@dataclass(frozen=True)
class Row:
    """One compiled plan: XLA's memory split, collectives, flops, the estimate, the leaf diff."""

    arch: str
    mesh: str
    plan: str
    argument: float | None = None
    temp: float | None = None
    output: float | None = None
    alias: float | None = None
    comm: float | None = None
    flops: float | None = None
    est_comm: float | None = None
    error: str = ""
    seconds: float = 0.0
    same_as: str = ""  # the plan whose compile this row reuses (identical specs)
    comm_by: dict = field(default_factory=dict)  # compiled {kind: {axis: bytes}}
    est_by: dict = field(default_factory=dict)  # estimated {kind: {axis: bytes}}
    est_comm_act: float | None = None  # the estimate told the compute dtype (act_dtype=)
    diff: list = field(default_factory=list)  # leaves whose spec differs from the hand layout's

    @property
    def bytes(self) -> float | None:
        """Bytes per device: argument + temp + output - alias (donated buffers once)."""
        if self.argument is None:
            return None
        return self.argument + self.temp + self.output - self.alias


def mesh_label(mesh: dict[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in mesh.items())


def published_plans(pub: Published, built: Any, mesh: dict[str, int]) -> dict[str, Any]:
    """tree, model= and the hand layout for ``pub`` on ``mesh`` (planning only; abstract).

    >>> p = PUBLISHED["bert"]
    >>> plans = published_plans(p, p.build(), {"data": 2, "model": 4})
    >>> plans["megatron"].decisions["bert/encoder/layer/0/attention/self/query/kernel"].spec
    P(None, 'model')
    """
    return plan_each(built.params, mesh, {
        "tree": {"batch": built.sample},
        "model": {"model": built.fn, "sample": built.sample, "batch": built.sample},
        "megatron": {"rules": megatron_rules(pub.name, mesh, vocab=pub.vocab, kv_heads=pub.kv_heads)},
    })


def _specs(plan: Any) -> tuple:
    return tuple(sorted((p, str(tuple(d.spec))) for p, d in plan.decisions.items()))


def compile_row(pub: Published, built: Any, mesh: dict[str, int], name: str, plan: Any) -> Row:
    """Compile the adamw step for ``plan`` on the TPU target and read the numbers."""
    import optax

    import tpflax

    label = mesh_label(mesh)
    t0 = time.perf_counter()
    tx = optax.adamw(1e-4)
    try:
        m = tpflax.make_mesh(mesh, target=TARGET)
        ts = tpflax.make_train_step(built.fn, plan, m, tx, sample=built.sample, loss=built.loss)
        dr = tpflax.dry_run(ts, plan, m)
    except Exception as e:  # noqa: BLE001 - a failure is a finding, recorded in the table
        return Row(pub.name, label, name, error=f"step: {type(e).__name__}: {str(e)[:300]}",
                   seconds=time.perf_counter() - t0)
    mem = {k: float(dr.memory[k] or 0) for k in ("argument", "temp", "output", "alias")}
    return Row(pub.name, label, name, comm=float(dr.comm_total), flops=dr.flops,
               seconds=time.perf_counter() - t0, comm_by=dr.comm(), **mem)


def estimate_comm(built: Any, plan: Any, act_dtype: Any = None) -> tuple[float | None, dict, str]:
    """The estimate's collective bytes for ``plan`` (TPU backend), by kind and axis, or the error."""
    import optax

    import tpflax

    try:
        e = tpflax.estimate(plan, optax.adamw(1e-4), model=built.fn, sample=built.sample, loss=built.loss,
                            backend="tpu", act_dtype=act_dtype)
    except Exception as e:  # noqa: BLE001 - recorded; the compiled numbers still count
        return None, {}, f"estimate: {type(e).__name__}: {str(e)[:200]}"
    return float(e.comm_total), e.comm, ""


def run_arch(pub: Published, meshes, done: dict, sink) -> None:
    """Build ``pub`` once; plan, estimate and compile every (mesh, plan) not in ``done``.

    ``done`` maps ``(arch, mesh, plan)`` to the rows of earlier runs.
    """
    built = pub.build()
    for mesh in meshes:
        label = mesh_label(mesh)
        todo = [n for n in PLANS if (pub.name, label, n) not in done]
        if not todo:
            continue
        plans = published_plans(pub, built, mesh)
        ref = plans["megatron"]
        compiled: dict[tuple, Row] = {}
        for name in ("megatron", *(n for n in PLANS if n != "megatron")):  # the reference first
            plan = plans[name]
            if name not in todo:  # measured by an earlier run: its compile may still be reused
                if not isinstance(plan, Exception) and not done[(pub.name, label, name)].error:
                    compiled.setdefault(_specs(plan), done[(pub.name, label, name)])
                continue
            if isinstance(plan, Exception):
                row = Row(pub.name, label, name, error=f"plan: {type(plan).__name__}: {str(plan)[:300]}")
            else:
                prior = compiled.get(_specs(plan))
                row = (replace(prior, plan=name, same_as=prior.plan, seconds=0.0) if prior
                       else compile_row(pub, built, mesh, name, plan))
                compiled.setdefault(_specs(plan), row)
                est, by, err = estimate_comm(built, plan)
                # an HF apply hides its compute dtype from the estimate (int ids in, default f32)
                act = est if pub.dtype == "float32" else estimate_comm(built, plan, pub.dtype)[0]
                diff = [] if isinstance(ref, Exception) else diff_plans(plan, ref)
                row = replace(row, est_comm=est, est_by=by, est_comm_act=act, error=row.error or err, diff=diff)
            print(f"{pub.name:<9}{label:<16}{name:<10}"
                  f"{row.error or f'{row.bytes / 2**20:.0f} MiB  {row.comm / 2**20:.1f} MiB comm  {row.flops:.3g} flops'}"
                  f"  ({row.seconds:.0f}s{', = ' + row.same_as if row.same_as else ''})", flush=True)
            sink(row)


def diff_section(names: list[str], meshes) -> list[str]:
    """Markdown: per published arch and mesh, the tree-only and model= leaves off the hand layout.

    Planning only (seconds per arch), so it covers the architectures not compiled too.
    """
    out = ["## Where tpflax's plans differ from the hand layout (planning only, every published arch)", "",
           "Leaves (layer indices folded to `*`) whose spec differs from the hand layout's, with tpflax's "
           "strategy and reason. `same` means the plan is the hand layout, spec for spec: its compiled "
           "program is the hand layout's.", ""]
    for name in names:
        pub = PUBLISHED[name]
        try:
            built = pub.build()
        except Exception as e:  # noqa: BLE001 - a failure is a finding
            out += [f"- **{name}**: build failed: {type(e).__name__}: {str(e)[:200]}"]
            continue
        for mesh in meshes:
            plans = published_plans(pub, built, mesh)
            for plan in ("tree", "model"):
                p, ref = plans[plan], plans["megatron"]
                if isinstance(p, Exception) or isinstance(ref, Exception):
                    bad = p if isinstance(p, Exception) else ref
                    out.append(f"- **{name} {mesh_label(mesh)} {plan}**: planning failed: {type(bad).__name__}")
                    continue
                d = diff_plans(p, ref)
                out.append(f"- **{name} {mesh_label(mesh)} {plan}**: "
                           + ("same" if not d else f"{len(d)} leaf kinds differ"))
                out += [f"  - `{x}`" for x in d]
    return out + [""]


def reestimate(rows: list[Row]) -> list[Row]:
    """``rows`` with the estimate's fields recomputed (planning and estimating only, no compile)."""
    out = list(rows)
    for name in dict.fromkeys(r.arch for r in rows):
        pub = PUBLISHED[name]
        built = pub.build()
        for label in dict.fromkeys(r.mesh for r in rows if r.arch == name):
            mesh = {k: int(v) for k, v in (kv.split("=") for kv in label.split(","))}
            plans = published_plans(pub, built, mesh)
            for i, r in enumerate(out):
                if r.arch != name or r.mesh != label or isinstance(plans[r.plan], Exception):
                    continue
                est, by, _ = estimate_comm(built, plans[r.plan])
                act = est if pub.dtype == "float32" else estimate_comm(built, plans[r.plan], pub.dtype)[0]
                out[i] = replace(r, est_comm=est, est_by=by, est_comm_act=act)
    return out


def load(path: Path) -> list[Row]:
    if not path.exists():
        return []
    return [Row(**r) for r in json.loads(path.read_text())]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="*", default=list(ORDER), choices=sorted(PUBLISHED))
    ap.add_argument("--mesh", nargs="*", default=[mesh_label(m) for m in MESHES])
    ap.add_argument("--fresh", action="store_true", help="ignore rows already in the json")
    ap.add_argument("--redo", action="store_true",
                    help="compile the json's --arch x --mesh x --plan rows again, keeping its other rows")
    ap.add_argument("--plan", nargs="*", default=list(PLANS), choices=PLANS, help="the plans --redo compiles")
    ap.add_argument("--out", default=str(RESULTS / "third_party_tpu.md"))
    ap.add_argument("--table-only", action="store_true", help="rewrite the table from the json")
    ap.add_argument("--diff", action="store_true", help="add the plan-only leaf diffs of every --arch")
    ap.add_argument("--reestimate", action="store_true",
                    help="recompute the estimate columns of the json's rows (no compile), then write the table")
    args = ap.parse_args(argv)
    meshes = [{k: int(v) for k, v in (kv.split("=") for kv in m.split(","))} for m in args.mesh]
    raw = Path(args.out).with_suffix(".json")
    rows = [] if args.fresh else load(raw)
    labels = {mesh_label(m) for m in meshes}
    done = {(r.arch, r.mesh, r.plan): r for r in rows
            if not (args.redo and r.arch in args.arch and r.mesh in labels and r.plan in args.plan)}

    def sink(row: Row) -> None:  # a redone row takes its old row's place
        keys = [(r.arch, r.mesh, r.plan) for r in rows]
        key = (row.arch, row.mesh, row.plan)
        if key in keys:
            rows[keys.index(key)] = row
        else:
            rows.append(row)
        raw.write_text(json.dumps([asdict(r) for r in rows], indent=1))

    t0 = time.perf_counter()
    if args.reestimate:
        rows = reestimate(rows)
        raw.write_text(json.dumps([asdict(r) for r in rows], indent=1))
    for mesh in [] if args.table_only or args.reestimate else meshes:  # one mesh over every arch first: the most rows soonest
        for name in args.arch:
            try:
                run_arch(PUBLISHED[name], [mesh], done, sink)
            except Exception:  # noqa: BLE001 - keep going; the traceback is in the log
                traceback.print_exc()
    from third_party_tpu_table import write_markdown

    extra = diff_section(args.arch, meshes) if args.diff else []
    write_markdown(rows, Path(args.out), PUBLISHED, TARGET, extra)
    print(f"{time.perf_counter() - t0:.0f}s\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
