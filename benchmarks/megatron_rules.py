"""Megatron layouts written by hand for the transformers Flax models of the benchmark.

Each layout is a list of ``(regex, PartitionSpec)`` rules for ``tpflax.plan(params,
mesh, rules=...)``; the first match wins and the last rule replicates everything
else, so no tpflax heuristic decides any leaf of the hand layout. The choices,
which the results table repeats as footnotes:

* column (q/k/v, up/gate, fc_in/fc1/intermediate): output features over ``model``;
  their biases over ``model``. Row (attention output, down, fc_out/fc2): input
  features over ``model``; row biases replicated.
* Kernels stored ``(out, in)`` (GPT-2's Conv1D) get the transposed specs.
* Fused QKV: split on the fused dim. BLOOM's fused dim is head-interleaved
  (``heads, 3, head_dim``), so that split is head-aligned; GPT-2's is ``[q | k | v]``,
  so it is the naive split (each rank holds 3/4 of one of q, k, v), the best a rule
  can do without permuting the kernel.
* K/V kernels with fewer K/V heads than ``model`` ranks (Mistral 2, Gemma 1):
  replicated over ``model`` (each rank computes all K/V heads), as Megatron does
  when ``num_query_groups < tp``.
* Word embeddings and untied output heads: vocab-parallel when the vocabulary
  divides ``model``; otherwise replicated over ``model``.
* Learned position tables, token-type tables, cls tokens, patch and conv
  front ends, the MLM transform, CLIP's projections, norms: replicated over
  ``model`` (splitting them buys KiB and costs activation collectives).
  T5's relative-position bias ``(buckets, heads)`` is split over heads, which the
  attention scores already are.
* BEiT's relative position bias tables ``(distances, heads)``: over heads, like T5's.
  RegNet (a CNN, which Megatron has no layout for): convolutions, squeeze-excitation
  and BatchNorm replicated over ``model`` (fsdp on output channels); the classifier
  (``classifier/1``, behind the pooling) vocab-parallel like any head.
* Wav2Vec2: ``intermediate_dense`` column, ``output_dense`` row; its conv feature
  encoder, weight-norm positional conv (``weight_v`` ``(out, in/groups, taps)``,
  ``weight_g``) and feature projection replicated over ``model``. LongT5's
  transient-global attention is T5's (its global relative bias split over heads
  too); Pegasus is BART's layout (its sinusoidal positions are not parameters).
* With an ``fsdp`` axis: every kernel and embedding (not norms, biases or the
  small tables above) also splits its other dim over ``fsdp``.
* RoFormer, RoBERTa-PreLayerNorm and BigBird use BERT's module names, so the rules
  above cover them unchanged: RoFormer's rotary tables are computed, not stored;
  its head is tied (vocab 1000 divides model=4); RoBERTa-PreLayerNorm's 1001 and
  BigBird's 1022 vocabularies replicate over model.
* mT5 is T5's layout (gated ``wi_0``/``wi_1`` column, untied ``lm_head``
  vocab-parallel); Marian and Blenderbot are BART's. The BART family's
  ``final_logits_bias`` ``(1, vocab)`` is the head's bias: vocab-parallel when the
  vocabulary divides ``model`` (Blenderbot's 1000), else replicated (Marian's 1001).
  mT5-small's 6 heads do not divide ``model=4``: its q/k/v/o and relative bias are
  replicated over ``model`` (Megatron needs whole heads per rank), its MLP split as T5's.
* Encoder-decoder compositions (vit-gpt2, wav2vec2-bart): each side keeps its own model's
  layout. GPT-2's cross-attention ``q_attn`` is column and its fused k/v ``c_attn`` ``(2d, d)``
  (Conv1D, stored ``(out, in)``) takes the naive split on the fused dim like the self-attention
  ``c_attn`` (ranks 0-1 hold k, 2-3 hold v), its ``c_proj`` row; the ViT encoder's unused
  pooler is replicated over model. ResNet is RegNet's layout (convolutions replicated over
  model, fsdp on output channels; the classifier vocab-parallel).
* vit-bert-dual (a ViT + BERT dual encoder): each tower its own layout; both poolers and the
  bias-free projections replicated over model (CLIP's). bert2gpt2: BERT's layout for the encoder,
  vit-gpt2's GPT-2 decoder rules. distilbert-tok: DistilBERT's layout; its (d, 9) token classifier
  is replicated over model, since model=4 does not divide 9 labels.
* Task heads (xlm-roberta-cls, bert-qa): a label head (XLM-R's ``classifier/out_proj`` ``(d, 3)``,
  BERT's ``qa_outputs`` ``(d, 2)`` start/end) is split over its labels when their count divides
  ``model``, else replicated over ``model`` like the other small heads; XLM-R's ``classifier/dense``
  ``(d, d)`` in front of it replicated over model like the MLM transform (fsdp on its input dim).
  BlenderbotSmall is BART's layout (post-norm; ``layernorm_embedding`` replicated like every norm;
  vocab 992 divides model=4, so its tied head and ``final_logits_bias`` are vocab-parallel).
"""

