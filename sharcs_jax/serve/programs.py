"""Ahead-of-time compiled SHARCS programs, kept on disk so that a restart compiles nothing.

Four kinds of program, each compiled with `jit(...).lower(...).compile()` for fixed shapes:
  prefix   (batch, length)         embeddings, layers 1..K and the router -> (hidden, router logits)
  adaptive (width, batch, length)  layers K+1..L and the head at `width` -> class probabilities
  forward  (width, batch, length)  the whole model at one width, no router -> class probabilities
  stage    (span, batch, length)   an early-exit model's layers a..b and exit b, on the token ids
                                   (a = 0) or layer a - 1's hidden states -> (hidden, probabilities)
  narrow   (width, span, batch,    a depth-and-width early-exit model's narrow layers a..b (its
            length)                `narrow_spans`) at a width, on layer K's hidden states (a = K)
                                   or the narrow span before's -> (hidden, probabilities)
Parameters are arguments, not constants, so one program serves any parameter values of the same
shapes (every epoch of a training run, any checkpoint of a config). Given a mesh (training on
several devices), programs whose batch divides over it are compiled SPMD: parameters replicated,
batch rows sharded; their inputs become global arrays and their outputs stay global arrays.
FLOPs are read from single-device programs, so they are per example whatever the mesh.

Persistence uses `jax.experimental.serialize_executable`, not the persistent compilation cache:
the cache still traces and lowers every function at start-up and only skips the XLA compile,
whereas a deserialised executable is loaded as is, so a restarted server neither traces nor
compiles. A stored program is found by a fingerprint of everything that shapes it: jax and jaxlib
versions, the device, the model's settings, the parameter shapes and the source of the model
code. Files are pickles (as `serialize_executable` makes them): load only directories you wrote.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import itertools
import logging as std_logging
import os
import pickle
from typing import Any, Callable, Iterator, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from absl import logging
from jax.experimental import serialize_executable
from jax.experimental.compilation_cache import compilation_cache

from sharcs_jax import parallel, report
from sharcs_jax.model.flops import compiled_flops
from sharcs_jax.model import config as model_config
from sharcs_jax.model import early_exit, encoder, sharcs, widths
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel

_MODEL_SOURCES = (model_config, encoder, sharcs, widths)
Span = tuple[int, int]  # a stage's first and last layer, 0-based


@dataclasses.dataclass(frozen=True)
class ProgramKey:
  kind: str  # "prefix", "adaptive", "forward", "stage" or "narrow"
  width: float | None  # None for the prefix and stages
  batch: int
  length: int
  span: Span | None = None  # a stage's layers

  @property
  def file_name(self) -> str:
    width = "" if self.width is None else f"_{widths.width_tag(self.width)}"
    span = "" if self.span is None else f"_l{self.span[0]}-{self.span[1]}"
    return f"{self.kind}{width}{span}_b{self.batch}_s{self.length}.xla"


def model_settings(model: SharcsModel | EarlyExitModel) -> tuple[Any, ...]:
  """The model's settings that shape its programs (beside the encoder's), for fingerprints."""
  if isinstance(model, EarlyExitModel):
    return ("early exit", model.num_classes, model.pooling, model.widths, model.width_layer,
            model.narrow_exits)
  return (model.num_classes, model.widths, model.router_layer, model.router_hidden,
          model.compute_dtype)


def fingerprint(model: SharcsModel | EarlyExitModel, shapes: Any) -> str:
  """What a stored executable depends on; a change of any part gives a new directory."""
  h = hashlib.sha256()
  device = jax.devices()[0]
  for part in (jax.__version__, jaxlib.__version__, device.platform, device.device_kind,
               repr(dataclasses.asdict(model.encoder)),
               *(repr(setting) for setting in model_settings(model)),
               repr(jax.tree_util.tree_map(lambda x: (x.shape, str(x.dtype)), shapes))):
    h.update(part.encode())
  sources = _MODEL_SOURCES + ((early_exit,) if isinstance(model, EarlyExitModel) else ())
  for source in [m.__file__ for m in sources] + [__file__]:
    with open(source, "rb") as f:
      h.update(f.read())
  return h.hexdigest()[:20]


def functions(model: SharcsModel | EarlyExitModel) -> dict[str, Callable[..., Any]]:
  if isinstance(model, EarlyExitModel):
    def stage(variables, *inputs, first, last):
      return model.apply(variables, *inputs, first=first, last=last, method=EarlyExitModel.stage)

    def narrow(variables, hidden, mask, *, width, first, last):
      return model.apply(variables, hidden, mask, width=width, span=(first, last),
                         method=EarlyExitModel.narrow_stage)

    return {"stage": stage, "narrow": narrow}

  def prefix(variables, ids, mask, types):
    return model.apply(variables, ids, mask, types, method=SharcsModel.prefix)

  def adaptive(variables, hidden, mask, *, width):
    out = model.apply(variables, hidden, mask, width=width, method=SharcsModel.adaptive)
    return jax.nn.softmax(out.logits, axis=-1)

  def forward(variables, ids, mask, types, *, width):
    return jax.nn.softmax(model.apply(variables, ids, mask, types, width=width).logits, axis=-1)

  return {"prefix": prefix, "adaptive": adaptive, "forward": forward}


def argument_specs(model: SharcsModel | EarlyExitModel, kind: str, batch: Any, length: Any,
                   sharding: Any = None, span: Span | None = None, width: float | None = None
                   ) -> tuple[jax.ShapeDtypeStruct, ...]:
  """What a part takes after its variables: (ids, mask, types), or (hidden, mask) for an
  adaptive part, a stage after the first layer or a narrow stage (d_w wide after the first).
  The one place these shapes are spelled, for compiling and for `jax.export` (where batch and
  length are symbolic)."""
  ids = jax.ShapeDtypeStruct((batch, length), jnp.int32, sharding=sharding)
  if kind in ("adaptive", "narrow") or (kind == "stage" and span[0] > 0):
    d = model.encoder.hidden_size
    if kind == "narrow" and span is not None and span[0] > model.width_layer:
      d = widths.width_dims(model.encoder, width).hidden
    return jax.ShapeDtypeStruct((batch, length, d), jnp.float32, sharding=sharding), ids
  return ids, ids, ids


@contextlib.contextmanager
def _without_compilation_cache() -> Iterator[None]:
  """Compiles afresh even where jax's persistent compilation cache is on.

  An executable that the persistent cache hands back serialises incompletely on jax 0.10 CPU
  (its fused functions are missing after loading: "Function ... not found"), so programs that
  are to be stored must not come from there. jax decides once per process whether the cache is
  used, hence the resets around the switch (each reset logs a line; they are kept out of the log).
  """
  enabled = jax.config.jax_enable_compilation_cache
  jax.config.update("jax_enable_compilation_cache", False)
  _quiet_reset_cache()
  try:
    yield
  finally:
    jax.config.update("jax_enable_compilation_cache", enabled)
    _quiet_reset_cache()


def _quiet_reset_cache() -> None:
  logger = std_logging.getLogger(compilation_cache.reset_cache.__module__)
  level = logger.level
  logger.setLevel(std_logging.WARNING)
  try:
    compilation_cache.reset_cache()
  finally:
    logger.setLevel(level)


class Programs:
  """Compiled programs by `ProgramKey`, with their FLOPs, loaded from `cache_dir` when stored.

  `params` may be the parameters or their `jax.ShapeDtypeStruct`s: only shapes and dtypes count.
  """

  def __init__(self, model: SharcsModel | EarlyExitModel, params: Any, *,
               batch_buckets: Sequence[int], length_buckets: Sequence[int],
               kinds: Sequence[str] = ("prefix", "adaptive"), spans: Sequence[Span] = (),
               cache_dir: str | None = None, mesh: jax.sharding.Mesh | None = None):
    """`spans`: an early-exit model's stages (kinds ("stage",)), each layers a..b, the first
    starting at layer 0 and each next one after the last."""
    if list(batch_buckets) != sorted(set(batch_buckets)) or batch_buckets[0] < 1:
      raise ValueError(f"batch_buckets must be increasing sizes >= 1, got {tuple(batch_buckets)}")
    known = ({"stage", "narrow"} if isinstance(model, EarlyExitModel)
             else {"prefix", "adaptive", "forward"})
    unknown = set(kinds) - known
    if unknown:
      raise ValueError(f"unknown program kinds {sorted(unknown)} for a {type(model).__name__}")
    self.spans = check_spans(spans, model.encoder.num_layers) if "stage" in kinds else ()
    self.model = model
    self.batch_buckets = tuple(batch_buckets)
    self.length_buckets = tuple(length_buckets)
    self.variables = {"params": jax.tree_util.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)}
    self.mesh = mesh if mesh is not None and mesh.size > 1 else None
    # SPMD executables are not stored: they depend on the whole cluster's device assignment.
    self.directory = (None if cache_dir is None or self.mesh is not None
                      else os.path.join(cache_dir, fingerprint(model, params)))
    self._functions = functions(model)
    self.executables: dict[ProgramKey, Any] = {}
    self.flops: dict[ProgramKey, float] = {}
    self.compiled = self.loaded = 0  # how each program was obtained, for tests and logs
    for b, s in itertools.product(self.batch_buckets, self.length_buckets):
      keys = [ProgramKey("prefix", None, b, s)] if "prefix" in kinds else []
      keys += [ProgramKey(kind, w, b, s) for kind in ("adaptive", "forward") if kind in kinds
               for w in model.widths]
      keys += [ProgramKey("stage", None, b, s, span) for span in self.spans]
      if "narrow" in kinds:
        keys += [ProgramKey("narrow", w, b, s, span) for w, span in model.narrow_stages]
      for key in keys:
        self.executables[key], self.flops[key] = self._obtain(key)
    logging.info("%d programs: %d compiled, %d loaded from %s", len(self.executables),
                 self.compiled, self.loaded, self.directory)

  def __call__(self, kind: str, width: float | None, batch: int, length: int,
               span: Span | None = None) -> Any:
    executable = self.executables[ProgramKey(kind, width, batch, length, span)]
    if not self._sharded(batch):
      return executable
    sharding = parallel.batch_sharded(self.mesh)

    def call(variables, *rows):  # rows: host arrays or global arrays, split over the data axis
      return executable(variables, *(x if isinstance(x, jax.Array) and x.sharding == sharding
                                     else parallel.to_global(x, sharding) for x in rows))
    return call

  def _sharded(self, batch: int) -> bool:
    return self.mesh is not None and batch % self.mesh.size == 0

  def prefix_flops(self, length: int) -> float:
    """One example's FLOPs of the prefix and router, read as `example_flops` reads them."""
    b = self.batch_buckets[0]
    return self.flops[ProgramKey("prefix", None, b, length)] / b

  def example_flops(self, width: float, length: int) -> float:
    """One example's FLOPs: prefix and router, then `width`'s part.

    Read at the smallest batch bucket (1 by default), divided by its size: a few costs do not grow
    with the batch, so per-example figures are only comparable at the same batch size.
    """
    b = self.batch_buckets[0]
    return (self.flops[ProgramKey("prefix", None, b, length)]
            + self.flops[ProgramKey("adaptive", width, b, length)]) / b

  def flops_table(self) -> np.ndarray:
    """FLOPs per example [m, length buckets]: prefix, router and each width's part. The one
    table every consumer (training, dev evaluation, the engine, summary mode) reads."""
    return np.array([[self.example_flops(w, s) for s in self.length_buckets]
                     for w in self.model.widths])

  def stage_flops_table(self, stages: Sequence["StageProgram"] | None = None) -> np.ndarray:
    """FLOPs per example [stages, length buckets] of each stage alone (default: the spans in
    order), read as `example_flops` reads them: a row costs the sum of the stages it ran."""
    b = self.batch_buckets[0]
    stages = stages or [StageProgram("stage", None, span) for span in self.spans]
    return np.array([[self.flops[ProgramKey(p.kind, p.width, b, s, p.span)] / b
                      for s in self.length_buckets] for p in stages])

  def prefix_flops_row(self) -> np.ndarray:
    """FLOPs per example [length buckets] of the prefix and router alone (a cascade adds each
    part it runs to this once)."""
    return np.array([self.prefix_flops(s) for s in self.length_buckets])

  def _obtain(self, key: ProgramKey) -> tuple[Any, float]:
    path = None if self.directory is None else os.path.join(self.directory, key.file_name)
    if path is not None and os.path.isfile(path):
      try:
        with open(path, "rb") as f:
          payload, in_tree, out_tree, flops = pickle.load(f)
        executable = serialize_executable.deserialize_and_load(payload, in_tree, out_tree)
        self.loaded += 1
        return executable, flops
      except Exception as e:  # a truncated or foreign file: compile afresh and replace it
        logging.warning("could not load %s (%s: %s); compiling it again", path,
                        type(e).__name__, e)
    executable = self._compile(key)
    flops = compiled_flops(executable)
    self.compiled += 1
    if path is not None:
      os.makedirs(self.directory, exist_ok=True)
      with report.atomic_path(path) as tmp, open(tmp, "wb") as f:
        pickle.dump((*serialize_executable.serialize(executable), flops), f)
    return executable, flops

  def _compile(self, key: ProgramKey) -> Any:
    if self.directory is None:
      return self._lower(key).compile()
    with _without_compilation_cache():
      return self._lower(key).compile()

  def _lower(self, key: ProgramKey) -> Any:
    variables, rows = self.variables, None
    if self._sharded(key.batch):
      variables = jax.tree_util.tree_map(
          lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=parallel.replicated(self.mesh)),
          variables)
      rows = parallel.batch_sharded(self.mesh)
    args = argument_specs(self.model, key.kind, key.batch, key.length, rows, key.span, key.width)
    static = static_arguments(key.kind, key.width, key.span)
    return jax.jit(self._functions[key.kind], static_argnames=tuple(static),
                   out_shardings=rows).lower(variables, *args, **static)


