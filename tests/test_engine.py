"""The AOT engine: same predictions as the model, input order kept, nothing compiled at serving."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sharcs_jax.data.batching import Encoded
from sharcs_jax.engine import Engine


def _inputs(n=23, buckets=(8, 16), seed=0):
  """Lengths interleave both buckets so that grouping must undo a real permutation."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 17, n).astype(np.int32)
  ids = np.where(np.arange(16)[None] < lengths[:, None], rng.integers(5, 50, (n, 16)), 0)
  return Encoded(ids.astype(np.int32), np.zeros((n, 16), np.int32), lengths,
                 np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                 np.searchsorted(np.asarray(buckets), lengths).astype(np.int32), buckets, 0)


@pytest.fixture(scope="module")
def engine(tiny_model, tiny_params):
  """A router biased so that the test inputs split between widths 0.25 and 1.0."""
  params = jax.tree_util.tree_map(lambda x: x, tiny_params)
  data = _inputs()
  _, logits = tiny_model.apply({"params": params}, jnp.asarray(data.input_ids),
                               jnp.asarray(np.arange(16)[None] < data.lengths[:, None]),
                               method=type(tiny_model).prefix)
  gap = np.asarray(logits[:, 0] - logits[:, 2])
  params["router"]["out"]["bias"] = params["router"]["out"]["bias"] + jnp.array(
      [-float(np.median(gap)), -100.0, 0.0])
  return Engine(tiny_model, params, length_buckets=(8, 16), batch_buckets=(1, 4, 8))


def test_engine_matches_the_model_example_by_example(engine, tiny_model):
  data = _inputs()
  out = engine.run(data)
  assert len(set(out.widths.tolist())) >= 2, out.widths
  reference = jax.jit(lambda ids, mask, width: tiny_model.apply(
      engine.params, ids, mask, jnp.zeros_like(ids), width=width), static_argnames="width")
  for row in range(len(data)):
    length = data.length_buckets[data.bucket_of[row]]  # padding is masked (test_encoder)
    ids = jnp.asarray(data.input_ids[row:row + 1, :length])
    mask = jnp.asarray(np.arange(length)[None] < data.lengths[row])
    ref = reference(ids, mask, width=float(out.widths[row]))
    assert tiny_model.widths[int(ref.router_logits.argmax())] == out.widths[row]
    np.testing.assert_allclose(out.probabilities[row], jax.nn.softmax(ref.logits[0]), atol=1e-5)
  np.testing.assert_array_equal(out.labels, out.probabilities.argmax(-1))


def test_input_order_is_kept(engine):
  data = _inputs()
  order = np.random.default_rng(5).permutation(len(data))
  shuffled = Encoded(data.input_ids[order], data.token_type_ids[order], data.lengths[order],
                     data.labels[order], data.ids[order], data.bucket_of[order],
                     data.length_buckets, data.pad_id)
  a, b = engine.run(data), engine.run(shuffled)
  np.testing.assert_allclose(b.probabilities, a.probabilities[order], atol=1e-6)
  np.testing.assert_array_equal(b.widths, a.widths[order])


def test_serving_never_compiles(engine):
  compiles = []

  def listener(event, duration, **kwargs):
    if "compile" in event:
      compiles.append(event)

  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    engine.run(_inputs(n=40, seed=3))
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  assert compiles == []


def test_flops_per_example(engine):
  out = engine.run(_inputs())
  narrow = engine.example_gflops(0.25, 16)
  full = engine.example_gflops(1.0, 16)
  assert narrow < full
  assert engine.flops["prefix", 8, 16] > engine.flops["prefix", 1, 16]
  assert set(np.round(out.gflops, 12)) <= {round(engine.example_gflops(w, s), 12)
                                           for w in (0.25, 0.5, 1.0) for s in (8, 16)}


def test_bad_buckets(tiny_model, tiny_params):
  with pytest.raises(ValueError, match="batch_buckets must be increasing"):
    Engine(tiny_model, tiny_params, length_buckets=(8,), batch_buckets=(8, 4))
