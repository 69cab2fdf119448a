"""Progress reporting: the bar-off path logs rate lines instead of printing a bar."""

from __future__ import annotations

import logging

from sharcs_jax.progress import progress


def test_progress_without_bar_logs_rate_lines(caplog, capsys):
  caplog.set_level(logging.INFO)
  assert list(progress(range(5), "epoch 3", bar=False, log_interval_s=0.0)) == list(range(5))
  lines = [r.getMessage() for r in caplog.records]
  assert lines and all(line.startswith("epoch 3:") for line in lines)
  assert "5/5" in lines[-1] and "batch/s" in lines[-1]
  assert capsys.readouterr().err == ""  # no bar drawn on the terminal


def test_postfix_updates_wait_for_the_log_interval(caplog):
  caplog.set_level(logging.INFO)
  bar = progress(range(50), "epoch 1", bar=False, log_interval_s=3600.0)
  for i in bar:
    bar.set_postfix(loss=f"{i:.3f}", refresh=False)
  lines = [r.getMessage() for r in caplog.records]
  assert len(lines) == 2 and "loss=49.000" in lines[-1]  # start and close, not one per step


def test_quiet_progress_says_nothing(caplog, capsys):
  caplog.set_level(logging.INFO)
  assert list(progress(range(3), "epoch 0", bar=False, quiet=True, log_interval_s=0.0)) == [0, 1, 2]
  assert list(progress(range(3), "epoch 0", bar=True, quiet=True)) == [0, 1, 2]
  assert not caplog.records and capsys.readouterr().err == ""
