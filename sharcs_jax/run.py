"""A trained run, loaded once from its workdir: what the engine, export, predict and every
benchmark start from, so that none of them reads checkpoints, tokenizers or splits its own way."""

from __future__ import annotations

import dataclasses
from typing import Any

import ml_collections

from sharcs_jax.data import batching, glue
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.model.weights import resolve_model_dir
from sharcs_jax.serve.routing import Cascade, Rule

SPLITS = ("train", "dev", "calibration")


@dataclasses.dataclass(frozen=True)
class Run:
  workdir: str
  config: ml_collections.ConfigDict  # as the checkpoint holds it
  model: SharcsModel | EarlyExitModel
  params: Any  # the kept epoch's
  rule: Rule | Cascade | None  # a SHARCS run's kept routing rule (Rule(): the router's argmax)
  task: glue.Task
  tokenizer: Any

  @property
  def length_buckets(self) -> tuple[int, ...]:
    return tuple(self.config.data.length_buckets)

  def splits(self, *names: str, limit: int = 0) -> tuple[glue.Split, ...]:
    """The named splits exactly as training read them (same limits and held-out rows), each cut
    to its first `limit` examples when > 0; the files are read once per call. "calibration" is
    the split routing budgets are fitted on."""
    unknown = [n for n in names if n not in SPLITS]
    if unknown:
      raise ValueError(f"unknown split(s) {unknown}; known: {SPLITS}")
    train, dev, calibration = glue.run_splits(self.config)
    if "calibration" in names and calibration is None:
      raise ValueError(f"{self.workdir}: the run holds no calibration split (config.routing."
                       "calibration_examples=0 and calibrate_on='train')")
    found = {"train": train, "dev": dev, "calibration": calibration}
    return tuple(glue.first(found[n], limit) for n in names)

  def encoded(self, *names: str, limit: int = 0) -> tuple[batching.Encoded, ...]:
    """The named splits tokenised into the run's length buckets."""
    return batching.encode_splits(self.splits(*names, limit=limit), self.tokenizer,
                                  self.length_buckets)


def load_run(workdir: str) -> Run:
  """The kept epoch of the run in `workdir`, whichever model it trained."""
  from sharcs_jax.checkpoint import holds_early_exit, load_kept, load_kept_exit  # orbax here only

  if holds_early_exit(workdir):
    config, model, params = load_kept_exit(workdir)
    rule = None
  else:
    config, model, params, rule = load_kept(workdir)
  return Run(workdir=workdir, config=config, model=model, params=params, rule=rule,
             task=glue.get_task(config.task),
             tokenizer=batching.load_tokenizer(resolve_model_dir(config.model.backbone)))
