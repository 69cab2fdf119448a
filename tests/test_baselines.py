"""Baselines for the trade-off curves: the early-exit model, static-width and entropy runs."""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

from conftest import (REPO_ROOT, assert_png, assert_report_gflops_are_the_engines, damaged_copy,
                      export_and_compare, glue_data_dir, needs_glue, real_sentences,
                      run_benchmark, tiny_run_config)
from sharcs_jax import config as config_lib
from sharcs_jax.baselines import early_exit
from sharcs_jax.model import EarlyExitModel, weights
from sharcs_jax.model.flops import param_shapes
from sharcs_jax.model.weights import load_pretrained_early_exit
from sharcs_jax.serve.engine import Engine
from sharcs_jax.checkpoint import Checkpoints
from sharcs_jax.baselines.train_early_exit import train_early_exit




@pytest.mark.slow
def test_early_exit_model_exits_agree_and_share_the_pretrained_encoder(tiny_backbone):
  model, params = load_pretrained_early_exit(tiny_backbone, num_classes=2, key=jax.random.key(0))
  sharcs, sharcs_params = weights.load_pretrained(tiny_backbone, num_classes=2, widths=(1.0,),
                                                  router_layer=1, key=jax.random.key(0))
  for name in ("embeddings", "layers_0", "layers_2"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, params[name], sharcs_params[name])
  for i in range(3):  # every exit's pooler starts from the checkpoint's pooler
    np.testing.assert_array_equal(params[f"exits_{i}"]["pooler"]["kernel"],
                                  sharcs_params["head"]["pooler"]["kernel"])
  ids = jax.random.randint(jax.random.key(1), (2, 12), 1, 1000)
  mask = np.ones((2, 12), np.int32)
  every = model.apply({"params": params}, ids, mask)
  assert every.shape == (3, 2, 2)
  first_two = model.apply({"params": params}, ids, mask, exit_layer=1)
  np.testing.assert_allclose(first_two, every[:2], atol=1e-6)
  # The last exit sees the same encoder output as the SHARCS model at full width.
  hidden = sharcs.apply({"params": sharcs_params}, ids, mask, width=1.0).last_hidden_state
  pooled = np.tanh(hidden[:, 0] @ params["exits_2"]["pooler"]["kernel"]
                   + params["exits_2"]["pooler"]["bias"])
  classifier = params["exits_2"]["classifier"]
  np.testing.assert_allclose(pooled @ classifier["kernel"] + classifier["bias"], every[2],
                             atol=1e-5)
  with pytest.raises(ValueError, match="exit_layer 3 is outside 0..2"):
    model.apply({"params": params}, ids, mask, exit_layer=3)


def test_mean_pool_exits_read_the_real_tokens(tiny_backbone):
  """Exits on the mean over tokens: the same parameters as [CLS] exits, padding ignored."""
  cls_model, params = load_pretrained_early_exit(tiny_backbone, num_classes=2, key=jax.random.key(0))
  mean_model, mean_params = load_pretrained_early_exit(tiny_backbone, num_classes=2,
                                                       key=jax.random.key(0), pooling="mean")
  jax.tree_util.tree_map(np.testing.assert_array_equal, params, mean_params)
  ids = jax.random.randint(jax.random.key(1), (2, 12), 1, 1000)
  mask = np.array([[1] * 12, [1] * 7 + [0] * 5], np.int32)
  logits = mean_model.apply({"params": params}, ids, mask)
  # Changing what sits in the padded positions changes nothing.
  other_padding = ids.at[1, 7:].set(5)
  np.testing.assert_allclose(mean_model.apply({"params": params}, other_padding, mask), logits,
                             atol=1e-6)
  # The last exit is the pooler and classifier on the masked mean of the last layer.
  hidden = weights.load_pretrained(tiny_backbone, num_classes=2, widths=(1.0,), router_layer=1,
                                   key=jax.random.key(0))
  sharcs, sharcs_params = hidden
  last = sharcs.apply({"params": sharcs_params}, ids, mask, width=1.0).last_hidden_state
  m = mask[..., None]
  mean = (last * m).sum(1) / m.sum(1)
  exit_2 = params["exits_2"]
  expected = (np.tanh(mean @ exit_2["pooler"]["kernel"] + exit_2["pooler"]["bias"])
              @ exit_2["classifier"]["kernel"] + exit_2["classifier"]["bias"])
  np.testing.assert_allclose(logits[2], expected, atol=1e-5)
  assert not np.allclose(logits, cls_model.apply({"params": params}, ids, mask), atol=1e-3)
  with pytest.raises(ValueError, match="exit pooling 'max' is not one of"):
    EarlyExitModel(cls_model.encoder, num_classes=2, pooling="max").init(
        jax.random.key(0), ids, mask)


