"""Where serving time goes: each compiled program of a routed pass, and each width's latency.

    python -m benchmarks.profile --workdir=W --out=O [--precision=auto] [--budget=2x --rule=cascade]
        [--runtime=onnxruntime --precision=int8]
    python -m benchmarks.profile --mode=latency --out=O [--length=32] [--rounds=30]

`programs` (profile.{json,md,png}): a trained run's engine (SHARCS or early exit) routed to
--budget on its dev split: tokenising, each program call, padding, and how close each program's
arithmetic rate comes to the CPU's matmul rate at the same compute dtype. Every program call is
timed to completion (blocked on), so the program rows add up to the routed pass; the unblocked
pass (host work overlapping compute) is reported beside it. The matmul ceiling is one [rows, in]
x [in, out] product per kind of layer matmul at full width, timed alone; a program near it has
little left to gain from XLA flags or layouts, only from doing fewer FLOPs (less padding, a
smaller width).

`latency` (latency.{json,md,png}): the pretrained --backbone (latency does not depend on the
weights' values) at each width of --widths, on real dev inputs of --task padded to --length, at
batch 1 and 32, beside PyTorch eager on the same weights and the SHARCS engine with its router
forced to full width (its time over the whole model at width 1 is the router and grouping cost).
"""

from __future__ import annotations

import collections
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax import report
from sharcs_jax.checkpoint import quiet_orbax_logging
from sharcs_jax.data import batching, glue
from sharcs_jax.model.encoder import contract
from sharcs_jax.model.weights import load_pretrained, resolve_model_dir
from sharcs_jax.model.widths import width_label
from sharcs_jax.run import load_run
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.programs import ProgramKey, Programs, StageProgram
from sharcs_jax.errors import one_line_errors

flags.DEFINE_enum("mode", "programs", ["programs", "latency"], "programs: a trained run's routed "
                  "pass, program by program; latency: each width of a pretrained backbone against "
                  "PyTorch eager.")
common.define_flags("workdir", "out", "rounds", "limit", "runtime", "precision", "budget", "rule",
                    "signal", "threads", required=("out",), precision="auto", budget="2x",
                    rule="cascade")
flags.DEFINE_integer("gemm_rows", 1024, "programs: rows of the matmul-ceiling products "
                     "(batch x length).")
flags.DEFINE_string("backbone", "all-MiniLM-L6-v2", "latency: packaged model name or HF model "
                    "directory.")
flags.DEFINE_list("widths", ["0.25", "0.5", "1.0"], "latency: widths to time.")
flags.DEFINE_integer("router_layer", 2, "latency: K, layers 1..K at full width.")
flags.DEFINE_string("task", "qqp", "latency: GLUE task whose dev inputs are timed (and whose "
                    "class count the head has).")
flags.DEFINE_integer("length", 32, "latency: padded sequence length (QQP pairs average 31 "
                     "tokens).")
flags.DEFINE_string("data_dir", None, "latency: GLUE directory; default as configs resolve it "
                    "($SHARCS_DATA_DIR, else ../shared/data/glue, else the hub).")
FLAGS = flags.FLAGS

LATENCY_ROUNDS = 30  # latency's --rounds where none is given: one call is quick, noise is not
BATCHES = (1, 32)


class TimedRunner:
  """Wraps an engine's runner (a SHARCS one is called by prefix and part, an early exit's by
  stage): blocks on every program call and records (its stage, the program at the batch and
  length it ran, seconds)."""

  def __init__(self, runner, stage_programs: tuple[StageProgram, ...]):
    self.runner, self.stage_programs = runner, stage_programs
    self.calls: list[tuple[int, ProgramKey, float]] = []

  def _timed(self, stage: int, batch: int, length: int, call):
    program = self.stage_programs[stage]
    start = time.perf_counter()
    out = jax.block_until_ready(call())
    self.calls.append((stage, ProgramKey(program.kind, program.width, batch, length, program.span),
                       time.perf_counter() - start))
    return out

  def prefix(self, batch, length, ids, mask, types):
    return self._timed(0, batch, length,
                       lambda: self.runner.prefix(batch, length, ids, mask, types))

  def part(self, width_index, batch, length, hidden, mask):
    return self._timed(1 + width_index, batch, length,
                       lambda: self.runner.part(width_index, batch, length, hidden, mask))

  def stage(self, index, batch, length, inputs):
    return self._timed(index, batch, length,
                       lambda: self.runner.stage(index, batch, length, inputs))


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


