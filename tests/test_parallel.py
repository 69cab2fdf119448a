"""Data parallelism: 4 simulated devices and 2 jax.distributed processes train exactly as one
device does with the same global batch, and a 4-device checkpoint resumes on 1 device."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO_ROOT, glue_data_dir, tiny_run_config
from sharcs_jax.train import loop as train
from sharcs_jax.checkpoint import on_one_device

pytestmark = pytest.mark.skipif(glue_data_dir() is None,
                                reason="needs the local GLUE copy (network otherwise)")
TOLERANCE = 1e-5


def _launch(backbone, workdir, out, devices=1, **options) -> subprocess.Popen:
  command = [sys.executable, str(REPO_ROOT / "tests" / "parallel_run.py"), f"--devices={devices}",
             f"--backbone={backbone}", f"--workdir={workdir}", f"--out={out}"]
  command += [f"--{k}={v}" for k, v in options.items()]
  env = {**os.environ, "SHARCS_DATA_DIR": str(glue_data_dir())}
  return subprocess.Popen(command, env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


def _finish(process: subprocess.Popen, out) -> dict:
  output, _ = process.communicate(timeout=600)
  assert process.returncode == 0, output[-4000:]
  with open(out) as f:
    return json.load(f)


def _checkpoint(workdir):
  """The latest train state as nested dicts on this process's device, from any mesh."""
  manager = ocp.CheckpointManager(f"{workdir}/checkpoints")
  step = manager.latest_step()
  metadata = ocp.StandardCheckpointer().metadata(f"{workdir}/checkpoints/{step}/state")
  tree = getattr(metadata, "item_metadata", metadata)
  target = on_one_device(jax.tree_util.tree_map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), tree.tree if hasattr(tree, "tree") else tree))
  return step, manager.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(target))).state


def _assert_same_run(summary, workdir, reference_summary, reference_workdir):
  for a, b in zip(summary["history"], reference_summary["history"], strict=True):
    assert a["train_loss"] == pytest.approx(b["train_loss"], abs=TOLERANCE)
    assert a["full_width"]["accuracy"] == b["full_width"]["accuracy"]
    assert a["sharcs"]["share_per_width"] == b["sharcs"]["share_per_width"]
  assert summary["sharcs"]["accuracy"] == reference_summary["sharcs"]["accuracy"]
  step, state = _checkpoint(workdir)
  reference_step, reference = _checkpoint(reference_workdir)
  assert step == reference_step and int(state["step"]) == int(reference["step"])
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=TOLERANCE),
                         state["params"], reference["params"])
  np.testing.assert_array_equal(state["hardness"]["labels"], reference["hardness"]["labels"])
  np.testing.assert_allclose(state["hardness"]["confidence"], reference["hardness"]["confidence"],
                             atol=TOLERANCE)


@pytest.fixture(scope="module")
def one_device(trained):
  """The single-device run of the same config: (workdir, summary)."""
  return trained


def test_four_devices_train_as_one(tiny_backbone, one_device, tmp_path):
  summary = _finish(_launch(tiny_backbone, tmp_path / "run", tmp_path / "s.json", devices=4),
                    tmp_path / "s.json")
  assert summary["devices"] == 4
  _assert_same_run(summary, tmp_path / "run", one_device[1], one_device[0])


def test_two_processes_agree(tiny_backbone, one_device, tmp_path):
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  outs = [tmp_path / f"process{i}.json" for i in range(2)]
  processes = [_launch(tiny_backbone, tmp_path / "run", outs[i], coordinator=f"localhost:{port}",
                       num_processes=2, process_id=i) for i in range(2)]
  first, second = (_finish(p, out) for p, out in zip(processes, outs))
  assert first["devices"] == second["devices"] == 2
  assert {k: v for k, v in first.items() if k != "train_seconds"} == {
      k: v for k, v in second.items() if k != "train_seconds"}
  _assert_same_run(first, tmp_path / "run", one_device[1], one_device[0])
  assert os.path.isfile(tmp_path / "run" / "report.json")  # written once, by process 0


def test_four_device_checkpoint_resumes_on_one(tiny_backbone, one_device, tmp_path):
  stopped = _finish(_launch(tiny_backbone, tmp_path / "run", tmp_path / "s.json", devices=4,
                            stop_after_epochs=1), tmp_path / "s.json")
  assert stopped["stopped_after_epochs"] == 1 and _checkpoint(tmp_path / "run")[0] == 1
  resumed = train.train_and_evaluate(tiny_run_config(tiny_backbone), str(tmp_path / "run"))
  _assert_same_run(resumed, tmp_path / "run", one_device[1], one_device[0])


def test_batch_must_divide_over_devices(tiny_backbone, tmp_path):
  process = _launch(tiny_backbone, tmp_path / "run", tmp_path / "s.json", devices=3)
  output, _ = process.communicate(timeout=300)
  assert process.returncode != 0
  assert "config.train.batch_size=16 must be a multiple of the 3 devices" in output
