"""Device side: path-only ONNX inference, local serving, memory-capped local training."""
