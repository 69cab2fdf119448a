"""The engine's runtime and compute precision: chosen from the CPU's features, or as the user says.

Two runtimes run the same programs. XLA (the default, and the only one of training and
evaluation) runs float32 or bf16 matmul inputs (float32 accumulation, LayerNorm, softmax and
residuals); bf16 pays only where the CPU multiplies bf16 natively (avx512_bf16 or AMX): there XLA's
bf16 matmuls run about twice as fast as float32; without them bf16 is emulated and several times
slower. ONNX Runtime (an install extra, for serving) runs float32 or int8: XLA's int8 dots do not
reach the CPU's int8 dot-product kernels (VNNI, AVX2's vpmaddubsw), ONNX Runtime's MLAS does. So
"auto" reads the CPU's flags instead of assuming.
"""

from __future__ import annotations

import os

RUNTIMES = ("xla", "onnxruntime")
PRECISIONS = {"xla": ("auto", "fp32", "bf16"), "onnxruntime": ("auto", "fp32", "int8")}
COMPUTE_DTYPES = {"fp32": "float32", "bf16": "bfloat16"}
FAST_BF16_FLAGS = ("avx512_bf16", "amx_bf16")
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")
INT8_FLAGS = VNNI_FLAGS + ("avx2",)  # AVX2's u8 x s8 multiply-add still beats float32 matmuls


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset[str]:
  """The first CPU's feature flags (empty where /proc/cpuinfo does not exist)."""
  if not os.path.isfile(path):
    return frozenset()
  with open(path) as f:
    for line in f:
      if line.startswith("flags"):
        return frozenset(line.partition(":")[2].split())
  return frozenset()


def check_runtime(runtime: str) -> str:
  if runtime not in RUNTIMES:
    raise ValueError(f"runtime {runtime!r} is not one of {RUNTIMES}")
  return runtime


def resolve(precision: str, platform: str = "cpu", flags: frozenset[str] | None = None,
            runtime: str = "xla") -> str:
  """The precision a requested one runs at on `runtime`: XLA "fp32" or "bf16" ("auto": bf16 only
  on a CPU with fast bf16); ONNX Runtime "fp32" or "int8" ("auto": int8 on a CPU with an int8
  dot product)."""
  allowed = PRECISIONS[check_runtime(runtime)]
  if precision not in allowed:
    other = next(r for r in RUNTIMES if r != runtime and precision in PRECISIONS[r]) if any(
        precision in PRECISIONS[r] for r in RUNTIMES) else None
    hint = f" ({precision} runs on runtime {other!r})" if other else ""
    raise ValueError(f"precision {precision!r} is not one of {allowed} for runtime "
                     f"{runtime!r}{hint}")
  if precision != "auto":
    return precision
  if platform != "cpu":
    return "fp32"  # accelerators: not measured here, so not assumed
  flags = cpu_flags() if flags is None else flags
  fast = FAST_BF16_FLAGS if runtime == "xla" else INT8_FLAGS
  return ("bf16" if runtime == "xla" else "int8") if any(f in flags for f in fast) else "fp32"


def int8_reduce_range(flags: frozenset[str]) -> bool:
  """7-bit weights where the CPU has no VNNI: AVX2's vpmaddubsw saturates 8-bit products."""
  return not any(f in flags for f in VNNI_FLAGS)
