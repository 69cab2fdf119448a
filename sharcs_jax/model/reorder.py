"""DynaBERT-style importance reordering of attention heads and feed-forward neurons.

Width w keeps the *leading* heads and neurons, so before training we permute each layer's units
so that the most important come first. Permuting heads (Q/K/V columns with the matching rows of
the attention output) and neurons (FFN input columns with FFN output rows) leaves the full-width
function unchanged; only what the narrow slices contain changes.

Importance follows DynaBERT: a head's is the summed |dL/d head_mask| over labelled batches; a
neuron's is |sum(W * dL/dW)| over its column of the first FFN matrix (bias included) plus the same
over its row of the second.
"""

from __future__ import annotations

from typing import Any, Iterable, Mapping

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel

Batch = Mapping[str, np.ndarray]
Array = jax.Array


def _full_width_logits(model: SharcsModel | EarlyExitModel, params: Any, head_mask: Array,
                       batch: Batch) -> Array:
  """The logits whose loss ranks the units: the full width's, or an early-exit model's last
  exit's."""
  args = ({"params": params}, batch["input_ids"], batch["attention_mask"],
          batch.get("token_type_ids"))
  if isinstance(model, EarlyExitModel):
    return model.apply(*args, head_mask=head_mask)[-1]
  return model.apply(*args, width=1.0, head_mask=head_mask).logits


def _importance_grads(model: SharcsModel | EarlyExitModel):
  cfg = model.encoder

  def loss(params, head_mask, batch):
    logits = _full_width_logits(model, params, head_mask, batch)
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).sum()

  def step(params, batch):
    head_mask = jnp.ones((cfg.num_layers, cfg.num_heads), jnp.float32)
    g_params, g_heads = jax.grad(loss, argnums=(0, 1))(params, head_mask, batch)
    neurons = []
    for i in range(cfg.num_layers):
      p, g = params[f"layers_{i}"], g_params[f"layers_{i}"]
      into = (jnp.sum(p["ffn_in"]["kernel"] * g["ffn_in"]["kernel"], axis=0)
              + p["ffn_in"]["bias"] * g["ffn_in"]["bias"])
      out_of = jnp.sum(p["ffn_out"]["kernel"] * g["ffn_out"]["kernel"], axis=1)
      neurons.append(jnp.abs(into) + jnp.abs(out_of))
    return jnp.abs(g_heads), jnp.stack(neurons)

  return jax.jit(step)


def importance_scores(model: SharcsModel | EarlyExitModel, params: Any,
                      batches: Iterable[Batch]) -> tuple[np.ndarray, np.ndarray]:
  """Head importance [L, H] and neuron importance [L, f], summed over labelled batches."""
  step = _importance_grads(model)
  heads = neurons = None
  for batch in batches:
    h, n = step(params, {k: jnp.asarray(v) for k, v in batch.items()})
    heads = h if heads is None else heads + h
    neurons = n if neurons is None else neurons + n
  if heads is None:
    raise ValueError("importance_scores needs at least one labelled batch")
  return np.asarray(heads), np.asarray(neurons)


def orders_from_importance(head_importance: np.ndarray,
                           neuron_importance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-layer permutations, most important first (stable, so ties keep their order)."""
  return (np.argsort(-head_importance, axis=-1, kind="stable"),
          np.argsort(-neuron_importance, axis=-1, kind="stable"))


def permute_units(params: Any, head_order: np.ndarray, neuron_order: np.ndarray) -> dict[str, Any]:
  """Returns a new tree whose layer i holds its heads in head_order[i], neurons in neuron_order[i]."""
  num_layers = head_order.shape[0]
  chex.assert_rank([head_order, neuron_order], 2)
  chex.assert_equal(neuron_order.shape[0], num_layers)
  for i in range(num_layers):
    for name, order in (("head", head_order[i]), ("neuron", neuron_order[i])):
      if sorted(order.tolist()) != list(range(len(order))):
        raise ValueError(f"layer {i}: {name} order is not a permutation: {order.tolist()}")
  new = dict(params)
  for i in range(num_layers):
    layer = dict(params[f"layers_{i}"])
    heads, neurons = head_order[i], neuron_order[i]
    layer["qkv"] = {"kernel": layer["qkv"]["kernel"][:, :, heads],
                    "bias": layer["qkv"]["bias"][:, heads]}
    layer["attn_out"] = {"kernel": layer["attn_out"]["kernel"][heads],
                         "bias": layer["attn_out"]["bias"]}
    layer["ffn_in"] = {"kernel": layer["ffn_in"]["kernel"][:, neurons],
                       "bias": layer["ffn_in"]["bias"][neurons]}
    layer["ffn_out"] = {"kernel": layer["ffn_out"]["kernel"][neurons],
                        "bias": layer["ffn_out"]["bias"]}
    new[f"layers_{i}"] = layer
  return new


def reorder_by_importance(model: SharcsModel | EarlyExitModel, params: Any,
                          batches: Iterable[Batch]) -> dict[str, Any]:
  """Importance pass + permutation: the leading slices then hold the most important units."""
  return permute_units(params, *orders_from_importance(*importance_scores(model, params, batches)))
