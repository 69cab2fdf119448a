"""Training end to end: smoke config, resume after an interruption, compiles, bad configs."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, assert_png, glue_data_dir, run_benchmark
from conftest import tiny_run_config as _tiny_config
from sharcs_jax import config as config_lib
from sharcs_jax.serve import predict, routing
from sharcs_jax.train import loop as train
from sharcs_jax import report as report_lib
from sharcs_jax.data import glue
from sharcs_jax.checkpoint import CheckpointError
from sharcs_jax.serve.engine import Engine

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
  np.testing.assert_allclose(shares, report["sharcs"]["share_per_width"])
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
  workdir, report = trained
  data, _ = run_benchmark("throughput", tmp_path, f"--workdir={workdir}", "--rounds=1",
                          "--limit=48", report="throughput", timeout=300)
  assert data["examples"] == 48
  assert set(data["paths"]) == {"SHARCS engine", "full width"}
  engine, full = data["paths"]["SHARCS engine"], data["paths"]["full width"]
  for path in (engine, full):
    assert path["examples_per_second"] == pytest.approx(48 / np.median(path["seconds"]))
  assert data["speedup"] == pytest.approx(engine["examples_per_second"] /
                                          full["examples_per_second"])
  # the same dev pairs the run reported on: both paths score them as training did
  assert engine["accuracy"] == pytest.approx(report["sharcs"]["accuracy"])
  assert full["accuracy"] == pytest.approx(report["full_width"]["accuracy"])
  assert data["flops_reduction"] == pytest.approx(report["sharcs"]["flops_reduction"], rel=1e-3)
  assert_png(tmp_path / "throughput.png")
  assert "examples/s" in (tmp_path / "throughput.md").read_text()


def test_throughput_benchmark_serves_a_cascade_at_bf16(trained, tmp_path):
  workdir, report = trained
  data, _ = run_benchmark("throughput", tmp_path, f"--workdir={workdir}", "--rounds=1",
                          "--limit=48", "--budget=1.2x", "--rule=cascade", "--precision=bf16",
                          report="throughput", timeout=300)
  assert data["precision"] == "bf16"
  assert (data["rule"]["rule"], data["rule"]["budget"]) == ("cascade", "1.2x")
  # FLOPs are counted on the float32 programs whatever the precision, so reductions compare
  assert data["paths"]["full width"]["gflops_per_example"] == pytest.approx(
      report["full_width"]["gflops"], rel=1e-3)
  assert set(data["cpu"]) >= {"model", "flags", "usable_cpus"}
  assert "bf16" in (tmp_path / "throughput.md").read_text()


def test_pareto_benchmark_meets_its_budgets(trained, tmp_path):
  workdir, report = trained
  assert report["sharcs"]["routing"]["budget"] == "1.1x"
  assert report["routing"]["calibration_examples"] == 32 and report["train_examples"] == 64
  data, _ = run_benchmark("pareto", tmp_path, f"--workdir={workdir}", "--rounds=1",
                          "--limit=48", "--budgets=1x,1.1x,max,9x", report="pareto_qqp",
                          timeout=300)
  met = {b["budget"]: b for b in data["budgets"]}
  assert met["1x"]["calibration_reduction"] == pytest.approx(1.0)
  assert 1.1 <= met["1.1x"]["calibration_reduction"] <= 1.1 * 1.05
  assert met["max"]["calibration_reduction"] == pytest.approx(data["reachable_reductions"][1])
  assert "out of reach" in met["9x"]["error"] and "error" not in met["1.1x"]
  assert met["1.1x"]["dev"]["flops_reduction"] > 1
  assert_png(tmp_path / "pareto_qqp.png")


def test_predict_mode_needs_a_trained_workdir(tmp_path):
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    predict.run(str(tmp_path), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))


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
  assert _without_time(again) == _without_time(trained[1])


@pytest.mark.slow
def test_one_compile_per_width_and_bucket(tiny_backbone, tmp_path, monkeypatch):
  traces = []
  original = train.train_step

  @functools.wraps(original)  # the same name, so the same XLA programs as other runs (cache hits)
  def counting_step(state, batch, *, widths, **kwargs):
    traces.append((widths, batch["input_ids"].shape))
    return original(state, batch, widths=widths, **kwargs)

  monkeypatch.setattr(train, "train_step", counting_step)
  config = _tiny_config(tiny_backbone)
  train.train_and_evaluate(config, str(tmp_path))
  assert len(traces) == len(set(traces)), traces
  assert {w for (w,), _ in traces} == set(config.model.widths)  # every width was trained


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


@pytest.mark.slow
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
  assert abs(sum(s["share_per_width"]) - 1) < 1e-6
  assert abs(s["flops_reduction"] - report["full_width"]["gflops"] / s["gflops"]) < 1e-9
  dev = glue.load_split("qqp", "dev", str(glue_data_dir()), limit=128)
  assert s["accuracy"] * len(dev) == pytest.approx(round(s["accuracy"] * len(dev)))  # of 128
  assert "f1" in s and report["dev_examples"] == len(dev) == 128
  assert_png(tmp_path / "report.png")
  assert "SHARCS" in (tmp_path / "report.md").read_text()


def test_two_runs_on_one_workdir(trained, tmp_path):
  """The second run exits at once naming the first's PID; the first finishes as a lone run."""
  workdir, lone = trained
  run = tmp_path / "run"
  first = subprocess.Popen(
      [sys.executable, "-c", "import sys\nfrom conftest import tiny_run_config\n"
       "from sharcs_jax.train import loop as train\n"
       "train.train_and_evaluate(tiny_run_config(sys.argv[1]), sys.argv[2])",
       lone["model"], str(run)],
      cwd=REPO_ROOT / "tests", stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
  try:
    lock, deadline = run / ".lock", time.monotonic() + 120
    while not (lock.exists() and lock.read_text().strip() == str(first.pid)):
      assert first.poll() is None, first.stderr.read()[-3000:]  # until the first holds the workdir
      assert time.monotonic() < deadline, "the first run never took the workdir's lock"
      time.sleep(0.2)
    start = time.monotonic()
    second = subprocess.run(
        [sys.executable, "-m", "sharcs_jax.main", "--config=configs/qqp.py:smoke",
         f"--workdir={run}", f"--config.data_dir={glue_data_dir()}"],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == 1, second.stderr[-3000:]
    assert f"is in use by process {first.pid}" in second.stderr.splitlines()[-1]
    assert "Traceback" not in second.stderr
    assert time.monotonic() - start < 30  # at once: only start-up, no training
    assert first.poll() is None  # the first is still training, untouched
    _, errors = first.communicate(timeout=600)
  finally:
    first.kill()
  assert first.returncode == 0, errors[-3000:]
  assert _without_time(json.loads((run / "report.json").read_text())) == _without_time(lone)


@pytest.mark.slow
def test_budget_out_of_reach_fails_before_training(tiny_backbone, tmp_path):
  for budget in ("9x", "0.0001gflops"):
    with pytest.raises(ValueError, match=rf"config.routing.budget='{budget}': budget .* is out "
                       r"of reach: this model reaches reductions from 1x to \d+\.\d+x"):
      train.train_and_evaluate(_tiny_config(tiny_backbone, routing__budget=budget), str(tmp_path))
  assert not (tmp_path / "checkpoints").exists()


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


def test_predict_never_overwrites_its_input(trained, tmp_path):
  workdir, _ = trained
  text = "question1\tquestion2\nHow do I learn JAX?\tWhat is JAX?\n"
  (tmp_path / "in.tsv").write_text(text)
  (tmp_path / "link.tsv").symlink_to(tmp_path / "in.tsv")
  for output in ("in.tsv", "link.tsv", "in.tsv/../in.tsv"):
    with pytest.raises(ValueError, match="would overwrite the input"):
      predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / output))
  assert (tmp_path / "in.tsv").read_text() == text


