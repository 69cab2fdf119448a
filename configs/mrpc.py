"""SHARCS on GLUE MRPC with all-MiniLM-L6-v2.

    python -m sharcs_jax.main --config=configs/mrpc.py --workdir=/tmp/sharcs_mrpc
    python -m sharcs_jax.main --config=configs/mrpc.py:smoke --workdir=/tmp/sharcs_mrpc_smoke

Fields are overridable from the command line, e.g. --config.model.router_layer=1.
"""

from sharcs_jax.config import base_config


def get_config(arg=None):
  return base_config("mrpc", arg)
