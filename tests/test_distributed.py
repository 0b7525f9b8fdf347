"""Data parallelism on this CPU: DDP, FSDP2 (gloo) and DeepSpeed (DS_ACCELERATOR=cpu) with 2 processes
reach the single-process losses for the same global batch and seed; FSDP2 resumes at another world
size and DeepSpeed from its own checkpoint."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import config_of
from kconfig.tree import ROOT, parse_overrides, resolve, write_outputs
from kconfig.values import values
from parallel.launch import train_command

# A tiny model; GRAD_ACCUM=2 exercises the skipped all-reduce of the first micro-batch.
SETTINGS = ("MODEL_SIZE_CUSTOM=y N_LAYER=2 N_HEAD=2 N_EMBD=64 BLOCK_SIZE=32 GRAD_ACCUM=2 WARMUP_ITERS=1 "
            'LR=3e-3 MIN_LR=3e-4 MAX_ITERS=16 LOG_INTERVAL=4 EVAL_INTERVAL=8 EVAL_BATCHES=2 DEVICE_CPU=y '
            'DTYPE_FP32=y SAMPLE_TOKENS=5 DROPOUT="0" CHECKPOINT_INTERVAL=8 CHECKPOINT_KEEP=2')
# Stated tolerance: the same global batch and seed give the same losses up to float reduction order
# (measured differences are below 1e-5).
TOLERANCE = 1e-4


def configure(tmp_path, name: str, extra: str):
    lines = [f"{a} {b} {a}{b}." for a in ("cat", "dog", "fox", "owl") for b in ("one", "two", "six")]
    (tmp_path / "corpus.txt").write_text("\n".join(lines * 120) + "\n")
    where = f'DATA_PATH="{tmp_path / "corpus.txt"}" DATA_CACHE_DIR="{tmp_path / "cache"}"'
    kconf, _ = resolve(parse_overrides(f"{SETTINGS} {where}"), parse_overrides(extra, "extra"))
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    write_outputs(kconf, run_dir / ".config", run_dir / "config.py")
    return run_dir, values(kconf)


def train(run_dir, cfg, resume: bool = False) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    done = subprocess.run(train_command(cfg, run_dir, resume), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def losses(run_dir) -> dict:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    out = {("train", r["step"]): r["train_loss"] for r in records if "train_loss" in r}
    out.update({("val", r["step"]): r["val_loss"] for r in records if "val_loss" in r})
    return out


def assert_close(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    worst = max(abs(got[k] - want[k]) for k in want)
    assert worst < TOLERANCE, {k: (got[k], want[k]) for k in want}


@pytest.fixture(scope="module")
def single_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    run_dir, cfg = configure(tmp, "single", "MICRO_BATCH=8")
    train(run_dir, cfg)
    return run_dir, losses(run_dir)


@pytest.fixture(scope="module")
def single(single_run):
    return single_run[1]


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["DDP", "FSDP2", "DEEPSPEED"])
def test_two_processes_match_one(tmp_path, single, engine):
    run_dir, cfg = configure(tmp_path, engine, f"MICRO_BATCH=4 PARALLEL_{engine}=y NPROC_PER_NODE=2")
    train(run_dir, cfg)
    assert_close(losses(run_dir), single)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["tokens"] == 16 * 8 * 32 * 2
    log = (run_dir / "train.log").read_text()
    assert log.count("eval step 16") == 1, "rank 0 alone logs"
    if engine == "DDP":  # the single-process checkpoint format
        assert (run_dir / "checkpoints" / "step-00000016.pt").is_file()
    else:
        assert (run_dir / "checkpoints" / "step-00000016" / "extra.pt").is_file()
    # 'make sample' reads every engine's checkpoint in one process: with the run's own sampling
    # settings and seed it repeats the end-of-training sample the run wrote.
    from train.sample import sample_from

    assert sample_from(run_dir) + "\n" == (run_dir / "samples.txt").read_text()


@pytest.mark.slow
def test_fsdp2_resumes_at_another_world_size(tmp_path, single):
    run_dir, cfg = configure(tmp_path, "run", "MICRO_BATCH=4 PARALLEL_FSDP2=y NPROC_PER_NODE=2")
    train(run_dir, cfg)
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-00000016")  # as if stopped after step 8's checkpoint
    assert (run_dir / "checkpoints" / "step-00000008" / ".metadata").is_file(), "a DCP checkpoint"
    # Continue on one process with the same global batch: DCP reshards the weights and Adam moments.
    kconf, _ = resolve([*parse_overrides(f"{SETTINGS}")], parse_overrides(
        f'DATA_PATH="{tmp_path / "corpus.txt"}" DATA_CACHE_DIR="{tmp_path / "cache"}" MICRO_BATCH=8 '
        'PARALLEL_FSDP2=y NPROC_PER_NODE=1', "continue"))
    write_outputs(kconf, run_dir / ".config", run_dir / "config.py")
    train(run_dir, values(kconf), resume=True)
    assert_close(losses(run_dir), single)
    log = (run_dir / "train.log").read_text()
    assert "resumed from step 8" in log and "resuming on 1 process(es) a run checkpointed on 2" in log


@pytest.mark.slow
def test_deepspeed_resumes_from_its_checkpoint(tmp_path, single):
    run_dir, cfg = configure(tmp_path, "run", "MICRO_BATCH=4 PARALLEL_DEEPSPEED=y NPROC_PER_NODE=2 "
                                              "DEEPSPEED_ZERO_STAGE=1")
    train(run_dir, cfg)
    import shutil

    shutil.rmtree(run_dir / "checkpoints" / "step-00000016")
    train(run_dir, cfg, resume=True)
    assert_close(losses(run_dir), single)
    assert "resumed from step 8" in (run_dir / "train.log").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["FSDP2", "DEEPSPEED"])
def test_a_sharded_run_warm_starts_from_a_single_process_run(tmp_path, single_run, engine):
    """INIT_FROM's weights go into the model before FSDP2 shards it or DeepSpeed copies it."""
    parent_dir, parent = single_run
    run_dir, cfg = configure(tmp_path, engine, f"MICRO_BATCH=4 PARALLEL_{engine}=y NPROC_PER_NODE=2 MAX_ITERS=4 "
                                               f'INIT_FROM="{parent_dir}"')
    train(run_dir, cfg)
    best = min(v for (kind, _), v in parent.items() if kind == "val")
    assert abs(losses(run_dir)[("val", 0)] - best) < TOLERANCE
    # and trains on as one process does (the step-0 best checkpoint must not start the optimizer's state)
    one_dir, one_cfg = configure(tmp_path, "one", f'MICRO_BATCH=8 MAX_ITERS=4 INIT_FROM="{parent_dir}"')
    train(one_dir, one_cfg)
    assert_close(losses(run_dir), losses(one_dir))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["init_from"]["path"] == str(parent_dir / "checkpoints" / "best.pt")
    # And back: one process warm-starts from the sharded run, its best weights gathered.
    child_dir, child_cfg = configure(tmp_path, "child", f'MICRO_BATCH=8 MAX_ITERS=2 INIT_FROM="{run_dir}"')
    train(child_dir, child_cfg)
    sharded_best = min(v for (kind, _), v in losses(run_dir).items() if kind == "val")
    assert abs(losses(child_dir)[("val", 0)] - sharded_best) < TOLERANCE
    parent_record = json.loads((child_dir / "summary.json").read_text())["init_from"]
    assert parent_record["path"] == str(run_dir / "checkpoints" / "best") and len(parent_record["weights_sha256"]) == 64


