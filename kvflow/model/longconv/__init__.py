"""Long-convolution language models ("Simple Hardware-Efficient Long Convolutions for Sequence
Modeling", Fu et al. 2023): the model (model.py), its convolutions (conv.py: direct and FFT;
butterfly.py: FlashButterfly as dense matmuls; triton/butterfly.py: the same in Triton, fused
in one GPU program per row, or in three kernels for long rows) and its checkpoint directory (checkpoint.py)."""
