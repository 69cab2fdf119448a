"""Checkpoints of a training run (orbax), and loading a trained model back for serving.

Each epoch saves the train state (params, optimiser state, hardness state, data-order RNG, step),
the best epoch so far, the per-epoch dev history and the config, as one orbax step.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import orbax.checkpoint as ocp
from absl import logging

from sharcs_jax import config as config_lib
from sharcs_jax.data import glue
from sharcs_jax.flops import param_shapes
from sharcs_jax.model.sharcs import SharcsModel, default_router_hidden


def quiet_orbax_logging() -> None:
  """orbax logs every array it writes at INFO; keep a job's own progress readable."""
  logging.get_absl_handler().addFilter(lambda record: "/orbax/" not in record.pathname)


def _config_json(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json())


class Checkpoints:
  """orbax CheckpointManager holding the train state, the best epoch so far and the config."""

  def __init__(self, workdir: str, config: ml_collections.ConfigDict):
    self.config = _config_json(config)
    self.manager = _manager(workdir, max_to_keep=config.checkpoint.max_to_keep, create=True)

  def save(self, state: Any, best: dict[str, Any], history: list[dict]) -> None:
    self.manager.save(int(state.epoch), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), best=ocp.args.StandardSave(best),
        config=ocp.args.JsonSave(self.config), history=ocp.args.JsonSave(history)))
    self.manager.wait_until_finished()

  def restore_latest(self, state: Any, best: dict[str, Any]):
    """(state, best, per-epoch dev history) of the latest epoch, or None for a fresh workdir."""
    step = self.manager.latest_step()
    if step is None:
      return None
    saved = self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    if saved.config != self.config:
      changed = sorted(k for k in set(saved.config) | set(self.config)
                       if saved.config.get(k) != self.config.get(k))
      raise ValueError(f"{self.manager.directory} holds checkpoints of a different config "
                       f"(fields {changed} differ); use a new --workdir or the same config")
    abstract = functools.partial(jax.tree_util.tree_map, ocp.utils.to_shape_dtype_struct)
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract(state)),
        best=ocp.args.StandardRestore(abstract(best)), history=ocp.args.JsonRestore()))
    logging.info("Resumed from %s after epoch %d", self.manager.directory, step)
    return restored.state, restored.best, list(restored.history)


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
                     router_hidden=m.router_hidden or default_router_hidden(cfg))


def on_one_device(abstract: Any) -> Any:
  """Restore targets on this process's first device, whatever mesh wrote the checkpoint."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), abstract)


def load_trained(workdir: str) -> tuple[ml_collections.ConfigDict, SharcsModel, Any]:
  """(config, model, kept parameters) of the training run in `workdir`."""
  manager = _manager(workdir, create=False, read_only=True)
  step = manager.latest_step()
  if step is None:
    raise FileNotFoundError(f"{manager.directory} holds no checkpoint: train with "
                            f"--workdir={workdir} first")
  saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  config = ml_collections.ConfigDict(saved.config)
  model = model_from_config(config)
  abstract = on_one_device(jax.eval_shape(initial_best, param_shapes(model)))
  best = manager.restore(step, args=ocp.args.Composite(best=ocp.args.StandardRestore(abstract))).best
  logging.info("Loaded %s: epoch %d of the run (checkpoint %d)", workdir, int(best["epoch"]), step)
  return config, model, best["params"]
