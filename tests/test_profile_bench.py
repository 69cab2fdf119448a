"""benchmarks/profile.py on a tiny trained run: every program call of a routed pass is timed and
counted, and the counts cover every input."""

from __future__ import annotations

import json

import pytest

from conftest import assert_png, run_benchmark

LIMIT = 48


@pytest.fixture(scope="module", params=["xla:fp32", "onnxruntime:int8"])
def profiled(request, trained, tmp_path_factory):
  """XLA runs at its buckets; ONNX Runtime at any batch and length (its calls grouped)."""
  workdir, _ = trained
  runtime, precision = request.param.split(":")
  out = tmp_path_factory.mktemp("profile")
  data, _ = run_benchmark("profile", out, f"--workdir={workdir}", f"--limit={LIMIT}",
                          "--rounds=1", "--budget=1.1x", "--rule=cascade",
                          f"--runtime={runtime}", f"--precision={precision}",
                          "--gemm_rows=64", report="profile")
  return out, data


def test_reports_are_written(profiled):
  out, data = profiled
  assert_png(out / "profile.png")
  table = (out / "profile.md").read_text()
  for p in data["programs"]:  # one row per program called, with its call count
    width = "" if p["width"] is None else f"{p['width']:.4g}"
    assert f"| {p['kind']} | {width} | {p['batch']} | {p['length']} | {p['calls']} |" in table
  assert data["examples"] == LIMIT and data["precision"] in ("fp32", "int8")
  keys = [(p["kind"], p["width"], p["batch"], p["length"]) for p in data["programs"]]
  assert len(keys) == len(set(keys))  # one row per program at a batch and length bucket
  assert {p["length"] for p in data["programs"]} <= set(data["length_buckets"])
  assert '"rule": "cascade"' in json.dumps(data["rule"])
  ceiling = data["matmul_ceiling_gflops_per_second"]
  assert len(ceiling) == 4  # Q/K/V, attention output, FFN in, FFN out
  for rates in ceiling.values():
    # GFLOP/s (GOP/s for int8), between 0.01 and 10^5: a slip of units (FLOP/s, milliseconds)
    # lands 1000x or more outside. The tiny products run near 1 on a loaded AVX2 core (0.96 at
    # fp32, 0.84 at int8, emulated without VNNI), so the floor sits well under that
    assert set(rates) == {"float32", "bfloat16", "int8"}
    assert all(0.01 < r < 1e5 for r in rates.values()), rates


def test_every_input_runs_the_prefix_and_the_narrowest_width(profiled):
  _, data = profiled
  programs = data["programs"]
  narrowest = min(p["width"] for p in programs if p["kind"] == "adaptive")

  def rows(kind, width=None):
    return sum(p["calls"] * p["batch"] for p in programs
               if p["kind"] == kind and (width is None or p["width"] == width))

  # padding rows fill batch buckets, so the rows run are at least the inputs, never fewer
  assert rows("prefix") >= LIMIT
  assert rows("adaptive", narrowest) >= LIMIT  # the cascade starts every input there
  assert sum(data["share_per_length_bucket"]) == pytest.approx(1.0)
  assert len(data["share_per_length_bucket"]) == len(data["length_buckets"])


def test_program_times_add_up_to_the_blocked_pass(profiled):
  _, data = profiled
  total = sum(p["seconds"] for p in data["programs"])
  assert total == pytest.approx(data["program_seconds"])
  assert 0 < total <= data["blocked_pass_seconds"]
  assert sum(p["share"] for p in data["programs"]) <= 1.0 + 1e-9
  # the padded programs do at least the FLOPs the engine counts for the inputs
  counted = data["gflops_per_example"] * data["examples"]
  assert sum(p["gflop_per_call"] * p["calls"] for p in data["programs"]) >= counted * (1 - 1e-6)
