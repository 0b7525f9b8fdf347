"""SFT data: added special tokens, chat templates, rows of every shape and format, the loss mask,
packing and padding, and a named error for every bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from data.bpe_tokenizer import END_OF_TEXT, native, train_bpe
from data.chat_template import IM_END, IM_START, Segment, prompt_text, render, stop_token, tokens_needed
from data.errors import DataError
from data.sft import SFTConfig, SFTData, encode_segments, load_sft_rows
from data.sft_batches import IGNORE, SFTBatches, pack_rows
from data.tokenizer import Tokenizer, with_special_tokens

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
SAMPLE = "def f(x):\n    return x + 1  # <|im_start|> <|endoftext|> </s>\n"


def byte_chatml() -> Tokenizer:
    return with_special_tokens(Tokenizer({"kind": "byte"}), tokens_needed("chatml"))[0]


def small_bpe() -> Tokenizer:
    return Tokenizer(train_bpe([(ROOT / "data" / "corpus.py").read_text() * 2], 400))


def small_sentencepiece() -> Tokenizer:
    pytest.importorskip("sentencepiece")
    from data.sentencepiece_tokenizer import sample_lines, train_sentencepiece

    return Tokenizer(train_sentencepiece(sample_lines([(ROOT / "data" / "corpus.py").read_text() * 2]), 500, "bpe"))


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def chat(user: str, answer: str) -> dict:
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]}


def sft_config(config, data: Path, **symbols):
    return config(OBJECTIVE_SFT=True, SFT_DATA=str(data), **symbols)


# --- special tokens -------------------------------------------------------------------------------

def test_char_and_byte_tokenizers_get_the_template_tokens_after_their_vocabulary():
    for base in (Tokenizer.fit("char", SAMPLE), Tokenizer({"kind": "byte"})):
        tok, added = with_special_tokens(base, tokens_needed("chatml") + tokens_needed("plain"))
        assert added == [IM_START, IM_END, END_OF_TEXT]
        assert tok.vocab_size == base.vocab_size + 3 and tok.base_vocab_size == base.vocab_size
        assert [tok.special_id(n) for n in added] == [base.vocab_size, base.vocab_size + 1, base.vocab_size + 2]
        assert tok.eos_id == base.vocab_size + 2 and base.eos_id is None
        assert tok.sha256 != base.sha256 and Tokenizer(tok.spec).sha256 == tok.sha256  # rebuilt from its spec
        assert with_special_tokens(tok, [IM_END, END_OF_TEXT]) == (tok, [])  # already there: itself


def test_bpe_and_sentencepiece_reuse_their_own_end_of_text_and_add_only_chatml_tokens():
    for base in (small_bpe(), small_sentencepiece()):
        assert with_special_tokens(base, tokens_needed("plain")) == (base, [])
        tok, added = with_special_tokens(base, tokens_needed("chatml"))
        assert added == [IM_START, IM_END] and tok.vocab_size == base.vocab_size + 2
        assert tok.special_id(END_OF_TEXT) == base.eos_id == tok.eos_id
        assert tok.special_id(IM_END) == base.vocab_size + 1


def test_plain_encode_keeps_todays_ids_and_never_produces_a_special_id():
    """Adding tokens changes no id of encode: char and byte against fixed ids, BPE and SentencePiece
    against their libraries' own encoding; text spelling a special token stays characters."""
    char = Tokenizer.fit("char", SAMPLE)
    byte = Tokenizer({"kind": "byte"})
    assert char.encode(SAMPLE) == [sorted(set(SAMPLE)).index(c) for c in SAMPLE]
    assert byte.encode(SAMPLE) == list(SAMPLE.encode())
    bpe, sp = small_bpe(), small_sentencepiece()
    assert bpe.encode(SAMPLE) == native(bpe.spec).encode(SAMPLE, add_special_tokens=False).ids
    assert sp.encode(SAMPLE) == sp._sp.encode(SAMPLE)
    for base in (char, byte, bpe, sp):
        tok, _ = with_special_tokens(base, tokens_needed("chatml") + tokens_needed("plain"))
        ids = tok.encode(SAMPLE)
        assert ids == base.encode(SAMPLE) and max(ids) < tok.base_vocab_size
        assert tok.decode(ids) == SAMPLE  # the special-looking text round-trips as text


def test_encode_special_reads_literal_names_and_decode_skips_or_writes_them():
    tok = byte_chatml()
    text = f"{IM_START}user\nhi{IM_END}\n"
    ids = tok.encode_special(text)
    assert ids == [256, *b"user\nhi", 257, 10]
    assert tok.decode(ids) == "user\nhi\n" and tok.decode(ids, specials=True) == text
    bpe = with_special_tokens(small_bpe(), tokens_needed("chatml"))[0]
    assert bpe.encode_special(f"a{END_OF_TEXT}") == bpe.encode("a") + [bpe.eos_id]


