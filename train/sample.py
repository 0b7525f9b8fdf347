"""Text generation from a model, for end-of-run samples and 'make sample'."""

from __future__ import annotations

import dataclasses
import sys

import torch

from data.tokenizer import Tokenizer, check_vocab_fits


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The Sampling menu, and the seed a sample is drawn with; the defaults are Kconfig's."""

    prompt: str = ""  # an empty prompt starts from a newline
    tokens: int = 200
    temperature: float = 0.8
    top_k: int = 200  # 0 = off
    seed: int = 1337

    @classmethod
    def from_config(cls, cfg) -> SampleConfig:
        return cls(prompt=cfg.SAMPLE_PROMPT, tokens=cfg.SAMPLE_TOKENS, temperature=cfg.SAMPLE_TEMPERATURE,
                   top_k=cfg.SAMPLE_TOP_K, seed=cfg.SEED)


def generate_text(model, tokenizer: Tokenizer, sample: SampleConfig, device: torch.device) -> str:
    """Prompt plus ``sample.tokens`` generated tokens (an empty prompt starts from a newline)."""
    prompt = sample.prompt or "\n"
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r} cannot be encoded by this run's tokenizer: {e}") from None
    generator = torch.Generator(device=device).manual_seed(sample.seed)
    was_training = model.training
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    out = model.generate(idx, sample.tokens, temperature=sample.temperature, top_k=sample.top_k,
                         generator=generator, vocab_limit=tokenizer.vocab_size)
    model.train(was_training)
    return tokenizer.decode(out[0].tolist())


def sample_from(run_dir, prompt: str | None = None, tokens: int | None = None) -> str:
    """Generate from a run directory's checkpoint with the run's own sampling settings."""
    from pathlib import Path

    from kconfig.values import Config
    from model.gpt import GPT, ModelConfig
    from train import checkpoint
    from train.state import te_layers

    path, state = checkpoint.newest(Path(run_dir), warn=lambda message: print(message, file=sys.stderr))
    tokenizer = Tokenizer(state["tokenizer"])
    check_vocab_fits(tokenizer, state["model_config"]["vocab_size"], str(path))
    if te_layers(state["config"]):
        raise RuntimeError(f"{path}: trained with CONFIG_FP8_TE=y, whose TransformerEngine layers store the "
                           "weights under their own names, which 'make sample' (a plain model on CPU) cannot "
                           "load; the run's own end-of-training sample is in its samples.txt")
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    if state.get("sharded"):  # FSDP2 or DeepSpeed: gather the shards into one state dict
        from parallel.runtime import full_weights

        model.load_state_dict(full_weights(state["sharded"], state["engine"]))
    else:
        model.load_state_dict(state["model"])
    sample = SampleConfig.from_config(Config(state["config"]))  # the run's own settings
    sample = dataclasses.replace(sample, prompt=sample.prompt if prompt is None else prompt,
                                 tokens=sample.tokens if tokens is None else tokens)
    return generate_text(model, tokenizer, sample, torch.device("cpu"))
