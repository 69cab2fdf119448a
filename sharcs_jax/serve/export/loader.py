"""Runs an exported model without flax, optax, orbax, transformers or the training code.

An export directory (written by `export.py`) holds the tokenizer's `tokenizer.json`, the programs
and `manifest.json`, which names every file with its SHA-256 and records the runtime, the model
(a SHARCS model's widths, an early-exit model's exit layers), length buckets, FLOPs per part,
label names and the routing rule. The programs are either
  - runtime "jax": serialized StableHLO for the prefix with the router and for each width's
    adaptive part (batch and length symbolic) and the parameters as one `.npz`; loading needs jax;
  - runtime "onnxruntime": one ONNX model per program (batch and length symbolic), fp32 or
    int8, their large weights stored once in `weights.bin` (ONNX external data); loading needs
    only onnxruntime, numpy and tokenizers (no jax).
Both run through the same numpy-only dispatch core as the engine.

    model = ExportedModel.load("/tmp/qqp_export")
    out = model.predict([("How do I learn JAX?", "What is the best way to learn JAX?")])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import numpy as np

from sharcs_jax.data.inputs import text_rows
from sharcs_jax.data.padding import pack_rows
from sharcs_jax.serve import dispatch
from sharcs_jax.serve.layout import Layout, Predictions, run, width_layout
from sharcs_jax.serve.routing import rule_from_json

# 2: parts are named after their width and the manifest records the position offset, so that
# the loader can check the manifest against the parts and parameters. 3: the manifest names its
# runtime ("jax" or "onnxruntime"); an ONNX export has one part per program and length bucket.
# 4: an ONNX export's parts keep their large weights, once, in a shared file (`shared_weights`).
# 5: an ONNX export has one part per program, named as the jax export's, length symbolic.
# 6: the manifest names its model, "sharcs" or "early_exit" (whose parts are its stages).
# 7: a SHARCS manifest names the layers its prefix and parts end at (`router_layer`,
# `num_layers`), so that predictions carry every row's route as the engine's do.
FORMAT_VERSION = 7
MANIFEST = "manifest.json"
SHARED_WEIGHTS = "weights.bin"
MANIFEST_KEYS = ("format_version", "runtime", "model", "task", "label_names", "text_fields",
                 "length_buckets", "position_offset", "routing", "parts", "tokenizer")
MODEL_KEYS = {"sharcs": ("widths", "gflops_per_example", "prefix_gflops_per_example",
                        "router_layer", "num_layers"),
              "early_exit": ("exit_layers", "stage_gflops_per_example")}


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def adaptive_part_name(width: float) -> str:
  # model.widths.width_label's spelling; the loader does not import the flax model package
  return f"adaptive_{width:g}"


def part_name(width: float | None) -> str:
  """A program's part name: the prefix (width None) or a width's adaptive part."""
  return "prefix" if width is None else adaptive_part_name(width)


def stage_part_name(span: tuple[int, int]) -> str:
  """An early-exit model's stage of layers span[0]..span[1] (0-based)."""
  return f"stage_l{span[0]}-{span[1]}"


def narrow_part_name(width: float, span: tuple[int, int]) -> str:
  """A depth-and-width model's narrow layers span[0]..span[1] (0-based) at `width`."""
  return f"narrow_{width:g}_l{span[0]}-{span[1]}"


def program_part_name(kind: str, width: float | None, span: tuple[int, int] | None) -> str:
  """The one spelling of a program's part name, whichever model it belongs to."""
  if kind == "stage":
    return stage_part_name(span)
  if kind == "narrow":
    return narrow_part_name(width, span)
  return part_name(width)  # the prefix (width None) or a width's adaptive part


def spans_of(exit_layers: Sequence[int]) -> tuple[tuple[int, int], ...]:
  """The stages (first and last layer, 0-based) that end at each of `exit_layers` (1-based,
  increasing)."""
  ends = list(exit_layers)
  return tuple(zip([0] + ends[:-1], [e - 1 for e in ends]))


def expected_parts(manifest: dict) -> list[str]:
  """Every part's name, in the order the dispatch core runs them."""
  if manifest["model"] == "early_exit":
    return [stage_part_name(span) for span in spans_of(manifest["exit_layers"])]
  return [part_name(w) for w in [None, *manifest["widths"]]]


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


