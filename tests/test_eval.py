"""make eval: lm-evaluation-harness on our own model (accuracy against a hand computation of the same
log-likelihoods), rolling log-likelihood, generate_until, local task folders and named errors."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from data.tokenizer import Tokenizer
from evaluation.bits_per_byte import bits_per_byte
from harness.errors import EvalError
from harness.evaluate import EvalConfig, run_tasks
from harness.tasks import task_names, task_specs
from model.gpt import GPT, ModelConfig
from train.build import padded_vocab

pytest.importorskip("lm_eval")
from harness.adapter import OurLM  # noqa: E402  (needs lm_eval)

ALPHABET = "abcdefgh =+\n"
DOCS = [  # context, choices, answer
    ("a = b\nc =", [" d", " a b", "\n", " h+h"], 0),
    ("b + c\n", ["d + e", "ab", "hhhh", "a"], 2),
    ("", ["abc", "h"], 1),  # an empty context: scored after the end-of-text token
    ("g g g g g g g g g g g g g g g g g g g g g g g g g g g g g g g g g g g", [" g", " h", " a"], 1),  # past BLOCK_SIZE
    ("e =  ", ["f", "g g"], 0),  # trailing spaces move into the continuation
]
TASK_YAML = """task: tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: docs/test.jsonl
test_split: test
output_type: multiple_choice
doc_to_text: "{{context}}"
doc_to_choice: "{{choices}}"
doc_to_target: "{{answer}}"
target_delimiter: ""
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf-datasets"))


def tiny_model(seed: int = 0, **fields) -> tuple[GPT, Tokenizer]:
    tokenizer = Tokenizer.fit("char", ALPHABET)
    torch.manual_seed(seed)
    config = ModelConfig(vocab_size=padded_vocab(tokenizer.vocab_size), block_size=16, n_layer=2, n_head=4,
                         n_embd=32, **fields)
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)  # well away from init, so choices differ clearly
    return model, tokenizer


def task_folder(tmp_path, docs=DOCS):
    folder = tmp_path / "tasks"
    (folder / "docs").mkdir(parents=True)
    (folder / "tiny_mc.yaml").write_text(TASK_YAML)
    (folder / "docs" / "test.jsonl").write_text(
        "".join(json.dumps({"context": c, "choices": ch, "answer": a}) + "\n" for c, ch, a in docs))
    return folder


def by_hand(model: GPT, tokenizer: Tokenizer, context: str, continuation: str, eot: int) -> float:
    """log p(continuation | context) from one plain forward over the last BLOCK_SIZE + 1 tokens."""
    stripped = context.rstrip()
    continuation, context = context[len(stripped):] + continuation, stripped
    ctx = tokenizer.encode(context) if context else [eot]
    cont = tokenizer.encode(continuation)
    whole = (ctx + cont)[-(model.config.block_size + 1):]
    with torch.no_grad():
        logits, _ = model(torch.tensor([whole[:-1]]), every_position=True)
    logp = F.log_softmax(logits[0].double(), -1)
    n = min(len(cont), len(whole) - 1)
    return sum(logp[len(whole) - 1 - n + i, t].item() for i, t in enumerate(cont[len(cont) - n:]))


def test_task_accuracy_equals_a_hand_computation_of_the_loglikelihoods(tmp_path):
    model, tokenizer = tiny_model()
    lm = OurLM(model, tokenizer, batch_size=3)
    metrics, raw = run_tasks(lm, EvalConfig(tasks=("tiny_mc",), tasks_dir=task_folder(tmp_path)), log=lambda _: None)
    acc = acc_norm = 0
    for context, choices, answer in DOCS:
        scores = [by_hand(model, tokenizer, context, c, lm.eot_token_id) for c in choices]
        acc += int(np.argmax(scores) == answer)
        acc_norm += int(np.argmax([s / len(c.encode()) for s, c in zip(scores, choices)]) == answer)
    assert metrics["tiny_mc"]["acc"] == pytest.approx(acc / len(DOCS))
    assert metrics["tiny_mc"]["acc_norm"] == pytest.approx(acc_norm / len(DOCS))
    assert metrics["tiny_mc"]["samples"] == len(DOCS) and metrics["tiny_mc"]["num_fewshot"] == 0
    assert 0 < metrics["tiny_mc"]["acc_stderr"] < 1
    assert "tiny_mc" in raw["configs"]


