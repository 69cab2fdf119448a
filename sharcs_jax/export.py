"""Writes a trained model as a portable export directory that `exported.py` runs without flax.

Each part (the prefix with the router, and each width's adaptive part with the head) is
`jax.export`ed with symbolic batch and length, so one file serves every batch size and length
bucket; parameters are an argument (one `.npz`), not constants baked into each part.

    python -m sharcs_jax.main --mode=export --workdir=/tmp/sharcs_qqp --output=/tmp/qqp_export
"""

from __future__ import annotations

import os
import shutil
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import export

from sharcs_jax import report
from sharcs_jax.engine import Engine
from sharcs_jax.exported import FORMAT_VERSION, MANIFEST, adaptive_part_name, file_sha256
from sharcs_jax.model.weights import resolve_model_dir
from sharcs_jax.programs import functions


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


def _export_parts(engine: Engine) -> dict[str, bytes]:
  variables = {"params": jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), engine.params["params"])}
  batch, length = export.symbolic_shape("batch, length")
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32)
  hidden = jax.ShapeDtypeStruct((batch, length, engine.model.encoder.hidden_size), jnp.float32)
  function = functions(engine.model)
  parts = {"prefix": export.export(jax.jit(function["prefix"]))(variables, ids, ids, ids)}
  for width in engine.widths:
    adaptive = jax.jit(function["adaptive"], static_argnames="width")
    parts[adaptive_part_name(width)] = export.export(adaptive)(variables, hidden, ids, width=width)
  return {name: part.serialize() for name, part in parts.items()}


def export_engine(engine: Engine, directory: str) -> dict[str, Any]:
  """Writes the export into `directory` (replacing an earlier export there); returns the manifest."""
  if engine.config is None or engine.task is None:
    raise ValueError("export needs an engine loaded with Engine.from_workdir")
  tmp = directory.rstrip("/") + ".partial"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  files = {}
  for name, blob in _export_parts(engine).items():
    files[name] = f"{name}.jaxexport"
    with open(os.path.join(tmp, files[name]), "wb") as f:
      f.write(blob)
  np.savez(os.path.join(tmp, "params.npz"), **_flatten(engine.params["params"]))
  shutil.copy(os.path.join(resolve_model_dir(engine.config.model.backbone), "tokenizer.json"),
              os.path.join(tmp, "tokenizer.json"))

  def entry(file: str) -> dict[str, str]:
    return {"file": file, "sha256": file_sha256(os.path.join(tmp, file))}

  manifest = {
      "format_version": FORMAT_VERSION, "task": engine.task.name,
      "label_names": list(engine.task.label_names), "text_fields": list(engine.task.text_columns),
      "widths": list(engine.widths), "length_buckets": list(engine.length_buckets),
      "gflops_per_example": (engine.flops / 1e9).tolist(),
      "routing": {"budget": engine.rule.budget or "router argmax",
                  "cost_weight": engine.rule.cost_weight},
      "batch": "symbolic", "jax_version": jax.__version__,
      "parts": {name: entry(file) for name, file in files.items()},
      "params": entry("params.npz"),
      "tokenizer": {**entry("tokenizer.json"), "pad_id": int(engine.tokenizer.pad_token_id)},
  }
  report.write_json(os.path.join(tmp, MANIFEST), manifest)
  old = directory.rstrip("/") + ".old"
  if os.path.exists(directory):
    os.replace(directory, old)
  os.replace(tmp, directory)
  shutil.rmtree(old, ignore_errors=True)
  return manifest
