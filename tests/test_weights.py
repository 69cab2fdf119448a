"""Weight import: parity with Hugging Face PyTorch models, torch-free .bin reading, clear errors."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from conftest import real_sentences
from sharcs_jax.model.config import EncoderConfig
from sharcs_jax.model.torch_pickle import load_torch_state_dict
from sharcs_jax.model.weights import CheckpointError, load_pretrained, resolve_model_dir

KEY = jax.random.key(0)


def _hf_outputs(hf_model, batch):
  with torch.no_grad():
    out = hf_model(**{k: torch.tensor(v) for k, v in batch.items()})
  pooled = getattr(out, "pooler_output", None)
  return out.last_hidden_state.numpy(), None if pooled is None else pooled.numpy()


def _our_outputs(model, params, batch):
  out = model.apply({"params": params}, jnp.asarray(batch["input_ids"]),
                    jnp.asarray(batch["attention_mask"]),
                    None if "token_type_ids" not in batch else jnp.asarray(batch["token_type_ids"]),
                    width=1.0)
  return np.asarray(out.last_hidden_state), np.asarray(out.pooled)


def _assert_parity(ours, theirs, mask):
  """Last hidden states at the real tokens of a padded batch, and the pooled output."""
  real = mask.astype(bool)[..., None]
  hidden_error = np.abs(np.where(real, ours[0] - theirs[0], 0.0)).max()
  assert hidden_error <= 1e-4, hidden_error
  if theirs[1] is not None:
    pooled_error = np.abs(ours[1] - theirs[1]).max()
    assert pooled_error <= 1e-4, pooled_error


@pytest.mark.slow  # loads and runs the real backbone in PyTorch and in JAX
def test_minilm_parity_on_real_sentences():
  model_dir = resolve_model_dir("all-MiniLM-L6-v2")
  sentences = real_sentences(16)
  tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir)
  batch = dict(tokenizer(sentences, padding=True, return_tensors="np"))
  lengths = batch["attention_mask"].sum(1)
  assert lengths.min() < lengths.max(), "the batch must mix lengths to exercise padding"
  hf = transformers.BertModel.from_pretrained(model_dir, attn_implementation="eager").eval()
  model, params = load_pretrained(model_dir, num_classes=2, widths=(0.25, 0.5, 1.0),
                                  router_layer=2, key=KEY)
  _assert_parity(_our_outputs(model, params, batch), _hf_outputs(hf, batch), batch["attention_mask"])


def _randomise(hf_model, seed=0):
  """HF's init leaves biases at 0 and LayerNorms at 1/0; parity must hold for any values."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for p in hf_model.parameters():
      p.copy_(p + 0.05 * torch.randn(p.shape, generator=gen))
  return hf_model.eval()


def _tiny_hf(layout: str):
  common = dict(vocab_size=99, max_position_embeddings=40)
  if layout == "distilbert":
    cfg = transformers.DistilBertConfig(dim=32, n_layers=2, n_heads=4, hidden_dim=40, **common)
    return _randomise(transformers.DistilBertModel(cfg))
  if layout == "roberta":
    cfg = transformers.RobertaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=40, type_vocab_size=1, pad_token_id=1,
                                     **common)
    return _randomise(transformers.RobertaModel(cfg))
  cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=40, **common)
  return _randomise(transformers.BertModel(cfg))


def _padded_batch(layout: str, pad_id: int):
  rng = np.random.default_rng(0)
  mask = np.array([[1] * 12, [1] * 7 + [0] * 5, [1] * 3 + [0] * 9])
  ids = np.where(mask, rng.integers(3, 99, mask.shape), pad_id)
  batch = {"input_ids": ids, "attention_mask": mask}
  if layout == "bert":
    batch["token_type_ids"] = np.array([[0] * 6 + [1] * 6, [0] * 4 + [1] * 3 + [0] * 5, [0] * 12])
  return batch


