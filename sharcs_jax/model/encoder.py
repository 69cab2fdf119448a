"""Encoder building blocks whose matrices are sliced to a static width.

Stock Flax `Dense`/attention layers cannot take a leading slice of their kernels, so these modules
hold explicit kernels and slice them. The width is a static Python float: each width traces to its
own XLA program that really runs smaller matmuls (a mask would not save a single FLOP).

Kernel layouts (chosen for slicing and for one fused Q/K/V matmul):
  qkv       kernel [d, 3, H, head_dim], bias [3, H, head_dim]
  attn_out  kernel [H, head_dim, d],    bias [d]
  ffn_in    kernel [d, f],              bias [f]
  ffn_out   kernel [f, d],              bias [d]
Width w keeps the first round(d*w) residual channels, round(H*w) heads and round(f*w) neurons.

A layer's `compute_dtype` is the dtype its matmuls read ("bfloat16": inputs rounded to bf16,
products accumulated and returned in float32); LayerNorm, softmax, GELU and the residual stream
stay float32. "float32" is the plain computation, bit for bit.
"""

from __future__ import annotations

from typing import Callable

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.widths import width_dims, width_tag

Array = jax.Array
Params = dict[str, Array]


COMPUTE_DTYPES = ("float32", "bfloat16")


def contract(spec: str, x: Array, kernel: Array, compute_dtype: str) -> Array:
  """jnp.einsum(spec, x, kernel) with its inputs at `compute_dtype` and a float32 result."""
  if compute_dtype == "float32":
    return jnp.einsum(spec, x, kernel)
  dtype = jnp.dtype(compute_dtype)
  return jnp.einsum(spec, x.astype(dtype), kernel.astype(dtype),
                    preferred_element_type=jnp.float32)


def layer_norm(x: Array, params: Params, eps: float) -> Array:
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * params["scale"] + params["bias"]


def activation(name: str) -> Callable[[Array], Array]:
  if name == "gelu":
    # Exact erf GELU written out: on XLA CPU this runs 2.5x faster than
    # jax.nn.gelu(approximate=False) and agrees with it to 5e-7.
    return lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(1 / np.sqrt(2))))
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  if name == "relu":
    return jax.nn.relu
  raise ValueError(f"unsupported activation {name!r}")


def layer_norm_init(size: int) -> Callable[[Array], Params]:
  return lambda _: {"scale": jnp.ones((size,), jnp.float32), "bias": jnp.zeros((size,), jnp.float32)}


def dense_init(kernel_shape: tuple[int, ...], bias_shape: tuple[int, ...],
               std: float) -> Callable[[Array], Params]:
  return lambda key: {
      "kernel": std * jax.random.normal(key, kernel_shape, jnp.float32),
      "bias": jnp.zeros(bias_shape, jnp.float32),
  }


