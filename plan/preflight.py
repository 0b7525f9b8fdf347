"""Up-front checks: what a run would otherwise find only after setup, found in its first second.

``problems(cfg)`` needs only the configuration: the model's shape rules (ModelConfig), the
curriculum's, and, for a run about to train on this machine (``here=True``), whether this
machine has the device, dtype and FP8 support the configuration asks for. 'make' runs it for
every run before the plan is created; 'make check' and 'make slurm' (which check on one machine
for another) run it with ``here=False`` and report the device part as notes.

``data_problems(cfg, data)`` needs the prepared data: every split long enough for BLOCK_SIZE,
SAMPLE_PROMPT encodable by the tokenizer, and a fine-tuning run's SFT_DATA or DPO_DATA readable. The runner calls it after preparing a run's data,
before the run trains.

Each problem is one line naming the CONFIG_ symbols and what to change.
"""

from __future__ import annotations

import torch

from data.mix import as_mix
from kconfig.values import Config
from model.gpt import ModelConfig
from parallel.launch import procs_per_node
from train.build import padded_vocab
from train.curriculum import Curriculum
from train.device import DeviceConfig, resolve_device, resolve_dtype
from train.precision import require_fp8_device
from train.sample import StopStringError, parse_stop_strings

CHAR_BYTE_VOCAB = 256  # byte vocabulary; char vocabularies of the shipped corpora pad to at most this


def check_vocab(cfg: Config) -> int:
    """The vocabulary the run's model will have, known without data (SentencePiece, BPE: the configured size,
    which a small corpus can only lower)."""
    if cfg.TOKENIZER == "sentencepiece":
        return padded_vocab(cfg.SENTENCEPIECE_VOCAB_SIZE)
    if cfg.TOKENIZER == "bpe":
        return padded_vocab(cfg.BPE_VOCAB_SIZE)
    return CHAR_BYTE_VOCAB


def problems(cfg: Config, here: bool = True) -> list[str]:
    """What stops ``cfg`` from training; with ``here``, on this machine. Empty when nothing does."""
    return config_problems(cfg) + (device_problems(cfg) if here else [])


def config_problems(cfg: Config) -> list[str]:
    """Rules of the model, the curriculum and the stop strings, which their own parsers enforce at setup."""
    found = []
    for build in (lambda: ModelConfig.from_config(cfg, check_vocab(cfg)), lambda: Curriculum.from_config(cfg),
                  lambda: parse_stop_strings(cfg.SAMPLE_STOP)):
        try:
            build()
        except (ValueError, StopStringError) as e:  # CurriculumError is a ValueError too; all name their symbols
            found.append(str(e))
    return found + post_training_problems(cfg) + downstream_problems(cfg)


def post_training_problems(cfg: Config) -> list[str]:
    """OBJECTIVE sft or dpo: a model to start from (INIT_FROM) and the data to train on."""
    if cfg.OBJECTIVE == "pretrain":
        return []
    found = []
    if not cfg.INIT_FROM:
        found.append(f"CONFIG_OBJECTIVE_{cfg.OBJECTIVE.upper()} fine-tunes a trained model but CONFIG_INIT_FROM is "
                     "empty: set it to a run directory, checkpoint or Hugging Face folder (a chain plan, RUN_CHAIN, "
                     "fills it from the parent stage)")
    data = ("SFT_DATA", cfg.SFT_DATA) if cfg.OBJECTIVE == "sft" else ("DPO_DATA", cfg.DPO_DATA)
    if not data[1]:
        found.append(f"CONFIG_OBJECTIVE_{cfg.OBJECTIVE.upper()} needs its data: CONFIG_{data[0]} is empty (a .jsonl, "
                     ".json or .parquet file; see docs/post_training.md for the fields)")
    return found