def test_exit_flops_follow_the_analytic_count():
  cfg = config_lib.backbone_config(config_lib.load_config(str(REPO_ROOT / "configs" / "qqp.py")))
  # Leaving after layer k runs the engine's stages 1..k, each a layer and its exit.
  model = EarlyExitModel(cfg, num_classes=2)
  engine = Engine(model, param_shapes(model), length_buckets=(32,), batch_buckets=(1,))
  table = np.cumsum(engine.stage_flops, axis=0)
  assert table.shape == (6, 1) and np.all(np.diff(table[:, 0]) > 0)
  for k in range(6):
    # Leaving after layer k runs the exits before it too (to decide): both counts include them.
    assert table[k, 0] == pytest.approx(early_exit.exit_flops(cfg, k, 32, 2), rel=0.01)


EXIT_RULES = {"entropy_fractions": (0.0, 0.5, 1.0), "patiences": (1, 2)}


@pytest.fixture(scope="module")
def early_exit_run(tiny_backbone, tmp_path_factory):
  """(workdir, summary) of one uninterrupted early-exit run on the tiny backbone."""
  workdir = tmp_path_factory.mktemp("early_exit")
  return workdir, train_early_exit(tiny_run_config(tiny_backbone), str(workdir), **EXIT_RULES)


@needs_glue
def test_early_exit_baseline_end_to_end(early_exit_run):
  tmp_path, summary = early_exit_run
  config = tiny_run_config(summary["model"])
  saved = json.loads((tmp_path / "early_exit.json").read_text())
  assert saved["points"] == summary["points"]
  assert (tmp_path / "early_exit.md").exists()
  assert [(p["rule"], p["setting"]) for p in summary["points"]] == [
      ("entropy", 0.0), ("entropy", 0.5), ("entropy", 1.0), ("patience", 1), ("patience", 2)]
  per_exit = summary["per_exit"]
  assert len(per_exit) == 3 and len(summary["history"]) == config.train.epochs
  cheapest, dearest = per_exit[0]["gflops"], per_exit[-1]["gflops"]
  by = {(p["rule"], p["setting"]): p for p in summary["points"]}
  # Threshold 0 never exits early: the last exit's accuracy at the full cost.
  assert by["entropy", 0.0]["gflops"] == pytest.approx(dearest)
  assert by["entropy", 0.0]["accuracy"] == per_exit[-1]["accuracy"]
  # Threshold 1 always exits at the first exit: its accuracy at its cost.
  assert by["entropy", 1.0]["gflops"] == pytest.approx(cheapest)
  assert by["entropy", 1.0]["accuracy"] == per_exit[0]["accuracy"]
  for p in summary["points"]:  # a share of the dev examples, at a cost between the exits'
    assert cheapest - 1e-9 <= p["gflops"] <= dearest + 1e-9
    assert p["accuracy"] * summary["dev_examples"] == pytest.approx(
        round(p["accuracy"] * summary["dev_examples"]))
  # Train data: the same held-back split as a SHARCS run of this config.
  assert summary["train_examples"] == 96 - config.routing.calibration_examples


@needs_glue
def test_the_engine_serves_the_kept_early_exit_model(early_exit_run):
  """Every stage of the served model gives the kept epoch's exits on dev (the summary's
  accuracies), and a budget calibrated on the calibration split is met there."""
  from sharcs_jax.data import batching, glue
  from sharcs_jax.serve.engine import Engine

  workdir, summary = early_exit_run
  engine = Engine.from_workdir(str(workdir), budget="1.5x", signal="max_prob")
  config = tiny_run_config(summary["model"])
  _, dev, calibration = glue.run_splits(config)
  dev_data, calibration_data = batching.encode_splits([dev, calibration], engine.tokenizer,
                                                      engine.length_buckets)
  every = engine.every_stage(dev_data)
  accuracy = [float((p.argmax(-1) == dev_data.labels).mean()) for p in every]
  np.testing.assert_allclose(accuracy, [e["accuracy"] for e in summary["per_exit"]])
  served = engine.run(calibration_data)
  reduction = engine.full_gflops(calibration_data).mean() / served.gflops.mean()
  assert reduction == pytest.approx(engine.rule.calibration_reduction)
  assert reduction == pytest.approx(1.5, rel=0.1)
  predicted = engine.predict(list(dev.texts[:5]))
  np.testing.assert_array_equal(predicted.labels, engine.run(dev_data).labels[:5])
  # The one engine and result type that serve a SHARCS run serve this one too.
  from sharcs_jax.serve.layout import Predictions
  assert type(engine) is Engine and type(predicted) is Predictions and not predicted.by_width
  assert predicted.routes == tuple(f"layer {int(k)}" for k in predicted.exit_layers)