def test_predict_outputs_have_the_ordinary_mode(trained, tmp_path):
  workdir, _ = trained
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n")
  old = os.umask(0o022)
  try:
    predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))
  finally:
    os.umask(old)
  for name in ("out.jsonl", "out.jsonl.summary.json", "out.jsonl.summary.md"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
  assert (workdir / "report.json").stat().st_mode & 0o777 == 0o666 & ~report_lib.umask()


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.tsv", "id\tquestion1\tquestion2\n")])
def test_predict_on_no_inputs(trained, tmp_path, name, content):
  workdir, _ = trained
  (tmp_path / name).write_text(content)
  summary = predict.run(str(workdir), str(tmp_path / name), str(tmp_path / "out.jsonl"))
  assert summary["examples"] == 0
  assert (tmp_path / "out.jsonl").read_text() == ""
  saved = json.loads((tmp_path / "out.jsonl.summary.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"summary holds {c}"))
  assert saved["examples"] == 0 and set(saved["share_per_width"].values()) == {0.0}


def test_engine_on_no_inputs(trained):
  out = Engine.from_workdir(str(trained[0]), batch_buckets=(16,)).predict([])
  assert out.labels.shape == (0,) and out.probabilities.shape == (0, 2)
  assert out.widths.shape == out.gflops.shape == (0,)


def test_predict_skips_blank_tsv_lines(trained, tmp_path):
  workdir, _ = trained
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n\n   \nc\td\n")
  summary = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))
  assert summary["examples"] == 2
  assert [json.loads(x)["index"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [
      0, 1]


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", b"question1\tquestion2\na\tb\nca\xffe\td\n", r"bad.tsv:3: byte 0xff at column 3 "
     "is not UTF-8"),
    ("bad.jsonl", b'{"text": "a", "text_pair": "b"}\n{"text": "\xe9", "text_pair": "b"}\n',
     r"bad.jsonl:2: byte 0xe9 at column 11 is not UTF-8"),
])
def test_predict_names_a_non_utf8_line(trained, tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=message):
    predict.run(str(trained[0]), str(tmp_path / name), str(tmp_path / "out.jsonl"))


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


def test_only_closed_loop_callbacks_are_silenced():
  # the CLI's hook drops the abandoned checkpoint reads' "Event loop is closed" and nothing else
  import types

  from sharcs_jax.main import ignore_closed_loop_callbacks

  seen = []
  hook = ignore_closed_loop_callbacks(seen.append)
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed, and more"))
  value = types.SimpleNamespace(exc_value=ValueError("Event loop is closed"))
  for unraisable in (closed, other, value):
    hook(unraisable)
  assert seen == [other, value]
