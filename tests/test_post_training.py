"""Post-training runs end to end in the trainer (train/post_training.py): SFT's masked loss, packing,
LoRA's adapters in checkpoints, export, eval and sampling, DPO raising preference accuracy, exact
resume, and the named errors of a bad setup. One tiny byte-level parent is pretrained per module;
SFT examples and DPO pairs are generated here ("name the function": the answer is in the prompt)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import torch.nn.functional as F

from conftest import config_of, merged_lora_weights
from data.chat_template import IM_END, IM_START
from data.errors import DataError
from data.prepare import prepare
from evaluation.load import load_checkpoint
from export.hf_folder import export_run
from hf.read import read_hf_folder
from parallel.errors import CheckpointError
from train import checkpoint
from train.sample import sample_from
from train.trainer import Trainer

NAMES = [f"{verb}_{noun}" for verb in ("get", "set", "load", "save", "read", "send")
         for noun in ("row", "file", "key", "user", "page")]
WRONG = [f"{verb}_{noun}" for verb in ("drop", "kill", "zap") for noun in ("xyz", "qq", "vv")]  # never chosen
SETTINGS = ("TOKENIZER_BYTE=y MODEL_SIZE_CUSTOM=y N_LAYER=1 N_HEAD=2 N_EMBD=32 BLOCK_SIZE=96 MICRO_BATCH=8 "
            "WARMUP_ITERS=2 LR=3e-3 MIN_LR=3e-4 EVAL_INTERVAL=10 EVAL_BATCHES=2 LOG_INTERVAL=1 DEVICE_CPU=y "
            "DTYPE_FP32=y SAMPLE_TOKENS=4 SEED=3 CPU_THREADS=1")
SFT = 'OBJECTIVE_SFT=y SFT_VAL_FRACTION="0.2"'
DPO = 'OBJECTIVE_DPO=y SFT_VAL_FRACTION="0.2"'
LORA = 'LORA=y LORA_RANK=4 LORA_ALPHA=8 LORA_TARGETS="attn.c_attn attn.c_proj mlp.c_fc"'


def write_data(root):
    """The corpus, SFT examples (chat shape) and DPO pairs (chosen: the prompt's name, rejected: a wrong one)."""
    functions = "".join(f"def {a}(x):\n    return {b}(x)\n\n" for a in NAMES for b in NAMES[:6])
    (root / "corpus.txt").write_text(functions * 3)
    rows = [{"messages": [{"role": "user", "content": f"def {n}(x):"}, {"role": "assistant", "content": n}]}
            for n in NAMES]
    (root / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = [{"prompt": f"def {n}(x):", "chosen": n, "rejected": WRONG[i % len(WRONG)]} for i, n in enumerate(NAMES)]
    (root / "dpo.jsonl").write_text("".join(json.dumps(p) + "\n" for p in pairs))


def trainer(root, name, *sets, logs=None, **symbols):
    """A Trainer for run directory root/name (the data of ``root``; pretraining unless ``sets`` say otherwise)."""
    where = f'DATA_PATH="{root / "corpus.txt"}" DATA_CACHE_DIR="{root / "cache"}"'
    cfg = config_of(SETTINGS, where, *sets, **symbols)
    run_dir = root / name
    run_dir.mkdir(exist_ok=True)
    log = (lambda message: None) if logs is None else logs.append
    return Trainer(cfg, prepare(cfg, root, log=lambda message: None), run_dir, log=log)


@pytest.fixture(scope="module")
def parent(tmp_path_factory):
    """A pretrained byte-level model (its run directory), trained once for the module."""
    root = tmp_path_factory.mktemp("post")
    write_data(root)
    t = trainer(root, "pre", MAX_ITERS=60)
    t.run()
    return t.run_dir


def sft(parent, tmp_path, name, *sets, **symbols):
    write_data(tmp_path)
    return trainer(tmp_path, name, SFT, *sets, SFT_DATA=str(tmp_path / "sft.jsonl"), INIT_FROM=str(parent), **symbols)


def dpo(parent, tmp_path, name, *sets, **symbols):
    write_data(tmp_path)
    return trainer(tmp_path, name, DPO, *sets, DPO_DATA=str(tmp_path / "dpo.jsonl"), INIT_FROM=str(parent), **symbols)


def records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_losses(run_dir):
    return {r["step"]: r["train_loss"] for r in records(run_dir) if "train_loss" in r}


def hand_example(tokenizer, name):
    """The chatml token ids of one SFT row and the indices of its trainable tokens (the response and
    its closing <|im_end|>), built by hand from the byte values."""
    start, end = tokenizer.special_id(IM_START), tokenizer.special_id(IM_END)
    prompt = ([start, *f"user\ndef {name}(x):".encode(), end, *b"\n", start, *b"assistant\n"])
    response = [*name.encode(), end]
    return prompt + response + [*b"\n"], range(len(prompt), len(prompt) + len(response))


def hand_loss(model, rows):
    """Mean next-token cross-entropy over the trainable tokens of ``rows`` (ids, trainable indices),
    each example run through ``model`` on its own."""
    total, count = 0.0, 0
    for ids, trainable in rows:
        logits, _ = model(torch.tensor([ids[:-1]]), every_position=True)
        logp = F.log_softmax(logits[0].double(), dim=-1)
        for i in trainable:  # token i is predicted at position i - 1
            total -= logp[i - 1, ids[i]].item()
            count += 1
    return total / count


# ------------------------------------------------------------------ SFT


@pytest.mark.slow
@pytest.mark.parametrize("packing", [False, True])
def test_sft_loss_is_the_cross_entropy_of_the_response_tokens_alone(parent, tmp_path, packing):
    t = sft(parent, tmp_path, "sft", SFT_PACKING=packing, MAX_ITERS=20)  # two examples of about 45 tokens a row
    # The trainer's first batch (the same examples in the same order, drawn again) and the loss on it
    batch = t.post.data.batches("train", t.loop.micro_batch, t.loop.block_size, t.device, t.loop.seed).next()
    x, y, doc = batch
    assert (doc is not None) == packing
    texts = [t.tokenizer.decode(row.tolist()) for row in x]  # each row's text names its examples
    held = [n for n in NAMES if any(f"def {n}(x):" in text for text in texts)]
    assert len(held) > 8 if packing else len(held) == 8
    rows = [hand_example(t.tokenizer, n) for n in held]
    # Only response tokens are targets: as many as the examples' responses and closing tokens.
    assert int((y != -100).sum()) == sum(len(r[1]) for r in rows)
    with torch.no_grad():  # each example on its own: packing's document masking and positions change nothing
        expected = hand_loss(t.model, rows)
        assert t.post.loss(t.model, t.model, batch)[0].item() == pytest.approx(expected, rel=1e-5)
    summary = t.run()
    losses = train_losses(t.run_dir)
    assert losses[1] == pytest.approx(expected, rel=1e-5)  # step 1's loss: the first batch before any update
    assert summary["final_val_loss"] < records(t.run_dir)[0]["val_loss"] and losses[20] < losses[1]
    stats = summary["post_training"]["data"]
    every = [hand_example(t.tokenizer, n) for n in NAMES]
    assert stats["examples"] == 30 and stats["train_examples"] == 24 and stats["val_examples"] == 6
    assert stats["tokens"] == sum(len(ids) for ids, _ in every)
    assert stats["response_tokens"] == sum(len(r) for _, r in every)
    assert stats["truncated"] == 0 and stats["dropped"] == 0
    assert (stats["packed_sequences"] is not None) == packing
    assert summary["post_training"]["added_tokens"] == [IM_START, IM_END] and "lora" not in summary["post_training"]


def test_sft_truncate_cuts_long_examples_and_counts_them(parent, tmp_path):
    write_data(tmp_path)
    long = {"messages": [{"role": "user", "content": "def get_row(x):"}, {"role": "assistant", "content": "g" * 120}]}
    with open(tmp_path / "sft.jsonl", "a") as f:
        f.write(json.dumps(long) + "\n")
    t = trainer(tmp_path, "cut", SFT, "SFT_TRUNCATE=y", SFT_DATA=str(tmp_path / "sft.jsonl"), INIT_FROM=str(parent))
    stats = t.post.data.stats
    assert stats["examples"] == 31 and stats["truncated"] == 1 and stats["dropped"] == 0
    assert max(len(e.ids) for e in t.post.data.train + t.post.data.val) == 97  # BLOCK_SIZE + 1
    cut = next(e for e in t.post.data.train + t.post.data.val if len(e.ids) == 97)
    assert cut.mask[-1] and t.tokenizer.decode(cut.ids[-5:].tolist()) == "ggggg"  # the response's tail is cut


# ------------------------------------------------------------------ LoRA


@pytest.fixture(scope="module")
def lora_run(parent, tmp_path_factory):
    """An SFT run with LoRA (the vocabulary grew: the embedding trains in full), trained for the module."""
    t = sft(parent, tmp_path_factory.mktemp("lora"), "lora", LORA, MAX_ITERS=20)
    summary = t.run()
    return t, summary


@pytest.mark.slow
def test_lora_changes_only_the_adapters_and_the_grown_embedding(parent, lora_run):
    t, summary = lora_run
    before = checkpoint.load(parent / "checkpoints" / "best.pt")["model"]
    grown = {"wte.weight", "lm_head.weight"} if t.model.config.tie_embeddings else {"wte.weight"}
    changed, kept = set(), set()
    for name, tensor in t.model.state_dict().items():
        if ".lora_" in name:
            continue
        plain = name.replace(".base_layer.", ".")
        if name in grown:  # the parent's 256 rows trained too; the template's two new rows exist only here
            assert tensor.shape[0] > before[plain].shape[0]
            changed.add(plain)
        elif torch.equal(tensor, before[plain]):
            kept.add(plain)
        else:
            changed.add(plain)
    assert changed == grown and kept == set(before) - grown
    lora = summary["post_training"]["lora"]
    assert lora["trained_in_full"] == ["wte.weight"] and lora["layers"] == 3 and lora["rank"] == 4
    # The checkpoint holds the adapter alone (and the grown embedding), with the LoRA settings.
    state = checkpoint.load(checkpoint.step_paths(t.run_dir)[-1])
    adapters = {k for k in state["model"] if ".lora_" in k}
    assert set(state["model"]) == adapters | {"wte.weight"} and len(adapters) == 6
    assert state["lora"] == {**t.post.lora.to_dict()} and state["init_from"]["path"].endswith("best.pt")


@pytest.mark.slow
def test_a_lora_run_exports_evaluates_and_samples_with_its_merged_weights(lora_run):
    t, _ = lora_run
    merged = merged_lora_weights(t.model)  # the live model after its last step, the latest checkpoint's weights
    folder = export_run(t.run_dir, "latest", log=lambda message: None)
    _, exported = read_hf_folder(folder)
    tied = {"lm_head.weight"} if t.model.config.tie_embeddings else set()
    assert set(exported) - tied == set(merged) - tied
    for name, tensor in exported.items():
        assert torch.allclose(tensor.float(), merged[name], atol=1e-6), name
    model, tokenizer, info = load_checkpoint(t.run_dir, "latest")
    assert tokenizer.sha256 == t.tokenizer.sha256 and info["step"] == 20
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, merged[name], atol=1e-6), name
    x = torch.tensor([hand_example(tokenizer, "get_row")[0][:-1]])
    t.model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x, every_position=True)[0], t.model(x, every_position=True)[0], atol=1e-5)
    text = sample_from(t.run_dir, prompt="def ", tokens=4)
    assert text.startswith("def ") and len(text) <= len("def ") + 4  # 4 bytes: at most 4 characters


