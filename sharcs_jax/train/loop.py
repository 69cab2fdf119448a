"""The one training loop (`fit`, over a `Method`), the train state, and SHARCS's method.

`fit` owns what every model trains alike (data, mesh, schedule, checkpoints, resuming, keeping
the best epoch); a `Method` brings its step, batches, evaluation and report (SHARCS here, the
early exit in baselines/). SHARCS, the paper's recipe: one optimiser step = one batch of a single width and a single length bucket;
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
from typing import Any, Callable, Protocol

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
  hardness: hardness.HardnessState | None  # SHARCS's labels; None for a method without
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
                    best_full_width: float, static: str | None = None) -> tuple[float, float]:
  """Orders dev results for keeping the best epoch (higher is better, compared as a tuple).

  "accuracy": the paper's rule, highest SHARCS accuracy. "reduction": highest FLOPs reduction
  among epochs whose SHARCS accuracy is within `max_drop` of the best full-width accuracy of any
  epoch so far (not of the same epoch: a full width that has itself lost accuracy would excuse a
  router that sends everything to the narrowest width); other epochs rank below, by accuracy.
  A static-width run keeps its width's (`static`, as the record names it) best accuracy.
  """
  if static is not None:
    return (0.0, result["static"][static]["accuracy"])
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


class Method(Protocol):
  """What one kind of model brings to the one epoch loop (`fit`): its model and train state, its
  step (its loss), each epoch's batches, its dev evaluation, which epoch it keeps, and its report.
  SHARCS (`SharcsTraining`) and the early-exit baselines (`baselines.train_early_exit`) are
  methods; everything else (data, mesh, schedule, checkpoints, resuming, timing) is the loop's."""

  name: str  # what the progress bar calls an epoch ("epoch 3", "early exit, epoch 3")
  report: str  # the Markdown report it writes in the workdir
  tx: optax.GradientTransformation

  def initial(self) -> tuple[TrainState, dict[str, Any]]:
    """(train state, kept-epoch record) before any epoch; the record's structure is what
    checkpoints hold."""

  def fresh(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    """A fresh run's starting state (e.g. reordered) and its kept-epoch record."""

  def epoch(self, state: TrainState, epoch: int, rng: np.random.Generator
            ) -> tuple[list[batching.PlannedBatch], Any]:
    """The epoch's batches and the step that trains each: `step(state, batch, planned)`."""

  def end_epoch(self, state: TrainState, epoch: int, trained: EpochResult) -> TrainState:
    """The state after the epoch's last step (SHARCS relabels hardness here)."""

  def evaluate(self, params: Any, epoch: int, trained: EpochResult
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    """The epoch's dev record, as the run's history keeps it, and the arrays a kept epoch
    stores with it (e.g. the dev predictions its report is read from)."""

  def keeps(self, record: dict[str, Any], epoch: int, best: dict[str, Any],
            history: list[dict]) -> tuple[dict[str, Any], Rule | None] | None:
    """None, or what the kept-epoch record holds besides params, epoch and the evaluation's
    arrays, and the rule kept with it, when this epoch is better than the kept one."""

  def finish(self, state: TrainState, best: dict[str, Any], history: list[dict]
             ) -> dict[str, Any]:
    """The run's summary from its kept epoch; writes its reports."""


@dataclasses.dataclass(frozen=True)
class RunData:
  """A run's splits, encoded as every method trains and evaluates them."""

  train: batching.Encoded
  dev: batching.Encoded
  calibration: batching.Encoded | None
  tokenizer: Any


def load_run_data(config: ml_collections.ConfigDict) -> RunData:
  """(train, dev, calibration) encoded; calibration is None without held-out examples."""
  tokenizer = batching.load_tokenizer(resolve_model_dir(config.model.backbone))
  buckets = tuple(config.data.length_buckets)
  train_data, dev_data, calibration_data = batching.encode_splits(glue.run_splits(config),
                                                                  tokenizer, buckets)
  logging.info("%s: %d train, %d dev, %d calibration examples; buckets %s hold %s of train",
               config.task, len(train_data), len(dev_data),
               0 if calibration_data is None else len(calibration_data), buckets,
               np.bincount(train_data.bucket_of, minlength=len(buckets)).tolist())
  return RunData(train_data, dev_data, calibration_data, tokenizer)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains SHARCS (`fit` with `SharcsTraining`), keeps its best dev epoch, writes
  report.{json,md,png} in workdir."""
  return fit(config, workdir, SharcsTraining)


def fit(config: ml_collections.ConfigDict, workdir: str,
        method: Callable[[ml_collections.ConfigDict, str, RunData, jax.sharding.Mesh], Method]
        ) -> dict[str, Any]:
  """The one epoch loop: `method(config, workdir, data, mesh)` says what is trained and how it
  is judged. The workdir is held for the whole run: a second run on it fails at once
  (`workdir.exclusive`); every epoch is checkpointed, so re-running an interrupted run resumes
  it."""
  config_lib.validate(config)
  if not parallel.is_primary():  # process 0 holds the lock for a multi-process job
    return _fit(config, workdir, method)
  with workdir_lib.exclusive(workdir):
    return _fit(config, workdir, method)


def _fit(config: ml_collections.ConfigDict, workdir: str, make_method: Any) -> dict[str, Any]:
  mesh = parallel.make_mesh()
  parallel.check_divisible("config.train.batch_size", config.train.batch_size, mesh)
  parallel.check_divisible("config.eval.batch_size", config.eval.batch_size, mesh)
  data = load_run_data(config)
  method = make_method(config, workdir, data, mesh)
  state, best = method.initial()
  history = []  # per-epoch dev results, checkpointed with the state
  best_rule = None  # the kept epoch's routing rule, checkpointed with it
  checkpoints = Checkpoints(workdir, config)
  # Restored arrays take the shardings of this run's mesh, whatever mesh wrote them.
  restored = checkpoints.restore_latest(parallel.replicate(state, mesh),
                                        parallel.replicate(best, mesh))
  if restored is not None:
    state, best, history, best_rule = restored
  else:
    state, best = method.fresh(state)
    state, best = parallel.replicate(state, mesh), parallel.replicate(best, mesh)
  t = config.train
  for epoch in range(int(state.epoch), t.epochs):
    start = time.time()
    plan, step = method.epoch(state, epoch, epoch_rng(state, epoch))
    state, trained = train_epoch(state, step, plan, data.train, t, epoch, mesh,
                                 f"{method.name}epoch {epoch}")
    state = parallel.replicate(
        method.end_epoch(state, epoch, trained).replace(epoch=jnp.int32(epoch + 1)), mesh)
    record, arrays = method.evaluate(state.params, epoch, trained)
    history.append(record)
    kept = method.keeps(record, epoch, best, history)
    if kept is not None:
      extra, best_rule = kept
      best = parallel.replicate({"params": copy_buffers(state.params), "epoch": jnp.int32(epoch),
                                 **arrays, **extra}, mesh)
    state = parallel.replicate(
        state.replace(train_seconds=state.train_seconds + (time.time() - start)), mesh)
    checkpoints.save(state, best, history, best_rule)
  return method.finish(state, best, history)


class SharcsTraining:
  """SHARCS (`Method`): widths trained by hardness labels (or all at once: the sandwich), the
  router on those labels; dev evaluated through the compiled programs under the config's routing
  rule; the best epoch kept by `checkpoint.select` from epoch W on. A static-width baseline
  (`train.static_width`) trains only its width (no router, no warm-up at full width)."""

  name, report = "", "report.md"

  def __init__(self, config: ml_collections.ConfigDict, workdir: str, data: RunData,
               mesh: jax.sharding.Mesh):
    self.config, self.workdir, self.data = config, workdir, data
    self.task = glue.get_task(config.task)
    m, h, t = config.model, config.hardness, config.train
    self.widths = tuple(m.widths)
    self.ranges = jnp.asarray(hardness.check_ranges(h.ranges, len(self.widths)))
    self.static_index = self.widths.index(t.static_width) if t.static_width else None
    self.key = jax.random.PRNGKey(config.seed)
    self.model, self.params = load_pretrained(
        m.backbone, num_classes=self.task.num_classes, widths=self.widths,
        router_layer=m.router_layer, router_hidden=m.router_hidden,
        layernorm_init=m.layernorm_init, key=jax.random.fold_in(self.key, 1))
    # Batch 1 as well: FLOPs per example are read at batch size 1, as the engine reports them.
    self.programs = Programs(self.model, param_shapes(self.model),
                             batch_buckets=tuple(sorted({1, config.eval.batch_size})),
                             length_buckets=tuple(config.data.length_buckets),
                             cache_dir=os.path.join(workdir, "executables"), mesh=mesh)
    self.flops = self.programs.flops_table()
    routing = config.routing
    if routing.budget:
      try:  # the reachable range is known from the FLOPs alone: fail before any epoch
        check_reachable(evaluate.per_example_flops(self.flops, data.calibration),
                        parse_budget(routing.budget))
      except ValueError as e:
        raise ValueError(f"config.routing.budget={routing.budget!r}: {e}") from None
    self.tx = make_optimizer(t)
    self.step_fn = jax.jit(functools.partial(
        train_step, model=self.model, tx=self.tx, hardness_signal=h.signal,
        router_loss_weight=0.0 if self.static_index is not None else t.router_loss_weight,
        distill=t.distill, distill_weight=t.distill_weight,
        distill_temperature=t.distill_temperature),
                           static_argnames="widths", donate_argnums=0,
                           out_shardings=parallel.replicated(mesh))
    self.sandwich = t.sandwich and self.static_index is None

  def initial(self) -> tuple[TrainState, dict[str, Any]]:
    t, params = self.config.train, self.params
    state = TrainState(step=jnp.int32(0), epoch=jnp.int32(0), params=params,
                       opt_state=self.tx.init(params),
                       hardness=hardness.init_hardness(len(self.data.train),
                                                       self.config.hardness.window,
                                                       len(self.widths)),
                       rng=jax.random.fold_in(self.key, 2), train_seconds=jnp.float32(0.0),
                       teacher=(jnp.zeros((len(self.data.train), self.task.num_classes),
                                          jnp.float32) if t.distill == "frozen" else None))
    return state, initial_best(params)

  def fresh(self, state: TrainState) -> tuple[TrainState, dict[str, Any]]:
    if self.config.model.reorder:
      state = reordered(state, self.model, self.data.train, self.config, self.tx)
    return state, initial_best(copy_buffers(state.params))

  def epoch(self, state: TrainState, epoch: int, rng: np.random.Generator
            ) -> tuple[list[batching.PlannedBatch], Any]:
    # The sandwich trains every width on every example: one pass, each batch at all widths.
    widths, train_data = self.widths, self.data.train
    one_width = self.static_index if self.static_index is not None else len(widths) - 1
    assigned = (np.full(len(train_data), one_width, np.int32)
                if self.static_index is not None or self.sandwich
                else hardness.assign_widths(np.asarray(state.hardness.labels), rng))
    logging.info("epoch %d trains widths %s: share %s", epoch, list(widths),
                 "all (sandwich)" if self.sandwich else np.round(
                     np.bincount(assigned, minlength=len(widths)) / len(assigned), 3).tolist())
    plan = batching.plan_train_epoch(train_data, assigned, self.config.train.batch_size, rng)
    step = lambda s, b, planned: self.step_fn(
        s, b, widths=widths if self.sandwich else (widths[planned.width_index],))
    return plan, step

  def end_epoch(self, state: TrainState, epoch: int, trained: EpochResult) -> TrainState:
    state = state.replace(hardness=hardness.relabel(state.hardness, self.ranges,
                                                    jnp.int32(epoch)))
    share = np.asarray(state.hardness.labels).mean(0)
    seen = trained.seen
    logging.info("epoch %d: %d examples in %.0fs (%.1f ex/s), train acc %.4f, "
                 "labels per width %s", epoch, seen, trained.seconds, seen / trained.seconds,
                 trained.correct / max(seen, 1), np.round(share, 3).tolist())
    return state

  def _routing_rule(self, params: Any) -> Rule | Cascade:
    routing = self.config.routing
    if not routing.budget:
      return Rule()
    return evaluate.calibrate_rule(
        self.programs, params, self.data.calibration, self.config.eval.batch_size,
        parse_budget(routing.budget), routing.rule, routing.signal,
        parse_budget(routing.start_budget) if routing.start_budget else None)

  def _evaluate_dev(self, params: Any) -> dict[str, Any]:
    dev = self.data.dev
    return evaluate.summarize(*evaluate.predict_all_widths(self.programs, params, dev,
                                                           self.config.eval.batch_size),
                              dev, self.flops, self.task.metrics, self._routing_rule(params),
                              self.programs.prefix_flops_row())

  def evaluate(self, params: Any, epoch: int, trained: EpochResult
               ) -> tuple[dict[str, Any], dict[str, Any]]:
    result = self._evaluate_dev(params)
    _log_eval(epoch, result, self.widths)
    return {"epoch": epoch, "train_loss": float(np.mean(trained.losses)),
            **_json_result(result, self.widths)}, {}

  def keeps(self, record: dict[str, Any], epoch: int, best: dict[str, Any],
            history: list[dict]) -> tuple[dict[str, Any], Rule | None] | None:
    config = self.config
    score = selection_score(record, config.checkpoint.select, config.checkpoint.max_drop,
                            max(h["full_width"]["accuracy"] for h in history),
                            None if self.static_index is None else
                            width_label(self.widths[self.static_index]))
    may_keep = epoch >= config.hardness.window or self.static_index is not None
    if not (may_keep and score > tuple(np.asarray(best["score"]).tolist())):
      return None
    return ({"score": jnp.asarray(score, jnp.float32)},
            rule_from_json(record["sharcs"].get("routing") or {}))

  def finish(self, state: TrainState, best: dict[str, Any], history: list[dict]
             ) -> dict[str, Any]:
    config, data = self.config, self.data
    m, h, t, routing = config.model, config.hardness, config.train, config.routing
    result = self._evaluate_dev(best["params"])
    summary = {
        "task": self.task.name, "model": m.backbone, "widths": list(self.widths),
        "router_layer": m.router_layer, "ranges": [list(map(float, r)) for r in h.ranges],
        "window": h.window, "hardness_signal": h.signal, "static_width": t.static_width,
        "epochs": t.epochs, "best_epoch": int(best["epoch"]),
        "recipe": {"sandwich": self.sandwich, "distill": t.distill,
                   "distill_weight": t.distill_weight,
                   "distill_temperature": t.distill_temperature},
        "train_examples": len(data.train), "dev_examples": len(data.dev),
        "routing": {"budget": routing.budget or "argmax", "calibrate_on": routing.calibrate_on,
                    "calibration_examples": len(data.calibration) if routing.budget else 0},
        "selection": config.checkpoint.select, **_json_result(result, self.widths),
        "train_seconds": float(state.train_seconds), "history": history,
    }
    if parallel.is_primary():
      report.write_run_report(self.workdir, summary)
    return summary
