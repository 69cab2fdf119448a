"""The HTTP server: TEI's `/predict` over the routed engine, batched across requests.

Starlette on uvicorn: the smallest ASGI stack with a real event loop, streaming-free JSON routes
and uvicorn's graceful shutdown; the engine runs on the batcher's one worker thread, so the loop
never blocks on a program. The engine is built after the socket is bound: `/health` answers 503
until every program is loaded or compiled, and again while draining after SIGTERM.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import json
import threading
import time
from typing import Any, Callable

import numpy as np
import prometheus_client as prom
from starlette.applications import Starlette
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sharcs_jax.data import batching
from sharcs_jax.errors import RunError
from sharcs_jax.serve.http import tei
from sharcs_jax.serve.http.batcher import Batcher, Limits, Pending
from sharcs_jax.serve.http.tei import RequestError

VERSION = "0.1.0"


@dataclasses.dataclass(frozen=True)
class ServerOptions:
  limits: Limits = Limits()
  max_client_batch_size: int = 32
  payload_limit: int = 2_000_000  # bytes
  drain_timeout_s: float = 60.0
  workers: int = 1  # threads running the engine, each on its own batch

  @classmethod
  def checked(cls, *, max_batch_tokens: int, max_wait_ms: float, max_queued_pairs: int,
              request_timeout_s: float, max_client_batch_size: int, payload_limit: int,
              workers: int, runtime: str, cores: int) -> "ServerOptions":
    """The options as the command line gives them, each out-of-range value a one-line
    `RunError` naming its flag, before any model is loaded or port taken."""
    counts = dict(max_batch_tokens=max_batch_tokens, max_client_batch_size=max_client_batch_size,
                  payload_limit=payload_limit, max_queued_pairs=max_queued_pairs)
    for name, value in counts.items():
      if value < 1:
        raise RunError(f"--{name}={value} must be at least 1")
    if max_wait_ms < 0 or request_timeout_s <= 0:
      raise RunError(f"--max_wait_ms={max_wait_ms:g} must be >= 0 and --request_timeout_s="
                     f"{request_timeout_s:g} > 0")
    if workers != 1 and (runtime != "onnxruntime" or not 1 <= workers <= cores):
      raise RunError(f"--workers={workers}: more than one worker needs --runtime=onnxruntime "
                     f"and at most one per usable core ({cores})")
    return cls(Limits(max_batch_tokens, max_wait_ms, max_queued_pairs, request_timeout_s),
               max_client_batch_size, payload_limit, workers=workers)


class Metrics:
  """The server's Prometheus metrics, in a registry of its own; per-route metrics are labelled
  by `route`: a row's route as the engine names it ("0.25" for a width, "3" for an exit)."""

  def __init__(self, route: str = "route"):
    self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter("sharcs_requests", "Requests by HTTP status", ["status"],
                                 registry=self.registry)
    self.queue_time = prom.Histogram("sharcs_queue_seconds", "Time queued before the worker took "
                                     "the request", registry=self.registry)
    self.inference_time = prom.Histogram("sharcs_inference_seconds", "Engine time per batch, by "
                                         "the costliest route it ran", [route],
                                         registry=self.registry)
    self.batch_size = prom.Histogram("sharcs_batch_pairs", "Pairs per route group of a batch",
                                     [route], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256),
                                     registry=self.registry)
    self.pairs = prom.Counter("sharcs_pairs", "Pairs answered, by route", [route],
                              registry=self.registry)
    self.queue_length = prom.Gauge("sharcs_queue_pairs", "Pairs waiting in the queue",
                                   registry=self.registry)

  def observe(self, batch: list[Pending], predictions: Any, seconds: float) -> None:
    for pending in batch:
      self.queue_time.observe(pending.started - pending.enqueued)
    routes = predictions.metric_routes()
    values, counts = np.unique(routes, return_counts=True)
    for value, count in zip(values, counts):
      self.batch_size.labels(value).observe(int(count))
      self.pairs.labels(value).inc(int(count))
    if routes:
      self.inference_time.labels(routes[int(np.argmax(predictions.gflops))]).observe(seconds)


def error_response(error: RequestError, metrics: Metrics) -> JSONResponse:
  metrics.requests.labels(str(error.status)).inc()
  headers = {"Retry-After": "1"} if error.status == 429 else None
  return JSONResponse(error.body(), status_code=error.status, headers=headers)


class State:
  """What the routes share: the engine once ready, its batcher, and whether the server drains."""

  def __init__(self, options: ServerOptions):
    self.options = options
    self.metrics = Metrics()
    self.engine: Any = None
    self.batcher: Batcher | None = None
    self.info: dict[str, Any] = {}
    self.draining = False
    self.failed: str | None = None

  def ready(self) -> bool:
    return self.batcher is not None and not self.draining

  def start(self, engine: Any, info: dict[str, Any]) -> None:
    self.engine, self.info = engine, info
    # Requests are tokenised once, on the loop, and the worker only runs programs. The loop has a
    # tokenizer of its own: a fast tokenizer keeps padding and truncation as state of the object,
    # so sharing one with a thread that also encodes would change how a batch is padded.
    self.tokenizer = copy.deepcopy(engine.tokenizer)
    self.batcher = Batcher(lambda parts: engine.run(batching.concatenate(parts)),
                           self.options.limits, self.metrics.observe, self.options.workers)

  def encode(self, rows: list[tuple[str, ...]]) -> batching.Encoded:
    return batching.encode_texts(rows, self.tokenizer, self.engine.length_buckets)


def check_payload(size: int | str | None, limit: int) -> None:
  """413 for a body over `--payload_limit` (checked on the declared length, then the real one)."""
  if size is not None and int(size) > limit:
    raise RequestError(413, "payload", f"a body of {size} bytes exceeds --payload_limit={limit}")


