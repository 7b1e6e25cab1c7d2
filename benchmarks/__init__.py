"""One script per question, each run from the repository root as `python -m benchmarks.<name>`."""
