"""GLUE task registry and loading: local GLUE TSV files, or the Hugging Face hub.

Every example keeps a stable integer id (its row in the split), which the hardness state is
indexed by. Malformed rows are a clear error naming file and line, or a counted skip when the
config says so.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import os
import sys
from typing import Any, Sequence

import numpy as np
from absl import logging

from sharcs_jax.errors import DataError, MissingFileError

DATA_DIR_ENV = "SHARCS_DATA_DIR"


@dataclasses.dataclass(frozen=True)
class Task:
  name: str
  directory: str  # folder inside the GLUE data directory
  files: dict[str, str]  # split -> TSV file name
  text_columns: tuple[str, ...]  # one column, or a pair
  label_column: str
  label_names: tuple[str, ...]  # index = class id (the hub's ClassLabel order)
  tsv_labels: tuple[str, ...]  # how each class is written in the TSV, same order
  metrics: tuple[str, ...]
  hub_name: str
  hub_splits: dict[str, str]
  hub_text_columns: tuple[str, ...]

  @property
  def num_classes(self) -> int:
    return len(self.label_names)


TASKS = {
    t.name: t for t in [
        Task("sst2", "SST-2", {"train": "train.tsv", "dev": "dev.tsv"}, ("sentence",), "label",
             ("negative", "positive"), ("0", "1"), ("accuracy",), "sst2",
             {"train": "train", "dev": "validation"}, ("sentence",)),
        Task("qqp", "QQP", {"train": "train.tsv", "dev": "dev.tsv"}, ("question1", "question2"),
             "is_duplicate", ("not_duplicate", "duplicate"), ("0", "1"), ("accuracy", "f1"), "qqp",
             {"train": "train", "dev": "validation"}, ("question1", "question2")),
        Task("mrpc", "MRPC", {"train": "train.tsv", "dev": "dev.tsv"}, ("#1 String", "#2 String"),
             "Quality", ("not_equivalent", "equivalent"), ("0", "1"), ("accuracy", "f1"), "mrpc",
             {"train": "train", "dev": "validation"}, ("sentence1", "sentence2")),
        Task("rte", "RTE", {"train": "train.tsv", "dev": "dev.tsv"}, ("sentence1", "sentence2"),
             "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"),
             ("accuracy",), "rte", {"train": "train", "dev": "validation"},
             ("sentence1", "sentence2")),
        Task("qnli", "QNLI", {"train": "train.tsv", "dev": "dev.tsv"}, ("question", "sentence"),
             "label", ("entailment", "not_entailment"), ("entailment", "not_entailment"),
             ("accuracy",), "qnli", {"train": "train", "dev": "validation"},
             ("question", "sentence")),
        Task("mnli", "MNLI", {"train": "train.tsv", "dev": "dev_matched.tsv"},
             ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
             ("entailment", "neutral", "contradiction"), ("accuracy",), "mnli",
             {"train": "train", "dev": "validation_matched"}, ("premise", "hypothesis")),
    ]
}


@dataclasses.dataclass
class Split:
  """Raw examples of one split; `ids[i]` is example i's stable id (its row among kept rows)."""

  task: Task
  name: str
  texts: list[tuple[str, ...]]
  labels: np.ndarray  # int32 [N]
  ids: np.ndarray  # int32 [N], 0..N-1
  skipped: int = 0

  def __len__(self) -> int:
    return len(self.labels)


def get_task(name: str) -> Task:
  if name not in TASKS:
    raise ValueError(f"unknown task {name!r}; known: {', '.join(sorted(TASKS))}")
  return TASKS[name]


# A checkout's sibling `shared/data/glue` (this project's machines keep the data there).
BESIDE_CHECKOUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "..",
                               "shared", "data", "glue")


def resolve_data_dir(setting: str | None) -> str | None:
  """The config's directory, else $SHARCS_DATA_DIR, else ../shared/data/glue beside the checkout,
  else None (load from the hub)."""
  data_dir = setting or os.environ.get(DATA_DIR_ENV) or None
  if data_dir is None and os.path.isdir(BESIDE_CHECKOUT):
    return os.path.normpath(BESIDE_CHECKOUT)
  if data_dir is not None and not os.path.isdir(data_dir):
    source = "config.data_dir" if setting else f"${DATA_DIR_ENV}"
    raise MissingFileError(f"GLUE data directory {data_dir!r} (from {source}) does not exist")
  return data_dir