def routed_engine() -> tuple[Engine, list]:
  """The run's engine under --rule at --budget ('': the run's own rule), and its dev texts."""
  run = load_run(FLAGS.workdir)
  engine = common.open_engine(run, runtime=FLAGS.runtime, precision=FLAGS.precision,
                              threads=FLAGS.threads)
  (rule,) = common.checked_rules(common.kind_of(engine), "rule")
  budget = common.checked_budgets([FLAGS.budget] if FLAGS.budget else [])
  routed = engine.with_rule(
      common.calibrated(engine, budget[0], common.calibration_data(run), rule, FLAGS.signal)
      if budget else common.own_rule(engine, rule, FLAGS.signal))
  (dev,) = run.splits("dev", limit=FLAGS.limit)
  return routed, dev.texts


def programs_main() -> None:
  if not FLAGS.workdir:
    raise app.UsageError("--mode=programs profiles a trained run: give --workdir")
  engine, texts = routed_engine()
  dev = engine.encode(texts)
  engine.run(dev)  # first calls: loading and warm-up stay out of the timings

  timed = TimedRunner(engine.runner, engine.stage_programs)
  candidates = {"tokenise": lambda: engine.encode(texts), "routed pass": lambda: engine.run(dev)}
  times = common.time_side_by_side(candidates, FLAGS.rounds, warmup=0)
  start = time.perf_counter()
  predictions = engine.run(dev, runner=timed)
  blocked = time.perf_counter() - start

  enc = engine.model.encoder
  ceiling = gemm_ceiling(enc.hidden_size, enc.intermediate_size, FLAGS.gemm_rows)
  lengths = np.asarray(engine.length_buckets)[dev.bucket_of]
  tokenise, routed = float(np.median(times["tokenise"])), float(np.median(times["routed pass"]))
  data = {"workdir": FLAGS.workdir, "task": engine.task.name, "examples": len(dev),
          "runtime": engine.runtime, "precision": engine.precision,
          "rule": engine.rule.to_json(), "cpu": common.cpu_info(),
          "rounds": FLAGS.rounds, "tokenise_seconds": tokenise, "routed_seconds": routed,
          "examples_per_second": len(dev) / (tokenise + routed),
          "blocked_pass_seconds": blocked, "program_seconds": sum(t for *_, t in timed.calls),
          "gflops_per_example": float(predictions.gflops.mean()),
          "mean_tokens": float(dev.lengths.mean()), "mean_padded_length": float(lengths.mean()),
          "length_buckets": list(engine.length_buckets),
          "share_per_length_bucket": (
              np.bincount(dev.bucket_of, minlength=len(engine.length_buckets)) / len(dev)).tolist(),
          "matmul_ceiling_gflops_per_second": ceiling,
          "programs": program_rows(engine, timed.calls, blocked)}
  write_programs(data)


def program_rows(engine: Engine, calls: list[tuple[int, ProgramKey, float]], blocked: float
                 ) -> list[dict]:
  """One row per program, batch bucket and length bucket, slowest first. XLA runs at its
  buckets; ONNX Runtime at any batch and length, so its calls are grouped under the smallest
  bucket holding them, each call's GFLOP counted at its own batch as the engine counts them (the
  float32 programs' per example at the call's length bucket, whatever the precision)."""
  batches, lengths = np.asarray(engine.batch_buckets), np.asarray(engine.length_buckets)
  seconds, counts, gflop = (collections.defaultdict(float), collections.Counter(),
                            collections.defaultdict(float))
  for stage, key, took in calls:
    column = int(np.searchsorted(lengths, key.length))
    group = ProgramKey(key.kind, key.width, int(batches[np.searchsorted(batches, key.batch)]),
                       int(lengths[column]), key.span)
    seconds[group] += took
    counts[group] += 1
    gflop[group] += engine.stage_flops[stage, column] * key.batch / 1e9
  return [{"kind": key.kind, "width": key.width,
           "layers": None if key.span is None else layers_label(key.span),
           "batch": key.batch, "length": key.length, "calls": counts[key], "seconds": took,
           "share": took / blocked, "gflop_per_call": gflop[key] / counts[key],
           "gflops_per_second": gflop[key] / took}
          for key, took in sorted(seconds.items(), key=lambda kv: -kv[1])]


def layers_label(span: tuple[int, int]) -> str:
  """A stage's layers, 1-based: "2", "1-3"."""
  first, last = span[0] + 1, span[1] + 1
  return str(first) if first == last else f"{first}-{last}"


