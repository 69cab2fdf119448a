"""Load test of `--mode=serve`: the server as a subprocess on 127.0.0.1, driven by asyncio clients.

    python -m benchmarks.load --workdir=W --out=O [--budget=2x --rule=cascade]

An early-exit run (`config.model.method=early_exit`) is served by its exit rule at --budget, beside
its full depth (one program) in place of budget 1x.

Closed loop at each --concurrency (one pair per request, QQP dev pairs), then Poisson arrivals at
--open_loop fractions of the best closed-loop throughput and at --overload fractions of offline
`Engine.predict`'s, then SIGTERM while --drain_clients clients keep sending; the same at budget 1x (full width), and offline `Engine.predict` on the same
pairs beside them. Every answer's scores are compared with the offline ones. Every level is
bounded by --requests_per_level and --seconds_per_level. Writes load.json, load.md and load.png.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from absl import app, flags

from benchmarks import common
from sharcs_jax import report
from sharcs_jax.run import load_run
from sharcs_jax.serve.engine import Engine
from sharcs_jax.errors import one_line_errors

FLAGS = flags.FLAGS
common.define_flags("workdir", "out", "budget", "rule", "signal", "runtime", "precision",
                    required=("workdir", "out"), budget="2x", rule="cascade", precision="auto")
flags.DEFINE_list("concurrency", ["1", "4", "16", "32", "64"], "Closed-loop client counts.")
flags.DEFINE_list("open_loop", ["0.5", "1.0", "1.5"], "Open-loop rates, as fractions of the best "
                  "closed-loop pairs/s.")
flags.DEFINE_integer("pairs", 4000, "Dev pairs to send (each level cycles through them).")
flags.DEFINE_integer("requests_per_level", 4000, "At most this many requests per level.")
flags.DEFINE_float("seconds_per_level", 60.0, "At most this long per level.")
flags.DEFINE_float("max_wait_ms", 0.0, "The servers' --max_wait_ms.")
flags.DEFINE_integer("workers", 1, "The servers' --workers (onnxruntime); offline Engine.predict "
                     "runs one engine on every usable core.")
flags.DEFINE_list("overload", ["1.5"], "Open-loop rates, as fractions of offline Engine.predict's "
                  "pairs/s: past what any batching can serve, so the queue fills (429s).")
flags.DEFINE_integer("drain_clients", 32, "Closed-loop clients sending while SIGTERM arrives.")
flags.DEFINE_integer("offline_rounds", 3, "Offline Engine.predict passes (the median is kept).")


async def post(reader, writer, port: int, body: bytes) -> tuple[int, bytes]:
  """One HTTP/1.1 request on a kept-alive connection: (status, body)."""
  writer.write(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json"
               b"\r\nContent-Length: %d\r\n\r\n%s" % (port, len(body), body))
  await writer.drain()
  head = await reader.readuntil(b"\r\n\r\n")
  lines = head.decode("latin-1").split("\r\n")
  status = int(lines[0].split()[1])
  length = next(int(l.split(":", 1)[1]) for l in lines if l.lower().startswith("content-length"))
  return status, await reader.readexactly(length)


async def one_request(port: int, index: int, body: bytes, results: list) -> None:
  """A request on its own connection (open loop); a failure to get an answer counts as lost."""
  start = time.perf_counter()
  try:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    status, answer = await asyncio.wait_for(post(reader, writer, port, body), 120)
    writer.close()
  except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
    status, answer = 0, b""
  results.append((index, status, time.perf_counter() - start, answer))


async def closed_loop(port: int, bodies: list[bytes], clients: int, limit: int, seconds: float,
                      started=None):
  """`clients` kept-alive connections, each sending its next request when answered, until
  `limit` requests or `seconds`; a client stops at its first answer other than 200. `started`
  (a callable) runs once every client is connected."""
  results: list = []
  counter = iter(range(limit))
  deadline = time.perf_counter() + seconds
  connected = asyncio.Barrier(clients + 1)

  async def client() -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await connected.wait()
    for i in counter:
      if time.perf_counter() > deadline:
        break
      start = time.perf_counter()
      try:
        status, answer = await asyncio.wait_for(post(reader, writer, port,
                                                     bodies[i % len(bodies)]), 120)
      except (OSError, asyncio.IncompleteReadError, asyncio.TimeoutError):
        status, answer = 0, b""
      results.append((i % len(bodies), status, time.perf_counter() - start, answer))
      if status != 200:
        break
    writer.close()

  tasks = [asyncio.create_task(client()) for _ in range(clients)]
  await connected.wait()
  start = time.perf_counter()
  if started is not None:
    started()
  await asyncio.gather(*tasks)
  return results, time.perf_counter() - start


async def open_loop(port: int, bodies: list[bytes], rate: float, limit: int, seconds: float,
                    seed: int = 0):
  results: list = []
  rng = random.Random(seed)
  tasks = []
  start = time.perf_counter()
  next_at = start
  for i in range(limit):
    next_at += rng.expovariate(rate)
    if next_at - start > seconds:
      break
    await asyncio.sleep(max(next_at - time.perf_counter(), 0))
    tasks.append(asyncio.create_task(one_request(port, i % len(bodies), bodies[i % len(bodies)],
                                                 results)))
  await asyncio.gather(*tasks)
  return results, time.perf_counter() - start


def summarise(results: list, seconds: float, offline: np.ndarray, labels: list[str]) -> dict:
  """A level's numbers; every sent request has an entry, status 0 where no answer came.

  `max_abs_diff` is the largest difference of an answer's scores from `offline` [N, C], the
  offline engine's probabilities of the same pairs (label order `labels`)."""
  ok = [(index, latency, json.loads(answer)) for index, status, latency, answer in results
        if status == 200]
  latencies = np.array([latency for _, latency, _ in ok]) * 1e3
  diffs = [abs(score["score"] - offline[index, labels.index(score["label"])])
           for index, _, answer in ok for score in answer["scores"]]
  statuses: dict[str, int] = {}
  errors: dict[str, str] = {}  # one answer per error status, to say what went wrong
  for _, status, _, answer in results:
    statuses[str(status)] = statuses.get(str(status), 0) + 1
    if status != 200:
      errors.setdefault(str(status), answer.decode(errors="replace")[:300])
  widths = [answer.get("width", answer.get("exit_layer")) for _, _, answer in ok]
  values, counts = np.unique(widths, return_counts=True) if widths else ([], [])
  pct = (lambda q: float(np.percentile(latencies, q))) if len(latencies) else (lambda q: None)
  refused = [latency * 1e3 for _, status, latency, _ in results if status == 429]
  return {"sent": len(results), "lost": statuses.get("0", 0),
          "statuses": statuses, "errors": errors, "seconds": seconds,
          "pairs_per_second": len(ok) / seconds,
          "p50_ms": pct(50), "p90_ms": pct(90), "p99_ms": pct(99),
          "max_ms": float(latencies.max()) if len(latencies) else None,
          "max_abs_diff": float(max(diffs)) if diffs else None,
          "p99_429_ms": float(np.percentile(refused, 99)) if refused else None,
          "share_per_width": {f"{v:g}": int(c) / len(widths) for v, c in zip(values, counts)}}


