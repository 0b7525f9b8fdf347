"""LoRA through peft on our GPT (train/lora.py): only adapters train, merged weights compute what base
plus adapter compute, adapter state round-trips, a bf16 base, named refusals, and 'make export' of a
LoRA checkpoint as merged Hugging Face weights; a vocabulary grown as the trainer grows it (train/hf_parent.py's
with_new_rows: a model of the larger vocabulary, the parent's rows loaded into it)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import config_of, merged_lora_weights, trainable

from data.tokenizer import Tokenizer
from model.gpt import GPT, ModelConfig
from parallel.errors import CheckpointError
from train import checkpoint
from train.build import padded_vocab
from train.hf_parent import with_new_rows
from train.lora import (LoraError, LoraSettings, adapter_state, adapters_disabled, apply_lora, checkpoint_weights,
                        load_adapter_state, lora_checkpoint_weights)

pytest.importorskip("peft")

TINY = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, n_kv_head=4, n_embd=32)
LLAMA = dict(TINY, n_kv_head=2, norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False)
ALL_FOUR = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def batch(vocab=64, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (2, 16), generator=g), torch.randint(0, vocab, (2, 16), generator=g)


def trained_lora(fields=TINY, steps=3, **settings):
    """A tiny GPT with adapters trained a few AdamW steps (so lora_B is no longer zero); its base copy."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**fields))
    base = {k: v.clone() for k, v in model.state_dict().items()}
    matched = apply_lora(model, LoraSettings(**settings))
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    idx, targets = batch()
    for _ in range(steps):
        optimizer.zero_grad()
        model(idx, targets)[1].backward()
        optimizer.step()
    return model.eval(), base, matched


def test_settings_from_config_equal_the_kconfig_defaults():
    assert LoraSettings.from_config(config_of("OBJECTIVE_SFT=y", LORA=True)) == LoraSettings()
    assert LoraSettings.from_config(config_of("OBJECTIVE_SFT=y")) is None  # full fine-tuning
    cfg = config_of("OBJECTIVE_SFT=y", LORA=True, LORA_RANK=4, LORA_ALPHA=4, LORA_DROPOUT="0.1",
                    LORA_TARGETS="mlp.c_fc  attn.c_attn", LORA_BASE_BF16=True)
    settings = LoraSettings.from_config(cfg)
    assert settings == LoraSettings(4, 4, 0.1, ("mlp.c_fc", "attn.c_attn"), True)
    assert LoraSettings.from_dict(settings.to_dict()) == settings and settings.scaling == 1.0


def test_only_adapter_parameters_change_and_the_base_is_frozen():
    model, base, matched = trained_lora(targets=ALL_FOUR)
    assert matched == [f"blocks.{i}.{t}" for t in ALL_FOUR for i in range(2)]
    adapters = {n for n, p in model.named_parameters() if ".lora_" in n}
    assert len(adapters) == 2 * len(matched)
    assert all(p.requires_grad == (n in adapters) for n, p in model.named_parameters())
    for key, value in model.state_dict().items():
        if ".lora_" not in key:
            assert torch.equal(value, base[key.replace(".base_layer.", ".")]), key
    assert all(p.abs().sum() > 0 for n, p in model.named_parameters() if ".lora_B" in n)  # moved from zero


