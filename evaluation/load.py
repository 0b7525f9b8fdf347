"""A run's best or latest checkpoint as a plain GPT in eval mode, its tokenizer and its configuration."""

from __future__ import annotations

from pathlib import Path

import torch

from data.tokenizer import Tokenizer, check_vocab_fits
from export.hf_folder import checkpoint_state, model_weights
from kconfig.tree import new_kconfig
from kconfig.values import Config, values
from model.gpt import GPT, ModelConfig
from train.sample import ADDED_SAMPLING_SYMBOLS


def load_checkpoint(run_dir, which: str = "best", device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, dict]:
    """(model, tokenizer, info): info holds the checkpoint's path, step and the run's Config (symbols
    added since the run was saved at their defaults; sampling ones off, as the run sampled)."""
    path, state = checkpoint_state(Path(run_dir), which)
    tokenizer = Tokenizer(state["tokenizer"])
    check_vocab_fits(tokenizer, state["model_config"]["vocab_size"], str(path))
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    model.load_state_dict(model_weights(path, state))  # FP8_TE and sharded checkpoints handled there
    model.to(device).eval()
    return model, tokenizer, {"path": str(path), "step": state.get("step"), "checkpoint": which,
                              "config": Config({**values(new_kconfig()), **ADDED_SAMPLING_SYMBOLS, **state["config"]})}
