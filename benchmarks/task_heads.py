"""tpflax on the transformers Flax task-head classes the third-party benchmark does not build.

``benchmarks/third_party.py`` compares 42 architectures with a Megatron layout written by hand. This
sweep runs the other heads of those families (causal LM, sequence and token classification, question
answering, multiple choice, pre-training, bare encoders) with no hand layout: it checks that tpflax
plans and steps each of them, that neither plan (tree-only, ``model=``) is dominated by the replicated
or the pure-FSDP layout (worse on a number and better on none), and that ``tpflax.estimate(...,
model=)``'s collective bytes are within 10% of the compiled program's.

    python benchmarks/task_heads.py                      # every class, both meshes (about 30 minutes)
    python benchmarks/task_heads.py --only MultipleChoice --mesh data=2,model=4

Writes ``results/task_heads.md`` and ``results/task_heads.json`` after a run of every class.
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from hf_build import Built, _apply, _xent  # noqa: E402
from hf_models import ARCHS  # noqa: E402
from third_party import MESHES, RESULTS, fsdp_rules, measure, mesh_label, plan_each  # noqa: E402

B, S, CHOICES = 8, 32, 4
BASE = {a.name: a for a in ARCHS}

# (base architecture, class, how it is called and trained, config fields beyond the base's)
CASES = (
    ("bert", "FlaxBertForCausalLM", "ids", None),
    ("bert", "FlaxBertForSequenceClassification", "cls", {"num_labels": 3}),
    ("bert", "FlaxBertForTokenClassification", "tokens", {"num_labels": 9}),
    ("bert", "FlaxBertForMultipleChoice", "choices", None),
    ("bert", "FlaxBertForPreTraining", "pretrain", None),
    ("bert", "FlaxBertForNextSentencePrediction", "cls", None),
    ("albert", "FlaxAlbertForPreTraining", "pretrain", None),
    ("albert", "FlaxAlbertForSequenceClassification", "cls", {"num_labels": 3}),
    ("albert", "FlaxAlbertForQuestionAnswering", "qa", None),
    ("albert", "FlaxAlbertForTokenClassification", "tokens", {"num_labels": 9}),
    ("albert", "FlaxAlbertForMultipleChoice", "choices", None),
    ("electra", "FlaxElectraForPreTraining", "replaced", None),
    ("electra", "FlaxElectraForMultipleChoice", "choices", None),
    ("electra", "FlaxElectraForTokenClassification", "tokens", {"num_labels": 9}),
    ("electra", "FlaxElectraForSequenceClassification", "cls", {"num_labels": 3}),
    ("electra", "FlaxElectraForQuestionAnswering", "qa", None),
    ("roberta", "FlaxRobertaForCausalLM", "ids", None),
    ("roberta", "FlaxRobertaForMultipleChoice", "choices", None),
    ("roberta", "FlaxRobertaForTokenClassification", "tokens", {"num_labels": 8}),
    ("roberta-preln", "FlaxRobertaPreLayerNormForSequenceClassification", "cls", {"num_labels": 3}),
    ("roberta-preln", "FlaxRobertaPreLayerNormForCausalLM", "ids", None),
    ("bigbird", "FlaxBigBirdForCausalLM", "ids", None),
    ("bigbird", "FlaxBigBirdForPreTraining", "pretrain", None),
    ("bigbird", "FlaxBigBirdForQuestionAnswering", "qa", None),
    ("bigbird", "FlaxBigBirdForSequenceClassification", "cls", {"num_labels": 3}),
    ("roformer", "FlaxRoFormerForMultipleChoice", "choices", None),
    ("roformer", "FlaxRoFormerForSequenceClassification", "cls", {"num_labels": 3}),
    ("roformer", "FlaxRoFormerForTokenClassification", "tokens", {"num_labels": 9}),
    ("distilbert", "FlaxDistilBertForQuestionAnswering", "qa", None),
    ("distilbert", "FlaxDistilBertForMultipleChoice", "choices", None),
    ("distilbert", "FlaxDistilBertForSequenceClassification", "cls", {"num_labels": 5}),
    ("bart", "FlaxBartForSequenceClassification", "cls", {"num_labels": 3}),
    ("bart", "FlaxBartForQuestionAnswering", "qa", None),
    ("bart", "FlaxBartForCausalLM", "ids", None),
    ("mbart", "FlaxMBartForQuestionAnswering", "qa", None),
    ("mbart", "FlaxMBartForSequenceClassification", "cls", {"num_labels": 3}),
    ("whisper", "FlaxWhisperForAudioClassification", "audio-cls", {"num_labels": 4}),
    ("beit", "FlaxBeitForMaskedImageModeling", "masked-image", None),
    ("gpt2", "FlaxGPT2Model", "hidden", None),
    ("llama", "FlaxLlamaModel", "hidden", None),
    ("mistral", "FlaxMistralModel", "hidden", None),
    ("gemma", "FlaxGemmaModel", "hidden", None),
    ("opt", "FlaxOPTModel", "hidden", None),
    ("gptj", "FlaxGPTJModel", "hidden", None),
    ("bloom", "FlaxBloomModel", "hidden", None),
    ("gpt-neo", "FlaxGPTNeoModel", "hidden", None),
    ("xglm", "FlaxXGLMModel", "hidden", None),
)


def build(arch: str, cls: str, how: str, extra: dict | None) -> Built:
    """The class on its base architecture's tiny config: model, abstract parameters, sample, apply, loss."""
    import jax
    import jax.numpy as jnp
    import optax
    import transformers

    base = BASE[arch]
    config = getattr(transformers, base.config)(**dict(base.kwargs, **(extra or {})))
    model = getattr(transformers, cls)(config, _do_init=False, seed=0)
    key = jax.random.key(1)
    ids = jax.random.randint(key, (B, S), 3, getattr(config, "vocab_size", 8), dtype=jnp.int32)
    shape = ids.shape
    if how in ("ids", "cls", "tokens", "qa"):
        if how in ("cls", "qa") and arch in ("bart", "mbart"):  # the eos token BART's heads pool at, one per row
            ids = ids.at[:, -1].set(config.eos_token_id)
        sample, (fn, loss) = (ids,), _apply(how, model)
    elif how == "choices":  # (batch, choices, seq) ids, one right choice per example
        sample = (jax.random.randint(key, (B, CHOICES, S), 3, config.vocab_size, dtype=jnp.int32),)
        shape = sample[0].shape
        fn = lambda p, x: model(x, params=p).logits  # noqa: E731
        loss = lambda out, x: _xent(out, x[:, 0, 0] % CHOICES)  # noqa: E731
    elif how == "pretrain":  # the masked LM's logits and the sentence-pair head (BERT's NSP, ALBERT's SOP)
        sample = (ids,)

        def fn(p, x):
            o = model(x, params=p)
            return o.prediction_logits, getattr(o, "sop_logits", None) if hasattr(o, "sop_logits") \
                else o.seq_relationship_logits

        loss = lambda out, x: _xent(out[0][:, :-1], x[:, 1:]) + _xent(out[1], x[:, 0] % 2)  # noqa: E731
    elif how == "replaced":  # ELECTRA's discriminator: one replaced-or-not logit per token
        sample = (ids,)
        fn = lambda p, x: model(x, params=p).logits  # noqa: E731
        loss = lambda out, x: optax.sigmoid_binary_cross_entropy(out, (x % 2).astype(out.dtype)).mean()  # noqa: E731
    elif how == "hidden":  # a bare model: its last hidden states, trained to a small norm
        sample = (ids,)
        fn = lambda p, x: model(x, params=p).last_hidden_state  # noqa: E731
        loss = lambda out, x: jnp.mean(out.astype(jnp.float32) ** 2)  # noqa: E731
    elif how == "audio-cls":  # log-mel features -> (batch, labels)
        sample = (jax.random.normal(key, (B, config.num_mel_bins, 2 * config.max_source_positions)),)
        shape = sample[0].shape
        fn = lambda p, x: model(x, params=p).logits  # noqa: E731
        loss = lambda out, x: _xent(out, jnp.zeros(out.shape[0], jnp.int32))  # noqa: E731
    elif how == "masked-image":  # BEiT's visual-token logits per patch
        sample = (jax.random.normal(key, (B, 3, config.image_size, config.image_size)),)
        shape = (B, config.image_size, config.image_size, 3)
        fn = lambda p, x: model(x, params=p).logits  # noqa: E731
        loss = lambda out, x: _xent(out, jnp.zeros(out.shape[:-1], jnp.int32))  # noqa: E731
    else:
        raise ValueError(how)
    params = jax.eval_shape(lambda: model.init_weights(jax.random.key(0), shape))
    return Built(cls, model, params, sample, fn, loss)


