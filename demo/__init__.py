"""`dr demo`: the whole pipeline on a synthetic music dataset and a tiny model, on a CPU, with no downloads."""