def read_tsv(path: str, task: Task, split: str, skip_malformed: bool = False) -> Split:
  csv.field_size_limit(sys.maxsize)
  if not os.path.isfile(path):
    raise MissingFileError(f"{task.name} {split} split: {path} does not exist")
  texts, labels, skipped = [], [], 0
  label_index = {v: i for i, v in enumerate(task.tsv_labels)}
  # GLUE TSVs carry raw quotes: quoting must be off. MRPC's header starts with a BOM.
  with open(path, encoding="utf-8-sig", newline="") as f:
    reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
    header = next(reader, None)
    if header is None:
      raise DataError(f"{path}: empty file, expected a header row")
    wanted = task.text_columns + (task.label_column,)
    absent = [c for c in wanted if c not in header]
    if absent:
      raise DataError(f"{path}: header lacks column(s) {absent}; it has {header}")
    columns = [header.index(c) for c in wanted]
    for row in reader:
      line = reader.line_num
      problem = None
      if len(row) != len(header):
        problem = f"{len(row)} fields, expected {len(header)}"
      elif row[columns[-1]] not in label_index:
        problem = f"label {row[columns[-1]]!r} is not one of {list(task.tsv_labels)}"
      if problem:
        if not skip_malformed:
          raise DataError(f"{path}:{line}: {problem} (set config.data.skip_malformed=True to "
                           "skip such rows)")
        skipped += 1
        continue
      texts.append(tuple(row[c] for c in columns[:-1]))
      labels.append(label_index[row[columns[-1]]])
  if skipped:
    logging.warning("%s: skipped %d malformed rows", path, skipped)
  return Split(task, split, texts, np.asarray(labels, np.int32),
               np.arange(len(labels), dtype=np.int32), skipped)


def read_hub(task: Task, split: str) -> Split:
  import datasets  # only needed without a local copy

  data = datasets.load_dataset("nyu-mll/glue", task.hub_name, split=task.hub_splits[split])
  texts = list(zip(*(data[c] for c in task.hub_text_columns)))
  labels = np.asarray(data["label"], np.int32)
  return Split(task, split, texts, labels, np.arange(len(labels), dtype=np.int32))


def _subset(split: Split, rows: np.ndarray, name: str) -> Split:
  return Split(split.task, name, [split.texts[i] for i in rows], split.labels[rows],
               np.arange(len(rows), dtype=np.int32), split.skipped)


def hold_out(split: Split, count: int, seed: int) -> tuple[Split, Split]:
  """(the rest, `count` examples drawn at random): a calibration set the model never trains on.

  Both parts keep file order and are renumbered 0..n-1 (the hardness state is indexed by id);
  the same seed holds out the same rows on every run.
  """
  if not 0 < count < len(split):
    raise DataError(f"cannot hold out {count} of the {len(split)} {split.task.name} "
                    f"{split.name} examples (config.routing.calibration_examples)")
  held = np.zeros(len(split), bool)
  held[np.random.default_rng(seed).choice(len(split), count, replace=False)] = True
  return (_subset(split, np.flatnonzero(~held), split.name),
          _subset(split, np.flatnonzero(held), f"{split.name}-heldout"))


def _spaced(text: str) -> str:
  """`text`'s tokens, one space apart and one on either side: `a in b` is then containment
  token for token."""
  return f" {' '.join(text.split())} "


def whole_sentences(texts: Sequence[str]) -> np.ndarray:
  """bool [N]: the non-empty texts no longer text contains, token for token (one copy of a text
  repeated). SST-2's training file holds every phrase of each sentence's parse as an example of
  its own; these are its sentences (on the full file 6,885, 19.4 tokens on average against 9.4
  for every row)."""
  padded = [_spaced(t) for t in texts]
  words = [set(t.split()) for t in texts]
  frequency = collections.Counter(w for ws in words for w in ws)
  postings: dict[str, list[int]] = collections.defaultdict(list)  # word -> whole sentences
  whole = np.zeros(len(texts), bool)
  for i in sorted(range(len(texts)), key=lambda i: -len(padded[i])):  # longest first
    if not words[i]:
      continue
    # A text inside a longer one lies inside a whole sentence that has its rarest word.
    rarest = min(words[i], key=frequency.__getitem__)
    if any(padded[i] in padded[j] for j in postings[rarest]):
      continue
    whole[i] = True
    for w in words[i]:
      postings[w].append(i)
  return whole


