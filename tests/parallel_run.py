"""One tiny training run in a fresh process with N simulated CPU devices, optionally as one
process of a jax.distributed job; used by test_parallel.py (device counts are fixed at start-up).

    python tests/parallel_run.py --devices=4 --backbone=DIR --workdir=DIR --out=summary.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys


class Stopped(Exception):
  pass


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--devices", type=int, default=1)
  parser.add_argument("--backbone", required=True)
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--out", required=True)
  parser.add_argument("--stop_after_epochs", type=int, default=0)
  parser.add_argument("--coordinator", default="")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  args = parser.parse_args()
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}")
  sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

  import jax
  from sharcs_jax import parallel
  from sharcs_jax.train import loop as train
  if args.coordinator:
    parallel.initialize(args.coordinator, args.num_processes, args.process_id)
  assert jax.device_count() == args.devices * args.num_processes, jax.devices()
  from conftest import tiny_run_config

  if args.stop_after_epochs:
    original, saves = train.Checkpoints.save, []

    def save_then_stop(self, *save_args):
      original(self, *save_args)
      saves.append(1)
      if len(saves) == args.stop_after_epochs:
        raise Stopped
    train.Checkpoints.save = save_then_stop
  try:
    summary = train.train_and_evaluate(tiny_run_config(args.backbone), args.workdir)
  except Stopped:
    summary = {"stopped_after_epochs": args.stop_after_epochs}
  summary["devices"] = jax.device_count()
  with open(args.out, "w") as f:
    json.dump(summary, f)


if __name__ == "__main__":
  main()