# --- templates ------------------------------------------------------------------------------------

def test_chatml_segments_mark_only_the_assistant_text_and_its_closing_token_trainable():
    assert render([("system", "S"), ("user", "Q"), ("assistant", "A")], "chatml") == [
        Segment(IM_START, False, True), Segment("system\nS", False), Segment(IM_END, False, True), Segment("\n", False),
        Segment(IM_START, False, True), Segment("user\nQ", False), Segment(IM_END, False, True), Segment("\n", False),
        Segment(IM_START, False, True), Segment("assistant\n", False), Segment("A", True), Segment(IM_END, True, True),
        Segment("\n", False)]
    assert prompt_text([("user", "Q")], "chatml") == f"{IM_START}user\nQ{IM_END}\n{IM_START}assistant\n"


def test_alpaca_and_plain_templates_end_the_response_with_end_of_text():
    turns = [("user", "Do it"), ("input", "data"), ("assistant", "done")]
    assert prompt_text(turns[:2], "alpaca") == "### Instruction:\nDo it\n\n### Input:\ndata\n\n### Response:\n"
    assert render(turns, "alpaca")[-2:] == [Segment("done", True), Segment(END_OF_TEXT, True, True)]
    assert prompt_text(turns[:2], "plain") == "Do it\n\ndata\n"
    assert [s.text for s in render(turns, "plain") if s.trainable] == ["done", END_OF_TEXT]
    assert stop_token("chatml") == IM_END and stop_token("plain") == END_OF_TEXT and tokens_needed("alpaca") == (END_OF_TEXT,)


def test_the_prompt_ids_sft_trains_on_equal_the_eval_prompt_text_encoded_with_special_tokens():
    for base in (Tokenizer({"kind": "byte"}), small_bpe()):
        tok = with_special_tokens(base, tokens_needed("chatml"))[0]
        turns = [("user", "Function name?\ndef spam(eggs):\n    return eggs")]
        ids, mask = encode_segments(render([*turns, ("assistant", "spam")], "chatml"), tok, "row")
        prompt = tok.encode_special(prompt_text(turns, "chatml"))
        assert ids[:len(prompt)].tolist() == prompt and not mask[:len(prompt)].any() and mask[len(prompt)]


# --- rows -----------------------------------------------------------------------------------------

def test_every_shape_and_format_reads_as_turns(config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = tmp_path / "rows"
    folder.mkdir()
    (folder / "a.json").write_text(json.dumps([{"instruction": "I", "input": "X", "output": "O"},
                                               {"instruction": "I2", "output": "O2"}]))
    write_jsonl(folder / "b.jsonl", [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "H"},
                                                        {"from": "gpt", "value": "G"}]}])
    pq.write_table(pa.table({"instruction": ["P"], "output": ["Q"]}), folder / "c.parquet")
    pq.write_table(pa.table({"task": ["T"], "answer": ["A"]}), tmp_path / "d.parquet")
    (folder / "notes.txt").write_text("not a row")
    rows = load_sft_rows(sft_config(config, folder, SFT_FIELD_MESSAGES="conversations"), tmp_path)
    assert rows == [[("user", "I"), ("input", "X"), ("assistant", "O")], [("user", "I2"), ("assistant", "O2")],
                        [("system", "S"), ("user", "H"), ("assistant", "G")], [("user", "P"), ("assistant", "Q")]]
    renamed = sft_config(config, tmp_path / "d.parquet", SFT_FIELD_INSTRUCTION="task", SFT_FIELD_OUTPUT="answer")
    assert load_sft_rows(renamed, tmp_path) == [[("user", "T"), ("assistant", "A")]]
    assert load_sft_rows(sft_config(config, "rows/a.json"), tmp_path)[1][0] == ("user", "I2")  # relative to root


@pytest.mark.parametrize("row, message", [
    ({"output": "O"}, "b.jsonl:2: missing field 'instruction' (CONFIG_SFT_FIELD_INSTRUCTION)"),
    ({"instruction": "I", "output": 3}, "b.jsonl:2: field 'output' (CONFIG_SFT_FIELD_OUTPUT) is a int"),
    ({"instruction": "I", "output": "  "}, "b.jsonl:2: field 'output' (CONFIG_SFT_FIELD_OUTPUT) is empty"),
    ({"text": "x"}, "b.jsonl:2: the row has neither a 'messages' message list"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "b.jsonl:2: message 1 has unknown role 'robot'"),
    ({"messages": [{"role": "user", "content": "x"}]}, "b.jsonl:2: the conversation has no assistant message"),
    ({"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": ""}]},
     "b.jsonl:2: message 2 is an empty assistant response"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "b.jsonl:2: message 1 (user) has no string"),
    ({"messages": "hello"}, "b.jsonl:2: field 'messages' must be a non-empty list"),
])
def test_each_bad_row_is_a_named_error_with_file_and_row(config, tmp_path, row, message):
    path = write_jsonl(tmp_path / "b.jsonl", [chat("q", "a"), row])
    with pytest.raises(DataError, match="^" + str(tmp_path).replace("\\", "\\\\") + "/" + message.replace("(", r"\(")
                       .replace(")", r"\)")):
        load_sft_rows(sft_config(config, path), tmp_path)


