"""Text generation from a model, for end-of-run samples and 'make sample'."""

from __future__ import annotations

import sys

import torch

from data.tokenizer import Tokenizer, check_vocab_fits


def generate_text(model, tokenizer: Tokenizer, prompt: str, tokens: int, temperature: float,
                  top_k: int, device: torch.device, seed: int) -> str:
    """Prompt plus ``tokens`` generated tokens (an empty prompt starts from a newline)."""
    prompt = prompt or "\n"
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r} cannot be encoded by this run's tokenizer: {e}") from None
    generator = torch.Generator(device=device).manual_seed(seed)
    was_training = model.training
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, tokens, temperature=temperature, top_k=top_k, generator=generator,
                         vocab_limit=tokenizer.vocab_size)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def sample_from(run_dir, prompt: str | None = None, tokens: int | None = None) -> str:
    """Generate from a run directory's checkpoint with the run's own sampling settings."""
    from pathlib import Path

    from model.gpt import GPT, ModelConfig
    from train import checkpoint

    path, state = checkpoint.newest(Path(run_dir), warn=lambda message: print(message, file=sys.stderr))
    tokenizer = Tokenizer(state["tokenizer"])
    check_vocab_fits(tokenizer, state["model_config"]["vocab_size"], str(path))
    cfg = state["config"]
    if cfg.get("FP8_TE"):
        raise RuntimeError(f"{path}: trained with CONFIG_FP8_TE=y, whose TransformerEngine layers store the "
                           "weights under their own names, which 'make sample' (a plain model on CPU) cannot "
                           "load; the run's own end-of-training sample is in its samples.txt")
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    if state.get("sharded"):  # FSDP2 or DeepSpeed: gather the shards into one state dict
        from parallel.runtime import full_weights

        model.load_state_dict(full_weights(state["sharded"], state["engine"]))
    else:
        model.load_state_dict(state["model"])
    device = torch.device("cpu")
    return generate_text(model, tokenizer,
                         cfg["SAMPLE_PROMPT"] if prompt is None else prompt,
                         cfg["SAMPLE_TOKENS"] if tokens is None else tokens,
                         cfg["SAMPLE_TEMPERATURE"], cfg["SAMPLE_TOP_K"], device, cfg["SEED"])
