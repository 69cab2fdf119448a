"""Backbone architecture description, read from a Hugging Face `config.json`.

One frozen (hashable) dataclass describes BERT, RoBERTa and DistilBERT alike, so that the Flax
modules can take it as a static attribute and the weight importer can derive every tensor shape.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

# model_type in config.json -> parameter layout we know how to import.
_LAYOUTS = {
    "bert": "bert",
    "roberta": "roberta",
    "xlm-roberta": "roberta",
    "camembert": "roberta",
    "distilbert": "distilbert",
}
SUPPORTED_MODEL_TYPES = tuple(sorted(_LAYOUTS))

_ACTIVATIONS = ("gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
  """Sizes and conventions of a post-LayerNorm transformer encoder."""

  layout: str  # "bert" | "roberta" | "distilbert"
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  intermediate_size: int
  max_position_embeddings: int
  type_vocab_size: int  # 0: the layout has no token-type embeddings (DistilBERT)
  layer_norm_eps: float = 1e-12
  hidden_act: str = "gelu"
  pad_token_id: int = 0
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1
  initializer_range: float = 0.02

  def __post_init__(self):
    if self.layout not in ("bert", "roberta", "distilbert"):
      raise ValueError(f"unknown layout {self.layout!r}")
    if self.hidden_size % self.num_heads:
      raise ValueError(
          f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
    if self.hidden_act not in _ACTIVATIONS:
      raise ValueError(f"unsupported activation {self.hidden_act!r}; known: {_ACTIVATIONS}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def position_offset(self) -> int:
    """RoBERTa numbers real tokens from pad_token_id + 1; the others from 0."""
    return self.pad_token_id + 1 if self.layout == "roberta" else 0

  @classmethod
  def from_hf_dict(cls, hf: Mapping[str, Any], source: str = "config") -> "EncoderConfig":
    model_type = hf.get("model_type")
    if model_type not in _LAYOUTS:
      raise ValueError(
          f"{source}: unknown model type {model_type!r}; supported: "
          f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    layout = _LAYOUTS[model_type]
    try:
      if layout == "distilbert":
        return cls(
            layout=layout,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["dim"],
            num_layers=hf["n_layers"],
            num_heads=hf["n_heads"],
            intermediate_size=hf["hidden_dim"],
            max_position_embeddings=hf["max_position_embeddings"],
            type_vocab_size=0,
            layer_norm_eps=1e-12,  # hard-coded in the DistilBERT implementation
            hidden_act=hf.get("activation", "gelu"),
            pad_token_id=hf.get("pad_token_id", 0),
            hidden_dropout=hf.get("dropout", 0.1),
            attention_dropout=hf.get("attention_dropout", 0.1),
            initializer_range=hf.get("initializer_range", 0.02),
        )
      return cls(
          layout=layout,
          vocab_size=hf["vocab_size"],
          hidden_size=hf["hidden_size"],
          num_layers=hf["num_hidden_layers"],
          num_heads=hf["num_attention_heads"],
          intermediate_size=hf["intermediate_size"],
          max_position_embeddings=hf["max_position_embeddings"],
          type_vocab_size=hf.get("type_vocab_size", 2),
          layer_norm_eps=hf.get("layer_norm_eps", 1e-12),
          hidden_act=hf.get("hidden_act", "gelu"),
          pad_token_id=hf.get("pad_token_id", 0 if layout == "bert" else 1),
          hidden_dropout=hf.get("hidden_dropout_prob", 0.1),
          attention_dropout=hf.get("attention_probs_dropout_prob", 0.1),
          initializer_range=hf.get("initializer_range", 0.02),
      )
    except KeyError as e:
      raise ValueError(f"{source}: missing key {e.args[0]!r} for model type {model_type!r}") from None
    except ValueError as e:
      raise ValueError(f"{source}: {e}") from None

  @classmethod
  def from_json_file(cls, path: str | os.PathLike) -> "EncoderConfig":
    with open(path) as f:
      try:
        hf = json.load(f)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON (line {e.lineno}): {e.msg}") from None
    return cls.from_hf_dict(hf, source=str(path))