def manifest_layout(manifest: dict) -> Layout:
  """The engine's stage layout as the manifest records it (FLOPs per stage from its GFLOPs)."""
  if manifest["model"] == "early_exit":
    layers = tuple(manifest["exit_layers"])
    return Layout(tuple(dispatch.chained_stages(len(layers))), (1.0,) * len(layers), layers,
                  np.asarray(manifest["stage_gflops_per_example"], np.float64) * 1e9)
  prefix = np.asarray(manifest["prefix_gflops_per_example"], np.float64) * 1e9
  widths = np.asarray(manifest["gflops_per_example"], np.float64) * 1e9
  return width_layout(manifest["widths"], manifest["router_layer"], manifest["num_layers"],
                      prefix, widths - prefix)


class ExportedModel:
  """Tokenise, then the dispatch core: a SHARCS model routes each row and groups rows by width;
  an early-exit model runs its stages, each row leaving at its first sure exit. Input order is
  kept."""

  def __init__(self, directory: str, manifest: dict, runner: Any, tokenizer: Any):
    self.directory = directory
    self.manifest = manifest
    self.runtime = manifest["runtime"]
    self.model = manifest["model"]
    self.length_buckets = tuple(manifest["length_buckets"])
    self.label_names = tuple(manifest["label_names"])
    self.text_fields = tuple(manifest["text_fields"])
    self.rule = rule_from_json(manifest["routing"])
    self.layout = manifest_layout(manifest)
    self.runner = runner
    self._tokenizer = tokenizer

  @classmethod
  def load(cls, directory: str) -> "ExportedModel":
    """Checks the manifest against the files before anything runs; errors name what is wrong."""
    import tokenizers

    path = os.path.join(directory, MANIFEST)
    manifest = _read_manifest(path)
    files = {**{name: entry for name, entry in manifest["parts"].items()},
             "tokenizer": manifest["tokenizer"]}
    if manifest["runtime"] == "jax":
      files["params"] = manifest["params"]
    else:
      files["shared weights"] = manifest["shared_weights"]
    for name, entry in files.items():
      file = os.path.join(directory, entry["file"])
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{directory}: part {name!r} ({entry['file']}) is missing")
      if file_sha256(file) != entry["sha256"]:
        raise ValueError(f"{file}: contents do not match the manifest's SHA-256 for {name!r}")
    load_runner = {("jax", "sharcs"): _jax_runner, ("onnxruntime", "sharcs"): _onnx_runner,
                   ("jax", "early_exit"): _jax_stage_runner,
                   ("onnxruntime", "early_exit"): _onnx_stage_runner}
    runner = load_runner[manifest["runtime"], manifest["model"]](directory, path, manifest)
    tokenizer = tokenizers.Tokenizer.from_file(
        os.path.join(directory, manifest["tokenizer"]["file"]))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=manifest["length_buckets"][-1],
                                strategy="longest_first")
    return cls(directory, manifest, runner, tokenizer)

  def encode(self, texts: Sequence[str | Sequence[str]]) -> tuple[np.ndarray, ...]:
    """Token ids, type ids and lengths [N, max length], as the training tokenizer makes them."""
    rows = [row[0] if len(row) == 1 else row
            for row in text_rows(texts, self.text_fields, "this model")]
    encodings = self._tokenizer.encode_batch(rows) if rows else []
    size = self.length_buckets[-1]
    ids, lengths = pack_rows([e.ids for e in encodings], size,
                             self.manifest["tokenizer"]["pad_id"])
    types, _ = pack_rows([e.type_ids for e in encodings], size)
    return ids, types, lengths

  def route_names(self) -> list[str]:
    """Each route a row may take, by name (`Layout.route_names`)."""
    return self.layout.route_names()

  def predict(self, texts: Sequence[str | Sequence[str]]) -> Predictions:
    """Through the dispatch core, as the engine serves: the same layout, rule, batches and
    order (the jax parts at the length buckets, since each new shape would compile anew)."""
    ids, types, lengths = self.encode(texts)
    runtime = "xla" if self.runtime == "jax" else self.runtime
    predictions, _ = run(self.layout, self.runner, self.rule, ids, types, lengths,
                         length_buckets=self.length_buckets,
                         batch_sizes=dispatch.batch_sizes_for(runtime),
                         program_lengths=dispatch.lengths_for(runtime, self.length_buckets),
                         num_classes=len(self.label_names))
    return predictions


