"""Document masking (GPT.forward's ``doc``): packed examples attend only within themselves, their
positions restart at 0, so each computes what it computes alone; without ``doc`` the forward is
bit-identical to the one before document masking existed."""

from __future__ import annotations

import pytest
import torch

import model.attention as attention
from model.attention import document_mask, document_segments
from model.gpt import GPT, ModelConfig
from model.moe import MoEConfig

BASE = dict(vocab_size=64, block_size=32, n_layer=2, n_head=2, n_kv_head=2, n_embd=32)
LLAMA = dict(BASE, n_head=4, n_kv_head=2, norm="rmsnorm", pos="rope", mlp="swiglu", qk_norm=True, bias=False,
             tie_embeddings=False)
MOE = MoEConfig(n_experts=4, top_k=2, expert_hidden=32)

# Loss and logits (summed in float64), as float.hex(), of a fixed model and batch computed by the code
# before document masking existed (commit 96ecd3b): the pretraining forward must still give these bits.
# Taken on this project's CPU machine; a CPU with other matmul kernels may round differently.
BEFORE = {
    "gpt2": (BASE, "0x1.0a73c20000000p+2", "0x1.8cdb01df94800p+4"),
    "llama": (LLAMA, "0x1.0b4c500000000p+2", "0x1.7d68d38f9b000p+0"),
    "window_ref": (dict(BASE, attn="reference", attn_window=5, attn_softcap=20.0),
                   "0x1.0a66860000000p+2", "0x1.81efc55281800p+4"),
    "window_sdpa": (dict(BASE, pos="rope", attn_window=5), "0x1.0a842c0000000p+2", "0x1.1863a29379c00p+5"),
    "mtp_moe": (dict(BASE, mtp_heads=2, mtp_weight=0.5, moe=MOE), "0x1.8fcca40000000p+2", "0x1.a6c2d70c848a0p+4"),
}


@pytest.mark.parametrize("name", BEFORE)
def test_without_doc_the_forward_is_bit_identical_to_before(name):
    kw, loss_hex, logits_hex = BEFORE[name]
    torch.manual_seed(0)
    model = GPT(ModelConfig(**kw)).train()
    g = torch.Generator().manual_seed(1)
    idx, targets = torch.randint(0, 64, (2, 32), generator=g), torch.randint(0, 64, (2, 32), generator=g)
    logits, loss = model(idx, targets)
    assert loss.item().hex() == loss_hex
    assert logits.detach().double().sum().item().hex() == logits_hex
    again, loss_again = model(idx, targets, doc=None)
    assert torch.equal(again, logits) and torch.equal(loss_again, loss)


def test_segments_and_positions_of_a_hand_built_row():
    doc = torch.tensor([[0, 0, 0, 1, 1, 2, -1, -1], [5, 5, 3, 3, 5, 5, 5, 5]])
    segment, position = document_segments(doc)
    assert segment.tolist() == [[0, 0, 0, 1, 1, 2, 3, 3], [0, 0, 1, 1, 2, 2, 2, 2]]  # a repeated id apart: new
    assert position.tolist() == [[0, 1, 2, 0, 1, 0, 0, 1], [0, 1, 0, 1, 0, 1, 2, 3]]
    mask = document_mask(segment, window=0)[0, 0]
    assert mask.shape == (8, 8)
    assert mask[4].tolist() == [False, False, False, True, True, False, False, False]
    windowed = document_mask(segment, window=2)[1, 0]
    assert windowed[7].tolist() == [False] * 6 + [True, True]  # the last 2 tokens of its own segment


LENGTHS = (5, 7, 4)  # three packed examples, then padding (document id -1) up to T


