"""The SHARCS classifier: full-width prefix + router, then adaptive layers at a static width.

    embeddings -> layers 1..K (full width) -> router(masked mean)      -> router_logits
                                          \\-> down-projection(w) -> layers K+1..L at w
                                              -> up-projection(CLS) -> shared classifier

`prefix` and `adaptive` are exposed separately (via `model.apply(..., method=...)`) so that the
inference engine can run the prefix once and dispatch each example to its width's program.
"""

from __future__ import annotations

from typing import Any

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.encoder import (ClassifierHead, DownProjection, Embeddings, EncoderLayer,
                                      Router)
from sharcs_jax.model.widths import width_dims

Array = jax.Array


@flax.struct.dataclass
class SharcsOutput:
  logits: Array  # [B, num_classes]
  router_logits: Array | None  # [B, num_widths]; None from `adaptive` alone
  last_hidden_state: Array  # [B, S, d_w]
  pooled: Array  # [B, d]


def check_model_settings(cfg: EncoderConfig, widths: tuple[float, ...], router_layer: int) -> None:
  """Fails early, naming the offending value, before any parameter is created."""
  if not widths:
    raise ValueError("widths is empty; it must end with 1.0, e.g. (0.25, 1.0)")
  for w in widths:
    width_dims(cfg, w)  # range and zero-head checks
  if list(widths) != sorted(set(widths)):
    raise ValueError(f"widths must be strictly increasing, got {tuple(widths)}")
  if widths[-1] != 1.0:
    raise ValueError(f"the last width must be 1.0 (the full model), got {tuple(widths)}")
  if not 1 <= router_layer <= cfg.num_layers - 1:
    raise ValueError(f"router_layer K={router_layer} is outside 1..{cfg.num_layers - 1} "
                     f"for a {cfg.num_layers}-layer encoder")


class SharcsModel(nn.Module):
  """One parameter tree for every width; `width` is a static Python float."""

  encoder: EncoderConfig
  num_classes: int
  widths: tuple[float, ...]
  router_layer: int  # K, 1-indexed: layers 1..K are full width
  router_hidden: int
  compute_dtype: str = "float32"  # the encoder layers' matmul inputs (encoder.COMPUTE_DTYPES)

  def setup(self):
    cfg = self.encoder
    check_model_settings(cfg, self.widths, self.router_layer)
    narrow = tuple(w for w in self.widths if w < 1.0)
    self.embeddings = Embeddings(cfg)
    self.layers = [
        EncoderLayer(cfg, private_widths=narrow if i >= self.router_layer else (),
                     compute_dtype=self.compute_dtype)
        for i in range(cfg.num_layers)
    ]
    self.router = Router(self.router_hidden, len(self.widths), cfg.initializer_range)
    self.down_projection = DownProjection(cfg, narrow)
    self.head = ClassifierHead(cfg.hidden_size, self.num_classes, cfg.hidden_dropout,
                               cfg.initializer_range)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, width: float = 1.0, head_mask: Array | None = None,
               deterministic: bool = True) -> SharcsOutput:
    hidden, router_logits = self.prefix(input_ids, attention_mask, token_type_ids,
                                        head_mask=head_mask, deterministic=deterministic)
    out = self.adaptive(hidden, attention_mask, width=width, head_mask=head_mask,
                        deterministic=deterministic)
    return out.replace(router_logits=router_logits)

  def prefix(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
             *, head_mask: Array | None = None, deterministic: bool = True) -> tuple[Array, Array]:
    """Embeddings and layers 1..K at full width; returns (hidden [B,S,d], router logits [B,m])."""
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    if token_type_ids is not None:
      chex.assert_equal_shape([input_ids, token_type_ids])
    mask = attention_mask.astype(bool)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
    for i, layer in enumerate(self.layers[:self.router_layer]):
      x = layer(x, mask, head_mask=None if head_mask is None else head_mask[i],
                deterministic=deterministic)
    return x, self.router(x, mask)

  def adaptive(self, hidden: Array, attention_mask: Array, *, width: float,
               head_mask: Array | None = None, deterministic: bool = True) -> SharcsOutput:
    """Layers K+1..L and the head at `width`, from the prefix's full-width hidden states."""
    width = width_dims(self.encoder, width).width  # range and zero-head checks first
    if width not in self.widths:
      raise ValueError(f"width {width} is not one of the configured widths {self.widths}")
    chex.assert_shape(hidden, (attention_mask.shape[0], attention_mask.shape[1],
                               self.encoder.hidden_size))
    mask = attention_mask.astype(bool)
    x = self.down_projection(hidden, width=width)
    for i, layer in enumerate(self.layers[self.router_layer:], start=self.router_layer):
      x = layer(x, mask, width=width, head_mask=None if head_mask is None else head_mask[i],
                deterministic=deterministic)
    pooled, logits = self.head(x[:, 0], deterministic=deterministic)
    return SharcsOutput(logits=logits, router_logits=None, last_hidden_state=x, pooled=pooled)


def default_router_hidden(cfg: EncoderConfig) -> int:
  """The reference uses 1024 for d = 768; keep that ratio for other sizes."""
  return max(1, round(1024 * cfg.hidden_size / 768))


def router_hidden_size(cfg: EncoderConfig, configured: int) -> int:
  """`config.model.router_hidden`, where 0 means the default: the one place that rule lives."""
  return configured or default_router_hidden(cfg)


def init_params(model: SharcsModel, key: Array, seq_len: int = 8) -> dict[str, Any]:
  """Fresh parameters for every width (per-width LayerNorms included)."""
  ids = jnp.zeros((1, seq_len), jnp.int32)
  return jax.jit(lambda k: model.init(k, ids, jnp.ones_like(ids))["params"])(key)
