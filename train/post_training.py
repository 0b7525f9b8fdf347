"""What a post-training run (OBJECTIVE sft or dpo) changes in the trainer: its tokenizer, batches and loss.

- The tokenizer gains the chat template's special tokens it lacks (data/tokenizer.py), so the model's
  vocabulary may grow; INIT_FROM's smaller embedding is copied into the first rows (train/warm_start.py).
- SFT: batches of whole examples (packed with document masking, or padded, data/sft_batches.py); the
  loss is the next-token loss on the response tokens alone (the prompt's targets are -100).
- DPO: batches of pairs (B chosen rows, then their B rejected rows, data/preference.py); the policy's
  and the frozen reference's log-probabilities of each response give the DPO/IPO loss and its metrics
  (train/dpo.py). The reference is the starting weights: a frozen copy, or with LoRA the same model
  with its adapters switched off (no second copy; what trains in full besides the adapters, a grown
  embedding, is read from a copy of its starting values).
- LoRA (train/lora.py): adapters on LORA_TARGETS, the base frozen; when the vocabulary grew, the
  embedding (and an untied head) train in full too, so the new tokens' rows learn.
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.nn.functional as F

from data.chat_template import tokens_needed
from data.preference import PreferenceData
from data.sft import SFTData
from data.tokenizer import Tokenizer, with_special_tokens
from train.dpo import DPOConfig, dpo_loss, sequence_logps, token_kl
from train.lora import LoraSettings, adapters_disabled, apply_lora

DPO_SHOWN = {"dpo_accuracy": "pref acc", "dpo_reward_margin": "margin", "dpo_kl": "kl"}


class PostTraining:
    """An SFT or DPO run's additions to the trainer (built before the model: it sets the tokenizer)."""

    def __init__(self, cfg, base_tokenizer: Tokenizer, log=print):
        self.kind = cfg.OBJECTIVE
        self.tokenizer, self.added = with_special_tokens(base_tokenizer, tokens_needed(cfg.CHAT_TEMPLATE))
        if self.added:
            ids = ", ".join(f"{name} = {self.tokenizer.special_id(name)}" for name in self.added)
            log(f"{self.kind}: added special tokens of the {cfg.CHAT_TEMPLATE} template to the {base_tokenizer.kind} "
                f"tokenizer: {ids} (vocabulary {base_tokenizer.vocab_size} -> {self.tokenizer.vocab_size})")
        self.lora = LoraSettings.from_config(cfg)
        self.dpo = DPOConfig.from_config(cfg) if self.kind == "dpo" else None
        self.reference: torch.nn.Module | None = None  # DPO without LoRA: the frozen starting weights
        self.trained_in_full: tuple[str, ...] = ()  # with LoRA: plain parameters trained besides the adapters
        self.reference_full: dict[str, torch.Tensor] = {}  # DPO with LoRA: those parameters' starting values
        self.lora_layers: list[str] = []
        self.data: SFTData | PreferenceData | None = None

    # ------------------------------------------------------------------ model

    def prepare(self, model, parent_rows: int | None, log=print) -> None:
        """After INIT_FROM's weights are in ``model`` (a plain GPT, not yet wrapped): the DPO reference,
        then LoRA. ``parent_rows``: the parent's embedding rows (fewer: the vocabulary grew here)."""
        if self.kind == "dpo" and self.lora is None:
            self.reference = copy.deepcopy(model).eval().requires_grad_(False)
        if self.lora is None:
            return
        # Tokens this run added (in padding rows the parent never trained, or in rows the embedding grew by)
        # must learn: the embedding (and an untied head) train in full beside the adapters.
        grew = parent_rows is not None and parent_rows < model.config.vocab_size
        self.trained_in_full = (("wte.weight",) + (() if model.config.tie_embeddings else ("lm_head.weight",))
                                if grew or self.added else ())
        self.lora_layers = apply_lora(model, self.lora, also_train=self.trained_in_full)
        if self.kind == "dpo":  # the adapters switch off for the reference; these train in full, so keep a copy
            params = dict(model.named_parameters())
            self.reference_full = {name: params[name].detach().clone() for name in self.trained_in_full}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        log(f"lora: rank {self.lora.rank}, alpha {self.lora.alpha} on {len(self.lora_layers)} layers "
            f"({', '.join(sorted({n.split('.', 2)[-1] for n in self.lora_layers}))}); {trainable:,} trainable "
            f"parameters" + (f", {' and '.join(self.trained_in_full)} in full (the added tokens' rows)"
                             if self.trained_in_full else "") + (", base in bf16" if self.lora.base_bf16 else ""))

    # ------------------------------------------------------------------ data

    def batches(self, cfg, loop, device, rank: int, world: int, root, log=print) -> tuple:
        """(training batches, training-evaluation batches, {name: validation batches}) of SFT_DATA or DPO_DATA."""
        kind = SFTData if self.kind == "sft" else PreferenceData
        self.data = kind.from_config(cfg, self.tokenizer, loop.block_size, root, log)
        make = self.data.batches
        train = make("train", loop.micro_batch, loop.block_size, device, loop.seed).shard(rank, world)
        eval_train = make("train", loop.micro_batch, loop.block_size, device, loop.seed + 1).shard(rank, world)
        val = make("val", loop.micro_batch, loop.block_size, device, loop.seed + 1).shard(rank, world)
        return train, eval_train, {self.kind: val}

    # ------------------------------------------------------------------ loss

    def loss(self, forward, model, batch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """(the objective's loss, its detached terms) for one micro-batch; ``forward`` is what trains (a
        wrapper's forward under DDP), ``model`` the plain GPT (the reference runs through it with LoRA)."""
        if self.kind == "sft":
            x, y, doc = batch
            _, loss = forward(x, y, doc=doc)
            return loss, {}
        x, y = batch
        logits, _ = forward(x, every_position=True)
        with torch.no_grad(), self.reference_model(model) as reference:
            ref_logits, _ = reference(x, every_position=True)
        logp, ref_logp = F.log_softmax(logits.float(), -1), F.log_softmax(ref_logits.float(), -1)
        policy, ref = sequence_logps(logp, y), sequence_logps(ref_logp, y)
        b = x.size(0) // 2
        loss, metrics = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], self.dpo)
        metrics["dpo_kl"] = token_kl(logp.detach(), ref_logp, y)
        return loss, metrics

    @contextlib.contextmanager
    def reference_model(self, model):
        """DPO's reference, a callable like the model: the frozen copy, or ``model`` with its adapters off
        (LoRA) and the starting values of what trains in full (a grown embedding) in place of the live ones."""
        if self.reference is not None:
            yield self.reference
            return
        was_training = model.training
        model.eval()  # the reference is the starting weights without dropout
        try:
            with adapters_disabled(model):
                if not self.reference_full:
                    yield model
                else:  # the live parameters stay untouched (autograd holds them for the policy's backward)
                    yield lambda *args, **kwargs: torch.func.functional_call(model, self.reference_full, args, kwargs)
        finally:
            model.train(was_training)

    def summary(self) -> dict:
        """The summary's "post_training" entry: objective, data counts, LoRA."""
        out = {"objective": self.kind, "added_tokens": list(self.added), "data": self.data.stats if self.data else None}
        if self.lora is not None:
            out["lora"] = {**self.lora.to_dict(), "layers": len(self.lora_layers),
                           "trained_in_full": list(self.trained_in_full)}
        if self.dpo is not None:
            out["dpo"] = {"loss": self.dpo.loss, "beta": self.dpo.beta, "label_smoothing": self.dpo.label_smoothing}
        return out
