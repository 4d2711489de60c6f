"""Typer command-line shell over the `model`, `ckpt` and `eval` packages."""

__version__ = "0.1.0"
