"""Checkpoints of a training run (orbax), and loading a trained model back for serving.

Each epoch saves the train state (params, optimiser state, hardness state, data-order RNG, step),
the best epoch so far with its routing rule, the per-epoch dev history and the config, as one
orbax step. Only finished steps are ever read back, so a reader never sees half a run.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from typing import Any, Iterator

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from sharcs_jax import config as config_lib
from sharcs_jax.data import glue
from sharcs_jax.errors import MissingFileError, RunError
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.flops import param_shapes
from sharcs_jax.model.sharcs import SharcsModel, router_hidden_size
from sharcs_jax.serve.routing import Rule, rule_from_json

# Settings that change only what a run shows, never what it computes: a resume may differ in them.
DISPLAY_ONLY = ("train.progress_bar",)


class CheckpointError(RunError):
  """A checkpoint that cannot be read, or a run that has nothing to serve yet."""


def quiet_orbax_logging() -> None:
  """orbax logs every array it writes at INFO; keep a job's own progress readable."""
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


def _flat(tree: dict, prefix: str = "") -> dict[str, Any]:
  """{"train": {"epochs": 5}} -> {"train.epochs": 5}: differences named by their full key."""
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def config_differences(saved: dict, current: dict, defaults: dict | None = None) -> list[str]:
  """'key: saved -> current' for every setting that changes what a run computes.

  A key the saved config lacks but `defaults` (the base config) holds at the current value was
  added to the code since the checkpoint was written, at a default that keeps the old behaviour:
  not a difference, so that upgrading does not strand runs in progress.
  """
  saved, current, defaults = _flat(saved), _flat(current), _flat(defaults or {})
  added = {k for k in set(current) - set(saved) if k in defaults and defaults[k] == current[k]}
  return [f"{k}: {saved.get(k, '(absent)')!r} -> {current.get(k, '(absent)')!r}"
          for k in sorted(set(saved) | set(current))
          if k not in DISPLAY_ONLY and k not in added and saved.get(k) != current.get(k)]


def _restore(manager: ocp.CheckpointManager, step: int, **items: Any) -> Any:
  """manager.restore, with a damaged or truncated step reported in one line naming its folder."""
  try:
    return manager.restore(step, args=ocp.args.Composite(**items))
  except Exception as e:  # orbax and tensorstore raise many types; all mean the same here
    cause = e
    while cause.__cause__ is not None or cause.__context__ is not None:
      cause = cause.__cause__ or cause.__context__
    detail = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
    raise CheckpointError(
        f"{os.path.join(str(manager.directory), str(step))}: checkpoint step {step} is damaged "
        f"or truncated ({detail[:300]}); restore that folder from a copy, or delete it and re-run "
        "the training command to resume from the step before it") from None


def rule_json(rule: Rule | None) -> dict[str, Any]:
  """The kept epoch's routing rule as checkpoints hold it ({} for the router's argmax)."""
  return rule.to_json() if rule is not None and rule.budget else {}


class Checkpoints:
  """orbax CheckpointManager holding the train state, the best epoch so far and the config."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.config = _config_json(config)
    self.defaults = _config_json(config_lib.base_config(config.task))
    self.manager = _manager(workdir, max_to_keep=config.checkpoint.max_to_keep, create=True)

  def save(self, state: Any, best: dict[str, Any], history: list[dict],
           rule: Rule | None = None) -> None:
    """One epoch; `rule` is the kept epoch's routing rule, so serving never depends on reports."""
    self.manager.save(int(state.epoch), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
        config=ocp.args.JsonSave(self.config), history=ocp.args.JsonSave(history),
        rule=ocp.args.JsonSave(rule_json(rule))))
    self.manager.wait_until_finished()

  def restore_latest(self, state: Any, best: dict[str, Any]):
    """(state, best, per-epoch dev history, kept rule) of the latest epoch, or None for a fresh
    workdir."""
    step = self.manager.latest_step()
    if step is None:
      return None
    saved = _restore(self.manager, step, config=ocp.args.JsonRestore())
    changed = config_differences(saved.config, self.config, self.defaults)
    if changed:
      raise ValueError(f"{self.manager.directory} holds checkpoints of a different config "
                       f"({'; '.join(changed)}); use a new --workdir or the same config")
    abstract = functools.partial(jax.tree_util.tree_map, ocp.utils.to_shape_dtype_struct)
    restored = _restore(self.manager, step, state=ocp.args.StandardRestore(abstract(state)),
                        best=ocp.args.StandardRestore(abstract(best)),
                        history=ocp.args.JsonRestore())
    logging.info("Resumed from %s after epoch %d", self.manager.directory, step)
    history = [_upgrade_epoch(h) for h in restored.history]
    return restored.state, restored.best, history, _saved_rule(self.manager, step)


