"""Why an early exit after layer k learns or stays at the class prior: the [CLS] vector per layer.

An exit is a dense + tanh + classifier on layer k's [CLS] vector. For the pretrained encoder (no
fine-tuning) this reports, per layer, how much that vector varies across inputs (mean per-feature
standard deviation) and the dev accuracy of a linear probe trained on it once standardised, and
on the mean over tokens for comparison. A vector that carries the label (probe well above the
majority rate) but barely varies is one a freshly initialised exit cannot use at a fine-tuning
learning rate.

    python -m benchmarks.exit_probe --task=sst2 --out=/tmp/probe
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import app, flags, logging

from benchmarks import common
from sharcs_jax.data import batching, glue
from sharcs_jax.model.weights import load_pretrained_early_exit, resolve_model_dir

flags.DEFINE_string("task", "sst2", "GLUE task.")
flags.DEFINE_string("model", "all-MiniLM-L6-v2", "Backbone: installed name or directory.")
flags.DEFINE_string("out", None, "Output directory.", required=True)
flags.DEFINE_string("data_dir", "", "GLUE TSV directory (default: $SHARCS_DATA_DIR, then "
                    "../shared/data/glue beside the checkout, then the hub).")
flags.DEFINE_integer("train_examples", 3000, "Training examples the probes are fitted on.")
flags.DEFINE_integer("dev_limit", 0, "> 0: only the first N dev examples.")
flags.DEFINE_integer("max_length", 64, "Tokens per input (longer inputs are truncated).")
flags.DEFINE_integer("probe_steps", 300, "Full-batch Adam steps per probe.")
flags.DEFINE_integer("seed", 0, "Picks the training examples.")
FLAGS = flags.FLAGS

BATCH = 200


def layer_vectors(module, input_ids, token_type_ids, attention_mask):
  """Per layer: ([CLS] vector, mean over real tokens), each [B, hidden]."""
  x = module.embeddings(input_ids, token_type_ids, deterministic=True)
  mask = attention_mask.astype(bool)
  weights = attention_mask[..., None].astype(x.dtype)
  vectors = []
  for layer in module.layers:
    x = layer(x, mask, deterministic=True)
    vectors.append((x[:, 0], (x * weights).sum(1) / weights.sum(1)))
  return vectors


def encode_vectors(apply, split: glue.Split, tokenizer) -> list[tuple[np.ndarray, np.ndarray]]:
  """Per layer ([CLS], mean-pool) vectors [N, hidden] in split order, from fixed-size batches."""
  data = batching.encode(split, tokenizer, (FLAGS.max_length,))
  rows, chunks = [], []
  for batch_rows, batch in batching.eval_batches(data, BATCH):
    out = apply(batch["input_ids"], batch["token_type_ids"], batch["attention_mask"])
    rows.append(batch_rows)
    chunks.append(jax.tree_util.tree_map(lambda a: np.asarray(a)[:len(batch_rows)], out))
  order = np.argsort(np.concatenate(rows))
  return jax.tree_util.tree_map(lambda *a: np.concatenate(a)[order], *chunks)


def probe_accuracy(train_x: np.ndarray, train_y: np.ndarray, dev_x: np.ndarray,
                   dev_y: np.ndarray, num_classes: int, steps: int) -> float:
  """A standardised linear probe: the scale of the features does not decide whether it learns."""
  mean, std = train_x.mean(0), train_x.std(0) + 1e-8
  train_x, dev_x = (train_x - mean) / std, (dev_x - mean) / std
  optimizer = optax.adam(1e-2)

  def loss(w):
    logits = train_x @ w[:-1] + w[-1]
    return (optax.softmax_cross_entropy_with_integer_labels(logits, train_y).mean()
            + 1e-3 * jnp.sum(w[:-1] ** 2))

  @jax.jit
  def step(w, state):
    updates, state = optimizer.update(jax.grad(loss)(w), state)
    return optax.apply_updates(w, updates), state

  w = jnp.zeros((train_x.shape[1] + 1, num_classes))
  state = optimizer.init(w)
  for _ in range(steps):
    w, state = step(w, state)
  return float(np.mean(np.argmax(dev_x @ w[:-1] + w[-1], axis=1) == dev_y))


def main(argv):
  del argv
  data_dir = glue.resolve_data_dir(FLAGS.data_dir)
  train = glue.load_split(FLAGS.task, "train", data_dir)
  dev = glue.load_split(FLAGS.task, "dev", data_dir, limit=FLAGS.dev_limit)
  _, train = glue.hold_out(train, min(FLAGS.train_examples, len(train)), FLAGS.seed)  # a sample
  num_classes = train.task.num_classes
  model, params = load_pretrained_early_exit(FLAGS.model, num_classes=num_classes,
                                             key=jax.random.key(FLAGS.seed))
  apply = jax.jit(lambda *batch: model.apply({"params": params}, *batch, method=layer_vectors))
  tokenizer = batching.load_tokenizer(resolve_model_dir(FLAGS.model))
  train_vectors, dev_vectors = (encode_vectors(apply, s, tokenizer) for s in (train, dev))
  train_y, dev_y = np.asarray(train.labels), np.asarray(dev.labels)
  majority = float(np.mean(dev_y == np.bincount(train_y, minlength=num_classes).argmax()))
  layers = []
  for k, ((cls_train, mean_train), (cls_dev, mean_dev)) in enumerate(
      zip(train_vectors, dev_vectors), start=1):
    layers.append({
        "layer": k,
        "cls_spread": float(cls_train.std(0).mean()),
        "cls_probe_accuracy": probe_accuracy(cls_train, train_y, cls_dev, dev_y, num_classes,
                                             FLAGS.probe_steps),
        "mean_pool_probe_accuracy": probe_accuracy(mean_train, train_y, mean_dev, dev_y,
                                                   num_classes, FLAGS.probe_steps)})
    logging.info("layer %d: %s", k, layers[-1])
  data = {"task": FLAGS.task, "model": FLAGS.model, "train_examples": len(train),
          "dev_examples": len(dev), "majority_accuracy": majority, "layers": layers}
  rows = [[l["layer"], l["cls_spread"], 100 * l["cls_probe_accuracy"],
           100 * l["mean_pool_probe_accuracy"]] for l in layers]
  notes = (f"{FLAGS.task} dev ({len(dev)} examples; majority class {100 * majority:.2f}%), "
           f"pretrained {FLAGS.model}, probes fitted on {len(train)} training examples.")
  common.write_outputs(FLAGS.out, f"exit_probe_{FLAGS.task}", data,
                       f"{FLAGS.task}: what an exit after each layer sees",
                       ["layer", "[CLS] spread (mean std per feature)", "[CLS] probe dev accuracy",
                        "mean-pool probe dev accuracy"], rows, notes)
  print(os.path.join(FLAGS.out, f"exit_probe_{FLAGS.task}.md"))


if __name__ == "__main__":
  app.run(main)
