"""The early-exit baseline's network: the same encoder with a classifier after every layer.

DeeBERT and PABEE attach an internal classifier ("exit") to each layer; an input leaves at the
first exit whose rule fires (`sharcs_jax.baselines.early_exit`). Each exit is a pooler-style
dense + tanh and a classifier, the same head the SHARCS model ends with, on the [CLS] vector (the
papers: `pooling="cls"`) or on the mean over real tokens (`"mean"`: after layers 1-3 the [CLS]
vector hardly varies across inputs, while linear probes on the mean reach 76-79% on SST-2). `exit_layer` is a
static Python int: the program for "leave after layer k" runs layers 1..k only, so XLA's cost
analysis of it is what such an exit really costs.
"""

from __future__ import annotations

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.encoder import ClassifierHead, Embeddings, EncoderLayer, masked_mean

Array = jax.Array
EXIT_POOLINGS = ("cls", "mean")


class EarlyExitModel(nn.Module):
  """Logits of every exit; parameters `embeddings`, `layers_i` as in SharcsModel, `exits_i`."""

  encoder: EncoderConfig
  num_classes: int
  pooling: str = "cls"  # what each exit reads: "cls" or "mean" (EXIT_POOLINGS)

  def setup(self):
    if self.pooling not in EXIT_POOLINGS:
      raise ValueError(f"exit pooling {self.pooling!r} is not one of {EXIT_POOLINGS}")
    cfg = self.encoder
    self.embeddings = Embeddings(cfg)
    self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_layers)]
    self.exits = [ClassifierHead(cfg.hidden_size, self.num_classes, cfg.hidden_dropout,
                                 cfg.initializer_range) for _ in range(cfg.num_layers)]

  def __call__(self, input_ids: Array, attention_mask: Array, token_type_ids: Array | None = None,
               *, exit_layer: int | None = None, deterministic: bool = True) -> Array:
    """Logits [k + 1, B, C] of exits 0..k (0-based layers; k = the last layer by default)."""
    cfg = self.encoder
    last = cfg.num_layers - 1 if exit_layer is None else exit_layer
    if not 0 <= last < cfg.num_layers:
      raise ValueError(f"exit_layer {exit_layer} is outside 0..{cfg.num_layers - 1}")
    chex.assert_rank(input_ids, 2)
    chex.assert_equal_shape([input_ids, attention_mask])
    mask = attention_mask.astype(bool)
    x = self.embeddings(input_ids, token_type_ids, deterministic=deterministic)
    logits = []
    for layer, head in zip(self.layers[:last + 1], self.exits):
      x = layer(x, mask, deterministic=deterministic)
      pooled = x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)
      logits.append(head(pooled, deterministic=deterministic)[1])
    return jnp.stack(logits)

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
    pooled = x[:, 0] if self.pooling == "cls" else masked_mean(x, mask)
    return x, jax.nn.softmax(self.exits[last](pooled, deterministic=True)[1], axis=-1)


def exit_loss_weights(num_layers: int) -> Array:
  """PABEE's weighting of the exits' losses: exit i (1-based) weighs i / sum(1..L).

  Deeper exits, which see more of the input, count more; one joint stage trains them all
  (DeeBERT's two stages would need the final classifier trained first, then frozen).
  """
  weights = jnp.arange(1, num_layers + 1, dtype=jnp.float32)
  return weights / weights.sum()