@needs_glue
def test_the_main_job_reports_what_the_engine_serves_at_the_configs_budget(early_exit_run):
  """The run's `served` row is what `Engine` calibrates at the config's budget (the same
  reduction on the calibration split) and, at the row's threshold, gives on dev: the same
  accuracy, exits and reduction. (The tiny model's confidences crowd near 0.5, so thresholds
  bisected on the engine's and the training forward's probabilities, 1e-7 apart, can part rows.)
  """
  from sharcs_jax.data import batching, glue
  from sharcs_jax.serve.engine import Engine
  from sharcs_jax.serve.routing import ExitCascade

  workdir, summary = early_exit_run
  config = tiny_run_config(summary["model"])
  served = summary["served"]
  assert served["budget"] == config.routing.budget == "1.1x"
  assert served["calibration_examples"] == config.routing.calibration_examples
  calibrated = Engine.from_workdir(str(workdir), budget="1.1x", signal=config.routing.signal)
  assert calibrated.rule.calibration_reduction == pytest.approx(served["calibration_reduction"],
                                                                rel=0.02)
  engine = Engine.from_workdir(str(workdir), rule=ExitCascade(
      served["threshold"], len(calibrated.exit_layers), served["signal"]))
  (dev,) = batching.encode_splits([glue.run_splits(config)[1]], engine.tokenizer,
                                  engine.length_buckets)
  out = engine.run(dev)
  assert served["accuracy"] == pytest.approx(float((out.labels == dev.labels).mean()))
  assert served["mean_exit_layer"] == pytest.approx(float(out.exit_layers.mean()))
  assert served["dev_reduction"] == pytest.approx(
      engine.full_gflops(dev).mean() / out.gflops.mean(), rel=0.02)
  assert "served: max_prob calibrated to 1.1x" in (workdir / "early_exit.md").read_text()


@needs_glue
def test_the_reports_gflops_are_what_the_engine_counts(early_exit_run):
  """One FLOPs table: each exit's GFLOPs and the served row's in the report are what the served
  engine counts for the same dev rows."""
  workdir, summary = early_exit_run
  assert_report_gflops_are_the_engines(workdir, summary, tiny_run_config(summary["model"]))