class Embeddings(nn.Module):
  """Word + position (+ token-type) embeddings, LayerNorm, dropout; always full width."""

  cfg: EncoderConfig

  @nn.compact
  def __call__(self, input_ids: Array, token_type_ids: Array | None, *,
               deterministic: bool) -> Array:
    cfg = self.cfg
    normal = nn.initializers.normal(cfg.initializer_range)
    word = self.param("word", normal, (cfg.vocab_size, cfg.hidden_size))
    position = self.param("position", normal, (cfg.max_position_embeddings, cfg.hidden_size))
    x = jnp.take(word, input_ids, axis=0)
    if cfg.layout == "roberta":
      # Padding tokens sit at position pad_token_id, real ones count up from it (as HF does).
      real = (input_ids != cfg.pad_token_id).astype(jnp.int32)
      positions = jnp.cumsum(real, axis=1) * real + cfg.pad_token_id
    elif isinstance(input_ids.shape[1], int):
      positions = jnp.arange(input_ids.shape[1])[None, :]
    else:  # a symbolic length (the ONNX programs), which jax2onnx cannot `arange` over
      positions = jnp.cumsum(jnp.ones_like(input_ids), axis=1) - 1
    x = x + jnp.take(position, positions, axis=0)
    if cfg.type_vocab_size:
      token_type = self.param("token_type", normal, (cfg.type_vocab_size, cfg.hidden_size))
      if token_type_ids is None:
        token_type_ids = jnp.zeros_like(input_ids)
      x = x + jnp.take(token_type, token_type_ids, axis=0)
    x = layer_norm(x, self.param("ln", layer_norm_init(cfg.hidden_size)), cfg.layer_norm_eps)
    return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """Post-LayerNorm transformer layer that runs at any width in `private_widths` or at 1.0.

  Full width uses the pretrained LayerNorms; each narrower width owns a private pair
  (`attn_ln_w0p25`, `ffn_ln_w0p25`, ...), all created at init so one tree serves all widths.
  """

  cfg: EncoderConfig
  private_widths: tuple[float, ...] = ()
  compute_dtype: str = "float32"

  @nn.compact
  def __call__(self, x: Array, mask: Array, *, width: float = 1.0,
               head_mask: Array | None = None, deterministic: bool = True) -> Array:
    cfg = self.cfg
    dims = width_dims(cfg, width)
    chex.assert_shape(x, (None, None, dims.hidden))
    std = cfg.initializer_range
    d, heads, hd, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size

    qkv = self.param("qkv", dense_init((d, 3, heads, hd), (3, heads, hd), std))
    attn_out = self.param("attn_out", dense_init((heads, hd, d), (d,), std))
    ffn_in = self.param("ffn_in", dense_init((d, f), (f,), std))
    ffn_out = self.param("ffn_out", dense_init((f, d), (d,), std))
    norms = {1.0: (self.param("attn_ln", layer_norm_init(d)), self.param("ffn_ln", layer_norm_init(d)))}
    for w in self.private_widths:
      size = width_dims(cfg, w).hidden
      norms[w] = (self.param(f"attn_ln_{width_tag(w)}", layer_norm_init(size)),
                  self.param(f"ffn_ln_{width_tag(w)}", layer_norm_init(size)))
    if dims.width not in norms:
      raise ValueError(f"layer {self.name} has no LayerNorms for width {dims.width}; "
                       f"it runs at {sorted(norms)}")
    attn_ln, ffn_ln = norms[dims.width]

    dw, hw, fw = dims.hidden, dims.heads, dims.ffn
    dropout = nn.Dropout(cfg.hidden_dropout)

    # Self-attention over the leading heads, one fused Q/K/V matmul.
    dt = self.compute_dtype
    kernel, bias = qkv["kernel"][:dw, :, :hw], qkv["bias"][:, None, None, :hw]
    q, k, v = contract("bsd,dthe->tbshe", x, kernel, dt) + bias
    scores = contract("bqhe,bkhe->bhqk", q, k, dt) / jnp.sqrt(jnp.float32(hd))
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(scores.dtype).min)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = nn.Dropout(cfg.attention_dropout)(probs, deterministic=deterministic)
    if head_mask is not None:
      probs = probs * head_mask[:hw, None, None]
    context = contract("bhqk,bkhe->bqhe", probs, v, dt)
    attn = contract("bqhe,heo->bqo", context, attn_out["kernel"][:hw, :, :dw], dt) + attn_out["bias"][:dw]
    x = layer_norm(x + dropout(attn, deterministic=deterministic), attn_ln, cfg.layer_norm_eps)

    # Feed-forward over the leading neurons.
    if dt == "float32":
      h = activation(cfg.hidden_act)(x @ ffn_in["kernel"][:dw, :fw] + ffn_in["bias"][:fw])
      h = h @ ffn_out["kernel"][:fw, :dw] + ffn_out["bias"][:dw]
    else:
      h = activation(cfg.hidden_act)(contract("bsd,df->bsf", x, ffn_in["kernel"][:dw, :fw], dt)
                                     + ffn_in["bias"][:fw])
      h = contract("bsf,fd->bsd", h, ffn_out["kernel"][:fw, :dw], dt) + ffn_out["bias"][:dw]
    return layer_norm(x + dropout(h, deterministic=deterministic), ffn_ln, cfg.layer_norm_eps)


def masked_mean(x: Array, mask: Array) -> Array:
  """Mean over the real tokens [B, d] of hidden states [B, S, d] (padding excluded)."""
  m = mask.astype(x.dtype)[..., None]
  return jnp.sum(x * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


class Router(nn.Module):
  """Masked mean over real tokens -> Linear -> ReLU -> Linear: one logit per width."""

  hidden: int
  num_widths: int
  init_std: float

  @nn.compact
  def __call__(self, x: Array, mask: Array) -> Array:
    d = x.shape[-1]
    mean = masked_mean(x, mask)
    w1 = self.param("hidden", dense_init((d, self.hidden), (self.hidden,), self.init_std))
    w2 = self.param("out", dense_init((self.hidden, self.num_widths), (self.num_widths,),
                                      self.init_std))
    h = jax.nn.relu(mean @ w1["kernel"] + w1["bias"])
    return h @ w2["kernel"] + w2["bias"]


class DownProjection(nn.Module):
  """Keeps the first d_w channels and normalises them with width w's own LayerNorm.

  At full width it is the identity, so the full-width model is exactly the pretrained encoder.
  """

  cfg: EncoderConfig
  widths: tuple[float, ...]  # the widths below 1.0

  @nn.compact
  def __call__(self, x: Array, *, width: float) -> Array:
    norms = {w: self.param(f"ln_{width_tag(w)}", layer_norm_init(width_dims(self.cfg, w).hidden))
             for w in self.widths}
    if width == 1.0:
      return x
    if width not in norms:
      raise ValueError(f"no down-projection for width {width}; configured: {sorted(norms)}")
    return layer_norm(x[..., :norms[width]["scale"].shape[0]], norms[width], self.cfg.layer_norm_eps)


class ClassifierHead(nn.Module):
  """Up-projection (the pooler dense, d_w -> d, tanh) and one classifier shared by all widths."""

  hidden_size: int
  num_classes: int
  dropout: float
  init_std: float

  @nn.compact
  def __call__(self, cls_vector: Array, *, deterministic: bool) -> tuple[Array, Array]:
    d, dw = self.hidden_size, cls_vector.shape[-1]
    pooler = self.param("pooler", dense_init((d, d), (d,), self.init_std))
    classifier = self.param("classifier",
                            dense_init((d, self.num_classes), (self.num_classes,), self.init_std))
    pooled = jnp.tanh(cls_vector @ pooler["kernel"][:dw] + pooler["bias"])
    dropped = nn.Dropout(self.dropout)(pooled, deterministic=deterministic)
    return pooled, dropped @ classifier["kernel"] + classifier["bias"]