class _JaxParts:
  """`dispatch.Runner` over jax.export parts (symbolic shapes: any batch and length)."""

  def __init__(self, parts: dict[str, Any], params: dict, widths: Sequence[float]):
    import jax

    self._variables = {"params": jax.device_put(params)}
    self._calls = {name: jax.jit(part.call) for name, part in parts.items()}
    self._widths = tuple(widths)

  def prefix(self, batch: int, length: int, ids, mask, types):
    return self._calls["prefix"](self._variables, ids, mask, types)

  def part(self, width_index: int, batch: int, length: int, hidden, mask):
    return self._calls[adaptive_part_name(self._widths[width_index])](self._variables, hidden,
                                                                       mask)


def _jax_runner(directory: str, path: str, manifest: dict) -> _JaxParts:
  parts = _deserialized_parts(directory, manifest)
  _check_parts(path, manifest, parts)
  params = _exported_params(directory, manifest)
  _check_params(path, manifest, parts["prefix"], params)
  return _JaxParts(parts, params, manifest["widths"])


class _JaxStages:
  """`dispatch.StageRunner` over an early-exit model's jax.export stages."""

  def __init__(self, stages: Sequence[Any], params: dict):
    import jax

    self._variables = {"params": jax.device_put(params)}
    self._calls = [jax.jit(stage.call) for stage in stages]

  def stage(self, index: int, batch: int, length: int, inputs: tuple[Any, ...]):
    hidden, probabilities = self._calls[index](self._variables, *inputs)
    return hidden, (probabilities,)


def _deserialized_parts(directory: str, manifest: dict) -> dict[str, Any]:
  from jax import export

  parts = {}
  for name, entry in manifest["parts"].items():
    with open(os.path.join(directory, entry["file"]), "rb") as f:
      parts[name] = export.deserialize(bytearray(f.read()))
  return parts


def _exported_params(directory: str, manifest: dict) -> dict:
  with np.load(os.path.join(directory, manifest["params"]["file"])) as flat:
    return _unflatten({k: flat[k] for k in flat.files})


def _jax_stage_runner(directory: str, path: str, manifest: dict) -> _JaxStages:
  parts = _deserialized_parts(directory, manifest)
  names = expected_parts(manifest)
  classes = len(manifest["label_names"])
  for index, name in enumerate(names):
    part = parts[name]
    if part.fun_name != name:
      raise ValueError(f"{path}: the file listed for part {name!r} computes {part.fun_name!r}")
    if part.out_avals[1].shape[-1] != classes:
      raise ValueError(f"{path}: part {name!r} scores {part.out_avals[1].shape[-1]} classes, "
                       f"the manifest names {classes}")
    if index and part.in_avals[-2].shape[-1] != parts[names[index - 1]].out_avals[0].shape[-1]:
      raise ValueError(f"{path}: part {name!r} takes hidden size {part.in_avals[-2].shape[-1]}, "
                       f"the stage before gives {parts[names[index - 1]].out_avals[0].shape[-1]}")
  params = _exported_params(directory, manifest)
  _check_params(path, manifest, parts[names[0]], params)
  return _JaxStages([parts[name] for name in names], params)


def _check_onnx_io(path: str, manifest: dict, name: str, named_inputs: list, named_outputs: list,
                   takes: Sequence[str], reads_tokens: bool) -> None:
  """One ONNX session's inputs and outputs against the manifest (names, symbolic length, hidden
  size); the caller checks what each kind of part scores."""
  if tuple(n for n, _ in named_inputs) != tuple(takes):
    raise ValueError(f"{path}: part {name!r} takes inputs {[n for n, _ in named_inputs]}, "
                     f"expected {list(takes)}")
  inputs, outputs = [s for _, s in named_inputs], [s for _, s in named_outputs]
  if not all(isinstance(shape[1], str) for shape in inputs):
    raise ValueError(f"{path}: part {name!r} takes fixed lengths {[s[1] for s in inputs]}; "
                     "batches run at any length (export it again)")
  hidden = outputs[0][-1] if reads_tokens else inputs[0][-1]
  if hidden != manifest["hidden_size"]:
    raise ValueError(f"{path}: part {name!r} has hidden size {hidden}, the manifest says "
                     f"{manifest['hidden_size']}")


def _onnx_stage_runner(directory: str, path: str, manifest: dict) -> Any:
  """Sessions for every stage, checked against the manifest before anything runs."""
  from sharcs_jax.serve.onnx import runner as ort_runner

  names = expected_parts(manifest)
  runner = ort_runner.StageOrtRunner([os.path.join(directory, manifest["parts"][n]["file"])
                                      for n in names])
  for index, (name, (named_inputs, named_outputs)) in enumerate(zip(names, runner.io_shapes())):
    takes = ort_runner.PREFIX_INPUTS if index == 0 else ort_runner.PART_INPUTS
    _check_onnx_io(path, manifest, name, named_inputs, named_outputs, takes, index == 0)
    if named_outputs[1][1][-1] != len(manifest["label_names"]):
      raise ValueError(f"{path}: part {name!r} scores {named_outputs[1][1][-1]} classes, the "
                       f"manifest names {len(manifest['label_names'])}")
  return runner