def static_arguments(kind: str, width: float | None, span: Span | None) -> dict[str, Any]:
  """What a program of `kind` is compiled for besides its shapes: its width and its layers."""
  layers = {} if span is None else {"first": span[0], "last": span[1]}
  return {**({} if width is None else {"width": width}), **layers}


class ProgramRunner:
  """`dispatch.Runner` over precompiled programs: nothing traces or compiles while serving."""

  def __init__(self, programs: Programs, variables: Any):
    self.programs, self.variables = programs, variables

  def prefix(self, batch: int, length: int, ids, mask, types):
    return self.programs("prefix", None, batch, length)(self.variables, ids, mask, types)

  def part(self, width_index: int, batch: int, length: int, hidden, mask):
    width = self.programs.model.widths[width_index]
    return self.programs("adaptive", width, batch, length)(self.variables, hidden, mask)


def check_spans(spans: Sequence[Span], num_layers: int) -> tuple[Span, ...]:
  """Stages that cover layers 0..num_layers - 1 in order, each at least one layer."""
  spans = tuple((int(a), int(b)) for a, b in spans)
  starts = [0] + [b + 1 for _, b in spans[:-1]]
  if (not spans or [a for a, _ in spans] != starts or any(b < a for a, b in spans)
      or spans[-1][1] != num_layers - 1):
    raise ValueError(f"stages {list(spans)} must cover layers 0..{num_layers - 1} in order, "
                     "each starting after the one before")
  return spans


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """Which program runs one stage of a layout: SHARCS's prefix or a width's adaptive part, an
  early-exit model's span of full-width layers ("stage") or of narrow layers at a width
  ("narrow")."""

  kind: str
  width: float | None
  span: Span | None


class StageProgramRunner:
  """`dispatch.StageRunner` over an early-exit model's precompiled stages (`stages`: which
  program each stage runs; default the spans in order)."""

  def __init__(self, programs: Programs, variables: Any,
               stages: Sequence[StageProgram] | None = None):
    self.programs, self.variables = programs, variables
    self.stages = tuple(stages or [StageProgram("stage", None, span) for span in programs.spans])

  def stage(self, index: int, batch: int, length: int, inputs: tuple[Any, ...]
            ) -> tuple[Any, tuple[Any, ...]]:
    p = self.stages[index]
    hidden, probabilities = self.programs(p.kind, p.width, batch, length, p.span)(
        self.variables, *inputs)
    return hidden, (probabilities,)
