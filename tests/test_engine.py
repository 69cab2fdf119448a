"""The AOT engine: same predictions as the model, input order kept, nothing compiled at serving,
stored executables reused after a restart, text inputs checked."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from conftest import needs_glue
from conftest import tiny_run_config as _tiny_config

from sharcs_jax.serve import routing
from sharcs_jax import evaluate
from sharcs_jax.data import batching, glue
from sharcs_jax.data.padding import length_bucket_of
from sharcs_jax.data.batching import Encoded
from sharcs_jax.serve.engine import Engine
from sharcs_jax.model import EncoderConfig, SharcsModel, init_params
from sharcs_jax.model.weights import resolve_model_dir
from sharcs_jax.serve.programs import ProgramKey


class CompileCounter:
  """Counts XLA compiles and traces (jax.monitoring events) inside a `with` block."""

  def __enter__(self):
    self.events = []
    self._listener = lambda event, duration, **kw: self.events.append(event) if (
        "compile" in event or "trac" in event) else None
    jax.monitoring.register_event_duration_secs_listener(self._listener)
    return self

  def __exit__(self, *exc):
    jax.monitoring.unregister_event_duration_listener(self._listener)


def _inputs(n=23, buckets=(8, 16), seed=0):
  """Lengths interleave both buckets so that grouping must undo a real permutation."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(2, 17, n).astype(np.int32)
  ids = np.where(np.arange(16)[None] < lengths[:, None], rng.integers(5, 50, (n, 16)), 0)
  return Encoded(ids.astype(np.int32), np.zeros((n, 16), np.int32), lengths,
                 np.zeros(n, np.int32), np.arange(n, dtype=np.int32),
                 length_bucket_of(lengths, buckets), buckets)


@pytest.fixture(scope="module")
def split_params(tiny_model, tiny_params):
  """A router biased so that the test inputs split between widths 0.25 and 1.0."""
  params = jax.tree_util.tree_map(lambda x: x, tiny_params)
  data = _inputs()
  _, logits = tiny_model.apply({"params": params}, jnp.asarray(data.input_ids),
                               jnp.asarray(np.arange(16)[None] < data.lengths[:, None]),
                               method=type(tiny_model).prefix)
  gap = np.asarray(logits[:, 0] - logits[:, 2])
  params["router"]["out"]["bias"] = params["router"]["out"]["bias"] + jnp.array(
      [-float(np.median(gap)), -100.0, 0.0])
  return params


@pytest.fixture(scope="module")
def engine(tiny_model, split_params):
  return Engine(tiny_model, split_params, length_buckets=(8, 16), batch_buckets=(1, 8))


def test_engine_matches_the_model_example_by_example(engine, tiny_model):
  data = _inputs()
  out = engine.run(data)
  assert len(set(out.widths.tolist())) >= 2, out.widths
  reference = jax.jit(lambda ids, mask, width: tiny_model.apply(
      engine.variables, ids, mask, jnp.zeros_like(ids), width=width), static_argnames="width")
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
                     data.length_buckets)
  a, b = engine.run(data), engine.run(shuffled)
  np.testing.assert_allclose(b.probabilities, a.probabilities[order], atol=1e-6)
  np.testing.assert_array_equal(b.widths, a.widths[order])


def test_engine_matches_training_time_evaluation(engine, tiny_model, split_params):
  """The engine's routed predictions are those the training loop's dev evaluation reports."""
  data = _inputs()
  probabilities, router = evaluate.predict_all_widths(engine.programs, split_params, data, 8)
  chosen = router.argmax(-1)
  out = engine.run(data)
  np.testing.assert_array_equal(out.widths, np.asarray(tiny_model.widths)[chosen])
  np.testing.assert_allclose(out.probabilities, probabilities[chosen, np.arange(len(data))],
                             atol=1e-5)


def test_every_stage_is_each_width_alone(engine, split_params):
  """A SHARCS engine's every stage is each width's probabilities, as the evaluation gives them:
  what a benchmark reports as each route alone."""
  data = _inputs(n=21, seed=3)
  probabilities, _ = evaluate.predict_all_widths(engine.programs, split_params, data, 8)
  np.testing.assert_allclose(engine.every_stage(data), probabilities, atol=1e-5)