def program_label(row: dict) -> str:
  """A program by name: "prefix", "adaptive", or an exit's "stage layers 1-2"."""
  return row["kind"] + ("" if row["layers"] is None else f" layers {row['layers']}")


def write_programs(data: dict) -> None:
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
  rows = [[program_label(p), "" if p["width"] is None else p["width"], p["batch"], p["length"],
           p["calls"], f"{p['seconds']:.3f}", f"{p['share']:.1%}", f"{p['gflop_per_call']:.3f}",
           f"{p['gflops_per_second']:.0f}"] for p in data["programs"]]
  common.write_outputs(FLAGS.out, "profile", data, "Where the engine's time goes",
                       ["program", "width", "batch", "length", "calls", "seconds", "share",
                        "GFLOP/call", "GFLOP/s"], rows, notes)
  plot_programs(data)


def plot_programs(data: dict) -> None:
  by_kind = collections.defaultdict(float)
  for p in data["programs"]:
    name = program_label(p)
    by_kind[name if p["width"] is None else f"{name} width {width_label(p['width'])}"] += \
        p["seconds"]
  by_kind["tokenise"] = data["tokenise_seconds"]
  other = data["blocked_pass_seconds"] - data["program_seconds"]
  by_kind["host (dispatch, gathers)"] = max(other, 0.0)
  fig, ax = report.pyplot().subplots(figsize=(6, 3))
  left = 0.0
  for name, seconds in by_kind.items():
    ax.barh([0], [seconds], left=left, label=f"{name}: {seconds:.2f} s")
    left += seconds
  ax.set_yticks([])
  ax.set_xlabel("seconds per pass over dev")
  ax.set_title(f"{data['task']} dev, {data['precision']}: where the time goes")
  ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.35), ncol=2)
  report.save_figure(fig, os.path.join(FLAGS.out, "profile.png"))


# --- latency ------------------------------------------------------------------------------------

def jax_name(width: float) -> str:
  """The row of the jitted whole model at `width`."""
  return f"jax w={width_label(width)}"


def torch_model(model_dir: str, params: dict):
  import torch
  import transformers

  hf = transformers.BertForSequenceClassification.from_pretrained(
      model_dir, num_labels=params["head"]["classifier"]["bias"].shape[0],
      attn_implementation="eager").eval()
  with torch.no_grad():  # the same (fresh) classifier as ours, so outputs can be compared
    hf.classifier.weight.copy_(torch.tensor(np.asarray(params["head"]["classifier"]["kernel"]).T))
    hf.classifier.bias.copy_(torch.tensor(np.asarray(params["head"]["classifier"]["bias"])))
  return hf


