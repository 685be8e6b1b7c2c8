"""Weights after a move: least-squares repair (passes call it), --finetune (the ONNX -> torch interpreter) and --recover-top distillation of the best candidates."""