def run(cases, meshes) -> list:
    rows = []
    for arch, cls, how, extra in cases:
        built = build(arch, cls, how, extra)
        for mesh in meshes:
            t0 = time.perf_counter()
            calls = {"tree": {}, "model": {"model": built.fn, "sample": built.sample},
                     "replicated": {"rules": [(r".*", "replicate")]}, "fsdp": {"rules": fsdp_rules(built.params, mesh)}}
            nums = {name: measure(cls, mesh, name, p, built, compiler_options={"xla_backend_optimization_level": 0})
                    for name, p in plan_each(built.params, mesh, calls).items()}
            rows.append([cls, mesh_label(mesh), {n: [x.bytes, x.comm, x.flops, x.est_comm, x.error]
                                                 for n, x in nums.items()}])
            print(f"{cls:50s} {mesh_label(mesh):15s} {time.perf_counter() - t0:5.1f}s  "
                  + "  ".join(_verdict(rows[-1][2], n) for n in ("tree", "model"))
                  + "".join(f"  {n} ERROR {x.error[:160]}" for n, x in nums.items() if x.error and n not in ("tree", "model")),
                  flush=True)
    return rows


def _dominated(x, ref) -> bool:
    worse = [a > b * 1.001 for a, b in zip(x[:3], ref[:3], strict=True)]
    better = [a < b * 0.999 for a, b in zip(x[:3], ref[:3], strict=True)]
    return any(worse) and not any(better)


