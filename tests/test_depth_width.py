"""The depth-and-width model: an early-exit model whose later layers may also run narrow. Its
stages equal the model, rows take the path the rule gives and pay for the stages they ran (a
skipped narrow stage costs nothing), calibration meets a budget, nothing compiles while serving."""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest

from sharcs_jax.model import EarlyExitModel
from sharcs_jax.serve import dispatch
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.routing import STOP, ExitCascade, calibrate_depth_width, parse_budget
from conftest import assert_report_gflops_are_the_engines, needs_glue, tiny_run_config
from test_engine import CompileCounter, _inputs
from test_exit_engine import _run_with


@pytest.fixture(scope="module")
def joint_engine(tiny_config):
  model = EarlyExitModel(tiny_config, num_classes=3, pooling="mean", widths=(0.5, 1.0),
                         width_layer=2)
  data = _inputs()
  params = model.init(jax.random.key(1), data.input_ids[:2], data.input_ids[:2] > 0)["params"]
  return Engine(model, params, length_buckets=(8, 16), exit_layers=(2, 3),
                    batch_buckets=(1, 8))


def _model_stages(engine, data):
  """softmax of the model's exits in stage order [S, N, C], every row in one batch padded to 16
  tokens (masked): exit 2, the narrow width's last exit, exits 3 and 4."""
  ids = data.input_ids
  mask = (np.arange(ids.shape[1])[None] < data.lengths[:, None]).astype(np.int32)
  full, narrow = engine.model.apply(engine.variables, ids, mask, np.zeros_like(ids),
                                    method=EarlyExitModel.with_narrow)
  return np.asarray(jax.nn.softmax(np.stack([full[1], narrow[0], full[2], full[3]]), axis=-1))


def test_layout_puts_the_narrow_stage_after_layer_k(joint_engine):
  assert joint_engine.exit_layers == (2, 4, 3, 4)
  assert joint_engine.stage_widths == (1.0, 0.5, 1.0, 1.0)
  assert [s.reads for s in joint_engine.stages] == [dispatch.TOKENS, 0, 0, 2]
  assert joint_engine.narrow_first == 1
  # the narrow stage costs less than the full-width layers it stands for
  assert (joint_engine.stage_flops[1] < joint_engine.stage_flops[2:].sum(0)).all()


def test_every_stage_equals_the_model(joint_engine):
  data = _inputs()
  np.testing.assert_allclose(joint_engine.every_stage(data), _model_stages(joint_engine, data),
                             atol=2e-6)


def test_rows_take_the_rules_path_in_row_order_and_pay_for_what_they_ran(joint_engine):
  data = _inputs(n=40, seed=4)
  every = joint_engine.every_stage(data)
  depth = float(np.median(every[0].max(-1)))
  unsure = every[0].max(-1) < depth
  narrow = float(np.median(every[1, unsure].max(-1)))
  rule = ExitCascade(depth, 4, "max_prob", narrow_first=1, narrow_count=1,
                     narrow_threshold=narrow)
  out = _run_with(joint_engine, rule, data)
  final, ran = rule.paths(every)
  assert len(set(final.tolist())) >= 3  # rows leave at layer 2, narrow, and later
  assert (ran[:, 1] == (final != 0)).all()  # the unsure at layer 2 try the narrow width
  assert (ran[:, 2] == (final >= 2)).all()  # only rows unsure at the narrow width go on
  np.testing.assert_array_equal(out.exit_layers, np.array([2, 4, 3, 4])[final])
  np.testing.assert_allclose(out.probabilities, every[final, np.arange(40)], atol=1e-6)
  cost = joint_engine.stage_flops[:, data.bucket_of].T
  np.testing.assert_allclose(out.gflops, (cost * ran).sum(-1) / 1e9)
  skip = ExitCascade(depth, 4, "max_prob", narrow_first=1, narrow_count=1)
  final, ran = skip.paths(every)
  assert not ran[:, 1].any()  # narrow skipped: nobody pays for it
  out = _run_with(joint_engine, skip, data)
  np.testing.assert_array_equal(out.exit_layers, np.array([2, 4, 3, 4])[final])
  np.testing.assert_allclose(out.gflops, (cost * ran).sum(-1) / 1e9)