@needs_glue
def test_serving_throughput_and_budgets_serve_an_early_exit_run(early_exit_run, tmp_path):
  """The serving benchmark's token-id modes serve an early-exit run with its exit engine, as
  they serve SHARCS: throughput at the config's budget beside the full depth, budgets at each
  budget (one out of reach) beside each exit alone, whose accuracies are the run's kept exits',
  with the other calibration's (per length bucket) dev reduction beside each budget."""
  workdir, summary = early_exit_run
  data, _ = run_benchmark("serving", tmp_path / "t", "--mode=throughput", f"--workdir={workdir}",
                          "--rounds=1", "--signal=max_prob", report="throughput", timeout=600)
  engine, full = data["paths"]["early-exit engine"], data["paths"]["full depth"]
  assert data["budget"] == "1.1x" and engine["calibration_reduction"] == pytest.approx(1.1, rel=0.1)
  assert full["accuracy"] == pytest.approx(summary["per_exit"][-1]["accuracy"])
  assert data["speedup"] == pytest.approx(engine["examples_per_second"] /
                                          full["examples_per_second"])
  assert data["flops_reduction"] == pytest.approx(full["gflops_per_example"] /
                                                  engine["gflops_per_example"])
  assert_png(tmp_path / "t" / "throughput.png")
  data, _ = run_benchmark("serving", tmp_path / "p", "--mode=budgets", f"--workdir={workdir}",
                          "--rounds=1", "--budgets=1.2x,max,50x",
                          report=f"pareto_{summary['task']}_exit", timeout=600)
  assert list(data["paths"]) == ["full depth", "1.2x", "max"] and "50x" in data["out_of_reach"]
  assert data["signal"] == "entropy" and data["rule"] == "exit"
  assert data["examples"] == summary["dev_examples"] and data["exit_layers"] == [1, 2, 3]
  full, routed = data["paths"]["full depth"], data["paths"]["1.2x"]
  assert full["dev_reduction"] == pytest.approx(1.0) and full["mean_exit_layer"] == 3
  assert routed["calibration_reduction"] == pytest.approx(1.2, rel=0.1)
  assert routed["dev_reduction"] > 1.0 and routed["mean_exit_layer"] < 3
  assert data["calibration"] == "pooled" and routed["rule"]["bucket_thresholds"] == []
  assert routed["dev_reduction_other_calibration"] > 1.0  # per length bucket's, unserved
  for path in data["paths"].values():
    assert path["examples_per_second"] == pytest.approx(data["examples"] /
                                                        np.median(path["seconds"]))
    assert path["speedup"] == pytest.approx(path["examples_per_second"] /
                                            full["examples_per_second"])
  # 'max' puts every calibration row at its first exit; its threshold lies below 1.2x's, so no
  # dev row leaves later (a dev row less sure than every calibration row may leave after layer 1).
  most = data["paths"]["max"]
  assert most["calibration_reduction"] >= routed["calibration_reduction"]
  assert 1.0 <= most["mean_exit_layer"] <= routed["mean_exit_layer"]
  assert most["dev_reduction"] >= routed["dev_reduction"]
  np.testing.assert_allclose([e["accuracy"] for e in data["alone"]],
                             [e["accuracy"] for e in summary["per_exit"]])
  assert [e["route"] for e in data["alone"]] == ["layer 1", "layer 2", "layer 3"]
  assert_png(tmp_path / "p" / f"pareto_{summary['task']}_exit.png")


@needs_glue
def test_serving_benchmark_serves_an_early_exit_run_beside_its_hf_export(early_exit_run, tmp_path):
  """Text in, labels out: the exit engine at a budget and its full depth on XLA and ONNX Runtime
  int8, beside the stock paths of the run's HF export ([CLS] exits): the HF model is the full
  depth, so PyTorch gives its labels, and speeds are multiples of ORT int8 of that export."""
  workdir, summary = early_exit_run
  data, _ = run_benchmark("serving", tmp_path, "--mode=stacks", f"--workdir={workdir}",
                          "--rounds=1", "--limit=48", "--budgets=1.2x,50x",
                          "--precisions=fp32,int8",
                          report="serving", timeout=600)
  paths = data["paths"]
  assert set(paths) == {"sharcs_jax full depth", "sharcs_jax exit engine 1.2x",
                        "sharcs_jax ort full depth", "sharcs_jax ort exit engine 1.2x",
                        "sharcs_jax ort full depth int8", "sharcs_jax ort exit engine 1.2x int8",
                        "pytorch eager b32", "onnxruntime fp32 b32", "onnxruntime int8 b32"}
  assert set(data["skipped"]) == {f"sharcs_jax{o} exit engine 50x{p}"
                                  for o, p in (("", ""), (" ort", ""), (" ort", " int8"))}
  assert data["model"] == "early_exit" and data["bar"] == "onnxruntime int8 b32"
  assert paths["onnxruntime int8 b32"]["speed_vs_onnxruntime_int8"] == 1.0
  assert paths["pytorch eager b32"]["agreement_with_full_width"] == 1.0
  for name in ("sharcs_jax exit engine 1.2x", "sharcs_jax ort exit engine 1.2x"):
    assert paths[name]["calibration_reduction"] == pytest.approx(1.2, rel=0.1)
    assert paths[name]["dev_flops_reduction"] > 1.0 and paths[name]["mean_exit_layer"] < 3
    assert sum(paths[name]["share_per_exit"].values()) == pytest.approx(1.0)
  assert_png(tmp_path / "serving_pareto.png")


