"""Training end to end: smoke config, resume after an interruption, compiles, bad configs."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, glue_data_dir
from conftest import tiny_run_config as _tiny_config
from sharcs_jax import config as config_lib
from sharcs_jax import predict, train
from sharcs_jax.data import glue
from sharcs_jax.engine import Engine

pytestmark = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")


def _final_checkpoint(workdir):
  manager = ocp.CheckpointManager(f"{workdir}/checkpoints")
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored.state


def _without_time(report):
  return {k: v for k, v in report.items() if k != "train_seconds"}


def test_resumed_run_equals_uninterrupted(tiny_backbone, trained, tmp_path, monkeypatch):
  config = _tiny_config(tiny_backbone)
  straight_dir, straight = trained

  original_save = train.Checkpoints.save

  def save_then_crash(self, state, best, history):
    original_save(self, state, best, history)
    raise KeyboardInterrupt("simulated kill after the first epoch's checkpoint")

  monkeypatch.setattr(train.Checkpoints, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert _final_checkpoint(tmp_path / "resumed")[0] == 1
  monkeypatch.setattr(train.Checkpoints, "save", original_save)
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))

  assert _without_time(resumed) == _without_time(straight)
  step_a, state_a = _final_checkpoint(straight_dir)
  step_b, state_b = _final_checkpoint(tmp_path / "resumed")
  assert step_a == step_b == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a["params"], state_b["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a["hardness"], state_b["hardness"])
  assert state_a["step"] == state_b["step"]
  labels = np.asarray(state_a["hardness"]["labels"])
  assert labels.sum(1).min() >= 1  # every example has at least one admissible width


def test_engine_from_workdir_reproduces_the_report(trained):
  """The deployed engine, loaded from the checkpoint, scores dev as the training report did."""
  workdir, report = trained
  engine = Engine.from_workdir(str(workdir), batch_buckets=(1, 4))  # shapes no other test uses
  assert engine.programs.compiled > 0 and os.listdir(workdir / "executables")
  config = _tiny_config(report["model"])
  dev = glue.load_split("qqp", "dev", config.data_dir, limit=config.data.dev_limit)
  out = engine.predict(dev.texts)
  assert np.mean(out.labels == dev.labels) == pytest.approx(report["sharcs"]["accuracy"])
  assert out.gflops.mean() == pytest.approx(report["sharcs"]["gflops"], rel=1e-3)
  shares = [np.mean(out.widths == w) for w in report["widths"]]
  np.testing.assert_allclose(shares, report["sharcs"]["bucket_share"])
  again = Engine.from_workdir(str(workdir), batch_buckets=(1, 4))  # a restart: nothing compiles
  assert again.programs.compiled == 0


def test_predict_mode_on_tsv_and_jsonl(trained, tmp_path):
  workdir, report = trained
  dev_tsv = glue_data_dir() / "QQP" / "dev.tsv"
  lines = dev_tsv.read_text(encoding="utf-8").splitlines()[:49]  # header + the 48 dev rows
  (tmp_path / "in.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  summary = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))
  rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(rows) == summary["examples"] == 48
  assert summary["accuracy"] == pytest.approx(report["sharcs"]["accuracy"])
  assert {r["label"] for r in rows} <= {"not_duplicate", "duplicate"}
  assert summary["flops_reduction"] == pytest.approx(report["sharcs"]["flops_reduction"], rel=1e-3)
  assert (tmp_path / "out.jsonl.summary.md").exists()

  header = lines[0].split("\t")
  items = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
  with open(tmp_path / "in.jsonl", "w") as f:
    for item in items[:10]:
      f.write(json.dumps({"text": item["question1"], "text_pair": item["question2"]}) + "\n")
    f.write("\n")  # blank lines are allowed
  predict.run(str(workdir), str(tmp_path / "in.jsonl"), str(tmp_path / "out2.jsonl"))
  assert [json.loads(x) for x in (tmp_path / "out2.jsonl").read_text().splitlines()] == rows[:10]


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", "id\tquestion1\tquestion2\n1\tonly two\n", r"bad.tsv:2: 2 fields, expected 3"),
    ("bad.tsv", "id\tquestion\n1\tq\n", r"lacks the qqp text columns"),
    ("bad.jsonl", '{"question1": "a", "question2": "b"}\n{"question1": "a"}\n',
     r"bad.jsonl:2: qqp needs keys \['question1', 'question2'\]"),
    ("bad.jsonl", '{"text": "a", "text_pair": "b"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"text": "a", "text_pair": "b", "label": "maybe"}\n', r"label 'maybe'"),
    ("bad.csv", "a,b\n", r"unknown input format"),
])
def test_predict_mode_bad_inputs(trained, tmp_path, name, content, message):
  workdir, _ = trained
  (tmp_path / name).write_text(content)
  with pytest.raises(ValueError, match=message):
    predict.run(str(workdir), str(tmp_path / name), str(tmp_path / "out.jsonl"))
  assert not (tmp_path / "out.jsonl").exists()


def test_throughput_benchmark_writes_its_reports(trained, tmp_path):
  workdir, _ = trained
  result = subprocess.run(
      [sys.executable, "benchmarks/throughput.py", f"--workdir={workdir}", f"--out={tmp_path}",
       "--rounds=1", "--limit=48", f"--data_dir={glue_data_dir()}"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / "throughput.json").read_text())
  assert data["examples"] == 48 and data["speedup"] > 0
  assert set(data["paths"]) == {"SHARCS engine", "full width"}
  assert (tmp_path / "throughput.png").stat().st_size > 1000
  assert "examples/s" in (tmp_path / "throughput.md").read_text()


def test_pareto_benchmark_meets_its_budgets(trained, tmp_path):
  workdir, report = trained
  assert report["sharcs"]["routing"]["budget"] == "1.1x"
  assert report["routing"]["calibration_examples"] == 32 and report["train_examples"] == 64
  result = subprocess.run(
      [sys.executable, "benchmarks/pareto.py", f"--workdir={workdir}", f"--out={tmp_path}",
       "--rounds=1", "--limit=48", "--budgets=1x,1.1x,max,9x"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
      env={**os.environ, "SHARCS_DATA_DIR": str(glue_data_dir())})
  assert result.returncode == 0, result.stderr[-3000:]
  data = json.loads((tmp_path / "pareto_qqp.json").read_text())
  met = {b["budget"]: b for b in data["budgets"]}
  assert met["1x"]["calibration_reduction"] == pytest.approx(1.0)
  assert 1.1 <= met["1.1x"]["calibration_reduction"] <= 1.1 * 1.05
  assert met["max"]["calibration_reduction"] == pytest.approx(data["reachable_reductions"][1])
  assert "out of reach" in met["9x"]["error"] and "error" not in met["1.1x"]
  assert met["1.1x"]["dev"]["flops_reduction"] > 1 and met["1.1x"]["examples_per_second"] > 0
  assert (tmp_path / "pareto_qqp.png").stat().st_size > 1000


def test_predict_mode_needs_a_trained_workdir(tmp_path):
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    predict.run(str(tmp_path), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))


def test_checkpoint_of_another_config_is_refused(tiny_backbone, tmp_path):
  train.train_and_evaluate(_tiny_config(tiny_backbone, train__epochs=1), str(tmp_path))
  report = (tmp_path / "report.json").read_text()
  with pytest.raises(ValueError, match=r"different config \(fields \['train'\] differ\)"):
    train.train_and_evaluate(_tiny_config(tiny_backbone, train__epochs=2), str(tmp_path))
  assert (tmp_path / "report.json").read_text() == report  # nothing already written is touched


def test_one_compile_per_width_and_bucket(tiny_backbone, tmp_path, monkeypatch):
  traces = []
  original = train.train_step

  @functools.wraps(original)  # the same name, so the same XLA programs as other runs (cache hits)
  def counting_step(state, batch, *, width, **kwargs):
    traces.append((width, batch["input_ids"].shape))
    return original(state, batch, width=width, **kwargs)

  monkeypatch.setattr(train, "train_step", counting_step)
  config = _tiny_config(tiny_backbone)
  train.train_and_evaluate(config, str(tmp_path))
  assert len(traces) == len(set(traces)), traces
  assert {w for w, _ in traces} == set(config.model.widths)  # every width was trained


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


@pytest.mark.parametrize("field, value, message", [
    ("model__widths", (0.5, 0.25, 1.0), "strictly increasing"),
    ("hardness__ranges", ((0.7, 1.0), (0.4, 0.9), (0.0, 1.5)), "0 <= lo < hi <= 1"),
    ("hardness__ranges", ((0.7, 1.0), (-0.1, 0.9), (0.0, 0.5)), "0 <= lo < hi <= 1"),
    ("model__router_layer", 3, r"outside 1..2"),
    ("model__router_layer", 0, r"outside 1..2"),
])
def test_bad_config_fails_before_training(tiny_backbone, tmp_path, field, value, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(_tiny_config(tiny_backbone, **{field: value}), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


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


def test_smoke_config_end_to_end(tmp_path):
  """The real backbone on a few hundred QQP examples, through the command line."""
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", "--config=configs/qqp.py:smoke",
       f"--workdir={tmp_path}", f"--config.data_dir={glue_data_dir()}",
       "--config.train.progress_bar=False"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  report = json.loads((tmp_path / "report.json").read_text())
  for key in ("task", "model", "widths", "full_width", "static", "sharcs", "train_seconds"):
    assert key in report
  assert set(report["static"]) == {"0.25", "0.5", "1"}
  gflops = [report["static"][w]["gflops"] for w in ("0.25", "0.5", "1")]
  assert gflops[0] < gflops[1] < gflops[2] == report["full_width"]["gflops"]
  s = report["sharcs"]
  assert abs(sum(s["bucket_share"]) - 1) < 1e-6
  assert abs(s["flops_reduction"] - report["full_width"]["gflops"] / s["gflops"]) < 1e-9
  assert 0.0 <= s["accuracy"] <= 1.0 and "f1" in s
  assert (tmp_path / "report.png").stat().st_size > 1000
  assert "SHARCS" in (tmp_path / "report.md").read_text()