def downstream_problems(cfg: Config) -> list[str]:
    """EVAL_EVERY: lm-evaluation-harness installed and every EVAL_TASKS name found (datasets load at the
    first evaluation; a registry name is looked up in lm-eval's index, a few seconds)."""
    if not cfg.EVAL_EVERY:
        return []
    if not cfg.EVAL_TASKS.strip():
        return [f"CONFIG_EVAL_EVERY={cfg.EVAL_EVERY} but CONFIG_EVAL_TASKS is empty: name the tasks, or set EVAL_EVERY=0"]
    try:
        import lm_eval  # noqa: F401
    except ImportError as e:
        return [f"CONFIG_EVAL_EVERY={cfg.EVAL_EVERY} needs lm-evaluation-harness ({e.name} is missing): run "
                "'make setup-eval' (pip install '.[eval]'), or set EVAL_EVERY=0"]
    from harness.errors import EvalError
    from harness.evaluate import EvalConfig
    from harness.tasks import task_specs
    from kconfig.tree import ROOT

    config = EvalConfig.from_config(cfg, ROOT)
    try:
        task_specs(list(config.tasks), config.tasks_dir)
    except EvalError as e:
        return [str(e)]
    return []


def device_problems(cfg: Config) -> list[str]:
    """Whether this machine has what the run asks for: CUDA, fp16, FP8 hardware, GPUs to count."""
    found = []
    config = DeviceConfig.from_config(cfg)
    try:
        device = resolve_device(config)
        resolve_dtype(config, device)
    except RuntimeError as e:
        found.append(str(e))
        device = torch.device("cpu")
    if config.fp8.needs_fp8_gpu:
        try:
            require_fp8_device(device, config.fp8.backend)
        except RuntimeError as e:
            found.append(str(e))
    try:
        procs_per_node(cfg)
    except RuntimeError as e:
        found.append(str(e))
    return found


def data_problems(cfg: Config, data) -> list[str]:
    """What stops ``cfg`` from training on its prepared ``data`` (a PreparedData or a PreparedMix)."""
    mix = as_mix(data)
    found = []
    need = cfg.BLOCK_SIZE + 2  # a window of BLOCK_SIZE inputs and its shifted targets, at a random start
    splits = [(m.data, split) for m in mix.members for split in ("train", "val")]
    splits += [(extra, "val") for _, extra in mix.extras]
    for part, split in splits:
        n = len(part.tokens(split))
        if n < need:
            fix = "a larger VAL_FRACTION" if split == "val" else "a smaller VAL_FRACTION"
            found.append(f"CONFIG_BLOCK_SIZE={cfg.BLOCK_SIZE}: the {split} split of {part.path} has {n} tokens, "
                         f"fewer than the {need} one training window needs; use more data, a smaller "
                         f"BLOCK_SIZE or {fix}")
    prompt = cfg.SAMPLE_PROMPT or "\n"  # what train/sample.py encodes
    try:
        mix.tokenizer.encode(prompt)
    except ValueError as e:
        what = (f"CONFIG_SAMPLE_PROMPT={cfg.SAMPLE_PROMPT!r}: the run's" if cfg.SAMPLE_PROMPT else
                "CONFIG_SAMPLE_PROMPT is empty, so samples start from a newline, but the run's")
        found.append(f"{what} {mix.tokenizer.kind} tokenizer cannot encode it ({e}); write a prompt from the "
                     f"corpus's characters, or use TOKENIZER_BYTE")
    return found + post_training_data_problems(cfg, mix.tokenizer)


def post_training_data_problems(cfg: Config, tokenizer) -> list[str]:
    """SFT_DATA or DPO_DATA read and tokenized as the run will (with the template's special tokens), so a
    bad row is named before any stage of a plan trains."""
    if cfg.OBJECTIVE == "pretrain" or (cfg.SFT_DATA if cfg.OBJECTIVE == "sft" else cfg.DPO_DATA) == "":
        return []  # post_training_problems names the missing setting
    from data.chat_template import tokens_needed
    from data.errors import DataError
    from data.preference import PreferenceData
    from data.sft import SFTData
    from data.tokenizer import with_special_tokens
    from kconfig.tree import ROOT

    tokenizer, _ = with_special_tokens(tokenizer, tokens_needed(cfg.CHAT_TEMPLATE))
    kind = SFTData if cfg.OBJECTIVE == "sft" else PreferenceData
    try:
        kind.from_config(cfg, tokenizer, cfg.BLOCK_SIZE, ROOT, log=lambda message: None)
    except DataError as e:
        return [str(e)]
    return []