def test_unreadable_sources_are_named_errors(config, tmp_path, monkeypatch):
    (tmp_path / "bad.jsonl").write_text('{"messages": []}\n{not json\n')
    (tmp_path / "obj.json").write_text('{"rows": []}')
    (tmp_path / "empty").mkdir()
    cases = {"": "CONFIG_SFT_DATA is empty", "missing.jsonl": "does not exist", "empty": "holds no .json",
             "bad.jsonl": r"bad.jsonl:2: not valid JSON", "obj.json": "holds a JSON dict, not a list of rows"}
    for setting, message in cases.items():
        with pytest.raises(DataError, match=message):
            load_sft_rows(config(OBJECTIVE_SFT=True, SFT_DATA=setting), tmp_path)
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(DataError, match=r"CONFIG_SFT_DATA='hf:org/set:dev': could not load the dataset org/set \[dev\] "
                                        r"\(ConnectionError: no network\)\. Offline, it must be in the Hugging Face"):
        load_sft_rows(config(OBJECTIVE_SFT=True, SFT_DATA="hf:org/set:dev"), tmp_path)


def test_hf_rows_are_read_through_datasets(config, tmp_path, monkeypatch):
    import datasets

    calls = []

    def load(name, split):
        calls.append((name, split))
        return [chat("q", "a")]

    monkeypatch.setattr(datasets, "load_dataset", load)
    assert load_sft_rows(config(OBJECTIVE_SFT=True, SFT_DATA="hf:org/set"), tmp_path) == [[("user", "q"), ("assistant", "a")]]
    assert calls == [("org/set", "train")]


def test_sft_config_defaults_equal_kconfigs(config):
    assert SFTConfig.from_config(config(OBJECTIVE_SFT=True)) == SFTConfig()


# --- tokenized examples and batches ----------------------------------------------------------------

def test_prompt_tokens_are_masked_on_a_hand_built_example(config, tmp_path):
    """<|im_start|>user\\nab<|im_end|>\\n<|im_start|>assistant\\ncd<|im_end|>\\n: 25 tokens, targets only
    where the next token is c, d or the closing <|im_end|>."""
    path = write_jsonl(tmp_path / "one.jsonl", [chat("ab", "cd"), chat("x", "y")])
    tok = byte_chatml()
    data = SFTData.from_config(sft_config(config, path, SFT_PACKING=False), tok, 30, tmp_path, log=lambda s: None)
    example = data.train[0]
    assert len(example.ids) == 25 and np.flatnonzero(example.mask).tolist() == [21, 22, 23]
    x, y, doc = SFTBatches([example], 1, 30, CPU, 0, packing=False, pad_id=data.pad_id).next()
    assert doc is None and x.shape == y.shape == (1, 30)
    assert x[0, :25].tolist() == example.ids.tolist() and (x[0, 25:] == tok.special_id(IM_END)).all()  # padded
    expected = [IGNORE] * 30
    expected[20:23] = [ord("c"), ord("d"), tok.special_id(IM_END)]
    assert y[0].tolist() == expected
    assert data.stats == {"examples": 2, "train_examples": 1, "val_examples": 1, "tokens": 48, "response_tokens": 5,
                          "truncated": 0, "dropped": 0, "packed_sequences": None}


def examples_of(lengths, seed=0):
    """Examples of the given lengths whose ids name them (id = 1000 + example number), all trainable."""
    class E:
        def __init__(self, i, n):
            self.ids, self.mask, self.where = np.full(n, 1000 + i, dtype=np.int64), np.ones(n, dtype=bool), f"row {i}"
    return [E(i, n) for i, n in enumerate(lengths)]


