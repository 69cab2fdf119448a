"""The ONNX Runtime runtime: each program equals its XLA twin, int8 keeps what a trained model
learnt, the engine serves without building sessions, the ONNX export loads without jax, and a
runtime or precision that cannot run is one clear error."""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import optax
import pytest

from conftest import REPO_ROOT, damaged_copy, export_and_compare, needs_glue
from sharcs_jax.data.batching import Encoded
from sharcs_jax.data.padding import length_bucket_of, length_mask
from sharcs_jax.serve import dispatch, precision, routing
from sharcs_jax.serve.onnx import graph as onnx_graph
from sharcs_jax.serve.onnx import runner as ort_runner
from sharcs_jax.serve.engine import Engine
from sharcs_jax.serve.export.loader import ExportedModel
from sharcs_jax.serve.onnx.programs import OnnxPrograms
from sharcs_jax.serve.programs import functions

LENGTHS = (8, 16)


def _rows(n: int, seed: int, length: int = 16) -> tuple[np.ndarray, np.ndarray]:
  """Random token ids [n, length] and lengths [n] (ids 0 past each row's length)."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, length + 1, n).astype(np.int32)
  ids = np.where(np.arange(length)[None] < lengths[:, None], rng.integers(5, 50, (n, length)), 0)
  return ids.astype(np.int32), lengths


@pytest.fixture(scope="module", params=["fp32", "int8"])
def onnx_programs(request, tiny_model, tiny_params, tmp_path_factory):
  return OnnxPrograms(tiny_model, tiny_params, precision=request.param,
                      cache_dir=str(tmp_path_factory.mktemp("onnx")))


def test_each_program_equals_xla(onnx_programs, tiny_model, tiny_params):
  """fp32 within 1e-4 of the XLA functions (probabilities, router logits, hidden states) at
  every length (one model takes any); int8 within what 8-bit weights and activations allow on a
  random model."""
  tolerance = 1e-4 if onnx_programs.precision == "fp32" else 5e-2
  runner, function = onnx_programs.runner(), functions(tiny_model)
  variables = {"params": tiny_params}
  for length in (*LENGTHS, 11):
    ids, lengths = _rows(5, length, length)
    mask, types = length_mask(lengths, length), np.zeros_like(ids)
    hidden, router = runner.prefix(5, length, ids, mask, types)
    want_hidden, want_router = function["prefix"](variables, ids, mask, types)
    assert np.abs(router - want_router).max() <= tolerance
    assert np.abs(hidden - want_hidden).max() <= (1e-4 if tolerance == 1e-4 else 0.5)
    for i, width in enumerate(tiny_model.widths):
      want = function["adaptive"](variables, want_hidden, mask, width=width)
      assert np.abs(runner.part(i, 5, length, np.asarray(want_hidden), mask) - want).max() \
          <= tolerance, (width, length)


def test_full_width_model_equals_xla_forward(onnx_programs, tiny_model, tiny_params):
  """The whole model at width 1.0 as one ONNX program: the XLA forward program's probabilities
  (within the precision's tolerance), converting only that model beside the stored ones."""
  tolerance = 1e-4 if onnx_programs.precision == "fp32" else 5e-2
  programs = OnnxPrograms(tiny_model, tiny_params, precision=onnx_programs.precision,
                          cache_dir=os.path.dirname(onnx_programs.directory), full_width=True)
  assert (programs.converted, programs.loaded) == (1, len(onnx_programs.paths))
  ops = onnx_graph.op_counts(onnx.load(programs.paths[programs.keys[-1]]))
  assert "Einsum" not in ops and "Gemm" not in ops, ops
  assert ("MatMulInteger" in ops) == (onnx_programs.precision == "int8"), ops
  call = programs.full_width_call()
  for length in (*LENGTHS, 11):
    ids, lengths = _rows(5, length, length)
    mask, types = length_mask(lengths, length), np.zeros_like(ids)
    want = functions(tiny_model)["forward"]({"params": tiny_params}, ids, mask, types, width=1.0)
    assert np.abs(call(5, length, ids, mask, types) - want).max() <= tolerance, length
  with pytest.raises(ValueError, match="converted without the full-width model"):
    onnx_programs.full_width_call()


def test_dense_layers_are_matmuls_and_int8_quantises_them(onnx_programs):
  for key, path in onnx_programs.paths.items():
    ops = onnx_graph.op_counts(onnx.load(path))
    assert "Einsum" not in ops and "Gemm" not in ops, (key, ops)
    # The packed Q/K/V projection is split (the one slice left keeps a narrow part's leading
    # channels), LayerNorms and GELUs are single nodes.
    layers = 2
    assert not {"Erf", "ReduceMean", "Sqrt"} & set(ops), (key, ops)
    assert ops.get("Slice", 0) == (0 if key.width in (None, 1.0) else 1), (key, ops)
    assert ops["LayerNormalization"] >= 2 * layers and ops["Gelu"] == layers, (key, ops)
    if onnx_programs.precision == "int8":
      # Every dense layer (Q, K, V, the attention output and the two feed-forward ones per
      # encoder layer; the router's or the head's two) is an int8 matmul; the float MatMuls left
      # are attention's two activation products per layer.
      assert ops.get("MatMulInteger", 0) == 6 * layers + 2, (key, ops)
      assert ops.get("MatMul", 0) == 2 * layers, (key, ops)
    else:
      assert "MatMulInteger" not in ops


def test_lowering_keeps_any_einsum_it_cannot_lower():
  """A contraction with batch letters in both operands and a constant weight stays an Einsum."""
  weight = onnx.numpy_helper.from_array(np.ones((2, 3, 4), np.float32), "w")
  node = onnx.helper.make_node("Einsum", ["x", "w"], ["y"], equation="bij,bjk->bik")
  graph = onnx.helper.make_graph(
      [node], "g", [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 5, 3])],
      [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 5, 4])], [weight])
  lowered = onnx_graph.lower_to_matmul(onnx.helper.make_model(graph))
  assert onnx_graph.op_counts(lowered) == {"Einsum": 1}


