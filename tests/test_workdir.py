"""One writer per workdir: the lock is exclusive, names its holder and dies with it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT, glue_data_dir, needs_glue, without_time
from sharcs_jax import workdir


def test_second_holder_fails_at_once_naming_the_first(tmp_path):
  with workdir.exclusive(str(tmp_path)):
    start = time.monotonic()
    with pytest.raises(workdir.WorkdirBusy, match=rf"in use by process {os.getpid()} \(lock "):
      with workdir.exclusive(str(tmp_path)):
        pass
    assert time.monotonic() - start < 1.0  # no waiting for the holder
  with workdir.exclusive(str(tmp_path)):  # released on leaving, and again on an error inside
    with pytest.raises(KeyError):
      with workdir.exclusive(str(tmp_path / "other")):
        raise KeyError("inside")
  with workdir.exclusive(str(tmp_path / "other")):
    pass


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import sys, time; from sharcs_jax import workdir\n"
       "with workdir.exclusive(sys.argv[1]):\n  print('held', flush=True); time.sleep(600)",
       str(tmp_path)], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(workdir.WorkdirBusy, match=f"in use by process {holder.pid} "):
      with workdir.exclusive(str(tmp_path)):
        pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait()
  with workdir.exclusive(str(tmp_path)):  # kill -9 released it
    assert (tmp_path / workdir.LOCK_FILE).read_text().strip() == str(os.getpid())


@needs_glue
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
  assert without_time(json.loads((run / "report.json").read_text())) == without_time(lone)
