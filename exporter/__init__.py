"""Experts to ONNX bundles for devices."""
