"""Typer command-line shell over the `model`, `ckpt` and `eval` packages. Heavy libraries (torch, transformers) are
imported inside the commands that use them, so `dr --help` and `dr version` answer at once."""

import warnings

__version__ = "0.1.0"

warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft, tf 5
