"""Training end to end: smoke config, resume after an interruption, compiles, selection."""

from __future__ import annotations

import functools
import json
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import (REPO_ROOT, as_a_user_runs_it, assert_png, glue_data_dir, needs_glue,
                      without_time)
from conftest import tiny_run_config as _tiny_config
from sharcs_jax import config as config_lib
from sharcs_jax.train import loop as train
from sharcs_jax.data import glue
from sharcs_jax.checkpoint import CheckpointError
from sharcs_jax.serve.engine import Engine

pytestmark = needs_glue


def _final_checkpoint(workdir):
  manager = ocp.CheckpointManager(f"{workdir}/checkpoints")
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored.state


def test_resumed_run_equals_uninterrupted(tiny_backbone, trained, tmp_path, monkeypatch):
  config = _tiny_config(tiny_backbone)
  straight_dir, straight = trained

  original_save = train.Checkpoints.save

  def save_then_crash(self, *args):
    original_save(self, *args)
    raise KeyboardInterrupt("simulated kill after the first epoch's checkpoint")

  monkeypatch.setattr(train.Checkpoints, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert _final_checkpoint(tmp_path / "resumed")[0] == 1
  # Killed before any epoch >= W: nothing to serve, and loading says so instead of serving the
  # untrained parameters.
  with pytest.raises(CheckpointError, match=r"no epoch of this run can be served yet: 1 of 2 "
                     r"epochs finished, .*hardness.window=1"):
    Engine.from_workdir(str(tmp_path / "resumed"))
  monkeypatch.setattr(train.Checkpoints, "save", original_save)
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))

  assert without_time(resumed) == without_time(straight)
  step_a, state_a = _final_checkpoint(straight_dir)
  step_b, state_b = _final_checkpoint(tmp_path / "resumed")
  assert step_a == step_b == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a["params"], state_b["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a["hardness"], state_b["hardness"])
  assert state_a["step"] == state_b["step"]
  labels = np.asarray(state_a["hardness"]["labels"])
  assert labels.sum(1).min() >= 1  # every example has at least one admissible width


@pytest.mark.slow
def test_one_compile_per_width_and_bucket(tiny_backbone, tmp_path, monkeypatch):
  traces = []
  original = train.train_step

  @functools.wraps(original)  # the same name, so the same XLA programs as other runs (cache hits)
  def counting_step(state, batch, *, widths, **kwargs):
    traces.append((widths, batch["input_ids"].shape))
    return original(state, batch, widths=widths, **kwargs)

  monkeypatch.setattr(train, "train_step", counting_step)
  config = _tiny_config(tiny_backbone, data__length_buckets=(32, 64))
  train.train_and_evaluate(config, str(tmp_path))
  assert len(traces) == len(set(traces)), traces
  assert {w for (w,), _ in traces} == set(config.model.widths)  # every width was trained
  assert {shape[1] for _, shape in traces} == {32, 64}  # in both length buckets


def _result(full, sharcs, reduction):
  return {"full_width": {"accuracy": full},
          "sharcs": {"accuracy": sharcs, "flops_reduction": reduction}}


def test_selection_rules():
  early, late = _result(0.84, 0.835, 1.4), _result(0.82, 0.82, 2.6)
  # The paper's rule: accuracy. The budget rule: most reduction within 1 point of the best full
  # width so far, so a late epoch whose full width has itself decayed does not qualify.
  assert train.selection_score(early, "accuracy", 0.01, 0.84) > train.selection_score(
      late, "accuracy", 0.01, 0.84)
  assert train.selection_score(early, "reduction", 0.01, 0.84) > train.selection_score(
      late, "reduction", 0.01, 0.84)
  assert train.selection_score(late, "reduction", 0.03, 0.84) > train.selection_score(
      early, "reduction", 0.03, 0.84)
  with pytest.raises(ValueError, match="unknown selection rule 'loss'"):
    train.selection_score(early, "loss", 0.01, 0.84)


def test_learning_rate_warms_up_then_decays_to_zero():
  config = config_lib.load_config(str(REPO_ROOT / "configs" / "qqp.py"))
  t = config.train
  lr = [train.learning_rate(t, p) for p in np.linspace(0, 1, 101)]
  peak = int(np.argmax(lr))
  assert lr[0] == 0.0 and lr[-1] == 0.0
  assert lr[peak] == pytest.approx(t.learning_rate, rel=0.05)
  assert peak == pytest.approx(100 * t.warmup_fraction, abs=1)
  assert all(a <= b for a, b in zip(lr[:peak], lr[1:peak + 1]))
  assert all(a >= b for a, b in zip(lr[peak:], lr[peak + 1:]))


@pytest.mark.slow
def test_smoke_config_end_to_end(tmp_path):
  """The README's smoke run (the real backbone on a few hundred QQP examples), compiled as a
  user's is."""
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", "--config=configs/qqp.py:smoke",
       f"--workdir={tmp_path}", f"--config.data_dir={glue_data_dir()}",
       "--config.train.progress_bar=False"], env=as_a_user_runs_it(),
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)  # 142 s alone on 2 AVX2 cores
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  for key in ("task", "model", "widths", "full_width", "static", "sharcs", "train_seconds"):
    assert key in report
  assert set(report["static"]) == {"0.25", "0.5", "1"}
  gflops = [report["static"][w]["gflops"] for w in ("0.25", "0.5", "1")]
  assert gflops[0] < gflops[1] < gflops[2] == report["full_width"]["gflops"]
  s = report["sharcs"]
  assert abs(sum(s["share_per_width"]) - 1) < 1e-6
  assert abs(s["flops_reduction"] - report["full_width"]["gflops"] / s["gflops"]) < 1e-9
  dev = glue.load_split("qqp", "dev", str(glue_data_dir()), limit=128)
  assert s["accuracy"] * len(dev) == pytest.approx(round(s["accuracy"] * len(dev)))  # of 128
  assert "f1" in s and report["dev_examples"] == len(dev) == 128
  assert_png(tmp_path / "report.png")
  assert "SHARCS" in (tmp_path / "report.md").read_text()


