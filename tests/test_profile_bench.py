"""benchmarks/profile.py on a tiny trained run: every program call of a routed pass is timed and
counted, and the counts cover every input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO_ROOT

LIMIT = 48


@pytest.fixture(scope="module")
def profiled(trained, tmp_path_factory):
  workdir, _ = trained
  out = tmp_path_factory.mktemp("profile")
  result = subprocess.run(
      [sys.executable, "-m", "benchmarks.profile", f"--workdir={workdir}", f"--out={out}",
       f"--limit={LIMIT}", "--rounds=1", "--budget=1.1x", "--rule=cascade", "--precision=fp32",
       "--gemm_rows=64"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
  assert result.returncode == 0, result.stderr[-3000:]
  return out, json.loads((out / "profile.json").read_text())


def test_reports_are_written(profiled):
  out, data = profiled
  for suffix in ("json", "md", "png"):
    assert (out / f"profile.{suffix}").stat().st_size > 0
  assert data["examples"] == LIMIT and data["precision"] == "fp32"
  assert '"rule": "cascade"' in json.dumps(data["rule"])
  ceiling = data["matmul_ceiling_gflops_per_second"]
  assert len(ceiling) == 4  # Q/K/V, attention output, FFN in, FFN out
  for rates in ceiling.values():
    assert set(rates) == {"float32", "bfloat16", "int8"} and all(r > 0 for r in rates.values())


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
  assert sum(data["bucket_share"]) == pytest.approx(1.0)
  assert len(data["bucket_share"]) == len(data["length_buckets"])


def test_program_times_add_up_to_the_blocked_pass(profiled):
  _, data = profiled
  total = sum(p["seconds"] for p in data["programs"])
  assert total == pytest.approx(data["program_seconds"])
  assert 0 < total <= data["blocked_pass_seconds"]
  assert sum(p["share"] for p in data["programs"]) <= 1.0 + 1e-9
  # the padded programs do at least the FLOPs the engine counts for the inputs
  counted = data["gflops_per_example"] * data["examples"]
  assert sum(p["gflop_per_call"] * p["calls"] for p in data["programs"]) >= counted * (1 - 1e-6)