def test_scores_do_not_depend_on_the_batch_size():
    model, tokenizer = tiny_model(seed=3)
    requests = [((c, ch), *OurLM(model, tokenizer)._encode_pair(c, ch)) for c, chs, _ in DOCS[:2] + DOCS[3:]
                for ch in chs]
    one = OurLM(model, tokenizer, batch_size=1)._loglikelihood_tokens(requests)
    many = OurLM(model, tokenizer, batch_size=7)._loglikelihood_tokens(requests)
    assert [s for s, _ in one] == pytest.approx([s for s, _ in many], abs=1e-5)
    assert [g for _, g in one] == [g for _, g in many]


class Request:
    def __init__(self, *args):
        self.args = args


def test_rolling_loglikelihood_predicts_every_token_once_across_windows():
    model, tokenizer = tiny_model(seed=1)
    lm = OurLM(model, tokenizer)
    text = "a = b + c\nd = e + f\ng = h\nabc = cd\n"  # 35 tokens: windows of BLOCK_SIZE 16 predict 16, 16, 3
    ids, block = tokenizer.encode(text), model.config.block_size
    assert len(ids) == 35
    windows = [([lm.eot_token_id] + ids[:15], ids[:16]), (ids[15:31], ids[16:32]),
               (ids[-17:-1], ids[-3:])]  # the last window keeps a full context before its 3 new tokens
    expected = 0.0
    with torch.no_grad():
        for inputs, targets in windows:
            assert len(inputs) == block
            logits, _ = model(torch.tensor([inputs]), every_position=True)
            logp = F.log_softmax(logits[0].double(), -1)
            expected += sum(logp[block - len(targets) + i, t].item() for i, t in enumerate(targets))
    (got,) = lm.loglikelihood_rolling([Request(text)])
    assert got == pytest.approx(expected, abs=1e-4)


def test_generate_until_is_greedy_and_stops_before_the_until_string():
    model, tokenizer = tiny_model(seed=2)
    lm = OurLM(model, tokenizer)
    greedy = model.generate(torch.tensor([tokenizer.encode("a = ")]), 12, temperature=0.0,
                            vocab_limit=tokenizer.vocab_size)
    full = tokenizer.decode(greedy[0].tolist())[len("a = "):]
    (free,) = lm.generate_until([Request("a = ", {"until": [], "max_gen_toks": 12})])
    assert free == full
    stop = full[3:5]  # a string the greedy text holds after its third character
    (cut,) = lm.generate_until([Request("a = ", {"until": [stop], "max_gen_toks": 12})])
    assert cut == full[:full.index(stop)]


def test_bits_per_byte_is_the_summed_loss_in_bits_over_the_bytes():
    model, tokenizer = tiny_model(seed=4)
    tokens = np.array(tokenizer.encode("a = b\nc = d + e\n" * 3), dtype=np.uint16)  # 48 tokens, 3 windows
    got = bits_per_byte(model, tokens, np.ones(tokenizer.vocab_size, dtype=np.int64), batch_size=2)
    nats = 0.0
    with torch.no_grad():
        for s in range(0, len(tokens) - 1, 16):
            w = torch.tensor(tokens[s:s + 17].astype(np.int64))
            logits, _ = model(w[None, :-1], every_position=True)
            nats += F.cross_entropy(logits[0].double(), w[1:], reduction="sum").item()
    assert got["tokens"] == len(tokens) - 1 and got["bytes"] == len(tokens) - 1
    assert got["bpb"] == pytest.approx(nats / math.log(2) / (len(tokens) - 1), rel=1e-5)


def test_task_names_split_on_spaces_and_commas():
    assert task_names(" arc_easy, hellaswag  boolq,arc_easy ") == ["arc_easy", "hellaswag", "boolq"]
    assert task_names("") == []


