"""Texts a user passes in, checked into field tuples before anything is tokenised: one rule for
the engine and the exported loader (plain Python, so the loader can import it)."""

from __future__ import annotations

from typing import Sequence


def text_rows(texts: Sequence[str | Sequence[str]], fields: Sequence[str],
              taker: str) -> list[tuple[str, ...]]:
  """Each input as a tuple of strings, one per field (a lone string is one field). An input with
  another number of fields, or a field that is not a string, is an error naming the input and
  what `taker` (a task, "this model") takes."""
  rows = []
  for i, text in enumerate(texts):
    row = (text,) if isinstance(text, str) else tuple(text)
    if len(row) != len(fields) or not all(isinstance(t, str) for t in row):
      raise ValueError(f"input {i} has {len(row)} field(s) {row!r:.120}; {taker} takes "
                       f"{len(fields)} string(s): {', '.join(fields)}")
    rows.append(row)
  return rows
