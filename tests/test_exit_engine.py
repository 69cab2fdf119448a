"""The early-exit model served through the stage cascade: every stage equals the model's exit,
rows leave where the rule says and pay for what they ran, nothing compiles while serving."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from sharcs_jax.model import EarlyExitModel
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.exit_layout import NEVER_SURE as NEVER, layer_spans
from sharcs_jax.serve.routing import ExitCascade
from test_engine import CompileCounter, _inputs


@pytest.fixture(scope="module", params=["cls", "mean"])
def exit_engine(request, tiny_config):
  model = EarlyExitModel(tiny_config, num_classes=3, pooling=request.param)
  data = _inputs()
  params = model.init(jax.random.key(0), data.input_ids[:2], data.input_ids[:2] > 0)["params"]
  return Engine(model, params, length_buckets=(8, 16), exit_layers=(2, 3),
                    batch_buckets=(1, 4, 8))


def _model_exits(engine, data):
  """softmax of the model's own exits [L, N, C], every row in one batch padded to 16 tokens
  (masked)."""
  ids = data.input_ids
  mask = (np.arange(ids.shape[1])[None] < data.lengths[:, None]).astype(np.int32)
  logits = engine.model.apply(engine.variables, ids, mask, np.zeros_like(ids))
  return np.asarray(jax.nn.softmax(logits, axis=-1))


def _run_with(engine, rule, data):
  """`engine.run(data)` under `rule`, the engine's own rule restored after."""
  kept, engine.rule = engine.rule, rule
  try:
    return engine.run(data)
  finally:
    engine.rule = kept


def test_layer_spans():
  assert layer_spans(4) == ((0, 0), (1, 1), (2, 2), (3, 3))
  assert layer_spans(4, (2, 3)) == ((0, 1), (2, 2), (3, 3))
  assert layer_spans(6, (2, 4)) == ((0, 1), (2, 3), (4, 5))
  with pytest.raises(ValueError, match="1..4"):
    layer_spans(4, (0, 2))


def test_every_stage_equals_the_models_exit(exit_engine):
  data = _inputs()
  every = exit_engine.every_stage(data)  # stages end at layers 2, 3, 4
  exits = _model_exits(exit_engine, data)
  np.testing.assert_allclose(every, exits[[1, 2, 3]], atol=2e-6)


def test_rows_leave_at_their_first_sure_exit_in_row_order_and_pay_for_what_they_ran(exit_engine):
  data = _inputs(n=40, seed=4)
  every = exit_engine.every_stage(data)
  threshold = float(np.median(every.max(-1)))
  rule = ExitCascade(threshold, 3, "max_prob")
  out = _run_with(exit_engine, rule, data)
  stage = rule.exits(every)
  assert 0 < (stage == 0).sum() < 40  # some leave early, some go on
  np.testing.assert_array_equal(out.exit_layers, np.array([2, 3, 4])[stage])
  np.testing.assert_allclose(out.probabilities, every[stage, np.arange(40)], atol=1e-6)
  spent = np.cumsum(exit_engine.stage_flops, axis=0)[stage, data.bucket_of] / 1e9
  np.testing.assert_allclose(out.gflops, spent)
  assert (np.diff(exit_engine.stage_flops, axis=1) > 0).all()  # longer buckets cost more
  full = exit_engine.full_gflops(data)
  assert (out.gflops <= full + 1e-12).all() and out.gflops.mean() < full.mean()


def test_thresholds_per_length_bucket_route_each_row_by_its_own_bucket(exit_engine):
  data = _inputs(n=40, seed=8)
  every = exit_engine.every_stage(data)
  assert len(set(data.bucket_of.tolist())) == 2
  rule = ExitCascade(NEVER, 3, "max_prob", bucket_thresholds=(0.0, NEVER))  # short rows leave
  out = _run_with(exit_engine, rule, data)
  np.testing.assert_array_equal(out.exit_layers, np.where(data.bucket_of == 0, 2, 4))
  np.testing.assert_array_equal(rule.exits(every, data.bucket_of) == 0, data.bucket_of == 0)


def test_calibrated_exits_meet_the_budget_on_the_calibration_rows(exit_engine):
  data = _inputs(n=60, seed=5)
  rule = exit_engine.calibrate("1.3x", data, signal="max_prob")
  assert rule.calibration_reduction == pytest.approx(1.3, rel=0.1)
  out = _run_with(exit_engine, rule, data)
  assert exit_engine.full_gflops(data).mean() / out.gflops.mean() == pytest.approx(
      rule.calibration_reduction)


def test_serving_never_compiles(exit_engine):
  exit_engine.run(_inputs(n=5, seed=2))
  compiled = exit_engine.programs.compiled
  with CompileCounter() as counter:
    exit_engine.run(_inputs(n=40, seed=3))
    exit_engine.every_stage(_inputs(n=9, seed=6))
  assert counter.events == [] and exit_engine.programs.compiled == compiled


def test_onnxruntime_stages_equal_the_xla_stages(exit_engine, tmp_path):
  """The same stages converted for ONNX Runtime (fp32): every stage's probabilities within
  1e-4 of XLA's, the same FLOPs table, and no session built while serving."""
  onnx = Engine(exit_engine.model, exit_engine.variables["params"], length_buckets=(8, 16),
                    exit_layers=(2, 3), batch_buckets=(1, 4, 8), runtime="onnxruntime",
                    precision="fp32", cache_dir=str(tmp_path))
  data = _inputs(n=30, seed=7)
  np.testing.assert_allclose(onnx.every_stage(data), exit_engine.every_stage(data), atol=1e-4)
  np.testing.assert_allclose(onnx.stage_flops, exit_engine.stage_flops)
  built = onnx.runner.sessions_built
  rule = ExitCascade(0.6, 3, "max_prob")
  np.testing.assert_array_equal(_run_with(onnx, rule, data).exit_layers,
                                _run_with(exit_engine, rule, data).exit_layers)
  assert onnx.runner.sessions_built == built == 3
  with pytest.raises(ValueError, match="runs fp32 on XLA"):
    Engine(exit_engine.model, exit_engine.variables["params"], length_buckets=(8, 16),
               precision="bf16")
