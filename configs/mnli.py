"""SHARCS on GLUE MNLI with all-MiniLM-L6-v2.

    python -m sharcs_jax.main --config=configs/mnli.py --workdir=/tmp/sharcs_mnli
    python -m sharcs_jax.main --config=configs/mnli.py:smoke --workdir=/tmp/sharcs_mnli_smoke

Fields are overridable from the command line, e.g. --config.model.router_layer=1.
"""

from sharcs_jax.config import base_config


def get_config(arg=None):
  return base_config("mnli", arg)
