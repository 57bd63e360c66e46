"""Planning a quantization without running it: the port of llama-quantize's per-tensor type
selection (selection), the Plan with sizes and warnings (plan) and recipes (recipes)."""
