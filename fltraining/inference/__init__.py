"""Inference with uncertainty: ONNX graphs run in onnxruntime, never client code."""
