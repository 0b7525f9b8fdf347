"""Warm starts (CONFIG_INIT_FROM): a run starts from another run's weights, or a Hugging Face folder's, at
step 0, never resumes by it."""

from __future__ import annotations

import hashlib
import json
import shutil

import pytest
import torch

from conftest import config_of
from data.prepare import prepare
from data.tokenizer import Tokenizer
from export.hf_folder import export_run, export_state
from hf.read import ImportRefused, read_hf_folder
from model.gpt import GPT, ModelConfig
from train import checkpoint
from train.checkpoint import CheckpointError
from train.trainer import Trainer
from train.hf_parent import without_export_fill

SETTINGS = ("DATA_PATH=corpus.txt DATA_CACHE_DIR=cache MODEL_SIZE_CUSTOM=y N_LAYER=1 N_HEAD=2 N_EMBD=32 "
            "BLOCK_SIZE=16 MICRO_BATCH=8 MAX_ITERS=30 WARMUP_ITERS=2 LR=3e-3 EVAL_INTERVAL=10 EVAL_BATCHES=2 "
            "LOG_INTERVAL=10 DEVICE_CPU=y DTYPE_FP32=y SAMPLE_TOKENS=4 SEED=3")
QUIET = {"log": lambda message: None}


def trainer(tmp_path, name, extra="", **symbols):
    corpus = tmp_path / "corpus.txt"
    if not corpus.exists():
        lines = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox") for b in ("one", "two")]
        corpus.write_text("\n".join(lines * 80) + "\n")
    cfg = config_of(SETTINGS, extra, **symbols)
    run_dir = tmp_path / name
    run_dir.mkdir(exist_ok=True)
    logs = []
    return Trainer(cfg, prepare(cfg, tmp_path, **QUIET), run_dir, log=logs.append), logs


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    t, _ = trainer(tmp_path_factory.mktemp("parent"), "parent")
    return t.run_dir, t.run()


@pytest.fixture
def parent(trained, tmp_path):
    """The parent run (trained once for the module); each test's runs go in its own tmp_path."""
    return trained


def evals_of(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "val_loss" in r]


@pytest.mark.slow
def test_warm_start_begins_at_the_parents_val_loss_and_records_its_parent(tmp_path, parent):
    parent_dir, parent_summary = parent
    child, logs = trainer(tmp_path, "child", MAX_ITERS=10, INIT_FROM=str(parent_dir))  # best.pt by default
    summary = child.run()
    first = evals_of(child.run_dir)[0]
    # Same data, same evaluation batches: step 0 is where the parent's best checkpoint was.
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(parent_summary["best_val_loss"], abs=1e-6)
    fresh, _ = trainer(tmp_path, "fresh")
    assert first["val_loss"] < fresh.evaluate()["val"] - 0.05  # not a fresh model's loss
    best = parent_dir / "checkpoints" / "best.pt"
    assert summary["init_from"] == {"path": str(best), "kind": "checkpoint", "step": parent_summary["best_val_step"],
                                    "weights_sha256": hashlib.sha256(best.read_bytes()).hexdigest(),
                                    "val_loss": parent_summary["best_val_loss"], "optimizer": False}
    assert summary["steps"] == 10 and any(m.startswith(f"warm start from {best}") for m in logs)
    # The latest checkpoint, named as a run directory's, or as a file: the parent's final weights.
    latest, _ = trainer(tmp_path, "latest", "INIT_FROM_CHECKPOINT_LATEST=y", MAX_ITERS=10, INIT_FROM=str(parent_dir))
    final_file = checkpoint.step_paths(parent_dir)[-1]
    as_file, _ = trainer(tmp_path, "file", MAX_ITERS=10, INIT_FROM=str(final_file))
    for t in (latest, as_file):
        t.warm_start()
        assert t.evaluate()["val"] == pytest.approx(parent_summary["final_val_loss"], abs=1e-6)
        assert t.parent["path"] == str(final_file) and t.parent["step"] == 30


@pytest.mark.slow
def test_a_run_with_its_own_checkpoint_resumes_and_ignores_init_from(tmp_path, parent):
    parent_dir, _ = parent
    child, _ = trainer(tmp_path, "child", MAX_ITERS=10, INIT_FROM=str(parent_dir))
    lineage = child.run()["init_from"]
    # plan/runner.py resumes a run that holds an intact step checkpoint ('make continue', --resume):
    assert checkpoint.newest_intact_step(child.run_dir) == 10
    again, logs = trainer(tmp_path, "child", MAX_ITERS=14, INIT_FROM=str(tmp_path / "gone"))  # never read
    again.resume()
    summary = again.run()
    assert summary["steps"] == 14 and summary["init_from"] == lineage  # the lineage survives the resume
    assert [e["step"] for e in evals_of(again.run_dir)] == [0, 10, 14]
    assert any("INIT_FROM is not read again" in m for m in logs)


