"""Generation: the KV cache gives the tokens and logits of recomputing the context, top-p keeps the
nucleus, stop strings end a sample, and the Sampling menu reaches SampleConfig."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import config_of
from data.tokenizer import Tokenizer
from model.attention import KVCache
from model.gpt import GPT, ModelConfig, sample_next, top_p_filter
from model.moe import MoEConfig
from train.sample import SampleConfig, StopStringError, first_stop, generate_text, parse_stop_strings

BLOCK = 16


def tiny(**kw) -> ModelConfig:
    # init_std 0.5: peaked logits, so greedy decoding has no near-ties for rounding to break
    base = dict(vocab_size=64, block_size=BLOCK, n_layer=2, n_head=4, n_kv_head=4, n_embd=32, init_std=0.5)
    return ModelConfig(**{**base, **kw})


MOE = dict(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32))
# Every attention and position option the cache must follow, alone and combined (fp32, tiny).
OPTIONS = {
    "sdpa": {},
    "sdpa-rope": dict(pos="rope"),
    "sdpa-window": dict(attn_window=5),
    "sdpa-rope-window-gqa": dict(pos="rope", attn_window=5, n_kv_head=2),
    "sdpa-mqa-qknorm": dict(pos="rope", n_kv_head=1, qk_norm=True, norm="rmsnorm", mlp="swiglu", bias=False),
    "sdpa-final-softcap": dict(final_logit_softcap=2.0),
    "reference": dict(attn="reference"),
    "reference-rope-window-softcaps": dict(attn="reference", pos="rope", attn_window=5, attn_softcap=3.0,
                                           final_logit_softcap=2.0),
    "reference-gqa-qknorm": dict(attn="reference", n_kv_head=2, qk_norm=True),
    "moe": dict(pos="rope", **MOE),
    "moe-shared-sigmoid": dict(moe=MoEConfig(n_experts=4, top_k=2, expert_hidden=32, n_shared=1, bias_rate=0.01,
                                             score="sigmoid"), moe_first_dense=1),
    "mtp-heads": dict(mtp_heads=2, mtp_weight=0.3),
}


def model_with(options: dict, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(tiny(**options, **kw)).eval()


def fed_lengths(model: GPT) -> list[int]:
    """Records the number of tokens each forward embeds (a hook on the token embedding)."""
    lengths: list[int] = []
    model.wte.register_forward_hook(lambda module, args, out: lengths.append(args[0].size(1)))
    return lengths


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cached_greedy_generation_equals_uncached_across_the_crop(name):
    """30 tokens from a 3-token prompt with block 16: 13 cached steps, then the window slides."""
    model = model_with(OPTIONS[name])
    prompt = torch.randint(0, 64, (1, 3), generator=torch.Generator().manual_seed(1))
    lengths = fed_lengths(model)
    cached = model.generate(prompt, 30, temperature=0)
    assert lengths == [3] + [1] * 13 + [BLOCK] * 16, "prefill, one token per step, then the cropped window"
    uncached = model.generate(prompt, 30, temperature=0, use_cache=False)
    assert torch.equal(cached, uncached), name
    assert len(set(cached[0, 3:].tolist())) > 1, "a sequence that varies, not one repeated token"


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_cached_step_logits_equal_the_full_forward(name):
    """Prefill 5 tokens, then feed one at a time up to BLOCK_SIZE: each step's logits are the full
    forward's last position within 1e-5 (batch of 2; init std 0.2: logits of order 1)."""
    model = model_with(OPTIONS[name], init_std=0.2)
    x = torch.randint(0, 64, (2, BLOCK), generator=torch.Generator().manual_seed(2))
    cache = KVCache(model.config.n_layer, BLOCK)
    with torch.no_grad():
        first, _ = model(x[:, :5], cache=cache)
        assert torch.equal(first, model(x[:, :5])[0]), "a prefill is the forward without cache"
        for t in range(5, BLOCK):
            step, _ = model(x[:, t:t + 1], cache=cache)
            full, _ = model(x[:, :t + 1])
            assert (step - full).abs().max() < 1e-5, (name, t)
            assert full.abs().max() > 0.5
    assert cache.length == BLOCK


