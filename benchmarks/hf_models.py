"""Tiny Hugging Face Flax models (transformers 4.57.x) for the third-party benchmark.

Each :class:`Arch` builds one ``transformers`` Flax model class from a tiny config
that keeps the published model's ratios: attention heads to K/V heads, the
divisibility of the vocabulary by the tensor axis (odd vocabularies stay odd,
``2 * odd`` stays ``2 * odd``), learned position tables with their offsets (OPT's
and BART's 2, RoBERTa's padding offset), and the MLP width ratio. Sizes are tiny
(2 layers, width 64) so that 150 compiles fit a shared laptop.

``Arch.build()`` returns a :class:`Built`: the HF model, its parameters (abstract, or
concrete from ``init_weights``), the sample inputs, ``fn(params, *sample)`` (the model's own
apply), and ``loss(output, *sample)``.
"""

from __future__ import annotations

from dataclasses import replace

from hf_build import BATCH, SEQ, Arch, Built  # noqa: F401 - re-exported: the benchmarks import them from here

_D, _L = 64, 2  # width and layers of every tiny config

# GPT-2 as the decoder of an encoder-decoder composition (vit-gpt2, bert2gpt2), cross-attention on
_GPT2_XATTN = dict(model_type="gpt2", vocab_size=1001, n_positions=64, n_embd=_D, n_layer=_L, n_head=4,
                   add_cross_attention=True, is_decoder=True)
_BERTISH = dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4, intermediate_size=4 * _D,
                max_position_embeddings=64)

# BART's family (BART, mBART, Pegasus, Marian, Blenderbot, the Wav2Vec2+BART decoder): tiny widths
_BARTISH = dict(max_position_embeddings=64, d_model=_D, encoder_layers=_L, decoder_layers=_L,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * _D,
                decoder_ffn_dim=4 * _D)
# wav2vec2-large-lv60's layout (the Wav2Vec2 CTC row and the Wav2Vec2+BART encoder)
_W2V = dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4, intermediate_size=4 * _D,
            conv_dim=(32,) * 7, feat_extract_norm="layer", do_stable_layer_norm=True, conv_bias=True,
            num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=16)
# mT5 (T5 v1.1): gated-gelu, untied head
_MT5 = dict(vocab_size=1000, d_model=_D, num_layers=_L, relative_attention_num_buckets=32,
            feed_forward_proj="gated-gelu", tie_word_embeddings=False)

