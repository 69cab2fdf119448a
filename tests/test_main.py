"""The CLI entry point."""

from __future__ import annotations

import pytest


def test_only_closed_loop_callbacks_are_silenced():
  # the CLI's hook drops the abandoned checkpoint reads' "Event loop is closed" and nothing else
  import types

  from sharcs_jax.errors import ignore_closed_loop_callbacks

  seen = []
  hook = ignore_closed_loop_callbacks(seen.append)
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed, and more"))
  value = types.SimpleNamespace(exc_value=ValueError("Event loop is closed"))
  for unraisable in (closed, other, value):
    hook(unraisable)
  assert seen == [other, value]


@pytest.mark.parametrize("config, override, message", [
    ("qqp", "--config.train.learning_rate=-1",
     "FATAL config.train.learning_rate=-1.0 must be a number in (0, inf)"),
    ("mrpc", "--config.model.method=depth",
     "FATAL config.model.method='depth' is not one of ('sharcs', 'early_exit')"),
    ("mrpc", "--config.routing.calibration_draw=sentences",
     "FATAL config.routing.calibration_draw='sentences' holds out whole sentences of a one-text "
     "task; mrpc has 2 text fields"),
    ("sst2", "--config.routing.calibration_draw=phrases",
     "FATAL config.routing.calibration_draw='phrases' is not one of ('rows', 'sentences')"),
])
def test_a_bad_config_value_is_one_line_without_a_traceback(tmp_path, config, override, message):
  import pathlib
  import subprocess
  import sys

  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", f"--config=configs/{config}.py",
       f"--workdir={workdir}", override], capture_output=True, text=True, timeout=120,
      cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1] == message
  assert not workdir.exists()  # refused before anything was written


@pytest.mark.parametrize("arguments, message", [
    (["--config=configs/nope.py"], "FATAL --config=configs/nope.py: no such file"),
    (["--config=configs/qqp.py:smoke", "--config.model.backbone=/nope"],
     "FATAL model '/nope' is neither a local directory nor a packaged model"),
    (["--config=configs/qqp.py:smoke", "--config.data_dir=/nope"],
     "FATAL GLUE data directory '/nope' (from config.data_dir) does not exist"),
    (["--config=configs/qqp.py:smoke", "--config.routing.calibration_examples=256"],
     "FATAL config.routing.calibration_examples=256 holds out all of config.data.train_limit=256 "
     "training examples: nothing would train"),
    (["--mode=predict", "--input=/nope.tsv", "--output=out.jsonl"],
     "FATAL input file '/nope.tsv' does not exist"),
])
def test_a_missing_file_is_one_line_without_a_traceback(tmp_path, arguments, message):
  import pathlib
  import subprocess
  import sys

  workdir = tmp_path / "run"
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", f"--workdir={workdir}", *arguments],
      capture_output=True, text=True, timeout=120, cwd=pathlib.Path(__file__).resolve().parents[1])
  assert result.returncode == 1
  assert "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr
  assert not workdir.exists()  # refused before anything was written
