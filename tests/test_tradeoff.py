"""The trade-off benchmark end to end on a tiny backbone: runs, points, reports, re-runs."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO_ROOT, TRADEOFF_ARGS, assert_png, glue_data_dir, run_tradeoff
from sharcs_jax.model import weights

pytestmark = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")


def test_tradeoff_benchmark(tradeoff):
  out, data = tradeoff
  methods = [(p["method"], p["setting"]) for p in data["points"]]
  assert ("sharcs", 0.6) in methods and ("static", 0.5) in methods and ("static", 1.0) in methods
  assert ("sharcs budget rule", "1.2x") in methods and ("sharcs K=1", 0.6) in methods
  assert ("sharcs K=1 budget rule", "1.2x") in methods and ("sharcs entropy", 0.6) in methods
  assert ("sharcs entropy budget rule", "1.2x") in methods
  assert ("sharcs cascade", "1.2x") in methods and ("sharcs K=1 cascade", "1.2x") in methods
  # The config trains with the sandwich and distillation; the paper's recipe is a method beside.
  assert ("sharcs paper recipe", 0.6) in methods
  assert ("sharcs paper recipe cascade", "1.2x") in methods
  paper = json.loads((out / "runs" / "sharcs_K2_t0.6_paper_recipe" / "report.json").read_text())
  ours = json.loads((out / "runs" / "sharcs_K2_t0.6" / "report.json").read_text())
  assert paper["recipe"] == {"sandwich": False, "distill": "none", "distill_weight": 0.5,
                             "distill_temperature": 1.0}
  assert ours["recipe"]["sandwich"] and ours["recipe"]["distill"] == "inplace"
  static = json.loads((out / "runs" / "static_w0.5" / "report.json").read_text())
  assert static["recipe"]["distill"] == "none"
  for exits in ("early exit (", "early exit mean-pool ("):  # thresholds + patiences, each run
    assert sum(m.startswith(exits) for m, _ in methods) == 10 + 2, exits
  mean_run = json.loads((out / "runs" / "early_exit_mean" / "early_exit.json").read_text())
  assert mean_run["exit_pooling"] == "mean"
  by = {(p["method"], p["setting"]): p for p in data["points"]}
  assert "out of reach" in by["sharcs budget rule", "9x"]["error"]
  assert by["static", 1.0]["flops_reduction"] == pytest.approx(1.0)
  assert by["static", 0.5]["flops_reduction"] > 1.2
  assert by["sharcs budget rule", "1.2x"]["calibration_reduction"] == pytest.approx(1.2, rel=0.05)
  assert 1.2 <= by["sharcs cascade", "1.2x"]["calibration_reduction"] <= 1.2 * 1.05
  assert "out of reach: this cascade reaches" in by["sharcs cascade", "9x"]["error"]
  entropy_run = json.loads((out / "runs" / "sharcs_entropy_K2_t0.6" / "report.json").read_text())
  assert entropy_run["hardness_signal"] == "entropy"
  assert_png(out / "tradeoff_qqp.png")
  table = (out / "tradeoff_qqp.md").read_text()
  for method in {p["method"] for p in data["points"]}:
    assert f"| {method} |" in table


def test_tradeoff_rerun_reads_finished_runs(tiny_backbone, tradeoff, tmp_path):
  out, data = tradeoff
  shutil.copytree(out / "runs", tmp_path / "runs")  # the shared output stays as it was
  # The sweep's own K = 2 model, given as a run trained elsewhere, is routed as it was.
  again, process = run_tradeoff(tiny_backbone, tmp_path, *TRADEOFF_ARGS,
                                "--only=static,early_exit,entropy",
                                f"--with_runs={tmp_path / 'runs' / 'sharcs_K2_t0.6'}")
  assert "finished earlier" in process.stderr and "trained and evaluated" not in process.stderr
  kept = [p for p in data["points"]
          if p["method"] == "static" or p.get("run") == "early_exit"
          or p["method"].startswith("sharcs entropy")]
  routed = [{**p, "method": f"{p['method']} (sharcs_K2_t0.6)"} for p in data["points"]
            if p["method"] in ("sharcs budget rule", "sharcs cascade")]
  assert len(routed) == 2 * len(TRADEOFF_ARGS[-1].split(","))
  assert again["points"] == kept + routed


def test_early_exit_alone_measures_against_a_run_from_elsewhere(tiny_backbone, tradeoff,
                                                                tmp_path):
  # No SHARCS or static run in the sweep: the --with_runs run's full width is the reference.
  out, data = tradeoff
  shutil.copytree(out / "runs", tmp_path / "runs")
  elsewhere = tmp_path / "runs" / "sharcs_K2_t0.6"
  again, process = run_tradeoff(tiny_backbone, tmp_path, *TRADEOFF_ARGS, "--only=early_exit",
                                f"--with_runs={elsewhere}")
  assert "trained and evaluated" not in process.stderr
  reference = json.loads((elsewhere / "report.json").read_text())["full_width"]["gflops"]
  assert again["full_width_gflops"] == reference
  exits = [p for p in again["points"] if p.get("run") == "early_exit"]
  assert exits and all(p["flops_reduction"] == pytest.approx(reference / p["gflops"])
                       for p in exits)


def test_runs_from_elsewhere_are_checked_before_training(trained, tmp_path):
  command = [sys.executable, "-m", "benchmarks.tradeoff", f"--out={tmp_path}",
             f"--config={REPO_ROOT / 'configs' / 'sst2.py'}"]
  result = subprocess.run(command + [f"--with_runs={tmp_path / 'nowhere'}"], capture_output=True,
                          text=True, timeout=300, cwd=REPO_ROOT)
  assert result.returncode != 0 and "nowhere holds no finished run" in result.stderr
  result = subprocess.run(command + [f"--with_runs={trained[0]}"], capture_output=True, text=True,
                          timeout=300, cwd=REPO_ROOT)
  assert result.returncode != 0
  assert "is a run of (task, backbone) ('qqp'," in result.stderr
  assert "this sweep's are ('sst2', 'all-MiniLM-L6-v2')" in result.stderr
  assert os.listdir(tmp_path) == []  # nothing trained or written


@pytest.mark.parametrize("override, message", [
    ("train.epoch=1", "--config.train.epoch: the config has no field 'epoch'. Did you mean "
     '"epochs"'),
    ("trainx.epochs=1", "--config.trainx.epochs: the config has no field 'trainx'"),
    ("train.epochs=three", "--config.train.epochs=three: invalid literal for int()")])
@pytest.mark.parametrize("program", ["benchmark", "main job"])
def test_bad_config_overrides_are_usage_errors(tmp_path, program, override, message):
  out = tmp_path / "out"
  command = (["-m", "benchmarks.tradeoff", f"--out={out}"]
             if program == "benchmark" else ["-m", "sharcs_jax.main", f"--workdir={out}"])
  command = [sys.executable, *command, f"--config={REPO_ROOT / 'configs' / 'qqp.py'}",
             f"--config.{override}"]
  result = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert result.returncode != 0
  assert message in result.stderr
  assert "Traceback" not in result.stderr
  assert not out.exists()  # nothing trained or written


def test_static_width_run_trains_only_its_slice(tiny_backbone, tradeoff):
  # The trade-off benchmark's static 0.5 run (no weight decay, no reordering).
  workdir = tradeoff[0] / "runs" / "static_w0.5"
  from sharcs_jax.run import load_run
  run = load_run(str(workdir))
  config, params = run.config, run.params
  assert config.train.static_width == 0.5 and config.train.weight_decay == 0.0
  assert not config.model.reorder
  summary = json.loads((workdir / "report.json").read_text())
  assert summary["static_width"] == 0.5
  _, start = weights.load_pretrained(
      tiny_backbone, num_classes=2, widths=tuple(config.model.widths),
      router_layer=config.model.router_layer, key=jax.random.fold_in(jax.random.PRNGKey(0), 1))
  ffn = np.asarray(params["layers_2"]["ffn_in"]["kernel"])  # adaptive layer: [32, 64]
  before = np.asarray(start["layers_2"]["ffn_in"]["kernel"])
  assert not np.allclose(ffn[:16, :32], before[:16, :32])  # width 0.5's slice trained
  np.testing.assert_array_equal(ffn[16:], before[16:])  # the rest never saw a gradient
  np.testing.assert_array_equal(ffn[:, 32:], before[:, 32:])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["router"], start["router"])
  # The kept epoch is the one where width 0.5 was most accurate.
  best = max(h["static"]["0.5"]["accuracy"] for h in summary["history"])
  assert summary["static"]["0.5"]["accuracy"] == best