def latency_main() -> None:
  import torch

  threads = common.threads()
  torch.set_num_threads(threads)
  rounds = FLAGS.rounds if FLAGS["rounds"].present else LATENCY_ROUNDS
  widths = tuple(float(w) for w in FLAGS.widths)
  if 1.0 not in widths:
    raise app.UsageError(f"--widths={','.join(FLAGS.widths)}: include 1.0, the full width every "
                         "ratio is taken against")
  task = glue.get_task(FLAGS.task)
  model, params = load_pretrained(FLAGS.backbone, num_classes=task.num_classes, widths=widths,
                                  router_layer=FLAGS.router_layer, key=jax.random.key(0))
  model_dir = resolve_model_dir(FLAGS.backbone)
  length = FLAGS.length
  dev = batching.encode(common.dev_split(task.name, FLAGS.data_dir, max(BATCHES)),
                        batching.load_tokenizer(model_dir), (length,))
  programs = Programs(model, params, batch_buckets=BATCHES, length_buckets=(length,),
                      kinds=("forward",))
  forced = jax.tree_util.tree_map(lambda x: x, params)
  forced["router"]["out"]["bias"] = forced["router"]["out"]["bias"] + jnp.asarray(
      [-1e4] * (len(widths) - 1) + [1e4])
  engine = Engine(model, forced, length_buckets=(length,), batch_buckets=(32,))
  hf = torch_model(model_dir, params)
  variables = {"params": params}

  results, outputs = {}, {}
  for b in BATCHES:
    batch = batching.make_batch(dev, np.arange(b), 0, b)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    device_inputs = tuple(jnp.asarray(x) for x in inputs)
    torch_inputs = {k: torch.tensor(v).long() for k, v in
                    zip(("input_ids", "attention_mask", "token_type_ids"), inputs)}
    candidates = {}
    for w in widths:
      program = programs("forward", w, b, length)
      candidates[jax_name(w)] = (
          lambda p=program: p(variables, *device_inputs).block_until_ready())

    def run_torch():
      with torch.inference_mode():
        return hf(**torch_inputs).logits
    candidates["pytorch eager"] = run_torch
    if b == 32:
      candidates["engine, all to 1.0"] = lambda: engine.run(dev)  # dev holds max(BATCHES) rows
    print(f"batch {b}: timing {len(candidates)} rows x {rounds} rounds", flush=True)
    results[b] = common.time_side_by_side(candidates, rounds * (4 if b == 1 else 1))
    outputs[b] = (np.asarray(programs("forward", 1.0, b, length)(variables, *device_inputs)),
                  torch.softmax(run_torch(), -1).numpy())

  flops = {w: programs.flops[ProgramKey("forward", w, 1, length)] for w in widths}
  rows, data = [], {"length": length, "backbone": FLAGS.backbone,
                    "router_layer": FLAGS.router_layer, "threads": threads, "rows": []}
  for b in BATCHES:
    full = np.median(results[b][jax_name(1.0)])
    for name, t in results[b].items():
      f = next((flops[w] for w in widths if name == jax_name(w)), None)
      row = {"name": name, "batch": b, "median_ms": 1e3 * float(np.median(t)),
             "p90_ms": 1e3 * float(np.percentile(t, 90)),
             "examples_per_s": b / float(np.median(t)),
             "latency_ratio_vs_jax_full": float(np.median(t)) / full,
             "flops_ratio_vs_full": None if f is None else f / flops[1.0]}
      data["rows"].append(row)
      rows.append([name, b, row["median_ms"], row["p90_ms"], row["examples_per_s"],
                   row["latency_ratio_vs_jax_full"],
                   "" if f is None else row["flops_ratio_vs_full"]])
  data["max_abs_probability_difference_jax_vs_pytorch"] = {
      b: float(np.abs(outputs[b][0] - outputs[b][1]).max()) for b in BATCHES}
  overhead = (np.median(results[32]["engine, all to 1.0"])
              / np.median(results[32][jax_name(1.0)]) - 1)
  data["engine_router_grouping_overhead_batch32"] = float(overhead)
  data["jax_full_vs_pytorch_speedup"] = {
      b: float(np.median(results[b]["pytorch eager"]) / np.median(results[b][jax_name(1.0)]))
      for b in BATCHES}
  notes = (f"{FLAGS.backbone}, {task.name} dev inputs padded to {length} tokens, {threads} "
           f"threads, {rounds} interleaved rounds (x4 at batch 1). Full-width JAX is "
           + ", ".join(f"{s:.2f}x PyTorch eager's speed at batch {b}"
                       for b, s in data["jax_full_vs_pytorch_speedup"].items())
           + f"; engine router + grouping overhead at batch 32: {100 * overhead:.1f}%; outputs "
           f"agree with PyTorch to "
           f"{max(data['max_abs_probability_difference_jax_vs_pytorch'].values()):.1e}.")
  common.write_outputs(FLAGS.out, "latency", data, "Latency per width", [
      "program", "batch", "median ms", "p90 ms", "examples/s", "latency / JAX full",
      "FLOPs / full"], rows, notes)
  plot_latency(os.path.join(FLAGS.out, "latency.png"), data)
  common.print_report(FLAGS.out, "latency")


def plot_latency(path: str, data: dict) -> None:
  fig, axes = report.pyplot().subplots(1, 2, figsize=(10, 4))
  for ax, b in zip(axes, BATCHES):
    rows = [r for r in data["rows"] if r["batch"] == b]
    ax.bar([r["name"] for r in rows], [r["median_ms"] for r in rows], color=[
        "tab:blue" if r["name"].startswith("jax") else "tab:orange" if "torch" in r["name"]
        else "tab:green" for r in rows])
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"batch {b}, length {data['length']}")
    ax.tick_params(axis="x", rotation=30)
    for r in rows:
      if r["flops_ratio_vs_full"] is not None:
        ax.annotate(f"FLOPs {r['flops_ratio_vs_full']:.2f}\nlat {r['latency_ratio_vs_jax_full']:.2f}",
                    (r["name"], r["median_ms"]), ha="center", va="bottom", fontsize=7)
  report.save_figure(fig, path, dpi=110)


def main(argv):
  del argv
  quiet_orbax_logging()
  {"programs": programs_main, "latency": latency_main}[FLAGS.mode]()


if __name__ == "__main__":
  app.run(one_line_errors(main))
