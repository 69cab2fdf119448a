"""One writer per workdir: an exclusive lock held for the whole of a run that writes there.

`fcntl.flock` on `workdir/.lock`: the kernel releases it on any exit of its holder, kill -9
included, so a lock is never stale. The holder writes its PID into the file so that a second
run can name it. Readers (predict, export, benchmarks) take no lock: they read only finished
checkpoint steps and atomically written reports.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Iterator

from sharcs_jax.errors import RunError

LOCK_FILE = ".lock"


class WorkdirBusy(RunError):
  """Another process holds the workdir."""


def _holder(fd: int) -> str:
  os.lseek(fd, 0, os.SEEK_SET)
  pid = os.read(fd, 64).decode(errors="replace").strip()
  return pid or "unknown"


@contextlib.contextmanager
def exclusive(workdir: str) -> Iterator[None]:
  """Holds `workdir` for this process; raises WorkdirBusy naming the holder's PID at once."""
  os.makedirs(workdir, exist_ok=True)
  path = os.path.join(workdir, LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      raise WorkdirBusy(f"{os.path.abspath(workdir)} is in use by process {_holder(fd)} (lock "
                        f"{path}); wait for it to finish or use another --workdir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    yield
  finally:
    os.close(fd)  # closing the only descriptor releases the lock
