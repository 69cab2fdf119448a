"""Config files, validation before any work, and the main entry point end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT, needs_glue
from conftest import tiny_run_config as _tiny_config
from sharcs_jax import config as config_lib
from sharcs_jax.train import loop as train


def _load(spec: str):
  return config_lib.load_config(str(REPO_ROOT / "configs" / spec))


@pytest.mark.parametrize("task", ["qqp", "sst2", "mrpc", "rte", "mnli"])
def test_task_configs_are_valid(task):
  config = _load(f"{task}.py")
  assert config.task == task
  assert config_lib.validate(config).num_layers == 6


@pytest.mark.parametrize("field, value, message", [
    ("model.widths", (0.5, 0.25, 1.0), "strictly increasing"),
    ("model.widths", (0.25, 0.5), "last width must be 1.0"),
    ("model.widths", (0.0, 1.0), r"outside \(0, 1\]"),
    ("model.router_layer", 6, r"router_layer K=6 is outside 1..5"),
    ("model.router_layer", 0, r"router_layer K=0 is outside 1..5"),
    ("model.layernorm_init", "ones", "layernorm_init='ones'"),
    ("model.backbone", "/no/such/dir", "neither a local directory nor a packaged model"),
    ("data.length_buckets", (64, 32), "must be increasing"),
    ("data.length_buckets", (32, 1024), "exceeds the backbone's 512 positions"),
    ("routing.budget", "fast", "config.routing.budget: budget 'fast': expected a reduction"),
    ("routing.budget", "0x", "must be positive"),
    ("routing.calibrate_on", "test", "calibrate_on='test' is not one of"),
    ("routing.calibration_examples", 0, "set config.routing.calibration_examples > 0"),
    ("hardness.signal", "margin", "hardness.signal='margin' is not one of"),
    ("train.static_width", 0.5, r"static_width=0.5 is not one of config.model.widths=\(0.25, 1.0\)"),
    ("train.learning_rate", 0.0, r"config.train.learning_rate=0.0 must be a number in \(0, inf\)"),
    ("train.learning_rate", -1e-4, r"config.train.learning_rate=-0.0001 must be a number in"),
    ("train.learning_rate", float("nan"), r"config.train.learning_rate=nan must be a number in"),
    ("train.warmup_fraction", 1.0, r"config.train.warmup_fraction=1.0 must be a number in \[0, 1\)"),
    ("train.weight_decay", -0.01, r"config.train.weight_decay=-0.01 must be a number in \[0, inf\)"),
    ("train.router_loss_weight", -1.0, r"config.train.router_loss_weight=-1.0 must be a number"),
    ("train.epochs", 0, r"config.train.epochs=0 must be an integer in \[1, inf\)"),
    ("train.epochs", 2, r"config.train.epochs=2 must exceed config.hardness.window=2: epochs "
     "before the window are warm-up and never kept"),
    ("train.batch_size", 0, r"config.train.batch_size=0 must be an integer in \[1, inf\)"),
    ("train.static_width", -0.5, r"config.train.static_width=-0.5 must be a number in \[0, 1\]"),
    ("eval.batch_size", 0, r"config.eval.batch_size=0 must be an integer"),
    ("hardness.window", 0, r"config.hardness.window=0 must be an integer in \[1, inf\)"),
    ("seed", -1, r"config.seed=-1 must be an integer in \[0, inf\)"),
    ("model.router_hidden", -8, r"config.model.router_hidden=-8 must be an integer"),
    ("model.reorder_batches", 0, r"config.model.reorder_batches=0 must be an integer"),
    ("data.train_limit", -5, r"config.data.train_limit=-5 must be an integer in \[0, inf\)"),
    ("data.dev_limit", -1, r"config.data.dev_limit=-1 must be an integer"),
    ("routing.calibration_examples", -1, r"config.routing.calibration_examples=-1 must be an "
     "integer"),
    ("routing.budget", "0.5x", r"config.routing.budget='0.5x': a reduction below 1x would cost "
     "more than the full width"),
    ("checkpoint.max_to_keep", 0, r"config.checkpoint.max_to_keep=0 must be an integer in"),
    ("checkpoint.max_drop", 1.5, r"config.checkpoint.max_drop=1.5 must be a number in \[0, 1\]"),
    ("model.narrow_exits", (4,), r"config.model.narrow_exits=\(4,\): layers after router_layer=2 "
     r"and before the last \(6\), with a narrow width in exit_widths"),
])
def test_bad_config_fails_before_work(field, value, message):
  config = _load("qqp.py")
  if "." in field:
    section, key = field.split(".")
    config[section][key] = value
  else:
    config[field] = value
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    config_lib.validate(config)


def test_unknown_config_argument():
  with pytest.raises(ValueError, match="unknown config argument 'tiny'; known: smoke"):
    _load("qqp.py:tiny")


@pytest.mark.slow
def test_summary_mode(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", "--mode=summary", "--config=configs/qqp.py:smoke",
       f"--workdir={tmp_path}", "--config.model.widths=(0.25, 1.0)",
       "--config.hardness.ranges=((0.5, 1.0), (0.0, 0.5))"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  summary = json.loads((tmp_path / "model_summary.json").read_text())
  rows = summary["flops_per_example"]
  assert [(r["seq_len"], r["width"]) for r in rows] == [(32, 0.25), (32, 1.0), (64, 0.25), (64, 1.0)]
  assert all(r["reduction"] > 2.0 for r in rows if r["width"] == 0.25)
  assert "| 64 | 0.25 |" in (tmp_path / "model_summary.md").read_text()


def test_every_numeric_field_of_the_base_config_has_a_range():
  """A numeric field added to base_config without a range in NUMERIC_FIELDS fails here."""
  config = config_lib.base_config("qqp")
  numeric = {f"{section}.{key}" if section else key
             for section, values in [("", config)] + [(k, v) for k, v in config.items()
                                                      if hasattr(v, "items")]
             for key, value in values.items()
             if isinstance(value, (int, float)) and not isinstance(value, bool)}
  assert numeric == {field for field, _, _ in config_lib.NUMERIC_FIELDS} | {"model.router_layer"}


@pytest.mark.parametrize("field, value, message", [
    ("model__widths", (0.5, 0.25, 1.0), "strictly increasing"),
    ("hardness__ranges", ((0.7, 1.0), (0.4, 0.9), (0.0, 1.5)), "0 <= lo < hi <= 1"),
    ("hardness__ranges", ((0.7, 1.0), (-0.1, 0.9), (0.0, 0.5)), "0 <= lo < hi <= 1"),
    ("model__router_layer", 3, r"outside 1..2"),
    ("model__router_layer", 0, r"outside 1..2"),
])
@needs_glue
def test_bad_config_fails_before_training(tiny_backbone, tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_tiny_config(tiny_backbone, **{field: value}), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@needs_glue
def test_unknown_task_and_missing_data_dir(tiny_backbone, tmp_path):
  config = _tiny_config(tiny_backbone)
  config.task = "cola"
  with pytest.raises(ValueError, match="unknown task 'cola'"):
    train.train_and_evaluate(config, str(tmp_path))
  config = _tiny_config(tiny_backbone)
  config.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
    train.train_and_evaluate(config, str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


@needs_glue
@pytest.mark.slow
def test_budget_out_of_reach_fails_before_training(tiny_backbone, tmp_path):
  for budget in ("9x", "0.0001gflops"):
    with pytest.raises(ValueError, match=rf"config.routing.budget='{budget}': budget .* is out "
                       r"of reach: this model reaches reductions from 1x to \d+\.\d+x"):
      train.train_and_evaluate(_tiny_config(tiny_backbone, routing__budget=budget), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()
