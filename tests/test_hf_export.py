"""Hugging Face export: BertForSequenceClassification reproduces our full-width logits."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import REPO_ROOT, real_sentences
from sharcs_jax.serve.export import hf as hf_export
from sharcs_jax.run import load_run
from sharcs_jax.data import glue
from sharcs_jax.model import EncoderConfig, SharcsModel
from sharcs_jax.model.reorder import permute_units
from sharcs_jax.model.weights import load_pretrained

TOLERANCE = 1e-4


def _perturb(params, seed=0, scale=0.1):
  """Noise on every leaf: LayerNorms, pooler and classifier leave their init, and weights grow
  large enough (std ~0.1) that a transposed or mis-sliced matrix moves the logits by far more
  than the tolerance."""
  leaves, tree = jax.tree_util.tree_flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree_util.tree_unflatten(
      tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _permutations(cfg: EncoderConfig, seed=1):
  """Per-layer head and neuron orders, none of them the identity."""
  rng = np.random.default_rng(seed)
  heads = np.stack([np.roll(rng.permutation(cfg.num_heads), 1) for _ in range(cfg.num_layers)])
  neurons = np.stack([rng.permutation(cfg.intermediate_size) for _ in range(cfg.num_layers)])
  for order in list(heads) + list(neurons):
    assert (order != np.arange(len(order))).any()
  return heads, neurons


@pytest.fixture(scope="module")
def exported(tiny_backbone, tmp_path_factory):
  """(model, params, export directory): a reordered, perturbed 3-class model on the tiny BERT."""
  model, params = load_pretrained(tiny_backbone, num_classes=3, widths=(0.25, 0.5, 1.0),
                                  router_layer=1, key=jax.random.key(0))
  params = permute_units(_perturb(params), *_permutations(model.encoder))
  config = ml_collections.ConfigDict({"task": "mnli", "model": {"backbone": tiny_backbone}})
  directory = str(tmp_path_factory.mktemp("hf") / "export")
  hf_export.export_hf(config, model, params, directory)
  return model, params, directory


def _batches(tokenizer):
  """Real single sentences and sentence pairs, padded: mixed lengths and both token types."""
  sentences = real_sentences(16)
  singles = tokenizer(sentences[:8], padding=True, return_tensors="np")
  pairs = tokenizer(sentences[8:12], sentences[12:16], padding=True, return_tensors="np")
  for batch in (singles, pairs):
    lengths = batch["attention_mask"].sum(1)
    assert lengths.min() < lengths.max(), "each batch must mix lengths to exercise padding"
  assert pairs["token_type_ids"].max() == 1
  return [dict(singles), dict(pairs)]


def _ours(model, params, batch):
  out = model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                    jnp.asarray(batch["attention_mask"]), jnp.asarray(batch["token_type_ids"]),
                    width=1.0)
  return np.asarray(out.logits)


def _theirs(directory, batch):
  hf = transformers.BertForSequenceClassification.from_pretrained(directory).eval()
  with torch.no_grad():
    return hf(**{k: torch.tensor(v) for k, v in batch.items()}).logits.numpy()


def test_logits_match_transformers(exported):
  model, params, directory = exported
  tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
  for batch in _batches(tokenizer):
    ours, theirs = _ours(model, params, batch), _theirs(directory, batch)
    assert ours.shape == theirs.shape == (len(batch["input_ids"]), 3)
    assert np.abs(ours).max() > 100 * TOLERANCE  # logits that could show a mistake
    np.testing.assert_allclose(theirs, ours, atol=TOLERANCE, rtol=0)


def test_directory_layout(exported, tiny_backbone):
  _, _, directory = exported
  with open(os.path.join(directory, "config.json")) as f:
    cfg = json.load(f)
  assert cfg["architectures"] == ["BertForSequenceClassification"]
  assert cfg["model_type"] == "bert"
  names = glue.get_task("mnli").label_names
  assert cfg["id2label"] == {str(i): n for i, n in enumerate(names)}
  assert cfg["label2id"] == {n: i for i, n in enumerate(names)}
  assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (3, 32, 64)
  for name in hf_export.TOKENIZER_FILES:
    with open(os.path.join(directory, name), "rb") as a, \
        open(os.path.join(tiny_backbone, name), "rb") as b:
      assert a.read() == b.read(), name
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  assert "bert.pooler.dense.weight" in tensors and tensors["classifier.weight"].shape == (3, 32)
  assert not [n for n in tensors if "router" in n or "_w0p" in n]


@pytest.mark.parametrize("tensor", ["bert.encoder.layer.1.attention.self.query.weight",
                                    "bert.encoder.layer.2.attention.output.dense.weight",
                                    "bert.pooler.dense.weight"])
def test_a_transposed_matrix_shows(exported, tensor, tmp_path):
  """The comparison above would catch a forgotten transpose of any square matrix."""
  model, params, directory = exported
  for name in os.listdir(directory):
    os.symlink(os.path.join(directory, name), tmp_path / name)
  os.unlink(tmp_path / "model.safetensors")
  tensors = load_file(os.path.join(directory, "model.safetensors"))
  tensors[tensor] = np.ascontiguousarray(tensors[tensor].T)
  save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
  batch = _batches(transformers.AutoTokenizer.from_pretrained(directory))[1]
  assert np.abs(_theirs(str(tmp_path), batch) - _ours(model, params, batch)).max() > 100 * TOLERANCE


def test_roundtrip_check_catches_a_wrong_mapping(exported, monkeypatch):
  model, params, _ = exported
  tensors = hf_export.hf_tensors(model, params)
  name = "bert.encoder.layer.0.intermediate.dense.weight"
  bad = dict(tensors)
  bad[name] = tensors[name][::-1].copy()
  with pytest.raises(hf_export.ExportError, match="layers_0/ffn_in/kernel"):
    hf_export.check_round_trip(model, params, bad)
  hf_export.check_round_trip(model, params, tensors)


def test_non_bert_layouts_are_refused():
  for layout, why in (("roberta", "padding id"), ("distilbert", "no tanh pooler")):
    cfg = EncoderConfig(layout=layout, vocab_size=50, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=48, max_position_embeddings=40,
                        type_vocab_size=0 if layout == "distilbert" else 1)
    model = SharcsModel(cfg, num_classes=2, widths=(0.5, 1.0), router_layer=1, router_hidden=8)
    with pytest.raises(hf_export.ExportError, match=why):
      hf_export.check_exportable(model)


def test_output_checks(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with pytest.raises(hf_export.ExportError, match="inside the workdir"):
    hf_export.check_output(str(workdir / "hf"), str(workdir))
  with pytest.raises(hf_export.ExportError, match="inside the workdir"):
    hf_export.check_output(str(workdir), str(workdir))
  full = tmp_path / "full"
  full.mkdir()
  (full / "x").write_text("")
  with pytest.raises(hf_export.ExportError, match="not an empty directory"):
    hf_export.check_output(str(full), str(workdir))
  with pytest.raises(hf_export.ExportError, match="not an empty directory"):
    hf_export.check_output(str(full / "x"), str(workdir))
  (tmp_path / "empty").mkdir()
  hf_export.check_output(str(tmp_path / "empty"), str(workdir))
  (tmp_path / "empty.partial").mkdir()
  with pytest.raises(hf_export.ExportError, match="interrupted export"):
    hf_export.check_output(str(tmp_path / "empty"), str(workdir))
  hf_export.check_output(str(tmp_path / "new"), str(workdir))
  hf_export.check_output(str(tmp_path / "run2"), str(workdir))  # a prefix, not a parent


def _cli(workdir, output):
  return subprocess.run([sys.executable, "-m", "sharcs_jax.serve.export.hf", f"--workdir={workdir}",
                         f"--output={output}"], capture_output=True, text=True, timeout=600,
                        cwd=REPO_ROOT)


def test_cli_refuses_before_loading(tmp_path):
  result = _cli(tmp_path / "no_run", tmp_path / "no_run" / "hf")
  assert result.returncode != 0
  assert "lies inside the workdir" in result.stderr
  assert not (tmp_path / "no_run").exists()


def test_cli_exports_a_trained_run(trained, tmp_path):
  workdir, _ = trained
  output = tmp_path / "hf"
  (output).mkdir()  # an empty directory is a fine destination
  result = _cli(workdir, output)
  assert result.returncode == 0, result.stderr[-3000:]
  assert not os.path.exists(f"{output}.partial")
  run = load_run(str(workdir))
  model, params = run.model, run.params
  batch = _batches(transformers.AutoTokenizer.from_pretrained(output))[1]
  np.testing.assert_allclose(_theirs(str(output), batch), _ours(model, params, batch),
                             atol=TOLERANCE, rtol=0)
  result = _cli(workdir, output)  # now full: refused, and left as it was
  assert result.returncode != 0 and "not an empty directory" in result.stderr
  assert sorted(os.listdir(output)) == sorted(
      ["config.json", "model.safetensors", *hf_export.TOKENIZER_FILES])
