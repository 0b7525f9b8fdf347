"""Train one run from its directory: python -m train RUNS_DIR/<plan>/<run>

The run directory holds the resolved .config the runner wrote; everything this
process needs comes from there, so a run is reproducible from its directory.
"""

from __future__ import annotations

import sys
import traceback
from pathlib import Path

from kbuild.kconfig import ROOT, load


EXIT_CODES = {"done": 0, "failed": 1, "interrupted": 130}  # the runner maps these back to plan.json


class Tee:
    """print() to the console and to the run's train.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        self.file.write(message + "\n")
        self.file.flush()


def main(run_dir: Path, resume: bool = False) -> int:
    log = Tee(run_dir / "train.log")
    try:
        from data.prepare import prepare
        from train.trainer import Trainer, write_summary

        _, cfg = load(run_dir / ".config")
        data = prepare(cfg, ROOT, log=log)
        trainer = Trainer(cfg, data, run_dir, log=log)
        if resume:
            trainer.resume()
        summary = trainer.run()
        write_summary(run_dir, summary)
        return EXIT_CODES[summary["status"]]
    except KeyboardInterrupt:  # a signal before the training loop took over its handling
        log("interrupted before training started")
        return EXIT_CODES["interrupted"]
    except Exception as e:  # recorded for plan.json; the traceback goes to the log
        log(traceback.format_exc())
        from train.trainer import write_summary

        write_summary(run_dir, {"status": "failed", "error": f"{type(e).__name__}: {e}"})
        return 1


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] != "--resume"):
        sys.exit("usage: python -m train RUN_DIR [--resume]")
    sys.exit(main(Path(args[0]), resume=len(args) == 2))
