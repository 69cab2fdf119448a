"""Checkpoints: what a resume refuses and accepts, the kept rule, damage, older histories."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, needs_glue, without_time
from conftest import tiny_run_config as _tiny_config
from sharcs_jax.checkpoint import CheckpointError
from sharcs_jax.serve import routing
from sharcs_jax.serve.engine import Engine
from sharcs_jax.train import loop as train

pytestmark = needs_glue


def test_checkpoint_of_another_config_is_refused(tiny_backbone, trained, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  report = (workdir / "report.json").read_text()
  with pytest.raises(ValueError, match=r"different config \(train.epochs: 2 -> 3; "
                     r"train.learning_rate: 0.0001 -> 0.0002\)"):
    train.train_and_evaluate(_tiny_config(tiny_backbone, train__epochs=3,
                                          train__learning_rate=2e-4), str(workdir))
  assert (workdir / "report.json").read_text() == report  # nothing already written is touched


def test_display_only_settings_do_not_block_a_resume(tiny_backbone, trained, tmp_path):
  """A finished run re-run with the progress bar on resumes (to the same report), not refused."""
  workdir = tmp_path / "run"
  shutil.copytree(trained[0], workdir)
  again = train.train_and_evaluate(_tiny_config(tiny_backbone, train__progress_bar=True),
                                   str(workdir))
  assert without_time(again) == without_time(trained[1])


def test_served_rule_is_kept_with_the_checkpoint(trained, tmp_path):
  """Without report.json the engine still routes by the run's budget rule, never by argmax."""
  workdir, report = trained
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  (run / "report.json").unlink()
  rule = Engine.from_workdir(str(run), batch_buckets=(16,)).rule
  assert rule.budget == report["sharcs"]["routing"]["budget"] == "1.1x"
  assert rule.cost_weight == report["sharcs"]["routing"]["cost_weight"]
  # A cascade kept in the checkpoint (a run trained with routing.rule="cascade") serves as one.
  cascade = routing.Cascade(0.7, "margin", "1.1x", 1.12)
  (run / "checkpoints" / "2" / "rule" / "metadata").write_text(json.dumps(cascade.to_json()))
  assert Engine.from_workdir(str(run), batch_buckets=(16,)).rule == cascade
  # A checkpoint that holds no rule (written before rules were kept with it) and no report:
  # an error, not a silent switch to the router's argmax.
  shutil.rmtree(run / "checkpoints" / "2" / "rule")
  with pytest.raises(CheckpointError, match="routes to budget 1.1x but neither its checkpoint "
                     "nor report.json holds the calibrated rule"):
    Engine.from_workdir(str(run), batch_buckets=(16,))


def test_damaged_checkpoint_is_one_line(trained, tmp_path):
  workdir, _ = trained
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  data = max((run / "checkpoints" / "2" / "best").rglob("d/*"), key=lambda p: p.stat().st_size)
  with open(data, "r+b") as f:
    f.truncate(100)
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n")
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", "--mode=predict", f"--workdir={run}",
       f"--input={tmp_path / 'in.tsv'}", f"--output={tmp_path / 'out.jsonl'}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if not line[:1] in "IW"]  # absl logs
  assert errors == [errors[0]] and errors[0].startswith(
      f"FATAL {run / 'checkpoints' / '2'}: checkpoint step 2 is damaged or truncated"), errors
  assert re.search(r'reading "params\.[\w.]+/', errors[0])  # the array it could not read
  assert not (tmp_path / "out.jsonl").exists()


def test_settings_added_since_a_checkpoint_at_their_default_do_not_block_a_resume():
  from sharcs_jax.checkpoint import config_differences
  saved = {"train": {"epochs": 2}, "routing": {"budget": "2x"}}
  defaults = {"train": {"epochs": 5}, "routing": {"budget": "", "rule": "router"}}
  assert config_differences(saved, {"train": {"epochs": 2}, "routing": {
      "budget": "2x", "rule": "router"}}, defaults) == []
  assert config_differences(saved, {"train": {"epochs": 2}, "routing": {
      "budget": "2x", "rule": "cascade"}}, defaults) == ["routing.rule: '(absent)' -> 'cascade'"]
  assert config_differences(saved, {"train": {"epochs": 3}, "routing": {"budget": "2x"}},
                            defaults) == ["train.epochs: 2 -> 3"]


def test_history_of_earlier_versions_reads_in_todays_names():
  from sharcs_jax.checkpoint import _upgrade_epoch
  old = {"epoch": 0, "sharcs": {"accuracy": 0.8, "bucket_share": [0.7, 0.3]},
         "sharcs_argmax": {"bucket_share": [0.4, 0.6]}}
  assert _upgrade_epoch(old) == {"epoch": 0, "sharcs": {"accuracy": 0.8, "share_per_width": [0.7, 0.3]},
                                 "sharcs_argmax": {"share_per_width": [0.4, 0.6]}}
