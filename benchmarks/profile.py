"""Where the engine's serving time goes: tokenising, each compiled program, padding, and how close
each program's arithmetic rate comes to the CPU's matmul rate at the same compute dtype.

    python -m benchmarks.profile --workdir=W --out=O [--precision=auto] [--budget=2x --rule=cascade]
        [--runtime=onnxruntime --precision=int8]

Every program call is timed to completion (blocked on), so the program rows add up to the routed
pass; the unblocked pass (host work overlapping compute) is reported beside it. The matmul
ceiling is one [rows, in] x [in, out] product per kind of layer matmul at full width, timed
alone; a program near it has little left to gain from XLA flags or layouts, only from doing fewer
FLOPs (less padding, a smaller width). Writes profile.{json,md,png} into --out.
"""

from __future__ import annotations

import collections
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax import report
from sharcs_jax.model.encoder import contract
from sharcs_jax.model.widths import width_label
from sharcs_jax.run import load_run
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.programs import ProgramKey
from sharcs_jax.serve.precision import PRECISIONS, RUNTIMES

flags.DEFINE_string("workdir", None, "A trained run (its checkpoints).", required=True)
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_enum("runtime", "xla", list(RUNTIMES), "What runs the engine's programs.")
flags.DEFINE_enum("precision", "auto", sorted(set(sum(PRECISIONS.values(), ()))),
                  "The engine's compute precision (bf16 on xla, int8 on onnxruntime).")
flags.DEFINE_string("budget", "2x", "FLOPs budget the engine is routed to ('' = the run's rule).")
flags.DEFINE_string("rule", "cascade", "Rule that meets --budget (router, cascade, ...).")
flags.DEFINE_integer("rounds", 3, "Passes over dev per measurement (median).")
flags.DEFINE_integer("limit", 0, "> 0: only the first N dev examples (for tests).")
flags.DEFINE_integer("gemm_rows", 1024, "Rows of the matmul-ceiling products (batch x length).")
FLAGS = flags.FLAGS


class TimedRunner:
  """Wraps a `dispatch.Runner`: blocks on every program and records (its `ProgramKey` at the
  batch and length it ran, seconds)."""

  def __init__(self, runner, widths):
    self.runner, self.widths = runner, widths
    self.calls: list[tuple[ProgramKey, float]] = []

  def _timed(self, key: ProgramKey, call):
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    self.calls.append((key, time.perf_counter() - start))
    return out

  def prefix(self, batch, length, ids, mask, types):
    return self._timed(ProgramKey("prefix", None, batch, length),
                       lambda: self.runner.prefix(batch, length, ids, mask, types))

  def part(self, width_index, batch, length, hidden, mask):
    key = ProgramKey("adaptive", self.widths[width_index], batch, length)
    return self._timed(key, lambda: self.runner.part(width_index, batch, length, hidden, mask))


MATMUL_DTYPES = ("float32", "bfloat16", "int8")


def _product(compute_dtype: str):
  """x @ w as a layer would run it at `compute_dtype`: float32 and bfloat16 as the model contracts
  (float32 results); int8 inputs with int32 accumulation, what int8 weights would need."""
  if compute_dtype == "int8":
    return lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.int32)
  return lambda a, b: contract("mk,kn->mn", a, b, compute_dtype)


def gemm_ceiling(d: int, f: int, rows: int, rounds: int = 20) -> dict[str, dict[str, float]]:
  """GFLOP/s (GOP/s for int8) of each full-width layer matmul shape at every `MATMUL_DTYPES`."""
  rng = np.random.default_rng(0)
  out = {}
  for name, (k, n) in {"qkv": (d, 3 * d), "attn_out": (d, d), "ffn_in": (d, f),
                       "ffn_out": (f, d)}.items():
    rates = {}
    for dtype in MATMUL_DTYPES:
      array_dtype = jnp.int8 if dtype == "int8" else jnp.float32
      x = jnp.asarray(rng.integers(-100, 100, (rows, k)), array_dtype)
      w = jnp.asarray(rng.integers(-100, 100, (k, n)), array_dtype)
      product = jax.jit(_product(dtype))
      jax.block_until_ready(product(x, w))
      seconds = []
      for _ in range(rounds):
        start = time.perf_counter()
        jax.block_until_ready(product(x, w))
        seconds.append(time.perf_counter() - start)
      rates[dtype] = 2 * rows * k * n / np.median(seconds) / 1e9
    out[f"{name} [{rows},{k}]x[{k},{n}]"] = rates
  return out