def exported(parent, tmp_path):
    """`make export` of a copy of the parent (the module's parent stays as it is)."""
    return export_run(shutil.copytree(parent, tmp_path / "exported"), "best", log=lambda message: None)


@pytest.mark.slow
def test_a_lora_run_from_a_hugging_face_folder_merges_into_that_base(parent, tmp_path):
    folder = exported(parent, tmp_path)  # the byte tokenizer, without the template's tokens
    t = sft(folder, tmp_path, "from_hf", LORA, MAX_ITERS=5)
    t.run()
    assert t.parent["kind"] == "hf" and t.post.trained_in_full == ("wte.weight",)
    model, _, _ = load_checkpoint(t.run_dir, "latest")  # the adapter merged into the folder's weights, read again
    merged = merged_lora_weights(t.model)
    for name, tensor in model.state_dict().items():
        assert torch.allclose(tensor, merged[name], atol=1e-6), name


@pytest.mark.slow
def test_a_hugging_face_parent_records_its_embedding_rows_like_a_checkpoint(parent, tmp_path):
    from_checkpoint = sft(parent, tmp_path, "from_pt")
    assert from_checkpoint.parent["embedding_rows"] == 256
    folder = exported(parent, tmp_path)
    assert sft(folder, tmp_path, "from_hf").parent.get("embedding_rows") == 256


