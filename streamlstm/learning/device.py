"""Where fine-tuning runs: checked when a trainer starts (config may not import torch)."""

from __future__ import annotations

import torch

from streamlstm.config import ConfigError, Settings


def require_training_device(settings: Settings) -> None:
    """Refuse ``training.device = "cuda"`` without a CUDA device, with one line naming it.

    Without this check the trainer's worker fails to build and fine-tuning silently stops;
    the command-line maps :class:`ConfigError` to exit code 2.
    """
    t = settings.training
    if t.enabled and t.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError(
            'training.device: "cuda", but torch sees no CUDA device '
            '(use "auto" or "cpu", or training.enabled = false)'
        )
