"""The early-exit baselines (DeeBERT / PABEE, and depth and width) as a `train.loop.Method`.

They train through SHARCS's epoch loop (`train.loop.fit`: the same data splits, length buckets,
batch size, epochs, optimiser, learning-rate schedule, mesh, checkpoints and resuming); what is
theirs is the loss, PABEE's weighted mean of every exit's cross-entropy (a depth-and-width model
adds its narrow stages, the sandwich). After each epoch the dev set runs through the compiled
stage programs of the very engine that serves the run (an exit after every layer), keeping every
exit's class probabilities; the epoch whose last exit is most accurate is kept, and every entropy
threshold and patience is evaluated on it without running the model again. FLOPs are that
engine's (`Engine.stage_flops`: XLA's cost analysis of its stage programs at batch 1, at each
length bucket); leaving at an exit costs the stages a row runs to get there.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sharcs_jax import config as config_lib
from sharcs_jax import parallel, report
from sharcs_jax.baselines import early_exit
from sharcs_jax.data import batching, glue
from sharcs_jax.evaluate import classification_metrics
from sharcs_jax.model.early_exit import EarlyExitModel, exit_loss_weights
from sharcs_jax.model.weights import load_pretrained_early_exit
from sharcs_jax.serve import routing
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.exit_layout import leave_costs
from sharcs_jax.train.loop import (EpochResult, RunData, TrainState, apply_gradients,
                                  copy_buffers, fit, make_optimizer, reordered, width_loss)

Array = jax.Array
ENTROPY_FRACTIONS = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)


def exit_train_step(state: TrainState, batch: dict[str, Array], *, model: EarlyExitModel,
                    tx: optax.GradientTransformation, distill_weight: float = 0.0,
                    distill_temperature: float = 1.0
                    ) -> tuple[TrainState, dict[str, Array]]:
  """One optimiser step on PABEE's weighted exit losses; metrics {"loss": per-exit losses
  [L + n]} as `train_epoch` reads them. A depth-and-width model also trains each of its n narrow
  stages (`narrow_stages`: each narrow width's exits) on every batch (the sandwich), each weighted
  as the full-width exit of the same layer, its loss mixed with in-place distillation from the
  full width's last exit at `distill_weight`."""
  weight = batch["weight"]
  count = jnp.maximum(weight.sum(), 1.0)

  def loss_fn(params):
    logits, narrow = model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"],
        batch["token_type_ids"], deterministic=False, method=EarlyExitModel.with_narrow,
        rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(batch["label"], logits.shape[:2]))  # [L, B]
    weights = exit_loss_weights(logits.shape[0])
    per_exit = (ce * weight).sum(-1) / count
    per_narrow = jnp.stack([(width_loss(lg, batch["label"], logits[-1], distill_weight,
                                        distill_temperature) * weight).sum() / count
                            for lg in narrow]) if len(narrow) else jnp.zeros((0,))
    narrow_weights = jnp.asarray([weights[last] for _, (_, last) in model.narrow_stages])
    return ((per_exit * weights).sum() + (narrow_weights * per_narrow).sum(),
            jnp.concatenate([per_exit, per_narrow]))

  (_, per_exit), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state = apply_gradients(tx, state.opt_state, state.params, grads,
                                      batch["learning_rate"])
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {"loss": per_exit})


def log_probabilities(probabilities: np.ndarray) -> np.ndarray:
  """Class log-probabilities: logits up to a constant, as the exit rules read them (floored at
  float32's smallest normal, so that a zero probability stays finite)."""
  return np.log(np.maximum(probabilities, np.finfo(np.float32).tiny))


def served_at_budget(config: ml_collections.ConfigDict, model: EarlyExitModel, engine: Engine,
                     calibration: batching.Encoded | None, dev: np.ndarray,
                     dev_data: batching.Encoded, metric_names: tuple[str, ...]
                     ) -> dict[str, Any] | None:
  """What the engine serves at `config.routing.budget`: DeeBERT's rule with its threshold fitted
  on the run's `calibration` split (as `Engine.from_run` fits it; for a depth-and-width
  model both thresholds, searched jointly), applied to dev (`dev`: every stage's probabilities,
  in the engine's stage order); None without a budget or calibration split."""
  if not config.routing.budget or calibration is None:
    return None
  budget = routing.parse_budget(config.routing.budget)
  probabilities = engine.every_stage(calibration)
  costs = engine.stage_flops[:, calibration.bucket_of].T
  search = None
  if model.narrow_widths:
    rule, search = routing.calibrate_depth_width(
        probabilities, costs, calibration.labels, budget, model.width_layer,
        len(model.narrow_stages), config.routing.signal)
  else:
    rule = routing.calibrate_exits(probabilities, costs, budget, config.routing.signal)
  final, ran = rule.paths(dev)
  dev_costs = engine.stage_flops[:, dev_data.bucket_of].T
  exit_layer = np.asarray(engine.layout.stage_layers)
  return {"budget": config.routing.budget, "signal": rule.signal, "threshold": rule.threshold,
          "narrow_threshold": rule.narrow_threshold,
          "calibration_examples": len(calibration),
          "calibration_reduction": rule.calibration_reduction,
          **classification_metrics(dev[final, np.arange(len(final))].argmax(-1),
                                   dev_data.labels, metric_names),
          "gflops": float(routing.ran_flops(ran, dev_costs).mean() / 1e9),
          "dev_reduction": routing.exit_reduction(rule, dev, dev_costs),
          "mean_exit_layer": float(exit_layer[final].mean()),
          "narrow_share": float(ran[:, ~rule.full_depth()].any(-1).mean()),
          "search": search}


