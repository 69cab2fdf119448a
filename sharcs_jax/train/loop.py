"""SHARCS training: the train state, the pure train step, the epoch loop and its checkpoints.

The paper's recipe: one optimiser step = one batch of a single width and a single length bucket;
batches of different widths are interleaved in a shuffled order. The sandwich recipe
(`train.sandwich`): every step trains every width on the same batch, the prefix run once. The step
is jitted once per (widths, bucket) shape. Loss = sum over the step's widths of CE (for a narrow
width mixed with distillation from the full width when `train.distill` is set) +
router_loss_weight * BCE(router logits, the examples' multi-hot hardness labels). The hardness
state rides in the train state: the step records p(true class) per example id at the narrowest
width it trained, and the epoch loop relabels at each epoch's end.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any

import chex
import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from sharcs_jax import config as config_lib
from sharcs_jax import evaluate
from sharcs_jax.train import hardness
from sharcs_jax import parallel, report, workdir as workdir_lib
from sharcs_jax.checkpoint import Checkpoints, initial_best
from sharcs_jax.data import batching, glue
from sharcs_jax.model.flops import param_shapes
from sharcs_jax.model.reorder import reorder_by_importance
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.model.widths import width_label
from sharcs_jax.model.weights import load_pretrained, resolve_model_dir
from sharcs_jax.serve.programs import Programs
from sharcs_jax.progress import progress
from sharcs_jax.serve.routing import Cascade, Rule, check_reachable, parse_budget, rule_from_json

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array  # int32: optimiser steps taken
  epoch: Array  # int32: epochs completed
  params: Any
  opt_state: Any
  hardness: hardness.HardnessState
  rng: Array  # uint32[2]: dropout keys and each epoch's data order derive from it
  train_seconds: Array  # float32: wall time spent in epochs so far, across restarts
  # float32 [N, classes]: the full width's logits per example in the warm-up epochs, the frozen
  # teacher of `train.distill = "frozen"`; None otherwise (then absent from checkpoints).
  teacher: Array | None = None


def learning_rate(train: ml_collections.ConfigDict, done: float) -> float:
  """Linear warm-up then linear decay to 0 over the fraction of training done, in [0, 1].

  It is (epoch + step / steps in that epoch) / epochs, advanced once per optimiser step
  (never per sample). Epoch lengths depend on the hardness labels (rare widths repeat their
  batches), so the schedule cannot be a fixed count of steps known before training.
  """
  warmup = train.warmup_fraction
  if done < warmup:
    return train.learning_rate * done / warmup
  return train.learning_rate * max(0.0, 1.0 - done) / (1.0 - warmup)


def make_optimizer(train: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """AdamW whose learning rate each step sets (see `learning_rate`); decay spares biases and
  LayerNorms."""
  def decay_mask(params):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) in ("kernel", "word", "position", "token_type"),
        params)

  return optax.inject_hyperparams(optax.adamw, static_args=("mask",))(
      learning_rate=0.0, b1=0.9, b2=0.999, eps=1e-8, weight_decay=train.weight_decay,
      mask=decay_mask)


def apply_gradients(tx: optax.GradientTransformation, opt_state: Any, params: Any, grads: Any,
                    lr: Array) -> tuple[Any, Any]:
  """One AdamW update at learning rate `lr` (a traced scalar: the schedule lives outside)."""
  opt_state = opt_state._replace(hyperparams={**opt_state.hyperparams, "learning_rate": lr})
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def distillation_loss(student_logits: Array, teacher_logits: Array, temperature: float) -> Array:
  """Per-example T^2 * KL(softmax(teacher / T) || softmax(student / T)); no gradient to the teacher.

  The T^2 keeps its gradient on the scale of the cross-entropy's as T changes (Hinton et al.).
  """
  chex.assert_equal_shape([student_logits, teacher_logits])
  teacher = jax.nn.softmax(jax.lax.stop_gradient(teacher_logits) / temperature)
  log_student = jax.nn.log_softmax(student_logits / temperature)
  log_teacher = jnp.log(jnp.maximum(teacher, 1e-12))
  return temperature ** 2 * jnp.sum(teacher * (log_teacher - log_student), axis=-1)


def width_loss(logits: Array, labels: Array, teacher_logits: Array | None, distill_weight: float,
               temperature: float) -> Array:
  """Per-example loss of one width: CE, or (1 - a) CE + a KD when it has a teacher."""
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if teacher_logits is None:
    return ce
  return ((1.0 - distill_weight) * ce
          + distill_weight * distillation_loss(logits, teacher_logits, temperature))


def _forward_widths(module: SharcsModel, input_ids: Array, attention_mask: Array,
                    token_type_ids: Array, widths: tuple[float, ...]
                    ) -> tuple[Array, list[Array]]:
  """Router logits and each width's task logits; the full-width prefix runs once for them all."""
  hidden, router_logits = module.prefix(input_ids, attention_mask, token_type_ids,
                                        deterministic=False)
  return router_logits, [module.adaptive(hidden, attention_mask, width=w,
                                         deterministic=False).logits for w in widths]


