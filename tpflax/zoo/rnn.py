"""Recurrent language models (linen): ``embed`` -> ``rnn_0``, ``rnn_1`` -> ``head``.

Each ``rnn_{i}`` is an ``nn.RNN`` over an ``nn.OptimizedLSTMCell`` (family
``lstm``) or ``nn.GRUCell`` (family ``gru``); the cell's gate kernels sit under
``rnn_{i}/cell/`` (``ii``/``if``/``ig``/``io`` input and ``hi``/``hf``/``hg``/``ho``
hidden kernels for the LSTM; ``ir``/``iz``/``in`` and ``hr``/``hz``/``hn`` for the GRU).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ._base import F32, ZooModel, token_batch


@dataclasses.dataclass(frozen=True)
class RNNConfig:
    cell: str = "lstm"  # "lstm" or "gru"
    vocab: int = 128
    seq_len: int = 16
    d_model: int = 64
    hidden: int = 64
    n_layers: int = 2
    dtype: Any = F32
    param_dtype: Any = F32


_REAL = RNNConfig(vocab=32000, seq_len=256, d_model=1024, hidden=2048)

PRESETS = {
    "lstm-tiny": RNNConfig(cell="lstm"),
    "lstm-real": dataclasses.replace(_REAL, cell="lstm"),
    "gru-tiny": RNNConfig(cell="gru"),
    "gru-real": dataclasses.replace(_REAL, cell="gru"),
}


class RNNLM(nn.Module):
    config: RNNConfig

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        c = self.config
        kw = dict(dtype=c.dtype, param_dtype=c.param_dtype)
        x = nn.Embed(c.vocab, c.d_model, name="embed", **kw)(tokens)
        cell_cls = {"lstm": nn.OptimizedLSTMCell, "gru": nn.GRUCell}[c.cell]
        for i in range(c.n_layers):
            # parent=None: otherwise the cell binds to this compact scope and its
            # params land at "OptimizedLSTMCell_0/..." instead of "rnn_{i}/cell/...".
            cell = cell_cls(c.hidden, parent=None, **kw)
            x = nn.RNN(cell, name=f"rnn_{i}")(x)
        return nn.Dense(c.vocab, name="head", **kw)(x)


def build(name: str, family: str, size: str, cfg: RNNConfig) -> ZooModel:
    if cfg.cell not in ("lstm", "gru"):
        raise ValueError(f"RNNConfig.cell must be 'lstm' or 'gru', got {cfg.cell!r}")

    def input_specs(batch: int):
        return (jax.ShapeDtypeStruct((batch, cfg.seq_len), jnp.int32),)

    def batch_fn(rng, batch: int):
        return token_batch(rng, batch, cfg.seq_len, cfg.vocab)

    return ZooModel(name, family, size, "linen", cfg, RNNLM(cfg), input_specs, batch_fn)
