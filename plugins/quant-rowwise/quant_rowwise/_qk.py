"""The k-quant super-block size, in a leaf module the kernels and the driver both import."""

QK_K = 256  # values per super-block (ggml's QK_K)