def train_step(state: TrainState, batch: dict[str, Array], *, model: SharcsModel,
               tx: optax.GradientTransformation, widths: tuple[float, ...],
               router_loss_weight: float, hardness_signal: str = "confidence",
               distill: str = "none", distill_weight: float = 0.0,
               distill_temperature: float = 1.0) -> tuple[TrainState, dict[str, Array]]:
  """One optimiser step on one batch at each of `widths` (increasing); records easiness.

  distill "inplace": a narrow width's teacher is the full width's logits of this very step (1.0
  must be in `widths`); "frozen": the logits the full width gave each example in the warm-up
  epochs, kept in `state.teacher` and written here while epoch < W.
  """
  weight = batch["weight"]
  count = jnp.maximum(weight.sum(), 1.0)
  num_examples = state.hardness.labels.shape[0]
  ids = jnp.minimum(batch["id"], num_examples - 1)
  router_target = state.hardness.labels[ids]
  dropout_key = jax.random.fold_in(state.rng, state.step)
  window = state.hardness.confidence.shape[0]

  def loss_fn(params):
    router_logits, logits = model.apply(
        {"params": params}, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"],
        widths, method=_forward_widths, rngs={"dropout": dropout_key})
    teacher, mix = {"inplace": (logits[-1] if widths[-1] == 1.0 else None, distill_weight),
                    # the frozen teacher exists once the warm-up has written it
                    "frozen": (None if state.teacher is None else state.teacher[ids],
                               distill_weight * (state.epoch >= window)),
                    "none": (None, 0.0)}[distill]
    task = sum(width_loss(lg, batch["label"], teacher if w < 1.0 else None, mix,
                          distill_temperature) for w, lg in zip(widths, logits))
    router = optax.sigmoid_binary_cross_entropy(router_logits, router_target).mean(-1)
    task_loss, router_loss = (task * weight).sum() / count, (router * weight).sum() / count
    return task_loss + router_loss_weight * router_loss, (logits, task_loss, router_loss)

  (loss, (logits, task_loss, router_loss)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  params, opt_state = apply_gradients(tx, state.opt_state, state.params, grads,
                                      batch["learning_rate"])
  narrowest = jax.lax.stop_gradient(logits[0])
  new_hardness = hardness.record(state.hardness, batch["id"],
                                 hardness.easiness(jax.nn.softmax(narrowest), batch["label"],
                                                   hardness_signal),
                                 state.epoch)
  teacher = state.teacher
  if teacher is not None and widths[-1] == 1.0:  # frozen teacher: written only in the warm-up
    warm_up = state.epoch < window
    full = jax.lax.stop_gradient(logits[-1])
    teacher = teacher.at[batch["id"]].set(
        jnp.where(warm_up, full, teacher[ids]), mode="drop")
  correct = ((logits[-1].argmax(-1) == batch["label"]) * weight).sum()
  metrics = {"loss": loss, "task_loss": task_loss, "router_loss": router_loss,
             "correct": correct, "count": weight.sum()}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                       hardness=new_hardness, teacher=teacher), metrics


def copy_buffers(tree: Any) -> Any:
  """The train step donates its state: what must outlive a step needs buffers of its own."""
  return jax.tree_util.tree_map(jnp.copy, tree)


def epoch_rng(state: Any, epoch: int) -> np.random.Generator:
  """The data order of `epoch`, drawn from the state's RNG (so a resumed run replays it)."""
  return np.random.default_rng([int(x) for x in np.asarray(state.rng)] + [epoch])


@dataclasses.dataclass(frozen=True)
class EpochResult:
  losses: np.ndarray  # [steps] or [steps, exits]: each step's loss
  seen: int  # examples trained (repeats counted)
  correct: float  # of them, predicted right (at full width)
  seconds: float