@pytest.fixture(scope="module", params=["bert", "roberta", "distilbert"])
def saved_tiny(request, tmp_path_factory):
  layout = request.param
  hf = _tiny_hf(layout)
  path = tmp_path_factory.mktemp(layout)
  hf.save_pretrained(path)
  return layout, hf, str(path)


def test_tiny_model_parity(saved_tiny):
  layout, hf, path = saved_tiny
  batch = _padded_batch(layout, hf.config.pad_token_id)
  model, params = load_pretrained(path, num_classes=2, widths=(0.5, 1.0), router_layer=1, key=KEY)
  assert model.encoder.layout == layout
  _assert_parity(_our_outputs(model, params, batch), _hf_outputs(hf, batch), batch["attention_mask"])


def test_pytorch_bin_reads_without_torch(saved_tiny, tmp_path):
  layout, hf, path = saved_tiny
  shutil.copy(os.path.join(path, "config.json"), tmp_path)
  torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
  tensors = load_torch_state_dict(tmp_path / "pytorch_model.bin")
  reference = load_file(os.path.join(path, "model.safetensors"))
  for name, value in reference.items():
    np.testing.assert_array_equal(tensors[name], value)
  _, from_bin = load_pretrained(str(tmp_path), num_classes=2, widths=(0.5, 1.0), router_layer=1,
                                key=KEY)
  _, from_safetensors = load_pretrained(path, num_classes=2, widths=(0.5, 1.0), router_layer=1,
                                        key=KEY)
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_bin, from_safetensors)


def test_torch_pickle_refuses_code(tmp_path):
  payload = pickle.dumps(os.system)  # a pickle that would import os.system
  with zipfile.ZipFile(tmp_path / "evil.bin", "w") as archive:
    archive.writestr("archive/data.pkl", payload)
  with pytest.raises(pickle.UnpicklingError, match="refusing to load posix.system"):
    load_torch_state_dict(tmp_path / "evil.bin")


@pytest.fixture
def bert_dir(tmp_path):
  hf = _tiny_hf("bert")
  hf.save_pretrained(tmp_path)
  return tmp_path


def _edit_checkpoint(directory, edit):
  path = directory / "model.safetensors"
  tensors = dict(load_file(path))
  edit(tensors)
  save_file(tensors, path)


def _load(directory, **kwargs):
  return load_pretrained(str(directory), num_classes=2, widths=(0.5, 1.0), router_layer=1, key=KEY,
                         **kwargs)


def test_missing_tensor_is_named(bert_dir):
  _edit_checkpoint(bert_dir, lambda t: t.pop("encoder.layer.1.attention.self.key.weight"))
  with pytest.raises(CheckpointError, match=r"missing tensors \(1\):\s+encoder\.layer\.1\.attention\.self\.key\.weight"):
    _load(bert_dir)


def test_unexpected_tensor_is_named(bert_dir):
  _edit_checkpoint(bert_dir, lambda t: t.update({"encoder.layer.0.adapter.weight": np.zeros(3, np.float32)}))
  with pytest.raises(CheckpointError, match=r"unexpected tensors \(1\):\s+encoder\.layer\.0\.adapter\.weight"):
    _load(bert_dir)


def test_misshaped_tensor_is_named(bert_dir):
  _edit_checkpoint(bert_dir, lambda t: t.update(
      {"encoder.layer.0.intermediate.dense.weight": np.zeros((41, 32), np.float32)}))
  with pytest.raises(CheckpointError, match=r"encoder\.layer\.0\.intermediate\.dense\.weight: "
                                            r"expected shape \(40, 32\), got \(41, 32\)"):
    _load(bert_dir)


def test_task_heads_and_prefixes_are_accepted(bert_dir):
  """A BertForSequenceClassification checkpoint ('bert.' prefix, classifier head) loads."""
  _, plain = _load(bert_dir)
  _edit_checkpoint(bert_dir, lambda t: t.update(
      {**{"bert." + k: t.pop(k) for k in list(t)}, "classifier.weight": np.zeros((2, 32), np.float32)}))
  _, prefixed = _load(bert_dir)
  jax.tree_util.tree_map(np.testing.assert_array_equal, plain, prefixed)


