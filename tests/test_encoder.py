"""The width-sliced encoder: real slicing, masks, one tree for all widths, errors, no recompiles."""

from __future__ import annotations

import chex
import jax
import numpy as np
import pytest

from sharcs_jax.model import SharcsModel, width_dims, width_tag


def _apply(model, params, batch, width):
  return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                     batch["token_type_ids"], width=width)


def test_one_tree_holds_every_width(tiny_model, tiny_params):
  assert set(tiny_params["down_projection"]) == {"ln_w0p25", "ln_w0p5"}
  for i in range(4):
    layer = tiny_params[f"layers_{i}"]
    private = {k for k in layer if k.startswith(("attn_ln_w", "ffn_ln_w"))}
    assert private == (set() if i < 2 else {"attn_ln_w0p25", "ffn_ln_w0p25", "attn_ln_w0p5",
                                            "ffn_ln_w0p5"})
  assert tiny_params["layers_3"]["attn_ln_w0p25"]["scale"].shape == (8,)
  assert width_tag(0.25) == "w0p25" and width_tag(1.0) == "w1"


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_output_shapes(tiny_model, tiny_params, tiny_batch, width):
  out = _apply(tiny_model, tiny_params, tiny_batch, width)
  dw = width_dims(tiny_model.encoder, width).hidden
  assert out.last_hidden_state.shape == (2, 10, dw)
  assert out.logits.shape == (2, 3)
  assert out.router_logits.shape == (2, 3)
  assert out.pooled.shape == (2, 32)


def _outside_slice(params, model, width):
  """A 0/1 tree: 1 where width `width` never reads the parameter."""
  cfg, k = model.encoder, model.router_layer
  dims = width_dims(cfg, width)
  dw, hw, fw = dims.hidden, dims.heads, dims.ffn
  # numpy, not jax: eager jax would compile each update of each shape on its own
  outside = jax.tree_util.tree_map(lambda x: np.zeros(x.shape, np.float32), params)

  def mark(tree, path, index=None):
    *parents, leaf = path
    for p in parents:
      tree = tree[p]
    tree[leaf] = np.ones_like(tree[leaf])
    if index is not None:
      tree[leaf][index] = 0.0

  for i in range(k, cfg.num_layers):
    layer = f"layers_{i}"
    mark(outside, (layer, "qkv", "kernel"), np.s_[:dw, :, :hw])
    mark(outside, (layer, "qkv", "bias"), np.s_[:, :hw])
    mark(outside, (layer, "attn_out", "kernel"), np.s_[:hw, :, :dw])
    mark(outside, (layer, "attn_out", "bias"), np.s_[:dw])
    mark(outside, (layer, "ffn_in", "kernel"), np.s_[:dw, :fw])
    mark(outside, (layer, "ffn_in", "bias"), np.s_[:fw])
    mark(outside, (layer, "ffn_out", "kernel"), np.s_[:fw, :dw])
    mark(outside, (layer, "ffn_out", "bias"), np.s_[:dw])
    for other in (1.0,) + tuple(w for w in model.widths if w not in (1.0, width)):
      suffix = "" if other == 1.0 else f"_{width_tag(other)}"
      for norm in ("attn_ln", "ffn_ln"):
        for part in ("scale", "bias"):
          mark(outside, (layer, norm + suffix, part))
  mark(outside, ("head", "pooler", "kernel"), np.s_[:dw])
  for other in model.widths:
    if other not in (1.0, width):
      for part in ("scale", "bias"):
        mark(outside, ("down_projection", f"ln_{width_tag(other)}", part))
  return outside


@pytest.mark.parametrize("width", [0.25, 0.5])
def test_slicing_is_real(tiny_model, tiny_params, tiny_batch, width):
  """Perturbing what lies outside width w's leading slices leaves width w untouched."""
  outside = _outside_slice(tiny_params, tiny_model, width)
  rng = np.random.default_rng(3)
  perturbed = jax.tree_util.tree_map(
      lambda p, o: np.asarray(p) + o * rng.standard_normal(p.shape, np.float32),
      tiny_params, outside)
  assert sum(float(o.sum()) for o in jax.tree_util.tree_leaves(outside)) > 0

  before, after = (_apply(tiny_model, p, tiny_batch, width) for p in (tiny_params, perturbed))
  np.testing.assert_allclose(after.logits, before.logits, atol=1e-6)
  np.testing.assert_allclose(after.last_hidden_state, before.last_hidden_state, atol=1e-6)

  full_before, full_after = (_apply(tiny_model, p, tiny_batch, 1.0) for p in (tiny_params, perturbed))
  assert np.abs(np.asarray(full_after.logits - full_before.logits)).max() > 1e-3


