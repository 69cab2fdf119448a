"""What the backbone costs at each width: the job `main` runs until training lands.

Loads the pretrained backbone into the SHARCS parameter tree (so a broken checkpoint fails here),
then reads XLA cost-analysis FLOPs per example for every width and length bucket and checks them
against the analytic count. Writes `model_summary.json` and `model_summary.md` into the workdir.
"""

from __future__ import annotations

import os
import time

import jax
import ml_collections
from absl import logging

from sharcs_jax import config as config_lib
from sharcs_jax import report
from sharcs_jax.model.flops import analytic_flops, param_shapes
from sharcs_jax.model.weights import load_pretrained
from sharcs_jax.serve.programs import Programs


def run(config: ml_collections.ConfigDict, workdir: str) -> dict:
  start = time.time()
  encoder = config_lib.validate(config)
  m = config.model
  model, _ = load_pretrained(m.backbone, num_classes=2, widths=tuple(m.widths),
                             router_layer=m.router_layer, router_hidden=m.router_hidden,
                             layernorm_init=m.layernorm_init, key=jax.random.key(config.seed))
  logging.info("Loaded %s (%s, %d layers, hidden %d) in %.1fs", m.backbone, encoder.layout,
               encoder.num_layers, encoder.hidden_size, time.time() - start)
  table = Programs(model, param_shapes(model), batch_buckets=(1,),
                   length_buckets=tuple(config.data.length_buckets)).flops_table()
  rows = []
  for j, seq_len in enumerate(config.data.length_buckets):
    for i, w in enumerate(m.widths):
      xla, full = table[i, j], table[-1, j]
      counted = analytic_flops(model, w, 1, seq_len)["total"]
      rows.append({"seq_len": seq_len, "width": w, "xla_gflops": xla / 1e9,
                   "analytic_gflops": counted / 1e9, "reduction": full / xla})
      logging.info("length %d width %.2f: %.3f GFLOPs (analytic %.3f)", seq_len, w, xla / 1e9,
                   counted / 1e9)
  summary = {"task": config.task, "model": m.backbone, "layout": encoder.layout,
             "router_layer": m.router_layer, "widths": list(m.widths), "flops_per_example": rows,
             "seconds": time.time() - start}
  report.write_json(os.path.join(workdir, "model_summary.json"), summary)
  table = report.markdown_table(
      ["length", "width", "XLA GFLOPs/example", "analytic GFLOPs", "reduction vs full"],
      [[r["seq_len"], r["width"], r["xla_gflops"], r["analytic_gflops"], r["reduction"]]
       for r in rows])
  report.write_atomic(os.path.join(workdir, "model_summary.md"),
                      f"# {m.backbone}: FLOPs per example, router after layer {m.router_layer}\n\n"
                      + table)
  return summary
