"""DPO data: prompt/chosen/rejected rows, their tokenized pairs and the (2B, T) pair batches."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from data.chat_template import IM_END, prompt_text, tokens_needed
from data.errors import DataError
from data.preference import PairBatches, PreferenceConfig, PreferenceData, load_pairs
from data.sft_batches import IGNORE
from data.tokenizer import Tokenizer, with_special_tokens

ROOT = Path(__file__).resolve().parent.parent
CPU = torch.device("cpu")
QUIET = (lambda s: None)


def byte_chatml() -> Tokenizer:
    return with_special_tokens(Tokenizer({"kind": "byte"}), tokens_needed("chatml"))[0]


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def dpo_config(config, data, **symbols):
    return config(OBJECTIVE_DPO=True, DPO_DATA=str(data), **symbols)


PAIRS = [{"prompt": "Name?", "chosen": "bob", "rejected": "al"}, {"prompt": "Q", "chosen": "A", "rejected": "BB"},
         {"prompt": "Q2", "chosen": "yes", "rejected": "no"}, {"prompt": "Q3", "chosen": "up", "rejected": "down"}]


def test_rows_read_from_jsonl_and_parquet(config, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({k: [r[k] for r in PAIRS] for k in PAIRS[0]}), tmp_path / "p.parquet")
    write_jsonl(tmp_path / "p.jsonl", PAIRS)
    for name in ("p.parquet", "p.jsonl"):
        pairs = load_pairs(dpo_config(config, name), tmp_path)
        assert [(p.prompt, p.chosen, p.rejected) for p in pairs] == [tuple(r.values()) for r in PAIRS]
    assert pairs[1].where == f"{tmp_path}/p.jsonl:2"


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "A"}, r"p\.jsonl:2: missing column 'rejected' \(DPO rows need prompt, chosen, rejected"),
    ({"chosen": "A", "rejected": "B"}, r"p\.jsonl:2: missing column 'prompt'"),
    ({"prompt": "Q", "chosen": [{"role": "assistant", "content": "A"}], "rejected": "B"},
     r"p\.jsonl:2: column 'chosen' is a list, not a string"),
    ({"prompt": "Q", "chosen": "A", "rejected": " "}, r"p\.jsonl:2: column 'rejected' is empty"),
])
def test_each_bad_row_is_a_named_error_with_file_and_row(config, tmp_path, row, message):
    write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], row])
    with pytest.raises(DataError, match=message):
        load_pairs(dpo_config(config, "p.jsonl"), tmp_path)


def test_pair_batches_put_chosen_rows_first_and_take_targets_on_the_responses_only(config, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", PAIRS)
    tok = byte_chatml()
    data = PreferenceData.from_config(dpo_config(config, "p.jsonl", SFT_VAL_FRACTION="0.25"), tok, 40, tmp_path, QUIET)
    assert (len(data.train), len(data.val)) == (3, 1) and data.pad_id == tok.special_id(IM_END)
    batches = data.batches("train", 2, 40, CPU, seed=5)
    x, y = batches.next()
    assert x.shape == y.shape == (4, 40)
    end = tok.special_id(IM_END)
    for row in range(2):
        chosen, rejected = x[row].tolist(), x[row + 2].tolist()
        prompt = tok.encode_special(prompt_text([("user", tok.decode(chosen).split("\n")[1])], "chatml"))
        assert chosen[:len(prompt)] == rejected[:len(prompt)] == prompt  # the same prompt, then the responses
        for seq, targets in ((chosen, y[row].tolist()), (rejected, y[row + 2].tolist())):
            response = tok.decode([t for t in targets if t != IGNORE])
            learned = [t for t in targets if t != IGNORE]
            assert learned[-1] == end and learned.count(end) == 1  # the response and its closing token, no padding
            assert targets[:len(prompt) - 1] == [IGNORE] * (len(prompt) - 1)
            assert response in {p["chosen"] for p in PAIRS} | {p["rejected"] for p in PAIRS}
    pairs = {(tok.decode([t for t in y[r].tolist() if t != IGNORE]), tok.decode([t for t in y[r + 2].tolist()
                                                                                  if t != IGNORE])) for r in range(2)}
    assert pairs <= {(p["chosen"], p["rejected"]) for p in PAIRS}  # row r and row B + r are one pair
    assert data.stats["pairs"] == 4 and data.stats["truncated"] == 0


def test_pair_batches_are_deterministic_shard_like_batches_and_wrap_epochs(config, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", PAIRS * 3)
    data = PreferenceData.from_config(dpo_config(config, "p.jsonl", SFT_VAL_FRACTION="0.1"), byte_chatml(), 40,
                                      tmp_path, QUIET)
    whole = data.batches("train", 4, 40, CPU, seed=2)
    ranks = [data.batches("train", 2, 40, CPU, seed=2).shard(r, 2) for r in range(2)]
    for _ in range(4):  # 16 pairs from 11: into the second epoch
        x, y = whole.next()
        parts = [r.next() for r in ranks]
        assert torch.equal(x[:2], parts[0][0][:2]) and torch.equal(x[2:4], parts[1][0][:2])  # chosen halves
        assert torch.equal(y[4:6], parts[0][1][2:]) and torch.equal(y[6:], parts[1][1][2:])  # rejected halves
    assert whole.state_dict() == {"epoch": 1, "cursor": 5}
    whole.reset()
    again = data.batches("train", 4, 40, CPU, seed=2)
    assert torch.equal(whole.next()[0], again.next()[0])


def test_an_over_long_pair_is_an_error_unless_truncated(config, tmp_path):
    write_jsonl(tmp_path / "p.jsonl", [PAIRS[0], {"prompt": "Q", "chosen": "A", "rejected": "B" * 50}, PAIRS[1]])
    with pytest.raises(DataError, match=r"p\.jsonl:2: the example is 72 tokens, longer than CONFIG_BLOCK_SIZE=40"):
        PreferenceData.from_config(dpo_config(config, "p.jsonl"), byte_chatml(), 40, tmp_path, QUIET)
    data = PreferenceData.from_config(dpo_config(config, "p.jsonl", SFT_TRUNCATE=True), byte_chatml(), 40, tmp_path,
                                      QUIET)
    assert data.stats["truncated"] == 1 and len(data.train[1].rejected.ids) == 41
    with pytest.raises(DataError, match="longer than CONFIG_BLOCK_SIZE=16"):  # batches check the length too
        PairBatches(data.train, 1, 16, CPU, 0)


def test_preference_config_defaults_equal_kconfigs(config):
    assert PreferenceConfig.from_config(config(OBJECTIVE_DPO=True)) == PreferenceConfig()


def test_the_generated_pairs_fit_the_quickstart_block_and_differ_in_their_responses(config):
    data = PreferenceData.from_config(dpo_config(config, "data/pipeline/dpo.jsonl"), byte_chatml(), 128, ROOT, QUIET)
    assert data.stats["pairs"] == 2000 and data.stats["truncated"] == 0
    assert all(p.chosen.ids.tolist() != p.rejected.ids.tolist() for p in data.train)
