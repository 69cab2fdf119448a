"""ONNX Runtime: the engine's programs converted to ONNX (fp32, int8), their sessions and runners."""