from __future__ import annotations

from typing import Any

from jax.sharding import PartitionSpec as P

T = "model"
# the tensor-parallel pattern of each family: (column regex, row regex)
_COL = (r"(attention/self/(query|key|value)|intermediate/dense|attention/(query|key|value)|albert_layers/\d+/ffn"
        r"|(q|k|v)_lin|ffn/lin1|(q|k|v|gate|up)_proj|fc_in|fc1|mlp/c_fc|attn/c_attn|dense_h_to_4h|query_key_value"
        r"|(SelfAttention|EncDecAttention)/(q|k|v)|DenseReluDense/wi(_0|_1)?)/(kernel|bias)$")
_ROW = (r"(attention/output/dense|/output/dense|attention/dense|ffn_output|out_lin|ffn/lin2|(o|down|out)_proj"
        r"|fc_out|fc2|mlp/c_proj|attn/c_proj|dense_4h_to_h|self_attention/dense"
        r"|(SelfAttention|EncDecAttention)/o|DenseReluDense/wo)/kernel$")
_EMBED = r"(word_embeddings|wte|embed_tokens|shared|token_embedding)/embedding$"
_HEAD = r"(lm_head|classifier)/kernel$"
_HEAD_BIAS = r"(lm_head/bias|classifier/bias|predictions/bias|vocab_projector/bias|generator_lm_head/bias)$"
# (out, in) Conv1D kernels: GPT-2 only (GPT-Neo's c_fc/c_proj are ordinary (in, out) Dense)
_TRANSPOSED = {"gpt2"}


