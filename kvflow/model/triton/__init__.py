"""Triton kernels of the model layer (multi-LoRA's segmented shrink and expand): the optional `gpu` extra.
These modules import triton at the top; the rest of kvflow imports them only lazily (model/lora.py)."""
