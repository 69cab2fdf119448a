"""The CLI entry point."""

from __future__ import annotations


def test_only_closed_loop_callbacks_are_silenced():
  # the CLI's hook drops the abandoned checkpoint reads' "Event loop is closed" and nothing else
  import types

  from sharcs_jax.main import ignore_closed_loop_callbacks

  seen = []
  hook = ignore_closed_loop_callbacks(seen.append)
  closed = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed"))
  other = types.SimpleNamespace(exc_value=RuntimeError("Event loop is closed, and more"))
  value = types.SimpleNamespace(exc_value=ValueError("Event loop is closed"))
  for unraisable in (closed, other, value):
    hook(unraisable)
  assert seen == [other, value]