def start_server(budget: str, rule: str, signal_name: str) -> tuple[subprocess.Popen, int]:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  process = subprocess.Popen(
      [sys.executable, "-m", "sharcs_jax.main", "--mode=serve", f"--workdir={FLAGS.workdir}",
       f"--port={port}", f"--budget={budget}",
       f"--signal={signal_name}", *([] if rule == common.EXIT_RULE else [f"--rule={rule}"]),
       f"--precision={FLAGS.precision}", f"--runtime={FLAGS.runtime}",
       f"--max_wait_ms={FLAGS.max_wait_ms}", f"--workers={FLAGS.workers}",
       "--max_queued_pairs=256"],
      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline = time.monotonic() + 900
  while time.monotonic() < deadline and process.poll() is None:
    try:
      with socket.create_connection(("127.0.0.1", port), 1) as s:
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        if b" 200 " in s.recv(64):
          return process, port
    except OSError:
      pass
    time.sleep(0.5)
  process.kill()
  raise SystemExit(f"FATAL the server for budget {budget} did not become healthy")


def batch_totals(port: int) -> dict[str, tuple[float, float]]:
  """(pairs, route groups) run so far per width (or exit layer), from the server's
  `sharcs_batch_pairs`."""
  import urllib.request

  with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=30) as response:
    text = response.read().decode()
  totals: dict[str, list[float]] = {}
  for line in text.splitlines():
    for suffix, slot in (("_sum", 0), ("_count", 1)):
      if line.startswith(f"sharcs_batch_pairs{suffix}{{"):
        width = line.split('="', 1)[1].split('"', 1)[0]  # its one label: width or exit_layer
        totals.setdefault(width, [0.0, 0.0])[slot] = float(line.split()[-1])
  return {width: (pairs, groups) for width, (pairs, groups) in totals.items()}


