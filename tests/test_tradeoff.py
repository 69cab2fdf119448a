"""The trade-off benchmark end to end on a tiny backbone: runs, points, reports, re-runs."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, glue_data_dir

pytestmark = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")


def _tradeoff(backbone, out, *extra):
  overrides = [f"model.backbone={backbone}", "model.widths=[0.5, 1.0]",
               "hardness.ranges=[[0.6, 1.0], [0.0, 0.6]]", "data.train_limit=96",
               "data.dev_limit=48", "train.batch_size=16", "eval.batch_size=16",
               "routing.calibration_examples=32", "model.reorder_batches=1"]
  command = [sys.executable, str(REPO_ROOT / "benchmarks" / "tradeoff.py"),
             f"--config={REPO_ROOT / 'configs' / 'qqp.py'}:smoke", f"--out={out}",
             "--thresholds=0.6", "--budgets=1.2x,9x", *extra,
             *(f"--set={o}" for o in overrides)]
  result = subprocess.run(command, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((out / "tradeoff_qqp.json").read_text()), result


ARGS = ("--only=sharcs,router_layer,static,early_exit", "--router_layers=1")


def test_tradeoff_benchmark(tiny_backbone, tmp_path):
  data, first = _tradeoff(tiny_backbone, tmp_path, *ARGS)
  methods = [(p["method"], p["setting"]) for p in data["points"]]
  assert ("sharcs", 0.6) in methods and ("static", 0.5) in methods and ("static", 1.0) in methods
  assert ("sharcs budget rule", "1.2x") in methods and ("sharcs K=1", 0.6) in methods
  assert ("sharcs K=1 budget rule", "1.2x") in methods
  assert sum(m.startswith("early exit") for m, _ in methods) == 10 + 2  # thresholds + patiences
  by = {(p["method"], p["setting"]): p for p in data["points"]}
  assert "out of reach" in by["sharcs budget rule", "9x"]["error"]
  assert by["static", 1.0]["flops_reduction"] == pytest.approx(1.0)
  assert by["static", 0.5]["flops_reduction"] > 1.2
  assert by["sharcs budget rule", "1.2x"]["calibration_reduction"] == pytest.approx(1.2, rel=0.05)
  for name in ("tradeoff_qqp.md", "tradeoff_qqp.png"):
    assert (tmp_path / name).stat().st_size > 0
  # Re-running reads the finished runs instead of training them again.
  again, second = _tradeoff(tiny_backbone, tmp_path, *ARGS)
  assert again == data
  assert "finished earlier" in second.stderr


def test_tradeoff_rejects_bad_overrides(tmp_path):
  command = [sys.executable, str(REPO_ROOT / "benchmarks" / "tradeoff.py"),
             f"--config={REPO_ROOT / 'configs' / 'qqp.py'}", f"--out={tmp_path}",
             "--set=train.no_such_field=1"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300)
  assert result.returncode != 0
  assert "config has no field train.no_such_field" in result.stderr
