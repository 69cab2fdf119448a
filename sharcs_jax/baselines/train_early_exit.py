"""The early-exit baseline (DeeBERT / PABEE) trained and evaluated with the SHARCS run's budget.

Same backbone, data splits, length buckets, batch size, epochs, optimiser, learning-rate
schedule and epoch loop (`train.loop.train_epoch`: mesh, data order from the state's RNG, stop at
a non-finite loss) as SHARCS training; the loss is PABEE's weighted mean of every exit's cross-entropy. After each
epoch one dev pass keeps every exit's logits; the epoch whose last exit is most accurate is kept
(SHARCS keeps its best dev epoch too), and every entropy threshold and patience is evaluated on it
without running the model again. FLOPs of leaving after layer k are XLA's cost analysis of the
program that runs layers 1..k and exits 1..k at batch 1, at each length bucket. Every epoch is
checkpointed as a SHARCS run's is, so re-running an interrupted run resumes it.
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
from sharcs_jax.serve.evaluate import classification_metrics
from sharcs_jax.model.flops import param_shapes, xla_flops
from sharcs_jax.model.early_exit import EarlyExitModel, exit_loss_weights
from sharcs_jax.model.weights import load_pretrained_early_exit, resolve_model_dir
from sharcs_jax.train.loop import (apply_gradients, copy_buffers, epoch_rng, make_optimizer,
                                  train_epoch)

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
                    tx: optax.GradientTransformation) -> tuple[ExitTrainState, dict[str, Array]]:
  """One optimiser step on PABEE's weighted exit losses; metrics {"loss": per-exit losses [L]}
  as `train_epoch` reads them."""
  weight = batch["weight"]
  count = jnp.maximum(weight.sum(), 1.0)

  def loss_fn(params):
    logits = model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], deterministic=False,
                         rngs={"dropout": jax.random.fold_in(state.rng, state.step)})
    ce = optax.softmax_cross_entropy_with_integer_labels(
        logits, jnp.broadcast_to(batch["label"], logits.shape[:2]))  # [L, B]
    per_exit = (ce * weight).sum(-1) / count
    return (per_exit * exit_loss_weights(logits.shape[0])).sum(), per_exit

  (_, per_exit), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  params, opt_state = apply_gradients(tx, state.opt_state, state.params, grads,
                                      batch["learning_rate"])
  return (state.replace(step=state.step + 1, params=params, opt_state=opt_state),
          {"loss": per_exit})


def exit_logits(model: EarlyExitModel, forward: Any, params: Any, data: batching.Encoded,
                batch_size: int) -> np.ndarray:
  """Every exit's logits [L, N, C] in data order, from one pass of the jitted `forward`."""
  out = np.zeros((model.encoder.num_layers, len(data), model.num_classes), np.float32)
  for rows, batch in batching.eval_batches(data, batch_size):
    logits = forward(params, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    out[:, rows] = np.asarray(logits)[:, :len(rows)]
  return out


def exit_flops_table(model: EarlyExitModel, length_buckets: tuple[int, ...]) -> np.ndarray:
  """XLA FLOPs [L, num_buckets] of one example leaving after each layer, at each length."""
  shapes = param_shapes(model)
  table = np.zeros((model.encoder.num_layers, len(length_buckets)))
  for j, length in enumerate(length_buckets):
    row = jax.ShapeDtypeStruct((1, length), jnp.int32)
    for k in range(model.encoder.num_layers):
      table[k, j] = xla_flops(functools.partial(
          lambda p, i, m, t, layer: model.apply({"params": p}, i, m, t, exit_layer=layer),
          layer=k), shapes, row, row, row)
  return table


def served_at_budget(config: ml_collections.ConfigDict, model: EarlyExitModel, forward: Any,
                     params: Any, calibration: batching.Encoded | None, flops: np.ndarray,
                     dev_logits: np.ndarray, dev_data: batching.Encoded,
                     metric_names: tuple[str, ...]) -> dict[str, Any] | None:
  """What the engine serves at `config.routing.budget`: DeeBERT's rule with its threshold fitted
  on the run's `calibration` split (as `ExitEngine.from_kept` fits it), applied to dev; None
  without a budget or calibration split. `flops` [L, buckets]: leaving after each layer."""
  if not config.routing.budget or calibration is None:
    return None
  softmax = lambda logits: np.asarray(jax.nn.softmax(logits, axis=-1))
  stage_flops = np.diff(flops, axis=0, prepend=0.0)  # each layer and its exit alone
  rule = routing.calibrate_exits(
      softmax(exit_logits(model, forward, params, calibration, config.eval.batch_size)),
      stage_flops[:, calibration.bucket_of].T, routing.parse_budget(config.routing.budget),
      config.routing.signal)
  exits = rule.exits(softmax(dev_logits))
  spent = flops[exits, dev_data.bucket_of] / 1e9
  return {"budget": config.routing.budget, "signal": rule.signal, "threshold": rule.threshold,
          "calibration_examples": len(calibration),
          "calibration_reduction": rule.calibration_reduction,
          **classification_metrics(early_exit.exit_predictions(dev_logits, exits),
                                   dev_data.labels, metric_names),
          "gflops": float(spent.mean()),
          "dev_reduction": float(flops[-1, dev_data.bucket_of].mean() / 1e9 / spent.mean()),
          "mean_exit_layer": float(exits.mean() + 1)}


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
                                             pooling=config.model.exit_pooling)
  num_layers = model.encoder.num_layers
  tx = make_optimizer(t)
  state = ExitTrainState(step=jnp.int32(0), epoch=jnp.int32(0), train_seconds=jnp.float32(0),
                         params=params, opt_state=tx.init(params), rng=jax.random.fold_in(key, 2))
  mesh = parallel.make_mesh()
  parallel.check_divisible("config.train.batch_size", t.batch_size, mesh)
  step_fn = jax.jit(functools.partial(exit_train_step, model=model, tx=tx), donate_argnums=0,
                    out_shardings=parallel.replicated(mesh))
  forward = jax.jit(lambda p, ids, mask, types: model.apply({"params": p}, ids, mask, types))
  # The kept epoch: its dev logits of every exit are all the rules need; its parameters are
  # what the engine serves (`checkpoint.load_kept_exit`).
  best = exit_best(copy_buffers(params), num_layers, len(dev_data), task.num_classes)
  checkpoints = Checkpoints(workdir, config)
  history = []
  restored = checkpoints.restore_latest(parallel.replicate(state, mesh), best)
  if restored is not None:
    state, best, history, _ = restored
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
    kept = int(best["epoch"])
    if kept < 0 or accuracy[-1] > history[kept]["dev_accuracy_per_exit"][-1]:
      best = {"epoch": jnp.int32(epoch), "logits": jnp.asarray(logits), "params": copy_buffers(state.params)}
    state = parallel.replicate(state.replace(
        epoch=jnp.int32(epoch + 1),
        train_seconds=state.train_seconds + (time.time() - epoch_start)), mesh)
    checkpoints.save(state, best, history)
  best_epoch, logits = int(best["epoch"]), np.asarray(best["logits"])
  flops = exit_flops_table(model, buckets)  # [L, buckets]
  exit_gflops = flops[:, dev_data.bucket_of] / 1e9  # [L, N]
  points = early_exit.sweep_rules(logits, dev_data.labels, exit_gflops, task.metrics,
                                  entropy_fractions,
                                  patiences or tuple(range(1, num_layers)))
  served = served_at_budget(
      config, model, forward, best["params"],
      None if calibration is None else batching.encode(calibration, tokenizer, buckets), flops,
      logits, dev_data, task.metrics)
  summary = {"task": task.name, "model": config.model.backbone, "method": "early exit",
             "exit_pooling": config.model.exit_pooling,
             "loss": "PABEE weighted mean of exit losses", "epochs": t.epochs,
             "best_epoch": best_epoch, "train_examples": len(train_data),
             "dev_examples": len(dev_data), "train_seconds": float(state.train_seconds),
             "exit_gflops_per_bucket": (flops / 1e9).tolist(), "length_buckets": list(buckets),
             "per_exit": [{**classification_metrics(l.argmax(-1), dev_data.labels, task.metrics),
                           "gflops": float(exit_gflops[k].mean())}
                          for k, l in enumerate(logits)],
             "points": points, "served": served, "history": history}
  report.write_json(os.path.join(workdir, "early_exit.json"), summary)
  rows = [[p["rule"], p["setting"], 100 * p["accuracy"], p["gflops"], p["mean_exit_layer"]]
          for p in points]
  if served:
    rows.append([f"served: {served['signal']} calibrated to {served['budget']}",
                 served["threshold"], 100 * served["accuracy"], served["gflops"],
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
