"""The train step's recipes on a tiny model: distillation loss, the sandwich, the frozen teacher."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import noisy_layernorms, tiny_run_config
from sharcs_jax import config as config_lib
from sharcs_jax.train import hardness, loop as train
from sharcs_jax.model import SharcsModel, init_params


def test_distillation_loss_on_hand_made_logits():
  teacher = jnp.array([[2.0, 0.0], [0.0, 0.0]])
  student = jnp.array([[0.0, 0.0], [0.0, 0.0]])
  p = np.exp([2.0, 0.0]) / np.exp([2.0, 0.0]).sum()
  kl = float((p * (np.log(p) - np.log([0.5, 0.5]))).sum())
  np.testing.assert_allclose(train.distillation_loss(student, teacher, 1.0), [kl, 0.0],
                             rtol=1e-6, atol=1e-7)
  # At T = 2 the distributions soften, and the loss is scaled by T^2.
  p2 = np.exp([1.0, 0.0]) / np.exp([1.0, 0.0]).sum()
  kl2 = float((p2 * (np.log(p2) - np.log([0.5, 0.5]))).sum())
  np.testing.assert_allclose(train.distillation_loss(student, teacher, 2.0)[0], 4 * kl2, rtol=1e-6)
  # No gradient reaches the teacher; the student's gradient is softmax(s) - softmax(t).
  g_teacher = jax.grad(lambda t: train.distillation_loss(student, t, 1.0).sum())(teacher)
  np.testing.assert_array_equal(g_teacher, 0.0)
  g_student = jax.grad(lambda s: train.distillation_loss(s, teacher, 1.0).sum())(student)
  np.testing.assert_allclose(g_student[0], [0.5 - p[0], 0.5 - p[1]], rtol=1e-6)


def test_width_loss_mixes_cross_entropy_and_distillation():
  logits, teacher, labels = jnp.array([[1.0, -1.0]]), jnp.array([[-1.0, 3.0]]), jnp.array([0])
  ce = float(-jax.nn.log_softmax(logits)[0, 0])
  kd = float(train.distillation_loss(logits, teacher, 1.0)[0])
  np.testing.assert_allclose(train.width_loss(logits, labels, None, 0.7, 1.0), [ce], rtol=1e-6)
  np.testing.assert_allclose(train.width_loss(logits, labels, teacher, 0.25, 1.0),
                             [0.75 * ce + 0.25 * kd], rtol=1e-6)


def _state(model, params, num_examples, *, window=1, epoch=0, teacher=False, num_classes=3):
  tx = train.make_optimizer(config_lib.base_config("qqp").train)
  return train.TrainState(
      step=jnp.int32(0), epoch=jnp.int32(epoch), params=params, opt_state=tx.init(params),
      hardness=hardness.init_hardness(num_examples, window, len(model.widths)),
      rng=jax.random.PRNGKey(3), train_seconds=jnp.float32(0.0),
      teacher=jnp.zeros((num_examples, num_classes)) if teacher else None), tx


def _batch(tiny_batch):
  return {**tiny_batch, "id": jnp.array([0, 1]), "weight": jnp.ones(2),
          "learning_rate": jnp.float32(1e-3)}


def _changed(before, after, part):
  """Whether any leaf whose path names `part` moved."""
  flat_b = jax.tree_util.tree_flatten_with_path(before)[0]
  flat_a = jax.tree_util.tree_leaves(after)
  return any(not np.array_equal(a, b) for (p, b), a in zip(flat_b, flat_a)
             if part in jax.tree_util.keystr(p))


def _dropout_free(cfg):
  """Three widths without dropout, so that a training step's logits equal an inference pass's;
  two layers (the router after the first), as a train step's compile time grows with depth."""
  cfg = dataclasses.replace(cfg, hidden_dropout=0.0, attention_dropout=0.0, num_layers=2)
  model = SharcsModel(cfg, num_classes=3, widths=(0.25, 0.5, 1.0), router_layer=1,
                      router_hidden=16)
  return model, noisy_layernorms(init_params(model, jax.random.key(0)))


