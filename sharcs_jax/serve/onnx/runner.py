"""`dispatch.Runner` on ONNX Runtime: one session per program, all built before serving.

A program is one ONNX model, batch and length symbolic: the prefix with the router, and each
width's part with its head (`onnx_programs` writes them from the same Flax functions the XLA
programs compile). Sessions run every usable core intra-op (spinning only within a run), one
thread inter-op (the dispatch core already runs parts one after another), with every
graph optimisation (ONNX Runtime fuses the quantised MatMuls at load).

Imports only numpy and onnxruntime, so that the exported loader, which has no jax, uses it too.
"""

from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import numpy as np

EXTRA = "serve"  # the install extra that brings onnxruntime
PREFIX_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
PREFIX_OUTPUTS = ("hidden", "router_logits")
PART_INPUTS = ("hidden", "attention_mask")
PART_OUTPUTS = ("probabilities",)
STAGE_OUTPUTS = ("stage_hidden", "probabilities")  # an early-exit model's stage


class MissingExtra(ImportError):
  """A runtime's package is not installed; the message names the extra that brings it."""


def missing_extra(package: str) -> MissingExtra:
  return MissingExtra(f"runtime 'onnxruntime' needs {package}: install the {EXTRA!r} extra "
                      f"(bash launch/install.sh {EXTRA})")


def import_onnxruntime() -> Any:
  """onnxruntime, or one line that names the extra to install."""
  try:
    import onnxruntime
  except ImportError:
    raise missing_extra("the onnxruntime package") from None
  return onnxruntime


def usable_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# ONNX Runtime would fuse each residual Add into the following LayerNormalization; on these graphs
# its SkipLayerNormalization kernel is slower than the Add and the LayerNormalization apart (the
# full-width int8 part at batch 32, length 32: 63.3 ms fused against 43.1 ms apart).
DISABLED_OPTIMIZERS = ["SkipLayerNormFusion"]


def session_options(threads: int = 0) -> Any:
  """Every usable core (or `threads`) intra-op, one inter-op thread, every graph optimisation.

  The runner alternates between sessions (prefix, then each width's part), each with its own
  pool. Its threads spin within a run (no wake-up per op) and stop when the run ends (not taking
  the cores from the next session's). Full width at batch 32, length 32, int8 on 2 cores: 30.8
  to 33.7 ms so, 38.2 to 40.1 without spinning, 32.4 to 33.5 with one pool shared by all sessions
  (which ONNX Runtime then demands of every session in the process)."""
  ort = import_onnxruntime()
  options = ort.SessionOptions()
  options.intra_op_num_threads = threads or usable_cores()
  options.inter_op_num_threads = 1
  options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
  options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
  options.log_severity_level = 3  # errors only: no warnings about unused initializers
  options.add_session_config_entry("session.intra_op.allow_spinning", "1")
  options.add_session_config_entry("session.force_spinning_stop", "1")
  return options


def make_session(model: str | bytes, threads: int = 0) -> Any:
  """One CPU session for an ONNX file path or serialized model."""
  ort = import_onnxruntime()
  return ort.InferenceSession(model, sess_options=session_options(threads),
                              providers=["CPUExecutionProvider"],
                              disabled_optimizers=DISABLED_OPTIMIZERS)


def token_feeds(ids: np.ndarray, mask: np.ndarray, types: np.ndarray) -> dict[str, np.ndarray]:
  """A model's token inputs, as its int32 inputs take them."""
  return {name: np.ascontiguousarray(x, np.int32) for name, x in zip(PREFIX_INPUTS,
                                                                      (ids, mask, types))}


def hidden_feeds(hidden: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray]:
  """A model's inputs when it reads an earlier program's hidden states."""
  return {"hidden": np.ascontiguousarray(hidden, np.float32),
          "attention_mask": np.ascontiguousarray(mask, np.int32)}


def session_io(session: Any) -> tuple[list, list]:
  """([(input name, shape)], [(output name, shape)]) of a session: for the loader's checks."""
  return ([(i.name, i.shape) for i in session.get_inputs()],
          [(o.name, o.shape) for o in session.get_outputs()])


def full_width_caller(model: str | bytes, threads: int = 0) -> Callable[..., np.ndarray]:
  """A session for a token-to-probabilities model, called as `dispatch.run_each_row` calls:
  (batch, length, ids, mask, types) -> probabilities [batch, C]."""
  session = make_session(model, threads)

  def call(batch: int, length: int, ids: np.ndarray, mask: np.ndarray,
           types: np.ndarray) -> np.ndarray:
    (probabilities,) = session.run(PART_OUTPUTS, token_feeds(ids, mask, types))
    return probabilities

  return call


class OrtRunner:
  """A session for the prefix and one for each width's part; `sessions_built` counts them, so a
  test can check that serving builds none. Batch and length are symbolic in every model."""

  def __init__(self, prefix: str | bytes, parts: Sequence[str | bytes], threads: int = 0):
    self.prefix_session = make_session(prefix, threads)
    self.part_sessions = [make_session(m, threads) for m in parts]
    self.sessions_built = 1 + len(self.part_sessions)

  def prefix(self, batch: int, length: int, ids: np.ndarray, mask: np.ndarray,
             types: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    hidden, router = self.prefix_session.run(PREFIX_OUTPUTS, token_feeds(ids, mask, types))
    return hidden, router

  def part(self, width_index: int, batch: int, length: int, hidden: np.ndarray,
           mask: np.ndarray) -> np.ndarray:
    (probabilities,) = self.part_sessions[width_index].run(PART_OUTPUTS,
                                                           hidden_feeds(hidden, mask))
    return probabilities

  def io_shapes(self) -> dict[Any, tuple[list, list]]:
    """Each session's ([(input name, shape)], [(output name, shape)]), batch and length names:
    for the loader's checks. Keyed "prefix" and each width's index."""
    sessions = {"prefix": self.prefix_session, **dict(enumerate(self.part_sessions))}
    return {key: session_io(s) for key, s in sessions.items()}


class StageOrtRunner:
  """`dispatch.StageRunner` on ONNX Runtime: a session per stage of an early-exit model, the
  first reading token ids, each next one the hidden states of the one before."""

  def __init__(self, stages: Sequence[str | bytes], threads: int = 0):
    self.sessions = [make_session(m, threads) for m in stages]
    self.sessions_built = len(self.sessions)

  def stage(self, index: int, batch: int, length: int, inputs: tuple[Any, ...]
            ) -> tuple[np.ndarray, tuple[np.ndarray, ...]]:
    feeds = token_feeds(*inputs) if index == 0 else hidden_feeds(*inputs)
    hidden, probabilities = self.sessions[index].run(STAGE_OUTPUTS, feeds)
    return hidden, (probabilities,)

  def io_shapes(self) -> list[tuple[list, list]]:
    """Each stage's `session_io`, in order."""
    return [session_io(s) for s in self.sessions]