def test_launch_commands():
    def command(s):
        return train_command(config_of(s), ROOT / "runs" / "r", False)

    assert command("")[1:] == ["-m", "train", str(ROOT / "runs" / "r")]
    assert command("PARALLEL_DDP=y NPROC_PER_NODE=2")[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node=2",
                                                                "--standalone"]
    multi = command('PARALLEL_FSDP2=y NPROC_PER_NODE=8 NNODES=4 NODE_RANK=3 RDZV_ENDPOINT="node0:29400"')
    assert "--nnodes=4" in multi and "--node-rank=3" in multi and "--master-addr=node0" in multi
    assert "--master-port=29400" in multi
    with pytest.raises(RuntimeError, match="NPROC_PER_NODE=0 starts one process per GPU"):
        command("PARALLEL_DDP=y")
    assert sys.executable == command("")[0]


def write_pairs_and_chats(tmp_path) -> tuple[str, str]:
    """SFT chats and DPO pairs in the test corpus's alphabet (a char tokenizer fitted on it encodes them)."""
    words = [f"{a}{b}" for a in ("cat", "dog", "fox", "owl") for b in ("one", "two", "six")]
    chats = [{"messages": [{"role": "user", "content": f"{w} {w}"}, {"role": "assistant", "content": w}]}
             for w in words * 4]
    pairs = [{"prompt": f"{w} {w}", "chosen": w, "rejected": words[(i + 1) % len(words)]}
             for i, w in enumerate(words * 4)]
    sft, dpo = tmp_path / "sft.jsonl", tmp_path / "dpo.jsonl"
    sft.write_text("".join(json.dumps(c) + "\n" for c in chats))
    dpo.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    return str(sft), str(dpo)


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["SFT", "DPO"])
@pytest.mark.parametrize("engine", ["DDP", "FSDP2", "DEEPSPEED"])
def test_fine_tuning_on_two_processes_matches_one(tmp_path, single_run, objective, engine):
    """SFT (packed, document masking) and DPO (frozen reference) under DDP and FSDP2: the same losses as one
    process with the same global batch. Templates use plain text here (the alpaca template needs only an
    end-of-text token, added to the char vocabulary)."""
    parent_dir, _ = single_run
    sft, dpo = write_pairs_and_chats(tmp_path)
    data = f'SFT_DATA="{sft}"' if objective == "SFT" else f'DPO_DATA="{dpo}"'
    stage = (f'OBJECTIVE_{objective}=y {data} INIT_FROM="{parent_dir}" CHAT_TEMPLATE_PLAIN=y MAX_ITERS=6 '
             'EVAL_INTERVAL=3 SFT_VAL_FRACTION="0.25"')
    one_dir, one_cfg = configure(tmp_path, "one", f"MICRO_BATCH=8 {stage}")
    train(one_dir, one_cfg)
    two_dir, two_cfg = configure(tmp_path, engine, f"MICRO_BATCH=4 PARALLEL_{engine}=y NPROC_PER_NODE=2 {stage}")
    train(two_dir, two_cfg)
    assert_close(losses(two_dir), losses(one_dir))
    if objective == "DPO":
        records = [json.loads(line) for line in (two_dir / "metrics.jsonl").read_text().splitlines()]
        assert any("val_dpo_accuracy" in r for r in records)