def test_cache_cannot_hold_more_than_block_size_or_take_targets():
    model = model_with({})
    cache = KVCache(model.config.n_layer, BLOCK)
    x = torch.zeros(1, BLOCK, dtype=torch.long)
    with torch.no_grad():
        model(x, cache=cache)
        with pytest.raises(ValueError, match="17 tokens exceeds CONFIG_BLOCK_SIZE=16"):
            model(x[:, :1], cache=cache)
    with pytest.raises(ValueError, match="pass targets or a cache, not both"):
        model(x, x, cache=KVCache(model.config.n_layer, BLOCK))


def test_moe_capacity_generates_without_the_cache():
    """Capacity dropping depends on every token of a forward, so a one-token step could not
    reproduce it: such a model recomputes the context each step."""
    model = model_with(dict(moe=MoEConfig(n_experts=4, top_k=1, expert_hidden=32, capacity_factor=1.0)))
    assert not model.cache_is_exact() and model_with(MOE).cache_is_exact()
    lengths = fed_lengths(model)
    prompt = torch.zeros(1, 3, dtype=torch.long)
    out = model.generate(prompt, 5, temperature=0)
    assert lengths == [3, 4, 5, 6, 7] and torch.equal(out, model.generate(prompt, 5, temperature=0, use_cache=False))


def test_sampled_generation_with_the_cache_draws_the_same_tokens():
    """Temperature 0.8 and top-k (the quickstart's sampling): the cache changes no token."""
    model = model_with(dict(pos="rope", norm="rmsnorm", mlp="swiglu", bias=False))
    prompt = torch.zeros(1, 2, dtype=torch.long)
    a, b = (model.generate(prompt, 40, temperature=0.8, top_k=20, use_cache=use,
                           generator=torch.Generator().manual_seed(3)) for use in (True, False))
    assert torch.equal(a, b)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([[0.05, 0.5, 0.15, 0.3]])  # sorted: 0.5, 0.3, 0.15, 0.05
    logits = probs.log()
    for p, kept in [(0.4, [1]), (0.5, [1]), (0.7, [1, 3]), (0.81, [1, 2, 3]), (0.99, [0, 1, 2, 3]), (0.0, [1])]:
        out = top_p_filter(logits, p)
        assert torch.isfinite(out[0]).nonzero().flatten().tolist() == kept, p
        assert torch.equal(out[0, kept], logits[0, kept]), "kept logits are unchanged"


def test_top_p_samples_only_from_the_nucleus_and_one_is_off():
    logits = torch.tensor([[0.05, 0.5, 0.15, 0.3]]).log().expand(2000, 4)
    drawn = sample_next(logits, 1.0, top_p=0.7, generator=torch.Generator().manual_seed(0))
    assert set(drawn.flatten().tolist()) == {1, 3}
    share = (drawn == 1).float().mean().item()
    assert share == pytest.approx(0.5 / 0.8, abs=0.04), "renormalised over the nucleus"
    off, plain = (sample_next(logits, 0.8, top_k=3, top_p=p, generator=torch.Generator().manual_seed(4))
                  for p in (1.0, 1.0))
    assert torch.equal(off, plain)
    assert torch.equal(sample_next(logits, 0, top_p=0.1), torch.ones(2000, 1, dtype=torch.long))  # greedy


def test_generate_ends_where_stop_says():
    model = model_with({})
    out = model.generate(torch.zeros(1, 3, dtype=torch.long), 20, temperature=0, stop=lambda idx: idx.size(1) >= 7)
    assert out.shape == (1, 7)


CHARS = Tokenizer.fit("char", "".join(map(chr, range(32, 96))))  # 64 characters, the model's vocab


def test_stop_strings_cut_the_sample_before_the_first_one():
    model = model_with({})
    base = SampleConfig(prompt="AB", tokens=25, temperature=0)
    full = generate_text(model, CHARS, base, torch.device("cpu"))
    generated = full[2:]
    late, early = generated[12:14], generated[5:7]
    expected = full[:2 + min(generated.find(late), generated.find(early))]
    stopped = generate_text(model, CHARS, SampleConfig(prompt="AB", tokens=25, temperature=0, stop=(late, early)),
                            torch.device("cpu"))
    assert stopped == expected and len(stopped) < len(full)
    # A stop string found only in the prompt does not stop the sample.
    in_prompt = generate_text(model, CHARS, SampleConfig(prompt="AB", tokens=25, temperature=0, stop=("AB",)),
                              torch.device("cpu"))
    assert in_prompt == (full[:2 + generated.find("AB")] if "AB" in generated else full)


