"""The early-exit baseline (DeeBERT / PABEE) trained and evaluated with the SHARCS run's budget.

Same backbone, data splits, length buckets, batch size, epochs, optimiser, learning-rate
schedule and epoch loop (`train.loop.train_epoch`: mesh, data order from the state's RNG, stop at
a non-finite loss) as SHARCS training; the loss is PABEE's weighted mean of every exit's cross-entropy. After each
epoch one dev pass keeps every exit's logits; the epoch whose last exit is most accurate is kept
(SHARCS keeps its best dev epoch too), and every entropy threshold and patience is evaluated on it
without running the model again. FLOPs are the served engine's: XLA's cost analysis of its stage
programs at batch 1, at each length bucket (`served_stage_flops`); leaving at an exit costs the
stages a row runs to get there (layers 1..k and their exits). Every epoch is checkpointed as a
SHARCS run's is, so re-running an interrupted run resumes it.
"""

from __future__ import annotations

import functools
import os
import time
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sharcs_jax import config as config_lib
from sharcs_jax.baselines import early_exit
from sharcs_jax import parallel, report, workdir as workdir_lib
from sharcs_jax.checkpoint import Checkpoints
from sharcs_jax.data import batching, glue
from sharcs_jax.serve import routing
from sharcs_jax.evaluate import classification_metrics
from sharcs_jax.serve.exit_layout import layer_spans, leave_costs, stage_layout
from sharcs_jax.serve.programs import Programs
from sharcs_jax.model.flops import param_shapes
from sharcs_jax.model.early_exit import EarlyExitModel, exit_loss_weights
from sharcs_jax.model.weights import load_pretrained_early_exit, resolve_model_dir
from sharcs_jax.train.loop import (apply_gradients, copy_buffers, epoch_rng, make_optimizer,
                                  reordered, train_epoch, width_loss)

Array = jax.Array


@flax.struct.dataclass
class ExitTrainState:
  step: Array
  epoch: Array  # epochs finished: where a resumed run starts
  train_seconds: Array  # float32: wall time spent in epochs so far, across restarts
  params: Any
  opt_state: Any
  rng: Array


def exit_train_step(state: ExitTrainState, batch: dict[str, Array], *, model: EarlyExitModel,
                    tx: optax.GradientTransformation, distill_weight: float = 0.0,
                    distill_temperature: float = 1.0
                    ) -> tuple[ExitTrainState, dict[str, Array]]:
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


