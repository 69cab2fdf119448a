"""The SHARCS programs as ONNX models for ONNX Runtime, from the Flax functions XLA compiles.

Each program of `programs.functions` (the prefix with the router; each width's adaptive part with
its head) is converted by jax2onnx with the parameters as constants into one model, batch and
length symbolic (a batch runs at its longest row's length: no padding to length buckets). Then:
  1. ONNX Runtime's basic optimisations fold the constants (the weights' width slices become
     initializers, dropout goes);
  2. `onnx_graph` splits the packed Q/K/V projection into three, turns every Einsum and Gemm
     into MatMul (+ Add) and each LayerNorm and GELU into one node;
  3. for int8 (the recipe measured best, docs/serving.md), `quantize_dynamic`: signed int8
     weights per output channel, activations quantised to uint8 at run time (u8 x s8 is the
     kernel VNNI and AVX2 run), MatMul with a constant weight only. Without VNNI the weights keep
     7 bits (`reduce_range`), since AVX2's u8 x s8 multiply (vpmaddubsw) saturates at 8 bits.
Models are stored under `cache_dir/onnx-<fingerprint>/` (the fingerprint covers the parameter
values, the model code and the converter versions), so a restart converts nothing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging as std_logging
import os
import tempfile
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sharcs_jax import report
from sharcs_jax.model import config as model_config
from sharcs_jax.model import early_exit, encoder, sharcs, widths
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.serve.onnx import runner as ort_runner

try:
  import onnx
except ImportError:
  raise ort_runner.missing_extra("the onnx package (to convert the programs)") from None
from sharcs_jax.serve.onnx import graph as onnx_graph  # pylint: disable=g-import-not-at-top
from sharcs_jax.serve.export.loader import narrow_part_name, part_name, stage_part_name
from sharcs_jax.serve.precision import PRECISIONS, cpu_flags, int8_reduce_range
from sharcs_jax.serve.programs import (Span, StageProgram, argument_specs, check_spans,
                                       functions, model_settings)

_SOURCES = (model_config, encoder, sharcs, widths, early_exit, onnx_graph)
_VERSIONED = ("jax", "jax2onnx", "onnx", "onnx-ir", "onnxruntime")


@contextlib.contextmanager
def _quiet(name: str, level: int = std_logging.ERROR) -> Iterator[None]:
  """Raises one logger's level for a block."""
  logger = std_logging.getLogger(name)
  before = logger.level
  logger.setLevel(level)
  try:
    yield
  finally:
    logger.setLevel(before)


def import_jax2onnx() -> Any:
  try:
    import jax2onnx
  except ImportError:
    raise ort_runner.missing_extra("jax2onnx (to convert the programs)") from None
  return jax2onnx


@dataclasses.dataclass(frozen=True)
class OnnxKey:
  kind: str  # "prefix", "adaptive", "forward" (the whole model at one width, no router), "stage",
  # "narrow" (an early-exit model's narrow layers at a width)
  width: float | None
  span: Span | None = None  # an early-exit model's stage: its layers

  @property
  def name(self) -> str:
    if self.kind == "stage":
      return stage_part_name(self.span)
    if self.kind == "narrow":
      return narrow_part_name(self.width, self.span)
    return FORWARD if self.kind == "forward" else part_name(self.width)


FORWARD = "forward"  # the full-width model's file name


def fingerprint(model: SharcsModel | EarlyExitModel, params: Any, precision: str,
                reduce_range: bool) -> str:
  """Everything a converted model depends on, parameter values included."""
  h = hashlib.sha256()
  for part in (repr(dataclasses.asdict(model.encoder)),
               *(repr(setting) for setting in model_settings(model)), precision,
               repr(reduce_range),
               *(str(report.package_version(p)) for p in _VERSIONED)):
    h.update(part.encode())
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.ascontiguousarray(leaf).tobytes())
  for source in [m.__file__ for m in _SOURCES] + [__file__]:
    with open(source, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:20]


def convert(function: Callable[..., Any], specs: Sequence[jax.ShapeDtypeStruct],
            input_names: Sequence[str], output_names: Sequence[str], name: str) -> Any:
  """One jitted function -> an ONNX model (jax2onnx), batch symbolic as 'batch'."""
  jax2onnx = import_jax2onnx()
  # Its plugins for equinox and dm_pix models, loaded on first use, log a traceback each where
  # those packages are missing; the conversion needs none of them.
  with _quiet("jax2onnx.plugins.plugin_system"):
    return jax2onnx.to_onnx(function, list(specs), model_name=name,
                            input_names=list(input_names), output_names=list(output_names))


def fold_constants(model: Any) -> Any:
  """ONNX Runtime's basic (device-independent) optimisations, written back as a model."""
  ort = ort_runner.import_onnxruntime()
  with tempfile.TemporaryDirectory() as tmp:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = os.path.join(tmp, "folded.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), sess_options=options,
                         providers=["CPUExecutionProvider"])
    return onnx.load(options.optimized_model_filepath)


def quantize_int8(model: Any, reduce_range: bool) -> Any:
  """int8 weights of every constant MatMul (module doc, step 3)."""
  ort_runner.import_onnxruntime()
  from onnxruntime import quantization as q

  # It advises pre-processing on the root logger: the folding above is that pre-processing.
  with _quiet(""), tempfile.TemporaryDirectory() as tmp:
    source, target = os.path.join(tmp, "fp32.onnx"), os.path.join(tmp, "int8.onnx")
    onnx.save(model, source)
    q.quantize_dynamic(source, target, op_types_to_quantize=["MatMul"], per_channel=True,
                       reduce_range=reduce_range, weight_type=q.QuantType.QInt8,
                       extra_options={"MatMulConstBOnly": True})
    return onnx.load(target)


