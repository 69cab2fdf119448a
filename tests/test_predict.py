"""`--mode=predict` on a tiny trained run: TSV and JSONL in, labels out; bad inputs named."""

from __future__ import annotations

import json
import os

import pytest

from conftest import glue_data_dir, needs_glue
from sharcs_jax import report as report_lib
from sharcs_jax.serve import predict

pytestmark = needs_glue


def test_predict_mode_on_tsv_and_jsonl(trained, tmp_path):
  workdir, report = trained
  dev_tsv = glue_data_dir() / "QQP" / "dev.tsv"
  lines = dev_tsv.read_text(encoding="utf-8").splitlines()[:49]  # header + the 48 dev rows
  (tmp_path / "in.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  summary = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))
  rows = [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()]
  assert len(rows) == summary["examples"] == 48
  assert summary["accuracy"] == pytest.approx(report["sharcs"]["accuracy"])
  assert {r["label"] for r in rows} <= {"not_duplicate", "duplicate"}
  assert summary["flops_reduction"] == pytest.approx(report["sharcs"]["flops_reduction"], rel=1e-3)
  assert (tmp_path / "out.jsonl.summary.md").exists()

  header = lines[0].split("\t")
  items = [dict(zip(header, line.split("\t"))) for line in lines[1:]]
  with open(tmp_path / "in.jsonl", "w") as f:
    for item in items[:10]:
      f.write(json.dumps({"text": item["question1"], "text_pair": item["question2"]}) + "\n")
    f.write("\n")  # blank lines are allowed
  predict.run(str(workdir), str(tmp_path / "in.jsonl"), str(tmp_path / "out2.jsonl"))
  assert [json.loads(x) for x in (tmp_path / "out2.jsonl").read_text().splitlines()] == rows[:10]


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", "id\tquestion1\tquestion2\n1\tonly two\n", r"bad.tsv:2: 2 fields, expected 3"),
    ("bad.tsv", "id\tquestion\n1\tq\n", r"lacks the qqp text columns"),
    ("bad.jsonl", '{"question1": "a", "question2": "b"}\n{"question1": "a"}\n',
     r"bad.jsonl:2: qqp needs keys \['question1', 'question2'\]"),
    ("bad.jsonl", '{"text": "a", "text_pair": "b"}\n{oops\n', r"bad.jsonl:2: not valid JSON"),
    ("bad.jsonl", '{"text": "a", "text_pair": "b", "label": "maybe"}\n', r"label 'maybe'"),
    ("bad.csv", "a,b\n", r"unknown input format"),
])
def test_predict_mode_bad_inputs(trained, tmp_path, name, content, message):
  workdir, _ = trained
  (tmp_path / name).write_text(content)
  with pytest.raises(ValueError, match=message):
    predict.run(str(workdir), str(tmp_path / name), str(tmp_path / "out.jsonl"))
  assert not (tmp_path / "out.jsonl").exists()


def test_predict_mode_needs_a_trained_workdir(tmp_path):
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n")
  with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
    predict.run(str(tmp_path), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))


def test_predict_never_overwrites_its_input(trained, tmp_path):
  workdir, _ = trained
  text = "question1\tquestion2\nHow do I learn JAX?\tWhat is JAX?\n"
  (tmp_path / "in.tsv").write_text(text)
  (tmp_path / "link.tsv").symlink_to(tmp_path / "in.tsv")
  for output in ("in.tsv", "link.tsv", "in.tsv/../in.tsv"):
    with pytest.raises(ValueError, match="would overwrite the input"):
      predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / output))
  assert (tmp_path / "in.tsv").read_text() == text


def test_predict_outputs_have_the_ordinary_mode(trained, tmp_path):
  workdir, _ = trained
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n")
  old = os.umask(0o022)
  try:
    predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))
  finally:
    os.umask(old)
  for name in ("out.jsonl", "out.jsonl.summary.json", "out.jsonl.summary.md"):
    assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
  assert (workdir / "report.json").stat().st_mode & 0o777 == 0o666 & ~report_lib.umask()


@pytest.mark.parametrize("name, content", [
    ("empty.jsonl", ""), ("blank.jsonl", "\n\n"), ("header.tsv", "id\tquestion1\tquestion2\n")])
def test_predict_on_no_inputs(trained, tmp_path, name, content):
  workdir, _ = trained
  (tmp_path / name).write_text(content)
  summary = predict.run(str(workdir), str(tmp_path / name), str(tmp_path / "out.jsonl"))
  assert summary["examples"] == 0
  assert (tmp_path / "out.jsonl").read_text() == ""
  saved = json.loads((tmp_path / "out.jsonl.summary.json").read_text(),
                     parse_constant=lambda c: pytest.fail(f"summary holds {c}"))
  assert saved["examples"] == 0 and set(saved["share_per_width"].values()) == {0.0}


def test_predict_skips_blank_tsv_lines(trained, tmp_path):
  workdir, _ = trained
  (tmp_path / "in.tsv").write_text("question1\tquestion2\na\tb\n\n   \nc\td\n")
  summary = predict.run(str(workdir), str(tmp_path / "in.tsv"), str(tmp_path / "out.jsonl"))
  assert summary["examples"] == 2
  assert [json.loads(x)["index"] for x in (tmp_path / "out.jsonl").read_text().splitlines()] == [
      0, 1]


@pytest.mark.parametrize("name, content, message", [
    ("bad.tsv", b"question1\tquestion2\na\tb\nca\xffe\td\n", r"bad.tsv:3: byte 0xff at column 3 "
     "is not UTF-8"),
    ("bad.jsonl", b'{"text": "a", "text_pair": "b"}\n{"text": "\xe9", "text_pair": "b"}\n',
     r"bad.jsonl:2: byte 0xe9 at column 11 is not UTF-8"),
])
def test_predict_names_a_non_utf8_line(trained, tmp_path, name, content, message):
  (tmp_path / name).write_bytes(content)
  with pytest.raises(ValueError, match=message):
    predict.run(str(trained[0]), str(tmp_path / name), str(tmp_path / "out.jsonl"))


@needs_glue
@pytest.mark.parametrize("budget, message", [
    ("100x", "FATAL budget 100x is out of reach: this cascade reaches reductions from"),
    ("fast", "FATAL budget 'fast': expected a reduction factor such as '2x'")])
def test_a_bad_budget_is_one_line_without_a_traceback(trained, tmp_path, budget, message):
  import subprocess
  import sys

  from conftest import REPO_ROOT

  lines = (glue_data_dir() / "QQP" / "dev.tsv").read_text(encoding="utf-8").splitlines()[:5]
  (tmp_path / "in.tsv").write_text("\n".join(lines) + "\n", encoding="utf-8")
  result = subprocess.run(
      [sys.executable, "-m", "sharcs_jax.main", "--mode=predict", f"--workdir={trained[0]}",
       f"--input={tmp_path / 'in.tsv'}", f"--output={tmp_path / 'out.jsonl'}",
       f"--budget={budget}", "--rule=cascade"], capture_output=True, text=True, timeout=300,
      cwd=REPO_ROOT)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
  assert result.stderr.strip().splitlines()[-1].startswith(message), result.stderr[-3000:]
  assert not (tmp_path / "out.jsonl").exists()
