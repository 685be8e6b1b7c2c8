"""Models in and out: load and check an ONNX file, the graphsurgeon graph, constant folding, export."""
