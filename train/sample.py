"""Text generation from a model, for end-of-run samples and 'make sample'."""

from __future__ import annotations

import dataclasses
import os
import sys

import torch

from data.progress import use_bar
from data.tokenizer import Tokenizer, check_vocab_fits
from kconfig.errors import NamedError
from model.gpt import first_stop

# Sampling symbols added after runs were first saved, with the value that samples as those runs did:
# a checkpoint written before them samples with them off.
ADDED_SAMPLING_SYMBOLS = {"SAMPLE_TOP_P": 1.0, "SAMPLE_STOP": ""}

_ESCAPES = {"n": "\n", "t": "\t", "|": "|", "\\": "\\"}


class StopStringError(NamedError):
    """CONFIG_SAMPLE_STOP cannot be read as a list of stop strings."""


def parse_stop_strings(text: str, source: str = "CONFIG_SAMPLE_STOP") -> tuple[str, ...]:
    """CONFIG_SAMPLE_STOP's strings (or make sample's STOP, named by ``source`` in errors): separated by '|';
    \\n newline, \\t tab, \\| bar, \\\\ backslash."""
    strings, current, i = [], [], 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            escape = text[i + 1: i + 2]
            if escape not in _ESCAPES:
                found = f"'\\{escape}'" if escape else "a '\\' at the end"
                raise StopStringError(f"{source}={text!r}: {found} at character {i + 1} is no escape; "
                                      "use \\n (newline), \\t (tab), \\| (a literal |) or \\\\ (a backslash)")
            current.append(_ESCAPES[escape])
            i += 2
            continue
        if ch == "|":
            strings.append("".join(current))
            current = []
        else:
            current.append(ch)
        i += 1
    strings.append("".join(current))
    if text and not all(strings):
        raise StopStringError(f"{source}={text!r}: an empty stop string (a leading, trailing or doubled "
                              "'|') would end every sample at once; remove it, or write \\| for a literal |")
    return tuple(strings) if text else ()


@dataclasses.dataclass(frozen=True)
class SampleConfig:
    """The Sampling menu, and the seed a sample is drawn with; the defaults are Kconfig's."""

    prompt: str = ""  # an empty prompt starts from a newline
    tokens: int = 200
    temperature: float = 0.8
    top_k: int = 200  # 0 = off
    top_p: float = 1.0  # 1 = off
    stop: tuple[str, ...] = ()  # the sample ends before the first of these in the generated text
    seed: int = 1337

    @classmethod
    def from_config(cls, cfg) -> SampleConfig:
        return cls(prompt=cfg.SAMPLE_PROMPT, tokens=cfg.SAMPLE_TOKENS, temperature=cfg.SAMPLE_TEMPERATURE,
                   top_k=cfg.SAMPLE_TOP_K, top_p=cfg.SAMPLE_TOP_P, stop=parse_stop_strings(cfg.SAMPLE_STOP),
                   seed=cfg.SEED)


def generate_text(model, tokenizer: Tokenizer, sample: SampleConfig, device: torch.device,
                  use_cache: bool = True, progress: bool | None = False, stream=None) -> str:
    """Prompt plus up to ``sample.tokens`` generated tokens (an empty prompt starts from a newline),
    cut before the first stop string the generated text holds (the stop string excluded).

    progress: a tqdm bar of tokens generated on ``stream`` (default stderr); None: only when it is a
    terminal; False (the default: a trainer's ranks, evaluation): never. The tokens drawn are the same."""
    prompt = sample.prompt or "\n"
    try:
        ids = tokenizer.encode(prompt)
    except ValueError as e:
        raise ValueError(f"prompt {prompt!r} cannot be encoded by this run's tokenizer: {e}") from None
    generator = torch.Generator(device=device).manual_seed(sample.seed)
    # The generated text starts where the decoded prompt ends (or where decoding them together
    # first differs from it, should a tokenizer merge across the boundary).
    prompt_text = tokenizer.decode(ids)

    def generated_from(text: str) -> int:
        return len(os.path.commonprefix([text, prompt_text]))

    def stopped(idx: torch.Tensor) -> bool:
        text = tokenizer.decode(idx[0].tolist())
        return first_stop(text, sample.stop, generated_from(text)) is not None

    bar = None
    if use_bar(stream if stream is not None else sys.stderr, progress):
        from tqdm import tqdm

        bar = tqdm(total=sample.tokens, desc="sample", unit="tok", file=stream, leave=False, dynamic_ncols=True)

    def counted(idx: torch.Tensor) -> bool:  # generate calls it after each token: count the token there
        bar.update(1)
        return bool(sample.stop) and stopped(idx)

    check = counted if bar is not None else stopped if sample.stop else None
    was_training = model.training
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)
    try:
        out = model.generate(idx, sample.tokens, temperature=sample.temperature, top_k=sample.top_k,
                             top_p=sample.top_p, generator=generator, vocab_limit=tokenizer.vocab_size,
                             stop=check, use_cache=use_cache)
    finally:
        if bar is not None:
            bar.close()
    model.train(was_training)
    text = tokenizer.decode(out[0].tolist())
    cut = first_stop(text, sample.stop, generated_from(text))
    return text if cut is None else text[:cut]