@pytest.mark.parametrize("fields", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_merged_weights_give_the_logits_of_base_plus_adapter(fields):
    model, _, _ = trained_lora(fields, targets=ALL_FOUR, rank=4, alpha=8)
    plain = GPT(ModelConfig(**fields)).eval()
    merged = merged_lora_weights(model)
    assert set(merged) == set(plain.state_dict())
    plain.load_state_dict(merged)
    idx, _ = batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(plain(idx, every_position=True)[0], model(idx, every_position=True)[0],
                                   atol=1e-5, rtol=0)


def test_adapter_state_round_trips_and_rebuilds_the_merged_weights():
    model, base, _ = trained_lora(targets=("attn.c_attn", "mlp.c_proj"))
    state = adapter_state(model)
    assert sorted(state) == sorted(f"blocks.{i}.{t}.lora_{p}.weight" for i in range(2)
                                   for t in ("attn.c_attn", "mlp.c_proj") for p in "AB")
    torch.manual_seed(5)
    fresh = GPT(ModelConfig(**TINY))
    fresh.load_state_dict(base)
    apply_lora(fresh, LoraSettings(targets=("attn.c_attn", "mlp.c_proj")))
    load_adapter_state(fresh, state)
    assert all(torch.equal(v, adapter_state(fresh)[k]) for k, v in state.items())
    idx, _ = batch(seed=2)
    with torch.no_grad():
        assert torch.equal(fresh.eval()(idx, every_position=True)[0], model(idx, every_position=True)[0])
    rebuilt = lora_checkpoint_weights({"model": state, "lora": LoraSettings(targets=("attn.c_attn", "mlp.c_proj"))
                                       .to_dict()}, base)
    merged = merged_lora_weights(model)
    assert set(rebuilt) == set(merged)
    for key in merged:
        torch.testing.assert_close(rebuilt[key], merged[key], atol=1e-6, rtol=0)
    other = GPT(ModelConfig(**TINY))
    apply_lora(other, LoraSettings(targets=("attn.c_attn",)))
    with pytest.raises(LoraError, match="missing .*unknown|unknown"):
        load_adapter_state(other, state)


def test_a_bf16_base_keeps_fp32_adapters_and_trains():
    model, _, _ = trained_lora(LLAMA, steps=1, base_bf16=True)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if ".lora_" in name else torch.bfloat16), name
    assert model.rope_cos.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in merged_lora_weights(model).values())
    logits, loss = model(*batch())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(loss)


def test_with_adapters_disabled_the_model_computes_its_base():
    model, base, _ = trained_lora(targets=ALL_FOUR)
    plain = GPT(ModelConfig(**TINY)).eval()
    plain.load_state_dict(base)
    idx, _ = batch(seed=2)
    with torch.no_grad():
        with_adapters = model(idx, every_position=True)[0]
        with adapters_disabled(model):
            assert torch.equal(model(idx, every_position=True)[0], plain(idx, every_position=True)[0])
        assert torch.equal(model(idx, every_position=True)[0], with_adapters)
    assert not torch.allclose(with_adapters, plain(idx, every_position=True)[0])
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # trainable again


def test_also_train_keeps_a_grown_embedding_trainable():
    torch.manual_seed(0)
    model = grown(GPT(ModelConfig(**LLAMA)), 1)
    apply_lora(model, LoraSettings(base_bf16=True), also_train=("wte.weight",))
    old = model.wte.weight.detach().clone()
    assert model.wte.weight.dtype == torch.bfloat16 and model.wte.weight.requires_grad  # in the bf16 base's forward
    assert not model.lm_head.weight.requires_grad
    optimizer = torch.optim.AdamW(trainable(model), lr=1e-2)
    model(*batch())[1].backward()
    optimizer.step()
    assert not torch.equal(model.wte.weight, old)
    assert set(adapter_state(model, ("wte.weight",))) >= {"wte.weight", "blocks.0.attn.c_attn.lora_A.weight"}
    with pytest.raises(LoraError, match="wte.bias is no parameter"):
        apply_lora(GPT(ModelConfig(**LLAMA)), LoraSettings(), also_train=("wte.bias",))


