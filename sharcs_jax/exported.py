"""Runs an exported SHARCS model with only jax, numpy and tokenizers: no flax, optax, orbax or
transformers, and none of the training code.

An export directory (written by `export.py`) holds serialized StableHLO for the prefix with the
router and for each width's adaptive part (batch and length symbolic), the parameters as one
`.npz`, the tokenizer's `tokenizer.json` and `manifest.json`, which names every file with its
SHA-256 and records widths, length buckets, FLOPs per part, label names and the routing rule.

    model = ExportedModel.load("/tmp/qqp_export")
    out = model.predict([("How do I learn JAX?", "What is the best way to learn JAX?")])
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Sequence

import jax
import numpy as np
from jax import export

from sharcs_jax.routing import choose_widths

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Rows per call are padded up to one of these sizes: every distinct (rows, length) shape compiles
# once on first use, so a few sizes bound the compiles while small groups waste little.
ROW_BUCKETS = (1, 8, 32)


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def adaptive_part_name(width: float) -> str:
  return f"adaptive_{width:g}"


def _unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for name in parents:
      node = node.setdefault(name, {})
    node[leaf] = value
  return tree


@dataclasses.dataclass(frozen=True)
class ExportedPredictions:
  labels: np.ndarray  # int32 [N]
  probabilities: np.ndarray  # float32 [N, C]
  widths: np.ndarray  # float32 [N]
  gflops: np.ndarray  # float64 [N]


class ExportedModel:
  """Tokenise, route, group by width, run each group's part, restore the input order."""

  def __init__(self, directory: str, manifest: dict, parts: dict[str, export.Exported],
               params: dict, tokenizer: Any):
    self.directory = directory
    self.manifest = manifest
    self.widths = tuple(manifest["widths"])
    self.length_buckets = tuple(manifest["length_buckets"])
    self.label_names = tuple(manifest["label_names"])
    self.text_fields = tuple(manifest["text_fields"])
    self.gflops = np.asarray(manifest["gflops_per_example"], np.float64)  # [m, length buckets]
    self.cost_weight = float(manifest["routing"]["cost_weight"])
    self._variables = {"params": jax.device_put(params)}
    self._tokenizer = tokenizer
    self._calls = {name: jax.jit(part.call) for name, part in parts.items()}

  @classmethod
  def load(cls, directory: str) -> "ExportedModel":
    """Checks the manifest against the files before anything runs; errors name what is wrong."""
    import tokenizers

    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{directory} is not a SHARCS export: {MANIFEST} is missing")
    with open(path) as f:
      manifest = json.load(f)
    version = manifest.get("format_version")
    if version != FORMAT_VERSION:
      raise ValueError(f"{path}: format version {version!r}; this loader reads version "
                       f"{FORMAT_VERSION}")
    expected = {"prefix"} | {adaptive_part_name(w) for w in manifest["widths"]}
    if set(manifest["parts"]) != expected:
      raise ValueError(f"{path}: the manifest lists parts {sorted(manifest['parts'])} but its "
                       f"widths {manifest['widths']} need {sorted(expected)}")
    files = {**{name: entry for name, entry in manifest["parts"].items()},
             "params": manifest["params"], "tokenizer": manifest["tokenizer"]}
    for name, entry in files.items():
      file = os.path.join(directory, entry["file"])
      if not os.path.isfile(file):
        raise FileNotFoundError(f"{directory}: part {name!r} ({entry['file']}) is missing")
      if file_sha256(file) != entry["sha256"]:
        raise ValueError(f"{file}: contents do not match the manifest's SHA-256 for {name!r}")
    parts = {}
    for name, entry in manifest["parts"].items():
      with open(os.path.join(directory, entry["file"]), "rb") as f:
        parts[name] = export.deserialize(bytearray(f.read()))
    _check_parts(path, manifest, parts)
    with np.load(os.path.join(directory, manifest["params"]["file"])) as flat:
      params = _unflatten({k: flat[k] for k in flat.files})
    tokenizer = tokenizers.Tokenizer.from_file(
        os.path.join(directory, manifest["tokenizer"]["file"]))
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length=manifest["length_buckets"][-1],
                                strategy="longest_first")
    return cls(directory, manifest, parts, params, tokenizer)

  def encode(self, texts: Sequence[str | Sequence[str]]) -> tuple[np.ndarray, ...]:
    """Token ids, type ids and lengths [N, max length], as the training tokenizer makes them."""
    rows = []
    for i, text in enumerate(texts):
      row = (text,) if isinstance(text, str) else tuple(text)
      if len(row) != len(self.text_fields) or not all(isinstance(t, str) for t in row):
        raise ValueError(f"input {i} has {len(row)} field(s) {row!r:.120}; this model takes "
                         f"{len(self.text_fields)} string(s): {', '.join(self.text_fields)}")
      rows.append(row[0] if len(row) == 1 else row)
    encodings = self._tokenizer.encode_batch(rows) if rows else []
    size = self.length_buckets[-1]
    ids = np.full((len(rows), size), self.manifest["tokenizer"]["pad_id"], np.int32)
    types = np.zeros((len(rows), size), np.int32)
    lengths = np.zeros(len(rows), np.int32)
    for i, e in enumerate(encodings):
      lengths[i] = len(e.ids)
      ids[i, :lengths[i]], types[i, :lengths[i]] = e.ids, e.type_ids
    return ids, types, lengths

  def predict(self, texts: Sequence[str | Sequence[str]]) -> ExportedPredictions:
    ids, types, lengths = self.encode(texts)
    n = len(lengths)
    buckets = np.searchsorted(np.asarray(self.length_buckets), lengths)
    probabilities = np.zeros((n, len(self.label_names)), np.float32)
    routed = np.zeros(n, np.int32)
    gflops = np.zeros(n, np.float64)
    for b, size in enumerate(self.length_buckets):
      rows = np.flatnonzero(buckets == b)
      if not len(rows):
        continue
      mask = (np.arange(size)[None] < lengths[rows, None]).astype(np.int32)
      hidden, router = [], []
      for part in _chunks(np.arange(len(rows))):
        h, r = self._run("prefix", len(part), ids[rows[part], :size], mask[part],
                         types[rows[part], :size])
        hidden.append(np.asarray(h))
        router.append(np.asarray(r))
      hidden, router = np.concatenate(hidden), np.concatenate(router)
      chosen = choose_widths(router, np.broadcast_to(self.gflops[:, b], router.shape),
                             self.cost_weight)
      routed[rows] = chosen
      gflops[rows] = self.gflops[chosen, b]
      for w_index, width in enumerate(self.widths):
        for part in _chunks(np.flatnonzero(chosen == w_index)):
          probabilities[rows[part]] = np.asarray(
              self._run(adaptive_part_name(width), len(part), hidden[part], mask[part]))
    return ExportedPredictions(probabilities.argmax(-1).astype(np.int32), probabilities,
                               np.asarray(self.widths, np.float32)[routed], gflops)

  def _run(self, part: str, count: int, *rows: np.ndarray):
    """One call on `count` rows padded to a row bucket; outputs cut back to `count` rows."""
    size = next((b for b in ROW_BUCKETS if b >= count), ROW_BUCKETS[-1])
    padded = [np.concatenate([x, np.zeros((size - count,) + x.shape[1:], x.dtype)]) for x in rows]
    padded[1][count:, 0] = 1  # the mask (second in both parts): no empty softmax on padding rows
    outputs = self._calls[part](self._variables, *padded)
    return jax.tree_util.tree_map(lambda y: y[:count], outputs)


def _chunks(rows: np.ndarray) -> list[np.ndarray]:
  size = ROW_BUCKETS[-1]
  return [rows[i:i + size] for i in range(0, len(rows), size)]


def _check_parts(path: str, manifest: dict, parts: dict[str, export.Exported]) -> None:
  """The parts must fit together and fit the manifest: hidden size, classes, inputs."""
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
    if part.in_avals[-2].shape[-1] != hidden.shape[-1]:
      raise ValueError(f"{path}: part {adaptive_part_name(width)!r} takes hidden size "
                       f"{part.in_avals[-2].shape[-1]}, the prefix gives {hidden.shape[-1]}")
    if part.out_avals[0].shape[-1] != len(manifest["label_names"]):
      raise ValueError(f"{path}: part {adaptive_part_name(width)!r} scores "
                       f"{part.out_avals[0].shape[-1]} classes, the manifest names "
                       f"{len(manifest['label_names'])}")
