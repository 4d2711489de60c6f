"""Full-size speed benchmarks (random weights, the original's way beside dr's) and their results."""
