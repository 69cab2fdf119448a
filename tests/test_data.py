"""GLUE loading (TSV layout, clear errors on malformed rows) and static-shape batching."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO_ROOT, glue_data_dir
from sharcs_jax.data import batching, glue
from sharcs_jax.data.padding import length_bucket_of
from sharcs_jax.model.weights import resolve_model_dir


@pytest.fixture(scope="module")
def tokenizer():
  return batching.load_tokenizer(resolve_model_dir("all-MiniLM-L6-v2"))


def _write(tmp_path, task, text, name="train.tsv"):
  folder = tmp_path / glue.get_task(task).directory
  folder.mkdir(exist_ok=True)
  (folder / name).write_text(text)
  return tmp_path


@pytest.mark.skipif(glue_data_dir() is None, reason="needs the local GLUE copy (network otherwise)")
@pytest.mark.parametrize("task, split", [("qqp", "dev"), ("mrpc", "dev"), ("sst2", "dev"),
                                         ("rte", "dev"), ("mnli", "dev"), ("qnli", "dev")])
def test_real_splits_load(task, split):
  """Every data row of the file (one per line: GLUE TSV has no quoting), whatever the copy holds:
  a local subset or the full task."""
  spec = glue.get_task(task)
  with open(glue_data_dir() / spec.directory / spec.files[split], encoding="utf-8") as f:
    rows = sum(1 for line in f if line.strip()) - 1  # less the header
  data = glue.load_split(task, split, str(glue_data_dir()))
  assert len(data) == rows and data.skipped == 0
  assert list(data.ids[:3]) == [0, 1, 2]
  assert set(np.unique(data.labels)) == set(range(data.task.num_classes))
  assert all(len(t) == len(data.task.text_columns) for t in data.texts[:5])


def test_raw_quotes_are_kept(tmp_path):
  _write(tmp_path, "qqp", 'id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n'
                          '1\t2\t3\tWhat is "AI""?\tIs "AI" hard?\t1\n')
  data = glue.load_split("qqp", "train", str(tmp_path))
  assert data.texts == [('What is "AI""?', 'Is "AI" hard?')]


def test_malformed_row_names_file_and_line(tmp_path):
  _write(tmp_path, "sst2", "sentence\tlabel\ngood\t1\nbad row without label\nfine\t0\n")
  with pytest.raises(ValueError, match=r"SST-2/train\.tsv:3: 1 fields, expected 2"):
    glue.load_split("sst2", "train", str(tmp_path))
  data = glue.load_split("sst2", "train", str(tmp_path), skip_malformed=True)
  assert (len(data), data.skipped) == (2, 1)
  assert list(data.ids) == [0, 1]


def test_unknown_label_and_missing_column(tmp_path):
  _write(tmp_path, "sst2", "sentence\tlabel\ngood\tmaybe\n")
  with pytest.raises(ValueError, match=r"train\.tsv:2: label 'maybe' is not one of \['0', '1'\]"):
    glue.load_split("sst2", "train", str(tmp_path))
  _write(tmp_path, "sst2", "text\tlabel\ngood\t1\n")
  with pytest.raises(ValueError, match=r"header lacks column\(s\) \['sentence'\]"):
    glue.load_split("sst2", "train", str(tmp_path))


def test_missing_files_and_directories(tmp_path, monkeypatch):
  with pytest.raises(FileNotFoundError, match=r"qqp train split: .*QQP/train\.tsv does not exist"):
    glue.load_split("qqp", "train", str(tmp_path))
  with pytest.raises(FileNotFoundError, match=r"'/no/glue' \(from config\.data_dir\) does not exist"):
    glue.resolve_data_dir("/no/glue")
  monkeypatch.setenv(glue.DATA_DIR_ENV, "/no/env/glue")
  with pytest.raises(FileNotFoundError, match=r"\$SHARCS_DATA_DIR"):
    glue.resolve_data_dir("")
  with pytest.raises(ValueError, match="unknown task 'cola'"):
    glue.get_task("cola")


def test_encode_buckets_and_truncates(tokenizer, tmp_path):
  long = " ".join(["word"] * 100)
  _write(tmp_path, "mrpc", "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String\n"
                           f"1\t1\t2\tshort one\tshort two\n0\t3\t4\t{long}\t{long}\n"
                           "1\t5\t6\t\tempty first\n")
  data = batching.encode(glue.load_split("mrpc", "train", str(tmp_path)), tokenizer, (8, 16))
  assert data.input_ids.shape == (3, 16)
  assert list(data.bucket_of) == [0, 1, 0]
  assert data.lengths[1] == 16  # truncated to the last bucket
  assert data.input_ids[0, 0] == tokenizer.cls_token_id
  assert set(data.token_type_ids[0, :data.lengths[0]]) == {0, 1}


def _encoded(n=50, buckets=(8, 16)):
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 17, n).astype(np.int32)
  ids = np.where(np.arange(16)[None] < lengths[:, None], rng.integers(5, 100, (n, 16)), 0)
  return batching.Encoded(ids.astype(np.int32), np.zeros((n, 16), np.int32), lengths,
                          rng.integers(0, 2, n).astype(np.int32), np.arange(n, dtype=np.int32),
                          length_bucket_of(lengths, buckets), buckets)


def test_make_batch_pads_with_dummy_rows():
  data = _encoded()
  rows = np.flatnonzero(data.bucket_of == 0)[:3]
  batch = batching.make_batch(data, rows, 0, 4)
  assert batch["input_ids"].shape == (4, 8)
  np.testing.assert_array_equal(batch["weight"], [1, 1, 1, 0])
  np.testing.assert_array_equal(batch["id"], list(rows) + [50])
  np.testing.assert_array_equal(batch["attention_mask"].sum(1)[:3], data.lengths[rows])
  with pytest.raises(ValueError, match="do not fit a batch of 2"):
    batching.make_batch(data, rows, 0, 2)


def test_epoch_plan_trains_every_width_every_round():
  data = _encoded(200)
  rng = np.random.default_rng(1)
  widths = np.where(rng.random(200) < 0.8, 0, rng.integers(1, 3, 200)).astype(np.int32)
  plan = batching.plan_train_epoch(data, widths, 16, np.random.default_rng(2))
  rows = np.concatenate([p.rows for p in plan])
  assert set(rows.tolist()) == set(range(200))  # every example at least once
  for p in plan:
    assert 0 < len(p.rows) <= 16
    assert set(widths[p.rows]) == {p.width_index}
    assert set(data.bucket_of[p.rows]) == {p.bucket}
  # Rounds of one batch per width; the rare widths repeat, the common one is used once.
  assert [p.width_index for p in plan] == [0, 1, 2] * (len(plan) // 3)
  common = np.concatenate([p.rows for p in plan if p.width_index == 0])
  assert sorted(common.tolist()) == np.flatnonzero(widths == 0).tolist()
  rare = np.concatenate([p.rows for p in plan if p.width_index == 2])
  assert len(rare) > 2 * np.sum(widths == 2)
  again = batching.plan_train_epoch(data, widths, 16, np.random.default_rng(2))
  assert all((a.rows == b.rows).all() for a, b in zip(plan, again))


def test_epoch_plan_with_one_width_is_one_pass():
  data = _encoded(50)
  plan = batching.plan_train_epoch(data, np.zeros(50, np.int32), 16, np.random.default_rng(0))
  rows = np.concatenate([p.rows for p in plan])
  assert sorted(rows.tolist()) == list(range(50))


def test_hold_out_is_disjoint_deterministic_and_renumbered():
  task = glue.get_task("sst2")
  texts = [(f"sentence {i}",) for i in range(50)]
  split = glue.Split(task, "train", texts, np.arange(50, dtype=np.int32) % 2,
                     np.arange(50, dtype=np.int32))
  rest, held = glue.hold_out(split, 10, seed=3)
  assert (len(rest), len(held)) == (40, 10)
  assert not set(rest.texts) & set(held.texts)
  assert sorted(rest.texts + held.texts) == sorted(texts)
  np.testing.assert_array_equal(rest.ids, np.arange(40))  # the hardness state is indexed by id
  np.testing.assert_array_equal(held.ids, np.arange(10))
  assert [int(t[0].split()[1]) % 2 for t in held.texts] == held.labels.tolist()
  assert glue.hold_out(split, 10, seed=3)[1].texts == held.texts
  assert glue.hold_out(split, 10, seed=4)[1].texts != held.texts
  with pytest.raises(ValueError, match="cannot hold out 50 of the 50 sst2 train examples"):
    glue.hold_out(split, 50, seed=0)


def test_whole_sentences_and_the_phrases_inside_them():
  texts = ["a charming journey .", "charming journey", "a charming", "journey", "bleak",
           "bleak and desperate", "a charming journey .", "desperate", "", "charming jour"]
  np.testing.assert_array_equal(glue.whole_sentences(texts),
                                [1, 0, 0, 0, 0, 1, 0, 0, 0, 1])  # whole tokens only
  np.testing.assert_array_equal(glue.contained(texts, ["bleak and desperate"]),
                                [0, 0, 0, 0, 1, 1, 0, 1, 0, 0])


def test_sentences_held_out_with_none_of_their_phrases_trained_on():
  """Whole sentences of the training file (which may lie beyond a limited split's rows) are
  held out, and every row inside one of them leaves the training split."""
  task = glue.get_task("sst2")
  sentences = [f"w{i} x{i} y{i} z{i}" for i in range(30)]
  texts = [(t,) for s in sentences for t in (s, s.rsplit(" ", 1)[0], s.split(" ", 1)[1])]
  whole_file = glue.Split(task, "train", texts, np.arange(90, dtype=np.int32) % 2,
                          np.arange(90, dtype=np.int32))
  limited = glue.Split(task, "train", texts[:60], whole_file.labels[:60],
                       np.arange(60, dtype=np.int32))
  rest, held = glue.hold_out_sentences(limited, whole_file, 12, seed=1)
  assert len(held) == 12 and {t[0] for t in held.texts} <= set(sentences)
  assert not any(t[0] in h[0] for t in rest.texts for h in held.texts)
  beyond = sum(sentences.index(h[0]) >= 20 for h in held.texts)  # sentences past row 60
  assert len(rest) == 60 - 3 * (12 - beyond)
  np.testing.assert_array_equal(rest.ids, np.arange(len(rest)))
  assert glue.hold_out_sentences(limited, whole_file, 12, seed=1)[1].texts == held.texts
  with pytest.raises(ValueError, match="cannot hold out 30 of the 30 whole sentences"):
    glue.hold_out_sentences(limited, whole_file, 30, seed=0)
  pairs = glue.Split(glue.get_task("qqp"), "train", [("a", "b")], np.zeros(1, np.int32),
                     np.zeros(1, np.int32))
  with pytest.raises(ValueError, match="one-text tasks; qqp has 2 text fields"):
    glue.hold_out_sentences(pairs, pairs, 1, seed=0)


def test_ci_without_glue_data_fails_instead_of_skipping(tmp_path):
  """A checkout with no ../shared beside it, under CI=true: the run fails at once, naming why."""
  for part in ("tests", "sharcs_jax"):  # the package finds ../shared beside its own checkout
    shutil.copytree(REPO_ROOT / part, tmp_path / "repo" / part,
                    ignore=shutil.ignore_patterns("__pycache__"))
  shutil.copy(REPO_ROOT / "setup.cfg", tmp_path / "repo" / "setup.cfg")
  env = {k: v for k, v in os.environ.items() if k != "SHARCS_DATA_DIR"}
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_routing.py"], cwd=tmp_path / "repo", capture_output=True,
                          text=True, timeout=300, env={**env, "CI": "true"})
  assert result.returncode == 1, result.stdout[-2000:]
  assert "CI=true but no GLUE data" in result.stdout + result.stderr
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                           "tests/test_routing.py"], cwd=tmp_path / "repo", capture_output=True,
                          text=True, timeout=300, env={**env, "CI": "false"})
  assert result.returncode == 0, result.stdout[-2000:]  # outside CI the same tests just run