def sample_from(run_dir, prompt: str | None = None, tokens: int | None = None, top_p: float | None = None,
                stop: tuple[str, ...] | None = None, report=None, progress: bool | None = None) -> str:
    """Generate from a run directory's checkpoint with the run's own sampling settings; prompt, tokens,
    top_p and stop (None: the run's) override them. 'make sample': ``report`` (default: a line on
    stderr) gets which run and checkpoint is sampled (``provenance``), and a bar of tokens shows on a
    terminal (``progress`` as generate_text's); the text itself is returned."""
    model, tokenizer, sample = load_run(run_dir, report=report or (lambda line: print(line, file=sys.stderr)))
    overrides = dict(prompt=prompt, tokens=tokens, top_p=top_p, stop=stop)
    sample = dataclasses.replace(sample, **{k: v for k, v in overrides.items() if v is not None})
    return generate_text(model, tokenizer, sample, torch.device("cpu"), progress=progress)


def provenance(run_dir, path, step: int, planned: int | None = None, best_step: int | None = None,
               best_val: float | None = None) -> str:
    """One line naming the run, the checkpoint (``path``) and its step (of ``planned``, MAX_ITERS), and
    whether it is the run's best by val loss: 'sample: run runs/x, checkpoint
    runs/x/checkpoints/step-00000200.pt (step 200 of 200, latest; the best val loss 1.2345 was at step 150)'."""
    where = f"step {step}" + (f" of {planned}" if planned else "") + ", latest"
    if best_step is not None and best_step == step:
        where += ", also the best by val loss"
    elif best_step is not None and best_val is not None:
        where += f"; the best val loss {best_val:.4f} was at step {best_step}"
    return f"sample: run {run_dir}, checkpoint {path} ({where})"


def load_run(run_dir, report=None) -> tuple[torch.nn.Module, Tokenizer, SampleConfig]:
    """A run directory's newest checkpoint as a plain GPT on CPU, its tokenizer and its SampleConfig;
    ``report(line)``, when given, gets the checkpoint's ``provenance`` line."""
    from pathlib import Path

    from kconfig.values import Config
    from model.gpt import GPT, ModelConfig
    from train import checkpoint
    from train.state import te_layers

    path, state = checkpoint.newest(Path(run_dir), warn=lambda message: print(message, file=sys.stderr))
    if report is not None:
        report(provenance(run_dir, path, state["step"], state["config"].get("MAX_ITERS"), state.get("best_val_step"),
                          state.get("best_val_loss")))
    tokenizer = Tokenizer(state["tokenizer"])
    check_vocab_fits(tokenizer, state["model_config"]["vocab_size"], str(path))
    if te_layers(state["config"]):
        raise RuntimeError(f"{path}: trained with CONFIG_FP8_TE=y, whose TransformerEngine layers store the "
                           "weights under their own names, which 'make sample' (a plain model on CPU) cannot "
                           "load; the run's own end-of-training sample is in its samples.txt")
    model = GPT(ModelConfig.from_dict(state["model_config"]))
    from train.lora import checkpoint_weights  # sharded ones gathered; a LoRA run's adapter merged into its base

    model.load_state_dict(checkpoint_weights(state))
    return model, tokenizer, SampleConfig.from_config(Config({**ADDED_SAMPLING_SYMBOLS, **state["config"]}))
