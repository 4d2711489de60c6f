"""Full-size speed benchmarks (random weights, the original's way beside dr's); their results under results/, one
folder per run, indexed by README.md."""
