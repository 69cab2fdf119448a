"""Graph passes on an exported ONNX program: its dense layers as MatMul + Add.

jax2onnx writes every `dot_general` as `Einsum` and a 2-D dense layer as `Gemm`. ONNX Runtime's
dynamic quantisation rewrites only `MatMul` whose second input is a constant (an int8 weight and
a `MatMulInteger`/`DynamicQuantizeMatMul` kernel); an `Einsum` or `Gemm` stays float32. So before
quantising, each contraction with a constant weight becomes Reshape -> MatMul -> Reshape ->
Transpose (the weight reshaped once, offline), and each `Gemm` becomes MatMul + Add. Contractions
of two activations (attention scores and context) become Transpose -> batched MatMul, which ONNX
Runtime runs faster than its general Einsum. The graph must be constant-folded first, so that
the weights' width slices are initializers (`onnx_programs` folds it with ONNX Runtime).

Imports only numpy and onnx.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper


class _Graph:
  """New nodes and initializers for one graph, with names that cannot clash."""

  def __init__(self, graph: onnx.GraphProto):
    self.graph = graph
    self.initializers = {t.name: t for t in graph.initializer}
    self.count = 0

  def name(self, base: str) -> str:
    self.count += 1
    return f"{base}__lowered{self.count}"

  def constant(self, base: str, value: np.ndarray) -> str:
    name = self.name(base)
    self.graph.initializer.append(numpy_helper.from_array(value, name))
    return name

  def node(self, op: str, inputs: list[str], output: str | None = None, **attributes) -> tuple:
    output = output or self.name(op.lower())
    return helper.make_node(op, inputs, [output], name=self.name(op), **attributes), output


def _parse(equation: str) -> tuple[str, str, str] | None:
  lhs, _, out = equation.replace(" ", "").partition("->")
  operands = lhs.split(",")
  if len(operands) != 2 or "." in equation or not out:
    return None
  return operands[0], operands[1], out


def _transpose_to(g: _Graph, x: str, spec: str, order: str, nodes: list) -> str:
  if spec == order:
    return x
  node, out = g.node("Transpose", [x], perm=[spec.index(c) for c in order])
  nodes.append(node)
  return out


def _einsum_with_weight(g: _Graph, node: onnx.NodeProto, x_spec: str, w_spec: str, out: str,
                        weight: np.ndarray) -> list | None:
  """x[free..., C...] . W[C..., F...] -> MatMul over the contracted letters C, leading in W and
  trailing in x; None where the equation has another shape (batch letters in both operands)."""
  contracted = "".join(c for c in w_spec if c in x_spec and c not in out)
  if (not contracted or not w_spec.startswith(contracted) or not x_spec.endswith(contracted)
      or any(c in x_spec for c in w_spec[len(contracted):]) or len(set(x_spec + w_spec)) !=
      len(x_spec) + len(w_spec) - len(contracted)):
    return None
  free_x, free_w = x_spec[:-len(contracted)], w_spec[len(contracted):]
  if sorted(out) != sorted(free_x + free_w):
    return None
  k = int(np.prod(weight.shape[:len(contracted)]))
  matrix = np.ascontiguousarray(weight.reshape(k, -1))
  nodes, x = [], node.input[0]
  if len(contracted) > 1:  # [free..., C...] -> [free..., prod C]
    shape = g.constant("shape", np.array([0] * len(free_x) + [k], np.int64))
    reshape, x = g.node("Reshape", [x, shape])
    nodes.append(reshape)
  matmul, y = g.node("MatMul", [x, g.constant(node.input[1], matrix)])
  nodes.append(matmul)
  if len(free_w) > 1:  # [free..., prod F] -> [free..., F...]
    shape = g.constant("shape", np.array([0] * len(free_x) + list(weight.shape[len(contracted):]),
                                         np.int64))
    reshape, y = g.node("Reshape", [y, shape])
    nodes.append(reshape)
  final = _transpose_to(g, y, free_x + free_w, out, nodes)
  nodes.append(helper.make_node("Identity", [final], [node.output[0]], name=g.name("Identity")))
  return nodes


def _einsum_of_activations(g: _Graph, node: onnx.NodeProto, x_spec: str, y_spec: str,
                           out: str) -> list | None:
  """A batched matmul with one free and one contracted letter per operand:
  x[B..., i, c] @ y[B..., c, j], the operands and the result transposed as the equation says."""
  batch = "".join(c for c in x_spec if c in y_spec and c in out)
  contracted = [c for c in x_spec if c in y_spec and c not in out]
  free_x = [c for c in x_spec if c not in y_spec]
  free_y = [c for c in y_spec if c not in x_spec]
  if (len(contracted) != 1 or len(free_x) != 1 or len(free_y) != 1 or len(set(x_spec)) != len(
      x_spec) or len(set(y_spec)) != len(y_spec) or sorted(out) != sorted(batch + free_x[0]
                                                                           + free_y[0])):
    return None
  nodes = []
  x = _transpose_to(g, node.input[0], x_spec, batch + free_x[0] + contracted[0], nodes)
  y = _transpose_to(g, node.input[1], y_spec, batch + contracted[0] + free_y[0], nodes)
  matmul, z = g.node("MatMul", [x, y])
  nodes.append(matmul)
  final = _transpose_to(g, z, batch + free_x[0] + free_y[0], out, nodes)
  nodes.append(helper.make_node("Identity", [final], [node.output[0]], name=g.name("Identity")))
  return nodes


def _gemm(g: _Graph, node: onnx.NodeProto) -> list | None:
  """Gemm(A, B, C) with a constant B and no transposed A -> MatMul(A, alpha B') + beta C."""
  attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
  if attributes.get("transA", 0) or node.input[1] not in g.initializers:
    return None
  weight = numpy_helper.to_array(g.initializers[node.input[1]])
  if attributes.get("transB", 0):
    weight = weight.T
  weight = np.ascontiguousarray(weight * np.float32(attributes.get("alpha", 1.0)))
  nodes = []
  matmul, y = g.node("MatMul", [node.input[0], g.constant(node.input[1], weight)])
  nodes.append(matmul)
  if len(node.input) > 2 and node.input[2]:
    if node.input[2] not in g.initializers:
      return None
    bias = numpy_helper.to_array(g.initializers[node.input[2]])
    bias = (bias * np.float32(attributes.get("beta", 1.0))).astype(np.float32)
    add, y = g.node("Add", [y, g.constant(node.input[2], bias)])
    nodes.append(add)
  nodes.append(helper.make_node("Identity", [y], [node.output[0]], name=g.name("Identity")))
  return nodes


def lower_to_matmul(model: onnx.ModelProto) -> onnx.ModelProto:
  """A copy of `model` with Einsum and Gemm rewritten as MatMul where the pattern allows (see
  module doc); any other node is kept as it is. ONNX Runtime removes the Identity nodes."""
  model = onnx.ModelProto.FromString(model.SerializeToString())
  g = _Graph(model.graph)
  rewritten = []
  for node in model.graph.node:
    new = None
    if node.op_type == "Einsum":
      equation = helper.get_attribute_value(node.attribute[0])
      parsed = _parse(equation.decode() if isinstance(equation, bytes) else equation)
      if parsed is not None:
        x_spec, w_spec, out = parsed
        if node.input[1] in g.initializers:
          weight = numpy_helper.to_array(g.initializers[node.input[1]])
          new = _einsum_with_weight(g, node, x_spec, w_spec, out, weight)
        elif node.input[0] not in g.initializers:
          new = _einsum_of_activations(g, node, x_spec, w_spec, out)
    elif node.op_type == "Gemm":
      new = _gemm(g, node)
    rewritten.extend(new if new is not None else [node])
  del model.graph.node[:]
  model.graph.node.extend(rewritten)
  return _without_unused_initializers(model)


def _without_unused_initializers(model: onnx.ModelProto) -> onnx.ModelProto:
  used = {name for node in model.graph.node for name in node.input}
  kept = [t for t in model.graph.initializer if t.name in used]
  del model.graph.initializer[:]
  model.graph.initializer.extend(kept)
  return model


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
  """How many nodes of each op type: what the tests and the export log check."""
  counts: dict[str, int] = {}
  for node in model.graph.node:
    counts[node.op_type] = counts.get(node.op_type, 0) + 1
  return counts