def realised_batch(before: dict, after: dict) -> dict[str, float]:
  """Mean pairs per width group between two `batch_totals` readings."""
  out = {}
  for width, (pairs, groups) in after.items():
    pairs0, groups0 = before.get(width, (0.0, 0.0))
    if groups > groups0:
      out[width] = (pairs - pairs0) / (groups - groups0)
  return out


def drive(budget: str, bodies: list[bytes], offline: np.ndarray, labels: list[str],
          offline_rate: float, rule: str, signal_name: str) -> dict:
  process, port = start_server(budget, rule, signal_name)
  levels = {}
  draining = f"sigterm {FLAGS.drain_clients}"
  summary = lambda results, seconds: summarise(results, seconds, offline, labels)
  try:
    for clients in (int(c) for c in FLAGS.concurrency):
      before = batch_totals(port)
      results, seconds = asyncio.run(closed_loop(port, bodies, clients, FLAGS.requests_per_level,
                                                 FLAGS.seconds_per_level))
      levels[f"closed {clients}"] = summary(results, seconds)
      levels[f"closed {clients}"]["batch_per_width"] = realised_batch(before, batch_totals(port))
      print(budget, f"closed {clients}", {k: levels[f"closed {clients}"][k] for k in
                                          ("pairs_per_second", "p99_ms", "statuses")}, flush=True)
    best = max(level["pairs_per_second"] for level in levels.values())
    rates = [(f"open {float(f):g}", float(f) * best) for f in FLAGS.open_loop] + [
        (f"overload {float(f):g}", float(f) * offline_rate) for f in FLAGS.overload]
    for name, rate in rates:
      before = batch_totals(port)
      results, seconds = asyncio.run(open_loop(port, bodies, rate, FLAGS.requests_per_level,
                                               FLAGS.seconds_per_level))
      levels[name] = summary(results, seconds)
      levels[name]["rate"] = rate
      levels[name]["batch_per_width"] = realised_batch(before, batch_totals(port))
      print(budget, name, levels[name]["statuses"], flush=True)
    # SIGTERM under load: a quarter of a level's time in, the clients still sending.
    terminate = lambda: asyncio.get_running_loop().call_later(
        min(2.0, FLAGS.seconds_per_level / 4), process.send_signal, signal.SIGTERM)
    results, seconds = asyncio.run(closed_loop(port, bodies, FLAGS.drain_clients, 10**9,
                                               FLAGS.seconds_per_level + 120, terminate))
    levels[draining] = {**summary(results, seconds), "batch_per_width": {}}
    print(budget, draining, levels[draining]["statuses"], flush=True)
  finally:
    if draining not in levels:  # a level failed: stop it all the same
      process.send_signal(signal.SIGTERM)
    code = process.wait(120)
  return {"levels": levels, "exit_code": code}


def engine_at(engine: Engine, budget: str, rule: str, signal_name: str) -> Engine:
  """The engine a server at `budget` runs: `engine` under `rule` calibrated to it, as the server
  calibrates it; no budget: the model's own routing (an early exit's full depth, one program)."""
  if not budget:
    return Engine.from_run(engine.trained, precision=FLAGS.precision, runtime=FLAGS.runtime)
  return engine.with_rule(common.calibrated(engine, budget, common.calibration_data(
      engine.trained), rule, signal_name))