@needs_glue
def test_predict_mode_serves_an_early_exit_run(early_exit_run, tmp_path):
  from sharcs_jax.checkpoint import holds_early_exit
  from sharcs_jax.errors import RunError
  from sharcs_jax.serve import predict

  workdir, summary = early_exit_run
  assert holds_early_exit(str(workdir))
  from sharcs_jax.run import load_run

  assert isinstance(load_run(str(workdir)).model, EarlyExitModel)  # one loader for either kind
  lines = (glue_data_dir() / "QQP" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:49]
  (tmp_path / "in.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  full = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "full.jsonl"))
  assert full["accuracy"] == pytest.approx(summary["per_exit"][-1]["accuracy"])
  assert full["share_per_exit"]["layer 3"] == 1.0 and full["rule"] == "exit"
  routed = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"),
                       budget="1.2x", signal="max_prob")
  rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(rows) == 48 and {r["exit_layer"] for r in rows} <= {1, 2, 3}
  assert routed["flops_reduction"] > 1.0 and routed["routing"] == "1.2x"
  with pytest.raises(RunError, match="--precision=bf16 applies to SHARCS runs only"):
    predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "x.jsonl"),
                precision="bf16")
  on_int8 = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "int8.jsonl"),
                        runtime="onnxruntime", precision="int8")
  assert (on_int8["runtime"], on_int8["precision"]) == ("onnxruntime", "int8")
  assert on_int8["share_per_exit"]["layer 3"] == 1.0