def test_budget_routing_in_the_engine(engine, split_params):
  """A rule calibrated on inputs reaches its reduction when the engine serves those inputs, and
  routes as the training-time evaluation does under the same rule."""
  data = _inputs(n=40, seed=6)
  rule = engine.calibrate("1.6x", data)
  try:
    engine.rule = rule
    out = engine.run(data)
  finally:
    engine.rule = routing.Rule()
  full = engine.full_gflops(data).mean()
  assert full / out.gflops.mean() == pytest.approx(rule.calibration_reduction)
  assert 1.6 <= rule.calibration_reduction <= 1.6 * 1.05
  probabilities, router = evaluate.predict_all_widths(engine.programs, split_params, data, 8)
  result = evaluate.summarize(probabilities, router, data, engine.flops, ("accuracy",), rule)
  assert result["sharcs"]["flops_reduction"] == pytest.approx(rule.calibration_reduction)
  assert result["sharcs_argmax"]["flops_reduction"] < result["sharcs"]["flops_reduction"]
  with pytest.raises(ValueError, match="out of reach"):
    engine.calibrate("9x", data)


@pytest.mark.parametrize("forced", [0, 2])
def test_a_request_routed_to_one_width(tiny_model, split_params, forced):
  """Whole prefix batches feed their width's program directly: same results as gathering."""
  params = jax.tree_util.tree_map(lambda x: x, split_params)
  params["router"]["out"]["bias"] = params["router"]["out"]["bias"].at[forced].add(1e4)
  engine = Engine(tiny_model, params, length_buckets=(8, 16), batch_buckets=(1, 8))
  data = _inputs(n=21, seed=8)
  out = engine.run(data)
  assert set(out.widths.tolist()) == {tiny_model.widths[forced]}
  probabilities, _ = evaluate.predict_all_widths(engine.programs, params, data, 8)
  np.testing.assert_allclose(out.probabilities, probabilities[forced], atol=1e-5)


def test_blocks_do_not_change_results(engine, monkeypatch):
  data = _inputs(n=40, seed=4)
  whole = engine.run(data)
  monkeypatch.setattr(engine, "block_size", 5)
  np.testing.assert_allclose(engine.run(data).probabilities, whole.probabilities, atol=1e-6)


def test_serving_never_compiles(engine):
  engine.run(_inputs(n=5, seed=2))  # warm-up
  with CompileCounter() as counter:
    engine.run(_inputs(n=40, seed=3))
  assert counter.events == []


def test_restart_reuses_stored_executables(tiny_model, split_params, tmp_path):
  data = _inputs(buckets=(16,))  # one length bucket: each stored program costs a compile
  first = Engine(tiny_model, split_params, length_buckets=(16,), batch_buckets=(1, 8),
                 cache_dir=str(tmp_path))
  total = len(first.programs.executables)
  assert (first.programs.compiled, first.programs.loaded) == (total, 0)
  with CompileCounter() as counter:  # a new engine in the same process stands for a restart
    second = Engine(tiny_model, split_params, length_buckets=(16,), batch_buckets=(1, 8),
                    cache_dir=str(tmp_path))
    out = second.run(data)
  assert (second.programs.compiled, second.programs.loaded) == (0, total)
  assert counter.events == [], counter.events
  np.testing.assert_allclose(out.probabilities, first.run(data).probabilities, atol=1e-6)
  assert second.programs.flops == first.programs.flops

  # A damaged file is compiled again and replaced, with a warning rather than a crash.
  damaged = os.path.join(second.programs.directory, ProgramKey("prefix", None, 1, 16).file_name)
  with open(damaged, "wb") as f:
    f.write(b"not an executable")
  third = Engine(tiny_model, split_params, length_buckets=(16,), batch_buckets=(1, 8),
                 cache_dir=str(tmp_path))
  assert (third.programs.compiled, third.programs.loaded) == (1, total - 1)
  np.testing.assert_allclose(third.run(data).probabilities, out.probabilities, atol=1e-6)


def test_other_shapes_get_other_executables(tiny_model, tiny_config, split_params, tmp_path):
  """A model of another size must not pick up this one's stored programs."""
  Engine(tiny_model, split_params, length_buckets=(8,), batch_buckets=(1,), cache_dir=str(tmp_path))
  other = SharcsModel(tiny_config, num_classes=2, widths=(0.25, 0.5, 1.0), router_layer=2,
                      router_hidden=16)
  engine = Engine(other, init_params(other, jax.random.key(3)), length_buckets=(8,),
                  batch_buckets=(1,), cache_dir=str(tmp_path))
  assert engine.programs.loaded == 0
  assert len(os.listdir(tmp_path)) == 2


