"""A trained run's full-width model as a Hugging Face `BertForSequenceClassification` directory.

    python -m sharcs_jax.serve.export.hf --workdir=/tmp/sharcs_qqp --output=/tmp/sharcs_qqp_hf

At width 1.0 the SHARCS model is a plain BERT classifier: the down-projection is the identity,
every layer uses its full-width LayerNorms, and the head is BERT's pooler (dense + tanh on [CLS])
followed by the classifier. The router and the narrow widths' private LayerNorms do not take part
and are left out. The importance reordering only permutes heads and neurons consistently inside
each layer, so the permuted layers are still an exact BERT. Anything that would need a different
architecture (RoBERTa positions, DistilBERT without a pooler) is refused, not approximated.

An early-exit run (DeeBERT / PABEE's network, `baselines.train_early_exit`) exports its full
depth: the layers at full width and the last exit as BERT's pooler and classifier. Only [CLS]
exits do: an exit on the mean over tokens has no BertForSequenceClassification counterpart, and
is refused.

Written with safetensors' numpy API, so exporting needs no torch.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Mapping

import numpy as np
from absl import app, flags, logging

from sharcs_jax.data import glue
from sharcs_jax.errors import one_line_errors
from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.early_exit import EarlyExitModel
from sharcs_jax.model.sharcs import SharcsModel
from sharcs_jax.model.weights import convert_checkpoint, resolve_model_dir
from sharcs_jax.run import load_run

TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json")
WEIGHTS_FILE = "model.safetensors"


class ExportError(ValueError):
  """The model, or the place it should go, does not allow an exact export."""


def check_exportable(model: SharcsModel | EarlyExitModel) -> None:
  """Refuses what a BertForSequenceClassification cannot compute exactly."""
  cfg = model.encoder
  if isinstance(model, EarlyExitModel) and model.pooling != "cls":
    raise ExportError(f"the early-exit model's last exit reads the {model.pooling} over tokens; "
                      "BertForSequenceClassification pools [CLS], so only [CLS] exits export")
  if cfg.layout != "bert":
    why = ("its positions count from the padding id" if cfg.layout == "roberta"
           else "it has no token types and HF's DistilBERT head has no tanh pooler")
    raise ExportError(f"only BERT-layout backbones export to BertForSequenceClassification; this "
                      f"model is {cfg.layout!r}: {why}")
  if model.widths[-1] != 1.0:
    raise ExportError(f"the model has no full width: widths {model.widths}")


def _np(x: Any) -> np.ndarray:
  return np.ascontiguousarray(np.asarray(x, dtype=np.float32))


def _linear(kernel: np.ndarray, bias: Any, name: str) -> dict[str, np.ndarray]:
  """Our [in, out] kernel is PyTorch's [out, in] weight transposed."""
  return {f"{name}.weight": _np(np.asarray(kernel).T), f"{name}.bias": _np(bias)}


def _norm(params: Mapping[str, Any], name: str) -> dict[str, np.ndarray]:
  return {f"{name}.weight": _np(params["scale"]), f"{name}.bias": _np(params["bias"])}


def layer_tensors(cfg: EncoderConfig, layer: Mapping[str, Any], i: int) -> dict[str, np.ndarray]:
  """One encoder layer at full width: un-fuses Q/K/V and flattens the head axes back to d."""
  d = cfg.hidden_size
  p = f"bert.encoder.layer.{i}."
  qkv, qkv_bias = np.asarray(layer["qkv"]["kernel"]), np.asarray(layer["qkv"]["bias"])
  out = {}
  for t, name in enumerate(("query", "key", "value")):
    out |= _linear(qkv[:, t].reshape(d, d), qkv_bias[t].reshape(d), p + f"attention.self.{name}")
  out |= _linear(np.asarray(layer["attn_out"]["kernel"]).reshape(d, d), layer["attn_out"]["bias"],
                 p + "attention.output.dense")
  out |= _norm(layer["attn_ln"], p + "attention.output.LayerNorm")
  out |= _linear(layer["ffn_in"]["kernel"], layer["ffn_in"]["bias"], p + "intermediate.dense")
  out |= _linear(layer["ffn_out"]["kernel"], layer["ffn_out"]["bias"], p + "output.dense")
  out |= _norm(layer["ffn_ln"], p + "output.LayerNorm")
  return out


def hf_tensors(model: SharcsModel | EarlyExitModel, params: Mapping[str, Any]) -> dict[str, np.ndarray]:
  """Our parameter tree -> BertForSequenceClassification's state dict, full width only."""
  check_exportable(model)
  cfg, emb, head = model.encoder, params["embeddings"], params["head"]
  out = {"bert.embeddings.word_embeddings.weight": _np(emb["word"]),
         "bert.embeddings.position_embeddings.weight": _np(emb["position"]),
         "bert.embeddings.token_type_embeddings.weight": _np(emb["token_type"])}
  out |= _norm(emb["ln"], "bert.embeddings.LayerNorm")
  for i in range(cfg.num_layers):
    out |= layer_tensors(cfg, params[f"layers_{i}"], i)
  out |= _linear(head["pooler"]["kernel"], head["pooler"]["bias"], "bert.pooler.dense")
  out |= _linear(head["classifier"]["kernel"], head["classifier"]["bias"], "classifier")
  return out