def test_packing_keeps_examples_whole_numbers_them_and_masks_their_boundaries():
    examples = examples_of([5, 9, 3, 12, 7, 4, 8, 6, 2, 10])
    batches = SFTBatches(examples, 2, 16, CPU, seed=3, packing=True, pad_id=0)
    seen = []
    for _ in range(batches.rows_per_epoch // 2):
        x, y, doc = batches.next()
        for row in range(2):
            tokens = np.concatenate([x[row].numpy(), y[row, -1:].numpy().clip(0)])  # the row's 17 tokens
            assert (np.diff(doc[row].numpy()) >= 0).all()  # doc never decreases: padding takes the next number
            for number in np.unique(doc[row].numpy()):
                ids = set(tokens[:-1][doc[row].numpy() == number].tolist())
                if ids != {0}:
                    (owner,) = ids  # one example per doc number...
                    seen.append(owner - 1000)
                    assert (tokens == owner).sum() == len(examples[owner - 1000].ids)  # ...and whole
            cross = doc[row, 1:] != doc[row, :-1]  # the target after a boundary belongs to the next example
            assert (y[row, :-1][cross] == IGNORE).all()
    assert sorted(seen) == list(range(10))  # every example once per epoch
    again = SFTBatches(examples, 2, 16, CPU, seed=3, packing=True, pad_id=0)
    batches.reset()
    for _ in range(3):
        assert all(torch.equal(a, b) for a, b in zip(batches.next(), again.next()))  # deterministic by seed


def test_pack_rows_is_first_fit():
    assert pack_rows([10, 8, 6, 2, 7], 17) == [[0, 2], [1, 3, 4]]


def test_shards_together_are_the_single_process_batch_and_epochs_wrap():
    examples = examples_of([3, 4, 5, 6, 7])
    whole = SFTBatches(examples, 4, 8, CPU, seed=1, packing=False)
    ranks = [SFTBatches(examples, 2, 8, CPU, seed=1, packing=False).shard(r, 2) for r in range(2)]
    for _ in range(3):  # 12 rows from 5 examples: across three epochs
        x, y, _ = whole.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(x, torch.cat([p[0] for p in parts])) and torch.equal(y, torch.cat([p[1] for p in parts]))
    assert whole.state_dict() == {"epoch": 2, "cursor": 2}
    resumed = SFTBatches(examples, 4, 8, CPU, seed=1, packing=False)
    resumed.load_state_dict(whole.state_dict())
    assert torch.equal(resumed.next()[0], whole.next()[0])


def test_an_example_over_the_block_size_is_an_error_naming_its_row_unless_truncated(config, tmp_path):
    path = write_jsonl(tmp_path / "long.jsonl", [chat("q", "a"), chat("q", "a" * 40), chat("q", "b")])
    tok, quiet = byte_chatml(), (lambda s: None)
    with pytest.raises(DataError, match=r"long\.jsonl:2: the example is 62 tokens, longer than CONFIG_BLOCK_SIZE=32 "
                                        r"\+ 1; .*CONFIG_SFT_TRUNCATE=y"):
        SFTData.from_config(sft_config(config, path), tok, 32, tmp_path, quiet)
    data = SFTData.from_config(sft_config(config, path, SFT_TRUNCATE=True), tok, 32, tmp_path, quiet)
    assert data.stats["truncated"] == 1 and len(data.train[1].ids) == 33 and data.train[1].mask[-1]
    with pytest.raises(DataError, match="at least two are needed"):  # every prompt over the block: nothing left
        SFTData.from_config(sft_config(config, path, SFT_TRUNCATE=True), tok, 8, tmp_path, quiet)


def test_template_tokens_absent_from_the_tokenizer_are_a_named_error(config, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a"), chat("q", "b")])
    with pytest.raises(DataError, match=r"CONFIG_CHAT_TEMPLATE=chatml: the byte tokenizer has no <\|im_start\|>, "
                                        r"<\|im_end\|>; add them with data.tokenizer.with_special_tokens"):
        SFTData.from_config(sft_config(config, path), Tokenizer({"kind": "byte"}), 64, tmp_path, lambda s: None)


def test_a_character_the_char_vocabulary_lacks_names_the_row(config, tmp_path):
    path = write_jsonl(tmp_path / "a.jsonl", [chat("q", "a"), chat("q", "\u00e9")])
    tok = with_special_tokens(Tokenizer.fit("char", "user\nassistant\nq"), tokens_needed("chatml"))[0]
    with pytest.raises(DataError, match=r"a\.jsonl:2: the char tokenizer cannot encode the row"):
        SFTData.from_config(sft_config(config, path), tok, 64, tmp_path, lambda s: None)


def test_the_generated_pipeline_examples_fit_the_quickstart_block_and_log_their_stats(config):
    lines = []
    tok = with_special_tokens(Tokenizer({"kind": "byte"}), tokens_needed("chatml"))[0]
    data = SFTData.from_config(sft_config(config, "data/pipeline/sft.jsonl"), tok, 128, ROOT, lines.append)
    assert data.stats["examples"] == 3000 and data.stats["val_examples"] == 150 and data.stats["truncated"] == 0
    assert data.stats["packed_sequences"] < data.stats["train_examples"]
    assert lines == [f"sft: 3000 examples (2850 train, 150 val) from data/pipeline/sft.jsonl, {data.stats['tokens']} "
                     f"tokens, {data.stats['response_tokens']} response tokens, 0 truncated; train packed into "
                     f"{data.stats['packed_sequences']} sequences of 128; template chatml"]
