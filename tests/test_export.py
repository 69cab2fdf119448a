"""The portable export: a fresh process without flax/optax/orbax/transformers reproduces the
engine, and a damaged export directory is refused with a clear error."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, damaged_copy, export_and_compare, glue_data_dir
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.export import writer as export
from sharcs_jax import report
from sharcs_jax.data import glue
from sharcs_jax.errors import RunError
from sharcs_jax.serve.export.loader import FORMAT_VERSION, ExportedModel, file_sha256

pytestmark = [pytest.mark.slow, pytest.mark.skipif(
    glue_data_dir() is None, reason="needs the local GLUE copy (network otherwise)")]


@pytest.fixture(scope="module")
def exported(trained, tmp_path_factory):
  """Export, then predict dev in a fresh process (`export_and_compare`)."""
  return export_and_compare(trained[0], tmp_path_factory.mktemp("parity"))


def test_fresh_process_reproduces_the_engine(exported):
  _, parity = exported
  assert parity["examples"] == 48
  assert parity["forbidden_modules_imported"] == []
  assert parity["labels_equal"] == 1.0 and parity["routes_equal"] == 1.0
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


def _drop_a_parameter(directory, manifest):
  with np.load(directory / "params.npz") as flat:
    kept = {k: flat[k] for k in flat.files if k != "embeddings/ln/bias"}
  np.savez(directory / "params.npz", **kept)
  manifest["params"]["sha256"] = file_sha256(str(directory / "params.npz"))


@pytest.mark.parametrize("change, error, message", [
    (lambda d, m: (d / "adaptive_0.5.jaxexport").unlink(), FileNotFoundError,
     r"part 'adaptive_0.5' \(adaptive_0.5.jaxexport\) is missing"),
    (lambda d, m: m.update(format_version=1), ValueError,
     f"format version 1; this loader reads version {FORMAT_VERSION}"),
    (lambda d, m: m.update(widths=[1.0, 0.5, 0.25]), ValueError,
     r"widths \[1.0, 0.5, 0.25\] must increase to 1.0, the order in which the router scores"),
    (lambda d, m: m.update(length_buckets=[1024]), ValueError,  # the tiny run's one bucket
     "length bucket 1024 exceeds the model's 128 positions"),
    (lambda d, m: m.update(length_buckets=[32, 64, 1024]), ValueError,
     r"gflops_per_example must be positive, \[widths 3, length buckets 3\]"),
    (lambda d, m: m["parts"].update({"adaptive_0.25": m["parts"]["adaptive_1"]}), ValueError,
     "the file listed for part 'adaptive_0.25' computes 'adaptive_1'"),
    (lambda d, m: m.pop("routing"), ValueError, r"keys \['routing'\] are missing"),
    (lambda d, m: _drop_a_parameter(d, m), ValueError,
     r"params.npz does not fit the parts: 1 parameter\(s\) differ, e.g. 'embeddings/ln/bias' is "
     r"missing where the parts take \(32,\)"),
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
    ExportedModel.load(damaged_copy(directory, tmp_path, change))


def test_not_an_export(tmp_path):
  with pytest.raises(FileNotFoundError, match="is not a SHARCS export: manifest.json is missing"):
    ExportedModel.load(str(tmp_path))


def test_truncated_manifest_names_the_file(exported, tmp_path):
  copy = tmp_path / "copy"
  shutil.copytree(exported[0], copy)
  text = (copy / "manifest.json").read_text()
  (copy / "manifest.json").write_text(text[:len(text) // 2])
  with pytest.raises(ValueError, match=rf"{copy / 'manifest.json'}: not valid JSON"):
    ExportedModel.load(str(copy))


def _listing(directory):
  return sorted((str(p.relative_to(directory)), p.stat().st_size) for p in directory.rglob("*"))


def test_export_into_the_workdir_is_refused(trained, tmp_path):
  """`--output=W` used to replace the whole training workdir with the export."""
  run = tmp_path / "run"
  shutil.copytree(trained[0], run)
  before = _listing(run)
  for output in (run, run / "export", tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "sharcs_jax.main", "--mode=export", f"--workdir={run}",
         f"--output={output}"], cwd=REPO_ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 1, result.stderr[-3000:]
    assert result.stderr.splitlines()[-1].startswith(f"FATAL --output={output} "), result.stderr
    assert "Traceback" not in result.stderr
  assert _listing(run) == before


def test_export_never_deletes_other_files(trained, tmp_path):
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("keep me")
  with pytest.raises(RunError, match=r"holds other files \(notes.txt\) and is not an earlier "
                     "export"):
    export.check_output(str(tmp_path / "mine"), str(trained[0]))
  (tmp_path / "file").write_text("keep me too")
  with pytest.raises(RunError, match="is a file, not a directory"):
    export.check_output(str(tmp_path / "file"), str(trained[0]))
  assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
  assert (tmp_path / "file").read_text() == "keep me too"


def test_export_replaces_an_earlier_export(exported, trained, tmp_path):
  target = tmp_path / "export"
  shutil.copytree(exported[0], target)
  (target / "stale.jaxexport").write_text("from an earlier export")
  engine = Engine.from_workdir(str(trained[0]), batch_buckets=(16,))
  manifest = export.export_engine(engine, str(target))
  assert not (target / "stale.jaxexport").exists()
  assert sorted(os.listdir(tmp_path)) == ["export"]  # no partial or old folder left behind
  assert json.loads((target / "manifest.json").read_text()) == manifest
  assert oct((target / "manifest.json").stat().st_mode & 0o777) == oct(0o666 & ~report.umask())
  assert ExportedModel.load(str(target)).layout.widths == engine.layout.widths


def test_exported_cascade_equals_the_engine(trained, tmp_path):
  """The rule travels in the manifest; the loader runs the cascade through the same dispatch."""
  engine = Engine.from_workdir(str(trained[0]), budget="1.1x", rule="cascade")
  manifest = export.export_engine(engine, str(tmp_path / "export"))
  assert manifest["routing"]["rule"] == "cascade"
  assert manifest["precision"] == "fp32" and manifest["compute_dtype"] == "float32"
  assert manifest["routing"]["threshold"] == engine.rule.threshold
  model = ExportedModel.load(str(tmp_path / "export"))
  texts = glue.load_split("qqp", "dev", str(glue_data_dir()), limit=48).texts
  ours, theirs = model.predict(texts), engine.predict(texts)
  assert ours.labels.tolist() == theirs.labels.tolist()
  assert ours.widths.tolist() == theirs.widths.tolist()
  assert len(set(theirs.widths.tolist())) > 1  # the cascade stopped some inputs early
  np.testing.assert_allclose(ours.probabilities, theirs.probabilities, atol=1e-5)
  np.testing.assert_allclose(ours.gflops, theirs.gflops, rtol=1e-9)


@pytest.mark.parametrize("width", [0.25, 0.5, 0.125, 1.0])
def test_exported_part_names_spell_widths_as_the_model_does(width):
  # the loader spells the width itself (it does not import the flax model package); the two
  # spellings must not drift apart, or an export would name parts its loader cannot find
  from sharcs_jax.model.widths import width_label
  from sharcs_jax.serve.export.loader import adaptive_part_name

  assert adaptive_part_name(width) == f"adaptive_{width_label(width)}"