def test_bad_targets_are_named_with_our_linear_layers():
    model = GPT(ModelConfig(**TINY))
    with pytest.raises(LoraError, match=r"'attn.q_proj' matches no Linear layer.*blocks\.<i>\.attn\.c_attn, "
                                        r"blocks\.<i>\.attn\.c_proj, blocks\.<i>\.mlp\.c_fc, blocks\.<i>\.mlp\.c_proj, "
                                        r"lm_head"):
        apply_lora(model, LoraSettings(targets=("attn.c_attn", "attn.q_proj")))
    with pytest.raises(LoraError, match="lm_head, whose weight is the token embedding"):
        apply_lora(model, LoraSettings(targets=("lm_head",)))
    untied = GPT(ModelConfig(**LLAMA))
    assert apply_lora(untied, LoraSettings(targets=("lm_head",))) == ["lm_head"]
    from model.moe import MoEConfig

    moe = GPT(ModelConfig(**LLAMA, moe=MoEConfig(n_experts=4, top_k=2, n_shared=1, expert_hidden=32)))
    with pytest.raises(LoraError, match=r"'mlp.router' matches no Linear.*blocks\.<i>\.mlp\.shared\.c_fc"):
        apply_lora(moe, LoraSettings(targets=("mlp.router",)))  # the MoE layer applies its weight itself
    assert apply_lora(moe, LoraSettings(targets=("shared.c_fc",))) == ["blocks.0.mlp.shared.c_fc",
                                                                       "blocks.1.mlp.shared.c_fc"]


def grown(model: GPT, rows: int) -> GPT:
    """The trainer's vocabulary growth: a model of the larger padded vocabulary (its new rows initialised
    as any model's), the old model's weights loaded into it through with_new_rows."""
    if rows <= 0:
        return model
    bigger = GPT(dataclasses.replace(model.config, vocab_size=padded_vocab(model.config.vocab_size + rows)))
    weights, kept = with_new_rows(model.state_dict(), bigger.state_dict())
    assert kept == model.config.vocab_size
    bigger.load_state_dict(weights)
    return bigger


def test_a_grown_vocabulary_keeps_the_old_rows_and_their_logits():
    for fields in (TINY, LLAMA):
        torch.manual_seed(0)
        model = GPT(ModelConfig(**fields)).eval()
        idx, _ = batch()
        with torch.no_grad():
            before = model(idx, every_position=True)[0]
        bigger = grown(model, 2).eval()
        assert bigger.config.vocab_size == 128 == padded_vocab(66)
        assert bigger.wte.weight.shape == bigger.lm_head.weight.shape == (128, 32)
        assert torch.equal(bigger.wte.weight[:64], model.wte.weight)
        assert torch.equal(bigger.lm_head.weight[:64], model.lm_head.weight)
        assert (bigger.lm_head.weight is bigger.wte.weight) == fields.get("tie_embeddings", True)
        new = bigger.wte.weight[64:].detach()
        assert 0.01 < new.std().item() < 0.03 and abs(new.mean().item()) < 0.005  # normal(0, init_std = 0.02)
        with torch.no_grad():
            after = bigger(idx, every_position=True)[0]
        torch.testing.assert_close(after[..., :64], before, atol=1e-6, rtol=0)


def lora_run(tmp_path, tokenizer, fields, grow=0):
    """A base run's checkpoint file and a LoRA run's checkpoint (adapter only) in the trainer's format."""
    torch.manual_seed(0)
    config = ModelConfig(**{**fields, "vocab_size": padded_vocab(tokenizer.vocab_size)})
    model = GPT(config)
    state_of = lambda m, weights, **extra: {"step": 4, "model": weights, "model_config": dataclasses.asdict(m.config),
                                           "tokenizer": tokenizer.spec, "config": dict(config_of()), **extra}
    base_path = tmp_path / "base" / checkpoint.FOLDER / "step-00000004.pt"
    checkpoint.save(base_path, state_of(model, model.state_dict()))
    model = grown(model, grow)
    settings = LoraSettings(rank=4, alpha=8, targets=ALL_FOUR)
    apply_lora(model, settings)
    with torch.no_grad():
        for p in trainable(model):
            p.add_(torch.randn_like(p) * 0.1)
    parent = {"path": str(base_path), "kind": "checkpoint", "step": 4,
              "weights_sha256": checkpoint_file_sha(base_path), "val_loss": None, "optimizer": False}
    extra = ("wte.weight",) + (() if model.config.tie_embeddings else ("lm_head.weight",)) if grow else ()
    run = tmp_path / "lora"
    checkpoint.save(run / checkpoint.FOLDER / "step-00000004.pt",
                    state_of(model, adapter_state(model, extra), lora=settings.to_dict(), init_from=parent))
    return run, model.eval(), base_path