def _onnx_runner(directory: str, path: str, manifest: dict) -> Any:
  """Sessions for every ONNX part, checked against the manifest before anything runs."""
  from sharcs_jax.serve.onnx import runner as ort_runner

  widths = manifest["widths"]
  file = {name: os.path.join(directory, entry["file"]) for name, entry in manifest["parts"].items()}
  runner = ort_runner.OrtRunner(file[part_name(None)],
                                [file[adaptive_part_name(w)] for w in widths])
  for (key, (named_inputs, named_outputs)) in runner.io_shapes().items():
    name = part_name(None if key == "prefix" else widths[key])
    takes = ort_runner.PREFIX_INPUTS if key == "prefix" else ort_runner.PART_INPUTS
    _check_onnx_io(path, manifest, name, named_inputs, named_outputs, takes, key == "prefix")
    outputs = [s for _, s in named_outputs]
    if key == "prefix" and outputs[1][-1] != len(widths):
      raise ValueError(f"{path}: part {name!r}'s router scores {outputs[1][-1]} widths, the "
                       f"manifest lists {len(widths)}")
    if key != "prefix" and outputs[0][-1] != len(manifest["label_names"]):
      raise ValueError(f"{path}: part {name!r} scores {outputs[0][-1]} classes, the manifest "
                       f"names {len(manifest['label_names'])}")
  return runner


def _read_manifest(path: str) -> dict:
  """The manifest, with its own values checked: every error names the file."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{os.path.dirname(path)} is not a SHARCS export: {MANIFEST} is "
                            "missing")
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: not valid JSON ({e}); the export is damaged, export it "
                     "again") from None
  if not isinstance(manifest, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(manifest).__name__}")
  version = manifest.get("format_version")
  if version != FORMAT_VERSION:
    raise ValueError(f"{path}: format version {version!r}; this loader reads version "
                     f"{FORMAT_VERSION}")
  missing = [k for k in MANIFEST_KEYS if k not in manifest]
  if missing:
    raise ValueError(f"{path}: keys {missing} are missing")
  model = manifest["model"]
  if model not in MODEL_KEYS:
    raise ValueError(f"{path}: model {model!r} is not one of {sorted(MODEL_KEYS)}")
  missing = [k for k in MODEL_KEYS[model] if k not in manifest]
  if missing:
    raise ValueError(f"{path}: keys {missing} are missing (model {model!r})")
  runtime = manifest["runtime"]
  if runtime not in ("jax", "onnxruntime"):
    raise ValueError(f"{path}: runtime {runtime!r} is not 'jax' or 'onnxruntime'")
  needed = {"jax": ("params",),
            "onnxruntime": ("precision", "hidden_size", "shared_weights")}[runtime]
  missing = [k for k in needed if k not in manifest]
  if missing:
    raise ValueError(f"{path}: keys {missing} are missing (runtime {runtime!r})")
  buckets = manifest["length_buckets"]
  if (not buckets or any(not isinstance(b, int) or b < 2 for b in buckets)
      or any(a >= b for a, b in zip(buckets, buckets[1:]))):
    raise ValueError(f"{path}: length_buckets {buckets} must be increasing lengths >= 2")
  if model == "early_exit":
    _check_stages(path, manifest)
  else:
    _check_widths(path, manifest)
  return manifest


def _check_widths(path: str, manifest: dict) -> None:
  """A SHARCS manifest's widths, parts and FLOPs table."""
  widths, buckets = manifest["widths"], manifest["length_buckets"]
  if (not widths or any(not 0 < w <= 1 for w in widths) or widths[-1] != 1.0
      or any(a >= b for a, b in zip(widths, widths[1:]))):
    raise ValueError(f"{path}: widths {widths} must increase to 1.0, the order in which the "
                     "router scores them")
  expected = expected_parts(manifest)
  if set(manifest["parts"]) != set(expected):
    raise ValueError(f"{path}: the manifest lists parts {sorted(manifest['parts'])} but its "
                     f"widths {widths} need {sorted(expected)}")
  gflops = np.asarray(manifest["gflops_per_example"], np.float64)
  if gflops.shape != (len(widths), len(buckets)) or not np.all(gflops > 0) or np.any(
      np.diff(gflops, axis=0) <= 0):
    raise ValueError(f"{path}: gflops_per_example must be positive, [widths {len(widths)}, "
                     f"length buckets {len(buckets)}] and increase with the width; got "
                     f"shape {list(gflops.shape)}")


