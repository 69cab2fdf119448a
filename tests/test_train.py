"""Training end to end: smoke config, resume after an interruption, compiles, bad configs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
import transformers

from conftest import REPO_ROOT, glue_data_dir
from sharcs_jax import config as config_lib
from sharcs_jax import train
from sharcs_jax.model.weights import resolve_model_dir

pytestmark = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory):
  """A 3-layer, 32-wide random BERT with all-MiniLM-L6-v2's tokenizer: compiles in a second."""
  path = tmp_path_factory.mktemp("tiny_bert")
  cfg = transformers.BertConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3,
                                num_attention_heads=4, intermediate_size=64,
                                max_position_embeddings=128)
  transformers.BertModel(cfg).save_pretrained(path)
  minilm = resolve_model_dir("all-MiniLM-L6-v2")
  for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
    shutil.copy(f"{minilm}/{name}", path)
  return str(path)


def _tiny_config(backbone: str, **overrides):
  config = config_lib.load_config(str(REPO_ROOT / "configs" / "qqp.py:smoke"))
  config.data_dir = str(glue_data_dir())
  config.model.backbone = backbone
  config.data.train_limit, config.data.dev_limit = 96, 48
  config.train.batch_size = config.eval.batch_size = 16
  config.train.epochs, config.hardness.window = 2, 1
  config.hardness.ranges = ((0.5, 1.0), (0.3, 0.8), (0.0, 0.55))
  config.model.reorder_batches = 1
  config.train.progress_bar = False
  for field, value in overrides.items():
    section, key = field.split("__")
    config[section][key] = value
  return config


def _final_checkpoint(workdir):
  manager = ocp.CheckpointManager(f"{workdir}/checkpoints")
  step = manager.latest_step()
  restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))
  return step, restored.state


def _without_time(report):
  return {k: v for k, v in report.items() if k != "train_seconds"}


def test_resumed_run_equals_uninterrupted(tiny_backbone, tmp_path, monkeypatch):
  config = _tiny_config(tiny_backbone)
  straight = train.train_and_evaluate(config, str(tmp_path / "straight"))

  original_save = train.Checkpoints.save

  def save_then_crash(self, state, best):
    original_save(self, state, best)
    raise KeyboardInterrupt("simulated kill after the first epoch's checkpoint")

  monkeypatch.setattr(train.Checkpoints, "save", save_then_crash)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(tmp_path / "resumed"))
  assert _final_checkpoint(tmp_path / "resumed")[0] == 1
  monkeypatch.setattr(train.Checkpoints, "save", original_save)
  resumed = train.train_and_evaluate(config, str(tmp_path / "resumed"))

  assert _without_time(resumed) == _without_time(straight)
  step_a, state_a = _final_checkpoint(tmp_path / "straight")
  step_b, state_b = _final_checkpoint(tmp_path / "resumed")
  assert step_a == step_b == 2
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a["params"], state_b["params"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, state_a["hardness"], state_b["hardness"])
  assert state_a["step"] == state_b["step"]
  labels = np.asarray(state_a["hardness"]["labels"])
  assert labels.sum(1).min() >= 1  # every example has at least one admissible width


def test_checkpoint_of_another_config_is_refused(tiny_backbone, tmp_path):
  train.train_and_evaluate(_tiny_config(tiny_backbone, train__epochs=1), str(tmp_path))
  report = (tmp_path / "report.json").read_text()
  with pytest.raises(ValueError, match=r"different config \(fields \['train'\] differ\)"):
    train.train_and_evaluate(_tiny_config(tiny_backbone, train__epochs=2), str(tmp_path))
  assert (tmp_path / "report.json").read_text() == report  # nothing already written is touched


def test_one_compile_per_width_and_bucket(tiny_backbone, tmp_path, monkeypatch):
  traces = []
  original = train.train_step

  def counting_step(state, batch, *, width, **kwargs):
    traces.append((width, batch["input_ids"].shape))
    return original(state, batch, width=width, **kwargs)

  monkeypatch.setattr(train, "train_step", counting_step)
  config = _tiny_config(tiny_backbone)
  train.train_and_evaluate(config, str(tmp_path))
  assert len(traces) == len(set(traces)), traces
  assert {w for w, _ in traces} == set(config.model.widths)  # every width was trained


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
