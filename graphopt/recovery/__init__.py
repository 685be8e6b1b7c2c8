"""Weights after a move: least-squares repair, --finetune (ONNX -> torch), --recover-top distillation."""
