"""Benchmarks: training throughput, memory and FLOP utilisation, side by side with peft."""