ARCHS: tuple[Arch, ...] = (
    Arch("bert", "encoder", "FlaxBertForMaskedLM", "BertConfig",
         dict(_BERTISH, vocab_size=1022, type_vocab_size=2),
         note="vocab 30522 = 2*odd -> 1022; 2-row token-type table"),
    Arch("roberta", "encoder", "FlaxRobertaForMaskedLM", "RobertaConfig",
         dict(_BERTISH, vocab_size=1001, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
         note="vocab 50265 odd -> 1001; positions 512 + padding offset 2 -> 66 rows"),
    Arch("electra", "encoder", "FlaxElectraForMaskedLM", "ElectraConfig",
         dict(_BERTISH, vocab_size=1022, embedding_size=32),
         note="generator: embedding 32 < hidden 64, projected (embeddings_project)"),
    Arch("distilbert", "encoder", "FlaxDistilBertForMaskedLM", "DistilBertConfig",
         dict(vocab_size=1022, dim=_D, n_layers=_L, n_heads=4, hidden_dim=4 * _D,
              max_position_embeddings=64), note="vocab 30522 = 2*odd -> 1022"),
    Arch("albert", "encoder", "FlaxAlbertForMaskedLM", "AlbertConfig",
         dict(vocab_size=1000, embedding_size=32, hidden_size=_D, num_hidden_layers=_L,
              num_attention_heads=4, intermediate_size=4 * _D, max_position_embeddings=64),
         note="vocab 30000 -> 1000; shared layer group, factorised embedding 32"),
    Arch("gpt2", "decoder", "FlaxGPT2LMHeadModel", "GPT2Config",
         dict(vocab_size=1001, n_positions=64, n_embd=_D, n_layer=_L, n_head=4),
         note="vocab 50257 odd -> 1001; fused c_attn (3d, d) Conv1D stored (out, in); tied head"),
    Arch("gptj", "decoder", "FlaxGPTJForCausalLM", "GPTJConfig",
         dict(vocab_size=1000, n_positions=64, n_embd=_D, n_layer=_L, n_head=4, rotary_dim=8),
         note="vocab 50400 -> 1000; interleaved rotary on 8 of 16 head dims; parallel attn+MLP"),
    Arch("gpt-neo", "decoder", "FlaxGPTNeoForCausalLM", "GPTNeoConfig",
         dict(vocab_size=1001, max_position_embeddings=64, hidden_size=_D, num_layers=_L,
              attention_types=[[["global", "local"], 1]], num_heads=4, window_size=16),
         note="vocab 50257 odd -> 1001; global+local attention layers"),
    Arch("opt", "decoder", "FlaxOPTForCausalLM", "OPTConfig",
         dict(vocab_size=1000, max_position_embeddings=64, hidden_size=_D, num_hidden_layers=_L,
              ffn_dim=4 * _D, num_attention_heads=4, word_embed_proj_dim=_D),
         note="vocab 50272 -> 1000; position table offset 2 -> 66 rows"),
    Arch("bloom", "decoder", "FlaxBloomForCausalLM", "BloomConfig",
         dict(vocab_size=1000, hidden_size=_D, n_layer=_L, n_head=4),
         note="vocab 250880 -> 1000; fused query_key_value, head-interleaved; ALiBi"),
    Arch("llama", "decoder", "FlaxLlamaForCausalLM", "LlamaConfig",
         dict(vocab_size=1000, hidden_size=_D, intermediate_size=176, num_hidden_layers=_L,
              num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=64),
         note="Llama-2-7B ratios: MHA, MLP 11008/4096 -> 176/64; vocab 32000 -> 1000"),
    Arch("mistral", "decoder", "FlaxMistralForCausalLM", "MistralConfig",
         dict(vocab_size=1000, hidden_size=_D, intermediate_size=224, num_hidden_layers=_L,
              num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
              sliding_window=16),
         note="Mistral-7B ratios: 32:8 heads -> 8:2 (K/V heads < model=4), MLP 14336/4096 -> 224/64"),
    Arch("gemma", "decoder", "FlaxGemmaForCausalLM", "GemmaConfig",
         dict(vocab_size=1000, hidden_size=_D, intermediate_size=512, num_hidden_layers=_L,
              num_attention_heads=8, num_key_value_heads=1, head_dim=8, max_position_embeddings=64),
         note="Gemma-2B ratios: MQA (1 K/V head), MLP 16384/2048 -> 512/64; tied head"),
    Arch("xglm", "decoder", "FlaxXGLMForCausalLM", "XGLMConfig",
         dict(vocab_size=1002, max_position_embeddings=64, d_model=_D, ffn_dim=4 * _D,
              num_layers=_L, attention_heads=4),
         note="vocab 256008 -> 1002 (2*odd); sinusoidal positions, offset 2"),
    Arch("bart", "encoder-decoder", "FlaxBartForConditionalGeneration", "BartConfig",
         dict(_BARTISH, vocab_size=1001),
         inputs="seq2seq", note="vocab 50265 odd -> 1001; position tables offset 2 -> 66 rows"),
    Arch("mbart", "encoder-decoder", "FlaxMBartForConditionalGeneration", "MBartConfig",
         dict(_BARTISH, vocab_size=1001),
         inputs="seq2seq", note="vocab 250027 odd -> 1001; pre-norm; position offset 2 -> 66 rows"),
    Arch("t5", "encoder-decoder", "FlaxT5ForConditionalGeneration", "T5Config",
         dict(vocab_size=1000, d_model=_D, d_kv=16, d_ff=4 * _D, num_layers=_L, num_heads=4,
              relative_attention_num_buckets=32),
         inputs="seq2seq", note="vocab 32128 -> 1000; relative position bias (buckets, heads)"),
    Arch("vit", "vision", "FlaxViTForImageClassification", "ViTConfig",
         dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4, intermediate_size=4 * _D,
              image_size=32, patch_size=8, num_labels=1000),
         inputs="pixels", note="1000 classes; 16 patches + CLS -> 17 position rows"),
    Arch("clip", "vision", "FlaxCLIPModel", "CLIPConfig",
         dict(text_config=dict(vocab_size=1000, hidden_size=_D, intermediate_size=4 * _D,
                               num_hidden_layers=_L, num_attention_heads=4, max_position_embeddings=64),
              vision_config=dict(hidden_size=_D, intermediate_size=4 * _D, num_hidden_layers=_L,
                                 num_attention_heads=4, image_size=32, patch_size=8),
              projection_dim=32),
         inputs="clip", note="text + vision towers, contrastive loss; vocab 49408 -> 1000"),
    Arch("whisper", "encoder-decoder", "FlaxWhisperForConditionalGeneration", "WhisperConfig",
         dict(vocab_size=1001, num_mel_bins=80, d_model=_D, encoder_layers=_L, decoder_layers=_L,
              encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=4 * _D,
              decoder_ffn_dim=4 * _D, max_source_positions=32, max_target_positions=32),
         inputs="audio", note="vocab 51865 odd -> 1001; conv1d front end over 80 mel bins"),
    # encoders: RoFormer, RoBERTa-PreLayerNorm, BigBird
    Arch("roformer", "encoder", "FlaxRoFormerForMaskedLM", "RoFormerConfig",
         dict(_BERTISH, vocab_size=1000, embedding_size=_D, type_vocab_size=2),
         note="vocab 50000 -> 1000; rotary q/k rotate-every-two (stack/reshape); tied head"),
    Arch("roberta-preln", "encoder", "FlaxRobertaPreLayerNormForMaskedLM", "RobertaPreLayerNormConfig",
         dict(_BERTISH, vocab_size=1001, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1),
         note="vocab 50265 odd -> 1001; pre-norm; positions 512 + padding offset 2 -> 66 rows"),
    Arch("bigbird", "encoder", "FlaxBigBirdForMaskedLM", "BigBirdConfig",
         dict(_BERTISH, vocab_size=1022, type_vocab_size=2, attention_type="block_sparse",
              block_size=4, num_random_blocks=1),
         note="vocab 50358 = 2*odd -> 1022; block_sparse attention, 8 blocks of 4, 1 random block"),
    # vision (relative position bias, layer scale, grouped convs + BatchNorm)
    Arch("beit", "vision", "FlaxBeitForImageClassification", "BeitConfig",
         dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4, intermediate_size=4 * _D,
              image_size=32, patch_size=8, num_labels=1000, use_relative_position_bias=True,
              use_mean_pooling=True, layer_scale_init_value=0.1),
         inputs="pixels", note="BEiT-base ratios: per-layer relative position bias table "
                               "((2*4-1)^2+3 = 52, heads), layer-scale lambdas, mean pooling"),
    Arch("dinov2", "vision", "FlaxDinov2ForImageClassification", "Dinov2Config",
         dict(hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4, mlp_ratio=4,
              image_size=32, patch_size=8, num_labels=1000, layerscale_value=1.0),
         inputs="pixels", note="DINOv2-S ratios: layer scale, cls + mask tokens, position table "
                               "interpolated to the grid, head on [cls | mean patch] (2 * width)"),
    Arch("regnet", "vision", "FlaxRegNetForImageClassification", "RegNetConfig",
         dict(embedding_size=8, hidden_sizes=[32, 48, 128, 272], depths=[1, 1, 1, 1], groups_width=16,
              layer_type="y", image_size=32, num_labels=1000),
         inputs="pixels", note="RegNetY-4GF widths / 4 (32..1088 -> 8..272), the same 2/3/8/17 groups "
                               "per stage, squeeze-excitation; BatchNorm in inference-stats mode"),
    # fixed sinusoidal positions, transient-global attention, a raw-audio conv front end
    Arch("pegasus", "encoder-decoder", "FlaxPegasusForConditionalGeneration", "PegasusConfig",
         dict(_BARTISH, vocab_size=1001, scale_embedding=True),
         inputs="seq2seq", note="vocab 96103 odd -> 1001; sinusoidal positions (constants, not "
         "params); scaled embedding; pre-norm with final layer norms"),
    Arch("longt5", "encoder-decoder", "FlaxLongT5ForConditionalGeneration", "LongT5Config",
         dict(vocab_size=1000, d_model=_D, d_kv=16, d_ff=168, num_layers=_L, num_heads=4,
              relative_attention_num_buckets=32, encoder_attention_type="transient-global",
              local_radius=8, global_block_size=4, feed_forward_proj="gated-gelu"),
         inputs="seq2seq", note="long-t5-tglobal-base ratios: vocab 32128 -> 1000, gated-gelu MLP "
         "2048/768 -> 168/64; local radius 127 -> 8 and global blocks 16 -> 4 so 32 tokens are 4 "
         "local blocks and 8 global tokens"),
    Arch("wav2vec2", "encoder", "FlaxWav2Vec2ForCTC", "Wav2Vec2Config",
         dict(_W2V, vocab_size=32),
         inputs="wave", note="wav2vec2-large-lv60 CTC: 7 convs (kernels 10,3,3,3,3,2,2, strides 5,2,...: "
         "hop 320) 512 -> 32 channels, 10320 samples -> 32 frames; grouped (16) weight-norm "
         "positional conv 128 -> 16 taps; CTC vocab 32; CTC loss"),
    # T5 v1.1 (gated-gelu, untied head), Marian (static sinusoids), Blenderbot (pre-norm BART)
    Arch("mt5", "encoder-decoder", "FlaxMT5ForConditionalGeneration", "MT5Config",
         dict(_MT5, d_kv=16, d_ff=168, num_heads=4),
         inputs="seq2seq", note="mt5-base ratios: vocab 250112 (divisible by 4) -> 1000, gated-gelu "
         "wi_0/wi_1 2048/768 -> 168/64, 12 heads of 64 -> 4 of 16; untied lm_head; relative bias"),
    Arch("marian", "encoder-decoder", "FlaxMarianMTModel", "MarianConfig",
         dict(_BARTISH, vocab_size=1001, pad_token_id=1000, decoder_start_token_id=1000),
         inputs="seq2seq", note="opus-mt ratios: vocab 58101 odd -> 1001 (pad = last id); static "
         "sinusoidal positions; shared embedding tied to the head; final_logits_bias"),
    Arch("blenderbot", "encoder-decoder", "FlaxBlenderbotForConditionalGeneration", "BlenderbotConfig",
         dict(_BARTISH, vocab_size=1000),
         inputs="seq2seq", note="blenderbot-400M ratios: vocab 8008 (8 * 1001) -> 1000; pre-norm; "
         "learned positions without offset 128 -> 64 rows; MLP 4x; tied head, final_logits_bias"),
    Arch("mt5-small", "encoder-decoder", "FlaxMT5ForConditionalGeneration", "MT5Config",
         dict(_MT5, d_kv=8, d_ff=128, num_heads=6),
         inputs="seq2seq", note="mt5-small ratios: 6 heads of 64 (inner 384 = 3/4 of d_model 512) -> 6 of "
         "8 (48 / 64), so the heads do not divide model=4; d_ff 1024/512 -> 128/64; vocab 250112 -> 1000"),
    # encoder-decoder compositions with cross-attention, a bottleneck CNN. The compositions'
    # top-level vocab_size is the decoder's (what the sample's ids and the hand layout read)
    Arch("vit-gpt2", "encoder-decoder", "FlaxVisionEncoderDecoderModel", "VisionEncoderDecoderConfig",
         dict(encoder=dict(model_type="vit", hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4,
                           intermediate_size=4 * _D, image_size=32, patch_size=8),
              decoder=_GPT2_XATTN,
              vocab_size=1001),
         inputs="pixels2text", note="vit-gpt2 captioning (ViT-base + GPT-2, equal widths: no enc_to_dec "
         "projection): 16 patches + CLS; vocab 50257 odd -> 1001; cross-attention q_attn (d, d) and "
         "fused k/v c_attn (2d, d), Conv1D stored (out, in); tied head"),
    Arch("wav2vec2-bart", "encoder-decoder", "FlaxSpeechEncoderDecoderModel", "SpeechEncoderDecoderConfig",
         dict(encoder=dict(_W2V, model_type="wav2vec2"),
              decoder=dict(_BARTISH, model_type="bart", vocab_size=1001, add_cross_attention=True,
                           is_decoder=True),
              vocab_size=1001),
         inputs="wave2text", note="wav2vec2-2-bart (large-lv60 encoder as the wav2vec2 row, 32 frames; BART "
         "decoder, equal widths: no projection): vocab 50265 odd -> 1001; position table offset 2; "
         "head tied to the decoder's embedding (its own config)"),
    Arch("resnet", "vision", "FlaxResNetForImageClassification", "ResNetConfig",
         dict(embedding_size=8, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], layer_type="bottleneck",
              image_size=32, num_labels=1000),
         inputs="pixels", note="ResNet-50 widths / 8 (64, 256..2048 -> 8, 32..256), one bottleneck "
                               "(reduction 4) per stage; BatchNorm in inference-stats mode"),
    # h2 (seventh round): a dual encoder, a text-to-text composition, per-token classification
    Arch("vit-bert-dual", "vision", "FlaxVisionTextDualEncoderModel", "VisionTextDualEncoderConfig",
         dict(vision_config=dict(model_type="vit", hidden_size=_D, num_hidden_layers=_L, num_attention_heads=4,
                                 intermediate_size=4 * _D, image_size=32, patch_size=8),
              text_config=dict(_BERTISH, model_type="bert", vocab_size=1022, type_vocab_size=2),
              projection_dim=32),
         inputs="clip", note="ViT-B/16 + BERT-base dual encoder (12 heads of 64 -> 4 of 16, MLP 4x; 16 "
         "patches + CLS), both poolers feeding bias-free visual/text projections 768 -> 512 (64 -> 32), "
         "logit_scale; vocab 30522 = 2*odd -> 1022; CLIP's contrastive loss"),
    Arch("bert2gpt2", "encoder-decoder", "FlaxEncoderDecoderModel", "EncoderDecoderConfig",
         dict(encoder=dict(_BERTISH, model_type="bert", vocab_size=1022, type_vocab_size=2),
              decoder=_GPT2_XATTN,
              vocab_size=1001),
         inputs="text2text", note="bert2gpt2 (BERT-base encoder + GPT-2 decoder, equal widths: no "
         "enc_to_dec projection): vocabs 30522 = 2*odd -> 1022 and 50257 odd -> 1001; the encoder's "
         "unused pooler; cross-attention q_attn (d, d) + fused k/v c_attn (2d, d), Conv1D (out, in)"),
    Arch("distilbert-tok", "encoder", "FlaxDistilBertForTokenClassification", "DistilBertConfig",
         dict(vocab_size=1022, dim=_D, n_layers=_L, n_heads=4, hidden_dim=4 * _D,
              max_position_embeddings=64, num_labels=9),
         inputs="tokens", note="NER head (CoNLL's 9 labels, which model=4 does not divide): a (d, 9) "
         "classifier per token, per-token cross-entropy; vocab 30522 = 2*odd -> 1022"),
    # h1 (seventh round): post-norm BART with layernorm_embedding, a classification head, a QA head
    Arch("blenderbot-small", "encoder-decoder", "FlaxBlenderbotSmallForConditionalGeneration",
         "BlenderbotSmallConfig", dict(_BARTISH, vocab_size=992, encoder_attention_heads=16,
                                       decoder_attention_heads=16, scale_embedding=True),
         inputs="seq2seq", note="blenderbot_small-90M ratios: vocab 54944 (32 * 1717) -> 992 (32 * 31); "
         "16 heads (of 4); MLP 2048/512 4x; post-norm, layernorm_embedding; learned positions without "
         "offset 512 -> 64 rows; tied head, final_logits_bias"),
    Arch("xlm-roberta-cls", "encoder", "FlaxXLMRobertaForSequenceClassification", "XLMRobertaConfig",
         dict(_BERTISH, vocab_size=1022, max_position_embeddings=66, type_vocab_size=1, pad_token_id=1,
              num_labels=3),
         inputs="cls", note="xlm-roberta-base ratios: vocab 250002 = 2*odd -> 1022; positions 512 + "
         "padding offset 2 -> 66 rows; 3 labels (XNLI): head dense (d, d) + out_proj (d, 3) on <s>"),
    Arch("bert-qa", "encoder", "FlaxBertForQuestionAnswering", "BertConfig",
         dict(_BERTISH, vocab_size=1022, type_vocab_size=2),
         inputs="qa", note="bert-base ratios: vocab 30522 = 2*odd -> 1022; no pooler; qa_outputs (d, 2) "
         "start/end logits, span loss"),
)

BY_NAME = {a.name: a for a in ARCHS}


def with_layers(arch: Arch, n: int) -> Arch:
    """``arch`` with ``n`` layers in every stack (the tests compile 1-layer models).

    >>> with_layers(BY_NAME["llama"], 1).kwargs["num_hidden_layers"]
    1
    """
    def fix(kw: dict) -> dict:
        return {k: (fix(v) if isinstance(v, dict) else n if "layer" in k and v == _L else v)
                for k, v in kw.items()}

    return replace(arch, kwargs=fix(arch.kwargs))

