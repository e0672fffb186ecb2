"""Benchmarks: side by side with the peer and PyTorch, in one run (quant_bench.py is the entry point)."""