@pytest.fixture(scope="module")
def taught(tiny_model, tiny_params):
  """The tiny model trained until every width has learnt a rule (the class is the first real
  token's id mod 3), so that int8 has accuracy to lose: (params, held-out ids, lengths, labels)."""
  ids, lengths = _rows(4096, seed=3)
  labels = ids[:, 1] % 3
  mask = length_mask(lengths, 16)
  optimizer = optax.adam(3e-3)

  def loss(params, ids, mask, labels):
    total = 0.0
    for width in tiny_model.widths:
      logits = tiny_model.apply({"params": params}, ids, mask, jnp.zeros_like(ids),
                                width=width).logits
      total += optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return total

  @jax.jit
  def step(params, state, ids, mask, labels):
    grads = jax.grad(loss)(params, ids, mask, labels)
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state

  params, state = tiny_params, optimizer.init(tiny_params)
  for i in range(400):
    rows = slice((i * 64) % 3072, (i * 64) % 3072 + 64)
    params, state = step(params, state, ids[rows], mask[rows], labels[rows])
  return params, ids[3072:], lengths[3072:], labels[3072:]


def _accuracy(runner, tiny_model, ids, lengths, labels, width_index):
  out = dispatch.run_buckets(runner, ids, np.zeros_like(ids), lengths, length_buckets=LENGTHS,
                             batch_buckets=dispatch.batch_sizes_for("onnxruntime"),
                             program_lengths=dispatch.lengths_for("onnxruntime", LENGTHS),
                             num_widths=len(tiny_model.widths),
                             num_classes=3, rule=routing.Fixed(width_index),
                             width_flops=np.ones((3, 2)), prefix_flops=np.zeros(2))
  return float(np.mean(out.probabilities.argmax(-1) == labels))


@pytest.mark.slow
def test_int8_keeps_what_the_model_learnt(taught, tiny_model, tmp_path):
  params, ids, lengths, labels = taught
  prior = max(np.mean(labels == c) for c in range(3))
  fp32 = OnnxPrograms(tiny_model, params, precision="fp32",
                      cache_dir=str(tmp_path)).runner()
  int8 = OnnxPrograms(tiny_model, params, precision="int8",
                      cache_dir=str(tmp_path)).runner()
  for width_index in range(3):
    at_fp32 = _accuracy(fp32, tiny_model, ids, lengths, labels, width_index)
    at_int8 = _accuracy(int8, tiny_model, ids, lengths, labels, width_index)
    assert at_fp32 >= prior + 0.3, (width_index, at_fp32, prior)  # the model did learn
    assert at_int8 >= prior + 0.3 and at_int8 >= at_fp32 - 0.05, (width_index, at_int8, at_fp32)