def _step(model, tx, **kw):
  return jax.jit(functools.partial(train.train_step, model=model, tx=tx, router_loss_weight=0.1,
                                   **kw), static_argnames="widths")


def _logits(model, params, batch, widths):
  return {w: model.apply({"params": params}, batch["input_ids"], batch["attention_mask"],
                         batch["token_type_ids"], width=w).logits for w in widths}


# Each distinct train step costs seconds of XLA compilation even on the tiny model, so these tests
# share two steps: the sandwich over three widths, and the frozen-teacher step.
def test_sandwich_step_trains_every_width_on_the_sum_of_their_losses(tiny_config, tiny_batch):
  """With dropout off, the step's task loss is CE(full) + the CE/KD mix of each narrow width,
  every width's private LayerNorms move, and the easiness recorded is the narrowest width's."""
  model, params = _dropout_free(tiny_config)
  state, tx = _state(model, params, 2)
  batch = _batch(tiny_batch)
  new, metrics = _step(model, tx, distill="inplace", distill_weight=0.3)(
      state, batch, widths=(0.25, 0.5, 1.0))
  assert _changed(params, new.params, "ln_w0p25")
  assert _changed(params, new.params, "ln_w0p5")
  assert np.isfinite(metrics["loss"]) and metrics["count"] == 2
  logits = _logits(model, params, batch, (0.25, 0.5, 1.0))
  expected = (train.width_loss(logits[1.0], batch["label"], None, 0.3, 1.0)
              + train.width_loss(logits[0.5], batch["label"], logits[1.0], 0.3, 1.0)
              + train.width_loss(logits[0.25], batch["label"], logits[1.0], 0.3, 1.0)).mean()
  np.testing.assert_allclose(metrics["task_loss"], expected, rtol=1e-5)
  np.testing.assert_allclose(
      new.hardness.confidence[0],
      jax.nn.softmax(logits[0.25])[jnp.arange(2), batch["label"]], rtol=1e-5)


def test_frozen_teacher_is_written_in_the_warm_up_only(tiny_config, tiny_batch):
  model, params = _dropout_free(tiny_config)
  batch = _batch(tiny_batch)
  logits = _logits(model, params, batch, (0.25, 1.0))
  state, tx = _state(model, params, 3, window=1, epoch=0, teacher=True)
  step = _step(model, tx, distill="frozen", distill_weight=1.0)
  warm, _ = step(state, batch, widths=(1.0,))
  np.testing.assert_allclose(warm.teacher[:2], logits[1.0], rtol=1e-5)
  np.testing.assert_array_equal(warm.teacher[2], 0.0)  # example 2 was not in the batch
  # The paper's single-width step leaves the other widths' private parameters untouched.
  assert not _changed(params, warm.params, "ln_w0p25")
  assert _changed(params, warm.params, "['attn_ln']")
  # After the warm-up the teacher stays; a narrow step's loss is then pure KD against it.
  later = warm.replace(epoch=jnp.int32(1), params=params)
  after, metrics = step(later, batch, widths=(0.25,))
  np.testing.assert_array_equal(after.teacher, warm.teacher)
  np.testing.assert_allclose(metrics["task_loss"],
                             train.distillation_loss(logits[0.25], warm.teacher[:2], 1.0).mean(),
                             rtol=1e-5)


@pytest.mark.parametrize("overrides, message", [
    ({"train__distill": "inplace"}, r"distill='inplace' .* set config.train.sandwich=True"),
    ({"train__distill": "teacher"}, r"config.train.distill='teacher' is not one of"),
    ({"train__distill_weight": 1.5}, r"config.train.distill_weight=1.5 must be a number in"),
    ({"train__distill": "frozen", "train__static_width": 1.0}, r"no teacher in a static-width"),
])
def test_bad_recipe_fails_validation(tiny_backbone, overrides, message):
  with pytest.raises(ValueError, match=message):
    config_lib.validate(tiny_run_config(tiny_backbone, **overrides))