def checkpoint_file_sha(path):
    from data.stream import file_sha256

    return file_sha256(path)


@pytest.mark.parametrize("fields", [TINY, LLAMA], ids=["gpt2", "llama"])
def test_export_of_a_lora_run_writes_merged_weights_transformers_loads(tmp_path, fields):
    transformers = pytest.importorskip("transformers")
    from export.hf_folder import export_run

    tokenizer = Tokenizer.fit("char", "def add(a, b):\n    return a + b\n")
    run, model, _ = lora_run(tmp_path, tokenizer, fields)
    folder = export_run(run, "latest", log=lambda _: None)
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, local_files_only=True).eval()
    idx = torch.tensor([tokenizer.encode("def add(a, b):")])
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits[..., :model.config.vocab_size],
                                   model(idx, every_position=True)[0], atol=1e-5, rtol=0)


def test_checkpoint_weights_merge_over_the_recorded_base_and_check_it(tmp_path):
    tokenizer = Tokenizer.fit("char", "abcdef")
    run, model, base_path = lora_run(tmp_path, tokenizer, LLAMA, grow=3)  # vocab 64 -> 128, rows saved as extra
    state = checkpoint.load(checkpoint.step_paths(run)[-1])
    weights = checkpoint_weights(state)
    plain = GPT(model.config).eval()
    plain.load_state_dict(weights)
    idx, _ = batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(plain(idx, every_position=True)[0], model(idx, every_position=True)[0],
                                   atol=1e-5, rtol=0)
    assert checkpoint_weights({"model": {"x": torch.zeros(1)}})["x"].shape == (1,)  # not LoRA: as saved
    without_rows = {**state, "model": {k: v for k, v in state["model"].items() if ".lora_" in k}}
    with pytest.raises(LoraError, match="vocabulary of 128 but its base 64"):
        checkpoint_weights(without_rows)
    base = checkpoint.load(base_path)
    base["model"]["ln_f.weight"] += 1
    checkpoint.save(base_path, base)
    with pytest.raises(CheckpointError, match="changed since it trained"):
        checkpoint_weights(state)
    base_path.unlink()
    with pytest.raises(CheckpointError, match="are gone"):
        checkpoint_weights(state)


def test_a_lora_run_on_a_hugging_face_parent_merges_over_the_folders_weights(tmp_path):
    from export.hf_folder import export_state
    from train.hf_parent import weights_sha256

    tokenizer = Tokenizer.fit("char", "abcdef")
    run, model, base_path = lora_run(tmp_path, tokenizer, LLAMA)
    base = checkpoint.load(base_path)
    folder = export_state(ModelConfig.from_dict(base["model_config"]), base["model"], tokenizer, tmp_path / "hf",
                          log=lambda _: None)
    state = checkpoint.load(checkpoint.step_paths(run)[-1])
    state["init_from"] = {**state["init_from"], "path": str(folder), "kind": "hf",
                          "weights_sha256": weights_sha256(folder)}
    base_path.unlink()  # the folder alone holds the base now
    plain = GPT(model.config).eval()
    plain.load_state_dict(checkpoint_weights(state))
    idx, _ = batch(seed=3)
    with torch.no_grad():
        torch.testing.assert_close(plain(idx, every_position=True)[0], model(idx, every_position=True)[0],
                                   atol=1e-5, rtol=0)