def _upgrade_epoch(entry: dict) -> dict:
  """An epoch's dev record as written by earlier versions, in today's names ("bucket_share" was
  renamed "share_per_width"), so that a run resumed across the upgrade reports whole."""
  out = {}
  for key, value in entry.items():
    if isinstance(value, dict):
      value = _upgrade_epoch(value)
    out["share_per_width" if key == "bucket_share" else key] = value
  return out


def _saved_rule(manager: ocp.CheckpointManager, step: int) -> Rule | None:
  """The rule a step holds; None for checkpoints written before rules were kept with them."""
  if not os.path.isdir(os.path.join(str(manager.directory), str(step), "rule")):
    return None
  return rule_from_json(_restore(manager, step, rule=ocp.args.JsonRestore()).rule)


def _manager(workdir: str, **options) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(**options))


def initial_best(params: Any) -> dict[str, Any]:
  """The kept-epoch record before any epoch qualifies; its structure is what checkpoints hold."""
  return {"params": params, "epoch": jnp.int32(-1), "score": jnp.full((2,), -1.0, jnp.float32)}


def model_from_config(config: ml_collections.ConfigDict) -> SharcsModel:
  """The model a config trains, without reading any weights."""
  m = config.model
  cfg = config_lib.backbone_config(config)
  return SharcsModel(cfg, num_classes=glue.get_task(config.task).num_classes,
                     widths=tuple(m.widths), router_layer=m.router_layer,
                     router_hidden=router_hidden_size(cfg, m.router_hidden))


def on_one_device(abstract: Any) -> Any:
  """Restore targets on this process's first device, whatever mesh wrote the checkpoint."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


@contextlib.contextmanager
def _latest(workdir: str) -> Iterator[tuple[ocp.CheckpointManager, int, ml_collections.ConfigDict]]:
  """(read-only manager, latest finished step, config) of the run in `workdir`; the manager is
  closed on every path, since one left open at exit races its threads' shutdown."""
  manager = _manager(workdir, create=False, read_only=True)
  try:
    step = manager.latest_step()
    if step is None:
      raise MissingFileError(f"{manager.directory} holds no checkpoint: train with "
                              f"--workdir={workdir} first")
    saved = _restore(manager, step, config=ocp.args.JsonRestore())
    yield manager, step, ml_collections.ConfigDict(saved.config)
  finally:
    manager.close()


