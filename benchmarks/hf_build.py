"""How the third-party benchmark builds a transformers Flax model: :class:`Arch` (a class, a tiny config,
its inputs) and :class:`Built` (the model, parameters, sample inputs, apply and loss).

The architectures themselves are listed in ``hf_models.py``.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

_COMPOSED = ("pixels2text", "wave2text", "text2text")  # encoder-decoder compositions: (encoder input, decoder ids)
_INIT_ONLY = ("FlaxVisionTextDualEncoderModel",)  # classes that refuse _do_init=False: init tiny dummies once
_HEADS = ("cls", "qa")  # token ids into a sequence-classification / question-answering head
BATCH, SEQ = 8, 32  # batch splits over data=2 / fsdp=2; SEQ <= every tiny position table


@dataclass(frozen=True)
class Built:
    """One instantiated architecture, ready to plan and compile."""

    name: str
    model: Any
    params: Any
    sample: tuple[Any, ...]
    fn: Callable[..., Any]
    loss: Callable[..., Any]


@dataclass(frozen=True)
class Arch:
    """A transformers Flax class, a tiny config and how to call it.

    Attributes:
        name: short name in the results table.
        family: encoder | decoder | encoder-decoder | vision.
        cls: the ``transformers`` Flax class name.
        config: the config class name.
        kwargs: config fields (tiny, real ratios).
        inputs: ``ids`` (token ids), ``seq2seq`` (ids + decoder ids), ``pixels``
            (NCHW images), ``clip`` (ids + images), ``audio`` (log-mel features + decoder ids),
            ``wave`` (raw audio samples, as many as the conv front end turns into ``seq`` frames),
            ``pixels2text`` / ``wave2text`` (a vision / speech encoder's input + decoder ids: the
            ``Flax{Vision,Speech}EncoderDecoderModel`` compositions, whose config nests ``encoder``
            and ``decoder``), ``text2text`` (``FlaxEncoderDecoderModel``: encoder ids in its own
            vocabulary + decoder ids), ``tokens`` (ids, a label per token: token classification),
            ``cls`` / ``qa`` (token ids into a sequence-classification head, cross-entropy over its
            labels / a question-answering head, the span loss).
        note: what the tiny config keeps from the published one.
    """

    name: str
    family: str
    cls: str
    config: str
    kwargs: dict = field(default_factory=dict)
    inputs: str = "ids"
    note: str = ""

    def build(self, seed: int = 0, concrete: bool = False, *, batch: int = BATCH, seq: int = SEQ,
              dtype: Any = None) -> Built:
        """The model, its parameters (abstract unless ``concrete``), sample, apply and loss.

        The plans and the compiled step read shapes only, so abstract parameters
        give the same three numbers; ``concrete=True`` runs ``init_weights``.
        ``batch`` x ``seq`` is the sample's shape (published widths use a realistic
        one); ``dtype`` (e.g. ``jnp.bfloat16``) is the compute dtype and the
        parameters' float dtype (None: transformers' float32).
        """
        import jax
        import transformers

        _jax_compat(self.cls)
        # a deep copy: the composed configs pop model_type from the nested dicts they are given
        config = getattr(transformers, self.config)(**copy.deepcopy(self.kwargs))
        # the encoder-decoder compositions refuse _do_init=False; they init tiny dummies once here
        model = getattr(transformers, self.cls)(config, _do_init=self.inputs in _COMPOSED or self.cls in _INIT_ONLY,
                                                seed=seed,
                                                **({"dtype": dtype} if dtype is not None else {}))
        sample = _sample(self.inputs, config, batch, seq)

        def init():
            p = model.init_weights(jax.random.key(seed), _init_shape(self.inputs, sample))
            # as released: a bf16 checkpoint holds bf16 weights, not f32 ones computed in bf16
            return p if dtype is None else jax.tree.map(lambda x: x.astype(dtype), p)

        params = init() if concrete else jax.eval_shape(init)
        fn, loss = _apply(self.inputs, model)
        return Built(self.name, model, params, sample, fn, loss)


class _ClipCompat:
    """``jax.numpy`` whose ``clip`` still takes ``a_min=``/``a_max=`` (removed in jax 0.10).

    transformers 4.57's T5 and LongT5 bucket relative positions with
    ``jnp.clip(x, a_max=...)``; on jax 0.10 that raises. Their module-level ``jnp``
    is pointed at this shim, nothing else changes.
    """

    def __getattr__(self, name: str) -> Any:
        import jax.numpy as jnp

        return getattr(jnp, name)

    @staticmethod
    def clip(x: Any, a_min: Any = None, a_max: Any = None, **kw: Any) -> Any:
        import jax.numpy as jnp

        return jnp.clip(x, kw.get("min", a_min), kw.get("max", a_max))


def _jax_compat(cls: str) -> None:
    if "T5" in cls:
        from transformers.models.longt5 import modeling_flax_longt5
        from transformers.models.t5 import modeling_flax_t5

        modeling_flax_t5.jnp = modeling_flax_longt5.jnp = _ClipCompat()


def _init_shape(inputs: str, sample: tuple[Any, ...]) -> Any:
    """The ``input_shape`` ``init_weights`` takes: images NHWC (the apply transposes NCHW)."""
    def nhwc(s):
        return (s[0], s[2], s[3], s[1])

    if inputs == "clip":
        return (sample[0].shape, nhwc(sample[1].shape))
    if inputs == "pixels":
        return nhwc(sample[0].shape)
    if inputs in _COMPOSED:  # (encoder input, decoder ids)
        return (nhwc(sample[0].shape) if inputs == "pixels2text" else sample[0].shape, sample[1].shape)
    return sample[0].shape


def _sample(inputs: str, config: Any, batch: int = BATCH, seq: int = SEQ) -> tuple[Any, ...]:
    import jax
    import jax.numpy as jnp

    k = jax.random.split(jax.random.key(1), 2)
    vocab = getattr(config, "vocab_size", None) or getattr(getattr(config, "text_config", None),
                                                           "vocab_size", 8)
    ids = jax.random.randint(k[0], (batch, seq), 3, vocab, dtype=jnp.int32)
    if inputs in ("ids", "tokens", *_HEADS):  # token ids; any labels come from the ids (``_apply``)
        return (ids,)
    if inputs == "seq2seq":
        return (ids, jax.random.randint(k[1], (batch, seq), 3, vocab, dtype=jnp.int32))
    if inputs == "pixels":
        return (jax.random.normal(k[1], (batch, 3, config.image_size, config.image_size)),)
    if inputs == "clip":
        vc = config.vision_config
        return (ids, jax.random.normal(k[1], (batch, 3, vc.image_size, vc.image_size)))
    if inputs == "audio":
        feats = jax.random.normal(k[1], (batch, config.num_mel_bins, 2 * config.max_source_positions))
        dec = jax.random.randint(k[0], (batch, min(seq, config.max_target_positions)), 3, vocab, dtype=jnp.int32)
        return (feats, dec)
    if inputs == "wave":
        return (_wave(config, k[1], batch, seq),)
    if inputs == "text2text":  # a text encoder's ids (its own vocabulary), then decoder ids
        return (jax.random.randint(k[1], (batch, seq), 3, config.encoder.vocab_size, dtype=jnp.int32), ids)
    if inputs in _COMPOSED:  # the encoder's input (config.encoder), then decoder ids
        enc = config.encoder
        x = (jax.random.normal(k[1], (batch, 3, enc.image_size, enc.image_size)) if inputs == "pixels2text"
             else _wave(enc, k[1], batch, seq))
        return (x, ids)
    raise ValueError(inputs)


def _wave(config: Any, key: Any, batch: int, seq: int) -> Any:
    """Raw samples the conv stack turns into ``seq`` frames: its receptive field + (seq-1) strides."""
    import jax

    hop = math.prod(config.conv_stride)
    field = 1 + sum((k - 1) * math.prod(config.conv_stride[:i]) for i, k in enumerate(config.conv_kernel))
    return jax.random.normal(key, (batch, field + (seq - 1) * hop))


def _xent(logits: Any, labels: Any) -> Any:
    import jax.numpy as jnp
    import optax

    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels).mean()


def _apply(inputs: str, model: Any) -> tuple[Callable[..., Any], Callable[..., Any]]:
    """The model's own apply as ``fn(params, *sample)`` and its training loss."""
    import jax.numpy as jnp

    if inputs == "ids":
        return (lambda p, ids: model(ids, params=p).logits,
                lambda out, ids: _xent(out[:, :-1], ids[:, 1:]))
    if inputs in ("seq2seq", "audio", *_COMPOSED):
        return (lambda p, x, dec: model(x, decoder_input_ids=dec, params=p).logits,
                lambda out, x, dec: _xent(out[:, :-1], dec[:, 1:]))
    if inputs == "pixels":
        return (lambda p, px: model(px, params=p).logits,
                lambda out, px: _xent(out, jnp.zeros(out.shape[0], jnp.int32)))
    if inputs == "clip":  # the contrastive loss CLIP is trained with
        return (lambda p, ids, px: model(ids, px, params=p).logits_per_text,
                lambda out, ids, px: _xent(out, jnp.arange(out.shape[0])))
    if inputs == "tokens":  # token classification: a label per token, fixed by its id
        return (lambda p, ids: model(ids, params=p).logits,
                lambda out, ids: _xent(out, ids % out.shape[-1]))
    if inputs == "wave":  # the CTC loss wav2vec2 is fine-tuned with, on fixed transcripts
        return (lambda p, wav: model(wav, params=p).logits, _ctc)
    if inputs == "cls":  # sequence classification: (B, num_labels) logits, a label per sequence
        return (lambda p, ids: model(ids, params=p).logits,
                lambda out, ids: _xent(out, ids[:, 0] % out.shape[-1]))
    if inputs == "qa":  # extractive QA: start and end logits (B, S), one span per sequence
        return (lambda p, ids: (lambda o: (o.start_logits, o.end_logits))(model(ids, params=p)), _span)
    raise ValueError(inputs)


def _ctc(logits: Any, wav: Any) -> Any:
    """CTC (blank 0, wav2vec2's pad id) against a fixed transcript of a quarter as many labels as frames."""
    import jax.numpy as jnp
    import optax

    b, t, v = logits.shape
    labels = jnp.arange(b * (t // 4), dtype=jnp.int32).reshape(b, t // 4) % (v - 1) + 1
    return optax.ctc_loss(logits.astype(jnp.float32), jnp.zeros((b, t)), labels,
                          jnp.zeros(labels.shape), blank_id=0).mean()


def _span(out: Any, ids: Any) -> Any:
    """The span loss of extractive QA: cross-entropy of the start and of the end over the positions."""
    start, end = out
    seq = start.shape[-1]
    return (_xent(start, ids[:, 1] % seq) + _xent(end, ids[:, 2] % seq)) / 2


