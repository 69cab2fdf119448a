"""benchmarks/throughput.py on a tiny trained run: its reports and its values."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import assert_png, needs_glue, run_benchmark

pytestmark = needs_glue


def test_throughput_benchmark_writes_its_reports(trained, tmp_path):
  workdir, report = trained
  data, _ = run_benchmark("throughput", tmp_path, f"--workdir={workdir}", "--rounds=1",
                          "--limit=48", report="throughput", timeout=300)
  assert data["examples"] == 48
  assert set(data["paths"]) == {"SHARCS engine", "full width"}
  engine, full = data["paths"]["SHARCS engine"], data["paths"]["full width"]
  for path in (engine, full):
    assert path["examples_per_second"] == pytest.approx(48 / np.median(path["seconds"]))
  assert data["speedup"] == pytest.approx(engine["examples_per_second"] /
                                          full["examples_per_second"])
  # the same dev pairs the run reported on: both paths score them as training did
  assert engine["accuracy"] == pytest.approx(report["sharcs"]["accuracy"])
  assert full["accuracy"] == pytest.approx(report["full_width"]["accuracy"])
  assert data["flops_reduction"] == pytest.approx(report["sharcs"]["flops_reduction"], rel=1e-3)
  assert_png(tmp_path / "throughput.png")
  assert "examples/s" in (tmp_path / "throughput.md").read_text()


def test_throughput_benchmark_serves_a_cascade_at_bf16(trained, tmp_path):
  workdir, report = trained
  data, _ = run_benchmark("throughput", tmp_path, f"--workdir={workdir}", "--rounds=1",
                          "--limit=48", "--budget=1.2x", "--rule=cascade", "--precision=bf16",
                          report="throughput", timeout=300)
  assert data["precision"] == "bf16"
  assert (data["rule"]["rule"], data["rule"]["budget"]) == ("cascade", "1.2x")
  # FLOPs are counted on the float32 programs whatever the precision, so reductions compare
  assert data["paths"]["full width"]["gflops_per_example"] == pytest.approx(
      report["full_width"]["gflops"], rel=1e-3)
  assert set(data["cpu"]) >= {"model", "flags", "usable_cpus"}
  assert "bf16" in (tmp_path / "throughput.md").read_text()