def test_generate_text_with_the_cache_equals_without():
    """SAMPLE_TOP_P=1 and no stop strings: the quickstart's sampling draws the sample it drew before
    the cache existed (the uncached loop is that code)."""
    model = model_with(dict(pos="rope"))
    sample = SampleConfig(prompt="DEF ", tokens=40, temperature=0.8, top_k=200, seed=1337)
    cached = generate_text(model, CHARS, sample, torch.device("cpu"))
    assert cached == generate_text(model, CHARS, sample, torch.device("cpu"), use_cache=False)
    assert len(cached) == 44


def test_first_stop_is_the_earliest_occurrence_after_start():
    assert first_stop("ab\ncd\n\nx", ("\n\n", "c"), 0) == 3
    assert first_stop("ab\ncd\n\nx", ("\n\n",), 0) == 5
    assert first_stop("abab", ("ab",), 1) == 2 and first_stop("abab", ("zz",)) is None


@pytest.mark.parametrize("text, strings", [
    ("", ()),
    ("###", ("###",)),
    (r"\n\n|\nclass ", ("\n\n", "\nclass ")),
    (r"a\|b|c\\d|\t", ("a|b", "c\\d", "\t")),
])
def test_stop_strings_parse_with_their_escapes(text, strings):
    assert parse_stop_strings(text) == strings


@pytest.mark.parametrize("text, message", [
    (r"a\qb", r"'\\q' at character 2 is no escape"),
    ("ab\\", r"a '\\' at the end"),
    ("a||b", "an empty stop string"),
    ("a|", "an empty stop string"),
])
def test_bad_stop_strings_name_the_symbol_and_the_fix(text, message):
    with pytest.raises(StopStringError, match=message) as e:
        parse_stop_strings(text)
    assert str(e.value).startswith("CONFIG_SAMPLE_STOP=")


def test_sampling_menu_reaches_sample_config():
    assert SampleConfig.from_config(config_of(SEED=1337)) == SampleConfig()  # defaults are Kconfig's
    cfg = config_of('SAMPLE_TOP_P="0.9"', SAMPLE_STOP=r"\n\n|###", SAMPLE_TEMPERATURE="1.0")
    sample = SampleConfig.from_config(cfg)
    assert (sample.top_p, sample.stop, sample.temperature) == (0.9, ("\n\n", "###"), 1.0)


def test_kv_cache_buffers_take_the_keys_dtype():
    model = model_with(dict(n_kv_head=2))
    cache = KVCache(model.config.n_layer, BLOCK)
    with torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long), cache=cache)
    k = cache.layers[0].k
    assert k.shape == (1, 2, BLOCK, 8) and k.dtype == torch.float32 and cache.length == 4
    assert math.isfinite(k[:, :, :4].abs().sum().item())


def test_a_bad_stop_string_is_refused_before_any_plan_exists(config):
    from plan.preflight import config_problems

    assert config_problems(config(SAMPLE_STOP="###|\\n\\n")) == []
    [problem] = config_problems(config(SAMPLE_STOP="a||b"))
    assert problem.startswith("CONFIG_SAMPLE_STOP='a||b': an empty stop string")


def test_make_sample_overrides_top_p_and_stop_and_names_them(monkeypatch, capsys, tmp_path):
    """kbuild sample passes TOP_P and STOP (parsed like SAMPLE_STOP) to the run's sampling settings."""
    import kbuild.__main__ as cli
    import train.sample as sample

    seen = {}
    monkeypatch.setattr(sample, "sample_from", lambda run, prompt, tokens, top_p, stop: seen.update(
        run=run, top_p=top_p, stop=stop) or "text")
    monkeypatch.setenv("TOP_P", "0.9")
    monkeypatch.setenv("STOP", "\\n\\n|###")
    assert cli.main(["sample", "--run", str(tmp_path)]) == 0
    assert seen == {"run": tmp_path, "top_p": 0.9, "stop": ("\n\n", "###")} and capsys.readouterr().out == "text\n"
    monkeypatch.setenv("STOP", "a\\q")
    assert cli.main(["sample", "--run", str(tmp_path)]) == 2  # a named error: its message, no traceback
    assert "error: STOP='a\\\\q': '\\q' at character 2 is no escape" in capsys.readouterr().err
    monkeypatch.setenv("TOP_P", "1.5")
    assert cli.main(["sample", "--run", str(tmp_path)]) == 2
    assert "TOP_P=1.5: top-p is a probability mass within [0, 1]" in capsys.readouterr().err
