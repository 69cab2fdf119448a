"""The HTTP server as a real process on 127.0.0.1: API shapes, errors, online == offline, metrics,
/health before the programs are ready, and draining on SIGTERM. Every wait is bounded."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from conftest import REPO_ROOT, real_sentences


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def call(port: int, path: str, body: bytes | None = None, timeout: float = 60.0):
  """(status, headers, parsed body or text) of one request."""
  request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=body,
                                   headers={"Content-Type": "application/json"})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      status, headers, raw = response.status, dict(response.headers), response.read()
  except urllib.error.HTTPError as e:
    status, headers, raw = e.code, dict(e.headers), e.read()
  try:
    return status, headers, json.loads(raw)
  except ValueError:
    return status, headers, raw.decode()


def predict(port: int, payload) -> tuple[int, dict, object]:
  return call(port, "/predict", json.dumps(payload).encode())


def start_server(workdir, *flags: str) -> tuple[int, subprocess.Popen, list]:
  """(port, process, health statuses seen while starting) of a server of `workdir`, once its
  /health answers 200 (bounded)."""
  port = free_port()
  process = subprocess.Popen(
      [sys.executable, "-m", "sharcs_jax.main", "--mode=serve", f"--workdir={workdir}",
       f"--port={port}", *flags],
      cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  seen = []
  deadline = time.monotonic() + 240
  while time.monotonic() < deadline and process.poll() is None:
    try:
      status = call(port, "/health", timeout=5)[0]
    except OSError:
      status = None  # not listening yet
    seen.append(status)
    if status == 200:
      break
    time.sleep(0.05)
  assert seen[-1] == 200, (seen[-5:], process.poll())
  return port, process, seen


def stop(process: subprocess.Popen) -> None:
  if process.poll() is None:
    process.kill()
    process.wait(10)


@pytest.fixture(scope="module")
def server(trained):
  """The tiny run's server at fp32 on XLA."""
  port, process, seen = start_server(trained[0], "--precision=fp32", "--max_client_batch_size=8",
                                     "--payload_limit=4000")
  yield port, process, seen
  stop(process)


def test_health_is_503_until_the_programs_are_ready(server):
  assert 503 in server[2]


def test_shapes_match_tei(server, trained):
  port = server[0]
  a, b = real_sentences(2)
  status, headers, one = predict(port, {"inputs": [a, b]})
  assert status == 200
  assert [s["label"] for s in one] in (["not_duplicate", "duplicate"],
                                       ["duplicate", "not_duplicate"])
  assert one[0]["score"] >= one[1]["score"] and abs(sum(s["score"] for s in one) - 1) < 1e-5
  assert {"x-queue-time", "x-inference-time", "x-total-time"} <= set(headers)
  status, _, many = predict(port, {"inputs": [[a, b], [b, a], [a, a]], "details": True})
  assert status == 200 and len(many) == 3
  assert set(many[0]) == {"scores", "width", "gflops"} and many[0]["gflops"] > 0
  status, _, info = call(port, "/info")
  assert info["task"] == "qqp" and info["labels"] == ["not_duplicate", "duplicate"]
  assert info["limits"]["max_client_batch_size"] == 8


@pytest.mark.parametrize("body, status", [
    (b"{not json", 422), (json.dumps({"inputs": ["only one field"]}).encode(), 422),
    (json.dumps({"text": ["a", "b"]}).encode(), 422), (json.dumps({"inputs": []}).encode(), 400),
    (json.dumps({"inputs": [["a", "b"]] * 9}).encode(), 413),
    (json.dumps({"inputs": ["a" * 5000, "b"]}).encode(), 413)])
def test_errors(server, body, status):
  got, _, answer = call(server[0], "/predict", body)
  assert got == status and set(answer) == {"error", "error_type"}, answer


def test_online_equals_offline_and_metrics_count(server, trained):
  from sharcs_jax.serve.engine import Engine

  port = server[0]
  sentences = real_sentences(24)
  pairs = [[sentences[i], sentences[i + 1]] for i in range(0, 24, 2)]
  online = []
  for pair in pairs:
    status, _, answer = predict(port, {"inputs": pair, "details": True})
    assert status == 200
    online.append({s["label"]: s["score"] for s in answer["scores"]}["duplicate"])
  offline = Engine.from_workdir(str(trained[0]), precision="fp32").predict(pairs)
  np.testing.assert_allclose(online, offline.probabilities[:, 1], atol=1e-6, rtol=0)
  status, _, text = call(port, "/metrics")
  counted = [line for line in text.splitlines() if line.startswith('sharcs_requests_total{status="200"}')]
  assert counted and float(counted[0].split()[-1]) >= len(pairs)


