"""FLOPs from XLA's cost analysis of the real backbone's shapes, against the analytic count."""

from __future__ import annotations

import pytest

from sharcs_jax.model.flops import analytic_flops, param_shapes
from sharcs_jax.model import EncoderConfig, SharcsModel
from sharcs_jax.serve.programs import ProgramKey, Programs

# all-MiniLM-L6-v2's architecture; FLOPs need shapes only, so no weights are loaded.
MINILM = EncoderConfig(layout="bert", vocab_size=30522, hidden_size=384, num_layers=6,
                       num_heads=12, intermediate_size=1536, max_position_embeddings=512,
                       type_vocab_size=2)
WIDTHS = (0.25, 0.5, 0.75, 1.0)


def forward_flops(model: SharcsModel, width: float, batch_size: int, seq_len: int) -> float:
  """XLA FLOPs of the whole compiled forward at one width, as `Programs` compiles it."""
  programs = Programs(model, param_shapes(model), batch_buckets=(batch_size,),
                      length_buckets=(seq_len,), kinds=("forward",))
  return programs.flops[ProgramKey("forward", width, batch_size, seq_len)]


@pytest.fixture(scope="module")
def minilm():
  return SharcsModel(MINILM, num_classes=2, widths=WIDTHS, router_layer=2, router_hidden=512)


# Compiling the real backbone takes 1-2 s a program: `slow`, out of the fast lane.
@pytest.mark.slow
@pytest.mark.parametrize("batch_size, seq_len", [(1, 32), (8, 64)])
def test_xla_flops_fall_with_width_and_match_analytic(minilm, batch_size, seq_len):
  xla = [forward_flops(minilm, w, batch_size, seq_len) for w in WIDTHS]
  assert all(a < b for a, b in zip(xla, xla[1:])), xla
  for w, measured in zip(WIDTHS, xla):
    counted = analytic_flops(minilm, w, batch_size, seq_len)["total"]
    assert abs(measured / counted - 1) < 0.01, (w, measured, counted)


@pytest.mark.slow
def test_flops_scale_with_batch_and_router_layer(minilm):
  one, four = (forward_flops(minilm, 0.5, b, 32) for b in (1, 4))
  assert 3.9 < four / one < 4.1
  deeper = SharcsModel(MINILM, num_classes=2, widths=WIDTHS, router_layer=4, router_hidden=512)
  assert forward_flops(deeper, 0.25, 1, 32) > forward_flops(minilm, 0.25, 1, 32)


def test_narrow_layer_costs_about_w_squared(minilm):
  """The method's rule of thumb: an adaptive layer at width w costs about w**2 of a full one."""
  parts = {w: analytic_flops(minilm, w, 1, 32)["adaptive_layers"] for w in WIDTHS}
  for w in (0.25, 0.5, 0.75):
    assert 0.8 * w**2 < parts[w] / parts[1.0] < 1.5 * w**2


@pytest.mark.slow
def test_engine_example_flops_match_analytic(minilm):
  """Per-example FLOPs as the engine counts them (prefix + router program, plus the routed
  width's program) agree with the analytic count of the whole forward."""
  programs = Programs(minilm, param_shapes(minilm), batch_buckets=(1,), length_buckets=(32,))
  for w in WIDTHS:
    counted = analytic_flops(minilm, w, 1, 32)["total"]
    assert abs(programs.example_flops(w, 32) / counted - 1) < 0.01, w
