"""Custom kernels: the Triton sliding-window flash attention (kernels/attention.py: the kernels, their
autograd.Function and launcher). It knows nothing of the model; midistral.model.attention picks it on CUDA
and imports it (and triton) only then."""
