"""The request and response shapes of text-embeddings-inference's `/predict`, as pure functions.

TEI decides a request's shape from the model's field count: for a pair task `[a, b]` is one pair
and `[[a, b], ...]` a batch; for a one-text task `"t"` is one input and `["t1", ...]` a batch. Its
answer is `[{"label", "score"}]` per input, sorted by score. Keeping these shapes lets an existing
TEI client call this server unchanged.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import numpy as np


@dataclasses.dataclass(frozen=True)
class RequestError(Exception):
  """A request the server answers with `status` and `{"error", "error_type"}`."""
  status: int
  error_type: str
  message: str

  def body(self) -> dict[str, str]:
    return {"error": self.message, "error_type": self.error_type}


def is_row(value: Any, num_fields: int) -> bool:
  """One input: a string for a one-text task, a list of `num_fields` strings for a pair task."""
  if num_fields == 1:
    return isinstance(value, str)
  return isinstance(value, list) and len(value) == num_fields and all(
      isinstance(v, str) for v in value)


def parse_inputs(body: Any, num_fields: int, max_client_batch_size: int
                 ) -> tuple[list[tuple[str, ...]], bool]:
  """(rows, single) from a `/predict` body; `single` when it held one input, not a batch."""
  if not isinstance(body, dict) or "inputs" not in body:
    raise RequestError(422, "validation", "the body must be a JSON object with 'inputs'")
  inputs = body["inputs"]
  for key in ("raw_scores", "truncate", "details"):
    if key in body and not isinstance(body[key], bool):
      raise RequestError(422, "validation", f"'{key}' must be true or false")
  if body.get("truncate") is False:
    raise RequestError(422, "validation", "'truncate': false is not supported: inputs longer "
                       "than the longest length bucket are truncated")
  if isinstance(inputs, list) and not inputs:
    raise RequestError(400, "empty", "'inputs' is empty")
  if is_row(inputs, num_fields):
    rows, single = [inputs], True
  elif isinstance(inputs, list) and all(is_row(v, num_fields) for v in inputs):
    rows, single = inputs, False
  else:
    shape = "a string" if num_fields == 1 else f"a list of {num_fields} strings"
    raise RequestError(422, "validation", f"'inputs' must be {shape}, or a list of those: this "
                       f"model takes {num_fields} text field(s) per input")
  if any(not "".join(row if isinstance(row, list) else [row]).strip() for row in rows):
    raise RequestError(400, "empty", "an input is empty")
  if len(rows) > max_client_batch_size:
    raise RequestError(413, "payload", f"{len(rows)} inputs exceed --max_client_batch_size="
                       f"{max_client_batch_size}")
  return [tuple(row) if isinstance(row, list) else (row,) for row in rows], single


def scores(probabilities: np.ndarray, label_names: Sequence[str], raw_scores: bool
           ) -> list[dict[str, Any]]:
  """One input's `[{"label", "score"}]`, highest first; logits (log-probabilities) if raw."""
  values = np.log(np.maximum(probabilities, 1e-30)) if raw_scores else probabilities
  order = np.argsort(-probabilities, kind="stable")
  return [{"label": label_names[i], "score": float(values[i])} for i in order]