def main(argv):
  del argv
  run = load_run(FLAGS.workdir)
  engine = Engine.from_run(run, precision=FLAGS.precision, budget=FLAGS.budget,
                           rule=FLAGS.rule if FLAGS.budget else "router", runtime=FLAGS.runtime)
  (dev_split,) = run.splits("dev", limit=FLAGS.limit)
  texts = dev_split.texts
  dev = engine.encode(texts)
  engine.run(dev)  # first calls: loading and warm-up stay out of the timings

  timed = TimedRunner(engine.runner, engine.widths)
  candidates = {"tokenise": lambda: engine.encode(texts), "routed pass": lambda: engine.run(dev)}
  times = common.time_side_by_side(candidates, FLAGS.rounds, warmup=0)
  start = time.perf_counter()
  predictions = engine.run(dev, runner=timed)
  blocked = time.perf_counter() - start

  enc = engine.model.encoder
  ceiling = gemm_ceiling(enc.hidden_size, enc.intermediate_size, FLAGS.gemm_rows)
  programs = program_rows(engine, timed.calls, blocked)
  lengths = np.asarray(engine.length_buckets)[dev.bucket_of]
  tokenise, routed = float(np.median(times["tokenise"])), float(np.median(times["routed pass"]))
  data = {"workdir": FLAGS.workdir, "task": run.task.name, "examples": len(dev),
          "runtime": engine.runtime, "precision": engine.precision,
          "rule": engine.rule.to_json(), "cpu": common.cpu_info(),
          "rounds": FLAGS.rounds, "tokenise_seconds": tokenise, "routed_seconds": routed,
          "examples_per_second": len(dev) / (tokenise + routed),
          "blocked_pass_seconds": blocked, "program_seconds": sum(t for _, t in timed.calls),
          "gflops_per_example": float(predictions.gflops.mean()),
          "mean_tokens": float(dev.lengths.mean()), "mean_padded_length": float(lengths.mean()),
          "length_buckets": list(engine.length_buckets),
          "share_per_length_bucket": (
              np.bincount(dev.bucket_of, minlength=len(engine.length_buckets)) / len(dev)).tolist(),
          "matmul_ceiling_gflops_per_second": ceiling, "programs": programs}
  write(data)


def program_rows(engine: Engine, calls: list[tuple[ProgramKey, float]], blocked: float
                 ) -> list[dict]:
  """One row per program, batch bucket and length bucket, slowest first. XLA runs at its
  buckets; ONNX Runtime at any batch and length, so its calls are grouped under the smallest
  bucket holding them, each call's GFLOP counted at its own batch."""
  batches, lengths = np.asarray(engine.batch_buckets), np.asarray(engine.length_buckets)
  seconds, counts, gflop = (collections.defaultdict(float), collections.Counter(),
                            collections.defaultdict(float))
  for key, took in calls:
    length = int(lengths[np.searchsorted(lengths, key.length)])
    group = ProgramKey(key.kind, key.width, int(batches[np.searchsorted(batches, key.batch)]),
                       length)
    seconds[group] += took
    counts[group] += 1
    gflop[group] += program_gflop(engine, ProgramKey(key.kind, key.width, key.batch, length))
  return [{"kind": key.kind, "width": key.width, "batch": key.batch, "length": key.length,
           "calls": counts[key], "seconds": took, "share": took / blocked,
           "gflop_per_call": gflop[key] / counts[key], "gflops_per_second": gflop[key] / took}
          for key, took in sorted(seconds.items(), key=lambda kv: -kv[1])]


