"""Graph passes on an exported ONNX program: its dense layers as MatMul + Add.

jax2onnx writes every `dot_general` as `Einsum` and a 2-D dense layer as `Gemm`. ONNX Runtime's
dynamic quantisation rewrites only `MatMul` whose second input is a constant (an int8 weight and
a `MatMulInteger`/`DynamicQuantizeMatMul` kernel); an `Einsum` or `Gemm` stays float32. So before
quantising, each contraction with a constant weight becomes Reshape -> MatMul -> Reshape ->
Transpose (the weight reshaped once, offline), and each `Gemm` becomes MatMul + Add. Contractions
of two activations (attention scores and context) become Transpose -> batched MatMul, which ONNX
Runtime runs faster than its general Einsum. The graph must be constant-folded first, so that
the weights' width slices are initializers (`onnx_programs` folds it with ONNX Runtime).

`split_packed_projections` first splits a packed projection (the layers' one Q/K/V einsum, its
bias Add, and the slices `x[0]`, `x[1]`, `x[2]` of its result) into one MatMul + Add per slice:
the packed form moved the whole [3, B, S, H, E] tensor through a transpose and three copies.
`fuse_norms_and_gelu` then writes jax2onnx's spelled-out LayerNorm (mean, centred square, mean,
sqrt, divide, scale, shift) as one `LayerNormalization` and its erf GELU as one ONNX Runtime
`Gelu`: ONNX Runtime's own fusions do not recognise that spelling, and unfused these element-wise
chains took half of an int8 pass (docs/serving.md). Its session would then fuse each residual Add
into `SkipLayerNormalization`, a slower kernel here, so `ort_runner` switches that fusion off.

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
    # Names already taken, by an earlier pass too: tensors, initializers and nodes.
    self.taken = set(self.initializers) | {n.name for n in graph.node} | {
        name for n in graph.node for name in (*n.input, *n.output)}

  def name(self, base: str) -> str:
    while True:
      self.count += 1
      name = f"{base}__lowered{self.count}"
      if name not in self.taken:
        self.taken.add(name)
        return name

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


def _weight_contraction(x_spec: str, w_spec: str, out: str) -> tuple[str, str, str] | None:
  """(contracted, free in x, free in W) of x[free..., C...] . W[C..., F...], the contracted
  letters C leading in W and trailing in x; None for another shape (batch letters in both)."""
  contracted = "".join(c for c in w_spec if c in x_spec and c not in out)
  if (not contracted or not w_spec.startswith(contracted) or not x_spec.endswith(contracted)
      or any(c in x_spec for c in w_spec[len(contracted):]) or len(set(x_spec + w_spec)) !=
      len(x_spec) + len(w_spec) - len(contracted)):
    return None
  free_x, free_w = x_spec[:-len(contracted)], w_spec[len(contracted):]
  return (contracted, free_x, free_w) if sorted(out) == sorted(free_x + free_w) else None


def _matrix_rows(g: _Graph, x: str, free_x: str, k: int, contracted: str, nodes: list) -> str:
  """x[free..., C...] as [free..., prod C] (a Reshape where C has more than one letter)."""
  if len(contracted) == 1:
    return x
  shape = g.constant("shape", np.array([0] * len(free_x) + [k], np.int64))
  reshape, x = g.node("Reshape", [x, shape])
  nodes.append(reshape)
  return x


def _einsum_with_weight(g: _Graph, node: onnx.NodeProto, x_spec: str, w_spec: str, out: str,
                        weight: np.ndarray) -> list | None:
  """x[free..., C...] . W[C..., F...] -> MatMul over the contracted letters C (see
  `_weight_contraction`); None where the equation has another shape."""
  found = _weight_contraction(x_spec, w_spec, out)
  if found is None:
    return None
  contracted, free_x, free_w = found
  k = int(np.prod(weight.shape[:len(contracted)]))
  matrix = np.ascontiguousarray(weight.reshape(k, -1))
  nodes: list = []
  x = _matrix_rows(g, node.input[0], free_x, k, contracted, nodes)
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
  """Also drops the shapes jax2onnx recorded of tensors that are gone."""
  used = {name for node in model.graph.node for name in node.input}
  kept = [t for t in model.graph.initializer if t.name in used]
  del model.graph.initializer[:]
  model.graph.initializer.extend(kept)
  made = {name for node in model.graph.node for name in node.output}
  shapes = [v for v in model.graph.value_info if v.name in made]
  del model.graph.value_info[:]
  model.graph.value_info.extend(shapes)
  return model


def _constant_values(g: _Graph, name: str) -> list | None:
  tensor = g.initializers.get(name)
  return None if tensor is None else numpy_helper.to_array(tensor).reshape(-1).tolist()


def _takes_slice(g: _Graph, node: onnx.NodeProto, source: str, dims: list, producers: dict,
                 consumers: dict) -> tuple[int, onnx.NodeProto] | None:
  """(i, its Squeeze) where `node` with the Squeeze after it is `source[i]`: start i on axis 0,
  0 on the others, unit steps, and ends 1 + i then every axis's full extent (a constant equal to
  the static dim, or for the symbolic batch dim that dim read from a tensor's shape, as jax2onnx
  writes `x[i]`)."""
  if node.op_type != "Slice" or node.input[0] != source or len(node.input) < 4:
    return None
  starts, axes = _constant_values(g, node.input[1]), _constant_values(g, node.input[3])
  steps = _constant_values(g, node.input[4]) if len(node.input) > 4 else [1] * len(dims)
  rank = len(dims)
  if (starts is None or axes != list(range(rank)) or steps != [1] * rank
      or any(starts[1:])):
    return None
  squeeze = _only(consumers, node.output[0], "Squeeze")
  if squeeze is None or _constant_values(g, squeeze.input[1]) != [0]:
    return None
  concat = producers.get(node.input[2])
  if concat is None or concat.op_type != "Concat" or len(concat.input) != rank:
    return None
  for axis, part in enumerate(concat.input):
    value = _constant_values(g, part)
    if axis == 0:
      if value != [starts[0] + 1]:
        return None
    elif value is not None:
      if value != [dims[axis]]:
        return None
    else:  # a symbolic dim (the batch), read as Gather(Shape(...)) of a tensor that has it
      gather = producers.get(part)
      shape = gather is not None and gather.op_type == "Gather" and producers.get(gather.input[0])
      if dims[axis] is not None or not shape or shape.op_type != "Shape":
        return None
  return int(starts[0]), squeeze


def _analysed_copy(model: onnx.ModelProto) -> tuple:
  """What a pattern pass reads: (a copy of `model`, its `_Graph`, each tensor's inferred dims
  (None where symbolic), the node making each tensor, the nodes reading each tensor)."""
  model = onnx.ModelProto.FromString(model.SerializeToString())
  inferred = onnx.shape_inference.infer_shapes(model)
  dims = {v.name: [d.dim_value if d.HasField("dim_value") else None
                   for d in v.type.tensor_type.shape.dim]
          for v in [*inferred.graph.value_info, *inferred.graph.input, *inferred.graph.output]
          if v.type.tensor_type.HasField("shape")}
  producers = {out: node for node in model.graph.node for out in node.output}
  consumers: dict[str, list] = {}
  for node in model.graph.node:
    for name in set(node.input):
      consumers.setdefault(name, []).append(node)
  return model, _Graph(model.graph), dims, producers, consumers


def split_packed_projections(model: onnx.ModelProto) -> onnx.ModelProto:
  """A copy of `model` with each packed projection split (module doc); nodes left without a
  reader (the slices' shape arithmetic) are dropped."""
  model, g, static, producers, consumers = _analysed_copy(model)
  replaced: dict[int, list] = {}  # id(einsum) -> the nodes it becomes
  renamed: set[int] = set()  # ids of the Squeezes whose outputs the new nodes now write
  for node in model.graph.node:
    if node.op_type != "Einsum" or node.input[1] not in g.initializers:
      continue
    equation = helper.get_attribute_value(node.attribute[0])
    parsed = _parse(equation.decode() if isinstance(equation, bytes) else equation)
    if parsed is None:
      continue
    found = _weight_contraction(*parsed)
    if found is None:
      continue
    contracted, free_x, free_w = found
    if parsed[2] != free_w[0] + free_x + free_w[1:]:  # the packed letter first, then as is
      continue
    add = _only(consumers, node.output[0], "Add")
    bias_name = add and _other(add, node.output[0])
    if add is None or bias_name not in g.initializers or add.output[0] not in static:
      continue
    weight = numpy_helper.to_array(g.initializers[node.input[1]])
    bias = numpy_helper.to_array(g.initializers[bias_name])
    packed = weight.shape[len(contracted)]
    if bias.shape != (packed,) + (1,) * len(free_x) + weight.shape[len(contracted) + 1:]:
      continue
    slices = [_takes_slice(g, reader, add.output[0], static[add.output[0]], producers, consumers)
              for reader in consumers[add.output[0]] if reader.op_type != "Shape"]
    if not slices or None in slices:
      continue
    k = int(np.prod(weight.shape[:len(contracted)]))
    nodes: list = []
    x = _matrix_rows(g, node.input[0], free_x, k, contracted, nodes)
    for i, squeeze in slices:
      part = np.ascontiguousarray(np.take(weight, i, axis=len(contracted)).reshape(k, -1))
      matmul, y = g.node("MatMul", [x, g.constant(node.input[1], part)])
      plus, y = g.node("Add", [y, g.constant(bias_name, bias[i].reshape(-1))])
      shape = g.constant("shape", np.array([0] * len(free_x) + list(weight.shape[
          len(contracted) + 1:]), np.int64))
      nodes += [matmul, plus, helper.make_node("Reshape", [y, shape], [squeeze.output[0]],
                                               name=g.name("Reshape"))]
      renamed.add(id(squeeze))
    replaced[id(node)] = nodes
  kept = []
  for node in model.graph.node:
    if id(node) in renamed:
      continue
    kept.extend(replaced.get(id(node), [node]))
  del model.graph.node[:]
  model.graph.node.extend(_live(kept, {o.name for o in model.graph.output}))
  return _without_unused_initializers(model)


def _live(nodes: list, outputs: set[str]) -> list:
  """`nodes` less those whose outputs nothing reads (repeatedly)."""
  while True:
    read = outputs | {name for node in nodes for name in node.input}
    alive = [node for node in nodes if any(out in read for out in node.output)]
    if len(alive) == len(nodes):
      return nodes
    nodes = alive


def _scalar(g: _Graph, name: str) -> float | None:
  values = _constant_values(g, name)
  return float(values[0]) if values is not None and len(values) == 1 else None


def _only(consumers: dict[str, list], name: str, op: str) -> onnx.NodeProto | None:
  """The one node that reads `name`, if it is an `op`."""
  readers = consumers.get(name, [])
  return readers[0] if len(readers) == 1 and readers[0].op_type == op else None


def _other(node: onnx.NodeProto, name: str) -> str:
  """A binary node's input that is not `name`."""
  return node.input[1] if node.input[0] == name else node.input[0]


def _reduces_last_axis(g: _Graph, node: onnx.NodeProto, ranks: dict[str, int]) -> bool:
  attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
  if attributes.get("keepdims", 1) != 1:
    return False
  axes = attributes.get("axes")
  if axes is None and len(node.input) > 1:
    axes = _constant_values(g, node.input[1])
  rank = ranks.get(node.input[0])
  return axes is not None and len(axes) == 1 and (axes[0] == -1 or (rank is not None
                                                                     and axes[0] == rank - 1))


def _layer_norm(g: _Graph, mean: onnx.NodeProto, consumers: dict, ranks: dict[str, int]
                ) -> tuple[list, onnx.NodeProto] | None:
  """ReduceMean(x) -> Sub -> square -> ReduceMean -> Add eps -> Sqrt -> Div -> Mul scale -> Add
  shift, from its first ReduceMean: (the nodes it replaces, one LayerNormalization)."""
  x = mean.input[0]
  if not _reduces_last_axis(g, mean, ranks):
    return None
  sub = _only(consumers, mean.output[0], "Sub")
  if sub is None or list(sub.input) != [x, mean.output[0]]:
    return None
  centred = sub.output[0]
  readers = consumers.get(centred, [])
  square = next((n for n in readers if (n.op_type == "Mul" and list(n.input) == [centred] * 2)
                 or (n.op_type == "Pow" and _scalar(g, n.input[1]) == 2.0)), None)
  divide = next((n for n in readers if n.op_type == "Div" and n.input[0] == centred), None)
  if square is None or divide is None or len(readers) != 2:
    return None
  variance = _only(consumers, square.output[0], "ReduceMean")
  if variance is None or not _reduces_last_axis(g, variance, ranks):
    return None
  add_eps = _only(consumers, variance.output[0], "Add")
  eps = add_eps and _scalar(g, _other(add_eps, variance.output[0]))
  sqrt = add_eps and _only(consumers, add_eps.output[0], "Sqrt")
  if eps is None or sqrt is None or divide.input[1] != sqrt.output[0]:
    return None
  scale = _only(consumers, divide.output[0], "Mul")
  shift = scale and _only(consumers, scale.output[0], "Add")
  if shift is None:
    return None
  vectors = []  # scale and shift as vectors: jax2onnx writes them as [1, ..., 1, d]
  for name in (_other(scale, divide.output[0]), _other(shift, scale.output[0])):
    tensor = g.initializers.get(name)
    if tensor is None or any(d != 1 for d in tensor.dims[:-1]):
      return None
    vectors.append(g.constant(name, numpy_helper.to_array(tensor).reshape(-1)))
  fused = helper.make_node("LayerNormalization", [x, *vectors], [shift.output[0]],
                           name=g.name("LayerNormalization"), axis=-1, epsilon=eps)
  return [mean, sub, square, variance, add_eps, sqrt, divide, scale, shift], fused


def _gelu(g: _Graph, erf: onnx.NodeProto, producers: dict, consumers: dict
          ) -> tuple[list, onnx.NodeProto] | None:
  """0.5 x (1 + erf(x / sqrt 2)) as jax2onnx writes it, from its Erf: (its nodes, one Gelu)."""
  scaled = producers.get(erf.input[0])
  if scaled is None or scaled.op_type != "Mul":
    return None
  x = next((i for i in scaled.input if i not in g.initializers), None)
  constant = _scalar(g, _other(scaled, x)) if x is not None else None
  if constant is None or abs(constant - 1 / np.sqrt(2)) > 1e-6:
    return None
  plus_one = _only(consumers, erf.output[0], "Add")
  if plus_one is None or _scalar(g, _other(plus_one, erf.output[0])) != 1.0:
    return None
  product = _only(consumers, plus_one.output[0], "Mul")
  half = product and producers.get(_other(product, plus_one.output[0]))
  if (half is None or half.op_type != "Mul" or x not in half.input
      or _scalar(g, _other(half, x)) != 0.5 or len(consumers.get(half.output[0], [])) != 1
      or len(consumers.get(scaled.output[0], [])) != 1):
    return None
  fused = helper.make_node("Gelu", [x], [product.output[0]], name=g.name("Gelu"),
                           domain="com.microsoft")
  return [scaled, erf, plus_one, half, product], fused


def fuse_norms_and_gelu(model: onnx.ModelProto) -> onnx.ModelProto:
  """A copy of `model` with LayerNorm and erf-GELU chains as single nodes (module doc)."""
  model, g, static, producers, consumers = _analysed_copy(model)
  ranks = {name: len(dims) for name, dims in static.items()}
  replaced: dict[int, onnx.NodeProto | None] = {}  # id(node) -> its fused node, or None: dropped
  for node in model.graph.node:
    if id(node) in replaced:
      continue
    match = (_layer_norm(g, node, consumers, ranks) if node.op_type == "ReduceMean" else
             _gelu(g, node, producers, consumers) if node.op_type == "Erf" else None)
    if match is not None and not any(id(n) in replaced for n in match[0]):
      chain, fused = match
      for n in chain:
        replaced[id(n)] = None
      replaced[id(chain[-1])] = fused  # the fused node sits where the chain's output was made
  nodes = [replaced.get(id(n), n) for n in model.graph.node]
  del model.graph.node[:]
  model.graph.node.extend(n for n in nodes if n is not None)
  if any(n.domain == "com.microsoft" for n in model.graph.node) and not any(
      o.domain == "com.microsoft" for o in model.opset_import):
    model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
  return _without_unused_initializers(model)


def op_counts(model: onnx.ModelProto) -> dict[str, int]:
  """How many nodes of each op type: what the tests and the export log check."""
  counts: dict[str, int] = {}
  for node in model.graph.node:
    counts[node.op_type] = counts.get(node.op_type, 0) + 1
  return counts