@needs_glue
def test_resumed_early_exit_run_equals_uninterrupted(early_exit_run, tmp_path, monkeypatch,
                                                     caplog):
  _, straight = early_exit_run
  config = tiny_run_config(straight["model"])
  original_save = Checkpoints.save

  def save_then_crash(self, *args):
    original_save(self, *args)
    raise KeyboardInterrupt("simulated kill after the first epoch's checkpoint")

  monkeypatch.setattr(Checkpoints, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    train_early_exit(config, str(tmp_path), **EXIT_RULES)
  assert not (tmp_path / "early_exit.json").exists()
  monkeypatch.setattr(Checkpoints, "save", original_save)
  caplog.set_level(logging.INFO)
  resumed = train_early_exit(config, str(tmp_path), **EXIT_RULES)
  assert "after epoch 1" in caplog.text and "early exit epoch 0:" not in caplog.text
  assert len(resumed["history"]) == config.train.epochs == 2
  without_time = lambda summary: {k: v for k, v in summary.items() if k != "train_seconds"}
  assert without_time(resumed) == without_time(straight)


@needs_glue
@pytest.mark.parametrize("runtime, precision", [("xla", "fp32"), ("onnxruntime", "int8")])
def test_an_exported_early_exit_model_gives_the_engines_exits(early_exit_run, runtime,
                                                              precision, tmp_path):
  """Its stages exported with the exit rule at a budget, loaded in a fresh process (where
  `import jax` fails, on ONNX Runtime): the engine's labels and exit layers on dev."""
  workdir, _ = early_exit_run
  directory, data = export_and_compare(workdir, tmp_path, runtime=runtime, precision=precision,
                                       budget="1.2x")
  assert data["model"] == "early_exit" and data["routing"]["rule"] == "exit"
  assert data["labels_equal"] == 1.0 and data["routes_equal"] == 1.0
  assert data["max_probability_difference"] <= 1e-5
  assert data["imports_blocked_in_loader"] == (["jax", "jaxlib"] if runtime == "onnxruntime"
                                               else [])
  assert data["forbidden_modules_imported"] == []
  suffix = ".onnx" if runtime == "onnxruntime" else ".jaxexport"
  assert sorted(f.name for f in directory.glob(f"*{suffix}")) == [
      f"stage_l{i}-{i}{suffix}" for i in range(3)]
  from sharcs_jax.serve.export.loader import ExportedModel

  for i, (change, message) in enumerate([
      (lambda m: m.update(exit_layers=[1, 3]), r"exit layers \[1, 3\] need"),
      (lambda m: m.update(model="deebert"), "model 'deebert' is not one of"),
      (lambda m: m["routing"].update(num_stages=2), "is not an exit rule over 3 stages"),
      (lambda m: m["routing"].update(bucket_thresholds=[0.5] * (len(m["length_buckets"]) + 1)),
       "or one per length bucket of"),
      (lambda m: m.pop("stage_gflops_per_example"), r"missing \(model 'early_exit'\)"),
  ]):
    with pytest.raises(ValueError, match=message):
      ExportedModel.load(damaged_copy(directory, tmp_path / f"damaged{i}",
                                      lambda d, m: change(m)))



@needs_glue
def test_the_http_server_serves_an_early_exit_run(early_exit_run):
  """`--mode=serve` on an early-exit run: its exit rule at a budget, each answer's exit layer in
  its details, the offline engine's scores, and requests counted per exit layer."""
  from test_http_server import call, predict, start_server, stop

  workdir, _ = early_exit_run
  port, process, _ = start_server(workdir, "--budget=1.2x", "--signal=max_prob",
                                  "--precision=fp32")
  try:
    sentences = real_sentences(16)
    pairs = [[sentences[i], sentences[i + 1]] for i in range(0, 16, 2)]
    answers = [predict(port, {"inputs": pair, "details": True}) for pair in pairs]
    status, _, info = call(port, "/info")
    status_metrics, _, metrics = call(port, "/metrics")
  finally:
    stop(process)
  assert {status for status, _, _ in answers} == {200} and status == status_metrics == 200
  assert info["exit_layers"] == [1, 2, 3] and info["rule"]["rule"] == "exit"
  assert info["exits"] == ["layer 1", "layer 2", "layer 3"] and info["stage_widths"] == [1.0] * 3
  offline = Engine.from_workdir(str(workdir), budget="1.2x", signal="max_prob").predict(pairs)
  for (_, _, answer), layer, probabilities in zip(answers, offline.exit_layers,
                                                  offline.probabilities):
    assert set(answer) == {"scores", "exit_layer", "gflops"} and answer["exit_layer"] == layer
    scores = {s["label"]: s["score"] for s in answer["scores"]}
    np.testing.assert_allclose([scores["not_duplicate"], scores["duplicate"]], probabilities,
                               atol=1e-6, rtol=0)
  counted = sum(float(line.split()[-1]) for line in metrics.splitlines()
                if line.startswith("sharcs_pairs_total{route="))
  assert counted == len(pairs)


@needs_glue
def test_load_benchmark_drives_an_early_exit_run_beside_its_full_depth(early_exit_run, tmp_path):
  workdir, _ = early_exit_run
  data, _ = run_benchmark("load", tmp_path, f"--workdir={workdir}", "--budget=1.2x",
                          "--precision=fp32", "--pairs=16", "--concurrency=4", "--open_loop=",
                          "--overload=", "--requests_per_level=16", "--drain_clients=2",
                          "--seconds_per_level=10", "--offline_rounds=1", report="load",
                          timeout=600)
  assert (data["model"], data["rule"], data["baseline"]) == ("early_exit", "exit", "full depth")
  assert set(data["servers"]) == {"1.2x", "full depth"}
  for name, server in data["servers"].items():
    assert server["exit_code"] == 0
    closed = server["levels"]["closed 4"]
    assert closed["statuses"] == {"200": 16} and closed["max_abs_diff"] <= 1e-6, closed
    assert set(closed["share_per_width"]) <= {"1", "2", "3"}  # exit layers
    assert set(closed["batch_per_width"]) == set(closed["share_per_width"])
  assert data["servers"]["full depth"]["levels"]["closed 4"]["share_per_width"] == {"3": 1.0}


@needs_glue
def test_hf_export_of_an_early_exit_run_gives_its_full_depth(early_exit_run, tmp_path):
  """A [CLS]-exit run exports its full depth (the last exit as BERT's pooler and classifier):
  transformers' BertForSequenceClassification gives the engine's full-depth probabilities."""
  import torch
  import transformers

  from sharcs_jax.data import batching, glue
  from sharcs_jax.serve.export import hf as hf_export
  from sharcs_jax.serve.engine import Engine

  workdir, summary = early_exit_run
  hf_export.export_workdir(str(workdir), str(tmp_path / "hf"))
  engine = Engine.from_workdir(str(workdir))  # no budget: the full depth
  dev = glue.first(glue.run_splits(tiny_run_config(summary["model"]))[1], 12)
  ours = engine.run(batching.encode(dev, engine.tokenizer, engine.length_buckets)).probabilities
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
  hf = transformers.BertForSequenceClassification.from_pretrained(str(tmp_path / "hf")).eval()
  a, b = zip(*dev.texts)
  with torch.no_grad():
    theirs = hf(**tokenizer(list(a), list(b), padding=True, return_tensors="pt")).logits
  np.testing.assert_allclose(torch.softmax(theirs, -1).numpy(), ours, atol=1e-5)
