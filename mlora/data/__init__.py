"""Task registry, dataset sources, prompts and tokenization."""

# The commonsense benchmarks every adapter can be trained and scored on (DESIGN.md section 6).
BENCHMARK_TASKS = ("arc-c", "arc-e", "boolq", "obqa", "piqa", "siqa", "hellaswag", "winogrande")
