"""The early-exit baseline's network: the same encoder with a classifier after every layer.

DeeBERT and PABEE attach an internal classifier ("exit") to each layer; an input leaves at the
first exit whose rule fires (`sharcs_jax.baselines.early_exit`). Each exit is a pooler-style
dense + tanh and a classifier, the same head the SHARCS model ends with, on the [CLS] vector (the
papers: `pooling="cls"`) or on the mean over real tokens (`"mean"`: after layers 1-3 the [CLS]
vector hardly varies across inputs, while linear probes on the mean reach 76-79% on SST-2). `exit_layer` is a
static Python int: the program for "leave after layer k" runs layers 1..k only, so XLA's cost
analysis of it is what such an exit really costs.

With narrow `widths` (the depth-and-width model) layers K+1..L may also run at a narrow width, a
leading slice as in SHARCS (`EncoderLayer`'s private LayerNorms, `DownProjection`), read from
layer K's full-width hidden states and answered by the last exit's head (its pooler sliced):
easy inputs leave at an early exit, the rest try the narrow width, and the unsure go on at full
width through the later exits. With `narrow_exits` the narrow layers also answer after those
layers, by the same layer's exit head (depth exits inside the narrow part).
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.encoder import (ClassifierHead, DownProjection, Embeddings, EncoderLayer,
                                      masked_mean)
from sharcs_jax.model.sharcs import check_model_settings
from sharcs_jax.model.widths import width_dims

Array = jax.Array
EXIT_POOLINGS = ("cls", "mean")


class EarlyExitModel(nn.Module):
  """Logits of every exit; parameters `embeddings`, `layers_i` as in SharcsModel, `exits_i`."""

  encoder: EncoderConfig
  num_classes: int
  pooling: str = "cls"  # what each exit reads: "cls" or "mean" (EXIT_POOLINGS)
  widths: tuple[float, ...] = (1.0,)  # increasing, ending at 1.0; narrow ones run layers K+1..L
  width_layer: int = 1  # K: layers 1..K always run at full width (with narrow `widths` only)
  narrow_exits: tuple[int, ...] = ()  # layers in K+1..L-1 (1-based) the narrow layers answer after

  @property
  def narrow_stages(self) -> tuple[tuple[float, tuple[int, int]], ...]:
    """(width, span) of every narrow stage, width by width, each width's spans in order: the
    order `with_narrow` returns their logits and the engine runs them."""
    return tuple((w, span) for w in self.narrow_widths for span in self.narrow_spans)

  @property
  def narrow_spans(self) -> tuple[tuple[int, int], ...]:
    """The narrow part's stages (0-based first and last layer), each ending at a narrow exit;
    the last one at layer L; none without a narrow width."""
    if not self.narrow_widths:
      return ()
    ends = sorted(set(self.narrow_exits) | {self.encoder.num_layers})
    starts = [self.width_layer] + ends[:-1]
    return tuple((a, b - 1) for a, b in zip(starts, ends))

  def setup(self):
    if self.pooling not in EXIT_POOLINGS:
      raise ValueError(f"exit pooling {self.pooling!r} is not one of {EXIT_POOLINGS}")
    cfg = self.encoder
    check_model_settings(cfg, self.widths, self.width_layer)
    if any(not self.width_layer < e < cfg.num_layers for e in self.narrow_exits) or (
        self.narrow_exits and not self.narrow_widths):
      raise ValueError(f"narrow exits {self.narrow_exits} must lie after layer K="
                       f"{self.width_layer} and before layer {cfg.num_layers}, with a narrow width")
    narrow = self.narrow_widths
    self.embeddings = Embeddings(cfg)
    self.layers = [EncoderLayer(cfg, private_widths=narrow if i >= self.width_layer else ())
                   for i in range(cfg.num_layers)]
    self.exits = [ClassifierHead(cfg.hidden_size, self.num_classes, cfg.hidden_dropout,
                                 cfg.initializer_range) for _ in range(cfg.num_layers)]
    if narrow:
      self.down_projection = DownProjection(cfg, narrow)

  @property
  def narrow_widths(self) -> tuple[float, ...]:
    return tuple(w for w in self.widths if w < 1.0)

  def _pool(self, x: Array, mask: Array) -> Array:
    return x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, exit_layer: int | None = None, deterministic: bool = True,
               head_mask: Array | None = None) -> Array:
    """Logits [k + 1, B, C] of exits 0..k (0-based layers; k = the last layer by default);
    `head_mask` [L, H] scales each head's attention (the importance pass reads its gradient)."""
    cfg = self.encoder
    last = cfg.num_layers - 1 if exit_layer is None else exit_layer
    if not 0 <= last < cfg.num_layers:
      raise ValueError(f"exit_layer {exit_layer} is outside 0..{cfg.num_layers - 1}")
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    mask = attention_mask.astype(bool)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
    logits = []
    for i, (layer, head) in enumerate(zip(self.layers[:last + 1], self.exits)):
      x = layer(x, mask, deterministic=deterministic,
                head_mask=None if head_mask is None else head_mask[i])
      logits.append(head(self._pool(x, mask), deterministic=deterministic)[1])
      if i == self.width_layer - 1 and self.narrow_widths and self.is_initializing():
        self.down_projection(x, width=1.0)  # its parameters exist from init on
    return jnp.stack(logits)

  def with_narrow(self, input_ids: Array, attention_mask: Array,
                  token_type_ids: Array | None = None, *, deterministic: bool = True
                  ) -> tuple[Array, Array]:
    """(every exit's logits [L, B, C] at full width, each narrow width's exits' logits
    [n * E, B, C], width by width, each its `narrow_spans` in order); layers 1..K run once for
    both: what the depth-and-width model trains on."""
    cfg, k = self.encoder, self.width_layer
    mask = attention_mask.astype(bool)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
    logits = []
    narrow = []
    for i, (layer, head) in enumerate(zip(self.layers, self.exits)):
      x = layer(x, mask, deterministic=deterministic)
      logits.append(head(self._pool(x, mask), deterministic=deterministic)[1])
      if i == k - 1:
        narrow = [exit_logits for w in self.narrow_widths for exit_logits in
                  self._narrow(x, mask, width=w, deterministic=deterministic)[1]]
    chex.assert_equal(len(logits), cfg.num_layers)
    return jnp.stack(logits), jnp.stack(narrow) if narrow else jnp.zeros((0,) + logits[0].shape)

  def _narrow(self, hidden: Array, mask: Array, *, width: float, deterministic: bool,
              spans: tuple[tuple[int, int], ...] | None = None) -> tuple[Array, list[Array]]:
    """`spans` of the narrow part (default all `narrow_spans`) at narrow `width`, the first on
    layer K's full-width hidden states [B, T, d], a later one on the narrow hidden states
    [B, T, d_w] before it: (hidden [B, T, d_w], each span's exit logits [B, C])."""
    if width not in self.narrow_widths:
      raise ValueError(f"width {width} is not one of the narrow widths {self.narrow_widths}")
    spans = self.narrow_spans if spans is None else spans
    x, logits = hidden, []
    for first, last in spans:
      if first == self.width_layer:
        x = self.down_projection(x, width=width)
      for layer in self.layers[first:last + 1]:
        x = layer(x, mask, width=width, deterministic=deterministic)
      logits.append(self.exits[last](self._pool(x, mask), deterministic=deterministic)[1])
    return x, logits

  def narrow_stage(self, hidden: Array, attention_mask: Array, *, width: float,
                   span: tuple[int, int] | None = None) -> tuple[Array, Array]:
    """One served narrow stage: `span`'s layers (one of `narrow_spans`; default the first) at
    `width`, on layer K's full-width hidden states [B, T, d] for the first span or on the span
    before's [B, T, d_w]; (hidden states [B, T, d_w], class probabilities [B, C])."""
    span = span or self.narrow_spans[0]
    if span not in self.narrow_spans:
      raise ValueError(f"narrow stage {span} is not one of {self.narrow_spans}")
    d = (self.encoder.hidden_size if span[0] == self.width_layer
         else width_dims(self.encoder, width).hidden)
    chex.assert_shape(hidden, (attention_mask.shape[0], attention_mask.shape[1], d))
    x, logits = self._narrow(hidden, attention_mask.astype(bool), width=width,
                             deterministic=True, spans=(span,))
    return x, jax.nn.softmax(logits[0], axis=-1)

  def stage(self, inputs: Array, attention_mask: Array, token_type_ids: Array | None = None, *,
            first: int, last: int) -> tuple[Array, Array]:
    """One stage of the served cascade: layers first..last (0-based) on the token ids (`first`
    0: embeddings first) or on layer first - 1's hidden states; (hidden states [B, T, d], exit
    `last`'s class probabilities [B, C]). Chained, the stages give `__call__`'s exits."""
    cfg = self.encoder
    if not 0 <= first <= last < cfg.num_layers:
      raise ValueError(f"stage layers {first}..{last} are outside 0..{cfg.num_layers - 1}")
    mask = attention_mask.astype(bool)
    if first == 0:
      chex.assert_rank(inputs, 2)
      x = self.embeddings(inputs, token_type_ids, deterministic=True)
    else:
      chex.assert_rank(inputs, 3)
      x = inputs
    chex.assert_equal_shape_prefix([x, attention_mask], 2)
    for layer in self.layers[first:last + 1]:
      x = layer(x, mask, deterministic=True)
    return x, jax.nn.softmax(self.exits[last](self._pool(x, mask), deterministic=True)[1],
                             axis=-1)


def exit_loss_weights(num_layers: int) -> Array:
  """PABEE's weighting of the exits' losses: exit i (1-based) weighs i / sum(1..L).

  Deeper exits, which see more of the input, count more; one joint stage trains them all
  (DeeBERT's two stages would need the final classifier trained first, then frozen).
  """
  weights = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
  return weights / weights.sum()