def test_flops_per_example(engine, tiny_model):
  out = engine.run(_inputs())
  narrow = engine.example_gflops(0.25, 16)
  full = engine.example_gflops(1.0, 16)
  assert narrow < full
  flops = engine.programs.flops
  assert flops[ProgramKey("prefix", None, 8, 16)] > flops[ProgramKey("prefix", None, 1, 16)]
  assert set(np.round(out.gflops, 12)) <= {round(engine.example_gflops(w, s), 12)
                                           for w in (0.25, 0.5, 1.0) for s in (8, 16)}


def test_bad_buckets(tiny_model, tiny_params):
  with pytest.raises(ValueError, match="batch_buckets must be increasing"):
    Engine(tiny_model, tiny_params, length_buckets=(8,), batch_buckets=(8, 4))


@pytest.fixture(scope="module")
def text_engine():
  """A tiny random model over all-MiniLM-L6-v2's real vocabulary, serving QQP-style pairs."""
  cfg = EncoderConfig(layout="bert", vocab_size=30522, hidden_size=32, num_layers=3, num_heads=4,
                      intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)
  model = SharcsModel(cfg, num_classes=2, widths=(0.25, 1.0), router_layer=1, router_hidden=16)
  tokenizer = batching.load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))
  return Engine(model, init_params(model, jax.random.key(4)), length_buckets=(16, 32),
                batch_buckets=(1, 4), tokenizer=tokenizer, task=glue.get_task("qqp"))


def test_text_inputs_empty_and_overlong(text_engine):
  long = " ".join(["word"] * 500)
  texts = [("How do I learn JAX?", "What is the best way to learn JAX?"), ("", ""),
           (long, "short"), ["a list works too", long]]
  data = text_engine.encode(texts)
  assert data.lengths.max() == 32  # truncated to the last bucket
  assert data.lengths[1] == 3  # [CLS] [SEP] [SEP]
  out = text_engine.predict(texts)
  assert out.probabilities.shape == (4, 2)
  np.testing.assert_allclose(out.probabilities.sum(1), 1.0, atol=1e-5)
  # Each example alone gives the same answer as in the mixed batch.
  for i, text in enumerate(texts):
    np.testing.assert_allclose(text_engine.predict([text]).probabilities[0], out.probabilities[i],
                               atol=1e-5)


def test_text_inputs_match_the_tokenizer(text_engine):
  pair = ("Why is the sky blue?", "What makes the sky blue?")
  data = text_engine.encode([pair])
  expected = transformers.AutoTokenizer.from_pretrained(resolve_model_dir("all-MiniLM-L6-v2"))(
      *pair)
  n = len(expected["input_ids"])
  assert data.lengths[0] == n
  np.testing.assert_array_equal(data.input_ids[0, :n], expected["input_ids"])
  np.testing.assert_array_equal(data.token_type_ids[0, :n], expected["token_type_ids"])
  assert 0 < data.token_type_ids[0].sum() < n


@pytest.mark.parametrize("texts, message", [
    ([("one", "two"), ("only one",)], r"input 1 has 1 field"),
    (["a single string"], r"input 0 has 1 field.*qqp takes 2"),
    ([("a", "b", "c")], r"input 0 has 3 field"),
    ([("a", 5)], r"input 0 has 2 field"),
])
def test_wrong_number_of_fields_is_a_clear_error(text_engine, texts, message):
  with pytest.raises(ValueError, match=message):
    text_engine.predict(texts)


@pytest.fixture
def cascade_engine(engine):
  """The engine routing by a cascade calibrated to 1.25x on other inputs."""
  rule = engine.calibrate("1.25x", _inputs(n=40, seed=6), rule="cascade")
  assert isinstance(rule, routing.Cascade) and 1.25 <= rule.calibration_reduction <= 1.25 * 1.05
  engine.rule = rule
  yield engine
  engine.rule = routing.Rule()


def test_cascade_in_the_engine_matches_the_model(cascade_engine, tiny_model):
  """Every input ends at the first width whose own probabilities are confident enough (from the
  whole model at that width), with that width's probabilities; it pays the prefix once plus every
  part it ran."""
  engine, rule = cascade_engine, cascade_engine.rule
  data = _inputs(n=30, seed=11)
  out = engine.run(data)
  reference = jax.jit(lambda ids, mask, width: jax.nn.softmax(tiny_model.apply(
      engine.variables, ids, mask, jnp.zeros_like(ids), width=width).logits), static_argnames="width")
  escalated = 0
  for row in range(len(data)):
    bucket = data.bucket_of[row]
    length = data.length_buckets[bucket]
    ids = jnp.asarray(data.input_ids[row:row + 1, :length])
    mask = jnp.asarray(np.arange(length)[None] < data.lengths[row])
    for i, width in enumerate(tiny_model.widths):
      probs = np.asarray(reference(ids, mask, width=width))[0]
      if i == len(tiny_model.widths) - 1 or routing.confidence(probs) >= rule.threshold:
        break
    assert out.widths[row] == width
    np.testing.assert_allclose(out.probabilities[row], probs, atol=1e-5)
    parts = engine.flops[:i + 1, bucket] - engine.prefix_flops[bucket]
    assert out.gflops[row] == pytest.approx((engine.prefix_flops[bucket] + parts.sum()) / 1e9)
    escalated += i
  assert 0 < escalated  # some inputs escalated, some stopped early
  assert tiny_model.widths[0] in set(out.widths.tolist())


