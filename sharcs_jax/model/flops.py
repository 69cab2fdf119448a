"""FLOPs of a SHARCS forward: read from XLA's cost analysis, and counted analytically to check it.

The analytic count has every matmul (2 FLOPs per multiply-add), the attention score and context
matmuls included (the reference code leaves them out), the router and the head, and separately
the main elementwise work at the per-element costs XLA's CPU lowering counts (LayerNorm 8, softmax
with scaling 5, exact erf-GELU 8 as `0.5*x*(1+erf(x/sqrt2))` lowers, tanh-GELU 8). Without that
last part the matmul count alone sits 1-2% below XLA's figure for MiniLM.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.model.widths import width_dims


def compiled_flops(compiled: Any) -> float:
  """FLOPs from a `jax.stages.Compiled` (older jax returns a one-element list)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def xla_flops(function: Any, *shapes: Any) -> float:
  """FLOPs of `function` compiled for these argument shapes: for programs that are only
  counted, never run (the engine's own programs are compiled and counted in `programs.py`)."""
  return compiled_flops(jax.jit(function).lower(*shapes).compile())


def param_shapes(model: Any) -> Any:
  """Parameter shapes without allocating anything: enough to lower and compile."""
  ids = jax.ShapeDtypeStruct((1, 8), jnp.int32)
  return jax.eval_shape(lambda k, i: model.init(k, i, i)["params"], jax.random.key(0), ids)


# FLOPs per element that XLA's CPU cost analysis counts for each elementwise piece.
_LAYER_NORM, _SOFTMAX, _ACTIVATION = 8, 5, {"gelu": 8, "gelu_new": 8, "gelu_pytorch_tanh": 8,
                                            "relu": 1}


def _layer_elementwise_flops(cfg: EncoderConfig, width: float, batch_size: int,
                             seq_len: int) -> float:
  dims = width_dims(cfg, width)
  tokens = batch_size * seq_len
  inner = dims.heads * cfg.head_dim
  bias_adds = tokens * (3 * inner + 2 * dims.hidden + dims.ffn)
  residual_and_norm = 2 * tokens * dims.hidden * (1 + _LAYER_NORM)
  softmax = _SOFTMAX * batch_size * dims.heads * seq_len * seq_len
  return float(bias_adds + residual_and_norm + softmax + tokens * dims.ffn * _ACTIVATION[cfg.hidden_act])


def _layer_matmul_flops(cfg: EncoderConfig, width: float, batch_size: int, seq_len: int) -> float:
  dims = width_dims(cfg, width)
  tokens = batch_size * seq_len
  inner = dims.heads * cfg.head_dim
  projections = tokens * (dims.hidden * 3 * inner + inner * dims.hidden + 2 * dims.hidden * dims.ffn)
  attention = 2 * batch_size * dims.heads * seq_len * seq_len * cfg.head_dim  # scores + context
  return 2.0 * (projections + attention)


def analytic_flops(model: SharcsModel, width: float, batch_size: int, seq_len: int) -> dict[str, float]:
  """FLOPs of each part of the forward; 'total' sums them, 'matmul' is the matmul share."""
  cfg, k = model.encoder, model.router_layer
  d, dw = cfg.hidden_size, width_dims(cfg, width).hidden
  tokens = batch_size * seq_len
  parts = {
      "prefix_layers": k * _layer_matmul_flops(cfg, 1.0, batch_size, seq_len),
      "router": 2.0 * batch_size * (d * model.router_hidden + model.router_hidden * len(model.widths)),
      "adaptive_layers": (cfg.num_layers - k) * _layer_matmul_flops(cfg, width, batch_size, seq_len),
      "head": 2.0 * batch_size * (dw * d + d * model.num_classes),
  }
  parts["matmul"] = sum(parts.values())
  parts["elementwise"] = (
      k * _layer_elementwise_flops(cfg, 1.0, batch_size, seq_len)
      + (cfg.num_layers - k) * _layer_elementwise_flops(cfg, width, batch_size, seq_len)
      + tokens * d * (2 + _LAYER_NORM)  # embedding sums and LayerNorm
      + (tokens * dw * _LAYER_NORM if width < 1.0 else 0))  # down-projection LayerNorm
  parts["total"] = parts["matmul"] + parts["elementwise"]
  return parts