def check_round_trip(model: SharcsModel | EarlyExitModel, params: Mapping[str, Any],
                     tensors: dict[str, np.ndarray]) -> None:
  """The importer (tested against Hugging Face) must read the export back bit for bit.

  This ties the export to the one mapping that is checked against transformers' own BERT, so
  the two cannot drift apart silently.
  """
  back = convert_checkpoint(model.encoder, tensors, source="export")
  for path, value in back.items():
    leaf = params
    for key in path:
      leaf = leaf[key]
    if not np.array_equal(value, _np(leaf)):
      raise ExportError(f"export of {'/'.join(path)} does not read back as the same tensor")
  head = params["head"]["classifier"]
  if not (np.array_equal(tensors["classifier.weight"].T, _np(head["kernel"]))
          and np.array_equal(tensors["classifier.bias"], _np(head["bias"]))):
    raise ExportError("export of head/classifier does not read back as the same tensor")


def hf_config(model: SharcsModel | EarlyExitModel, label_names: tuple[str, ...]):
  """BertConfig of exactly what our full width computes (absolute positions, our activation)."""
  from transformers import BertConfig  # configuration only: no torch

  cfg = model.encoder
  if len(label_names) != model.num_classes:
    raise ExportError(f"{len(label_names)} label names for {model.num_classes} classes")
  return BertConfig(
      vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers,
      num_attention_heads=cfg.num_heads, intermediate_size=cfg.intermediate_size,
      hidden_act=cfg.hidden_act, hidden_dropout_prob=cfg.hidden_dropout,
      attention_probs_dropout_prob=cfg.attention_dropout,
      max_position_embeddings=cfg.max_position_embeddings, type_vocab_size=cfg.type_vocab_size,
      initializer_range=cfg.initializer_range, layer_norm_eps=cfg.layer_norm_eps,
      pad_token_id=cfg.pad_token_id, position_embedding_type="absolute",
      num_labels=model.num_classes, id2label=dict(enumerate(label_names)),
      label2id={name: i for i, name in enumerate(label_names)},
      architectures=["BertForSequenceClassification"])


def copy_tokenizer(backbone_dir: str, directory: str) -> list[str]:
  """The backbone's tokenizer files, so that the export tokenises as the run did."""
  copied = []
  for name in TOKENIZER_FILES:
    source = os.path.join(backbone_dir, name)
    if os.path.isfile(source):
      shutil.copy(source, os.path.join(directory, name))
      copied.append(name)
  if not copied:
    raise ExportError(f"{backbone_dir} holds none of the tokenizer files {TOKENIZER_FILES}")
  return copied


def export_hf(config: Any, model: SharcsModel | EarlyExitModel, params: Mapping[str, Any], directory: str) -> None:
  """Writes config.json, model.safetensors and the tokenizer files of the run into `directory`."""
  from safetensors.numpy import save_file

  tensors = hf_tensors(model, params)
  check_round_trip(model, params, tensors)
  os.makedirs(directory, exist_ok=True)
  hf_config(model, glue.get_task(config.task).label_names).save_pretrained(directory)
  save_file(tensors, os.path.join(directory, WEIGHTS_FILE), metadata={"format": "pt"})
  copy_tokenizer(resolve_model_dir(config.model.backbone), directory)


def check_output(output: str, workdir: str) -> None:
  """Refuses a destination that would mix with other files or with the run itself."""
  out, run = os.path.realpath(output), os.path.realpath(workdir)
  if os.path.commonpath([out, run]) == run:
    raise ExportError(f"--output={output} lies inside the workdir {workdir}; the run's directory "
                      "holds its checkpoints and reports, keep the export elsewhere")
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ExportError(f"--output={output} exists and is not an empty directory; an export must "
                      "not mix with other files: choose a new path")
  if os.path.exists(partial_path(output)):
    raise ExportError(f"{partial_path(output)} exists, perhaps from an interrupted export; the "
                      "export is written there first: remove it, or choose a new path")


def partial_path(output: str) -> str:
  """Where the export is written before it is renamed into place, so no reader sees half."""
  return os.path.abspath(output).rstrip(os.sep) + ".partial"


def full_depth_params(model: EarlyExitModel, params: Mapping[str, Any]) -> dict[str, Any]:
  """An early-exit model's full depth in the SHARCS tree's names: its last exit as the head."""
  return {**params, "head": params[f"exits_{model.encoder.num_layers - 1}"]}


def export_workdir(workdir: str, output: str) -> None:
  """Loads the kept parameters of `workdir` and exports them atomically to `output`."""
  check_output(output, workdir)
  run = load_run(workdir)
  config, model, params = run.config, run.model, run.params
  if isinstance(model, EarlyExitModel):  # its full depth
    check_exportable(model)
    params = full_depth_params(model, params)
  partial = partial_path(output)
  export_hf(config, model, params, partial)
  os.replace(partial, output)
  logging.info("Exported the full-width model of %s to %s", workdir, output)


def define_flags() -> None:
  """Only when run as a program: importers (benchmarks) define their own --workdir."""
  flags.DEFINE_string("workdir", None, "A trained run (its checkpoints).", required=True)
  flags.DEFINE_string("output", None, "New directory for the Hugging Face model.", required=True)


def main(argv):
  del argv
  export_workdir(flags.FLAGS.workdir, flags.FLAGS.output)
  print(f"wrote {flags.FLAGS.output}")


if __name__ == "__main__":
  define_flags()
  app.run(one_line_errors(main, ExportError))