@pytest.mark.parametrize("width", [0.25, 0.5, 1.0])
def test_padding_is_masked(tiny_model, tiny_params, tiny_batch, width):
  """An example padded inside a batch gives what it gives alone, unpadded (router included)."""
  batched = _apply(tiny_model, tiny_params, tiny_batch, width)
  alone = {k: v[1:2, :6] for k, v in tiny_batch.items() if k != "label"}
  single = _apply(tiny_model, tiny_params, alone, width)
  np.testing.assert_allclose(batched.logits[1], single.logits[0], atol=1e-5)
  np.testing.assert_allclose(batched.router_logits[1], single.router_logits[0], atol=1e-5)
  np.testing.assert_allclose(batched.last_hidden_state[1, :6], single.last_hidden_state[0], atol=1e-5)


def test_prefix_then_adaptive_equals_call(tiny_model, tiny_params, tiny_batch):
  hidden, router_logits = tiny_model.apply({"params": tiny_params}, tiny_batch["input_ids"],
                                           tiny_batch["attention_mask"], tiny_batch["token_type_ids"],
                                           method=SharcsModel.prefix)
  part = tiny_model.apply({"params": tiny_params}, hidden, tiny_batch["attention_mask"], width=0.5,
                          method=SharcsModel.adaptive)
  whole = _apply(tiny_model, tiny_params, tiny_batch, 0.5)
  np.testing.assert_allclose(part.logits, whole.logits, atol=1e-6)
  np.testing.assert_allclose(router_logits, whole.router_logits, atol=1e-6)


@pytest.mark.parametrize("width, message", [
    (0.0, r"outside \(0, 1\]"),
    (1.5, r"outside \(0, 1\]"),
    (-0.25, r"outside \(0, 1\]"),
    (0.1, "zero attention heads"),
    (0.75, "not one of the configured widths"),
])
def test_bad_width_is_a_clear_error(tiny_model, tiny_params, tiny_batch, width, message):
  with pytest.raises(ValueError, match=message):
    _apply(tiny_model, tiny_params, tiny_batch, width)


def test_traced_width_is_rejected(tiny_model, tiny_params, tiny_batch):
  with pytest.raises(TypeError, match="static Python float"):
    jax.jit(lambda w: _apply(tiny_model, tiny_params, tiny_batch, w).logits)(0.5)


@pytest.mark.parametrize("widths, router_layer, message", [
    ((0.5, 0.25, 1.0), 2, "strictly increasing"),
    ((0.25, 0.5), 2, "last width must be 1.0"),
    ((0.25, 1.2), 2, r"outside \(0, 1\]"),
    ((0.1, 1.0), 2, "zero attention heads"),
    ((0.5, 1.0), 0, r"outside 1..3"),
    ((0.5, 1.0), 4, r"outside 1..3"),
])
def test_bad_model_settings(tiny_config, tiny_batch, widths, router_layer, message):
  model = SharcsModel(tiny_config, num_classes=2, widths=widths, router_layer=router_layer,
                      router_hidden=8)
  with pytest.raises(ValueError, match=message):
    model.init(jax.random.key(0), tiny_batch["input_ids"], tiny_batch["attention_mask"])


def test_each_width_compiles_once(tiny_model, tiny_params, tiny_batch):
  traces = []

  def forward(params, ids, mask, width):
    traces.append(width)
    return tiny_model.apply({"params": params}, ids, mask, width=width).logits

  jitted = jax.jit(chex.assert_max_traces(forward, n=3), static_argnames="width")
  for width in (0.25, 0.5, 0.25, 1.0, 0.5, 1.0, 0.25):
    jitted(tiny_params, tiny_batch["input_ids"], tiny_batch["attention_mask"], width=width)
  assert traces == [0.25, 0.5, 1.0]
