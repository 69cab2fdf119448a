"""Early-exit rules on hand-made per-layer logits, and the FLOPs of an exit at layer k."""

from __future__ import annotations

import numpy as np
import pytest

from sharcs_jax.baselines import early_exit
from sharcs_jax.model import EncoderConfig

SURE, UNSURE = [4.0, -4.0], [0.1, 0.0]  # entropies ~0.0007 and ~0.69 nats


def test_entropy_of_uniform_and_certain():
  np.testing.assert_allclose(early_exit.prediction_entropy(np.zeros((1, 4))), [np.log(4)])
  assert early_exit.prediction_entropy(np.array([[50.0, 0.0]]))[0] < 1e-15


def test_entropy_threshold_exits_at_the_first_confident_layer():
  logits = np.array([[UNSURE, UNSURE, SURE],  # layer 0
                     [SURE, UNSURE, UNSURE],  # layer 1
                     [UNSURE, UNSURE, SURE]])  # layer 2 (the last)
  np.testing.assert_array_equal(early_exit.entropy_exit_layers(logits, 0.1), [1, 2, 0])
  np.testing.assert_array_equal(early_exit.entropy_exit_layers(logits, 1.0), [0, 0, 0])
  np.testing.assert_array_equal(early_exit.entropy_exit_layers(logits, 0.0), [2, 2, 2])
  np.testing.assert_array_equal(
      early_exit.exit_predictions(logits, np.array([1, 2, 0])), [0, 0, 0])


def test_patience_counts_unchanged_predictions():
  a, b = [1.0, 0.0], [0.0, 1.0]
  logits = np.array([[a, a, a, b],
                     [a, b, a, a],
                     [b, b, a, a],
                     [b, b, b, a],
                     [b, a, b, a]])
  # patience 1: exit at the first layer that repeats the previous prediction.
  np.testing.assert_array_equal(early_exit.patience_exit_layers(logits, 1), [1, 2, 1, 2])
  # patience 2: two repeats in a row; the counter restarts when the prediction changes.
  np.testing.assert_array_equal(early_exit.patience_exit_layers(logits, 2), [4, 3, 2, 3])
  # never reached: the last layer.
  np.testing.assert_array_equal(early_exit.patience_exit_layers(logits, 9), [4, 4, 4, 4])
  with pytest.raises(ValueError, match="patience must be >= 1"):
    early_exit.patience_exit_layers(logits, 0)


def test_bad_logits_shape():
  with pytest.raises(ValueError, match=r"must be \[layers, examples, classes\]"):
    early_exit.entropy_exit_layers(np.zeros((3, 2)), 0.5)


def test_exit_flops_grow_by_one_layer_each_step():
  cfg = EncoderConfig(layout="bert", vocab_size=30522, hidden_size=384, num_layers=6,
                      num_heads=12, intermediate_size=1536, max_position_embeddings=512,
                      type_vocab_size=2)
  flops = [early_exit.exit_flops(cfg, k, 32, 2) for k in range(6)]
  steps = np.diff(flops)
  np.testing.assert_allclose(steps, steps[0])  # every layer costs the same at full width
  # one MiniLM layer at 32 tokens: its projections alone are 2*32*(4*384^2 + 2*384*1536) FLOPs;
  # attention scores, context and the elementwise work add a few percent
  projections = 2 * 32 * (4 * 384**2 + 2 * 384 * 1536)
  assert projections < steps[0] < 1.05 * projections
  assert flops[-1] / flops[0] == pytest.approx(6, rel=0.05)
  with pytest.raises(ValueError, match=r"exit layer 6 is outside 0..5"):
    early_exit.exit_flops(cfg, 6, 32, 2)


def test_sweep_rules_costs_and_extremes():
  # 3 layers, 2 examples, 2 classes; example 0 is confident from layer 0, example 1 never.
  logits = np.array([[[9.0, 0.0], [0.1, 0.0]],
                     [[9.0, 0.0], [0.0, 0.1]],
                     [[9.0, 0.0], [0.0, 0.2]]])
  labels = np.array([0, 1])
  gflops = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
  points = early_exit.sweep_rules(logits, labels, gflops, ("accuracy",), (0.0, 0.5, 1.0), (1,))
  by = {(p["rule"], p["setting"]): p for p in points}
  # Threshold 0 never fires: everyone pays for every layer and gets the last layer's answer.
  assert by["entropy", 0.0]["gflops"] == 3.0 and by["entropy", 0.0]["accuracy"] == 1.0
  # Half the largest entropy: example 0 leaves after layer 1 (cost 1), example 1 runs to the end.
  assert by["entropy", 0.5]["gflops"] == 2.0 and by["entropy", 0.5]["mean_exit_layer"] == 2.0
  # Any entropy below log(2) fires at once: example 1 leaves with layer 1's wrong answer.
  assert by["entropy", 1.0]["gflops"] == 1.0 and by["entropy", 1.0]["accuracy"] == 0.5
  # Patience 1: example 0 agrees at layer 2 (cost 2); example 1 changes its mind, then agrees.
  assert by["patience", 1]["gflops"] == 2.5 and by["patience", 1]["accuracy"] == 1.0


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_chained_stages_give_the_model_exits(tiny_config, tiny_batch, pooling):
  """Stages layers 0-1, 2, 3, each reading the one before, give exits 1, 2 and 3 of one pass."""
  import jax

  from sharcs_jax.model import EarlyExitModel

  model = EarlyExitModel(tiny_config, num_classes=3, pooling=pooling)
  batch = (tiny_batch["input_ids"], tiny_batch["attention_mask"], tiny_batch["token_type_ids"])
  variables = model.init(jax.random.key(0), *batch)
  every = jax.nn.softmax(model.apply(variables, *batch), axis=-1)
  inputs = batch
  for first, last in [(0, 1), (2, 2), (3, 3)]:
    hidden, probabilities = model.apply(variables, *inputs, first=first, last=last,
                                        method=EarlyExitModel.stage)
    np.testing.assert_allclose(probabilities, every[last], atol=1e-6)
    inputs = (hidden, batch[1])
  with pytest.raises(ValueError, match="outside"):
    model.apply(variables, *batch, first=2, last=1, method=EarlyExitModel.stage)