def train_early_exit(config: ml_collections.ConfigDict, workdir: str,
                     entropy_fractions: tuple[float, ...] = ENTROPY_FRACTIONS,
                     patiences: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Trains the early-exit model on `config`'s task and budget through the one epoch loop;
  writes early_exit.{json,md}. `entropy_fractions` and `patiences`: the rules swept on dev."""
  return fit(config, workdir, functools.partial(ExitTraining, entropy_fractions=entropy_fractions,
                                                patiences=patiences))


class ExitTraining:
  """The early-exit baselines as a `train.loop.Method`."""

  name, report = "early exit, ", "early_exit.md"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, data: RunData,
               mesh: jax.sharding.Mesh, entropy_fractions: tuple[float, ...] = ENTROPY_FRACTIONS,
               patiences: tuple[int, ...] | None = None):
    self.config, self.workdir, self.data = config, workdir, data
    self.entropy_fractions, self.patiences = entropy_fractions, patiences
    self.task = glue.get_task(config.task)
    self.key = jax.random.PRNGKey(config.seed)
    self.model, self.params = load_pretrained_early_exit(
        config.model.backbone, num_classes=self.task.num_classes,
        key=jax.random.fold_in(self.key, 1), **config_lib.exit_model_options(config))
    t = config.train
    self.tx = make_optimizer(t)
    self.step_fn = jax.jit(functools.partial(
        exit_train_step, model=self.model, tx=self.tx,
        distill_weight=t.distill_weight if t.distill == "inplace" else 0.0,
        distill_temperature=t.distill_temperature), donate_argnums=0,
                           out_shardings=parallel.replicated(mesh))
    # The engine that serves the run, an exit after every layer: dev runs through its compiled
    # stage programs, and its FLOPs table is the report's.
    self.engine = Engine(self.model, self.params, length_buckets=tuple(config.data.length_buckets),
                         batch_buckets=tuple(sorted({1, config.eval.batch_size})),
                         cache_dir=os.path.join(workdir, "executables"))
    self.exit_order = self.engine.layout.exit_order()  # the report's: full width, then narrow

  def _kept(self, params: Any) -> dict[str, Any]:
    exits = len(self.engine.stages)
    return {"epoch": jnp.int32(-1), "params": params,
            "logits": jnp.zeros((exits, len(self.data.dev), self.task.num_classes), jnp.float32)}

  def initial(self) -> tuple[TrainState, dict[str, Any]]:
    state = TrainState(step=jnp.int32(0), epoch=jnp.int32(0), params=self.params,
                       opt_state=self.tx.init(self.params), hardness=None,
                       rng=jax.random.fold_in(self.key, 2), train_seconds=jnp.float32(0))
    return state, self._kept(copy_buffers(self.params))

  def fresh(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    if self.model.narrow_widths and self.config.model.reorder:  # narrow slices: the most
      state = reordered(state, self.model, self.data.train, self.config, self.tx)  # important
    return state, self._kept(copy_buffers(state.params))

  def epoch(self, state: TrainState, epoch: int, rng: np.random.Generator
            ) -> tuple[list[batching.PlannedBatch], Any]:
    train = self.data.train
    plan = batching.plan_train_epoch(train, np.zeros(len(train), np.int32),
                                     self.config.train.batch_size, rng)
    return plan, lambda s, b, _: self.step_fn(s, b)

  def end_epoch(self, state: TrainState, epoch: int, trained: EpochResult) -> TrainState:
    return state

  def dev_logits(self, params: Any) -> np.ndarray:
    """Every exit's class log-probabilities on dev [L + n, N, C], in exit order, from the
    engine's compiled stage programs."""
    every_stage = self.engine.with_params(jax.device_get(params)).every_stage(self.data.dev)
    return log_probabilities(every_stage[self.exit_order])

  def evaluate(self, params: Any, epoch: int, trained: EpochResult
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    logits = self.dev_logits(params)
    dev = self.data.dev
    accuracy = [classification_metrics(l.argmax(-1), dev.labels, self.task.metrics)["accuracy"]
                for l in logits]
    logging.info("early exit epoch %d: dev accuracy per exit %s (%.0fs training)", epoch,
                 np.round(accuracy, 4).tolist(), trained.seconds)
    return ({"epoch": epoch, "train_loss_per_exit": np.mean(trained.losses, 0).tolist(),
             "dev_accuracy_per_exit": accuracy}, {"logits": jnp.asarray(logits)})

  def keeps(self, record: dict[str, Any], epoch: int, best: dict[str, Any],
            history: list[dict]) -> tuple[dict[str, Any], None] | None:
    kept, last = int(best["epoch"]), self.model.encoder.num_layers - 1  # the last exit decides
    accuracy = lambda entry: entry["dev_accuracy_per_exit"][last]
    if kept >= 0 and accuracy(record) <= accuracy(history[kept]):
      return None
    return {}, None

  def finish(self, state: TrainState, best: dict[str, Any], history: list[dict]
             ) -> dict[str, Any]:
    config, model, task, dev_data = self.config, self.model, self.task, self.data.dev
    t, num_layers = config.train, model.encoder.num_layers
    best_epoch, all_logits = int(best["epoch"]), np.asarray(best["logits"])
    logits = all_logits[:num_layers]  # the full-width exits
    # Leaving at an exit costs its stage and every stage before it on its path, each as the
    # engine counts it; in exit order: the full-width exits, then the narrow ones.
    leave = leave_costs(self.engine.stages, self.engine.stage_flops)[self.exit_order]
    flops = leave[:num_layers]
    exit_gflops = flops[:, dev_data.bucket_of] / 1e9  # [L, N]
    points = early_exit.sweep_rules(logits, dev_data.labels, exit_gflops, task.metrics,
                                    self.entropy_fractions,
                                    self.patiences or tuple(range(1, num_layers)))
    in_stage_order = np.exp(all_logits)[np.argsort(self.exit_order)]
    served = served_at_budget(
        config, model, self.engine.with_params(jax.device_get(best["params"])),
        self.data.calibration, in_stage_order, dev_data, task.metrics)
    summary = {"task": task.name, "model": config.model.backbone, "method": "early exit",
               "exit_pooling": config.model.exit_pooling,
               "widths": list(model.widths), "width_layer": model.width_layer,
               "loss": "PABEE weighted mean of exit losses", "epochs": t.epochs,
               "best_epoch": best_epoch, "train_examples": len(self.data.train),
               "dev_examples": len(dev_data), "train_seconds": float(state.train_seconds),
               "exit_gflops_per_bucket": (flops / 1e9).tolist(),
               "length_buckets": list(config.data.length_buckets),
               "per_exit": [{**classification_metrics(l.argmax(-1), dev_data.labels,
                                                      task.metrics),
                             "gflops": float(exit_gflops[k].mean())}
                            for k, l in enumerate(logits)],
               "narrow": [{"width": w, "exit_layer": span[1] + 1, **classification_metrics(
                   l.argmax(-1), dev_data.labels, task.metrics),
                           # layers 1..K, then the narrow stages to this one
                           "gflops": float(leave[num_layers + i, dev_data.bucket_of].mean()
                                           / 1e9)}
                          for i, ((w, span), l) in enumerate(zip(model.narrow_stages,
                                                                 all_logits[num_layers:]))],
               "points": points, "served": served, "history": history}
    if parallel.is_primary():
      write_reports(self.workdir, summary, model.width_layer)
    return summary


def write_reports(workdir: str, summary: dict[str, Any], width_layer: int) -> None:
  """early_exit.json, and early_exit.md: every rule swept, the narrow exits and the served row."""
  report.write_json(os.path.join(workdir, "early_exit.json"), summary)
  rows = [[p["rule"], p["setting"], 100 * p["accuracy"], p["gflops"], p["mean_exit_layer"]]
          for p in summary["points"]]
  for entry in summary["narrow"]:
    rows.append([f"width {entry['width']} after layer {width_layer}, exit "
                 f"{entry['exit_layer']}", "", 100 * entry["accuracy"], entry["gflops"],
                 entry["exit_layer"]])
  served = summary["served"]
  if served:
    setting = (served["threshold"] if served["narrow_threshold"] is None else
               f"{served['threshold']:.4f}; narrow {served['narrow_threshold']} "
               f"({100 * served['narrow_share']:.1f}% of rows)")
    rows.append([f"served: {served['signal']} calibrated to {served['budget']}",
                 setting, 100 * served["accuracy"], served["gflops"],
                 served["mean_exit_layer"]])
  report.write_atomic(os.path.join(workdir, "early_exit.md"),
                      f"# Early exit on {summary['task']} ({summary['model']})\n\nKept epoch "
                      f"{summary['best_epoch']} of {summary['epochs']}." + (
                          f" Served at budget {served['budget']} (threshold fitted on "
                          f"{served['calibration_examples']} held-out training examples): "
                          f"{served['dev_reduction']:.2f}x fewer FLOPs on dev."
                          if served else "") + "\n\n" + report.markdown_table(
                          ["rule", "setting", "accuracy", "GFLOPs/example", "mean exit layer"],
                          rows))
