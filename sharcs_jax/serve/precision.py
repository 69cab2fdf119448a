"""The engine's compute precision: chosen from the CPU's features, or as the user says.

bf16 matmul inputs (float32 accumulation, LayerNorm, softmax and residuals) pay only where the
CPU multiplies bf16 natively (avx512_bf16 or AMX): there XLA's bf16 matmuls run about twice as
fast as float32; without them bf16 is emulated and several times slower. So "auto" reads the
CPU's flags instead of assuming.
"""

from __future__ import annotations

import os

PRECISIONS = ("auto", "fp32", "bf16")
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
  """The first CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
  if not os.path.isfile(path):
    return frozenset()
  with open(path) as f:
    for line in f:
      if line.startswith("flags"):
        return frozenset(line.partition(":")[2].split())
  return frozenset()


def resolve(precision: str, platform: str = "cpu", flags: frozenset[str] | None = None) -> str:
  """"fp32" or "bf16" for a requested precision; "auto" is bf16 only on a CPU with fast bf16."""
  if precision not in PRECISIONS:
    raise ValueError(f"precision {precision!r} is not one of {PRECISIONS}")
  if precision != "auto":
    return precision
  if platform != "cpu":
    return "fp32"  # accelerators: not measured here, so not assumed
  flags = cpu_flags() if flags is None else flags
  return "bf16" if any(f in flags for f in FAST_BF16_FLAGS) else "fp32"
