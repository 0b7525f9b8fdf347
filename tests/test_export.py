"""make export: our models and tokenizers as Hugging Face folders that transformers loads offline
with the same logits, generation and token ids; named refusals for what no architecture expresses."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import config_of

from data.corpus import embedded_source
from data.sources import Stats
from data.tokenizer import Tokenizer
from hf.architectures import ExportRefused, choose_target
from export.hf_folder import checkpoint_state, export_state
from model.gpt import GPT, ModelConfig
from train.build import padded_vocab

transformers = pytest.importorskip("transformers")

TEXT = "def add(a, b):\n    return a + b  # sum\n\nprint(add(1, 2))\n"
LLAMA = dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False)

OPTION_SETS = {  # name: (ModelConfig fields, architecture transformers must load)
    "gpt2": ({}, "GPT2LMHeadModel"),
    "gpt2-no-bias-untied": ({"bias": False, "tie_embeddings": False}, "GPT2LMHeadModel"),
    "llama-gqa": ({**LLAMA, "n_kv_head": 2, "rope_theta": 500.0}, "LlamaForCausalLM"),
    "llama-bias-untied": ({**LLAMA, "bias": True, "tie_embeddings": False}, "LlamaForCausalLM"),
    "qwen3-qk-norm": ({**LLAMA, "qk_norm": True, "n_kv_head": 1}, "Qwen3ForCausalLM"),
}


def random_model(tokenizer: Tokenizer, seed: int = 0, **fields) -> GPT:
    """A tiny fp32 GPT with weights well away from init (biases and norm gains non-trivial)."""
    torch.manual_seed(seed)
    config = ModelConfig(**{"vocab_size": padded_vocab(tokenizer.vocab_size), "block_size": 32,
                            "n_layer": 2, "n_head": 4, "n_embd": 32, **fields})
    model = GPT(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True, local_files_only=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@pytest.mark.parametrize("name", OPTION_SETS)
def test_exported_model_computes_our_logits_and_greedy_generation(tmp_path, name):
    fields, architecture = OPTION_SETS[name]
    tokenizer = Tokenizer.fit("char", TEXT)
    ours = random_model(tokenizer, **fields)
    folder = export_state(ours.config, ours.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    theirs = load_hf(folder)
    assert type(theirs).__name__ == architecture
    idx = torch.tensor([tokenizer.encode(TEXT[:24]), tokenizer.encode(TEXT[10:34])])
    with torch.no_grad():
        ours_logits, _ = ours(idx, idx)
        hf_logits = theirs(idx).logits
    assert hf_logits.shape == ours_logits.shape
    assert (hf_logits - ours_logits).abs().max().item() <= 1e-5

    prompt = idx[:1, :8]
    ours_ids = ours.generate(prompt, 6, temperature=0, vocab_limit=tokenizer.vocab_size)
    # generation_config.json suppresses the padding ids; ours has no end-of-text token, so never stop
    hf_ids = theirs.generate(prompt, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert hf_ids.tolist() == ours_ids.tolist()


def test_byte_vocabulary_grows_to_hold_end_of_text_and_sharded_weights_load(tmp_path):
    tokenizer = Tokenizer({"kind": "byte"})  # 256 ids fill the padded vocabulary: no room for end-of-text
    ours = random_model(tokenizer, **LLAMA)
    folder = export_state(ours.config, ours.state_dict(), tokenizer, tmp_path / "hf", max_shard_bytes=40_000,
                          log=lambda _: None)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1 and not (folder / "model.safetensors").exists()
    config = json.loads((folder / "config.json").read_text())
    assert (config["vocab_size"], config["eos_token_id"]) == (320, 256)
    generation = json.loads((folder / "generation_config.json").read_text())
    assert generation["eos_token_id"] == 256 and generation["suppress_tokens"] == list(range(257, 320))
    theirs = load_hf(folder)
    idx = torch.tensor([tokenizer.encode(TEXT[:20])])
    with torch.no_grad():
        diff = theirs(idx).logits[..., :256] - ours(idx, idx)[0]
    assert diff.abs().max().item() <= 1e-5


def test_multi_token_prediction_heads_are_left_out_with_a_note(tmp_path):
    tokenizer = Tokenizer.fit("char", TEXT)
    ours = random_model(tokenizer, mtp_heads=2, mtp_weight=0.5)
    notes = []
    folder = export_state(ours.config, ours.state_dict(), tokenizer, tmp_path / "hf", log=notes.append)
    assert any("CONFIG_MTP_HEADS=2" in n and "left out" in n for n in notes)
    idx = torch.tensor([tokenizer.encode(TEXT[:16])])
    with torch.no_grad():
        assert (load_hf(folder)(idx).logits - ours(idx, idx)[0]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("sets, blocking", [
    ("MLP_RELU2=y", ["CONFIG_MLP=relu2"]),
    ("MLP_GEGLU=y", ["CONFIG_MLP=geglu"]),
    ("ATTN_WINDOW=8", ["CONFIG_ATTN_WINDOW=8"]),
    ("FINAL_LOGIT_SOFTCAP=30", ["CONFIG_FINAL_LOGIT_SOFTCAP=30"]),
    ("ATTN_REFERENCE=y ATTN_SOFTCAP=50", ["CONFIG_ATTN_SOFTCAP=50"]),
    ("MOE=y", ["CONFIG_MOE=y"]),
    ("POS_ROPE=y", ["CONFIG_POS=rope (needs learned)", "CONFIG_NORM=layernorm (needs rmsnorm)"]),
    ("NORM_RMSNORM=y POS_ROPE=y MLP_SWIGLU=y QK_NORM=y BIAS=y", ["CONFIG_BIAS=y (needs n)"]),
    ("NORM_RMSNORM=y", ["CONFIG_NORM=rmsnorm (needs layernorm)"]),
])
def test_refusals_name_the_blocking_symbols(sets, blocking):
    config = ModelConfig.from_config(config_of(sets, MODEL_SIZE_TINY=True), vocab_size=64)
    with pytest.raises(ExportRefused) as e:
        choose_target(config)
    for words in blocking:
        assert words in str(e.value)


def test_default_model_and_the_llama_set_from_kconfig_map_to_their_architectures():
    assert choose_target(ModelConfig.from_config(config_of(), 64)).architecture == "GPT2LMHeadModel"
    llama = config_of("NORM_RMSNORM=y POS_ROPE=y MLP_SWIGLU=y BIAS=n N_KV_HEAD=2")
    assert choose_target(ModelConfig.from_config(llama, 64)).architecture == "LlamaForCausalLM"


@pytest.mark.parametrize("kind", ["char", "byte"])
def test_exported_tokenizer_gives_our_ids_on_the_embedded_corpus(tmp_path, kind):
    text = "".join(p.text for p in embedded_source(300_000).pieces(Stats()))[:300_000]
    assert len(text) > 250_000
    tokenizer = Tokenizer.fit(kind, text + "<|endoftext|>")
    model = random_model(tokenizer)
    folder = export_state(model.config, model.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for start in range(0, len(text), 60_000):
        sample = text[start:start + 4000] + "<|endoftext|>"  # even its spelling encodes as characters
        ids = hf(sample, add_special_tokens=True)["input_ids"]
        assert ids == tokenizer.encode(sample)
        assert hf.decode(ids) == sample
    assert hf.eos_token == "<|endoftext|>" and hf.eos_token_id == tokenizer.vocab_size
    assert hf.convert_tokens_to_ids("<|endoftext|>") == tokenizer.vocab_size


TRICKY = ["12345 678.9 x1y22", "  leading spaces\n\n\n   x\n", "é ü 日本語 🙂 \u0301 naïve ☃", "</s> <s> <pad> <unk> <0x41>",
          "a\r\nb\rc\x0cd\u2028e\x85f\x0bg\x1ch", "\t\ttabs\t \n", " ", "\n", "=" * 70, " " * 37 + "end", "a\u2581b"]


def sentencepiece_tokenizer(model_type: str, text: str, vocab_size: int = 1000) -> Tokenizer:
    pytest.importorskip("sentencepiece")
    from data.sentencepiece_tokenizer import sample_lines, train_sentencepiece

    return Tokenizer(train_sentencepiece(sample_lines([text]), vocab_size, model_type, threads=1))


@pytest.mark.slow
def test_sentencepiece_bpe_exports_with_our_ids_its_eos_and_our_logits(tmp_path):
    text = "".join(p.text for p in embedded_source(700_000).pieces(Stats()))
    train, held_out = text[:300_000], text[300_000:600_000]
    assert len(held_out) == 300_000
    tokenizer = sentencepiece_tokenizer("bpe", train)
    model = random_model(tokenizer, **LLAMA)
    folder = export_state(model.config, model.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    for sample in [held_out[i:i + 30_000] for i in range(0, len(held_out), 30_000)] + TRICKY:
        ids = hf(sample)["input_ids"]
        assert ids == tokenizer.encode(sample), sample[:40]
        assert hf.decode(ids) == tokenizer.decode(ids)
    assert hf.eos_token == "</s>" and hf.eos_token_id == tokenizer.eos_id == 3
    from train.hf_parent import check_tokenizer

    check_tokenizer(folder, tokenizer, model.config.block_size)  # INIT_FROM accepts the folder's tokenizer as ours
    config = json.loads((folder / "config.json").read_text())
    assert config["eos_token_id"] == 3 and config["vocab_size"] == model.config.vocab_size
    theirs = load_hf(folder)
    idx = torch.tensor([tokenizer.encode(held_out[:400])[:32]])
    with torch.no_grad():
        assert (theirs(idx).logits - model(idx, idx)[0]).abs().max().item() <= 1e-5
    ours_ids = model.generate(idx[:, :8], 6, temperature=0, vocab_limit=tokenizer.vocab_size)
    hf_ids = theirs.generate(idx[:, :8], max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert hf_ids.tolist() == ours_ids.tolist()


def test_sentencepiece_unigram_is_refused_by_name(tmp_path):
    text = "".join(p.text for p in embedded_source(200_000).pieces(Stats()))
    tokenizer = sentencepiece_tokenizer("unigram", text[:150_000])
    model = random_model(tokenizer)
    with pytest.raises(ExportRefused, match="CONFIG_SENTENCEPIECE_MODEL_TYPE=unigram: .* CONFIG_SENTENCEPIECE_BPE"):
        export_state(model.config, model.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    assert not (tmp_path / "hf").exists()


class Payload:
    def __reduce__(self):
        return (print, ("ran code from a checkpoint",))


def test_a_checkpoint_with_pickled_code_is_refused_not_run(tmp_path, capsys):
    (tmp_path / "checkpoints").mkdir()
    torch.save({"model": {}, "payload": Payload()}, tmp_path / "checkpoints" / "best.pt")
    with pytest.raises(Exception) as e:
        checkpoint_state(tmp_path, "best")
    assert "ran code" not in capsys.readouterr().out
    assert "best.pt" in str(e.value)


@pytest.mark.slow
def test_make_export_on_a_trained_run(repo, make):
    make("defconfig-quickstart")
    make(env={"SET": "MAX_ITERS=10 WARMUP_ITERS=2 EVAL_INTERVAL=5 EVAL_BATCHES=2 SAMPLE_TOKENS=4"})
    out = make("export").stdout
    (run_dir,) = [p.parent.parent for p in (repo / "runs").glob("*/*/checkpoints/best.pt")]
    folder = run_dir / "export" / "hf"
    from train import checkpoint

    state = checkpoint.load(run_dir / "checkpoints" / "best.pt")
    config = ModelConfig.from_dict(state["model_config"])
    assert choose_target(config).architecture in out and str(folder) in out
    ours = GPT(config).eval()
    ours.load_state_dict(state["model"])
    tokenizer = Tokenizer(state["tokenizer"])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    ids = hf_tokenizer("import os\ndef main():\n")["input_ids"]
    assert ids == tokenizer.encode("import os\ndef main():\n")
    idx = torch.tensor([ids])
    with torch.no_grad():
        assert (load_hf(folder)(idx).logits - ours(idx, idx)[0]).abs().max().item() <= 1e-5
    latest = make("export", env={"CHECKPOINT": "latest", "RUN_DIR": str(run_dir)}).stdout
    assert "latest checkpoint" in latest and "step-00000010.pt" in latest


@pytest.mark.parametrize("name", OPTION_SETS)
def test_reading_an_export_back_gives_our_weights(tmp_path, name):
    from hf.read import read_hf_folder

    tokenizer = Tokenizer.fit("char", TEXT)
    ours = random_model(tokenizer, **OPTION_SETS[name][0])
    folder = export_state(ours.config, ours.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    config, weights = read_hf_folder(folder)
    for field in ("n_layer", "n_head", "n_kv_head", "n_embd", "norm", "pos", "rope_theta", "mlp", "mlp_hidden",
                  "qk_norm", "tie_embeddings", "vocab_size", "block_size"):
        assert getattr(config, field) == getattr(ours.config, field), field
    back = GPT(config).eval()
    back.load_state_dict(weights)
    for key, value in ours.state_dict().items():
        assert torch.equal(back.state_dict()[key], value), key
    # GPT-2 always has biases: a BIAS=n model reads back as BIAS=y with zero biases
    assert config.bias == (ours.config.bias or choose_target(config).model_type == "gpt2")


@pytest.mark.parametrize("architecture", ["LlamaForCausalLM", "Qwen3ForCausalLM", "GPT2LMHeadModel"])
def test_a_folder_transformers_wrote_reads_into_our_model_with_its_logits(tmp_path, architecture):
    from hf.read import read_hf_folder

    torch.manual_seed(0)
    if architecture == "GPT2LMHeadModel":
        hf_config = transformers.GPT2Config(vocab_size=80, n_positions=32, n_embd=32, n_layer=2, n_head=4,
                                            activation_function="gelu", tie_word_embeddings=False)
    else:
        config_class = getattr(transformers, architecture.replace("ForCausalLM", "Config"))
        hf_config = config_class(vocab_size=80, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, head_dim=8, rms_norm_eps=1e-6,
                                 max_position_embeddings=32, tie_word_embeddings=True,
                                 rope_parameters={"rope_type": "default", "rope_theta": 1000.0})
    theirs = getattr(transformers, architecture)(hf_config).eval()
    with torch.no_grad():
        for p in theirs.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    theirs.save_pretrained(tmp_path / "hf")
    config, weights = read_hf_folder(tmp_path / "hf")
    ours = GPT(config).eval()
    ours.load_state_dict(weights)
    idx = torch.randint(0, 80, (2, 16))
    with torch.no_grad():
        assert (ours(idx, idx)[0] - theirs(idx).logits).abs().max().item() <= 1e-5


def test_reading_a_folder_our_model_cannot_compute_names_the_setting(tmp_path):
    from hf.read import ImportRefused, read_hf_folder

    transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=4, vocab_size=64,
                                                         n_positions=16)).save_pretrained(tmp_path / "hf")
    with pytest.raises(ImportRefused, match="activation_function='gelu_new'"):
        read_hf_folder(tmp_path / "hf")


@pytest.mark.slow
def test_byte_level_bpe_tokenizer_exports_with_its_own_end_of_text_token(tmp_path):
    bpe = pytest.importorskip("data.bpe_tokenizer")  # the TOKENIZER_BPE change
    text = "".join(p.text for p in embedded_source(200_000).pieces(Stats()))
    tokenizer = Tokenizer(bpe.train_bpe([text[:150_000]], 400))
    model = random_model(tokenizer, **LLAMA)
    folder = export_state(model.config, model.state_dict(), tokenizer, tmp_path / "hf", log=lambda _: None)
    hf = transformers.AutoTokenizer.from_pretrained(folder, local_files_only=True)
    sample = text[150_000:160_000] + "<|endoftext|>"
    assert hf(sample)["input_ids"] == tokenizer.encode(sample) and hf.decode(hf(sample)["input_ids"]) == sample
    assert hf.eos_token_id == tokenizer.eos_id == json.loads((folder / "config.json").read_text())["eos_token_id"]
    idx = torch.tensor([tokenizer.encode(sample)[:24]])
    with torch.no_grad():
        assert (load_hf(folder)(idx).logits - model(idx, idx)[0]).abs().max().item() <= 1e-5
