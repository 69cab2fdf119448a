"""Exports of a trained run: jax.export / ONNX parts with a manifest, their loader, and the HF export."""