@pytest.mark.slow
def test_mismatches_are_named(tmp_path, parent):
    parent_dir, _ = parent  # named when the run is set up, before anything trains
    with pytest.raises(CheckpointError) as e:
        trainer(tmp_path, "wider", N_EMBD=48, INIT_FROM=str(parent_dir))
    text = str(e.value)
    assert "do not fit this model" in text and "wte.weight: checkpoint (64, 32), model (64, 48)" in text
    assert "CONFIG_N_EMBD: checkpoint 32, configuration 48" in text
    with pytest.raises(CheckpointError, match="another tokenizer \\(char, sha256 .*\\) than this run's \\(byte"):
        trainer(tmp_path, "byte", "TOKENIZER_BYTE=y", INIT_FROM=str(parent_dir))
    with pytest.raises(CheckpointError, match="no such run directory or checkpoint file"):
        trainer(tmp_path, "missing", INIT_FROM=str(tmp_path / "nowhere"))
    (tmp_path / "untrained").mkdir()
    with pytest.raises(CheckpointError, match="no checkpoints/best.pt there"):
        trainer(tmp_path, "untrained-child", INIT_FROM=str(tmp_path / "untrained"))


@pytest.mark.slow
def test_optimizer_state_is_fresh_unless_carried(tmp_path, parent):
    parent_dir, _ = parent
    saved = checkpoint.load(parent_dir / "checkpoints" / "best.pt")["optimizer"]["state"]
    fresh, _ = trainer(tmp_path, "fresh", INIT_FROM=str(parent_dir))
    fresh.warm_start()
    assert fresh.optimizer.state_dict()["state"] == {}
    carried, _ = trainer(tmp_path, "carried", "INIT_FROM_OPTIMIZER=y", INIT_FROM=str(parent_dir))
    carried.warm_start()
    state = carried.optimizer.state_dict()["state"]
    assert state.keys() == saved.keys() and carried.parent["optimizer"] is True
    assert all(torch.equal(state[k]["exp_avg"], saved[k]["exp_avg"]) for k in saved)
    assert carried.start_step == 0


# Hugging Face folders: the parent's 'make export' folder, and one transformers saved.

@pytest.fixture(scope="module")
def exported(trained):
    """The parent run (GPT-2 option set, char vocabulary padded to 64) exported from its best.pt."""
    return export_run(trained[0], "best", **QUIET)


@pytest.mark.slow
def test_warm_start_from_an_export_has_the_parents_weights_val_loss_and_lineage(tmp_path, parent, exported):
    parent_dir, parent_summary = parent
    child, logs = trainer(tmp_path, "child", MAX_ITERS=10, INIT_FROM=str(exported))
    summary = child.run()
    first = evals_of(child.run_dir)[0]
    assert first["step"] == 0 and first["val_loss"] == pytest.approx(parent_summary["best_val_loss"], abs=1e-6)
    weights_sha256 = hashlib.sha256((exported / "model.safetensors").read_bytes()).hexdigest()
    assert summary["init_from"] == {"path": str(exported), "kind": "hf", "step": None, "val_loss": None,
                                    "weights_sha256": weights_sha256, "optimizer": False}
    assert summary["steps"] == 10
    assert any(m.startswith(f"warm start from the Hugging Face folder {exported}") for m in logs)
    again, _ = trainer(tmp_path, "again", INIT_FROM=str(exported))
    again.warm_start()
    best = checkpoint.load(parent_dir / "checkpoints" / "best.pt")["model"]
    loaded = again.model.state_dict()
    assert loaded.keys() == best.keys() and all(torch.equal(loaded[k], best[k]) for k in best)


