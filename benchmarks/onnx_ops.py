"""Where an ONNX Runtime pass goes: our full width (prefix + width-1 part) against the HF export.

    python -m benchmarks.onnx_ops --workdir=W --out=O [--precision=int8 --batch=32 --length=32]

Both graphs run one batch of `--batch` random token ids at length `--length` (no padding), so the
comparison is of the graphs alone, not of padding or tokenising (`benchmarks.serving` times those
end to end). Reports the median pass of `--rounds` (x 10) interleaved passes, then ONNX Runtime's own
profile: kernel time per op type, averaged over `--profiled` passes. Writes onnx_ops.{json,md}.
"""

from __future__ import annotations

import collections
import json
import os
import tempfile
import time

import numpy as np
from absl import app, flags

from benchmarks import common, serving
from sharcs_jax.run import load_run
from sharcs_jax.serve import hf_export, ort_runner
from sharcs_jax.serve.onnx_programs import OnnxKey, OnnxPrograms

FLAGS = flags.FLAGS  # --workdir, --out and --rounds are benchmarks.serving's (its HF export)
flags.DEFINE_enum("precision", "int8", ["fp32", "int8"], "Both graphs' precision.")
flags.DEFINE_integer("batch", 32, "Rows per pass.")
flags.DEFINE_integer("length", 32, "Tokens per row, up to the run's longest length bucket.")
flags.DEFINE_integer("profiled", 10, "Profiled passes per graph.")


def op_times(path: str, feed: dict, passes: int, disabled: list[str]) -> dict[str, float]:
  """Microseconds per pass by op type, from ONNX Runtime's profiler."""
  import onnxruntime as ort

  options = ort_runner.session_options()
  options.enable_profiling = True
  options.profile_file_prefix = os.path.join(tempfile.mkdtemp(), "profile")
  session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"],
                                 disabled_optimizers=disabled)
  for _ in range(passes):
    session.run(None, feed)
  with open(session.end_profiling()) as f:
    events = json.load(f)
  totals: collections.Counter = collections.Counter()
  for event in events:
    if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
      totals[event["args"]["op_name"]] += event["dur"] / passes
  return dict(totals)


def main(argv):
  del argv
  run = load_run(FLAGS.workdir)
  if not 2 <= FLAGS.length <= run.length_buckets[-1]:
    raise SystemExit(f"FATAL --length={FLAGS.length} is not in 2..{run.length_buckets[-1]}, the "
                     "run's lengths")
  work = tempfile.mkdtemp(prefix="onnx_ops-")
  ours = OnnxPrograms(run.model, run.params, precision=FLAGS.precision,
                      cache_dir=os.path.join(run.workdir, "executables"))
  prefix = ours.paths[OnnxKey("prefix", None)]
  part = ours.paths[OnnxKey("adaptive", 1.0)]
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 20000, (FLAGS.batch, FLAGS.length)).astype(np.int64)
  ids[:, 0] = 101
  mask, types = np.ones_like(ids), np.zeros_like(ids)
  hf_dir = os.path.join(work, "hf")
  hf_export.export_hf(run.config, run.model, run.params, hf_dir)
  hf_path = os.path.join(work, "hf.onnx")
  serving.export_onnx(hf_dir, hf_path, (ids, mask, types))
  if FLAGS.precision == "int8":
    serving.quantize_int8(hf_path, os.path.join(work, "hf_int8.onnx"))
    hf_path = os.path.join(work, "hf_int8.onnx")

  prefix_feed = {"input_ids": ids.astype(np.int32), "attention_mask": mask.astype(np.int32),
                 "token_type_ids": types.astype(np.int32)}
  hf_feed = {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}
  s_prefix, s_part = ort_runner.make_session(prefix), ort_runner.make_session(part)
  s_hf = serving.onnx_runner(hf_path, 0)
  hidden, _ = s_prefix.run(None, prefix_feed)
  part_feed = {"hidden": hidden, "attention_mask": prefix_feed["attention_mask"]}
  passes = {"ours (prefix + full part)": lambda: s_part.run(None, {
      "hidden": s_prefix.run(None, prefix_feed)[0], "attention_mask": part_feed["attention_mask"]}),
            "HF export": lambda: s_hf(ids, mask, types)}
  seconds = collections.defaultdict(list)
  for run_once in passes.values():
    run_once()
  for _ in range(10 * FLAGS.rounds):
    for name, run_once in passes.items():
      start = time.perf_counter()
      run_once()
      seconds[name].append(time.perf_counter() - start)
  median_ms = {name: 1e3 * float(np.median(s)) for name, s in seconds.items()}
  ours_ops = collections.Counter(op_times(prefix, prefix_feed, FLAGS.profiled,
                                          ort_runner.DISABLED_OPTIMIZERS))
  ours_ops.update(op_times(part, part_feed, FLAGS.profiled, ort_runner.DISABLED_OPTIMIZERS))
  hf_ops = op_times(hf_path, hf_feed, FLAGS.profiled, [])
  ops = sorted(set(ours_ops) | set(hf_ops), key=lambda o: -(ours_ops.get(o, 0) + hf_ops.get(o, 0)))
  data = {"cpu": common.cpu_info(), "precision": FLAGS.precision, "batch": FLAGS.batch,
          "length": FLAGS.length, "median_ms": median_ms,
          "op_us": {"ours": dict(ours_ops), "hf": hf_ops}}
  rows = [[op, ours_ops.get(op, 0.0) / 1e3, hf_ops.get(op, 0.0) / 1e3] for op in ops]
  rows.append(["total (profiled kernels)", sum(ours_ops.values()) / 1e3,
               sum(hf_ops.values()) / 1e3])
  notes = (f"Full width at {FLAGS.precision}, one batch of {FLAGS.batch} x {FLAGS.length} "
           f"tokens, no padding. Median pass of {10 * FLAGS.rounds} interleaved: "
           + ", ".join(f"{name} {ms:.1f} ms" for name, ms in median_ms.items())
           + f". Kernel time per op type from ONNX Runtime's profiler ({FLAGS.profiled} passes). "
           f"CPU: {common.cpu_line(data['cpu'])}.")
  common.write_outputs(FLAGS.out, "onnx_ops", data, "ONNX Runtime time per op type",
                       ["op type", "ours ms", "HF export ms"], rows, notes)
  print(open(os.path.join(FLAGS.out, "onnx_ops.md")).read())


if __name__ == "__main__":
  app.run(main)
