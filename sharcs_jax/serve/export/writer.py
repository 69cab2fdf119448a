"""Writes a trained model as a portable export directory that `exported.py` runs without flax.

A SHARCS model's parts are the prefix with the router and each width's adaptive part with the
head; an early-exit model's are its stages (`exit_layout`), each ending in its exit. On the XLA
runtime each part is `jax.export`ed with symbolic batch and length, so one file serves every
batch size and length bucket; parameters are an argument (one `.npz`), not constants baked into
each part. On
ONNX Runtime the parts are the engine's ONNX programs (batch and length symbolic, fp32 or int8),
and the export needs nothing but onnxruntime, numpy and tokenizers to serve. Their large
initializers are stored in `weights.bin`, each distinct one once, which every part references as
ONNX external data.

    python -m sharcs_jax.main --mode=export --workdir=/tmp/sharcs_qqp --output=/tmp/qqp_export
    python -m sharcs_jax.main --mode=export --workdir=/tmp/sharcs_qqp --output=/tmp/qqp_int8 \
        --runtime=onnxruntime --precision=int8
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import shutil
import tempfile
from typing import Any

import jax
import numpy as np
from jax import export

from sharcs_jax import report
from sharcs_jax.serve.engine import Engine
from sharcs_jax.errors import RunError
from sharcs_jax.serve.export.loader import (FORMAT_VERSION, MANIFEST, SHARED_WEIGHTS,
                                       file_sha256, program_part_name)
from sharcs_jax.model.weights import resolve_model_dir
from sharcs_jax.serve.programs import argument_specs, functions, static_arguments


def _flatten(tree: Any) -> dict[str, np.ndarray]:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


def _export_parts(engine: Engine) -> dict[str, bytes]:
  """Each stage program of the engine's layout as a jax.export part, batch and length
  symbolic, named as the loader expects."""
  variables = {"params": jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), engine.variables["params"])}
  batch, length = export.symbolic_shape("batch, length")
  function = functions(engine.model)
  parts = {}
  for p in engine.stage_programs:
    static = static_arguments(p.kind, p.width, p.span)
    part = _named(lambda v, *inputs, kind=p.kind, static=static: function[kind](
        v, *inputs, **static), program_part_name(p.kind, p.width, p.span))
    parts[part.__name__] = export.export(jax.jit(part))(
        variables, *argument_specs(engine.model, p.kind, batch, length, span=p.span,
                                   width=p.width))
  return {name: part.serialize() for name, part in parts.items()}


def _named(function: Any, name: str) -> Any:
  """`function` named `name` (a width's part, a stage): the serialized part then says what it
  computes, and the loader checks that against the manifest."""
  function.__name__ = function.__qualname__ = name
  return function


def check_output(directory: str, workdir: str) -> None:
  """Refuses an export directory whose replacement would delete what export did not write: the
  training workdir, anything inside it, or a non-empty folder that is not an earlier export."""
  output, run = os.path.realpath(directory), os.path.realpath(workdir)
  if output == run or output.startswith(run + os.sep):
    raise RunError(f"--output={directory} is {'the' if output == run else 'inside the'} training "
                   f"workdir {workdir}: an export replaces its whole directory, which would delete "
                   "the run; choose a directory outside the workdir")
  if run.startswith(output + os.sep):
    raise RunError(f"--output={directory} holds the training workdir {workdir}; choose a "
                   "directory outside it")
  if os.path.exists(output) and not os.path.isdir(output):
    raise RunError(f"--output={directory} is a file, not a directory")
  if os.path.isdir(output) and os.listdir(output) and not os.path.isfile(
      os.path.join(output, MANIFEST)):
    found = sorted(os.listdir(output))
    raise RunError(f"--output={directory} holds other files ({', '.join(found[:5])}"
                   f"{', ...' if len(found) > 5 else ''}) and is not an earlier export (no "
                   f"{MANIFEST}); an export replaces its directory whole, so choose an empty or "
                   "new directory")


def _exchange(a: str, b: str) -> bool:
  """Swaps two paths in one step (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
  try:
    libc = ctypes.CDLL(None, use_errno=True)
    at_fdcwd, rename_exchange = -100, 2
    return libc.renameat2(at_fdcwd, a.encode(), at_fdcwd, b.encode(), rename_exchange) == 0
  except (AttributeError, OSError):
    return False


def _replace_directory(tmp: str, directory: str) -> None:
  """Puts the finished `tmp` at `directory`; an earlier export there is swapped out atomically
  where the OS can, so a reader sees the old export or the new one, never neither."""
  if not os.path.exists(directory):
    os.replace(tmp, directory)
    return
  if not _exchange(tmp, directory):
    old = tempfile.mkdtemp(dir=os.path.dirname(tmp), prefix=".old-export-")
    os.replace(directory, os.path.join(old, "export"))
    os.replace(tmp, directory)
    tmp = old
  shutil.rmtree(tmp)  # the earlier export, which check_output found to be one


def export_engine(engine: Engine, directory: str) -> dict[str, Any]:
  """Writes the export of an engine built from a training run into `directory` (replacing an
  earlier export there); returns the manifest."""
  workdir = engine.workdir
  if workdir is None:
    raise ValueError("export needs an engine built from a training run (Engine.from_run)")
  if engine.narrow_count:
    raise ValueError("exporting a depth-and-width model's narrow stages is not supported yet: "
                     "export its full depth (no --budget), or serve it from "
                     "its workdir (--mode=predict or --mode=serve)")
  directory = os.path.abspath(directory)
  check_output(directory, workdir)
  os.makedirs(os.path.dirname(directory), exist_ok=True)
  tmp = tempfile.mkdtemp(dir=os.path.dirname(directory),
                         prefix=f".{os.path.basename(directory)}.partial-")
  os.chmod(tmp, 0o777 & ~report.umask())
  try:
    manifest = _write_export(engine, tmp)
    _replace_directory(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


def _write_parts(engine: Engine, tmp: str) -> tuple[dict[str, str], dict[str, Any]]:
  """The parts' files ({part name: file}) and what the manifest says of the runtime."""
  files = {}
  if engine.runtime == "onnxruntime":
    paths = engine.onnx.paths
    for key in paths:
      files[key.name] = f"{key.name}.onnx"
    share_weights({files[k.name]: p for k, p in paths.items()}, tmp, SHARED_WEIGHTS)
    return files, {"runtime": "onnxruntime", "hidden_size": engine.model.encoder.hidden_size,
                   "reduce_range": engine.onnx.reduce_range,
                   "onnxruntime_version": report.package_version("onnxruntime"),
                   "shared_weights": {"file": SHARED_WEIGHTS, "sha256": file_sha256(
                       os.path.join(tmp, SHARED_WEIGHTS))}}
  for name, blob in _export_parts(engine).items():
    files[name] = f"{name}.jaxexport"
    with open(os.path.join(tmp, files[name]), "wb") as f:
      f.write(blob)
  np.savez(os.path.join(tmp, "params.npz"), **_flatten(engine.variables["params"]))
  return files, {"runtime": "jax", "jax_version": jax.__version__,
                 "params": {"file": "params.npz", "sha256": file_sha256(
                     os.path.join(tmp, "params.npz"))}}


def share_weights(sources: dict[str, str], directory: str, file: str,
                  least_bytes: int = 1 << 16, align: int = 4096) -> None:
  """Writes each ONNX model `sources[name]` to `directory/name` with every initializer of at
  least `least_bytes` stored once in `directory/file` (identical bytes, one copy; offsets
  page-aligned so ONNX Runtime can map them)."""
  import onnx

  stored: dict[bytes, tuple[int, int]] = {}  # sha256 -> (offset, length)
  with open(os.path.join(directory, file), "wb") as blob:
    for name, source in sources.items():
      model = onnx.load(source)
      for tensor in model.graph.initializer:
        raw = tensor.raw_data
        if tensor.data_location == onnx.TensorProto.EXTERNAL or len(raw) < least_bytes:
          continue
        digest = hashlib.sha256(raw).digest()
        if digest not in stored:
          blob.write(b"\0" * (-blob.tell() % align))
          stored[digest] = (blob.tell(), len(raw))
          blob.write(raw)
        offset, length = stored[digest]
        tensor.ClearField("raw_data")
        tensor.data_location = onnx.TensorProto.EXTERNAL
        del tensor.external_data[:]
        for key, value in (("location", file), ("offset", offset), ("length", length)):
          entry = tensor.external_data.add()
          entry.key, entry.value = key, str(value)
      onnx.save(model, os.path.join(directory, name))


def _model_entries(engine: Engine) -> dict[str, Any]:
  """What the manifest says of the model: its widths and FLOPs per part, or its stages."""
  layout = engine.layout
  if not layout.by_width:
    return {"model": "early_exit", "exit_layers": list(layout.stage_layers),
            "stage_gflops_per_example": (layout.stage_flops / 1e9).tolist(),
            "compute_dtype": "float32"}
  return {"model": "sharcs", "widths": list(layout.widths),
          "router_layer": int(layout.stage_layers[0]), "num_layers": int(layout.stage_layers[-1]),
          "compute_dtype": engine.model.compute_dtype,
          "gflops_per_example": (layout.width_flops() / 1e9).tolist(),
          "prefix_gflops_per_example": (layout.stage_flops[0] / 1e9).tolist()}


def _write_export(engine: Engine, tmp: str) -> dict[str, Any]:
  files, runtime = _write_parts(engine, tmp)
  shutil.copy(os.path.join(resolve_model_dir(engine.trained.config.model.backbone), "tokenizer.json"),
              os.path.join(tmp, "tokenizer.json"))

  def entry(file: str) -> dict[str, str]:
    return {"file": file, "sha256": file_sha256(os.path.join(tmp, file))}

  manifest = {
      "format_version": FORMAT_VERSION, "runtime": runtime.pop("runtime"),
      "task": engine.task.name,
      "label_names": list(engine.task.label_names), "text_fields": list(engine.task.text_columns),
      "length_buckets": list(engine.length_buckets),
      "position_offset": int(engine.model.encoder.position_offset),
      "precision": engine.precision, **_model_entries(engine),
      "routing": engine.rule.to_json(),
      "batch": "symbolic", **runtime,
      "parts": {name: entry(file) for name, file in files.items()},
      "tokenizer": {**entry("tokenizer.json"), "pad_id": int(engine.tokenizer.pad_token_id)},
  }
  report.write_json(os.path.join(tmp, MANIFEST), manifest)
  return manifest
