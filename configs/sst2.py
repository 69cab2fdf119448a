"""SHARCS on GLUE SST-2 with all-MiniLM-L6-v2: two widths, router after layer 2.

    python -m sharcs_jax.main --config=configs/sst2.py --workdir=/tmp/sharcs_sst2
    python -m sharcs_jax.main --config=configs/sst2.py:smoke --workdir=/tmp/sharcs_sst2_smoke

Fields are overridable from the command line, e.g. --config.model.router_layer=1.
"""

from sharcs_jax.config import base_config


def get_config(arg=None):
  c = base_config("sst2", arg)
  if arg != "smoke":
    c.model.widths = (0.25, 1.0)
    c.hardness.ranges = ((0.8, 1.0), (0.0, 0.8))
    c.hardness.window = 1  # 67k sentences: one warm-up epoch already sees plenty
    c.data.length_buckets = (16, 32, 64)  # SST-2 sentences: median 10, max 66 tokens
    c.train.epochs = 2
    # The router's argmax sent 99.8% of dev to width 0.25 (train labels: 80-89% easy), and the
    # full width lost 1.5 points: route to a budget calibrated on held-out sentences instead.
    c.routing.budget = "2x"
    c.routing.calibration_examples = 2000
  return c