@pytest.mark.slow
def test_hf_folder_refusals_are_named(tmp_path, exported):
    with pytest.raises(CheckpointError, match="the tokenizers differ: .*tokenizer.json is not the tokenizer.json this "
                                              "run's tokenizer \\(byte"):
        trainer(tmp_path, "byte", "TOKENIZER_BYTE=y", INIT_FROM=str(exported))
    with pytest.raises(CheckpointError, match="CONFIG_INIT_FROM_OPTIMIZER is set but .* holds weights only"):
        trainer(tmp_path, "carried", "INIT_FROM_OPTIMIZER=y", INIT_FROM=str(exported))
    with pytest.raises(CheckpointError) as e:
        trainer(tmp_path, "wider", N_EMBD=48, N_LAYER=2, INIT_FROM=str(exported))
    text = str(e.value)
    assert "Hugging Face folder" in text and "wte.weight: checkpoint (64, 32), model (64, 48)" in text
    assert "blocks.1.attn.c_attn.weight: not in the checkpoint" in text
    assert "CONFIG_N_EMBD: folder 32, configuration 48" in text and "CONFIG_N_LAYER: folder 1, configuration 2" in text
    bare = tmp_path / "no-tokenizer"
    shutil.copytree(exported, bare)
    (bare / "tokenizer.json").unlink()
    with pytest.raises(CheckpointError, match="holds no tokenizer.json"):
        trainer(tmp_path, "bare", INIT_FROM=str(bare))


@pytest.mark.slow
def test_a_folder_transformers_saved_is_refused_without_our_tokenizer_and_loads_with_it(tmp_path, exported):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    saved = tmp_path / "saved"  # the parent's shapes: vocabulary 64, one block of width 32, 16 positions
    theirs = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2, activation_function="gelu")).eval()
    theirs.save_pretrained(saved)
    with pytest.raises(CheckpointError, match="holds no tokenizer.json"):
        trainer(tmp_path, "child", INIT_FROM=str(saved))
    shutil.copy(exported / "tokenizer.json", saved / "tokenizer.json")  # the user vouches its ids are ours
    child, _ = trainer(tmp_path, "child", INIT_FROM=str(saved))
    child.warm_start()
    assert child.parent["kind"] == "hf" and child.parent["path"] == str(saved)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        assert (child.model.eval()(idx, idx)[0] - theirs(idx).logits).abs().max().item() <= 1e-5
    tanh = tmp_path / "tanh-gelu"  # GPT2Config's default activation, which our model does not compute
    transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1,
                                                         n_head=2)).save_pretrained(tanh)
    shutil.copy(exported / "tokenizer.json", tanh / "tokenizer.json")
    with pytest.raises(ImportRefused, match="activation_function='gelu_new'"):
        trainer(tmp_path, "tanh", INIT_FROM=str(tanh))


def test_the_exports_zero_fill_is_dropped_on_reading_back(tmp_path):
    """GPT-2 always has biases and a byte vocabulary grows by 64 rows: both read back to the model's tensors."""
    for fields, tokenizer in (({"bias": False}, Tokenizer.fit("char", "abcdef\n")), ({}, Tokenizer({"kind": "byte"}))):
        torch.manual_seed(0)
        ours = GPT(ModelConfig(vocab_size=256 if tokenizer.kind == "byte" else 64, block_size=16, n_layer=1,
                               n_head=4, n_embd=32, **fields))
        folder = export_state(ours.config, ours.state_dict(), tokenizer, tmp_path / tokenizer.kind, **QUIET)
        _, weights = read_hf_folder(folder)
        back, dropped = without_export_fill(weights, ours.state_dict())
        assert back.keys() == ours.state_dict().keys() and dropped
        assert all(torch.equal(back[k], v) for k, v in ours.state_dict().items())


@pytest.mark.slow
def test_a_sentencepiece_run_exports_and_warm_starts_from_its_folder(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("sentencepiece")
    sp = "TOKENIZER_SENTENCEPIECE=y SENTENCEPIECE_VOCAB_SIZE=300 NORM_RMSNORM=y POS_ROPE=y MLP_SWIGLU=y BIAS=n"
    parent_run, _ = trainer(tmp_path, "parent", sp)
    parent_summary = parent_run.run()
    folder = export_run(parent_run.run_dir, "best", **QUIET)
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    text = (tmp_path / "corpus.txt").read_text()[:2000] + "</s> 42\r\n"
    ids = hf(text)["input_ids"]
    assert ids == parent_run.tokenizer.encode(text) and hf.eos_token_id == parent_run.tokenizer.eos_id == 3
    theirs = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True)
    assert type(theirs).__name__ == "LlamaForCausalLM"
    best = checkpoint.load(parent_run.run_dir / "checkpoints" / "best.pt")
    ours = GPT(ModelConfig.from_dict(best["model_config"])).eval()
    ours.load_state_dict(best["model"])
    idx = torch.tensor([ids[:16]])
    with torch.no_grad():
        assert (theirs.eval()(idx).logits - ours(idx, idx)[0]).abs().max().item() <= 1e-5
    child, _ = trainer(tmp_path, "child", sp, INIT_FROM=str(folder))
    child.warm_start()
    assert child.evaluate()["val"] == pytest.approx(parent_summary["best_val_loss"], abs=1e-6)
