"""Width-sliced encoder, SHARCS classifier, early-exit baseline, weight import and importance reordering."""

from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel, SharcsOutput, default_router_hidden, init_params
from sharcs_jax.model.widths import WidthDims, width_dims, width_label, width_tag

__all__ = ["EarlyExitModel", "EncoderConfig", "SharcsModel", "SharcsOutput", "WidthDims", "default_router_hidden",
           "init_params", "width_dims", "width_label", "width_tag"]
