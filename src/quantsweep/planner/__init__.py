"""Planning a quantization without running it: the port of llama-quantize's per-tensor type
selection (selection), the Plan with sizes and warnings (plan), recipes (recipes) and which
pool file each tensor of a recipe is copied from (pool). What to quantize each tensor to for a
size budget, from measurements, is the allocator's (quantsweep.allocator)."""
