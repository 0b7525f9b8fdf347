"""Our GPT and tokenizer as an lm-evaluation-harness model: every option set is evaluable, exported or not.

Scoring follows lm-eval's own ``hf`` backend (through its TemplateLM base), so a task scores the same
here and on the exported folder: a context's trailing whitespace moves into the continuation, the
continuation's tokens are those of ``encode(context + continuation)`` after the context's, an empty
context is the end-of-text token, and the input is the last BLOCK_SIZE tokens of context plus
continuation. Log-probabilities are over the model's whole (padded) vocabulary, as its training loss
and the exported model's are. The model runs in float32.
"""

from __future__ import annotations

import lm_eval.models  # noqa: F401  lm-eval lists its own models only while its registry is empty: before ours
import torch
import torch.nn.functional as F
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

from data.tokenizer import Tokenizer
from harness.errors import EvalError
from hf.tokenizer import eos_id
from model.gpt import GPT, first_stop


@register_model("lmkbuild")
class OurLM(TemplateLM):
    """lm-eval's model interface over a GPT of ours (in eval mode) and its tokenizer, registered as "lmkbuild"."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int | None = 16,
                 device: str | torch.device | None = "cpu", max_batch_size: int | None = None):
        """``max_batch_size`` is lm-eval's automatic batch sizing, which this model does not do (ignored);
        ``simple_evaluate(model="lmkbuild", model_args={"model": gpt, "tokenizer": tok})`` builds one."""
        super().__init__()
        batch_size, device = batch_size or 16, device or "cpu"
        self.model, self.tok, self.batch_size = model, tokenizer, batch_size
        self._device = torch.device(device)
        self.block_size = model.config.block_size
        self.vocab_rows = model.config.vocab_size
        # The exported end-of-text id (a char or byte vocabulary's lies in the padding rows); where the
        # embedding has no row for it, an empty context is a newline instead.
        eot = eos_id(tokenizer)
        self._eot = eot if eot < self.vocab_rows else tokenizer.encode("\n")[-1]
        self.stop_ids = {tokenizer.special_id(name) for name in tokenizer.added} | (
            {tokenizer.eos_id} if tokenizer.eos_id is not None else set())

    @property
    def eot_token_id(self) -> int:
        return self._eot

    @property
    def max_length(self) -> int:
        return self.block_size

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        try:  # a chat template's special tokens, spelled in a prompt, are their ids (as in fine-tuning)
            return self.tok.encode_special(string)
        except ValueError as e:  # a char vocabulary without some character of the task
            raise EvalError(f"the run's {self.tok.kind} tokenizer cannot encode task text {string[:60]!r}...: {e}; "
                            "evaluate on tasks in the run's alphabet, or train with CONFIG_TOKENIZER_BYTE, "
                            "_SENTENCEPIECE or _BPE, which encode any text") from None

    def loglikelihood(self, requests, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        try:
            return super().loglikelihood(requests, disable_tqdm=True)
        except EvalError as e:  # name the task and document whose text the tokenizer cannot encode
            for request in requests:
                try:
                    self.tok.encode("".join(request.args))
                except ValueError:
                    raise EvalError(f"task {request.task_name}, document {request.doc_id}: {e}") from None
            raise

    def tok_decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids)

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(sum of log p(continuation | context), whether greedy decoding gives the continuation) per request."""
        scored = [self._window(context, continuation) for _, context, continuation in requests]
        order = sorted(range(len(scored)), key=lambda i: -len(scored[i][0]))  # longest first: less padding
        results: list[tuple[float, bool] | None] = [None] * len(scored)
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            width = len(scored[batch[0]][0])
            idx = torch.zeros(len(batch), width, dtype=torch.long)
            for row, i in enumerate(batch):  # right padding: a causal model's earlier positions ignore it
                idx[row, :len(scored[i][0])] = torch.tensor(scored[i][0])
            logits, _ = self.model(idx.to(self._device), every_position=True)
            logprobs = F.log_softmax(logits.float(), dim=-1)
            for row, i in enumerate(batch):
                inputs, n = scored[i]
                continuation = requests[i][2]
                target = torch.tensor(continuation[len(continuation) - n:], dtype=torch.long, device=self._device)
                positions = logprobs[row, len(inputs) - n:len(inputs)]
                picked = positions.gather(-1, target.unsqueeze(-1)).squeeze(-1)
                results[i] = (picked.sum().item(), bool((positions.argmax(-1) == target).all()))
        return results

    def _window(self, context: list[int], continuation: list[int]) -> tuple[list[int], int]:
        """(model input, how many of its last positions predict the continuation): the last BLOCK_SIZE
        tokens of context + continuation, minus the final token (which is only predicted)."""
        whole = (context + continuation)[-(self.block_size + 1):]
        return whole[:-1], min(len(continuation), len(whole) - 1)

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        """Each text's whole log-likelihood in windows of BLOCK_SIZE, every token predicted once, the first
        from the end-of-text token (lm-eval's rolling windows, as its hf backend uses them)."""
        out = []
        for request in requests:
            (text,) = request.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                self.tok_encode(text), prefix_token=self.eot_token_id, max_seq_len=self.block_size, context_len=1)]
            scores = self._loglikelihood_tokens([(None, context, target) for context, target in windows])
            out.append(sum(score for score, _ in scores))
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Greedy (or, with do_sample, sampled) continuation of each context up to max_gen_toks tokens,
        cut before the first of the ``until`` strings; generation stops there, at end-of-text, or at a
        special token a chat template added (its end of turn)."""
        out = []
        for request in requests:
            context, kwargs = request.args
            kwargs = dict(kwargs)
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", 256))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            ids = self.tok_encode(context) or [self.eot_token_id]
            ids = ids[-max(1, self.block_size - max_new):]  # room for the generation in one window where possible
            start = len(self.tok.decode(ids))

            def stop(idx: torch.Tensor) -> bool:
                if int(idx[0, -1]) in self.stop_ids:  # end of text, or a chat template's end of turn
                    return True
                return bool(until) and first_stop(self.tok.decode(idx[0].tolist()), tuple(until), start) is not None

            idx = torch.tensor([ids], dtype=torch.long, device=self._device)
            generator = torch.Generator(device=self._device).manual_seed(1234)
            generated = self.model.generate(idx, max_new, temperature=temperature, generator=generator,
                                            vocab_limit=self.tok.vocab_size, stop=stop)
            text = self.tok.decode(generated[0].tolist())[start:]
            cut = first_stop(text, tuple(until))
            out.append(text if cut is None else text[:cut])
        return out