def test_cascade_in_the_engine_is_the_evaluation(cascade_engine, split_params):
  """Serving a cascade gives what dev evaluation computes from every width's probabilities."""
  engine = cascade_engine
  data = _inputs(n=40, seed=12)
  out = engine.run(data)
  probabilities, router = evaluate.predict_all_widths(engine.programs, split_params, data, 8)
  example = evaluate.per_example_flops(engine.flops, data)
  final, ran = routing.route_all(engine.rule, probabilities, router, example)
  np.testing.assert_array_equal(out.widths, np.asarray(engine.widths)[final])
  np.testing.assert_allclose(out.gflops * 1e9, routing.width_ran_flops(
      ran, example, engine.prefix_flops[data.bucket_of]))
  result = evaluate.summarize(probabilities, router, data, engine.flops, ("accuracy",),
                              engine.rule, engine.prefix_flops)
  assert result["sharcs"]["gflops"] == pytest.approx(out.gflops.mean())


def test_cascade_serving_never_compiles(cascade_engine):
  cascade_engine.run(_inputs(n=5, seed=2))
  with CompileCounter() as counter:
    cascade_engine.run(_inputs(n=40, seed=3))
  assert counter.events == []


def test_bf16_engine_stays_near_fp32_and_counts_the_same_flops(engine, tiny_model, split_params):
  """bf16 matmul inputs with float32 accumulation: its own programs, fp32's FLOPs table, and
  probabilities within 2e-2 of fp32's (the model's own numbers, not a cast of the outputs)."""
  bf16 = Engine(tiny_model, split_params, length_buckets=(8, 16), batch_buckets=(1,),
                precision="bf16")  # one batch bucket: each program costs a compile
  assert bf16.precision == "bf16" and bf16.model.compute_dtype == "bfloat16"
  np.testing.assert_array_equal(bf16.flops, engine.flops)
  np.testing.assert_array_equal(bf16.prefix_flops, engine.prefix_flops)
  data = _inputs(n=30, seed=13)
  a, b = engine.run(data), bf16.run(data)
  difference = np.abs(a.probabilities - b.probabilities).max()
  assert 0 < difference <= 2e-2  # different arithmetic, close answers
  assert "bf16" in bf16.programs.executables[ProgramKey("adaptive", 1.0, 1, 8)].as_text()
  assert "bf16" not in engine.programs.executables[ProgramKey("adaptive", 1.0, 1, 8)].as_text()


@needs_glue
def test_engine_from_workdir_reproduces_the_report(trained):
  """The deployed engine, loaded from the checkpoint, scores dev as the training report did."""
  workdir, report = trained
  engine = Engine.from_workdir(str(workdir), batch_buckets=(1, 4))  # shapes no other test uses
  assert engine.programs.compiled > 0 and os.listdir(workdir / "executables")
  config = _tiny_config(report["model"])
  dev = glue.load_split("qqp", "dev", config.data_dir, limit=config.data.dev_limit)
  out = engine.predict(dev.texts)
  assert np.mean(out.labels == dev.labels) == pytest.approx(report["sharcs"]["accuracy"])
  assert out.gflops.mean() == pytest.approx(report["sharcs"]["gflops"], rel=1e-3)
  shares = [np.mean(out.widths == w) for w in report["widths"]]
  np.testing.assert_allclose(shares, report["sharcs"]["share_per_width"])
  again = Engine.from_workdir(str(workdir), batch_buckets=(1, 4))  # a restart: nothing compiles
  assert again.programs.compiled == 0


@needs_glue
def test_engine_on_no_inputs(trained):
  out = Engine.from_workdir(str(trained[0]), batch_buckets=(16,)).predict([])
  assert out.labels.shape == (0,) and out.probabilities.shape == (0, 2)
  assert out.widths.shape == out.gflops.shape == (0,)