def contained(texts: Sequence[str], sentences: Sequence[str]) -> np.ndarray:
  """bool [N]: the texts that lie inside one of `sentences`, token for token."""
  padded = [_spaced(t) for t in sentences]
  postings: dict[str, list[int]] = collections.defaultdict(list)
  for j, sentence in enumerate(sentences):
    for w in set(sentence.split()):
      postings[w].append(j)
  inside = np.zeros(len(texts), bool)
  for i, text in enumerate(texts):
    words = text.split()
    if words:
      candidates = min((postings.get(w, []) for w in set(words)), key=len)
      inside[i] = any(_spaced(text) in padded[j] for j in candidates)
  return inside


def hold_out_sentences(split: Split, whole_file: Split, count: int, seed: int
                       ) -> tuple[Split, Split]:
  """(`split` without any text inside a held-out sentence, `count` whole sentences of the task's
  training file drawn at random): a calibration set drawn like served inputs (whole sentences,
  not phrases), none of whose phrases the model trains on. `whole_file` is the training file
  unlimited (a sentence of the first rows may lie beyond them); one-text tasks only."""
  if len(split.task.text_columns) != 1:
    raise DataError(f"whole sentences are held out of one-text tasks; {split.task.name} has "
                    f"{len(split.task.text_columns)} text fields")
  texts = [t[0] for t in whole_file.texts]
  sentences = np.flatnonzero(whole_sentences(texts))
  if not 0 < count < len(sentences):
    raise DataError(f"cannot hold out {count} of the {len(sentences)} whole sentences of "
                    f"{split.task.name} {split.name} (config.routing.calibration_examples)")
  held = np.sort(np.random.default_rng(seed).choice(sentences, count, replace=False))
  inside = contained([t[0] for t in split.texts], [texts[i] for i in held])
  return (_subset(split, np.flatnonzero(~inside), split.name),
          _subset(whole_file, held, f"{split.name}-heldout-sentences"))


def load_split(task_name: str, split: str, data_dir: str | None,
               skip_malformed: bool = False, limit: int = 0) -> Split:
  """One labelled split (`train` or `dev`); `limit` > 0 keeps the first `limit` examples."""
  task = get_task(task_name)
  if split not in task.files:
    raise ValueError(f"unknown split {split!r}; known: {sorted(task.files)}")
  if data_dir is None:
    data = read_hub(task, split)
  else:
    data = read_tsv(os.path.join(data_dir, task.directory, task.files[split]), task, split,
                    skip_malformed)
  return first(data, limit)


def first(split: Split, limit: int) -> Split:
  """The first `limit` examples (all of them for 0), ids kept."""
  if not limit:
    return split
  return Split(split.task, split.name, split.texts[:limit], split.labels[:limit],
               split.ids[:limit], split.skipped)


def run_splits(config: Any) -> tuple[Split, Split, Split | None]:
  """(train, dev, calibration) of a run's config. Calibration examples are held back from train
  (the same rows for the same seed, never trained on; with `config.routing.calibration_draw`
  "sentences", whole sentences and none of their phrases: `hold_out_sentences`), or are dev
  itself where `config.routing.calibrate_on` says so; None when the run holds back nothing."""
  routing, data = config.get("routing", {}), config.data  # runs older than routing have none
  data_dir = resolve_data_dir(config.data_dir)
  train, dev = (load_split(config.task, split, data_dir, data.skip_malformed, limit)
                for split, limit in (("train", data.train_limit), ("dev", data.dev_limit)))
  calibration = None
  if routing.get("calibration_examples") and routing.get("calibration_draw") == "sentences":
    whole_file = (train if not data.train_limit else
                  load_split(config.task, "train", data_dir, data.skip_malformed))
    train, calibration = hold_out_sentences(train, whole_file, routing.calibration_examples,
                                            config.seed)
  elif routing.get("calibration_examples"):
    train, calibration = hold_out(train, routing.calibration_examples, config.seed)
  if routing.get("calibrate_on") == "dev":
    calibration = dev
  return train, dev, calibration

