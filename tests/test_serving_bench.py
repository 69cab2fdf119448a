"""benchmarks/serving.py on a tiny trained run. stacks: every path, and accuracies checked
independently; budgets: every budget met on its calibration split; throughput: its reports and
its values."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from conftest import assert_png, glue_data_dir, run_benchmark
from sharcs_jax.run import load_run
from sharcs_jax.data import glue
from sharcs_jax.serve.engine import Engine
from sharcs_jax.model.weights import resolve_model_dir
from sharcs_jax.model.widths import width_label

LIMIT = 48
BUDGETS = ("1.1x", "1.2x")
UNREACHABLE = "99x"
JAX_PATHS = {"sharcs_jax full width", *(f"sharcs_jax engine {b}" for b in BUDGETS),
             *(f"sharcs_jax engine {b} cascade" for b in BUDGETS)}
ORT_PATHS = {name.replace("sharcs_jax", "sharcs_jax ort") for name in JAX_PATHS}
SPLIT = "sharcs_jax ort prefix+part full width"  # full width through the engine's two sessions
PATHS = {*JAX_PATHS, *(f"{name} bf16" for name in JAX_PATHS), SPLIT, f"{SPLIT} int8",
         *ORT_PATHS, *(f"{name} int8" for name in ORT_PATHS), "pytorch eager b32",
         "onnxruntime fp32 b1", "onnxruntime fp32 b32", "onnxruntime int8 b1",
         "onnxruntime int8 b32"}
FP32_COPIES = ("pytorch eager b32", "onnxruntime fp32 b1", "onnxruntime fp32 b32")
INT8 = ("onnxruntime int8 b1", "onnxruntime int8 b32")
# Dynamic int8 quantisation of a model whose probabilities sit within 0.01 of each other may flip
# a label or two; it must stay within this of the fp32 probabilities and these many labels.
INT8_PROBABILITY_TOLERANCE = 0.01
INT8_LABEL_TOLERANCE = 2


@pytest.fixture(scope="module")
def serving(trained, tmp_path_factory):
  workdir, _ = trained
  out = tmp_path_factory.mktemp("serving")
  data, _ = run_benchmark("serving", out, "--mode=stacks", f"--workdir={workdir}",
                          f"--limit={LIMIT}",
                          "--rounds=1", f"--budgets={','.join(BUDGETS + (UNREACHABLE,))}",
                          "--precisions=fp32,bf16,int8", "--rules=router,cascade",
                          "--runtimes=xla,onnxruntime", "--hf_batches=1,32", report="serving")
  return out, data


@pytest.fixture(scope="module")
def dev():
  return glue.load_split("qqp", "dev", str(glue_data_dir()), limit=LIMIT)


def _full_width_labels(workdir, dev) -> np.ndarray:
  """Our model at width 1.0 on the dev texts, without the engine, programs or benchmark code."""
  run = load_run(str(workdir))
  config, model, params = run.config, run.model, run.params
  tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_dir(config.model.backbone))
  first, second = zip(*dev.texts)
  enc = tokenizer(list(first), list(second), padding=True, truncation=True,
                  max_length=config.data.length_buckets[-1], return_tensors="np")
  out = model.apply({"params": params}, jnp.asarray(enc["input_ids"]),
                    jnp.asarray(enc["attention_mask"]), jnp.asarray(enc["token_type_ids"]),
                    width=1.0)
  return np.asarray(out.logits).argmax(-1)


def test_every_path_and_the_unreachable_budget(serving):
  _, data = serving
  assert set(data["paths"]) == PATHS
  assert set(data["skipped"]) == {
      f"sharcs_jax{runtime} engine {UNREACHABLE}{rule}{precision}"
      for runtime, precisions in (("", ("", " bf16")), (" ort", ("", " int8")))
      for rule in ("", " cascade") for precision in precisions}
  assert "out of reach" in data["skipped"][f"sharcs_jax engine {UNREACHABLE}"]
  assert "this cascade reaches" in data["skipped"][f"sharcs_jax engine {UNREACHABLE} cascade"]
  assert data["examples"] == LIMIT and data["task"] == "qqp"
  for name, path in data["paths"].items():
    assert len(path["seconds"]) == 1
    assert path["examples_per_second"] == pytest.approx(LIMIT / path["median_seconds"])


def test_full_width_accuracy_is_the_models(serving, trained, dev):
  workdir, report = trained
  _, data = serving
  labels = _full_width_labels(workdir, dev)
  full = data["paths"]["sharcs_jax full width"]
  assert full["accuracy"] == np.mean(labels == dev.labels)
  assert full["accuracy"] == report["full_width"]["accuracy"]  # the run's own dev evaluation
  assert full["gflops_per_example"] == pytest.approx(report["full_width"]["gflops"])


def test_fp32_copies_are_the_same_model(serving, dev):
  _, data = serving
  full = data["paths"]["sharcs_jax full width"]
  for name in FP32_COPIES:
    path = data["paths"][name]
    # The same model in another runtime agrees to ~1e-7. The tiny run's probabilities differ
    # between examples by ~1e-3 (returning one sorted batch's rows in sorted rather than input
    # order moved them by 3e-5): a row mix-up, truncation or tokenisation difference shows here.
    assert path["max_abs_probability_difference_vs_full_width"] <= 1e-6, name
    assert path["agreement_with_full_width"] >= 1 - 1 / LIMIT, name
    assert abs(path["accuracy"] - full["accuracy"]) <= 1 / LIMIT + 1e-12, name
    if path["agreement_with_full_width"] == 1.0:
      assert path["f1"] == full["f1"], name
  assert data["model_files"]["max_abs_logit_difference_onnx_fp32_vs_pytorch"] <= 1e-5


def test_int8_within_tolerance(serving):
  _, data = serving
  full = data["paths"]["sharcs_jax full width"]
  for name in INT8:
    path = data["paths"][name]
    assert 0 < path["max_abs_probability_difference_vs_full_width"] <= INT8_PROBABILITY_TOLERANCE
    assert abs(path["accuracy"] - full["accuracy"]) <= INT8_LABEL_TOLERANCE / LIMIT + 1e-12
  assert data["model_files"]["onnx_int8_mb"] < 0.5 * data["model_files"]["onnx_fp32_mb"]


@pytest.mark.parametrize("rule", ["router", "cascade"])
@pytest.mark.parametrize("budget", BUDGETS)
def test_budget_paths_are_the_engines(serving, trained, dev, budget, rule):
  workdir, _ = trained
  _, data = serving
  predictions = Engine.from_workdir(str(workdir), budget=budget, rule=rule).predict(dev.texts)
  path = data["paths"][f"sharcs_jax engine {budget}" + ("" if rule == "router" else " cascade")]
  assert path["rule"]["rule"] == rule
  assert path["accuracy"] == np.mean(predictions.labels == dev.labels)
  assert path["gflops_per_example"] == pytest.approx(predictions.gflops.mean())
  assert path["share_per_width"] == {width_label(w): float(np.mean(predictions.widths == w))
                                     for w in (0.25, 0.5, 1.0)}
  full = data["paths"]["sharcs_jax full width"]["gflops_per_example"]
  assert path["dev_flops_reduction"] == pytest.approx(full / path["gflops_per_example"])


def test_machine_and_reports(serving):
  out, data = serving
  with open("/proc/cpuinfo") as f:
    lines = f.read().splitlines()
  model = next(line.split(":", 1)[1].strip() for line in lines if line.startswith("model name"))
  flags = set(next(line.split(":", 1)[1] for line in lines if line.startswith("flags")).split())
  assert data["cpu"]["model"] == model
  assert data["cpu"]["flags"]["avx512f"] == ("avx512f" in flags)
  assert data["cpu"]["flags"]["amx_int8"] == ("amx_int8" in flags)
  assert data["versions"]["onnxruntime"] == __import__("onnxruntime").__version__
  assert data["threads"]["pytorch"] == data["threads"]["onnxruntime_intra_op"] >= 1
  table = (out / "serving.md").read_text()
  for name in data["paths"]:
    assert f"| {name} |" in table
  assert UNREACHABLE in table  # the skipped budget is explained
  assert_png(out / "serving.png")
  assert_png(out / "serving_pareto.png")
  bar = data["paths"]["onnxruntime int8 b32"]["examples_per_second"]
  for path in data["paths"].values():
    assert path["speed_vs_onnxruntime_int8"] == pytest.approx(path["examples_per_second"] / bar)


def test_ort_fp32_paths_are_the_xla_paths(serving):
  """The engine's programs on ONNX Runtime fp32: the XLA engine's answers and FLOPs; at int8 the
  same FLOPs and probabilities near them."""
  _, data = serving
  for name in JAX_PATHS:
    xla, ort = data["paths"][name], data["paths"][name.replace("sharcs_jax", "sharcs_jax ort")]
    int8 = data["paths"][name.replace("sharcs_jax", "sharcs_jax ort") + " int8"]
    assert (ort["runtime"], ort["precision"], int8["precision"]) == (
        "sharcs_jax ort", "fp32", "int8")
    assert ort["gflops_per_example"] == pytest.approx(xla["gflops_per_example"]), name
    if ort.get("share_per_width") == xla.get("share_per_width"):
      assert ort["accuracy"] == xla["accuracy"], name
    if not name.endswith("cascade"):  # a cascade may route near-ties differently (see bf16)
      assert ort["max_abs_probability_difference_vs_full_width"] <= max(
          1e-4, xla["max_abs_probability_difference_vs_full_width"] + 1e-4), name
  full = data["paths"]["sharcs_jax full width"]
  # The one-program full width and the prefix + full part: the same model either way.
  split = data["paths"][SPLIT]
  assert split["max_abs_probability_difference_vs_full_width"] <= 1e-4
  assert split["gflops_per_example"] == pytest.approx(full["gflops_per_example"])
  assert data["paths"][SPLIT + " int8"]["max_abs_probability_difference_vs_full_width"] \
      <= INT8_PROBABILITY_TOLERANCE
  int8 = data["paths"]["sharcs_jax ort full width int8"]
  assert int8["gflops_per_example"] == pytest.approx(full["gflops_per_example"])
  assert 0 < int8["max_abs_probability_difference_vs_full_width"] <= INT8_PROBABILITY_TOLERANCE


def test_bf16_paths_keep_the_fp32_answers(serving):
  """bf16 matmul inputs (float32 accumulation): probabilities near fp32's, FLOPs unchanged.

  Each precision calibrates its own cascade threshold on its own probabilities. On this tiny,
  near-random model the threshold sits among near-ties (max probability ~0.50), so bf16's
  rounding may escalate other inputs: a cascade path is compared label for label only where both
  precisions routed alike, and otherwise must meet its budget as fp32 does."""
  _, data = serving
  compared = set()
  for name in JAX_PATHS:
    fp32, bf16 = data["paths"][name], data["paths"][f"{name} bf16"]
    assert fp32["precision"] == "fp32" and bf16["precision"] == "bf16"
    if fp32.get("share_per_width") == bf16.get("share_per_width"):
      assert abs(bf16["accuracy"] - fp32["accuracy"]) <= 1 / LIMIT + 1e-12, name
      compared.add(name)
    else:
      assert name.endswith("cascade"), name
      for path in (fp32, bf16):
        target = float(path["rule"]["budget"].rstrip("x"))
        assert target <= path["calibration_reduction"] <= target * 1.05, name
  assert {"sharcs_jax full width", *(f"sharcs_jax engine {b}" for b in BUDGETS)} <= compared
  full = data["paths"]["sharcs_jax full width bf16"]
  assert full["gflops_per_example"] == data["paths"]["sharcs_jax full width"]["gflops_per_example"]
  assert 0 < full["max_abs_probability_difference_vs_full_width"] <= 0.02


def test_budgets_mode_meets_its_budgets(trained, tmp_path):
  workdir, report = trained
  assert report["sharcs"]["routing"]["budget"] == "1.1x"
  assert report["routing"]["calibration_examples"] == 32 and report["train_examples"] == 64
  data, _ = run_benchmark("serving", tmp_path, "--mode=budgets", f"--workdir={workdir}",
                          "--rounds=1", f"--limit={LIMIT}", "--budgets=1x,1.1x,max,9x",
                          report="pareto_qqp", timeout=300)
  paths = data["paths"]
  assert list(paths) == ["full width", "1x", "1.1x", "max"]
  assert paths["1x"]["calibration_reduction"] == pytest.approx(1.0)
  assert 1.1 <= paths["1.1x"]["calibration_reduction"] <= 1.1 * 1.05
  assert paths["max"]["calibration_reduction"] == pytest.approx(data["reachable_reductions"][1])
  assert "out of reach" in data["out_of_reach"]["9x"] and "1.1x" not in data["out_of_reach"]
  assert paths["1.1x"]["dev_reduction"] > 1
  # the whole model and each width alone score the dev pairs as the run's own evaluation did
  assert paths["full width"]["accuracy"] == pytest.approx(report["full_width"]["accuracy"])
  assert [a["route"] for a in data["alone"]] == list(report["static"])
  np.testing.assert_allclose([a["accuracy"] for a in data["alone"]],
                             [s["accuracy"] for s in report["static"].values()])
  assert_png(tmp_path / "pareto_qqp.png")


def test_throughput_mode_writes_its_reports(trained, tmp_path):
  workdir, report = trained
  data, _ = run_benchmark("serving", tmp_path, "--mode=throughput", f"--workdir={workdir}",
                          "--rounds=1", f"--limit={LIMIT}", report="throughput", timeout=300)
  assert data["examples"] == LIMIT
  assert set(data["paths"]) == {"SHARCS engine", "full width"}
  engine, full = data["paths"]["SHARCS engine"], data["paths"]["full width"]
  for path in (engine, full):
    assert path["examples_per_second"] == pytest.approx(LIMIT / np.median(path["seconds"]))
  assert data["speedup"] == pytest.approx(engine["examples_per_second"] /
                                          full["examples_per_second"])
  # the same dev pairs the run reported on: both paths score them as training did
  assert engine["accuracy"] == pytest.approx(report["sharcs"]["accuracy"])
  assert full["accuracy"] == pytest.approx(report["full_width"]["accuracy"])
  assert data["flops_reduction"] == pytest.approx(report["sharcs"]["flops_reduction"], rel=1e-3)
  assert_png(tmp_path / "throughput.png")
  assert "examples/s" in (tmp_path / "throughput.md").read_text()


def test_throughput_mode_serves_a_cascade_at_bf16(trained, tmp_path):
  workdir, report = trained
  data, _ = run_benchmark("serving", tmp_path, "--mode=throughput", f"--workdir={workdir}",
                          "--rounds=1", f"--limit={LIMIT}", "--budgets=1.2x", "--rules=cascade",
                          "--precision=bf16", report="throughput", timeout=300)
  assert data["precision"] == "bf16"
  assert (data["rule"]["rule"], data["rule"]["budget"]) == ("cascade", "1.2x")
  # FLOPs are counted on the float32 programs whatever the precision, so reductions compare
  assert data["paths"]["full width"]["gflops_per_example"] == pytest.approx(
      report["full_width"]["gflops"], rel=1e-3)
  assert set(data["cpu"]) >= {"model", "flags", "usable_cpus"}
  assert "bf16" in (tmp_path / "throughput.md").read_text()
