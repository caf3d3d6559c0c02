"""Benchmarks: each script measures one capability beside the plain-PyTorch way of doing the same,
prints a table and writes benchmarks/results/NAME.json (`dcgan bench NAME`, `make bench`); report
holds what they share, gpu_check.sh runs the GPU ones on a bare GPU machine."""
