"""Latency per width of the compiled programs at batch 1 and 32, against PyTorch eager, side by side.

    python -m benchmarks.latency --out=/tmp/bench [--length=32] [--rounds=30]

Everything runs on the pretrained all-MiniLM-L6-v2 weights (latency does not depend on the
values), on real dev inputs of a GLUE task (`--task`, QQP by default) padded to one length. Rows:
  - `jax w=...`: the whole model compiled at one width (no router), batch 1 and 32;
  - `pytorch eager`: Hugging Face `BertForSequenceClassification` on the same weights and inputs;
  - `engine, all to 1.0`: the SHARCS engine (prefix + router, grouping, full-width part) with the
    router forced to full width, so that its time over `jax w=1` is the router and grouping cost.
Writes latency.json, latency.md and latency.png into --out.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax import report
from sharcs_jax.data import batching, glue
from sharcs_jax.serve.engine import Engine
from sharcs_jax.model.weights import load_pretrained, resolve_model_dir
from sharcs_jax.serve.programs import ProgramKey, Programs
from sharcs_jax.model.widths import width_label

flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_string("backbone", "all-MiniLM-L6-v2", "Packaged model name or HF model directory.")
flags.DEFINE_list("widths", ["0.25", "0.5", "1.0"], "Widths to time.")
flags.DEFINE_integer("router_layer", 2, "K: layers 1..K at full width.")
flags.DEFINE_string("task", "qqp", "GLUE task whose dev inputs are timed (and whose class count "
                    "the head has).")
flags.DEFINE_integer("length", 32, "Padded sequence length (QQP pairs average 31 tokens).")
flags.DEFINE_integer("rounds", 30, "Interleaved timing rounds (each times every row once).")
flags.DEFINE_string("data_dir", None, "GLUE directory; default as configs resolve it "
                    "($SHARCS_DATA_DIR, else ../shared/data/glue, else the hub).")
FLAGS = flags.FLAGS

BATCHES = (1, 32)


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


def main(argv):
  del argv
  import torch

  torch.set_num_threads(os.cpu_count())
  widths = tuple(float(w) for w in FLAGS.widths)
  if 1.0 not in widths:
    raise app.UsageError(f"--widths={','.join(FLAGS.widths)}: include 1.0, the full width every "
                         "ratio is taken against")
  task = glue.get_task(FLAGS.task)
  model, params = load_pretrained(FLAGS.backbone, num_classes=task.num_classes, widths=widths,
                                  router_layer=FLAGS.router_layer, key=jax.random.key(0))
  model_dir = resolve_model_dir(FLAGS.backbone)
  tokenizer = batching.load_tokenizer(model_dir)
  length = FLAGS.length
  dev = batching.encode(common.dev_split(task.name, FLAGS.data_dir, max(BATCHES)), tokenizer,
                        (length,))
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
    print(f"batch {b}: timing {len(candidates)} rows x {FLAGS.rounds} rounds", flush=True)
    times = common.time_side_by_side(candidates, FLAGS.rounds * (4 if b == 1 else 1))
    results[b] = times
    outputs[b] = (np.asarray(programs("forward", 1.0, b, length)(variables, *device_inputs)),
                  torch.softmax(run_torch(), -1).numpy())

  flops = {w: programs.flops[ProgramKey("forward", w, 1, length)] for w in widths}
  rows, data = [], {"length": length, "backbone": FLAGS.backbone, "router_layer": FLAGS.router_layer,
                    "threads": os.cpu_count(), "rows": []}
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
  notes = (f"{FLAGS.backbone}, {task.name} dev inputs padded to {length} tokens, {os.cpu_count()} threads, "
           f"{FLAGS.rounds} interleaved rounds (x4 at batch 1). Full-width JAX is "
           + ", ".join(f"{s:.2f}x PyTorch eager's speed at batch {b}"
                       for b, s in data["jax_full_vs_pytorch_speedup"].items())
           + f"; engine router + grouping overhead at batch 32: {100 * overhead:.1f}%; outputs "
           f"agree with PyTorch to {max(data['max_abs_probability_difference_jax_vs_pytorch'].values()):.1e}.")
  common.write_outputs(FLAGS.out, "latency", data, "Latency per width", [
      "program", "batch", "median ms", "p90 ms", "examples/s", "latency / JAX full",
      "FLOPs / full"], rows, notes)
  plot(os.path.join(FLAGS.out, "latency.png"), data, widths)
  print(open(os.path.join(FLAGS.out, "latency.md")).read())


def plot(path: str, data: dict, widths: tuple[float, ...]) -> None:
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


if __name__ == "__main__":
  app.run(main)