def train_epoch(state: Any, step: Any, plan: list[batching.PlannedBatch],
                data: batching.Encoded, train: ml_collections.ConfigDict, epoch: int,
                mesh: jax.sharding.Mesh, name: str) -> tuple[Any, EpochResult]:
  """One epoch of `plan` through `step(state, batch, planned) -> (state, metrics)`: the loop
  every trained model here shares (learning-rate schedule, sharded batches, progress, and a stop
  at the first non-finite loss, before anything of the epoch is saved)."""
  start, losses, seen, correct = time.time(), [], 0, 0.0
  bar = progress(plan, name, bar=train.progress_bar, quiet=not parallel.is_primary())
  for i, planned in enumerate(bar):
    batch = batching.make_batch(data, planned.rows, planned.bucket, train.batch_size)
    batch["learning_rate"] = np.float32(learning_rate(train, (epoch + i / len(plan)) / train.epochs))
    state, metrics = step(state, parallel.shard_batch(batch, mesh), planned)
    loss = np.asarray(metrics["loss"])
    losses.append(loss)
    if not np.all(np.isfinite(loss)):
      raise FloatingPointError(f"non-finite loss {loss.tolist()} at epoch {epoch}, step "
                               f"{int(state.step)}; nothing of this epoch was saved")
    seen += len(planned.rows)
    correct += float(metrics.get("correct", 0.0))
    bar.set_postfix(loss=f"{float(loss.reshape(-1)[-1]):.3f}",
                    ex_s=f"{seen / (time.time() - start):.0f}",
                    refresh=False)  # shown at the bar's next redraw, not one per step
  return state, EpochResult(losses=np.asarray(losses), seen=seen, correct=correct,
                            seconds=time.time() - start)


def selection_score(result: dict[str, Any], rule: str, max_drop: float,
                    best_full_width: float, static_index: int | None = None) -> tuple[float, float]:
  """Orders dev results for keeping the best epoch (higher is better, compared as a tuple).

  "accuracy": the paper's rule, highest SHARCS accuracy. "reduction": highest FLOPs reduction
  among epochs whose SHARCS accuracy is within `max_drop` of the best full-width accuracy of any
  epoch so far (not of the same epoch: a full width that has itself lost accuracy would excuse a
  router that sends everything to the narrowest width); other epochs rank below, by accuracy.
  A static-width run (`static_index`) keeps its width's best accuracy.
  """
  if static_index is not None:
    return (0.0, result["static"][static_index]["accuracy"])
  sharcs = result["sharcs"]
  if rule == "accuracy":
    return (0.0, sharcs["accuracy"])
  if rule == "reduction":
    within = best_full_width - sharcs["accuracy"] <= max_drop
    return (1.0, sharcs["flops_reduction"]) if within else (0.0, sharcs["accuracy"])
  raise ValueError(f"unknown selection rule {rule!r}; known: {config_lib.SELECTION_RULES}")


def reordered(state: Any, model: Any, train_data: batching.Encoded,
              config: ml_collections.ConfigDict, tx: optax.GradientTransformation) -> Any:
  """A fresh run's state with its heads and neurons in order of importance (DynaBERT), so that
  every narrow width's leading slice keeps the most important units; the optimiser restarts."""
  start = time.time()
  params = reorder_by_importance(model, state.params, importance_batches(
      train_data, config.train.batch_size, config.model.reorder_batches))
  logging.info("Reordered heads and neurons by importance in %.1fs", time.time() - start)
  return state.replace(params=params, opt_state=tx.init(params))


