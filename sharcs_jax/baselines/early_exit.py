"""Early-exit baselines over internal classifiers, one after every encoder layer.

DeeBERT exits at the first layer whose prediction entropy falls below a threshold; PABEE exits once
the prediction has stayed the same for `patience` consecutive layers. Both fall back to the last
layer. An example that exits after layer k pays for the embeddings, layers 1..k and classifier k.
The rules are pure numpy over per-layer logits [L, N, C], so one forward pass that keeps every
layer's logits evaluates any threshold or patience without running the model again.
"""

from __future__ import annotations

import numpy as np

from sharcs_jax.model.flops import _LAYER_NORM, _layer_elementwise_flops, _layer_matmul_flops
from sharcs_jax.model.config import EncoderConfig


def _check(logits: np.ndarray) -> np.ndarray:
  logits = np.asarray(logits, np.float64)
  if logits.ndim != 3 or logits.shape[0] < 1:
    raise ValueError(f"per-layer logits must be [layers, examples, classes], got {logits.shape}")
  return logits


def prediction_entropy(logits: np.ndarray) -> np.ndarray:
  """Entropy (nats) of softmax(logits) over the last axis."""
  shifted = logits - logits.max(-1, keepdims=True)
  log_p = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
  return -(np.exp(log_p) * log_p).sum(-1)


def entropy_exit_layers(logits: np.ndarray, threshold: float) -> np.ndarray:
  """DeeBERT: 0-based index of the first layer with entropy < threshold (else the last)."""
  logits = _check(logits)
  confident = prediction_entropy(logits) < threshold  # [L, N]
  confident[-1] = True
  return confident.argmax(0)


def patience_exit_layers(logits: np.ndarray, patience: int) -> np.ndarray:
  """PABEE: exit at the first layer whose prediction equals that of the `patience` layers before
  it (a counter of unchanged predictions reaches `patience`); else the last layer."""
  if patience < 1:
    raise ValueError(f"patience must be >= 1, got {patience}")
  predictions = _check(logits).argmax(-1)  # [L, N]
  layers, n = predictions.shape
  exits = np.full(n, layers - 1)
  counter = np.zeros(n, int)
  done = np.zeros(n, bool)
  for layer in range(1, layers):
    counter = np.where(predictions[layer] == predictions[layer - 1], counter + 1, 0)
    now = (counter >= patience) & ~done
    exits[now] = layer
    done |= now
  return exits


def exit_predictions(logits: np.ndarray, exits: np.ndarray) -> np.ndarray:
  logits = _check(logits)
  return logits[exits, np.arange(logits.shape[1])].argmax(-1)


def exit_flops(cfg: EncoderConfig, layer: int, seq_len: int, num_classes: int) -> float:
  """Analytic FLOPs of one example leaving after 0-based `layer`: embeddings (sums, LayerNorm),
  layers 0..layer at full width, and the classifier of every exit up to it on the [CLS] vector
  (a rule must read each exit's prediction to decide whether to leave there)."""
  if not 0 <= layer < cfg.num_layers:
    raise ValueError(f"exit layer {layer} is outside 0..{cfg.num_layers - 1}")
  d = cfg.hidden_size
  per_layer = _layer_matmul_flops(cfg, 1.0, 1, seq_len) + _layer_elementwise_flops(cfg, 1.0, 1,
                                                                                   seq_len)
  embeddings = seq_len * d * (2 + _LAYER_NORM)
  classifier = 2.0 * (d * d + d * num_classes)  # pooler-style dense, then the class scores
  return float(embeddings + (layer + 1) * (per_layer + classifier))


def sweep_rules(logits: np.ndarray, labels: np.ndarray, exit_gflops: np.ndarray,
                metric_names: tuple[str, ...], entropy_fractions: tuple[float, ...],
                patiences: tuple[int, ...]) -> list[dict]:
  """Dev metrics and average GFLOPs of each rule setting, from one pass's per-layer logits.

  `exit_gflops` [L, N] is what leaving after each layer costs each example (at its length);
  entropy thresholds are fractions of the largest possible entropy, log(classes).
  """
  from sharcs_jax.evaluate import classification_metrics  # numpy-only use of the metrics

  logits = _check(logits)
  rows = np.arange(logits.shape[1])
  points = []

  def point(rule: str, setting: float, exits: np.ndarray) -> dict:
    return {"rule": rule, "setting": setting,
            **classification_metrics(exit_predictions(logits, exits), labels, metric_names),
            "gflops": float(exit_gflops[exits, rows].mean()),
            "mean_exit_layer": float(exits.mean() + 1)}

  for fraction in entropy_fractions:
    threshold = fraction * np.log(logits.shape[-1])
    points.append(point("entropy", fraction, entropy_exit_layers(logits, threshold)))
  for patience in patiences:
    points.append(point("patience", patience, patience_exit_layers(logits, patience)))
  return points