# ------------------------------------------------------------------ DPO


def pref_accuracies(run_dir):
    return [r["val_dpo_accuracy"] for r in records(run_dir) if "val_dpo_accuracy" in r]


@pytest.mark.slow
def test_dpo_raises_the_validation_preference_accuracy(lora_run, tmp_path):
    parent_dir = lora_run[0].run_dir
    t = dpo(parent_dir, tmp_path, "dpo", MAX_ITERS=30, LR="3e-3", DPO_BETA="0.1", EVAL_BATCHES=1)
    assert t.post.reference is not None and not any(p.requires_grad for p in t.post.reference.parameters())
    summary = t.run()
    evals = [r for r in records(t.run_dir) if "val_loss" in r]
    # step 0: the policy is the reference, so the loss is log 2
    assert evals[0]["step"] == 0 and evals[0]["val_loss"] == pytest.approx(0.6931, abs=1e-3)
    assert evals[0]["val_dpo_accuracy"] == 0.0  # no margin yet: ties count as wrong
    assert evals[-1]["val_dpo_accuracy"] >= 0.75 and evals[-1]["val_dpo_reward_margin"] > 0
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert summary["post_training"]["dpo"] == {"loss": "sigmoid", "beta": 0.1, "label_smoothing": 0.0}
    assert summary["post_training"]["data"]["pairs"] == 30