def test_online_equals_offline_under_concurrent_clients_on_onnxruntime_fp32(trained):
  """Concurrent one-pair requests batch together in arrival order, two workers each running
  batches of their own, yet each score is the offline engine's: ONNX Runtime's fp32 kernels give
  a row the same result whatever its batch-mates, padding and thread count (XLA's differ by
  ~1e-7 per op, int8's dynamic activation scales by much more)."""
  import concurrent.futures

  from sharcs_jax.serve.engine import Engine

  port, process, _ = start_server(trained[0], "--runtime=onnxruntime", "--precision=fp32",
                                  "--workers=2")
  try:
    sentences = real_sentences(48)
    pairs = [[sentences[i], sentences[(7 * i + 3) % 48]] for i in range(48)]
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      answers = list(pool.map(lambda pair: predict(port, {"inputs": pair}), pairs))
    assert {status for status, _, _ in answers} == {200}
    online = [{s["label"]: s["score"] for s in answer}["duplicate"] for _, _, answer in answers]
    assert call(port, "/info")[2]["limits"]["workers"] == 2
  finally:
    stop(process)
  offline = Engine.from_workdir(str(trained[0]), precision="fp32",
                                runtime="onnxruntime").predict(pairs)
  np.testing.assert_allclose(online, offline.probabilities[:, 1], atol=1e-6, rtol=0)


def test_a_full_queue_is_429_and_a_stale_request_504_on_a_real_server(trained):
  """Concurrent requests against a queue of one request's pairs and a 1 ms queueing limit: while
  the worker runs one batch, the next request waits past its limit (504) and those behind it
  find the queue full (429, with Retry-After); every answer is one of the three, with TEI's
  error body."""
  import concurrent.futures

  port, process, _ = start_server(trained[0], "--precision=fp32", "--max_queued_pairs=8",
                                  "--request_timeout_s=0.001", "--max_batch_tokens=1")
  try:
    sentences = real_sentences(16)
    long_pairs = [[" ".join(sentences[i:i + 4]), " ".join(sentences[i + 4:i + 8])]
                  for i in range(8)]
    with concurrent.futures.ThreadPoolExecutor(24) as pool:
      answers = list(pool.map(lambda _: predict(port, {"inputs": long_pairs}), range(48)))
  finally:
    stop(process)
  statuses = [status for status, _, _ in answers]
  assert set(statuses) <= {200, 429, 504} and {429, 504} <= set(statuses), statuses
  for status, headers, body in answers:
    if status != 200:
      assert set(body) == {"error", "error_type"}, body
      assert body["error_type"] == {429: "overloaded", 504: "timeout"}[status]
    if status == 429:
      assert {k.lower(): v for k, v in headers.items()}.get("retry-after") == "1"


def test_sigterm_answers_what_was_sent_and_exits_0(server):
  import concurrent.futures

  port, process, _ = server
  a, b = real_sentences(2)
  with concurrent.futures.ThreadPoolExecutor(8) as pool:
    futures = [pool.submit(predict, port, {"inputs": [[a, b]] * 8}) for _ in range(16)]
    time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    statuses = [f.result(timeout=120)[0] for f in futures]
  assert set(statuses) <= {200, 503}, statuses
  assert process.wait(timeout=120) == 0


def test_a_port_in_use_is_one_line(trained):
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    result = subprocess.run(
        [sys.executable, "-m", "sharcs_jax.main", "--mode=serve", f"--workdir={trained[0]}",
         f"--port={port}"], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
  assert result.stderr.strip().splitlines()[-1].startswith(
      f"FATAL --host=127.0.0.1 --port={port}: cannot listen there"), result.stderr


def test_load_benchmark_loses_nothing_and_reports_every_level(trained, tmp_path):
  from conftest import assert_png, run_benchmark

  data, _ = run_benchmark("load", tmp_path, f"--workdir={trained[0]}", "--budget=1.1x",
                          "--precision=fp32", "--pairs=48", "--concurrency=1,4",
                          "--open_loop=1.5", "--overload=", "--requests_per_level=48",
                          "--drain_clients=4",
                          "--seconds_per_level=10", "--offline_rounds=1", report="load",
                          timeout=600)
  assert set(data["servers"]) == {"1.1x", "1x"} and data["offline_pairs_per_second"] > 0
  for server in data["servers"].values():
    assert server["exit_code"] == 0  # drained on SIGTERM
    assert set(server["levels"]) == {"closed 1", "closed 4", "open 1.5", "sigterm 4"}
    for name, level in server["levels"].items():
      assert level["lost"] == 0 and level["max_abs_diff"] <= 1e-6, level
      assert level["p50_ms"] <= level["p99_ms"] <= level["max_ms"]
      assert abs(sum(level["share_per_width"].values()) - 1) < 1e-9
      if name.startswith("sigterm"):  # each client sends until its first 503
        assert level["statuses"].get("503") == 4 and set(level["statuses"]) == {"200", "503"}
        continue
      assert level["statuses"] == {"200": level["sent"]}, level
      assert set(level["batch_per_width"]) == set(level["share_per_width"])
      assert all(b >= 1 for b in level["batch_per_width"].values())
  assert_png(tmp_path / "load.png")
  assert (tmp_path / "load.md").read_text().count("| 1x |") == 4