def test_local_data_files_are_taken_from_the_yaml_folder(tmp_path, monkeypatch):
    folder = task_folder(tmp_path)
    monkeypatch.chdir(tmp_path / "tasks" / "docs")  # anywhere but the task folder
    (spec,), _ = task_specs(["tiny_mc"], folder)
    assert spec["dataset_kwargs"]["data_files"] == {"test": str(folder / "docs" / "test.jsonl")}


def test_a_missing_data_file_and_a_missing_folder_are_named(tmp_path):
    folder = task_folder(tmp_path)
    (folder / "docs" / "test.jsonl").unlink()
    with pytest.raises(EvalError, match=r"tiny_mc.yaml: dataset_kwargs.data_files names .*test.jsonl"):
        task_specs(["tiny_mc"], folder)
    with pytest.raises(EvalError, match="CONFIG_EVAL_TASKS_DIR: .*nowhere is not a folder"):
        task_specs(["tiny_mc"], tmp_path / "nowhere")


def test_a_char_vocabulary_without_the_task_text_is_named(tmp_path):
    model, tokenizer = tiny_model()
    folder = task_folder(tmp_path, [("xyz", ["q", "r"], 0)])
    with pytest.raises(EvalError, match="task tiny_mc, document 0: the run's char tokenizer cannot encode task text 'xyzq'.*TOKENIZER_BYTE"):
        run_tasks(OurLM(model, tokenizer), EvalConfig(tasks=("tiny_mc",), tasks_dir=folder), log=lambda _: None)


def test_the_shipped_task_reads_and_encodes_with_a_python_char_vocabulary():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    (spec,), _ = task_specs(["python_next_line"], root / "evaluation" / "tasks")
    docs = [json.loads(line) for line in Path(spec["dataset_kwargs"]["data_files"]["test"]).open()]
    assert len(docs) == 300 and all(len(d["choices"]) == 4 and 0 <= d["answer"] < 4 for d in docs)
    assert all((d["context"] + "".join(d["choices"])).isascii() for d in docs)


@pytest.mark.slow
def test_an_unknown_task_and_an_unavailable_registry_dataset_are_named(tmp_path):
    folder = task_folder(tmp_path)
    with pytest.raises(EvalError, match=r"no task 'hellaswagg' in .* \(close: hellaswag"):
        task_specs(["hellaswagg"], folder)
    model, tokenizer = tiny_model()
    with pytest.raises(EvalError, match=r"task 'arc_easy' could not load its dataset allenai/ai2_arc \(ARC-Easy\)"
                       r".*datasets.load_dataset\('allenai/ai2_arc', 'ARC-Easy'\)"):
        run_tasks(OurLM(model, tokenizer), EvalConfig(tasks=("arc_easy",), tasks_dir=folder), log=lambda _: None)


@pytest.mark.slow
@pytest.mark.parametrize("fields", [{}, {"norm": "rmsnorm", "pos": "rope", "mlp": "swiglu", "bias": False}],
                         ids=["gpt2", "llama"])