def reference_logits(t, x):
    with torch.no_grad(), t.post.reference_model(t.model) as reference:
        return reference(x, every_position=True)[0].clone()


@pytest.mark.slow
def test_dpo_with_lora_has_no_reference_copy_and_trains(parent, tmp_path):
    """From the pretrained parent the vocabulary grows, so the embedding trains in full beside the
    adapters; the reference (adapters off) still computes the starting weights after training."""
    t = dpo(parent, tmp_path, "dpo_lora", LORA, MAX_ITERS=10)
    assert t.post.reference is None and t.post.lora is not None and t.post.trained_in_full == ("wte.weight",)
    start = {k: v.clone() for k, v in t.model.state_dict().items() if ".lora_B" in k or k == "wte.weight"}
    assert all(not v.any() for k, v in start.items() if ".lora_B" in k)  # adapters start at zero: policy = reference
    x, _ = t.post.data.batches("val", 4, t.loop.block_size, t.device, 0).next()
    before = reference_logits(t, x)
    t.model.eval()
    with torch.no_grad():
        assert torch.equal(before, t.model(x, every_position=True)[0])
    t.run()
    assert any(t.model.state_dict()[k].abs().sum() > 0 for k in start if ".lora_B" in k)
    assert not torch.equal(t.model.state_dict()["wte.weight"], start["wte.weight"])  # trained in full
    assert torch.equal(reference_logits(t, x), before)
    losses = train_losses(t.run_dir)
    assert losses[1] == pytest.approx(0.6931, abs=1e-3) and losses[10] < losses[1]


@pytest.mark.slow
@pytest.mark.parametrize("sets", ["DPO_LOSS_IPO=y", 'DPO_LABEL_SMOOTHING="0.2"'])
def test_ipo_and_label_smoothing_train(parent, tmp_path, sets):
    t = dpo(parent, tmp_path, "variant", sets, MAX_ITERS=5)
    summary = t.run()
    losses = train_losses(t.run_dir)
    assert all(torch.isfinite(torch.tensor(v)) for v in losses.values()) and losses[5] != losses[1]
    entry = summary["post_training"]["dpo"]
    assert (entry["loss"], entry["label_smoothing"]) == (("ipo", 0.0) if "IPO" in sets else ("sigmoid", 0.2))


# ------------------------------------------------------------------ resume


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["sft_lora", "dpo", "dpo_lora"])
def test_an_interrupted_run_resumes_to_the_same_losses(parent, tmp_path, kind):
    def make(name, steps):  # LR_DECAY_ITERS: the schedule of 10 steps whatever MAX_ITERS
        if kind == "sft_lora":
            return sft(parent, tmp_path, name, LORA, 'LORA_DROPOUT="0.1"', MAX_ITERS=steps, CHECKPOINT_INTERVAL=5,
                       LR_DECAY_ITERS=10)
        lora = (LORA, 'LORA_DROPOUT="0.1"') if kind == "dpo_lora" else ('DROPOUT="0.1"',)
        return dpo(parent, tmp_path, name, *lora, MAX_ITERS=steps, CHECKPOINT_INTERVAL=5, LR_DECAY_ITERS=10)

    whole = make("whole", 10)
    whole.run()
    make("parted", 5).run()
    resumed = make("parted", 10)
    resumed.resume()
    assert resumed.start_step == 5
    resumed.run()
    expected, got = train_losses(whole.run_dir), train_losses(resumed.run_dir)
    assert sorted(got) == list(range(1, 11)) and got == expected  # bit-identical