def test_without_a_rule_every_row_runs_the_full_depth_only(joint_engine):
  data = _inputs(n=12, seed=2)
  out = joint_engine.run(data)
  assert (out.exit_layers == 4).all()
  np.testing.assert_allclose(out.gflops, joint_engine.full_gflops(data))


def test_calibration_meets_the_budget_and_picks_the_most_accurate_pair(joint_engine):
  data = _inputs(n=60, seed=5)
  rule = joint_engine.calibrate("1.3x", data, signal="max_prob")
  assert rule.calibration_reduction >= 1.3 * (1 - 1e-9)  # met (a random model's steps are coarse)
  assert rule.narrow_count == 1 and rule.narrow_first == 1
  out = _run_with(joint_engine, rule, data)
  assert joint_engine.full_gflops(data).mean() / out.gflops.mean() == pytest.approx(
      rule.calibration_reduction)


def test_joint_calibration_on_hand_made_probabilities():
  """Three stages: an early exit, a narrow stage, the full depth. The narrow stage is always
  right, the early exit on 60% of rows, whatever its confidence: the search uses the narrow
  stage, and every candidate meets the budget within 5%."""
  rng = np.random.default_rng(0)
  n = 400
  labels = rng.integers(0, 2, n)
  sure = lambda right, p: np.where(right[:, None], np.eye(2)[labels] * p + (1 - p) / 2,
                                   np.eye(2)[1 - labels] * p + (1 - p) / 2)
  early = sure(rng.random(n) < 0.6, rng.uniform(0.0, 1.0, n)[:, None])
  narrow = sure(np.ones(n, bool), rng.uniform(0.0, 1.0, n)[:, None])
  full = sure(np.ones(n, bool), np.full((n, 1), 0.9))
  probabilities = np.stack([early, narrow, full])
  costs = np.tile([1.0, 0.5, 3.0], (n, 1))  # full depth: 4.0
  rule, tried = calibrate_depth_width(probabilities, costs, labels, parse_budget("2x"), 1, 1,
                                      "max_prob", narrow_thresholds=(None, 0.6, 0.8))
  assert [t["narrow_threshold"] for t in tried] == [None, 0.6, 0.8]
  for t in tried:
    assert t["reduction"] == pytest.approx(2.0, rel=0.05)
  assert rule.narrow_threshold is not None
  assert max(t["accuracy"] for t in tried) == next(
      t["accuracy"] for t in tried if t["narrow_threshold"] == rule.narrow_threshold)
  assert next(t for t in tried if t["narrow_threshold"] is None)["accuracy"] < max(
      t["accuracy"] for t in tried)


def test_a_rule_never_sends_rows_backwards():
  rule = ExitCascade(0.9, 4, "max_prob", narrow_first=1, narrow_count=1, narrow_threshold=0.7)
  unsure = np.full((3, 2), 0.5)
  assert rule.next_stages(0, np.arange(3), (unsure,)).tolist() == [1, 1, 1]
  assert rule.next_stages(1, np.arange(3), (unsure,)).tolist() == [2, 2, 2]
  assert rule.next_stages(3, np.arange(3), (unsure,)).tolist() == [STOP] * 3
  skip = ExitCascade(0.9, 4, "max_prob", narrow_first=1, narrow_count=1)
  assert skip.next_stages(0, np.arange(3), (unsure,)).tolist() == [2, 2, 2]
  assert ExitCascade.__dataclass_fields__["narrow_threshold"].default is None
  assert rule == type(rule)(**{**rule.__dict__})
  from sharcs_jax.serve.routing import rule_from_json
  assert rule_from_json(rule.to_json()) == rule and rule_from_json(skip.to_json()) == skip


def test_serving_never_compiles(joint_engine, narrow_exit_engine):
  for engine in (joint_engine, narrow_exit_engine):
    engine.run(_inputs(n=5, seed=2))
    compiled = engine.programs.compiled
    every = engine.layout_rule(0.5, 0.5, signal="max_prob")
    with CompileCounter() as counter:
      _run_with(engine, every, _inputs(n=40, seed=3))
      engine.every_stage(_inputs(n=9, seed=6))
    assert counter.events == [] and engine.programs.compiled == compiled
    routed = engine.with_rule(every)  # a budget's engine shares the compiled programs
    assert routed.programs is engine.programs and routed.rule == every and engine.rule != every
  with pytest.raises(ValueError, match="the rule has 3 stages"):
    joint_engine.with_rule(ExitCascade(0.5, 3))


