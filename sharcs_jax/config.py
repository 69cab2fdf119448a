"""Shared defaults of every run and the checks that fail a bad config before any work starts.

Config files in `configs/` start from `base_config(task, arg)` and change what differs; a field is
read in one place in the code, and its default lives here or in the task file, not in signatures.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from typing import Any

import ml_collections
from absl import app

from sharcs_jax.errors import ConfigError
from sharcs_jax.data.glue import get_task, resolve_data_dir
from sharcs_jax.train.hardness import SIGNALS, check_ranges
from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.early_exit import EXIT_POOLINGS
from sharcs_jax.model.sharcs import check_model_settings
from sharcs_jax.model.weights import LAYERNORM_INITS, resolve_model_dir
from sharcs_jax.serve.routing import CONFIDENCE_SIGNALS, RULES, parse_budget

CONFIG_ARGS = ("smoke",)
# Every numeric field and its valid range, checked before any work ("[a, b)": a <= x < b).
NUMERIC_FIELDS = (
    ("seed", int, "[0, inf)"),
    ("model.router_hidden", int, "[0, inf)"),
    ("model.reorder_batches", int, "[1, inf)"),
    ("hardness.window", int, "[1, inf)"),
    ("data.train_limit", int, "[0, inf)"),
    ("data.dev_limit", int, "[0, inf)"),
    ("train.epochs", int, "[1, inf)"),
    ("train.batch_size", int, "[1, inf)"),
    ("train.learning_rate", float, "(0, inf)"),
    ("train.warmup_fraction", float, "[0, 1)"),
    ("train.weight_decay", float, "[0, inf)"),
    ("train.router_loss_weight", float, "[0, inf)"),
    ("train.static_width", float, "[0, 1]"),
    ("train.distill_weight", float, "[0, 1]"),
    ("train.distill_temperature", float, "(0, inf)"),
    ("eval.batch_size", int, "[1, inf)"),
    ("routing.calibration_examples", int, "[0, inf)"),
    ("checkpoint.max_to_keep", int, "[1, inf)"),
    ("checkpoint.max_drop", float, "[0, 1]"),
)
CALIBRATION_SPLITS = ("train", "dev")
CALIBRATION_DRAWS = ("rows", "sentences")
SELECTION_RULES = ("accuracy", "reduction")


METHODS = ("sharcs", "early_exit")


def base_config(task: str, arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.task = task
  c.data_dir = ""  # GLUE TSV directory; "" -> $SHARCS_DATA_DIR, else the Hugging Face hub
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  # What the main job trains: "sharcs" (adaptive width), or "early_exit" (an exit after every
  # layer, PABEE's loss; served by DeeBERT's rule calibrated to the routing budget).
  c.model.method = "sharcs"
  c.model.backbone = "all-MiniLM-L6-v2"  # a packaged model name or a local HF model directory
  c.model.widths = (0.25, 0.5, 1.0)  # increasing, ending at 1.0
  # K: layers 1..K run at full width. On a 6-layer backbone K=2 is the paper's K/L of 0.25-0.33.
  c.model.router_layer = 2
  c.model.router_hidden = 0  # 0 -> the reference's 1024, scaled with the hidden size
  c.model.layernorm_init = "pretrained"  # per-width LayerNorms: "pretrained" slice or "fresh"
  c.model.reorder = True  # DynaBERT importance reordering before training
  c.model.reorder_batches = 16  # labelled train batches for the importance pass
  # The early-exit model only: what each exit reads, "cls" (DeeBERT, PABEE) or "mean".
  c.model.exit_pooling = "cls"
  # The early-exit model only: with a narrow width, e.g. (0.25, 1.0), it adapts depth and width
  # together (layers K+1..L may also run at the narrow width, K = router_layer).
  c.model.exit_widths = (1.0,)
  # ... and with a narrow width, layers (1-based, in K+1..L-1) after which the narrow layers
  # also answer (depth exits inside the narrow part), e.g. (4,); the last layer always does.
  c.model.narrow_exits = ()

  c.hardness = ml_collections.ConfigDict()
  c.hardness.window = 2  # W: warm-up epochs, and confidences per label decision
  # One [lo, hi) confidence range per width, in the order of model.widths.
  c.hardness.ranges = ((0.7, 1.0), (0.4, 0.9), (0.0, 0.5))
  # What the ranges compare: "confidence" p(true class) (the paper) or "entropy" 1 - H(p)/log(C).
  c.hardness.signal = "confidence"

  c.data = ml_collections.ConfigDict()
  c.data.length_buckets = (32, 64, 128)  # static padded lengths; the last is the max length
  c.data.train_limit = 0  # > 0: keep the first N training examples
  c.data.dev_limit = 0
  c.data.skip_malformed = False  # False: a malformed row is an error naming file and line

  c.train = ml_collections.ConfigDict()
  c.train.epochs = 5
  c.train.batch_size = 32
  c.train.learning_rate = 5e-5
  c.train.warmup_fraction = 0.06
  c.train.weight_decay = 0.01
  c.train.router_loss_weight = 1.0
  # > 0: the static-width baseline: every batch at this width (one of model.widths), no router.
  c.train.static_width = 0.0
  # False: the paper, each batch at one width drawn from its examples' hardness labels. True: the
  # sandwich rule, every batch at every width (the prefix shared), from epoch 0; the router's
  # labels still come from the hardness rule, on the narrowest width's confidence.
  c.train.sandwich = False
  # Teacher of the narrow widths: "none" (the paper), "inplace" (the full width's logits of the
  # same batch; needs sandwich) or "frozen" (the full width's logits of the warm-up epochs).
  c.train.distill = "none"
  c.train.distill_weight = 0.5  # narrow-width loss: (1 - a) CE + a KD
  c.train.distill_temperature = 1.0
  c.train.progress_bar = True

  c.eval = ml_collections.ConfigDict()
  c.eval.batch_size = 64

  c.routing = ml_collections.ConfigDict()
  # "" routes by the router's argmax (the paper). A budget ("2x" FLOPs reduction, or "0.4gflops"
  # per example) routes by argmax(logits - lam * cost), lam calibrated on `calibrate_on` each epoch.
  c.routing.budget = ""
  c.routing.calibrate_on = "train"  # "train": examples held back from training; "dev": dev itself
  c.routing.calibration_examples = 0  # held back from train when calibrate_on = "train"
  # "rows": that many training rows at random; "sentences": that many whole sentences of a
  # one-text task's training file, none of whose phrases are trained on (SST-2 trains on phrases
  # and serves sentences: `glue.hold_out_sentences`).
  c.routing.calibration_draw = "rows"
  # How a budget is met: "router" (argmax under the cost weight), "cascade" (every input starts
  # at the narrowest width and escalates while its confidence, `signal`, is below a calibrated
  # threshold), or "router+cascade" (the router, calibrated to `start_budget`, picks the start).
  c.routing.rule = "router"
  c.routing.signal = "max_prob"  # cascade confidence: "max_prob", "margin" or "entropy"
  c.routing.start_budget = ""  # router+cascade: the router's own, more aggressive, budget

  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.max_to_keep = 1
  # Which epoch (>= W) is kept: "accuracy" (the paper: best SHARCS dev accuracy) or "reduction"
  # (most FLOPs saved while SHARCS stays within max_drop of the best full-width accuracy so far).
  c.checkpoint.select = "accuracy"
  c.checkpoint.max_drop = 0.01

  if arg == "smoke":  # the whole pipeline on a few hundred examples, for tests
    c.data.length_buckets = (32, 64)
    c.data.train_limit = 256
    c.data.dev_limit = 128
    c.model.reorder_batches = 2
    c.hardness.window = 1
    c.train.epochs = 2
    c.train.learning_rate = 1e-4
    c.eval.batch_size = 32
  elif arg:
    raise ValueError(f"unknown config argument {arg!r}; known: {', '.join(CONFIG_ARGS)}")
  return c


def load_config(spec: str) -> ml_collections.ConfigDict:
  """'configs/qqp.py:smoke' -> that file's get_config('smoke'), as the --config flag does."""
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location("sharcs_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing for programs with a --config file flag (`app.run(main, flags_parser=)`).

  ml_collections answers `--config.train.epoch=3` (no such field) with a KeyError traceback; this
  turns it into a one-line usage error that names the flag, before anything runs.
  """
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    while isinstance(e.args[0] if e.args else None, BaseException):
      e = e.args[0]  # ml_collections wraps the KeyError in an AttributeError
    missing, _, hint = str(e.args[0] if e.args else e).partition("\n")
    missing = missing.strip("'\"")
    flag = next((a.split("=")[0] for a in argv[1:] if a.startswith("--config.")
                 and missing in a.split("=")[0].split(".")[1:]), "--config.*")
    sys.exit(f"FATAL Flags parsing error: {flag}: the config has no field {missing!r}. {hint}"
             .rstrip())


def in_interval(value: float, interval: str) -> bool:
  """value in "[0, 1)"-style interval notation ("inf" for no bound); NaN is in none."""
  low, high = (float(x) for x in interval[1:-1].split(","))
  above = value >= low if interval[0] == "[" else value > low
  below = value <= high if interval[-1] == "]" else value < high
  return above and below


def check_numbers(config: ml_collections.ConfigDict) -> None:
  """Every field of NUMERIC_FIELDS has its type and lies in its range."""
  for field, kind, interval in NUMERIC_FIELDS:
    value = config
    for key in field.split("."):
      value = value[key]
    numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not numeric or (kind is int and not isinstance(value, int)) or not in_interval(
        value, interval):
      kind_name = "an integer" if kind is int else "a number"
      raise ValueError(f"config.{field}={value!r} must be {kind_name} in {interval}")
  if not config.train.static_width and config.train.epochs <= config.hardness.window:
    raise ValueError(f"config.train.epochs={config.train.epochs} must exceed "
                     f"config.hardness.window={config.hardness.window}: epochs before the window "
                     "are warm-up and never kept, so no epoch could be served")


def backbone_config(config: ml_collections.ConfigDict) -> EncoderConfig:
  return EncoderConfig.from_json_file(
      os.path.join(resolve_model_dir(config.model.backbone), "config.json"))


def check_routing(routing: ml_collections.ConfigDict) -> None:
  if routing.budget:
    try:
      budget = parse_budget(routing.budget)
    except ValueError as e:
      raise ValueError(f"config.routing.budget: {e}") from None
    if budget.reduction is not None and budget.reduction < 1:
      raise ValueError(f"config.routing.budget={routing.budget!r}: a reduction below 1x would "
                       "cost more than the full width; the reachable range starts at 1x")
  if routing.rule not in RULES:
    raise ValueError(f"config.routing.rule={routing.rule!r} is not one of {RULES}")
  if routing.rule != "router" and not routing.budget:
    raise ValueError(f"config.routing.rule={routing.rule!r} calibrates a threshold to a budget: "
                     "set config.routing.budget")
  if routing.signal not in CONFIDENCE_SIGNALS:
    raise ValueError(f"config.routing.signal={routing.signal!r} is not one of "
                     f"{CONFIDENCE_SIGNALS}")
  if (routing.rule == "router+cascade") != bool(routing.start_budget):
    raise ValueError("config.routing.start_budget is set exactly when config.routing.rule is "
                     f"'router+cascade' (rule {routing.rule!r}, start_budget "
                     f"{routing.start_budget!r})")
  if routing.start_budget:
    try:
      parse_budget(routing.start_budget)
    except ValueError as e:
      raise ValueError(f"config.routing.start_budget: {e}") from None
  if routing.budget and routing.calibrate_on not in CALIBRATION_SPLITS:
    raise ValueError(f"config.routing.calibrate_on={routing.calibrate_on!r} is not one of "
                     f"{CALIBRATION_SPLITS}")
  if routing.budget and routing.calibrate_on == "train" and not routing.calibration_examples:
    raise ValueError("config.routing.budget calibrates on held-back training examples: set "
                     "config.routing.calibration_examples > 0 (or calibrate_on='dev')")


DISTILL_MODES = ("none", "inplace", "frozen")


def check_training_recipe(train: ml_collections.ConfigDict) -> None:
  if not isinstance(train.sandwich, bool):
    raise ValueError(f"config.train.sandwich={train.sandwich!r} must be True or False")
  if train.distill not in DISTILL_MODES:
    raise ValueError(f"config.train.distill={train.distill!r} is not one of {DISTILL_MODES}")
  if train.distill == "inplace" and not train.sandwich:
    raise ValueError("config.train.distill='inplace' takes the full width's logits of the same "
                     "batch, which only the sandwich computes: set config.train.sandwich=True, "
                     "or use distill='frozen' with the paper's single-width batches")
  if train.distill != "none" and train.static_width:
    raise ValueError(f"config.train.distill={train.distill!r} has no teacher in a static-width "
                     f"run (config.train.static_width={train.static_width})")


def validate(config: ml_collections.ConfigDict) -> EncoderConfig:
  """Raises ConfigError (a ValueError) naming the bad field; returns the backbone's architecture."""
  try:
    return check_config(config)
  except ConfigError:
    raise
  except ValueError as e:
    raise ConfigError(str(e)) from None


def check_config(config: ml_collections.ConfigDict) -> EncoderConfig:
  """Every section of the config, in order; the first bad field raises ValueError."""
  check_numbers(config)
  encoder = backbone_config(config)
  m = config.model
  try:
    check_model_settings(encoder, tuple(m.widths), m.router_layer)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model: {e}") from None
  if m.layernorm_init not in LAYERNORM_INITS:
    raise ValueError(f"config.model.layernorm_init={m.layernorm_init!r} is not one of "
                     f"{LAYERNORM_INITS}")
  buckets = tuple(config.data.length_buckets)
  if not buckets or list(buckets) != sorted(set(buckets)) or buckets[0] < 2:
    raise ValueError(f"config.data.length_buckets={buckets} must be increasing lengths >= 2")
  if buckets[-1] > encoder.max_position_embeddings - encoder.position_offset:
    raise ValueError(f"config.data.length_buckets: {buckets[-1]} exceeds the backbone's "
                     f"{encoder.max_position_embeddings - encoder.position_offset} positions")
  try:
    check_ranges(config.hardness.ranges, len(m.widths))
  except ValueError as e:
    raise ValueError(f"config.hardness.ranges: {e}") from None
  if config.hardness.signal not in SIGNALS:
    raise ValueError(f"config.hardness.signal={config.hardness.signal!r} is not one of {SIGNALS}")
  if config.train.static_width and config.train.static_width not in tuple(m.widths):
    raise ValueError(f"config.train.static_width={config.train.static_width} is not one of "
                     f"config.model.widths={tuple(m.widths)}")
  check_training_recipe(config.train)
  if config.model.method not in METHODS:
    raise ValueError(f"config.model.method={config.model.method!r} is not one of {METHODS}")
  if config.model.exit_pooling not in EXIT_POOLINGS:
    raise ValueError(f"config.model.exit_pooling={config.model.exit_pooling!r} is not one of "
                     f"{EXIT_POOLINGS}")
  options = exit_model_options(config)
  try:
    check_model_settings(encoder, options["widths"], m.router_layer)
  except (ValueError, TypeError) as e:
    raise ValueError(f"config.model.exit_widths: {e}") from None
  if options["narrow_exits"] and (
      len(options["widths"]) < 2 or
      any(not m.router_layer < e < encoder.num_layers for e in options["narrow_exits"])):
    raise ValueError(f"config.model.narrow_exits={options['narrow_exits']}: layers after "
                     f"router_layer={m.router_layer} and before the last "
                     f"({encoder.num_layers}), with a narrow width in exit_widths")
  if config.checkpoint.select not in SELECTION_RULES:
    raise ValueError(f"config.checkpoint.select={config.checkpoint.select!r} is not one of "
                     f"{SELECTION_RULES}")
  check_routing(config.routing)
  task = get_task(config.task)
  draw = config.routing.get("calibration_draw", "rows")
  if draw not in CALIBRATION_DRAWS:
    raise ValueError(f"config.routing.calibration_draw={draw!r} is not one of "
                     f"{CALIBRATION_DRAWS}")
  if draw == "sentences" and len(task.text_columns) != 1:
    raise ValueError(f"config.routing.calibration_draw='sentences' holds out whole sentences of "
                     f"a one-text task; {task.name} has {len(task.text_columns)} text fields")
  held, limit = config.routing.calibration_examples, config.data.train_limit
  if draw == "rows" and held and limit and held >= limit:
    raise ValueError(f"config.routing.calibration_examples={held} holds out all of "
                     f"config.data.train_limit={limit} training examples: nothing would train")
  resolve_data_dir(config.data_dir)
  return encoder


def exit_model_options(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The early-exit model's settings beside its encoder and classes (runs written before a
  field existed: full width only, no narrow exits)."""
  return {"pooling": config.model.exit_pooling,
          "widths": tuple(config.model.get("exit_widths", (1.0,))),
          "width_layer": config.model.router_layer,
          "narrow_exits": tuple(int(e) for e in config.model.get("narrow_exits", ()))}