def test_unknown_model_type(bert_dir):
  config = json.loads((bert_dir / "config.json").read_text())
  config["model_type"] = "gpt2"
  (bert_dir / "config.json").write_text(json.dumps(config))
  with pytest.raises(ValueError, match=r"config\.json: unknown model type 'gpt2'; supported: .*bert"):
    _load(bert_dir)


def test_no_weights_and_unknown_names(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(transformers.BertConfig().to_dict()))
  with pytest.raises(FileNotFoundError, match="no weights file"):
    _load(tmp_path)
  with pytest.raises(FileNotFoundError, match="neither a local directory nor a packaged model"):
    load_pretrained("no-such-model", num_classes=2, widths=(1.0,), router_layer=1, key=KEY)


def test_bad_settings_fail_before_reading_weights(bert_dir):
  (bert_dir / "model.safetensors").write_bytes(b"not read")
  with pytest.raises(ValueError, match=r"router_layer K=2 is outside 1..1"):
    load_pretrained(str(bert_dir), num_classes=2, widths=(0.5, 1.0), router_layer=2, key=KEY)


def test_layernorm_init_choices(bert_dir):
  _, pretrained = _load(bert_dir, layernorm_init="pretrained")
  layer = pretrained["layers_1"]
  np.testing.assert_array_equal(layer["attn_ln_w0p5"]["scale"], layer["attn_ln"]["scale"][:16])
  np.testing.assert_array_equal(layer["ffn_ln_w0p5"]["bias"], layer["ffn_ln"]["bias"][:16])
  np.testing.assert_array_equal(pretrained["down_projection"]["ln_w0p5"]["scale"],
                                pretrained["layers_0"]["ffn_ln"]["scale"][:16])
  _, fresh = _load(bert_dir, layernorm_init="fresh")
  np.testing.assert_array_equal(fresh["layers_1"]["attn_ln_w0p5"]["scale"], np.ones(16))
  np.testing.assert_array_equal(fresh["layers_1"]["attn_ln"]["scale"], layer["attn_ln"]["scale"])
  with pytest.raises(ValueError, match="layernorm_init 'zeros'"):
    _load(bert_dir, layernorm_init="zeros")


def test_fresh_parts_follow_the_key(bert_dir):
  _, a = load_pretrained(str(bert_dir), num_classes=2, widths=(0.5, 1.0), router_layer=1,
                         key=jax.random.key(1))
  _, b = load_pretrained(str(bert_dir), num_classes=2, widths=(0.5, 1.0), router_layer=1,
                         key=jax.random.key(1))
  _, c = load_pretrained(str(bert_dir), num_classes=2, widths=(0.5, 1.0), router_layer=1,
                         key=jax.random.key(2))
  np.testing.assert_array_equal(a["router"]["hidden"]["kernel"], b["router"]["hidden"]["kernel"])
  assert not np.allclose(a["router"]["hidden"]["kernel"], c["router"]["hidden"]["kernel"])
  assert not np.allclose(a["head"]["classifier"]["kernel"], c["head"]["classifier"]["kernel"])
  np.testing.assert_array_equal(a["layers_0"]["qkv"]["kernel"], c["layers_0"]["qkv"]["kernel"])


def test_config_reads_each_layout():
  cfg = EncoderConfig.from_hf_dict(transformers.DistilBertConfig(dim=64, n_heads=4).to_dict())
  assert (cfg.layout, cfg.hidden_size, cfg.type_vocab_size) == ("distilbert", 64, 0)
  with pytest.raises(ValueError, match="missing key 'vocab_size' for model type 'bert'"):
    EncoderConfig.from_hf_dict({"model_type": "bert"})
