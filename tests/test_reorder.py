"""Importance reordering keeps the full-width function and changes what the narrow slices hold."""

from __future__ import annotations

import numpy as np
import pytest

from sharcs_jax.model.reorder import (importance_scores, orders_from_importance, permute_units,
                                      reorder_by_importance)


def _apply(model, params, batch, width):
  return model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                     batch["token_type_ids"], width=width)


def test_importance_shapes_and_signal(tiny_model, tiny_params, tiny_batch):
  heads, neurons = importance_scores(tiny_model, tiny_params, [tiny_batch, tiny_batch])
  assert heads.shape == (4, 4) and neurons.shape == (4, 48)
  assert (heads >= 0).all() and (neurons >= 0).all() and heads.max() > 0 and neurons.max() > 0
  single = importance_scores(tiny_model, tiny_params, [tiny_batch])
  np.testing.assert_allclose(heads, 2 * single[0], rtol=1e-5)


def test_reordering_keeps_full_width_and_changes_narrow(tiny_model, tiny_params, tiny_batch):
  reordered = reorder_by_importance(tiny_model, tiny_params, [tiny_batch])
  before, after = (_apply(tiny_model, p, tiny_batch, 1.0) for p in (tiny_params, reordered))
  np.testing.assert_allclose(after.logits, before.logits, atol=1e-5)
  np.testing.assert_allclose(after.last_hidden_state, before.last_hidden_state, atol=1e-5)
  for width in (0.25, 0.5):
    before, after = (_apply(tiny_model, p, tiny_batch, width) for p in (tiny_params, reordered))
    change = np.abs(np.asarray(after.last_hidden_state - before.last_hidden_state)).max()
    assert change > 1e-2, (width, change)
    assert np.abs(np.asarray(after.logits - before.logits)).max() > 1e-6


def test_leading_units_are_the_most_important(tiny_model, tiny_params, tiny_batch):
  heads, neurons = importance_scores(tiny_model, tiny_params, [tiny_batch])
  reordered = permute_units(tiny_params, *orders_from_importance(heads, neurons))
  new_heads, new_neurons = importance_scores(tiny_model, reordered, [tiny_batch])
  assert (np.diff(new_heads, axis=1) <= 1e-6 * new_heads.max()).all()
  np.testing.assert_allclose(np.sort(new_neurons, axis=1)[:, ::-1], new_neurons, rtol=1e-4, atol=1e-9)


def test_not_a_permutation_is_rejected(tiny_model, tiny_params):
  heads = np.tile(np.arange(4), (4, 1))
  neurons = np.tile(np.arange(48), (4, 1))
  heads[2] = [0, 0, 1, 2]
  with pytest.raises(ValueError, match=r"layer 2: head order is not a permutation"):
    permute_units(tiny_params, heads, neurons)
  with pytest.raises(ValueError, match="at least one labelled batch"):
    importance_scores(tiny_model, tiny_params, [])
