"""Predict mode: a TSV or JSONL file of inputs -> predictions (JSONL) and a summary, via the engine.

Inputs name their texts the way GLUE does: a TSV with a header holding the task's columns (a GLUE
dev file works as is), or JSONL objects with the Hugging Face column names (`question1`,
`question2` for QQP; `sentence` for SST-2) or `text` / `text_pair`. A label, when present
(`label`, or the TSV's label column), adds accuracy to the summary.
"""

from __future__ import annotations

import csv
import io
import json
import os
import sys
import time
from typing import Any

import numpy as np

from sharcs_jax import report
from sharcs_jax.errors import DataError, MissingFileError
from sharcs_jax.data.glue import Task
from sharcs_jax.serve.dispatch import BATCH_BUCKETS
from sharcs_jax.serve.engine import Engine


def _label_id(value: Any, task: Task, where: str) -> int:
  for names in (task.tsv_labels, task.label_names):
    if str(value) in names:
      return names.index(str(value))
  raise DataError(f"{where}: label {value!r} is not one of {list(task.tsv_labels)} or "
                  f"{list(task.label_names)}")


def read_text(path: str) -> str:
  """The file as text; a byte that is not UTF-8 is an error naming file, line and column."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return data.decode("utf-8-sig")
  except UnicodeDecodeError as e:
    line = data.count(b"\n", 0, e.start) + 1
    column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
    raise DataError(f"{path}:{line}: byte 0x{data[e.start]:02x} at column {column} is not "
                    "UTF-8; save the file as UTF-8") from None


def _blank(row: list[str]) -> bool:
  return not row or (len(row) == 1 and not row[0].strip())


def read_tsv_inputs(path: str, task: Task) -> tuple[list[tuple[str, ...]], list[int] | None]:
  """Blank lines are skipped, as in JSONL."""
  csv.field_size_limit(sys.maxsize)
  with io.StringIO(read_text(path), newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
      raise DataError(f"{path}: empty file, expected a header row")
    for names in (task.text_columns, task.hub_text_columns):
      if all(c in header for c in names):
        text_columns = [header.index(c) for c in names]
        break
    else:
      raise DataError(f"{path}: header {header} lacks the {task.name} text columns "
                      f"{list(task.text_columns)} (or {list(task.hub_text_columns)})")
    label_column = next((header.index(c) for c in (task.label_column, "label") if c in header),
                        None)
    texts, labels = [], []
    for row in reader:
      where = f"{path}:{reader.line_num}"
      if _blank(row):
        continue
      if len(row) != len(header):
        raise DataError(f"{where}: {len(row)} fields, expected {len(header)} as in the header")
      texts.append(tuple(row[c] for c in text_columns))
      if label_column is not None:
        labels.append(_label_id(row[label_column], task, where))
  return texts, labels if label_column is not None else None


def read_jsonl_inputs(path: str, task: Task) -> tuple[list[tuple[str, ...]], list[int] | None]:
  generic = ("text", "text_pair")[:len(task.hub_text_columns)]
  texts, labels = [], []
  with io.StringIO(read_text(path)) as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      where = f"{path}:{number}"
      try:
        item = json.loads(line)
      except json.JSONDecodeError as e:
        raise DataError(f"{where}: not valid JSON ({e.msg})") from None
      if not isinstance(item, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(item).__name__}")
      names = next((n for n in (task.hub_text_columns, generic) if all(k in item for k in n)),
                   None)
      if names is None:
        raise DataError(f"{where}: {task.name} needs keys {list(task.hub_text_columns)} (or "
                        f"{list(generic)}); the object has {sorted(item)}")
      if not all(isinstance(item[k], str) for k in names):
        raise DataError(f"{where}: {list(names)} must be strings")
      texts.append(tuple(item[k] for k in names))
      if "label" in item:
        labels.append(_label_id(item["label"], task, where))
  if labels and len(labels) != len(texts):
    raise DataError(f"{path}: {len(labels)} of {len(texts)} inputs have a label; give all or none")
  return texts, labels or None


def read_inputs(path: str, task: Task) -> tuple[list[tuple[str, ...]], list[int] | None]:
  if not os.path.isfile(path):
    raise MissingFileError(f"input file {path!r} does not exist")
  if path.endswith(".tsv"):
    return read_tsv_inputs(path, task)
  if path.endswith(".jsonl"):
    return read_jsonl_inputs(path, task)
  raise DataError(f"{path}: unknown input format; use a .tsv or a .jsonl file")


def check_paths(input_path: str, output_path: str) -> None:
  """Before any work: predictions and their summaries must not replace the input."""
  if not os.path.isfile(input_path):
    raise MissingFileError(f"input file {input_path!r} does not exist")
  for path in (output_path, f"{output_path}.summary.json", f"{output_path}.summary.md"):
    if os.path.realpath(path) == os.path.realpath(input_path) or (
        os.path.exists(path) and os.path.samefile(path, input_path)):
      raise DataError(f"--output={output_path} would overwrite the input {input_path} (with "
                      f"{path}); write the predictions elsewhere")


def run(workdir: str, input_path: str, output_path: str,
        batch_buckets: tuple[int, ...] = BATCH_BUCKETS, budget: str = "", rule: str = "router",
        signal: str = "max_prob", start_budget: str = "", precision: str = "fp32",
        runtime: str = "xla") -> dict[str, Any]:
  """Writes predictions to `output_path` and the summary beside it (`.summary.json`, `.md`).

  `budget` ("2.5x", "0.4gflops"): route by the rule named `rule` ("router", "cascade",
  "router+cascade"), calibrated on the run's held-out examples; an early-exit run by its exit
  rule, each row's `exit_layer` in place of its width (`Engine.from_run`).
  """
  check_paths(input_path, output_path)
  engine = Engine.from_workdir(workdir, batch_buckets=batch_buckets, budget=budget, rule=rule,
                               signal=signal, start_budget=start_budget, precision=precision,
                               runtime=runtime)
  by_width = engine.layout.by_width
  task = engine.task
  texts, labels = read_inputs(input_path, task)
  start = time.perf_counter()
  data = engine.encode(texts, labels)
  predictions = engine.run(data)
  seconds = time.perf_counter() - start
  full = engine.full_gflops(data)
  shares = predictions.share_per_route(engine.route_names())
  with report.atomic_path(output_path) as tmp, open(tmp, "w") as f:
    for i in range(len(texts)):
      f.write(json.dumps({
          "index": i, "label": task.label_names[predictions.labels[i]],
          "probabilities": [round(float(p), 6) for p in predictions.probabilities[i]],
          **predictions.route_detail(i), "gflops": float(predictions.gflops[i])}) + "\n")
  summary = {
      "task": task.name, "examples": len(texts), "seconds": seconds,
      "routing": engine.rule.budget or ("router argmax" if by_width else "full depth"),
      "rule": engine.rule.name, "runtime": engine.runtime, "precision": engine.precision,
      "examples_per_second": len(texts) / seconds if seconds else 0.0,
      "share_per_width" if by_width else "share_per_exit": shares,
      "gflops_per_example": float(predictions.gflops.mean()) if len(texts) else 0.0,
      "full_width_gflops_per_example": float(full.mean()) if len(texts) else 0.0,
  }
  if len(texts):
    summary["flops_reduction"] = summary["full_width_gflops_per_example"] / summary[
        "gflops_per_example"]
  if labels is not None and len(texts):
    summary["accuracy"] = float(np.mean(predictions.labels == np.asarray(labels)))
  report.write_json(output_path + ".summary.json", summary)
  rows = [[k, v if not isinstance(v, dict) else
           ", ".join(f"{w}: {100 * s:.1f}%" for w, s in v.items())] for k, v in summary.items()]
  report.write_atomic(output_path + ".summary.md",
                      f"# Predictions for {input_path}\n\n" + report.markdown_table(
                          ["", "value"], rows))
  return summary
