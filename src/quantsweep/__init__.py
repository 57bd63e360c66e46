"""quantsweep: imatrix-guided ik_llama.cpp quantization sweeps for MLA + MoE models."""

__version__ = "0.1.0"
