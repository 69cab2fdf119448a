"""Dev-set evaluation at full width, at each static width, and with SHARCS routing.

The prefix (layers 1..K + router) runs once per batch; each width's adaptive part then runs on the
same hidden states. Routed predictions take, per example, the width the router's argmax picks.
FLOPs per example are XLA cost-analysis figures of the compiled forward at the example's width and
length bucket (prefix, router and head included).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from sharcs_jax.data.batching import Encoded, eval_batches
from sharcs_jax.model.sharcs import SharcsModel


def classification_metrics(predictions: np.ndarray, labels: np.ndarray,
                           names: tuple[str, ...]) -> dict[str, float]:
  """Accuracy, and F1 of class 1 where the task reports it (QQP, MRPC)."""
  result = {"accuracy": float(np.mean(predictions == labels))}
  if "f1" in names:
    tp = float(np.sum((predictions == 1) & (labels == 1)))
    fp = float(np.sum((predictions == 1) & (labels != 1)))
    fn = float(np.sum((predictions != 1) & (labels == 1)))
    result["f1"] = 2 * tp / (2 * tp + fp + fn) if tp else 0.0
  return result


class Predictor:
  """Jitted prefix and per-width adaptive functions, compiled once per (width, bucket)."""

  def __init__(self, model: SharcsModel):
    self.model = model
    self._prefix = jax.jit(functools.partial(model.apply, method=SharcsModel.prefix))
    self._adaptive = jax.jit(
        lambda params, hidden, mask, width: model.apply(
            params, hidden, mask, width=width, method=SharcsModel.adaptive).logits,
        static_argnames="width")

  def __call__(self, params: Any, data: Encoded, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits at every width [m, N, C] and router logits [N, m], rows in data order."""
    variables = {"params": params}
    widths = self.model.widths
    logits = np.zeros((len(widths), len(data), self.model.num_classes), np.float32)
    router = np.zeros((len(data), len(widths)), np.float32)
    for rows, batch in eval_batches(data, batch_size):
      n = len(rows)
      hidden, router_logits = self._prefix(variables, batch["input_ids"], batch["attention_mask"],
                                           batch["token_type_ids"])
      router[rows] = np.asarray(router_logits)[:n]
      for i, w in enumerate(widths):
        logits[i, rows] = np.asarray(self._adaptive(variables, hidden, batch["attention_mask"],
                                                    width=w))[:n]
    return logits, router


def summarize(logits: np.ndarray, router: np.ndarray, data: Encoded, flops: np.ndarray,
              metric_names: tuple[str, ...]) -> dict[str, Any]:
  """Metrics and average GFLOPs per example: full width, each static width, SHARCS routing."""
  widths = len(logits)
  predictions = logits.argmax(-1)  # [m, N]
  per_width_flops = flops[:, data.bucket_of]  # [m, N]
  static = {}
  for i in range(widths):
    static[i] = {**classification_metrics(predictions[i], data.labels, metric_names),
                 "gflops": float(per_width_flops[i].mean() / 1e9)}
  chosen = router.argmax(-1)
  rows = np.arange(len(data))
  routed_gflops = float(per_width_flops[chosen, rows].mean() / 1e9)
  full_gflops = static[widths - 1]["gflops"]
  sharcs = {**classification_metrics(predictions[chosen, rows], data.labels, metric_names),
            "gflops": routed_gflops,
            "flops_reduction": full_gflops / routed_gflops,
            "bucket_share": [float(np.mean(chosen == i)) for i in range(widths)]}
  return {"full_width": static[widths - 1], "static": static, "sharcs": sharcs}
