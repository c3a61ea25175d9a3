"""The ONNX frontend: load a graph, find its sites, rewrite them, save the result."""
