"""Weight quantisation: block formats (GGUF's q8_0, q4_0, q4_k), int8 and bipolar-INT, the linear
methods that run them, and the conversions between them."""
