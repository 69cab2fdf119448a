"""Dev-set evaluation at full width, at each static width, and with SHARCS routing.

It runs on the same precompiled programs as the inference engine. The prefix (layers 1..K and the
router) runs once per batch; each width's adaptive part then runs on the same hidden states.
Routed predictions take, per example, the width a routing rule picks from the router's logits
(the paper's argmax, or argmax under a calibrated FLOPs budget). FLOPs per example are
XLA cost-analysis figures of those programs at the example's length bucket: prefix and router,
plus the width's part (head included).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from sharcs_jax.data.batching import Encoded, eval_batches
from sharcs_jax.parallel import to_host
from sharcs_jax.programs import Programs
from sharcs_jax.routing import Rule


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


def predict_all_widths(programs: Programs, params: Any, data: Encoded,
                       batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Probabilities at every width [m, N, C] and router logits [N, m], rows in data order.

  The prefix runs once per batch; every width's adaptive program then runs on its output.
  """
  variables = {"params": params}
  widths = programs.model.widths
  probabilities = np.zeros((len(widths), len(data), programs.model.num_classes), np.float32)
  router = np.zeros((len(data), len(widths)), np.float32)
  for rows, batch in eval_batches(data, batch_size):
    n, length = len(rows), batch["input_ids"].shape[1]
    hidden, router_logits = programs("prefix", None, batch_size, length)(
        variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    router[rows] = to_host(router_logits)[:n]
    for i, w in enumerate(widths):
      probs = programs("adaptive", w, batch_size, length)(variables, hidden, batch["attention_mask"])
      probabilities[i, rows] = to_host(probs)[:n]
  return probabilities, router


def router_logits(programs: Programs, params: Any, data: Encoded, batch_size: int) -> np.ndarray:
  """Router logits [N, m] from the prefix alone: all a routing rule is calibrated on."""
  variables = {"params": params}
  router = np.zeros((len(data), len(programs.model.widths)), np.float32)
  for rows, batch in eval_batches(data, batch_size):
    _, logits = programs("prefix", None, batch_size, batch["input_ids"].shape[1])(
        variables, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    router[rows] = to_host(logits)[:len(rows)]
  return router


def per_example_flops(flops: np.ndarray, data: Encoded) -> np.ndarray:
  """[N, m]: what each width costs for each example, at its length bucket."""
  return flops[:, data.bucket_of].T


def example_flops_table(programs: Programs) -> np.ndarray:
  """FLOPs per example [m, num_length_buckets]: prefix, router and each width's part."""
  return np.array([[programs.example_flops(w, s) for s in programs.length_buckets]
                   for w in programs.model.widths])


def summarize(probabilities: np.ndarray, router: np.ndarray, data: Encoded, flops: np.ndarray,
              metric_names: tuple[str, ...], rule: Rule = Rule()) -> dict[str, Any]:
  """Metrics and average GFLOPs per example: full width, each static width, SHARCS routing.

  With a budget rule, "sharcs" is routed by it and "sharcs_argmax" keeps the paper's rule.
  """
  widths = len(probabilities)
  predictions = probabilities.argmax(-1)  # [m, N]
  per_width_flops = flops[:, data.bucket_of]  # [m, N]
  static = {}
  for i in range(widths):
    static[i] = {**classification_metrics(predictions[i], data.labels, metric_names),
                 "gflops": float(per_width_flops[i].mean() / 1e9)}
  rows = np.arange(len(data))
  full_gflops = static[widths - 1]["gflops"]

  def routed(chosen: np.ndarray) -> dict[str, Any]:
    gflops = float(per_width_flops[chosen, rows].mean() / 1e9)
    return {**classification_metrics(predictions[chosen, rows], data.labels, metric_names),
            "gflops": gflops, "flops_reduction": full_gflops / gflops,
            "bucket_share": [float(np.mean(chosen == i)) for i in range(widths)]}

  result = {"full_width": static[widths - 1], "static": static,
            "sharcs": routed(rule.choose(router, per_width_flops.T))}
  if rule.budget:
    result["sharcs"]["routing"] = {"budget": rule.budget, "cost_weight": rule.cost_weight,
                                   "calibration_reduction": rule.calibration_reduction}
    result["sharcs_argmax"] = routed(router.argmax(-1))
  return result