def program_model(model: SharcsModel | EarlyExitModel, params: Any, key: OnnxKey,
                  precision: str, reduce_range: bool) -> Any:
  """One program as a lowered (and for int8 quantised) ONNX model."""
  if isinstance(model, SharcsModel):
    model = model.clone(compute_dtype="float32")
  function = functions(model)
  variables = {"params": params}
  specs = argument_specs(model, key.kind, "batch", "length", span=key.span, width=key.width)
  if key.kind == "narrow":
    first, last = key.span
    onnx_model = convert(lambda hidden, mask: function["narrow"](variables, hidden, mask,
                                                                 width=key.width, first=first,
                                                                 last=last),
                         specs, ort_runner.PART_INPUTS, ort_runner.STAGE_OUTPUTS, key.name)
  elif key.kind == "stage":
    first, last = key.span
    names = ort_runner.PREFIX_INPUTS if first == 0 else ort_runner.PART_INPUTS
    onnx_model = convert(lambda *inputs: function["stage"](variables, *inputs, first=first,
                                                           last=last),
                         specs, names, ort_runner.STAGE_OUTPUTS, key.name)
  elif key.kind == "prefix":
    onnx_model = convert(lambda ids, mask, types: function["prefix"](variables, ids, mask, types),
                         specs, ort_runner.PREFIX_INPUTS, ort_runner.PREFIX_OUTPUTS, key.name)
  elif key.kind == "forward":
    onnx_model = convert(
        lambda ids, mask, types: function["forward"](variables, ids, mask, types, width=key.width),
        specs, ort_runner.PREFIX_INPUTS, ort_runner.PART_OUTPUTS, key.name)
  else:
    onnx_model = convert(
        lambda hidden, mask: function["adaptive"](variables, hidden, mask, width=key.width),
        specs, ort_runner.PART_INPUTS, ort_runner.PART_OUTPUTS, key.name)
  onnx_model = onnx_graph.split_packed_projections(fold_constants(onnx_model))
  onnx_model = onnx_graph.fuse_norms_and_gelu(onnx_graph.lower_to_matmul(onnx_model))
  return onnx_model if precision != "int8" else quantize_int8(onnx_model, reduce_range)


class OnnxPrograms:
  """Every program as an ONNX file, converted once and stored (see module doc)."""

  def __init__(self, model: SharcsModel | EarlyExitModel, params: Any, *, precision: str,
               cache_dir: str | None = None, reduce_range: bool | None = None,
               full_width: bool = False, stages: Sequence[StageProgram] = ()):
    """`full_width` also converts the whole model at width 1.0 as one program
    (`full_width_call`); an early-exit model's programs are its `stages` in the dispatch core's
    order (their full-width spans cover the layers, `programs.check_spans`; narrow ones read
    hidden states)."""
    if precision not in PRECISIONS["onnxruntime"][1:]:
      raise ValueError(f"ONNX Runtime precision {precision!r} is not one of "
                       f"{PRECISIONS['onnxruntime'][1:]} (resolve 'auto' first)")
    self.model = model
    self.precision = precision
    self.reduce_range = (int8_reduce_range(cpu_flags()) if reduce_range is None
                         else reduce_range) if precision == "int8" else False
    params = jax.tree_util.tree_map(np.asarray, params)
    key = fingerprint(model, params, precision, self.reduce_range)
    self.directory = os.path.join(cache_dir or tempfile.mkdtemp(prefix="sharcs-onnx-"),
                                  f"onnx-{key}")
    if isinstance(model, EarlyExitModel):
      check_spans([p.span for p in stages if p.kind == "stage"], model.encoder.num_layers)
      self.keys = [OnnxKey(p.kind, p.width, p.span) for p in stages]
    else:
      self.keys = ([OnnxKey("prefix", None)] + [OnnxKey("adaptive", w) for w in model.widths]
                   + ([OnnxKey("forward", 1.0)] if full_width else []))
    self.converted = self.loaded = 0
    self.paths = {key: self._obtain(key, params) for key in self.keys}
    logging.info("%d ONNX %s programs: %d converted, %d loaded from %s", len(self.paths),
                 precision, self.converted, self.loaded, self.directory)

  def _obtain(self, key: OnnxKey, params: Any) -> str:
    path = os.path.join(self.directory, f"{key.name}.onnx")
    if os.path.isfile(path):
      self.loaded += 1
      return path
    onnx_model = program_model(self.model, params, key, self.precision, self.reduce_range)
    os.makedirs(self.directory, exist_ok=True)
    with report.atomic_path(path) as tmp:
      onnx.save(onnx_model, tmp)
    self.converted += 1
    return path

  def runner(self, threads: int = 0) -> ort_runner.OrtRunner | ort_runner.StageOrtRunner:
    """Sessions for every program (built now, never while serving)."""
    if isinstance(self.model, EarlyExitModel):
      return ort_runner.StageOrtRunner([self.paths[key] for key in self.keys], threads)
    return ort_runner.OrtRunner(self.paths[OnnxKey("prefix", None)],
                                [self.paths[OnnxKey("adaptive", w)] for w in self.model.widths],
                                threads)

  def full_width_call(self, threads: int = 0) -> Callable[..., np.ndarray]:
    """The whole model at width 1.0 in one session (built now), as `dispatch.run_each_row` calls
    it: one call per batch where the engine's full width makes two (prefix, then part)."""
    key = OnnxKey("forward", 1.0)
    if key not in self.paths:
      raise ValueError("these programs were converted without the full-width model: build them "
                       "with full_width=True")
    return ort_runner.full_width_caller(self.paths[key], threads)