@pytest.fixture(scope="module")
def narrow_exit_engine(tiny_config):
  """Depth exits inside the narrow part: layers 3 and 4 at width 0.5 answer after layer 3 too."""
  model = EarlyExitModel(tiny_config, num_classes=3, pooling="mean", widths=(0.5, 1.0),
                         width_layer=2, narrow_exits=(3,))
  data = _inputs()
  params = model.init(jax.random.key(2), data.input_ids[:2], data.input_ids[:2] > 0)["params"]
  return Engine(model, params, length_buckets=(8, 16), exit_layers=(2, 3),
                    batch_buckets=(1, 8))


def test_narrow_exits_chain_inside_the_narrow_part(narrow_exit_engine):
  engine = narrow_exit_engine
  assert engine.model.narrow_spans == ((2, 2), (3, 3))
  assert engine.exit_layers == (2, 3, 4, 3, 4)
  assert engine.stage_widths == (1.0, 0.5, 0.5, 1.0, 1.0)
  # the second narrow stage reads the first; full width goes on from layer 2's hidden states
  assert [s.reads for s in engine.stages] == [dispatch.TOKENS, 0, 1, 0, 3]
  assert (engine.narrow_first, engine.narrow_count) == (1, 2)
  # a report lists the full-width exits (layers 2, 3, 4), then the narrow ones (3, 4)
  assert engine.layout.exit_order().tolist() == [0, 3, 4, 1, 2]
  assert (engine.stage_flops[1] < engine.stage_flops[3]).all()  # half a layer < a layer
  data = _inputs()
  ids = data.input_ids
  mask = (np.arange(ids.shape[1])[None] < data.lengths[:, None]).astype(np.int32)
  full, narrow = engine.model.apply(engine.variables, ids, mask, np.zeros_like(ids),
                                    method=EarlyExitModel.with_narrow)
  assert narrow.shape[0] == 2
  expected = jax.nn.softmax(np.stack([full[1], narrow[0], narrow[1], full[2], full[3]]), axis=-1)
  np.testing.assert_allclose(engine.every_stage(data), expected, atol=2e-6)
  with pytest.raises(ValueError, match="narrow exits"):
    EarlyExitModel(engine.model.encoder, num_classes=3, widths=(0.5, 1.0), width_layer=2,
                   narrow_exits=(2,)).init(jax.random.key(0), ids[:1], mask[:1])


def test_onnxruntime_narrow_stages_equal_the_xla_stages(narrow_exit_engine, tmp_path):
  """The same five stages on ONNX Runtime fp32 (the narrow ones converted from the same
  `narrow_stage`, the second reading the first's d_w-wide states): every stage within 1e-4 of
  XLA's, the same FLOPs and routes, and no session built while serving."""
  pytest.importorskip("onnxruntime")
  xla = narrow_exit_engine
  onnx = Engine(xla.model, xla.variables["params"], length_buckets=(8, 16),
                    exit_layers=(2, 3), batch_buckets=(1, 8), runtime="onnxruntime",
                    precision="fp32", cache_dir=str(tmp_path))
  assert (onnx.exit_layers, onnx.stage_widths) == (xla.exit_layers, xla.stage_widths)
  assert sorted(os.listdir(onnx.onnx.directory)) == [
      "narrow_0.5_l2-2.onnx", "narrow_0.5_l3-3.onnx", "stage_l0-1.onnx", "stage_l2-2.onnx",
      "stage_l3-3.onnx"]
  data = _inputs(n=30, seed=7)
  every = xla.every_stage(data)
  np.testing.assert_allclose(onnx.every_stage(data), every, atol=1e-4)
  np.testing.assert_allclose(onnx.stage_flops, xla.stage_flops)
  built = onnx.runner.sessions_built
  rule = xla.layout_rule(float(np.median(every[0].max(-1))),
                         float(np.median(every[1:3].max(-1))), signal="max_prob")
  on_ort, on_xla = _run_with(onnx, rule, data), _run_with(xla, rule, data)
  np.testing.assert_array_equal(on_ort.exit_layers, on_xla.exit_layers)
  np.testing.assert_array_equal(on_ort.widths, on_xla.widths)
  np.testing.assert_allclose(on_ort.gflops, on_xla.gflops)
  assert onnx.runner.sessions_built == built == 5


