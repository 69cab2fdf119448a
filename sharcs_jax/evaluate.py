"""Dev-set evaluation at full width, at each static width, and with SHARCS routing.

It runs on the same precompiled programs as the inference engine. The prefix (layers 1..K and the
router) runs once per batch; each width's adaptive part then runs on the same hidden states.
Routed predictions take, per example, the width a routing rule picks from the router's logits
(the paper's argmax, or argmax under a calibrated FLOPs budget). FLOPs per example are
XLA cost-analysis figures of those programs at the example's length bucket: prefix and router,
plus the width's part (head included).
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from sharcs_jax.serve import dispatch, routing
from sharcs_jax.data.batching import Encoded
from sharcs_jax.parallel import to_host
from sharcs_jax.serve.programs import ProgramRunner, Programs
from sharcs_jax.serve.routing import Budget, Cascade, Rule, route_all, width_ran_flops


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


def predict_all_widths(programs: Programs, params: Any, data: Encoded, batch_size: int,
                       runner: dispatch.Runner | None = None,
                       program_lengths: Sequence[int] | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
  """Probabilities at every width [m, N, C] and router logits [N, m], rows in data order.

  The dispatch core with every example routed to every width: the prefix runs once per batch of
  `batch_size`, and every width's part on the same hidden states where they lie. `runner`
  replaces `programs`' own (another runtime's programs of the same model, which run at
  `program_lengths`: `dispatch.lengths_for` its runtime).
  """
  widths = len(programs.model.widths)
  out = dispatch.run_buckets(runner or ProgramRunner(programs, {"params": params}), data.input_ids,
                             data.token_type_ids, data.lengths, length_buckets=data.length_buckets,
                             batch_buckets=(batch_size,), num_widths=widths,
                             num_classes=programs.model.num_classes, rule=dispatch.EVERY_WIDTH,
                             width_flops=np.ones((widths, len(data.length_buckets))),
                             prefix_flops=np.zeros(len(data.length_buckets)),
                             program_lengths=program_lengths, keep_every_width=True,
                             to_host=to_host)
  return out.every_width, out.router


def router_logits(programs: Programs, params: Any, data: Encoded, batch_size: int,
                  runner: dispatch.Runner | None = None,
                  program_lengths: Sequence[int] | None = None) -> np.ndarray:
  """Router logits [N, m] from the prefix alone: all a routing rule is calibrated on."""
  runner = runner or ProgramRunner(programs, {"params": params})
  return dispatch.run_each_row(lambda *batch: runner.prefix(*batch)[1], data.input_ids,
                               data.token_type_ids, data.lengths,
                               columns=len(programs.model.widths),
                               program_lengths=program_lengths or data.length_buckets,
                               batch_buckets=(batch_size,), to_host=to_host)


def calibrate_rule(programs: Programs, params: Any, data: Encoded, batch_size: int,
                   budget: Budget, rule: str = "router", signal: str = "max_prob",
                   start_budget: Budget | None = None,
                   runner: dispatch.Runner | None = None,
                   program_lengths: Sequence[int] | None = None) -> Rule | Cascade:
  """`routing.calibrate_rule` on `data` (held-out inputs), running only what the rule needs,
  on `runner` where given (so that a rule is calibrated on the probabilities it will route)."""
  flops = per_example_flops(programs.flops_table(), data)
  if rule == "router":
    return routing.calibrate_rule(
        rule, budget, router_logits(programs, params, data, batch_size, runner, program_lengths),
        flops)
  probabilities, router = predict_all_widths(programs, params, data, batch_size, runner,
                                             program_lengths)
  return routing.calibrate_rule(rule, budget, router, flops, probabilities,
                                programs.prefix_flops_row()[data.bucket_of], signal, start_budget)


def per_example_flops(flops: np.ndarray, data: Encoded) -> np.ndarray:
  """[N, m]: what each width costs for each example, at its length bucket."""
  return flops[:, data.bucket_of].T


def summarize(probabilities: np.ndarray, router: np.ndarray, data: Encoded, flops: np.ndarray,
              metric_names: tuple[str, ...], rule: Rule | Cascade = Rule(),
              prefix_flops: np.ndarray | None = None) -> dict[str, Any]:
  """Metrics and average GFLOPs per example: full width, each static width, SHARCS routing.

  With a budget rule (or a cascade), "sharcs" is routed by it and "sharcs_argmax" keeps the
  paper's rule. A cascade's examples cost the prefix (`prefix_flops` [length buckets]) once plus
  every part they ran.
  """
  widths = len(probabilities)
  predictions = probabilities.argmax(-1)  # [m, N]
  per_width_flops = flops[:, data.bucket_of]  # [m, N]
  if rule.escalating and prefix_flops is None:
    raise ValueError("a cascade's FLOPs need the prefix's FLOPs (prefix_flops)")
  prefix = np.zeros(len(data)) if prefix_flops is None else prefix_flops[data.bucket_of]
  static = {}
  for i in range(widths):
    static[i] = {**classification_metrics(predictions[i], data.labels, metric_names),
                 "gflops": float(per_width_flops[i].mean() / 1e9)}
  rows = np.arange(len(data))
  full_gflops = static[widths - 1]["gflops"]

  def routed(chosen: Rule | Cascade) -> dict[str, Any]:
    final, ran = route_all(chosen, probabilities, router, per_width_flops.T)
    gflops = float(width_ran_flops(ran, per_width_flops.T, prefix).mean() / 1e9)
    return {**classification_metrics(predictions[final, rows], data.labels, metric_names),
            "gflops": gflops, "flops_reduction": full_gflops / gflops,
            "share_per_width": [float(np.mean(final == i)) for i in range(widths)]}

  result = {"full_width": static[widths - 1], "static": static, "sharcs": routed(rule)}
  if rule.budget:
    result["sharcs"]["routing"] = rule.to_json()
    result["sharcs_argmax"] = routed(Rule())
  return result
