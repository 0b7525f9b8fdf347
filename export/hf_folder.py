"""``make export``: a run's checkpoint as a Hugging Face folder, <run>/export/hf/.

The folder holds config.json, model.safetensors (or shards named model-0000N-of-0000M.safetensors
with model.safetensors.index.json above ``max_shard_bytes``), generation_config.json and the
tokenizer files, so ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``
load it offline. Checkpoints are read only through train/checkpoint.py's weights-only loader (and
parallel/'s checked readers for sharded ones); nothing is unpickled, and nothing is written in
pickle form. The folder is filled under a temporary name and renamed into place.

Vocabulary: the padded embedding is exported as it is (our logits and HF's agree on every id).
The end-of-text token takes the first padding id; where the padding has no room for it (a byte
vocabulary of 256 is already a multiple of 64) the embedding grows by 64 zero rows.
generation_config.json suppresses the other padding ids, as our sampler's ``vocab_limit`` does.

LoRA: a LoRA run's checkpoint holds its adapter apart from the base (train/lora.py); its weights here
are the adapter merged into the base weights its INIT_FROM record names (checked by SHA-256), so
the folder holds plain merged weights and needs no peft to load.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from data.tokenizer import Tokenizer
from hf.architectures import ExportRefused, choose_target, hf_config, hf_weights, notes
from hf.tokenizer import eos_id, tokenizer_files
from model.gpt import ModelConfig
from parallel.errors import CheckpointError
from train import checkpoint
from train.build import padded_vocab
from train.lora import checkpoint_weights
from train.state import te_layers

MAX_SHARD_BYTES = 5 * 1024**3  # transformers' own default shard size (5 GB)
CHECKPOINTS = ("best", "latest")


def checkpoint_state(run_dir: Path, which: str) -> tuple[Path, dict]:
    """(path, state) of the run's best (lowest val loss) or latest step checkpoint, weights only."""
    run_dir = Path(run_dir)
    if which == "latest":
        return checkpoint.newest(run_dir)
    if which != "best":
        raise ExportRefused(f"CHECKPOINT={which!r}: choose one of {', '.join(CHECKPOINTS)}")
    folder = run_dir / checkpoint.FOLDER
    if (folder / checkpoint.BEST_SHARDED / checkpoint.EXTRA).is_file():
        path = folder / checkpoint.BEST_SHARDED
        return path, {**checkpoint.load(path / checkpoint.EXTRA), "sharded": str(path)}
    if not (folder / checkpoint.BEST).is_file():
        raise CheckpointError(f"{folder / checkpoint.BEST}: no best checkpoint (the run never evaluated); "
                              "use CHECKPOINT=latest")
    return folder / checkpoint.BEST, checkpoint.load(folder / checkpoint.BEST)


def model_weights(path: Path, state: dict) -> dict[str, torch.Tensor]:
    """The plain model's full state dict from a checkpoint state (sharded ones gathered; a LoRA run's
    adapter merged into its base)."""
    if te_layers(state["config"]):
        raise ExportRefused(f"{path}: trained with CONFIG_FP8_TE=y, whose TransformerEngine layers store the weights "
                            "under their own names; train with CONFIG_FP8_TORCHAO or without FP8 to export")
    return checkpoint_weights(state)


def export_state(model_config: ModelConfig, weights: dict[str, torch.Tensor], tokenizer: Tokenizer, out: Path,
                 max_shard_bytes: int = MAX_SHARD_BYTES, log=print) -> Path:
    """Write the Hugging Face folder ``out`` for a model and its tokenizer; returns ``out``."""
    target = choose_target(model_config)
    files = tokenizer_files(tokenizer, model_config.block_size)  # refuses an unexported tokenizer kind early
    for note in notes(model_config):
        log(f"export: note: {note}")
    eos = eos_id(tokenizer)
    weights, vocab = with_room_for(eos, model_config, weights)
    tensors = hf_weights(target, model_config, weights)
    dtype = str(next(iter(tensors.values())).dtype).removeprefix("torch.")
    files["config.json"] = _json(hf_config(target, model_config, vocab, eos, dtype))
    files["generation_config.json"] = _json({
        "bos_token_id": eos, "eos_token_id": eos, "pad_token_id": eos, "do_sample": False,
        "max_length": model_config.block_size,
        "suppress_tokens": [i for i in range(tokenizer.vocab_size, vocab) if i != eos]})  # padding ids
    out = Path(out)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name, text in files.items():
        (tmp / name).write_text(text, encoding="utf-8")
    write_safetensors(tensors, tmp, max_shard_bytes)
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f"export: {target.architecture}, vocab {vocab} (tokenizer {tokenizer.vocab_size}, {EOS_NAME} id {eos}) "
        f"-> {out}")
    return out


EOS_NAME = "end-of-text"


def with_room_for(eos: int, c: ModelConfig, weights: dict) -> tuple[dict, int]:
    """Weights whose vocabulary holds id ``eos``: unchanged when it lies in the padding, else grown by
    64 zero rows (embedding and, untied, the output head)."""
    if eos < c.vocab_size:
        return weights, c.vocab_size
    vocab = padded_vocab(eos + 1)
    grown = dict(weights)
    for name in ("wte.weight",) + (() if c.tie_embeddings else ("lm_head.weight",)):
        w = weights[name]
        grown[name] = torch.cat([w, w.new_zeros(vocab - w.size(0), w.size(1))])
    return grown, vocab


def write_safetensors(tensors: dict[str, torch.Tensor], folder: Path, max_shard_bytes: int) -> None:
    """model.safetensors, or shards in order of name with transformers' index file above the size."""
    from safetensors.torch import save_file

    sizes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    shards, current = [], {}
    for name in sorted(tensors):
        if current and sum(sizes[n] for n in current) + sizes[name] > max_shard_bytes:
            shards.append(current)
            current = {}
        current[name] = tensors[name]
    shards.append(current)
    if len(shards) == 1:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        file = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file), metadata={"format": "pt"})
        weight_map |= dict.fromkeys(shard, file)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(_json(index), encoding="utf-8")


def export_run(run_dir: Path, which: str = "best", max_shard_bytes: int = MAX_SHARD_BYTES, log=print) -> Path:
    """Export a run's best or latest checkpoint to <run>/export/hf/."""
    path, state = checkpoint_state(Path(run_dir), which)
    log(f"export: {which} checkpoint {path} (step {state.get('step', '?')})")
    config = ModelConfig.from_dict(state["model_config"])
    return export_state(config, model_weights(path, state), Tokenizer(state["tokenizer"]),
                        Path(run_dir) / "export" / "hf", max_shard_bytes, log)


def _json(data: dict) -> str:
    return json.dumps(data, indent=2) + "\n"