def megatron_rules(arch: str, mesh: dict[str, int], *, vocab: int, kv_heads: int | None = None,
                   ) -> list[tuple[str, Any]]:
    """The hand Megatron layout of ``arch`` on ``mesh`` as tpflax rules.

    Args:
        arch: the benchmark's architecture name (``hf_models.ARCHS``).
        mesh: the mesh shape; an ``fsdp`` axis adds fsdp to kernels and embeddings.
        vocab: the vocabulary (or class count) of embeddings and output heads.
        kv_heads: K/V heads when fewer than ``model`` ranks would split them.

    >>> r = megatron_rules("llama", {"fsdp": 2, "model": 4}, vocab=1000)
    >>> [s for rx, s in r if "gate" in rx]  # column biases, then column kernels
    [P('model',), P('fsdp', 'model')]
    """
    f = "fsdp" if mesh.get("fsdp", 1) > 1 else None
    tp = mesh.get(T, 1)
    vocab_ok = vocab % tp == 0
    col, row = (P(T, f), P(f, T)) if arch in _TRANSPOSED else (P(f, T), P(T, f))
    rules: list[tuple[str, Any]] = list(_composed_rules(arch, f))
    rules += _seventh_round_rules(arch, f)
    rules += _task_head_rules(arch, f, tp)
    if arch == "mt5-small" and 6 % tp:  # 6 heads that model does not divide: attention replicated over it
        rules += [(r"(SelfAttention|EncDecAttention)/(q|k|v)/kernel$", P(f, None)),  # fsdp where Megatron's is
                  (r"(SelfAttention|EncDecAttention)/o/kernel$", P(None, f)),
                  (r"relative_attention_bias/embedding$", P())]
    if kv_heads is not None and kv_heads % tp:
        rules.append((r"(k|v)_proj/kernel$", P(f, None)))  # GQA/MQA: K/V replicated over model
    rules += [
        (_COL.replace("(kernel|bias)", "bias"), P(T)),
        (_COL.replace("(kernel|bias)", "kernel"), col),
        (_ROW, row),
        (_EMBED, P(T, f) if vocab_ok else P(None, f)),
        (_HEAD, P(f, T) if vocab_ok else P(f, None)),
        (_HEAD_BIAS, P(T) if vocab_ok else P()),
        (r"final_logits_bias$", P(None, T) if vocab_ok else P()),  # BART-family head bias (1, vocab)
        (r"relative_attention_bias/embedding$", P(None, T)),
        (r"relative_position_bias_table$", P(None, T)),  # BEiT: (distances, heads), like T5's
        (r"classifier/1/kernel$", P(f, T)),  # RegNet's head behind its pooling (classifier/0)
        (r"classifier/1/bias$", P(T)),
        (r"(convolution/kernel|attention/[02]/kernel)$", P(None, None, None, f)),  # RegNet: no TP
        # small tables, front ends, projections: replicated over model, fsdp where it fits
        (r"(transform/dense|lm_head/dense|vocab_transform|predictions/dense|embeddings_project"
         r"|embedding_hidden_mapping_in|text_projection|visual_projection)/kernel$", P(f, None)),
        (r"(patch_embeddings/projection|patch_embedding|conv1|conv2)/kernel$", P(None, None, None, f)
         if arch != "whisper" else P(None, None, f)),
        # wav2vec2: MLP column/row under its own names; conv front end, positional conv, projection
        (r"feed_forward/intermediate_dense/bias$", P(T)),
        (r"feed_forward/intermediate_dense/kernel$", col),
        (r"feed_forward/output_dense/kernel$", row),
        (r"conv_layers/\d+/conv/kernel$", P(None, None, f)),
        (r"pos_conv_embed/conv/weight_v$", P(f, None, None)),
        (r"feature_projection/projection/kernel$", P(f, None)),
        (r".*", P()),
    ]
    return rules


FOOTNOTES = (
    "column: q/k/v, up/gate, fc_in/fc1/intermediate split on output features, their biases too; "
    "row: attention output, down, fc_out/fc2 split on input features, row biases replicated",
    "GPT-2's Conv1D kernels are stored (out, in): the same layout, transposed specs",
    "fused QKV split on the fused dim: head-aligned for BLOOM (heads, 3, head_dim), the naive "
    "[q|k|v] split for GPT-2 (no permutation)",
    "K/V kernels with fewer K/V heads than model ranks (Mistral 2, Gemma 1) replicated over model",
    "embeddings and untied heads vocab-parallel when the vocabulary divides model=4, else "
    "replicated over model (odd vocabularies: GPT-2, GPT-Neo, RoBERTa, BART, mBART, Whisper; "
    "2*odd: BERT, Electra, DistilBERT, XGLM)",
    "position/token-type tables, cls tokens, patch/conv front ends, the MLM transform, CLIP "
    "projections, norms: replicated over model; T5's relative bias split over heads",
    "with fsdp=2: kernels and embeddings also split their other dim over fsdp; norms, biases "
    "and small tables do not",
    "RoFormer, RoBERTa-PreLayerNorm, BigBird: BERT's module names, the same rules; vocab 1000 "
    "(RoFormer) vocab-parallel, 1001 (RoBERTa-PreLN) and 1022 (BigBird) replicated over model",
    "BEiT's relative position bias tables (distances, heads) split over heads like T5's; layer-scale "
    "lambdas replicated; RegNet's convolutions (grouped 3x3, 1x1, squeeze-excitation) replicated over "
    "model (a CNN has no Megatron layout; fsdp on output channels), its classifier vocab-parallel",
    "Wav2Vec2: intermediate_dense column, output_dense row; conv feature encoder, weight-norm "
    "positional conv and feature projection replicated over model; LongT5's global relative bias "
    "split over heads like T5's",
    "mT5: T5's layout (gated wi_0/wi_1 column, untied lm_head vocab-parallel); Marian, Blenderbot: "
    "BART's; final_logits_bias (1, vocab) vocab-parallel when the vocabulary divides model=4 "
    "(Blenderbot 1000), else replicated (Marian 1001); mT5-small's 6 heads do not divide model=4: "
    "attention and its relative bias replicated over model, the MLP split as T5's",
)