def make_app(state: State) -> Starlette:
  metrics = state.metrics

  async def health(request: Request) -> Response:
    return Response(status_code=200 if state.ready() else 503)

  async def info(request: Request) -> Response:
    if state.batcher is None:
      return error_response(RequestError(503, "unhealthy", "the programs are loading"), metrics)
    return JSONResponse(state.info)

  async def metrics_route(request: Request) -> Response:
    if state.batcher is not None:
      metrics.queue_length.set(state.batcher.queue_length())
    return Response(prom.generate_latest(metrics.registry), media_type=prom.CONTENT_TYPE_LATEST)

  async def predict(request: Request) -> Response:
    arrived = time.monotonic()
    try:
      if not state.ready():
        raise RequestError(503, "unhealthy", "the server is shutting down" if state.draining
                           else "the programs are loading")
      check_payload(request.headers.get("content-length"), state.options.payload_limit)
      raw = await request.body()
      check_payload(len(raw), state.options.payload_limit)
      try:
        body = json.loads(raw)
      except (ValueError, UnicodeDecodeError) as e:
        raise RequestError(422, "validation", f"the body is not JSON: {e}") from None
      rows, single = tei.parse_inputs(body, len(state.engine.task.text_columns),
                                      state.options.max_client_batch_size)
      inputs = state.encode(rows)
      future = state.batcher.submit(inputs, len(inputs), int(inputs.lengths.sum()))
      try:
        predictions, begin, end, seconds = await future
      except asyncio.CancelledError:
        future.cancel()  # the worker skips it
        raise
    except RequestError as e:
      return error_response(e, metrics)
    except ClientDisconnect:
      metrics.requests.labels("499").inc()
      return Response(status_code=499)
    except Exception as e:  # the engine failed: answered, never lost
      return error_response(RequestError(500, "backend", f"{type(e).__name__}: {e}"), metrics)
    labels = state.engine.task.label_names
    raw_scores = bool(body.get("raw_scores", False))
    answers = []
    for i in range(begin, end):
      answer: Any = tei.scores(predictions.probabilities[i], labels, raw_scores)
      if body.get("details"):
        answer = {"scores": answer, **predictions.route_detail(i),
                  "gflops": float(predictions.gflops[i])}
      answers.append(answer)
    done = time.monotonic()
    metrics.requests.labels("200").inc()
    total = done - arrived
    headers = {"x-queue-time": f"{1e3 * max(total - seconds, 0.0):.3f}",
               "x-inference-time": f"{1e3 * seconds:.3f}", "x-total-time": f"{1e3 * total:.3f}"}
    return JSONResponse(answers[0] if single else answers, headers=headers)

  return Starlette(routes=[Route("/health", health), Route("/info", info),
                           Route("/metrics", metrics_route),
                           Route("/predict", predict, methods=["POST"])])


def engine_info(engine: Any, options: ServerOptions, rule: str, budget: str) -> dict[str, Any]:
  """`/info`: the model, the routes its rows may take (each stage's layer and width, and each
  route's name as responses give it), the rule and the server's limits."""
  limits = options.limits
  layout = engine.layout
  routed = ({"widths": [float(w) for w in layout.widths]} if layout.by_width else
            {"exit_layers": [int(layer) for layer in layout.stage_layers],
             "stage_widths": [float(w) for w in layout.stage_widths],
             "exits": engine.route_names()})
  return {"model": engine.workdir, "task": engine.task.name,
          "labels": list(engine.task.label_names), **routed, "rule": engine.rule.to_json(),
          "budget": budget or None, "rule_name": rule, "precision": engine.precision,
          "runtime": engine.runtime, "version": VERSION,
          "limits": {**dataclasses.asdict(limits),
                     "max_client_batch_size": options.max_client_batch_size,
                     "payload_limit": options.payload_limit, "workers": options.workers}}


def serve(build_engine: Callable[[], Any], host: str, port: int, options: ServerOptions,
          describe: Callable[[Any], dict[str, Any]], log: Callable[[str], None]) -> int:
  """Binds host:port, builds the engine behind a 503 `/health`, serves until SIGTERM or SIGINT,
  then drains: `/health` and new requests get 503 while everything queued is answered."""
  import socket

  import uvicorn

  sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    from sharcs_jax.errors import RunError
    raise RunError(f"--host={host} --port={port}: cannot listen there ({e.strerror})") from None
  state = State(options)

  def build() -> None:
    try:
      engine = build_engine()
      state.start(engine, describe(engine))
      log(f"ready on http://{host}:{port}")
    except Exception as e:  # shown, and the server stops: /health never turned 200
      state.failed = f"{type(e).__name__}: {e}"
      log(f"FATAL {state.failed}")
      server.should_exit = True

  class DrainingServer(uvicorn.Server):
    def handle_exit(self, sig: int, frame: Any) -> None:
      if state.draining:
        return super().handle_exit(sig, frame)
      state.draining = True
      log("draining: answering queued requests, refusing new ones")

      def drain() -> None:
        if state.batcher is not None:
          state.batcher.drain(options.drain_timeout_s)
        time.sleep(0.2)  # let the loop write the last responses
        self.should_exit = True
      threading.Thread(target=drain, daemon=True).start()

  config = uvicorn.Config(make_app(state), log_level="warning", access_log=False,
                          timeout_graceful_shutdown=int(options.drain_timeout_s))
  server = DrainingServer(config)
  threading.Thread(target=build, name="sharcs-build", daemon=True).start()
  server.run(sockets=[sock])
  return 1 if state.failed else 0
