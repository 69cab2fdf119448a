"""Shared fixtures: tiny models built in the test, and real GLUE sentences.

Real data is found the way the project finds it: $SHARCS_DATA_DIR, else ../shared/data/glue
beside the checkout when it exists, else the Hugging Face hub (nyu-mll/glue).
"""

from __future__ import annotations

import atexit
import csv
import dataclasses
import fcntl
import json
import os
import pickle
import shutil
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np
import pytest

from sharcs_jax.model import EncoderConfig, SharcsModel, init_params, weights

REPO_ROOT = pathlib.Path(__file__).resolve().parents[1]

# Tests build the same small programs many times (a resumed run recompiles what the first run
# compiled, a 4-device run in a subprocess what the one before it compiled): one persistent
# compilation cache per test session keeps that to one XLA compile each. The subprocesses that
# tests start inherit it through the environment; the session that made it removes it at exit.
if "SHARCS_TEST_XLA_CACHE" not in os.environ:
  os.environ["SHARCS_TEST_XLA_CACHE"] = tempfile.mkdtemp(prefix="sharcs-test-xla-cache-")
  atexit.register(shutil.rmtree, os.environ["SHARCS_TEST_XLA_CACHE"], ignore_errors=True)
XLA_CACHE_DIR = os.environ["SHARCS_TEST_XLA_CACHE"]
os.environ.update(JAX_COMPILATION_CACHE_DIR=XLA_CACHE_DIR,
                  JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                  JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
jax.config.update("jax_compilation_cache_dir", XLA_CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
# Most of the suite's time is XLA compiling small programs, and most of that is LLVM optimising
# their code. Tests compile at backend optimisation level 0 and with XLA CPU's older elemental
# fusion emitters, which compile a backward pass's ~1,000 small fusions faster at that level (a
# tiny training run on 2 AVX2 cores: 204 s -> 95 s at level 0, beside a main job; alone, 75 s at
# level 0 -> 52 s with both); the programs are the same HLO, so what the tests assert holds. Set
# before the backend starts; subprocesses inherit them.
TEST_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
os.environ["XLA_FLAGS"] = " ".join(filter(None, (os.environ.get("XLA_FLAGS"),
                                                *TEST_XLA_FLAGS)))


def as_a_user_runs_it() -> dict[str, str]:
  """The environment without the tests' compile flags: for a run that must be the user's own."""
  flags = " ".join(f for f in os.environ["XLA_FLAGS"].split() if f not in TEST_XLA_FLAGS)
  return {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"} | (
      {"XLA_FLAGS": flags} if flags else {})


# Tests that train a model, run a benchmark end to end or start subprocesses that do: `slow` (as
# are the few that compile or run the real backbone, marked where they are defined).
# `pytest -m "not slow"` is the fast lane (a few minutes); the full suite runs them all.
SLOW_FIXTURES = ("trained", "tradeoff", "serving", "early_exit_run", "one_device",
                 "depth_width_run")


# The longest test files, longest first (as measured on 2 AVX2 cores): run first, so that under
# `--dist loadfile --no-loadscope-reorder` (.ci/run) no worker starts a long file near the end.
LONGEST_FILES = ("test_train.py", "test_tradeoff.py", "test_parallel.py", "test_baselines.py",
                 "test_onnxruntime.py", "test_serving_bench.py", "test_engine.py",
                 "test_depth_width.py", "test_workdir.py")


def pytest_collection_modifyitems(config, items):
  for item in items:
    if any(name in item.fixturenames for name in SLOW_FIXTURES):
      item.add_marker(pytest.mark.slow)
  rank = {name: i for i, name in enumerate(LONGEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file


def pytest_sessionstart(session):
  """In CI the integration tests must run: missing GLUE data fails the run, it does not skip."""
  if os.environ.get("CI", "").lower() == "true" and glue_data_dir() is None:
    pytest.exit("CI=true but no GLUE data: set $SHARCS_DATA_DIR or provide ../shared/data/glue "
                "beside the checkout (the tests that need it would otherwise be skipped)",
                returncode=1)


def glue_data_dir() -> pathlib.Path | None:
  from sharcs_jax.data import glue
  found = glue.resolve_data_dir(None)
  return None if found is None else pathlib.Path(found)


needs_glue = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")


def without_time(report: dict) -> dict:
  """A run's report without its wall-clock time: what must repeat exactly."""
  return {k: v for k, v in report.items() if k != "train_seconds"}


def real_sentences(count: int) -> list[str]:
  """SST-2 dev sentences: real text of mixed lengths."""
  data_dir = glue_data_dir()
  if data_dir is None:
    import datasets  # only reached with network access
    return list(datasets.load_dataset("nyu-mll/glue", "sst2", split="validation")["sentence"][:count])
  with open(data_dir / "SST-2" / "dev.tsv", newline="") as f:
    rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
  return [row["sentence"] for row in rows[:count]]


def built_once(tmp_path_factory, name: str, build):
  """`build(directory)`'s result, built once per test session: the first pytest-xdist worker to
  ask builds it into a folder all workers share, under a lock; the others wait and read it back."""
  root = tmp_path_factory.getbasetemp()
  if os.environ.get("PYTEST_XDIST_WORKER"):
    root = root.parent  # the session's folder, above each worker's own
  directory, result = root / name, root / f"{name}.pickle"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
    if not result.exists():
      shutil.rmtree(directory, ignore_errors=True)  # what a failed build here left
      directory.mkdir()
      built = pickle.dumps(build(directory))
      result.with_suffix(".partial").write_bytes(built)
      result.with_suffix(".partial").rename(result)
  return pickle.loads(result.read_bytes())


def write_tiny_backbone(path: pathlib.Path) -> str:
  import torch
  import transformers  # the test extra's torch writes the checkpoint

  torch.manual_seed(0)  # the same weights whichever tests ran before in this process
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128)
  transformers.BertModel(cfg).save_pretrained(path)
  minilm = weights.resolve_model_dir("all-MiniLM-L6-v2")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{minilm}/{name}", path)
  return str(path)


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
  """A 3-layer, 32-wide random BERT with all-MiniLM-L6-v2's tokenizer: compiles in a second."""
  return built_once(tmp_path_factory, "tiny_bert", write_tiny_backbone)


def tiny_run_config(backbone: str, **overrides):
  """The QQP smoke config on a tiny backbone and 96 examples: a whole training run in seconds.

  One length bucket: each bucket is one more train-step compile per width (a tiny run 53 s ->
  30 s on 2 AVX2 cores); runs that test length buckets pass their own."""
  from sharcs_jax import config as config_lib

  config = config_lib.load_config(str(REPO_ROOT / "configs" / "qqp.py:smoke"))
  config.data_dir = str(glue_data_dir())
  config.model.backbone = backbone
  config.data.train_limit, config.data.dev_limit = 96, 48
  config.data.length_buckets = (64,)
  config.train.batch_size = config.eval.batch_size = 16
  config.train.epochs, config.hardness.window = 2, 1
  config.hardness.ranges = ((0.5, 1.0), (0.3, 0.8), (0.0, 0.55))
  config.model.reorder_batches = 1
  config.train.progress_bar = False
  config.routing.budget, config.routing.calibration_examples = "1.1x", 32
  for field, value in overrides.items():
    section, key = field.split("__")
    config[section][key] = value
  return config


@pytest.fixture(scope="session")
def trained(tiny_backbone, tmp_path_factory):
  """(workdir, report) of one uninterrupted tiny run, shared by the tests (and workers) that read
  it."""
  from sharcs_jax.train import loop as train

  return built_once(tmp_path_factory, "trained", lambda workdir: (
      workdir, train.train_and_evaluate(tiny_run_config(tiny_backbone), str(workdir))))


@pytest.fixture(scope="session")
def tiny_config() -> EncoderConfig:
  return EncoderConfig(layout="bert", vocab_size=50, hidden_size=32, num_layers=4, num_heads=4,
                       intermediate_size=48, max_position_embeddings=32, type_vocab_size=2)


@pytest.fixture(scope="session")
def tiny_model(tiny_config) -> SharcsModel:
  return SharcsModel(tiny_config, num_classes=3, widths=(0.25, 0.5, 1.0), router_layer=2,
                     router_hidden=16)


@pytest.fixture(scope="session")
def tiny_params(tiny_model):
  return noisy_layernorms(init_params(tiny_model, jax.random.key(0)))


def noisy_layernorms(params):
  """Fresh LayerNorms are exactly 1/0; randomise them so that any mix-up of norms shows."""
  leaves, tree = jax.tree_util.tree_flatten_with_path(params)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  noisy = [x + 0.1 * jax.random.normal(k, x.shape) if "ln" in jax.tree_util.keystr(p) else x
           for (p, x), k in zip(leaves, keys)]
  return jax.tree_util.tree_unflatten(tree, noisy)


def engine_gflops_by_exit(engine, data) -> dict[str, np.ndarray]:
  """Per-row GFLOPs [N] the served `Engine` counts on `data` when every row leaves at one
  stage (through the stages that lead there), by the stage's route name ("layer 2 at width
  0.5")."""
  from sharcs_jax.serve.routing import STOP, ExitCascade

  @dataclasses.dataclass(frozen=True)
  class LeaveAt(ExitCascade):
    at: int = 0

    def next_stages_at(self, stage, outputs, threshold):
      skip = self.narrow_count and stage == self.narrow_first - 1 and not self.is_narrow(self.at)
      after = self.narrow_first + self.narrow_count if skip else stage + 1
      return np.full(len(outputs[0]), STOP if stage == self.at else after, np.int64)

  out = {}
  for at, name in enumerate(engine.route_names()):
    served = engine.with_rule(LeaveAt(**vars(engine.layout_rule(0.0)), at=at)).run(data)
    assert (served.exit_layers == engine.exit_layers[at]).all()
    out[name] = served.gflops
  return out


def assert_report_gflops_are_the_engines(workdir, summary: dict, config) -> None:
  """Each exit's GFLOPs in an early-exit run's report (its full-width and narrow exits) and its
  served row's are, on the same dev rows, what the served `Engine` counts (within 1%)."""
  from sharcs_jax.data import batching, glue
  from sharcs_jax.run import load_run
  from sharcs_jax.serve.engine import Engine
  from sharcs_jax.serve.layout import route_name

  run = load_run(str(workdir))  # an exit after every layer, as the report has
  engine = Engine.from_run(run, exit_layers=range(1, run.model.encoder.num_layers + 1))
  (dev,) = batching.encode_splits([glue.run_splits(config)[1]], engine.tokenizer,
                                  engine.length_buckets)
  reported = {route_name(k + 1, 1.0): e["gflops"] for k, e in enumerate(summary["per_exit"])}
  reported.update({route_name(e["exit_layer"], e["width"]): e["gflops"]
                   for e in summary["narrow"]})
  served = engine_gflops_by_exit(engine, dev)
  assert set(reported) == set(served)
  np.testing.assert_allclose([reported[k] for k in served],
                             [served[k].mean() for k in served], rtol=0.01)
  row = summary["served"]
  rule = engine.layout_rule(row["threshold"], row["narrow_threshold"], row["signal"])
  assert row["gflops"] == pytest.approx(engine.with_rule(rule).run(dev).gflops.mean(), rel=0.01)


@pytest.fixture(scope="session")
def tiny_batch():
  """Two examples of different lengths, padded to 10 tokens."""
  ids = jax.random.randint(jax.random.key(2), (2, 10), 1, 50)
  mask = jax.numpy.array([[1] * 10, [1] * 6 + [0] * 4])
  ids = ids * mask
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": jax.numpy.zeros_like(ids),
          "label": jax.numpy.array([0, 2])}


# The trade-off benchmark on the tiny backbone: every method, one SHARCS threshold, K = 2 and 1,
# one length bucket (as `tiny_run_config`).
# No weight decay and no reordering, so that a static run's untouched parameters stay bit-equal
# to the pretrained start (test_baselines reads that run).
TRADEOFF_OVERRIDES = (
    "model.widths=(0.5, 1.0)", "hardness.ranges=((0.6, 1.0), (0.0, 0.6))", "data.train_limit=96",
    "data.dev_limit=48", "data.length_buckets=(64,)", "train.batch_size=16", "eval.batch_size=16",
    "routing.calibration_examples=32", "model.reorder=False", "train.weight_decay=0.0",
    "train.sandwich=True", "train.distill=inplace")
TRADEOFF_ARGS = ("--router_layers=1", "--thresholds=0.6", "--budgets=1.2x,9x")


def assert_png(path: pathlib.Path) -> None:
  """A real plot: PNG's signature and more than an empty canvas's bytes."""
  data = path.read_bytes()
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000, (path, len(data))


def run_benchmark(module: str, out: pathlib.Path, *args: str, report: str,
                  timeout: int = 900) -> tuple[dict, subprocess.CompletedProcess]:
  """(OUT/REPORT.json's data, the finished process) of `python -m benchmarks.MODULE --out=OUT
  ARGS`, run as a user runs it: from the repository root, finding the GLUE data as tests do."""
  env, data_dir = dict(os.environ), glue_data_dir()
  if data_dir is not None:
    env["SHARCS_DATA_DIR"] = str(data_dir)
  result = subprocess.run([sys.executable, "-m", f"benchmarks.{module}", f"--out={out}", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO_ROOT, env=env)
  assert result.returncode == 0, result.stderr[-3000:]
  return json.loads((out / f"{report}.json").read_text()), result


# The exported model is loaded in a fresh process that may not import these (nor jax, for an
# ONNX Runtime export: there `import jax` is made to fail).
FORBIDDEN_IN_LOADER = ("flax", "optax", "orbax", "transformers", "torch")
NO_JAX = ("jax", "jaxlib")
LOADER = """
import json, sys
blocked, forbidden = (names.split(",") if names else [] for names in sys.argv[4:6])
for name in blocked:
  sys.modules[name] = None  # `import name` now raises ImportError
from sharcs_jax.serve.export.loader import ExportedModel
model = ExportedModel.load(sys.argv[1])
out = model.predict(json.load(open(sys.argv[2])))
imported = sorted(m for m, module in sys.modules.items()  # None: blocked, not loaded
                  if module is not None and m.split(".")[0] in forbidden)
json.dump({"labels": out.labels.tolist(), "probabilities": out.probabilities.tolist(),
           "routes": list(out.routes), "forbidden_modules": imported}, open(sys.argv[3], "w"))
"""


def export_and_compare(workdir, out: pathlib.Path, *, runtime: str = "xla",
                       precision: str = "fp32", budget: str = "", limit: int = 48
                       ) -> tuple[pathlib.Path, dict]:
  """(export directory, parity) of the engine of `workdir` (SHARCS or early exit; at `budget`,
  else the run's own rule) exported into OUT/export and predicting the first `limit` dev rows in
  a fresh process, against the engine here: the share of equal labels and routes (widths, exits),
  the largest probability difference, and what the loader imported that it may not. A budget's
  rule reads the max-probability signal."""
  from sharcs_jax.run import load_run
  from sharcs_jax.serve.export import writer as export
  from sharcs_jax.serve.engine import Engine

  run = load_run(str(workdir))
  engine = Engine.from_run(run, budget=budget, signal="max_prob", runtime=runtime,
                           precision=precision)
  texts = run.splits("dev", limit=limit)[0].texts
  directory = out / "export"
  manifest = export.export_engine(engine, str(directory))
  reference = engine.predict(texts)
  blocked = NO_JAX if runtime == "onnxruntime" else ()
  (out / "texts.json").write_text(json.dumps(texts))
  result = subprocess.run(
      [sys.executable, "-c", LOADER, str(directory), str(out / "texts.json"),
       str(out / "loaded.json"), ",".join(blocked), ",".join(FORBIDDEN_IN_LOADER + blocked)],
      capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  loaded = json.loads((out / "loaded.json").read_text())
  return directory, {
      "examples": len(texts), "model": manifest["model"], "routing": manifest["routing"],
      "runtime": manifest["runtime"], "precision": manifest["precision"],
      "imports_blocked_in_loader": list(blocked),
      "forbidden_modules_imported": loaded["forbidden_modules"],
      "labels_equal": float(np.mean(np.asarray(loaded["labels"]) == reference.labels)),
      "routes_equal": float(np.mean(np.asarray(loaded["routes"]) == np.asarray(reference.routes))),
      "max_probability_difference": float(np.abs(
          np.asarray(loaded["probabilities"], np.float32) - reference.probabilities).max()),
      "files": sorted(os.listdir(directory))}


def damaged_copy(directory: pathlib.Path, tmp_path: pathlib.Path, change) -> str:
  """A copy of an export directory after `change(copy, manifest)`, its manifest rewritten."""
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  change(copy, manifest)
  (copy / "manifest.json").write_text(json.dumps(manifest))
  return str(copy)


def run_tradeoff(backbone: str, out: pathlib.Path, *extra: str):
  """(tradeoff_qqp.json's data, the finished process) of one benchmark invocation."""
  return run_benchmark(
      "tradeoff", out, f"--config={REPO_ROOT / 'configs' / 'qqp.py'}:smoke",
      f"--config.model.backbone={backbone}", *(f"--config.{o}" for o in TRADEOFF_OVERRIDES),
      *extra, report="tradeoff_qqp", timeout=1800)  # seven tiny runs: 590 s alone on 2 AVX2 cores


@pytest.fixture(scope="session")
def tradeoff(tiny_backbone, tmp_path_factory):
  """(output directory, data) of the benchmark run once with every method."""
  out = tmp_path_factory.mktemp("tradeoff")
  data, _ = run_tradeoff(tiny_backbone, out, *TRADEOFF_ARGS)
  return out, data
