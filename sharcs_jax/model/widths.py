"""Width ratio -> sliced sizes: the one place the rounding rule lives."""

from __future__ import annotations

import dataclasses

from sharcs_jax.model.config import EncoderConfig


@dataclasses.dataclass(frozen=True)
class WidthDims:
  """Sizes of an adaptive layer at one width ratio."""

  width: float
  hidden: int  # residual width d_w
  heads: int  # attention heads kept (head size unchanged)
  ffn: int  # feed-forward neurons kept


def check_width(width: float) -> float:
  if not isinstance(width, (int, float)) or isinstance(width, bool):
    raise TypeError(f"width must be a static Python float, got {type(width).__name__}: {width!r}")
  if not 0.0 < width <= 1.0:
    raise ValueError(f"width ratio {width!r} is outside (0, 1]")
  return float(width)


def width_dims(cfg: EncoderConfig, width: float) -> WidthDims:
  """Uses round(), never int(): int(100 * 0.29) is 28."""
  width = check_width(width)
  heads = round(cfg.num_heads * width)
  if heads == 0:
    raise ValueError(
        f"width ratio {width} leaves zero attention heads (round({cfg.num_heads} * {width}) = 0); "
        f"the smallest usable width here is {0.5 / cfg.num_heads + 1e-9:.4g}")
  return WidthDims(
      width=width,
      hidden=round(cfg.hidden_size * width),
      heads=heads,
      ffn=round(cfg.intermediate_size * width),
  )


def width_label(width: float) -> str:
  """How reports, JSON keys and file names spell a width: 0.25 -> '0.25', 1.0 -> '1'."""
  return f"{check_width(width):g}"


def width_tag(width: float) -> str:
  """Parameter-tree key suffix that names a width: 0.25 -> 'w0p25' (an identifier)."""
  return "w" + width_label(width).replace(".", "p")