def test_lm_eval_hf_backend_on_the_exported_folder_scores_as_we_do(tmp_path, fields):
    from lm_eval import simple_evaluate

    from export.hf_folder import export_state

    model, tokenizer = tiny_model(seed=5, **fields)
    folder = export_state(model.config, model.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    specs, manager = task_specs(["tiny_mc"], task_folder(tmp_path))
    runs = {}
    for name, lm, args in (("ours", OurLM(model, tokenizer, batch_size=4), None),
                           ("hf", "hf", {"pretrained": str(folder), "dtype": "float32", "device": "cpu"})):
        runs[name] = simple_evaluate(model=lm, model_args=args, tasks=specs, task_manager=manager, num_fewshot=0,
                                     batch_size=4, log_samples=True, bootstrap_iters=0)
    ours, hf = (runs[k]["results"]["tiny_mc"] for k in ("ours", "hf"))
    assert ours["acc,none"] == hf["acc,none"] and ours["acc_norm,none"] == hf["acc_norm,none"]
    scores = {k: [r[0] for s in runs[k]["samples"]["tiny_mc"] for (r,) in s["resps"]] for k in runs}
    assert len(scores["ours"]) == sum(len(c) for _, c, _ in DOCS)
    assert scores["ours"] == pytest.approx(scores["hf"], abs=1e-4)


@pytest.mark.slow
def test_make_eval_on_the_newest_plan_writes_the_summary_and_the_report(repo, make):
    make("defconfig-quickstart")
    make(env={"SET": "MAX_ITERS=10 WARMUP_ITERS=2 EVAL_INTERVAL=5 EVAL_BATCHES=2 SAMPLE_TOKENS=4"})
    out = make("eval", env={"SET": "EVAL_LIMIT=12 EVAL_GEN_SAMPLES=2 EVAL_GEN_TOKENS=10 EVAL_BPB_TOKENS=3000"}).stdout
    (run_dir,) = [p.parent for p in (repo / "runs").glob("*/*/summary.json")]
    summary = json.loads((run_dir / "summary.json").read_text())
    result = summary["eval"]
    assert result["checkpoint"] == "best" and result["step"] == summary["best_val_step"]
    task = result["tasks"]["python_next_line"]
    assert task["samples"] == 12 and task["acc"] in {i / 12 for i in range(13)} and task["num_fewshot"] == 0
    assert 0 < result["val_bpb"]["val"] < 8 and result["generation"]["samples"] == 2
    assert (run_dir / "eval" / "samples.txt").read_text().count("sample ") == 2
    assert json.loads((run_dir / "eval" / "results.json").read_text())["lm_eval"]["configs"]["python_next_line"]
    assert "python_next_line: acc" in out and "bits per byte" in out
    make("report")
    assert "python_next_line acc" in (run_dir.parent / "report.md").read_text()
    missing = make("eval", env={"SET": "EVAL_TASKS=no_such_task"}, check=False)
    assert missing.returncode == 2 and "CONFIG_EVAL_TASKS: no task 'no_such_task'" in missing.stderr


@pytest.mark.slow
def test_training_runs_the_tasks_every_eval_every_steps_and_logs_them(tmp_path, config):
    from data.prepare import prepare
    from train.trainer import Trainer

    (tmp_path / "corpus.txt").write_text("def f(x):\n    return x + 1\n\n" * 300)
    cfg = config("DEVICE_CPU=y", "DTYPE_FP32=y", "MODEL_SIZE_CUSTOM=y", "TOKENIZER_BYTE=y", N_LAYER=1, N_HEAD=2,
                 N_EMBD=32, BLOCK_SIZE=32, MICRO_BATCH=4, MAX_ITERS=6, EVAL_INTERVAL=2, EVAL_BATCHES=1,
                 WARMUP_ITERS=1, SAMPLE_TOKENS=2, EVAL_EVERY=3, EVAL_LIMIT=8, EVAL_TASKS="python_next_line",
                 DATA_PATH="corpus.txt", DATA_CACHE_DIR="cache")
    run_dir = tmp_path / "run"
    Trainer(cfg, prepare(cfg, tmp_path, log=lambda _: None), run_dir, log=lambda _: None).run()
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r["eval"] for r in records if "eval" in r}
    assert sorted(evals) == [4, 6]  # the first validation step at or past 3, then the one at 6
    for scores in evals.values():
        assert set(scores) == {"python_next_line"} and scores["python_next_line"]["acc"] in {i / 8 for i in range(9)}


def test_eval_every_is_checked_before_training(config):
    from plan.preflight import downstream_problems

    assert downstream_problems(config(EVAL_EVERY=0, EVAL_TASKS="no_such")) == []
    assert "CONFIG_EVAL_TASKS is empty" in downstream_problems(config(EVAL_EVERY=5, EVAL_TASKS=""))[0]
    (problem,) = downstream_problems(config(EVAL_EVERY=5, EVAL_TASKS="python_next_line", EVAL_TASKS_DIR="/nowhere"))
    assert "CONFIG_EVAL_TASKS_DIR: /nowhere is not a folder" in problem
