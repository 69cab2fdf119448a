"""benchmarks/pareto.py on a tiny trained run: every budget met on its calibration split."""

from __future__ import annotations

import pytest

from conftest import assert_png, needs_glue, run_benchmark

pytestmark = needs_glue


def test_pareto_benchmark_meets_its_budgets(trained, tmp_path):
  workdir, report = trained
  assert report["sharcs"]["routing"]["budget"] == "1.1x"
  assert report["routing"]["calibration_examples"] == 32 and report["train_examples"] == 64
  data, _ = run_benchmark("pareto", tmp_path, f"--workdir={workdir}", "--rounds=1",
                          "--limit=48", "--budgets=1x,1.1x,max,9x", report="pareto_qqp",
                          timeout=300)
  met = {b["budget"]: b for b in data["budgets"]}
  assert met["1x"]["calibration_reduction"] == pytest.approx(1.0)
  assert 1.1 <= met["1.1x"]["calibration_reduction"] <= 1.1 * 1.05
  assert met["max"]["calibration_reduction"] == pytest.approx(data["reachable_reductions"][1])
  assert "out of reach" in met["9x"]["error"] and "error" not in met["1.1x"]
  assert met["1.1x"]["dev"]["flops_reduction"] > 1
  assert_png(tmp_path / "pareto_qqp.png")