# ------------------------------------------------------------------ named errors


def test_sft_without_init_from_is_a_named_error(tmp_path):
    write_data(tmp_path)
    with pytest.raises(CheckpointError, match="CONFIG_OBJECTIVE_SFT fine-tunes a trained model.*CONFIG_INIT_FROM"):
        trainer(tmp_path, "orphan", SFT, SFT_DATA=str(tmp_path / "sft.jsonl"))


def test_a_dpo_row_without_rejected_is_a_named_error(parent, tmp_path):
    write_data(tmp_path)
    with open(tmp_path / "dpo.jsonl", "a") as f:
        f.write(json.dumps({"prompt": "def f(x):", "chosen": "f"}) + "\n")
    with pytest.raises(DataError, match=r"dpo.jsonl.*31.*missing column 'rejected'"):
        trainer(tmp_path, "dpo", DPO, DPO_DATA=str(tmp_path / "dpo.jsonl"), INIT_FROM=str(parent))


def test_an_sft_example_longer_than_the_block_is_a_named_error(parent, tmp_path):
    write_data(tmp_path)
    long = {"messages": [{"role": "user", "content": "def get_row(x):"}, {"role": "assistant", "content": "g" * 120}]}
    with open(tmp_path / "sft.jsonl", "a") as f:
        f.write(json.dumps(long) + "\n")
    with pytest.raises(DataError, match="longer than CONFIG_BLOCK_SIZE=96.*CONFIG_SFT_TRUNCATE=y"):
        trainer(tmp_path, "long", SFT, SFT_DATA=str(tmp_path / "sft.jsonl"), INIT_FROM=str(parent))


def test_a_parent_with_another_tokenizer_is_a_named_error(parent, tmp_path):
    write_data(tmp_path)
    with pytest.raises(CheckpointError, match="trained with another tokenizer.*use the parent's tokenizer settings"):
        trainer(tmp_path, "other", SFT, "TOKENIZER_CHAR=y", SFT_DATA=str(tmp_path / "sft.jsonl"),
                INIT_FROM=str(parent))


@pytest.mark.slow
def test_resuming_after_the_parent_changed_is_a_named_error(parent, tmp_path):
    moved = shutil.copytree(parent, tmp_path / "parent")
    sft(moved, tmp_path, "child", LORA, MAX_ITERS=5).run()
    state = checkpoint.load(moved / "checkpoints" / "best.pt")
    state["model"] = {k: v + 0.01 if v.is_floating_point() else v for k, v in state["model"].items()}
    checkpoint.save_best(moved, state)  # the parent trained on (or was replaced) since the child started
    resumed = sft(moved, tmp_path, "child", LORA, MAX_ITERS=10)
    with pytest.raises(CheckpointError, match="changed"):
        resumed.resume()


@pytest.mark.slow
def test_make_check_steps_each_objective_with_its_own_loss_and_lora(config):
    """plan/check.py's two steps run the stage's objective (SFT's masked loss, DPO's pair loss, LoRA applied)
    on random ids, without reading INIT_FROM, and a LORA_TARGETS that matches nothing is named there."""
    import math

    from plan.check import step_twice
    from train.lora import LoraError

    common = dict(INIT_FROM="runs/not/trained/yet", MICRO_BATCH=2)
    sft_run = step_twice(config("OBJECTIVE_SFT=y", "LORA=y", SFT_DATA="x.jsonl", **common))
    dpo_run = step_twice(config("OBJECTIVE_DPO=y", DPO_DATA="x.jsonl", **common))
    assert all(math.isfinite(v) for v in sft_run["losses"])
    assert dpo_run["losses"][0] == pytest.approx(math.log(2), abs=1e-6)  # policy = reference at the first step
    with pytest.raises(LoraError, match="CONFIG_LORA_TARGETS: 'attn.nope' matches no Linear layer"):
        step_twice(config("OBJECTIVE_SFT=y", "LORA=y", SFT_DATA="x.jsonl", LORA_TARGETS="attn.nope", **common))
