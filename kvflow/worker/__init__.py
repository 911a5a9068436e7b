"""What runs a scheduled step on a device: the model runner (step -> flat tensors -> forward over the
paged KV cache) and the sampler."""