def offline_predictions(engine, pairs: list) -> tuple[np.ndarray, float]:
  """Offline `engine.predict` of `pairs`: (probabilities [N, C], median pairs/s)."""
  rates = []
  for _ in range(FLAGS.offline_rounds):
    start = time.perf_counter()
    predictions = engine.predict(pairs)
    rates.append(len(pairs) / (time.perf_counter() - start))
  return predictions.probabilities, float(np.median(rates))


def main(argv):
  del argv
  run = load_run(FLAGS.workdir)
  engine = common.open_engine(run, runtime=FLAGS.runtime, precision=FLAGS.precision)
  kind = common.kind_of(engine)
  (rule,) = common.checked_rules(kind, "rule")
  signal_name = FLAGS.signal or kind.signal  # in the servers and offline alike
  dev = common.dev_split(run.task.name, None, FLAGS.pairs)
  pairs = [list(text) if len(text) > 1 else text[0] for text in dev.texts]
  labels = list(run.task.label_names)
  bodies = [json.dumps({"inputs": pair, "details": True}).encode() for pair in pairs]
  baseline = kind.baseline_budget or kind.full  # the 1x server, or an early exit's full depth
  servers, offline_rates = {}, {}
  for budget, name in ((FLAGS.budget, FLAGS.budget or "own rule"),
                       (kind.baseline_budget, baseline)):
    probabilities, offline_rates[name] = offline_predictions(
        engine_at(engine, budget, rule, signal_name), pairs)
    servers[name] = drive(budget, bodies, probabilities, labels, offline_rates[name], rule,
                          signal_name)
  offline = offline_rates[FLAGS.budget or "own rule"]
  data = {"pairs": len(pairs), "cpu": common.cpu_info(), "offline_pairs_per_second": offline,
          "offline_pairs_per_second_1x": offline_rates[baseline], "budget": FLAGS.budget,
          "baseline": baseline, "model": kind.model, "rule": rule, "signal": signal_name,
          "precision": FLAGS.precision,
          "runtime": FLAGS.runtime, "max_wait_ms": FLAGS.max_wait_ms, "workers": FLAGS.workers,
          "servers": servers}
  rows = [[budget, level, v["pairs_per_second"], v["p50_ms"], v["p90_ms"], v["p99_ms"],
           v["max_ms"], v["lost"], json.dumps(v["statuses"]), v["p99_429_ms"], v["max_abs_diff"],
           ", ".join(f"{w}: {100 * v['share_per_width'].get(w, 0):.0f}% x {b:.1f}"
                     for w, b in v["batch_per_width"].items())]
          for budget, server in data["servers"].items() for level, v in server["levels"].items()]
  exit_codes = ", ".join(f"{budget} {server['exit_code']}" for budget, server in servers.items())
  notes = (f"{len(pairs)} {dev.task.name} dev pairs, one pair per request, --max_wait_ms="
           f"{FLAGS.max_wait_ms:g}, --workers={FLAGS.workers}; offline Engine.predict "
           f"{offline:.1f} pairs/s at {FLAGS.budget}, {offline_rates[baseline]:.1f} at "
           f"{baseline} (median of {FLAGS.offline_rounds}); exit codes after SIGTERM: "
           f"{exit_codes}; CPU: {common.cpu_line(data['cpu'])}.")
  common.write_outputs(FLAGS.out, "load", data, "HTTP server load", [
      "budget", "level", "pairs/s", "p50 ms", "p90 ms", "p99 ms", "max ms", "lost", "statuses",
      "p99 of 429s ms", "max abs diff to offline", "width: share x mean group"], rows, notes)
  fig, ax = report.pyplot().subplots(figsize=(5, 3.5))
  for budget, server in data["servers"].items():
    points = [(v["pairs_per_second"], v["p99_ms"]) for level, v in server["levels"].items()
              if v["p99_ms"] is not None and not level.startswith("sigterm")]
    ax.plot(*zip(*points), "o-", label=f"budget {budget}")
  ax.axvline(offline, color="gray", linestyle=":", label="offline Engine.predict")
  ax.set_xlabel("pairs / s")
  ax.set_ylabel("p99 latency (ms)")
  ax.legend()
  report.save_figure(fig, os.path.join(FLAGS.out, "load.png"), dpi=110)
  common.print_report(FLAGS.out, "load")


if __name__ == "__main__":
  app.run(one_line_errors(main))
