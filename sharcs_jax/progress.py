"""Progress of long loops: a tqdm bar on a terminal, the same line in the log otherwise.

Benchmarks and background jobs switch the bar off (carriage returns make a log file unreadable),
but an epoch there still runs for minutes, so it reports its rate to the log once a minute instead.
"""

from __future__ import annotations

import io
from typing import Iterable, TypeVar

from absl import logging
from tqdm import tqdm

T = TypeVar("T")


class _LogStream(io.TextIOBase):
  """A file for tqdm that sends each refreshed bar to absl logging as one line."""

  def write(self, text: str) -> int:
    line = text.strip("\r\n ")
    if line:
      logging.info("%s", line)
    return len(text)


def progress(iterable: Iterable[T], desc: str, *, bar: bool, quiet: bool = False,
             log_interval_s: float = 60.0) -> tqdm:
  """`iterable` wrapped to report progress: a live bar if `bar`, else a log line every interval.

  `quiet` silences both (processes other than the primary in a multi-host job).
  """
  if bar:
    return tqdm(iterable, desc=desc, unit="batch", mininterval=2.0, disable=quiet)
  # maxinterval=inf: tqdm's monitor thread would otherwise log a second, stale line per interval.
  return tqdm(iterable, desc=desc, unit="batch", mininterval=log_interval_s,
              maxinterval=float("inf"), ascii=True, file=_LogStream(), disable=quiet)
