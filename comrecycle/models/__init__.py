"""Stage models: PyTorch definitions, training on simulated logs, ONNX export."""