def _check_stages(path: str, manifest: dict) -> None:
  """An early-exit manifest's exit layers, parts, FLOPs table and rule."""
  layers, buckets = manifest["exit_layers"], manifest["length_buckets"]
  if (not layers or any(not isinstance(e, int) or e < 1 for e in layers)
      or any(a >= b for a, b in zip(layers, layers[1:]))):
    raise ValueError(f"{path}: exit_layers {layers} must be increasing layers >= 1")
  expected = expected_parts(manifest)
  if set(manifest["parts"]) != set(expected):
    raise ValueError(f"{path}: the manifest lists parts {sorted(manifest['parts'])} but its "
                     f"exit layers {layers} need {expected}")
  gflops = np.asarray(manifest["stage_gflops_per_example"], np.float64)
  if gflops.shape != (len(layers), len(buckets)) or not np.all(gflops > 0):
    raise ValueError(f"{path}: stage_gflops_per_example must be positive, [stages "
                     f"{len(layers)}, length buckets {len(buckets)}]; got shape "
                     f"{list(gflops.shape)}")
  routing = manifest["routing"]
  if routing.get("rule") != "exit" or routing.get("num_stages") != len(layers) or len(
      routing.get("bucket_thresholds", ())) not in (0, len(buckets)):
    raise ValueError(f"{path}: routing {routing} is not an exit rule over {len(layers)} stages "
                     f"(with no thresholds or one per length bucket of {len(buckets)})")


def _check_params(path: str, manifest: dict, prefix: Any, params: dict) -> None:
  """The parameters must be the tree the parts take, and cover every length bucket's positions."""
  import jax

  (variables, *_), _ = prefix.in_tree.unflatten(prefix.in_avals)
  expected = {"/".join(str(k.key) for k in p): a.shape
              for p, a in jax.tree_util.tree_flatten_with_path(variables["params"])[0]}
  found = {"/".join(str(k.key) for k in p): np.shape(x)
           for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  wrong = sorted(k for k in set(expected) | set(found) if expected.get(k) != found.get(k))
  if wrong:
    key = wrong[0]
    raise ValueError(f"{path}: {manifest['params']['file']} does not fit the parts: "
                     f"{len(wrong)} parameter(s) differ, e.g. {key!r} is "
                     f"{found.get(key, 'missing')} where the parts take "
                     f"{expected.get(key, 'nothing')}")
  positions = found.get("embeddings/position", (0,))[0] - int(manifest["position_offset"])
  if manifest["length_buckets"][-1] > positions:
    raise ValueError(f"{path}: length bucket {manifest['length_buckets'][-1]} exceeds the "
                     f"model's {positions} positions")


def _check_parts(path: str, manifest: dict, parts: dict[str, Any]) -> None:
  """The parts must fit together and fit the manifest: hidden size, classes, widths, inputs."""
  prefix = parts["prefix"]
  if len(prefix.out_avals) != 2:
    raise ValueError(f"{path}: part 'prefix' returns {len(prefix.out_avals)} values, expected "
                     "hidden states and router logits")
  hidden, router = prefix.out_avals
  if router.shape[-1] != len(manifest["widths"]):
    raise ValueError(f"{path}: the prefix's router scores {router.shape[-1]} widths, the manifest "
                     f"lists {len(manifest['widths'])}")
  for width in manifest["widths"]:
    part = parts[adaptive_part_name(width)]
    if part.fun_name != adaptive_part_name(width):
      raise ValueError(f"{path}: the file listed for part {adaptive_part_name(width)!r} "
                       f"computes {part.fun_name!r}")
    if part.in_avals[-2].shape[-1] != hidden.shape[-1]:
      raise ValueError(f"{path}: part {adaptive_part_name(width)!r} takes hidden size "
                       f"{part.in_avals[-2].shape[-1]}, the prefix gives {hidden.shape[-1]}")
    if part.out_avals[0].shape[-1] != len(manifest["label_names"]):
      raise ValueError(f"{path}: part {adaptive_part_name(width)!r} scores "
                       f"{part.out_avals[0].shape[-1]} classes, the manifest names "
                       f"{len(manifest['label_names'])}")