def _verdict(plans: dict, name: str) -> str:
    x = plans[name]
    if x[4]:
        return f"{name}: ERROR {x[4][:120]}"
    bad = [ref for ref in ("replicated", "fsdp") if not plans[ref][4] and _dominated(x, plans[ref])]
    est = x[3] / x[1] if x[1] else float("nan")
    return f"{name}: est {est:.3f}" + (f" DOMINATED by {', '.join(bad)}" if bad else "")


def markdown(rows: list) -> str:
    head = ["# transformers Flax task heads: tpflax's plans against replicated and pure FSDP", "",
            "`python benchmarks/task_heads.py` (generated). The task-head classes of the third-party benchmark's "
            "families that `third_party.py` does not build, on its tiny configs (`hf_models.py`), batch 8 x 32 "
            "(multiple choice: 8 x 4 choices x 32); the adamw step of `tpflax.make_train_step` compiled on 8 "
            "CPU-emulated devices and read as `third_party.measure` reads it. No hand layout: **vs replicated** / "
            "**vs fsdp** are the plan's bytes / comm / flops over those layouts'; a plan is **dominated** when it is "
            "worse on a number and better on none. **est.**: `tpflax.estimate(..., model=fn, backend='cpu')` "
            "collective bytes over the compiled ones.", ""]
    n_dom = n_est = n_err = 0
    body = ["| class | mesh | plan | bytes/device | comm/step | vs replicated | vs fsdp | est. | dominated |",
            "|---|---|---|---:|---:|---|---|---:|---|"]
    for cls, mesh, plans in rows:
        for name in ("tree", "model"):
            x = plans[name]
            if x[4]:
                n_err += 1
                body.append(f"| {cls} | {mesh} | {name} | error | | | | | {x[4][:80]} |")
                continue
            ratio = {ref: " / ".join(f"{a / b:.2f}" for a, b in zip(x[:3], plans[ref][:3], strict=True))
                     if not plans[ref][4] else f"({ref} failed: {plans[ref][4][:60]})" for ref in ("replicated", "fsdp")}
            dom = [ref for ref in ("replicated", "fsdp") if not plans[ref][4] and _dominated(x, plans[ref])]
            est = x[3] / x[1]
            n_dom += bool(dom)
            n_est += abs(est - 1) > 0.10
            body.append(f"| {cls} | {mesh} | {name} | {x[0]:,.0f} | {x[1]:,.0f} | {ratio['replicated']} | "
                        f"{ratio['fsdp']} | {est:.3f} | {', '.join(dom) or 'no'} |")
    total = sum(2 for _ in rows)
    summary = [f"**{len({r[0] for r in rows})} classes, {len(rows)} class x mesh rows, {total} plans: {n_err} failed, "
               f"{n_dom} dominated, {n_est} estimates more than 10% off the compiled collectives.**", ""]
    return "\n".join(head + summary + body) + "\n"


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=[], help="classes whose name contains one of these")
    ap.add_argument("--mesh", nargs="*", default=None, help="meshes, e.g. data=2,model=4")
    args = ap.parse_args(argv)
    meshes = [dict((k, int(v)) for k, v in (kv.split("=") for kv in m.split(","))) for m in args.mesh] \
        if args.mesh else list(MESHES)
    cases = [c for c in CASES if not args.only or any(o in c[1] for o in args.only)]
    rows = run(cases, meshes)
    if len(cases) == len(CASES) and not args.mesh:
        (RESULTS / "task_heads.json").write_text(json.dumps(rows, indent=0))
        (RESULTS / "task_heads.md").write_text(markdown(rows))
        print(f"wrote {RESULTS / 'task_heads.md'}")
    else:
        print(markdown(rows))


if __name__ == "__main__":
    main()