def _encoded(n: int, seed: int) -> Encoded:
  ids, lengths = _rows(n, seed)
  return Encoded(ids, np.zeros_like(ids), lengths, np.zeros(n, np.int32),
                 np.arange(n, dtype=np.int32), length_bucket_of(lengths, LENGTHS), LENGTHS)


@pytest.fixture(scope="module")
def engines(tiny_model, tiny_params, tmp_path_factory):
  """The XLA engine and the ONNX Runtime fp32 engine of one model, budget rule at 1.5x."""
  cache = str(tmp_path_factory.mktemp("engines"))
  xla = Engine(tiny_model, tiny_params, length_buckets=LENGTHS, batch_buckets=(1, 8),
               cache_dir=cache)
  ort = Engine(tiny_model, tiny_params, length_buckets=LENGTHS, batch_buckets=(1, 8),
               cache_dir=cache, runtime="onnxruntime", precision="fp32")
  calibration = _encoded(64, seed=7)
  for engine in (xla, ort):
    engine.rule = engine.calibrate("1.5x", calibration, "cascade")
  return xla, ort


def test_ort_engine_gives_the_xla_engines_labels(engines):
  xla, ort = engines
  assert ort.rule.threshold == pytest.approx(xla.rule.threshold, abs=1e-3)  # calibrated on ORT
  data = _encoded(61, seed=8)
  a, b = xla.run(data), ort.run(data)
  assert np.mean(a.labels == b.labels) == 1.0 and (a.widths == b.widths).all()
  assert np.abs(a.probabilities - b.probabilities).max() <= 1e-4
  np.testing.assert_allclose(a.gflops, b.gflops)  # FLOPs: the XLA cost-analysis table for both


def test_ort_engine_builds_no_session_while_serving(engines, monkeypatch):
  _, ort = engines
  import onnxruntime

  built = ort.runner.sessions_built
  assert built == 1 + len(ort.widths)  # the prefix and each width, at any length

  def refuse(*args, **kwargs):
    raise AssertionError("a session was built while serving")
  monkeypatch.setattr(onnxruntime, "InferenceSession", refuse)
  out = ort.run(_encoded(40, seed=9))
  assert len(out.labels) == 40 and ort.runner.sessions_built == built


def test_restart_converts_nothing(tiny_model, tiny_params, tmp_path):
  first = OnnxPrograms(tiny_model, tiny_params, precision="fp32",
                       cache_dir=str(tmp_path))
  again = OnnxPrograms(tiny_model, tiny_params, precision="fp32",
                       cache_dir=str(tmp_path))
  assert (first.converted, first.loaded) == (4, 0) and (again.converted, again.loaded) == (0, 4)
  other = jax.tree_util.tree_map(lambda x: x + 1e-3, tiny_params)
  changed = OnnxPrograms(tiny_model, other, precision="fp32",
                         cache_dir=str(tmp_path))
  assert changed.converted == 4 and changed.directory != first.directory  # weights are inside


@pytest.mark.parametrize("requested, runtime, flags, expected", [
    ("auto", "onnxruntime", {"avx512_vnni", "avx2"}, "int8"),
    ("auto", "onnxruntime", {"avx2"}, "int8"),
    ("auto", "onnxruntime", set(), "fp32"),
    ("int8", "onnxruntime", set(), "int8"),
    ("auto", "xla", {"avx512_vnni"}, "fp32"),
])
def test_resolve_per_runtime(requested, runtime, flags, expected):
  assert precision.resolve(requested, "cpu", frozenset(flags), runtime) == expected


def test_reduce_range_only_without_vnni():
  assert precision.int8_reduce_range(frozenset({"avx2"}))
  assert not precision.int8_reduce_range(frozenset({"avx2", "avx512_vnni"}))
  assert not precision.int8_reduce_range(frozenset({"avx2", "avx_vnni"}))


@pytest.mark.parametrize("requested, runtime, message", [
    ("int8", "xla", "precision 'int8' is not one of .* for runtime 'xla' .int8 runs on runtime "
                    "'onnxruntime'"),
    ("bf16", "onnxruntime", "precision 'bf16' is not one of .* for runtime 'onnxruntime' .bf16 "
                            "runs on runtime 'xla'"),
    ("fp32", "tensorrt", "runtime 'tensorrt' is not one of"),
])
def test_runtime_and_precision_errors(requested, runtime, message):
  with pytest.raises(ValueError, match=message):
    precision.resolve(requested, "cpu", frozenset(), runtime)