def test_rows_try_the_narrow_exits_in_turn_then_go_on_at_full_width(narrow_exit_engine):
  engine = narrow_exit_engine
  data = _inputs(n=40, seed=4)
  every = engine.every_stage(data)
  depth = float(np.median(every[0].max(-1)))
  narrow = float(np.median(every[1:3].max(-1)))
  rule = engine.layout_rule(depth, narrow, signal="max_prob")
  out = _run_with(engine, rule, data)
  final, ran = rule.paths(every)
  assert {1, 2} <= set(final.tolist())  # rows leave at both narrow exits
  assert (ran[:, 1] == (final != 0)).all()  # the unsure at layer 2 try the first narrow exit
  assert (ran[:, 2] == (final >= 2)).all()  # the unsure there the second
  assert (ran[:, 3] == (final >= 3)).all()  # only the unsure at both go on at full width
  np.testing.assert_array_equal(out.exit_layers, np.array(engine.exit_layers)[final])
  np.testing.assert_allclose(out.widths, np.array(engine.stage_widths)[final])
  np.testing.assert_allclose(out.probabilities, every[final, np.arange(40)], atol=1e-6)
  cost = engine.stage_flops[:, data.bucket_of].T
  np.testing.assert_allclose(out.gflops, (cost * ran).sum(-1) / 1e9)
  calibrated = engine.calibrate("1.3x", data, signal="max_prob")
  assert calibrated.narrow_count == 2 and calibrated.calibration_reduction >= 1.3 * (1 - 1e-9)



@pytest.fixture(scope="module")
def depth_width_run(tiny_backbone, tmp_path_factory):
  """(workdir, summary, config) of a tiny depth-and-width run: exits after every layer of the
  3-layer backbone, and layers 2-3 also at width 0.5, answering after each; two length buckets."""
  from sharcs_jax.baselines.train_early_exit import train_early_exit

  config = tiny_run_config(tiny_backbone, model__method="early_exit",
                           model__exit_widths=(0.5, 1.0), model__router_layer=1,
                           model__exit_pooling="mean", model__narrow_exits=(2,),
                           routing__budget="1.3x", data__length_buckets=(32, 64))
  workdir = tmp_path_factory.mktemp("depth_width")
  return workdir, train_early_exit(config, str(workdir)), config


@pytest.mark.slow
@needs_glue
def test_the_main_job_reports_what_the_engine_serves(depth_width_run):
  """The kept model's stages give the run's per-exit and narrow accuracies on dev; the `served`
  row is the engine's joint calibration at the config's budget, and at its two thresholds the
  engine gives its dev accuracy, exit layers and reduction."""
  from sharcs_jax.data import batching, glue
  from sharcs_jax.serve.engine import Engine
  from sharcs_jax.serve.routing import ExitCascade

  workdir, summary, config = depth_width_run
  assert summary["widths"] == [0.5, 1.0]
  assert [(n["width"], n["exit_layer"]) for n in summary["narrow"]] == [(0.5, 2), (0.5, 3)]
  assert summary["narrow"][0]["gflops"] < summary["narrow"][1]["gflops"]
  served = summary["served"]
  calibrated = Engine.from_workdir(str(workdir), budget="1.3x",
                                       signal=config.routing.signal)
  assert calibrated.exit_layers == (1, 2, 3, 2, 3)
  assert calibrated.rule.calibration_reduction == pytest.approx(served["calibration_reduction"],
                                                                rel=0.02)
  assert calibrated.rule.narrow_threshold == served["narrow_threshold"]
  assert [t["narrow_threshold"] for t in served["search"]][0] is None
  (dev,) = batching.encode_splits([glue.run_splits(config)[1]], calibrated.tokenizer,
                                  calibrated.length_buckets)
  every = calibrated.every_stage(dev)
  accuracy = [float((p.argmax(-1) == dev.labels).mean()) for p in every]
  np.testing.assert_allclose(accuracy, [summary["per_exit"][0]["accuracy"],
                                        summary["narrow"][0]["accuracy"],
                                        summary["narrow"][1]["accuracy"],
                                        summary["per_exit"][1]["accuracy"],
                                        summary["per_exit"][2]["accuracy"]])
  engine = Engine.from_workdir(str(workdir), rule=ExitCascade(
      served["threshold"], 5, served["signal"], narrow_first=1, narrow_count=2,
      narrow_threshold=served["narrow_threshold"]))
  out = engine.run(dev)
  assert served["accuracy"] == pytest.approx(float((out.labels == dev.labels).mean()))
  assert served["mean_exit_layer"] == pytest.approx(float(out.exit_layers.mean()))
  assert served["dev_reduction"] == pytest.approx(
      engine.full_gflops(dev).mean() / out.gflops.mean(), rel=0.02)
  # served through predict's path too: texts in, the same labels
  texts = list(glue.run_splits(config)[1].texts[:6])
  np.testing.assert_array_equal(engine.predict(texts).labels, out.labels[:6])


