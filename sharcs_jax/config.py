"""Shared defaults of every run and the checks that fail a bad config before any work starts.

Config files in `configs/` start from `base_config(task, arg)` and change what differs; a field is
read in one place in the code, and its default lives here or in the task file, not in signatures.
"""

from __future__ import annotations

import importlib.util
import os

import ml_collections

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.sharcs import check_model_settings
from sharcs_jax.model.weights import LAYERNORM_INITS, resolve_model_dir

CONFIG_ARGS = ("smoke",)


def base_config(task: str, arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.data_dir = ""  # GLUE TSV directory; "" -> $SHARCS_DATA_DIR, else the Hugging Face hub
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.backbone = "all-MiniLM-L6-v2"  # a packaged model name or a local HF model directory
  c.model.widths = (0.25, 0.5, 1.0)  # increasing, ending at 1.0
  # K: layers 1..K run at full width. On a 6-layer backbone K=2 is the paper's K/L of 0.25-0.33.
  c.model.router_layer = 2
  c.model.router_hidden = 0  # 0 -> the reference's 1024, scaled with the hidden size
  c.model.layernorm_init = "pretrained"  # per-width LayerNorms: "pretrained" slice or "fresh"

  c.data = ml_collections.ConfigDict()
  c.data.length_buckets = (32, 64, 128)  # static padded lengths; the last is the max length

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 32

  if arg == "smoke":  # the whole pipeline in seconds, for tests
    c.data.length_buckets = (16, 32)
    c.eval.batch_size = 8
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; known: {', '.join(CONFIG_ARGS)}")
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/qqp.py:smoke' -> that file's get_config('smoke'), as the --config flag does."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("sharcs_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def backbone_config(config: ml_collections.ConfigDict) -> EncoderConfig:
  return EncoderConfig.from_json_file(
      os.path.join(resolve_model_dir(config.model.backbone), "config.json"))


def validate(config: ml_collections.ConfigDict) -> EncoderConfig:
  """Raises ValueError naming the bad field; returns the backbone's architecture."""
  encoder = backbone_config(config)
  m = config.model
  try:
    check_model_settings(encoder, tuple(m.widths), m.router_layer)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model: {e}") from None
  if m.layernorm_init not in LAYERNORM_INITS:
    raise ValueError(f"config.model.layernorm_init={m.layernorm_init!r} is not one of "
                     f"{LAYERNORM_INITS}")
  buckets = tuple(config.data.length_buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2:
    raise ValueError(f"config.data.length_buckets={buckets} must be increasing lengths >= 2")
  if buckets[-1] > encoder.max_position_embeddings - encoder.position_offset:
    raise ValueError(f"config.data.length_buckets: {buckets[-1]} exceeds the backbone's "
                     f"{encoder.max_position_embeddings - encoder.position_offset} positions")
  if config.eval.batch_size < 1:
    raise ValueError(f"config.eval.batch_size={config.eval.batch_size} must be >= 1")
  return encoder