def load_kept(workdir: str) -> tuple[ml_collections.ConfigDict, SharcsModel, Any, Rule]:
  """(config, model, kept parameters, kept routing rule) of the training run in `workdir`, read
  from its latest checkpoint once.

  A run stopped before any epoch could be kept (epochs < W are warm-up) has nothing to serve:
  that is an error saying how far it got, never the untrained parameters. The rule is the one
  kept with the checkpoint; checkpoints written before rules were kept fall back to report.json,
  and a run with a budget configured but neither is an error, never a silent switch to the
  router's argmax.
  """
  with _latest(workdir) as (manager, step, config):
    # The config's method does not settle it: the trade-off benchmark trains early-exit runs
    # from SHARCS configs, so the checkpoint's metadata (no arrays read) says.
    if config.model.get("method") == "early_exit" or holds_early_exit(workdir):
      raise CheckpointError(
          f"{workdir} holds an early-exit model, which this SHARCS path cannot load: load it "
          "with run.load_run (Engine.from_workdir, --mode=predict, --mode=serve, --mode=export)")
    model = model_from_config(config)
    abstract = on_one_device(jax.eval_shape(initial_best, param_shapes(model)))
    best = _restore(manager, step, best=ocp.args.StandardRestore(abstract)).best
    if int(best["epoch"]) < 0:
      raise CheckpointError(
          f"{workdir}: no epoch of this run can be served yet: {step} of {config.train.epochs} "
          f"epochs finished, and epochs before hardness.window={config.hardness.window} are never "
          "kept; resume training by re-running the command that started it with the same "
          f"--workdir={workdir}")
    logging.info("Loaded %s: epoch %d of the run (checkpoint %d)", workdir, int(best["epoch"]),
                 step)
    rule = _saved_rule(manager, step)
    if rule is None:
      rule = _reported_rule(workdir)
    if rule is None and config.routing.budget:
      raise CheckpointError(
          f"{workdir}: the run routes to budget {config.routing.budget} but neither its checkpoint "
          "nor report.json holds the calibrated rule; finish training (re-run its command) or pass "
          "--budget to calibrate one now")
    rule = rule or Rule()
    if rule.budget:
      logging.info("Routing as trained: %s", rule.to_json())
    return config, model, best["params"], rule


def _reported_rule(workdir: str) -> Rule | None:
  path = os.path.join(workdir, "report.json")
  if not os.path.isfile(path):
    return None
  with open(path) as f:
    return rule_from_json(json.load(f).get("sharcs", {}).get("routing") or {})


def load_kept_exit(workdir: str) -> tuple[ml_collections.ConfigDict, EarlyExitModel, Any]:
  """(config, model, kept parameters) of the early-exit run in `workdir`
  (`baselines.train_early_exit`), from its latest checkpoint: the epoch whose last exit was
  most accurate on dev."""
  with _latest(workdir) as (manager, step, config):
    best = _restore(manager, step, best=ocp.args.StandardRestore()).best
    if "logits" not in best:
      raise CheckpointError(f"{workdir}: not an early-exit run (its checkpoints hold a SHARCS "
                            "model)")
    if "params" not in best:
      raise CheckpointError(f"{workdir}: this early-exit run was trained before runs kept their "
                            "best epoch's parameters; train it again in a new workdir")
    if int(best["epoch"]) < 0:
      raise CheckpointError(f"{workdir}: no epoch of this early-exit run is kept yet ({step} of "
                            f"{config.train.epochs} finished); resume its training")
    model = EarlyExitModel(config_lib.backbone_config(config),
                           num_classes=glue.get_task(config.task).num_classes,
                           **config_lib.exit_model_options(config))
    logging.info("Loaded the early-exit run %s: epoch %d (checkpoint %d)", workdir,
                 int(best["epoch"]), step)
    return config, model, jax.device_get(best["params"])


def holds_early_exit(workdir: str) -> bool:
  """Whether `workdir` holds an early-exit run (its kept record has every exit's dev logits),
  read from the latest checkpoint's metadata without loading any array; False where there is
  no checkpoint (loading the run then says so)."""
  path = os.path.join(os.path.abspath(workdir), "checkpoints")
  if not os.path.isdir(path):
    return False
  manager = ocp.CheckpointManager(path, options=ocp.CheckpointManagerOptions(read_only=True),
                                  item_handlers={"best": ocp.StandardCheckpointHandler()})
  try:
    step = manager.latest_step()
    return step is not None and "logits" in manager.item_metadata(step)["best"]
  finally:
    manager.close()