def packed(vocab: int, T: int = 20, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    examples = [torch.randint(0, vocab, (n,), generator=g) for n in LENGTHS]
    pad = T - sum(LENGTHS)
    idx = torch.cat(examples + [torch.zeros(pad, dtype=torch.long)]).unsqueeze(0)
    doc = torch.cat([torch.full((n,), i) for i, n in enumerate(LENGTHS)] + [torch.full((pad,), -1)]).unsqueeze(0)
    return examples, idx, doc


def spans():
    start = 0
    for n in LENGTHS:
        yield slice(start, start + n)
        start += n


SETTINGS = {
    "learned-sdpa": BASE,
    "learned-reference": dict(BASE, attn="reference"),
    "rope-sdpa": LLAMA,
    "rope-reference": dict(LLAMA, attn="reference"),
    "rope-window-sdpa": dict(LLAMA, attn_window=3),
    "learned-window-softcap-reference": dict(BASE, attn="reference", attn_window=3, attn_softcap=5.0),
    "moe": dict(LLAMA, moe=MOE),
}


@pytest.mark.parametrize("name", SETTINGS)
def test_a_packed_example_gives_its_logits_alone(name):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SETTINGS[name])).eval()
    examples, idx, doc = packed(64)
    with torch.no_grad():
        logits, _ = model(idx, every_position=True, doc=doc)
        for example, span in zip(examples, spans()):
            alone, _ = model(example.unsqueeze(0), every_position=True)
            torch.testing.assert_close(logits[0, span], alone[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["learned-sdpa", "rope-reference", "moe"])
def test_perturbing_one_example_leaves_the_others_unchanged(name):
    torch.manual_seed(0)
    model = GPT(ModelConfig(**SETTINGS[name])).eval()
    _, idx, doc = packed(64)
    first, second, third = spans()
    changed = idx.clone()
    changed[0, second] = (changed[0, second] + 1) % 64
    with torch.no_grad():
        before, _ = model(idx, every_position=True, doc=doc)
        after, _ = model(changed, every_position=True, doc=doc)
    for span in (first, third):
        torch.testing.assert_close(after[0, span], before[0, span], atol=1e-6, rtol=0)
    assert not torch.allclose(after[0, second], before[0, second])


@pytest.mark.parametrize("softcap", [0.0, 5.0])
def test_flash_configured_model_computes_documents_through_the_mask(monkeypatch, softcap):
    """flash-attn's dense kernel takes no mask: with doc, a flash model computes what SDPA (or the
    reference kernel, soft-capped) does. check_flash_available is bypassed: this CPU has no flash-attn."""
    monkeypatch.setattr(attention, "check_flash_available", lambda: None)
    kw = dict(LLAMA, attn_softcap=softcap)
    torch.manual_seed(0)
    flash = GPT(ModelConfig(**kw, attn="flash")).eval()
    other = GPT(ModelConfig(**kw, attn="reference" if softcap else "sdpa")).eval()
    other.load_state_dict(flash.state_dict())
    _, idx, doc = packed(64)
    with torch.no_grad():
        torch.testing.assert_close(flash(idx, every_position=True, doc=doc)[0],
                                   other(idx, every_position=True, doc=doc)[0], atol=1e-6, rtol=0)


def test_multi_token_heads_ignore_targets_across_examples():
    """Head j at t predicts targets[t + j]; for t in one example and t + j in the next, that target is
    ignored: changing the next example's first target moves the next-token loss, not the MTP loss."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(**BASE, mtp_heads=2, mtp_weight=0.5)).train()
    _, idx, doc = packed(64)
    targets = torch.randint(0, 64, idx.shape, generator=torch.Generator().manual_seed(4))
    boundary = LENGTHS[0]  # the second example's first position
    changed = targets.clone()
    changed[0, boundary] = (changed[0, boundary] + 1) % 64
    model(idx, targets, doc=doc)
    before = dict(model.loss_parts)
    model(idx, changed, doc=doc)
    assert model.loss_parts["mtp_loss"].item() == before["mtp_loss"].item()
    assert model.loss_parts["lm_loss"].item() != before["lm_loss"].item()
    model(idx, changed)  # without doc the heads do read across the boundary
    assert model.loss_parts["mtp_loss"].item() != before["mtp_loss"].item()


def test_doc_backward_reaches_every_parameter_with_checkpointing():
    torch.manual_seed(0)
    model = GPT(ModelConfig(**LLAMA, checkpoint_every=1)).train()
    _, idx, doc = packed(64)
    targets = idx.roll(-1, dims=1)
    _, loss = model(idx, targets, doc=doc)
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_doc_is_refused_with_a_cache_or_a_wrong_shape():
    from model.attention import KVCache

    model = GPT(ModelConfig(**BASE)).eval()
    _, idx, doc = packed(64)
    with pytest.raises(ValueError, match="not a KV cache"):
        model(idx, doc=doc, cache=KVCache(2, 32))
    with pytest.raises(ValueError, match="needs idx's shape"):
        model(idx, doc=doc[:, :5])


def peak_bytes(fields: dict, n_layer: int, doc: bool, B: int = 4, T: int = 64) -> int:
    from train.memory_measure import LiveStorage

    torch.manual_seed(0)
    model = GPT(ModelConfig(**{**BASE, "block_size": T, "n_layer": n_layer, **fields}))
    x = torch.randint(0, 64, (B, T), generator=torch.Generator().manual_seed(0))
    tracker = LiveStorage([*model.parameters(), *model.buffers()])
    with tracker:
        _, loss = model(x, x, doc=torch.zeros_like(x) if doc else None)  # one document: the same function
        loss.backward()
    return tracker.peak


@pytest.mark.parametrize("fields", [{}, {"attn_window": 8}, {"attn": "reference"}], ids=["sdpa", "window", "reference"])
def test_document_mask_bytes_per_block_match_the_measured_growth(fields):
    """What each block more keeps with a document mask: the growth of the measured peak from 1 to 3 blocks,
    with documents less without, over 2 blocks."""
    from model.attention import document_mask_bytes

    growth = {doc: peak_bytes(fields, 3, doc) - peak_bytes(fields, 1, doc) for doc in (False, True)}
    _, per_block = document_mask_bytes(ModelConfig(**{**BASE, "block_size": 64, **fields}), 4, 64, act_bytes=4)
    assert (growth[True] - growth[False]) // 2 == per_block
