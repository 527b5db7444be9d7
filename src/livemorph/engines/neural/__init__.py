"""The embedded neural engine: ONNX style-transfer networks on the CPU, steered by text."""
