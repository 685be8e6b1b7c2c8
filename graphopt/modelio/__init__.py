"""Models in and out: load and check a user's ONNX file, import it as an onnx-graphsurgeon graph, fold constants, guard control flow, export a checked model."""