def exit_logits(model: EarlyExitModel, forward: Any, params: Any, data: batching.Encoded,
                batch_size: int) -> np.ndarray:
  """Every exit's logits [L + n, N, C] in data order (the full-width exits, then each narrow
  stage's), from one pass of the jitted `forward` (`exit_forward`)."""
  out = np.zeros((model.encoder.num_layers + len(model.narrow_stages), len(data),
                  model.num_classes), np.float32)
  for rows, batch in batching.eval_batches(data, batch_size):
    logits = forward(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    out[:, rows] = np.asarray(logits)[:, :len(rows)]
  return out


def exit_forward(model: EarlyExitModel) -> Any:
  """Jitted (params, ids, mask, types) -> every exit's logits [L + n, B, C] (`exit_logits`)."""
  def forward(params, ids, mask, types):
    full, narrow = model.apply({"params": params}, ids, mask, types,
                               method=EarlyExitModel.with_narrow)
    return jnp.concatenate([full, narrow])
  return jax.jit(forward)


def served_stage_flops(model: EarlyExitModel, length_buckets: tuple[int, ...],
                       cache_dir: str | None = None) -> np.ndarray:
  """FLOPs [S, num_buckets] of one example's every stage alone, in the engine's stage order (a
  stage per layer, and each narrow stage): `Programs.stage_flops_table` of the very programs an
  `Engine` with an exit after every layer serves, so that the report, the served row and
  the engine count by one table. Stored in `cache_dir`, where that engine loads them."""
  spans = layer_spans(model.encoder.num_layers)
  stages = stage_layout(model, spans)[0]
  programs = Programs(model, param_shapes(model), batch_buckets=(1,),
                      length_buckets=length_buckets,
                      kinds=tuple(dict.fromkeys(p.kind for p in stages)), spans=spans,
                      cache_dir=cache_dir)
  return programs.stage_flops_table(stages)


def stage_order(model: EarlyExitModel, per_exit: np.ndarray) -> np.ndarray:
  """Rows of `per_exit` ([L + n, ...]: the full-width exits, then the narrow ones) in the
  engine's stage order with a stage per layer: exits 1..K, the narrow stages, exits K+1..L."""
  k, layers = model.width_layer, model.encoder.num_layers
  if not model.narrow_widths:
    return per_exit[:layers]
  return np.concatenate([per_exit[:k], per_exit[layers:], per_exit[k:layers]])


def served_at_budget(config: ml_collections.ConfigDict, model: EarlyExitModel, forward: Any,
                     params: Any, calibration: batching.Encoded | None, stage_flops: np.ndarray,
                     dev_logits: np.ndarray, dev_data: batching.Encoded,
                     metric_names: tuple[str, ...]) -> dict[str, Any] | None:
  """What the engine serves at `config.routing.budget`: DeeBERT's rule with its threshold fitted
  on the run's `calibration` split (as `Engine.from_run` fits it; for a depth-and-width
  model both thresholds, searched jointly), applied to dev; None without a budget or
  calibration split. `stage_flops` [S, buckets]: each stage alone, in `stage_order`."""
  if not config.routing.budget or calibration is None:
    return None
  in_stage_order = lambda logits: stage_order(model,
                                              np.asarray(jax.nn.softmax(logits, axis=-1)))
  budget = routing.parse_budget(config.routing.budget)
  probabilities = in_stage_order(exit_logits(model, forward, params, calibration,
                                             config.eval.batch_size))
  costs = stage_flops[:, calibration.bucket_of].T
  search = None
  if model.narrow_widths:
    rule, search = routing.calibrate_depth_width(
        probabilities, costs, calibration.labels, budget, model.width_layer,
        len(model.narrow_stages), config.routing.signal)
  else:
    rule = routing.calibrate_exits(probabilities, costs, budget, config.routing.signal)
  dev = in_stage_order(dev_logits)
  final, ran = rule.paths(dev)
  dev_costs = stage_flops[:, dev_data.bucket_of].T
  exit_layer = stage_order(model, np.concatenate([
      np.arange(1, model.encoder.num_layers + 1),
      [last + 1 for _, (_, last) in model.narrow_stages]]).astype(int))
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


def exit_best(params: Any, num_layers: int, dev_examples: int, num_classes: int
              ) -> dict[str, Any]:
  """The kept-epoch record before any epoch is kept; its structure is what checkpoints hold."""
  return {"epoch": jnp.int32(-1), "params": params,
          "logits": jnp.zeros((num_layers, dev_examples, num_classes), jnp.float32)}


def train_early_exit(config: ml_collections.ConfigDict, workdir: str,
                     entropy_fractions: tuple[float, ...] = (0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6,
                                                             0.7, 0.8, 0.9),
                     patiences: tuple[int, ...] | None = None) -> dict[str, Any]:
  """Trains the early-exit model on `config`'s task and budget; writes early_exit.{json,md}."""
  config_lib.validate(config)
  with workdir_lib.exclusive(workdir):
    return _train_early_exit(config, workdir, entropy_fractions, patiences)


def _train_early_exit(config: ml_collections.ConfigDict, workdir: str,
                      entropy_fractions: tuple[float, ...],
                      patiences: tuple[int, ...] | None) -> dict[str, Any]:
  task = glue.get_task(config.task)
  t = config.train
  buckets = tuple(config.data.length_buckets)
  tokenizer = batching.load_tokenizer(resolve_model_dir(config.model.backbone))
  # the same held-back rows as the SHARCS run
  train, dev, calibration = glue.run_splits(config)
  train_data, dev_data = batching.encode_splits([train, dev], tokenizer, buckets)
  key = jax.random.PRNGKey(config.seed)
  model, params = load_pretrained_early_exit(config.model.backbone,
                                             num_classes=task.num_classes,
                                             key=jax.random.fold_in(key, 1),
                                             **config_lib.exit_model_options(config))
  num_layers = model.encoder.num_layers
  tx = make_optimizer(t)
  state = ExitTrainState(step=jnp.int32(0), epoch=jnp.int32(0), train_seconds=jnp.float32(0),
                         params=params, opt_state=tx.init(params), rng=jax.random.fold_in(key, 2))
  mesh = parallel.make_mesh()
  parallel.check_divisible("config.train.batch_size", t.batch_size, mesh)
  step_fn = jax.jit(functools.partial(
      exit_train_step, model=model, tx=tx,
      distill_weight=t.distill_weight if t.distill == "inplace" else 0.0,
      distill_temperature=t.distill_temperature), donate_argnums=0,
                    out_shardings=parallel.replicated(mesh))
  forward = exit_forward(model)
  # The kept epoch: its dev logits of every exit are all the rules need; its parameters are
  # what the engine serves (`checkpoint.load_kept_exit`).
  exits = num_layers + len(model.narrow_stages)
  best = exit_best(copy_buffers(params), exits, len(dev_data), task.num_classes)
  checkpoints = Checkpoints(workdir, config)
  history = []
  restored = checkpoints.restore_latest(parallel.replicate(state, mesh), best)
  if restored is not None:
    state, best, history, _ = restored
  elif model.narrow_widths and config.model.reorder:  # narrow slices: the most important units
    state = reordered(state, model, train_data, config, tx)
    best = exit_best(copy_buffers(state.params), exits, len(dev_data), task.num_classes)
  state = parallel.replicate(state, mesh)
  for epoch in range(int(state.epoch), t.epochs):
    plan = batching.plan_train_epoch(train_data, np.zeros(len(train_data), np.int32),
                                     t.batch_size, epoch_rng(state, epoch))
    epoch_start = time.time()
    state, trained = train_epoch(state, lambda s, b, _: step_fn(s, b), plan, train_data, t,
                                 epoch, mesh, f"early exit, epoch {epoch}")
    losses = trained.losses
    logits = exit_logits(model, forward, state.params, dev_data, config.eval.batch_size)
    accuracy = [classification_metrics(l.argmax(-1), dev_data.labels, task.metrics)["accuracy"]
                for l in logits]
    history.append({"epoch": epoch, "train_loss_per_exit": np.mean(losses, 0).tolist(),
                    "dev_accuracy_per_exit": accuracy})
    logging.info("early exit epoch %d: dev accuracy per exit %s (%.0fs)", epoch,
                 np.round(accuracy, 4).tolist(), time.time() - epoch_start)
    kept, last = int(best["epoch"]), num_layers - 1  # the full width's last exit decides
    if kept < 0 or accuracy[last] > history[kept]["dev_accuracy_per_exit"][last]:
      best = {"epoch": jnp.int32(epoch), "logits": jnp.asarray(logits), "params": copy_buffers(state.params)}
    state = parallel.replicate(state.replace(
        epoch=jnp.int32(epoch + 1),
        train_seconds=state.train_seconds + (time.time() - epoch_start)), mesh)
    checkpoints.save(state, best, history)
  best_epoch, all_logits = int(best["epoch"]), np.asarray(best["logits"])
  logits = all_logits[:num_layers]  # the full-width exits
  # Leaving at an exit costs its stage and every stage before it on its path, each as the
  # engine counts it; in exit order: the full-width exits, then the narrow ones.
  stage_flops = served_stage_flops(model, buckets, os.path.join(workdir, "executables"))
  leave = leave_costs(stage_layout(model, layer_spans(num_layers))[1], stage_flops)
  leave = leave[np.argsort(stage_order(model, np.arange(exits)))]  # [L + n, buckets]
  flops = leave[:num_layers]
  exit_gflops = flops[:, dev_data.bucket_of] / 1e9  # [L, N]
  points = early_exit.sweep_rules(logits, dev_data.labels, exit_gflops, task.metrics,
                                  entropy_fractions,
                                  patiences or tuple(range(1, num_layers)))
  served = served_at_budget(
      config, model, forward, best["params"],
      None if calibration is None else batching.encode(calibration, tokenizer, buckets),
      stage_flops, all_logits, dev_data, task.metrics)
  summary = {"task": task.name, "model": config.model.backbone, "method": "early exit",
             "exit_pooling": config.model.exit_pooling,
             "widths": list(model.widths), "width_layer": model.width_layer,
             "loss": "PABEE weighted mean of exit losses", "epochs": t.epochs,
             "best_epoch": best_epoch, "train_examples": len(train_data),
             "dev_examples": len(dev_data), "train_seconds": float(state.train_seconds),
             "exit_gflops_per_bucket": (flops / 1e9).tolist(), "length_buckets": list(buckets),
             "per_exit": [{**classification_metrics(l.argmax(-1), dev_data.labels, task.metrics),
                           "gflops": float(exit_gflops[k].mean())}
                          for k, l in enumerate(logits)],
             "narrow": [{"width": w, "exit_layer": span[1] + 1, **classification_metrics(
                 l.argmax(-1), dev_data.labels, task.metrics),
                         # layers 1..K, then the narrow stages to this one
                         "gflops": float(leave[num_layers + i, dev_data.bucket_of].mean() / 1e9)}
                        for i, ((w, span), l) in enumerate(zip(model.narrow_stages,
                                                               all_logits[num_layers:]))],
             "points": points, "served": served, "history": history}
  report.write_json(os.path.join(workdir, "early_exit.json"), summary)
  rows = [[p["rule"], p["setting"], 100 * p["accuracy"], p["gflops"], p["mean_exit_layer"]]
          for p in points]
  for entry in summary["narrow"]:
    rows.append([f"width {entry['width']} after layer {model.width_layer}, exit "
                 f"{entry['exit_layer']}", "", 100 * entry["accuracy"], entry["gflops"],
                 entry["exit_layer"]])
  if served:
    setting = (served["threshold"] if served["narrow_threshold"] is None else
               f"{served['threshold']:.4f}; narrow {served['narrow_threshold']} "
               f"({100 * served['narrow_share']:.1f}% of rows)")
    rows.append([f"served: {served['signal']} calibrated to {served['budget']}",
                 setting, 100 * served["accuracy"], served["gflops"],
                 served["mean_exit_layer"]])
  report.write_atomic(os.path.join(workdir, "early_exit.md"),
                      f"# Early exit on {task.name} ({config.model.backbone})\n\nKept epoch "
                      f"{best_epoch} of {t.epochs}." + (
                          f" Served at budget {served['budget']} (threshold fitted on "
                          f"{served['calibration_examples']} held-out training examples): "
                          f"{served['dev_reduction']:.2f}x fewer FLOPs on dev."
                          if served else "") + "\n\n" + report.markdown_table(
                          ["rule", "setting", "accuracy", "GFLOPs/example", "mean exit layer"],
                          rows))
  return summary
