"""The portable export: a fresh process without flax/optax/orbax/transformers reproduces the
engine, and a damaged export directory is refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from conftest import REPO_ROOT, glue_data_dir
from sharcs_jax.engine import Engine
from sharcs_jax.exported import ExportedModel

pytestmark = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """Runs the parity benchmark: export, then predict dev in a fresh process."""
  workdir, _ = trained
  out = tmp_path_factory.mktemp("parity")
  result = subprocess.run(
      [sys.executable, "benchmarks/export_parity.py", f"--workdir={workdir}",
       f"--export_dir={out / 'export'}", f"--out={out}", "--limit=48"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=600,
      env={**os.environ, "SHARCS_DATA_DIR": str(glue_data_dir())})
  assert result.returncode == 0, result.stderr[-3000:]
  return out / "export", json.loads((out / "export_parity.json").read_text())


def test_fresh_process_reproduces_the_engine(exported):
  _, parity = exported
  assert parity["examples"] == 48
  assert parity["forbidden_modules_imported"] == []
  assert parity["labels_equal"] == 1.0 and parity["widths_equal"] == 1.0
  assert parity["max_probability_difference"] <= 1e-5
  assert parity["routing"]["budget"] == "1.1x"  # the rule the run reported travels with it
  assert {"manifest.json", "params.npz", "tokenizer.json", "prefix.jaxexport"} <= set(
      parity["files"])


def test_export_takes_any_batch_size(exported, trained):
  directory, _ = exported
  model = ExportedModel.load(str(directory))
  engine = Engine.from_workdir(str(trained[0]))
  texts = [("How do I learn JAX?", "What is the best way to learn JAX?"), ("", ""),
           (" ".join(["long"] * 300), "short")]
  for count in (1, 3):
    ours, theirs = model.predict(texts[:count]), engine.predict(texts[:count])
    assert ours.labels.tolist() == theirs.labels.tolist()
    assert abs(ours.probabilities - theirs.probabilities).max() <= 1e-5
  with pytest.raises(ValueError, match="input 0 has 1 field"):
    model.predict(["only one question"])


def _damaged(directory, tmp_path, change):
  copy = tmp_path / "copy"
  shutil.copytree(directory, copy)
  manifest = json.loads((copy / "manifest.json").read_text())
  change(copy, manifest)
  (copy / "manifest.json").write_text(json.dumps(manifest))
  return str(copy)


@pytest.mark.parametrize("change, error, message", [
    (lambda d, m: (d / "adaptive_0.5.jaxexport").unlink(), FileNotFoundError,
     r"part 'adaptive_0.5' \(adaptive_0.5.jaxexport\) is missing"),
    (lambda d, m: m.update(format_version=2), ValueError,
     "format version 2; this loader reads version 1"),
    (lambda d, m: m.update(widths=[0.25, 1.0]), ValueError,
     r"lists parts .* but its widths \[0.25, 1.0\] need"),
    (lambda d, m: (d / "prefix.jaxexport").write_bytes(b"not stablehlo"), ValueError,
     "do not match the manifest's SHA-256 for 'prefix'"),
    (lambda d, m: m.update(label_names=["a", "b", "c", "d"]), ValueError,
     "scores 2 classes, the manifest names 4"),
])
def test_damaged_exports_are_refused(exported, tmp_path, change, error, message):
  directory, _ = exported
  with pytest.raises(error, match=message):
    ExportedModel.load(_damaged(directory, tmp_path, change))


def test_not_an_export(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a SHARCS export: manifest.json is missing"):
    ExportedModel.load(str(tmp_path))
