"""EVAL_FEWSHOT and EVAL_LIMIT, set through Kconfig, reach lm-eval: the contexts our model is asked to
score carry that many solved examples before the document, and only the first EVAL_LIMIT documents
are scored (tests/test_eval.py checks the scores themselves at 0-shot over every document)."""

from __future__ import annotations

import pytest

from conftest import ROOT, config_of

pytest.importorskip("lm_eval")
from harness.adapter import OurLM  # noqa: E402  (needs lm_eval)
from harness.evaluate import EvalConfig, run_tasks  # noqa: E402
from test_eval import DOCS, offline, task_folder, tiny_model  # noqa: E402, F401  (offline: autouse fixture)


@pytest.mark.slow
@pytest.mark.parametrize("fewshot, limit", [(0, 0), (1, 2)])
def test_fewshot_and_limit_shape_what_the_model_scores(tmp_path, fewshot, limit):
    cfg = config_of(EVAL_TASKS="tiny_mc", EVAL_TASKS_DIR=str(task_folder(tmp_path)), EVAL_FEWSHOT=fewshot,
                    EVAL_LIMIT=limit, EVAL_BATCH_SIZE=2)
    config = EvalConfig.from_config(cfg, ROOT)
    model, tokenizer = tiny_model()
    lm = OurLM(model, tokenizer, batch_size=config.batch_size)
    contexts = []
    score = lm.loglikelihood
    lm.loglikelihood = lambda requests, *args, **kw: contexts.extend(r.args[0] for r in requests) or score(
        requests, *args, **kw)
    metrics, _ = run_tasks(lm, config, log=lambda _: None)
    scored = DOCS[:limit or len(DOCS)]
    assert metrics["tiny_mc"]["num_fewshot"] == fewshot and metrics["tiny_mc"]["samples"] == len(scored)

    def prefixes(i: int) -> set[str]:
        """What may precede document i's context: nothing at 0-shot, else another document solved
        (its context, its answer, a blank line: lm-eval's default few-shot format)."""
        if not fewshot:
            return {""}
        return {c + choices[a] + "\n\n" for j, (c, choices, a) in enumerate(DOCS) if j != i}

    owners = [[i for i, (context, _, _) in enumerate(scored) if any(c == p + context for p in prefixes(i))]
              for c in contexts]
    assert all(len(o) == 1 for o in owners), [c for c, o in zip(contexts, owners) if len(o) != 1]
    assert sorted(o[0] for o in owners) == sorted(i for i, (_, choices, _) in enumerate(scored) for _ in choices)