def program_gflop(engine: Engine, key: ProgramKey) -> float:
  """One call's GFLOP as the engine counts them (the float32 programs' per example at the
  call's length bucket, whatever the precision, times the batch)."""
  widths = engine.model.widths
  column = engine.length_buckets.index(key.length)
  if key.kind == "prefix":
    return engine.prefix_flops[column] * key.batch / 1e9
  return (engine.flops[widths.index(key.width), column] - engine.prefix_flops[column]) \
      * key.batch / 1e9


def write(data: dict) -> None:
  cpu = data["cpu"]
  notes = (
      f"{data['examples']} {data['task']} dev examples, {data['runtime']} "
      f"{data['precision']}, rule "
      f"`{data['rule']}`; CPU: {common.cpu_line(cpu)}. Median of {data['rounds']} "
      f"passes: tokenising "
      f"{data['tokenise_seconds']:.2f} s, the routed pass {data['routed_seconds']:.2f} s "
      f"({data['examples_per_second']:.0f} examples/s text to labels, "
      f"{data['gflops_per_example']:.4f} GFLOPs/example). One pass with every program blocked "
      f"on: {data['blocked_pass_seconds']:.2f} s, of which programs "
      f"{data['program_seconds']:.2f} s. A row's batch and length are the buckets that hold "
      f"its calls (ONNX Runtime runs each batch at its own size and longest row).\n\n"
      f"Padding: {data['mean_tokens']:.1f} real tokens per example, "
      f"{data['mean_padded_length']:.1f} after padding to the buckets "
      f"{tuple(data['length_buckets'])} (shares "
      f"{', '.join(f'{s:.1%}' for s in data['share_per_length_bucket'])}).\n\nMatmul ceiling, each "
      "layer matmul shape alone, GFLOP/s (int8: GOP/s, int32 accumulation): " + "; ".join(
          f"{shape} " + " / ".join(f"{dtype} {rate:.0f}" for dtype, rate in rates.items())
          for shape, rates in data["matmul_ceiling_gflops_per_second"].items()) +
      "\n\nPrograms (GFLOP counted as the engine counts them: float32 XLA cost analysis):")
  rows = [[p["kind"], "" if p["width"] is None else p["width"], p["batch"], p["length"],
           p["calls"], f"{p['seconds']:.3f}", f"{p['share']:.1%}", f"{p['gflop_per_call']:.3f}",
           f"{p['gflops_per_second']:.0f}"] for p in data["programs"]]
  common.write_outputs(FLAGS.out, "profile", data, "Where the engine's time goes",
                       ["program", "width", "batch", "length", "calls", "seconds", "share",
                        "GFLOP/call", "GFLOP/s"], rows, notes)
  plot(data)


def plot(data: dict) -> None:
  plt = report.pyplot()
  by_kind = collections.defaultdict(float)
  for p in data["programs"]:
    by_kind[p["kind"] if p["width"] is None else f"width {width_label(p['width'])}"] += p["seconds"]
  by_kind["tokenise"] = data["tokenise_seconds"]
  other = data["blocked_pass_seconds"] - data["program_seconds"]
  by_kind["host (dispatch, gathers)"] = max(other, 0.0)
  fig, ax = plt.subplots(figsize=(6, 3))
  left = 0.0
  for name, seconds in by_kind.items():
    ax.barh([0], [seconds], left=left, label=f"{name}: {seconds:.2f} s")
    left += seconds
  ax.set_yticks([])
  ax.set_xlabel("seconds per pass over dev")
  ax.set_title(f"{data['task']} dev, {data['precision']}: where the time goes")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
  report.save_figure(fig, f"{FLAGS.out}/profile.png")


if __name__ == "__main__":
  app.run(main)
