"""Typer command-line shell over the `model`, `ckpt` and `eval` packages."""

import os
import warnings

import torch

__version__ = "0.1.0"

if not torch.cuda.is_available():  # name DeepSpeed's accelerator so its import does not warn on every command
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)  # peft, tf 5