# encoder-decoder compositions (a decoder whose kernels are stored differently from its encoder's)
def _composed_rules(arch: str, f: str | None) -> list[tuple[str, Any]]:
    """vit-gpt2's GPT-2 decoder: Conv1D kernels ``(out, in)`` (transposed specs), cross-attention too."""
    if arch != "vit-gpt2":
        return []
    gpt2 = r"^decoder/transformer/h/\d+/"
    return [
        (gpt2 + r"(attn/c_attn|crossattention/(q_attn|c_attn)|mlp/c_fc)/bias$", P(T)),
        (gpt2 + r"(attn/c_attn|crossattention/(q_attn|c_attn)|mlp/c_fc)/kernel$", P(T, f)),
        (gpt2 + r"(attn|crossattention|mlp)/c_proj/kernel$", P(f, T)),
        (r"pooler/dense/kernel$", P(f, None)),
    ]


FOOTNOTES += (
    "encoder-decoder compositions (vit-gpt2, wav2vec2-bart): each side its own model's layout; GPT-2's "
    "cross-attention q_attn column, its fused k/v c_attn (2d, d) the naive split on the fused dim (like "
    "GPT-2's [q|k|v]), c_proj row; ResNet: RegNet's layout (convolutions replicated over model, fsdp "
    "on output channels; classifier vocab-parallel)",
)


def _seventh_round_rules(arch: str, f: str | None) -> list[tuple[str, Any]]:
    """bert2gpt2's GPT-2 decoder (vit-gpt2's rules), the dual encoder's poolers, a 9-label classifier."""
    if arch == "bert2gpt2":  # BERT encoder under BERT's names; the GPT-2 decoder as vit-gpt2's, its pooler too
        return _composed_rules("vit-gpt2", f)
    if arch == "vit-bert-dual":  # both poolers feed the projections: replicated over model like them
        return [(r"pooler/dense/kernel$", P(f, None))]
    if arch == "distilbert-tok":  # 9 labels: model=4 does not divide them, replicated over model
        return [(r"classifier/kernel$", P(f, None)), (r"classifier/bias$", P())]
    return []


FOOTNOTES += (
    "vit-bert-dual: ViT's and BERT's layouts side by side; both poolers (whose outputs the bias-free "
    "visual/text projections read) and the projections replicated over model, like CLIP's; bert2gpt2: "
    "BERT's layout for the encoder (its unused pooler replicated over model), vit-gpt2's for the GPT-2 "
    "decoder; distilbert-tok: DistilBERT's layout, the (d, 9) token classifier replicated over model "
    "(9 labels: model=4 does not divide them)",
)

# h1 (seventh round): sequence-classification and question-answering heads (label count, not vocabulary)
_LABELS = {"xlm-roberta-cls": 3, "bert-qa": 2}


def _task_head_rules(arch: str, f: str | None, tp: int) -> list[tuple[str, Any]]:
    """A label head split over its labels when ``model`` divides their count, else replicated over it."""
    if arch not in _LABELS:
        return []
    split = _LABELS[arch] % tp == 0
    return [
        (r"(classifier/out_proj|qa_outputs)/kernel$", P(f, T) if split else P(f, None)),
        (r"(classifier/out_proj|qa_outputs)/bias$", P(T) if split else P()),
        (r"classifier/dense/kernel$", P(f, None)),  # the (d, d) transform in front: like the MLM one's
    ]


FOOTNOTES += (
    "task heads: XLM-R's classifier/out_proj (d, 3) and BERT's qa_outputs (d, 2) replicated over model "
    "(3 and 2 labels do not divide model=4), XLM-R's classifier/dense (d, d) too (like the MLM "
    "transform); BlenderbotSmall: BART's layout (vocab 992 divides model=4: tied head and "
    "final_logits_bias vocab-parallel)",
)
