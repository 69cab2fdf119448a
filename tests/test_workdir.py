"""One writer per workdir: the lock is exclusive, names its holder and dies with it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

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