@pytest.mark.slow
@needs_glue
def test_the_reports_gflops_are_what_the_engine_counts(depth_width_run):
  """One FLOPs table: every exit's GFLOPs (full-width and narrow) and the served row's in the
  report are what the served engine counts for the same dev rows."""
  workdir, summary, config = depth_width_run
  assert_report_gflops_are_the_engines(workdir, summary, config)


@pytest.mark.slow
@needs_glue
def test_serving_budgets_and_predict_serve_a_depth_and_width_run(depth_width_run, tmp_path):
  """The serving benchmark's budget sweep serves the joint cascade beside its full-width exits
  alone at the same budget; predict writes each row's exit and width, and a narrow export is
  refused."""
  import json

  from conftest import glue_data_dir, run_benchmark
  from sharcs_jax.serve import predict
  from sharcs_jax.serve.export import hf as hf_export
  from sharcs_jax.serve.engine import Engine
  from sharcs_jax.serve.export.writer import export_engine

  workdir, summary, _ = depth_width_run
  data, _ = run_benchmark("serving", tmp_path, "--mode=budgets", f"--workdir={workdir}",
                          "--rounds=1", "--budgets=1.3x", report="pareto_qqp_exit", timeout=600)
  assert data["exit_layers"] == [1, 2, 3, 2, 3]
  assert data["stage_widths"] == [1.0, 0.5, 0.5, 1.0, 1.0]
  joint, depth = data["paths"]["1.3x"], data["paths"]["1.3x, depth only"]
  assert depth["narrow_share"] == 0.0 and depth["rule"]["narrow_threshold"] is None
  assert joint["rule"]["narrow_count"] == 2
  assert joint["narrow_share"] > 0.0 or joint["rule"]["narrow_threshold"] is None
  for path in (joint, depth):
    assert path["calibration_reduction"] >= 1.3 * (1 - 1e-9)
  full = data["paths"]["full depth"]
  assert full["accuracy"] == pytest.approx(summary["per_exit"][-1]["accuracy"])
  lines = (glue_data_dir() / "QQP" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:49]
  (tmp_path / "in.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  out = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"),
                    budget="1.3x")
  rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert set(out["share_per_exit"]) == {"layer 1", "layer 2 at width 0.5", "layer 3 at width 0.5",
                                        "layer 2", "layer 3"}
  narrow = [r for r in rows if "width" in r]
  assert all(r["width"] == 0.5 and r["exit_layer"] in (2, 3) for r in narrow)
  assert len(narrow) / len(rows) == pytest.approx(out["share_per_exit"]["layer 2 at width 0.5"]
                                                  + out["share_per_exit"]["layer 3 at width 0.5"])
  engine = Engine.from_workdir(str(workdir), budget="1.3x")
  with pytest.raises(ValueError, match="narrow stages is not supported yet"):
    export_engine(engine, str(tmp_path / "export"))
  with pytest.raises(hf_export.ExportError, match="only \\[CLS\\] exits export"):
    hf_export.export_workdir(str(workdir), str(tmp_path / "hf"))  # mean-pooled exits
