"""Reports as JSON plus a Markdown table, written atomically so a crash never leaves half a file."""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import os
import tempfile
from typing import Any, Iterator, Sequence

from sharcs_jax.model.widths import width_label


def package_version(name: str) -> str | None:
  """An installed package's version, None where it is not installed (reports and fingerprints)."""
  try:
    return importlib.metadata.version(name)
  except importlib.metadata.PackageNotFoundError:
    return None


def umask() -> int:
  """The process's umask: from /proc on Linux, else by setting it and straight back."""
  try:
    with open("/proc/self/status") as f:
      return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
  except (OSError, StopIteration, ValueError, IndexError):
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str) -> Iterator[str]:
  """A temporary path beside `path` that replaces it only once the body has finished.

  The file gets the mode an ordinary `open` would give it (0644 under the usual umask), not
  mkstemp's private 0600.
  """
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
  os.close(fd)
  try:
    yield tmp
    os.chmod(tmp, 0o666 & ~umask())
    os.replace(tmp, path)
  except BaseException:
    os.unlink(tmp)
    raise


def write_atomic(path: str, text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, "w") as f:
    f.write(text)


def write_json(path: str, data: Any) -> None:
  write_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  def cell(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
  return "\n".join(lines) + "\n"


def pyplot():
  """matplotlib's pyplot on the file-only Agg backend (no display on servers)."""
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def save_figure(fig: Any, path: str, dpi: int = 120) -> None:
  fig.tight_layout()
  with atomic_path(path) as tmp:
    fig.savefig(tmp, dpi=dpi, format="png")
  pyplot().close(fig)


def accuracy_flops_plot(path: str, summary: dict) -> None:
  """Accuracy against average GFLOPs per example: static widths as a line, SHARCS as a star."""
  static = summary["static"]
  fig, ax = pyplot().subplots(figsize=(5.5, 4))
  xs = [static[w]["gflops"] for w in static]
  ys = [100 * static[w]["accuracy"] for w in static]
  ax.plot(xs, ys, "o-", color="tab:blue", label="fixed width (same weights, no router)")
  for w, x, y in zip(static, xs, ys):
    ax.annotate(f"w={w}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=8)
  s = summary["sharcs"]
  budget = f", budget {s['routing']['budget']}" if "routing" in s else ""
  ax.plot([s["gflops"]], [100 * s["accuracy"]], "*", color="tab:red", markersize=14,
          label=f"SHARCS{budget} ({s['flops_reduction']:.2f}x fewer FLOPs)")
  if "sharcs_argmax" in summary:
    a = summary["sharcs_argmax"]
    ax.plot([a["gflops"]], [100 * a["accuracy"]], "P", color="tab:orange", markersize=10,
            label=f"SHARCS, router argmax ({a['flops_reduction']:.2f}x)")
  ax.set_xlabel("average GFLOPs per example (XLA cost analysis)")
  ax.set_ylabel("dev accuracy (%)")
  ax.set_title(f"{summary['task']} / {summary['model']}, K={summary['router_layer']}")
  ax.grid(alpha=0.3)
  ax.legend(loc="lower right", fontsize=8)
  save_figure(fig, path)


def _history_table(summary: dict) -> str:
  """Dev results after every epoch: how the trade-off moved while the labels settled."""
  if not summary.get("history"):
    return ""
  widths = summary["widths"]
  header = (["epoch", "full width"] + [f"w={width_label(w)}" for w in widths[:-1]]
            + ["SHARCS", "reduction"] + [f"share {width_label(w)}" for w in widths])
  argmax = any("sharcs_argmax" in h for h in summary["history"])
  if argmax:
    header += ["argmax SHARCS", "argmax reduction"]
  rows = [[h["epoch"], 100 * h["full_width"]["accuracy"]]
          + [100 * h["static"][width_label(w)]["accuracy"] for w in widths[:-1]]
          + [100 * h["sharcs"]["accuracy"], h["sharcs"]["flops_reduction"]]
          + [f"{100 * x:.1f}%" for x in h["sharcs"]["share_per_width"]]
          + ([100 * h["sharcs_argmax"]["accuracy"], h["sharcs_argmax"]["flops_reduction"]]
             if argmax else []) for h in summary["history"]]
  return (f"\nDev accuracy (%) after each epoch (kept: epoch {summary['best_epoch']}, by "
          f"{summary.get('selection', 'accuracy')}):\n\n" + markdown_table(header, rows))


def _routing_note(summary: dict) -> str:
  routing = summary.get("routing", {})
  if routing.get("budget", "argmax") == "argmax":
    return " Routing: the router's argmax."
  r = summary["sharcs"]["routing"]
  rule = (f"a cascade from the narrowest width, escalating while {r['signal']} < "
          f"{r['threshold']:.4f}" if r.get("rule") == "cascade"
          else f"argmax(router logits - {r['cost_weight']:.3f} x relative FLOPs)")
  return (f" Routing: {rule}, calibrated "
          f"for {r['budget']} on {routing['calibration_examples']} {routing['calibrate_on']}"
          f"{' held-out' if routing['calibrate_on'] == 'train' else ''} examples "
          f"({r['calibration_reduction']:.2f}x there).")


def _recipe_note(summary: dict) -> str:
  recipe = summary.get("recipe")  # absent from reports written before the sandwich existed
  if not recipe or (not recipe["sandwich"] and recipe["distill"] == "none"):
    return ""
  steps = "every width in every step (sandwich)" if recipe["sandwich"] else "one width a step"
  teacher = ("" if recipe["distill"] == "none" else
             f", {recipe['distill']} distillation (weight {recipe['distill_weight']:g}, "
             f"T {recipe['distill_temperature']:g})")
  return f"trained {steps}{teacher}; "


def write_run_report(workdir: str, summary: dict) -> None:
  """report.json, report.md and report.png for one training run."""
  write_json(os.path.join(workdir, "report.json"), summary)
  has_f1 = "f1" in summary["full_width"]
  header = ["model", "accuracy"] + (["F1"] if has_f1 else []) + ["GFLOPs/example", "reduction",
                                                                  "share per width"]
  full = summary["full_width"]["gflops"]

  def row(name, r, share=""):
    return ([name, 100 * r["accuracy"]] + ([100 * r["f1"]] if has_f1 else [])
            + [r["gflops"], full / r["gflops"], share])

  rows = [row("full width", summary["full_width"])]
  rows += [row(f"static w={label}", summary["static"][label])
           for label in map(width_label, summary["widths"][:-1])]
  s = summary["sharcs"]
  shares = ", ".join(f"{width_label(w)}: {100 * x:.1f}%"
                     for w, x in zip(summary["widths"], s["share_per_width"]))
  name = f"SHARCS, budget {s['routing']['budget']}" if "routing" in s else "SHARCS"
  rows.append(row(name, s, shares))
  if "sharcs_argmax" in summary:
    a = summary["sharcs_argmax"]
    rows.append(row("SHARCS, router argmax (paper)", a, ", ".join(
        f"{width_label(w)}: {100 * x:.1f}%" for w, x in zip(summary["widths"],
                                                            a["share_per_width"]))))
  text = (f"# SHARCS on {summary['task']} ({summary['model']})\n\n"
          f"Router after layer {summary['router_layer']}, widths {summary['widths']}, ranges "
          f"{summary['ranges']}, window {summary['window']}; best epoch {summary['best_epoch']} "
          f"of {summary['epochs']}; {_recipe_note(summary)}{summary['dev_examples']} dev "
          "examples; trained in "
          f"{summary['train_seconds'] / 60:.1f} min.{_routing_note(summary)}\n\n"
          + markdown_table(header, rows)
          + _history_table(summary))
  write_atomic(os.path.join(workdir, "report.md"), text)
  accuracy_flops_plot(os.path.join(workdir, "report.png"), summary)