def importance_batches(data: batching.Encoded, batch_size: int, count: int):
  full = (b for rows, b in batching.eval_batches(data, batch_size) if len(rows) == batch_size)
  for _, batch in zip(range(count), full):
    yield {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids", "label")}


def _log_eval(epoch: int, result: dict, widths: tuple[float, ...]) -> None:
  static = ", ".join(f"w{width_label(w)}={result['static'][i]['accuracy']:.4f}"
                     for i, w in enumerate(widths))
  s = result["sharcs"]
  logging.info("epoch %d dev: %s | SHARCS %.4f at %.3f GFLOPs (%.2fx), share %s", epoch, static,
               s["accuracy"], s["gflops"], s["flops_reduction"],
               [round(x, 3) for x in s["share_per_width"]])
  if "sharcs_argmax" in result:
    a = result["sharcs_argmax"]
    logging.info("epoch %d dev: budget %s (%s, %.2fx on calibration) | argmax routing %.4f at "
                 "%.2fx", epoch, s["routing"]["budget"], s["routing"]["rule"],
                 s["routing"]["calibration_reduction"], a["accuracy"], a["flops_reduction"])


def _json_result(result: dict[str, Any], widths: tuple[float, ...]) -> dict[str, Any]:
  return {"full_width": result["full_width"],
          "static": {width_label(w): result["static"][i] for i, w in enumerate(widths)},
          **{k: result[k] for k in ("sharcs", "sharcs_argmax") if k in result}}


def _load_data(config: ml_collections.ConfigDict, tokenizer: Any
               ) -> tuple[batching.Encoded, batching.Encoded, batching.Encoded | None]:
  """(train, dev, calibration) encoded; calibration is None without held-out examples."""
  buckets = tuple(config.data.length_buckets)
  train_data, dev_data, calibration_data = batching.encode_splits(glue.run_splits(config),
                                                                  tokenizer, buckets)
  logging.info("%s: %d train, %d dev, %d calibration examples; buckets %s hold %s of train",
               config.task, len(train_data), len(dev_data),
               0 if calibration_data is None else len(calibration_data), buckets,
               np.bincount(train_data.bucket_of, minlength=len(buckets)).tolist())
  return train_data, dev_data, calibration_data


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains SHARCS, keeps the best dev epoch (>= W), writes report.{json,md,png} in workdir.

  The workdir is held for the whole run: a second run on it fails at once (`workdir.exclusive`).
  """
  config_lib.validate(config)
  if not parallel.is_primary():  # process 0 holds the lock for a multi-process job
    return _train_and_evaluate(config, workdir)
  with workdir_lib.exclusive(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  mesh = parallel.make_mesh()
  parallel.check_divisible("config.train.batch_size", config.train.batch_size, mesh)
  parallel.check_divisible("config.eval.batch_size", config.eval.batch_size, mesh)
  task = glue.get_task(config.task)
  m, h, t = config.model, config.hardness, config.train
  widths = tuple(m.widths)
  ranges = jnp.asarray(hardness.check_ranges(h.ranges, len(widths)))
  buckets = tuple(config.data.length_buckets)
  routing = config.routing
  # A static-width baseline trains only `static_width` (no router, no warm-up at full width).
  static_index = widths.index(t.static_width) if t.static_width else None
  train_data, dev_data, calibration_data = _load_data(
      config, batching.load_tokenizer(resolve_model_dir(m.backbone)))

  key = jax.random.PRNGKey(config.seed)
  model, params = load_pretrained(m.backbone, num_classes=task.num_classes, widths=widths,
                                  router_layer=m.router_layer,
                                  router_hidden=m.router_hidden,
                                  layernorm_init=m.layernorm_init, key=jax.random.fold_in(key, 1))
  # Batch 1 as well: FLOPs per example are read at batch size 1, as the engine reports them.
  programs = Programs(model, param_shapes(model),
                      batch_buckets=tuple(sorted({1, config.eval.batch_size})),
                      length_buckets=buckets, cache_dir=os.path.join(workdir, "executables"),
                      mesh=mesh)
  flops = programs.flops_table()
  if routing.budget:
    try:  # the reachable range is known from the FLOPs alone: fail before any epoch
      check_reachable(evaluate.per_example_flops(flops, calibration_data),
                      parse_budget(routing.budget))
    except ValueError as e:
      raise ValueError(f"config.routing.budget={routing.budget!r}: {e}") from None
  tx = make_optimizer(t)
  state = TrainState(step=jnp.int32(0), epoch=jnp.int32(0), params=params,
                     opt_state=tx.init(params),
                     hardness=hardness.init_hardness(len(train_data), h.window, len(widths)),
                     rng=jax.random.fold_in(key, 2), train_seconds=jnp.float32(0.0),
                     teacher=(jnp.zeros((len(train_data), task.num_classes), jnp.float32)
                              if t.distill == "frozen" else None))
  history = []  # per-epoch dev results, checkpointed with the state
  best_rule = None  # the kept epoch's routing rule, checkpointed with it
  checkpoints = Checkpoints(workdir, config)
  # Restored arrays take the shardings of this run's mesh, whatever mesh wrote them.
  restored = checkpoints.restore_latest(parallel.replicate(state, mesh),
                                        parallel.replicate(initial_best(params), mesh))
  if restored is not None:
    state, best, history, best_rule = restored
  else:
    if m.reorder:
      state = reordered(state, model, train_data, config, tx)
    state = parallel.replicate(state, mesh)
    best = parallel.replicate(initial_best(copy_buffers(state.params)), mesh)

  step_fn = jax.jit(functools.partial(
      train_step, model=model, tx=tx, hardness_signal=h.signal,
      router_loss_weight=0.0 if static_index is not None else t.router_loss_weight,
      distill=t.distill, distill_weight=t.distill_weight,
      distill_temperature=t.distill_temperature),
                    static_argnames="widths", donate_argnums=0,
                    out_shardings=parallel.replicated(mesh))
  sandwich = t.sandwich and static_index is None

  def routing_rule(params) -> Rule | Cascade:
    if not routing.budget:
      return Rule()
    return evaluate.calibrate_rule(
        programs, params, calibration_data, config.eval.batch_size, parse_budget(routing.budget),
        routing.rule, routing.signal,
        parse_budget(routing.start_budget) if routing.start_budget else None)

  def evaluate_dev(params):
    return evaluate.summarize(*evaluate.predict_all_widths(programs, params, dev_data,
                                                           config.eval.batch_size),
                              dev_data, flops, task.metrics, routing_rule(params),
                              programs.prefix_flops_row())

  for epoch in range(int(state.epoch), t.epochs):
    start = time.time()
    rng = epoch_rng(state, epoch)
    # The sandwich trains every width on every example: one pass, each batch at all widths.
    one_width = static_index if static_index is not None else len(widths) - 1
    assigned = (np.full(len(train_data), one_width, np.int32)
                if static_index is not None or sandwich
                else hardness.assign_widths(np.asarray(state.hardness.labels), rng))
    plan = batching.plan_train_epoch(train_data, assigned, t.batch_size, rng)
    state, trained = train_epoch(
        state, lambda s, b, planned: step_fn(
            s, b, widths=widths if sandwich else (widths[planned.width_index],)),
        plan, train_data, t, epoch, mesh, f"epoch {epoch}")
    seen, correct, train_time = trained.seen, trained.correct, trained.seconds
    state = parallel.replicate(state.replace(
        hardness=hardness.relabel(state.hardness, ranges, jnp.int32(epoch)),
        epoch=jnp.int32(epoch + 1)), mesh)
    share = np.asarray(state.hardness.labels).mean(0)
    logging.info("epoch %d: %d examples in %.0fs (%.1f ex/s), train acc %.4f, "
                 "labels per width %s, width share trained %s", epoch, seen, train_time,
                 seen / train_time, correct / max(seen, 1), np.round(share, 3).tolist(),
                 "all (sandwich)" if sandwich else np.round(
                     np.bincount(assigned, minlength=len(widths)) / len(assigned), 3).tolist())
    result = evaluate_dev(state.params)
    _log_eval(epoch, result, widths)
    history.append({"epoch": epoch, "train_loss": float(np.mean(trained.losses)),
                    **_json_result(result, widths)})
    score = selection_score(result, config.checkpoint.select, config.checkpoint.max_drop,
                            max(h["full_width"]["accuracy"] for h in history), static_index)
    may_keep = epoch >= h.window or static_index is not None
    if may_keep and score > tuple(np.asarray(best["score"]).tolist()):
      best = parallel.replicate({"params": copy_buffers(state.params), "epoch": jnp.int32(epoch),
                                 "score": jnp.asarray(score, jnp.float32)}, mesh)
      best_rule = rule_from_json(result["sharcs"].get("routing") or {})
    state = parallel.replicate(
        state.replace(train_seconds=state.train_seconds + (time.time() - start)), mesh)
    checkpoints.save(state, best, history, best_rule)

  result = evaluate_dev(best["params"])
  summary = {
      "task": task.name, "model": m.backbone, "widths": list(widths),
      "router_layer": m.router_layer, "ranges": [list(map(float, r)) for r in h.ranges],
      "window": h.window, "hardness_signal": h.signal, "static_width": t.static_width,
      "epochs": t.epochs, "best_epoch": int(best["epoch"]),
      "recipe": {"sandwich": sandwich, "distill": t.distill, "distill_weight": t.distill_weight,
                 "distill_temperature": t.distill_temperature},
      "train_examples": len(train_data), "dev_examples": len(dev_data),
      "routing": {"budget": routing.budget or "argmax", "calibrate_on": routing.calibrate_on,
                  "calibration_examples": len(calibration_data) if routing.budget else 0},
      "selection": config.checkpoint.select, **_json_result(result, widths),
      "train_seconds": float(state.train_seconds), "history": history,
  }
  if parallel.is_primary():
    report.write_run_report(workdir, summary)
  return summary
