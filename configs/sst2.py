"""SHARCS on GLUE SST2 with all-MiniLM-L6-v2.

    python -m sharcs_jax.main --config=configs/sst2.py --workdir=/tmp/sharcs_sst2
    python -m sharcs_jax.main --config=configs/sst2.py:smoke --workdir=/tmp/sharcs_sst2_smoke

Fields are overridable from the command line, e.g. --config.model.router_layer=1.
"""

from sharcs_jax.config import base_config


def get_config(arg=None):
  return base_config("sst2", arg)