def test_missing_onnxruntime_names_the_extra(monkeypatch):
  monkeypatch.setitem(sys.modules, "onnxruntime", None)
  with pytest.raises(ort_runner.MissingExtra, match="install the 'serve' extra"):
    ort_runner.import_onnxruntime()


def test_cli_refuses_a_precision_the_runtime_cannot_run(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", "--mode=predict", f"--workdir={tmp_path}",
       f"--input={tmp_path / 'in.tsv'}", f"--output={tmp_path / 'out.jsonl'}",
       "--precision=int8"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
  assert result.returncode == 1
  assert "Traceback" not in result.stderr
  assert result.stderr.strip().splitlines()[-1] == (
      "FATAL --precision=int8 --runtime=xla: precision 'int8' is not one of ('auto', 'fp32', "
      "'bf16') for runtime 'xla' (int8 runs on runtime 'onnxruntime')")


@pytest.fixture(scope="module")
def onnx_export(trained, tmp_path_factory):
  """(export directory, parity with the engine) of the tiny run exported at int8."""
  return export_and_compare(trained[0], tmp_path_factory.mktemp("onnx_export"),
                            runtime="onnxruntime", precision="int8")


@needs_glue
def test_onnx_export_serves_without_jax(onnx_export):
  """Exported at int8 and loaded in a process where `import jax` fails: the engine's labels."""
  _, data = onnx_export
  assert data["imports_blocked_in_loader"] == ["jax", "jaxlib"]
  assert data["forbidden_modules_imported"] == []
  assert (data["runtime"], data["precision"]) == ("onnxruntime", "int8")
  assert data["labels_equal"] == 1.0 and data["routes_equal"] == 1.0
  assert data["max_probability_difference"] <= 1e-5
  assert "params.npz" not in data["files"] and "prefix.onnx" in data["files"]
  # One part per program, the large weights in weights.bin: the embedding table (30522 x 32
  # float32, 3.9 MB) is there and not in the prefix's file.
  directory = pathlib.Path(onnx_export[0])
  assert "weights.bin" in data["files"]
  assert sorted(f.name for f in directory.glob("*.onnx")) == [
      "adaptive_0.25.onnx", "adaptive_0.5.onnx", "adaptive_1.onnx", "prefix.onnx"]
  assert (directory / "prefix.onnx").stat().st_size < 1e6
  assert 3.9e6 < (directory / "weights.bin").stat().st_size < 2 * 3.9e6 + 3e6
  assert not any(f.endswith(".jaxexport") for f in data["files"])


def _swap_parts(manifest, a, b):
  manifest["parts"][a], manifest["parts"][b] = manifest["parts"][b], manifest["parts"][a]


@needs_glue
@pytest.mark.parametrize("change, error, message", [
    (lambda d, m: (d / "adaptive_1.onnx").unlink(), FileNotFoundError,
     r"part 'adaptive_1' \(adaptive_1.onnx\) is missing"),
    (lambda d, m: _swap_parts(m, "prefix", "adaptive_1"), ValueError,
     r"part 'prefix' takes inputs \['hidden', 'attention_mask'\], expected \['input_ids', "),
    (lambda d, m: m.update(hidden_size=48), ValueError,
     "part 'prefix' has hidden size 32, the manifest says 48"),
    (lambda d, m: m.update(label_names=["a", "b", "c"]), ValueError,
     "scores 2 classes, the manifest names 3"),
    (lambda d, m: m.update(runtime="tensorrt"), ValueError,
     "runtime 'tensorrt' is not 'jax' or 'onnxruntime'"),
    (lambda d, m: m.pop("precision"), ValueError,
     r"keys \['precision'\] are missing \(runtime 'onnxruntime'\)"),
    (lambda d, m: m.update(widths=[0.5, 1.0]), ValueError,
     "the manifest lists parts .* but its widths .* need"),
    (lambda d, m: (d / "prefix.onnx").write_bytes(b"not onnx"), ValueError,
     "do not match the manifest's SHA-256 for 'prefix'"),
    (lambda d, m: (d / "weights.bin").write_bytes(b"\0" * 64), ValueError,
     "weights.bin: contents do not match the manifest's SHA-256 for 'shared weights'"),
    (lambda d, m: m.pop("shared_weights"), ValueError,
     r"keys \['shared_weights'\] are missing \(runtime 'onnxruntime'\)"),
])
def test_damaged_onnx_exports_are_refused(onnx_export, tmp_path, change, error, message):
  with pytest.raises(error, match=message):
    ExportedModel.load(damaged_copy(onnx_export[0], tmp_path, change))
