"""Hugging Face checkpoints (bf16/FP8 safetensors) to GGUF: the first step of a sweep that starts from a download."""
