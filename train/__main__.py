"""Train one run from its directory: python -m train RUNS_DIR/<plan>/<run>

The run directory holds the resolved .config the runner wrote; everything this
process needs comes from there, so a run is reproducible from its directory.
"""

from __future__ import annotations

import os
import sys
import traceback
from pathlib import Path

from kconfig.errors import NamedError
from kconfig.tree import ROOT, load


# The runner maps these back to plan.json (and reads summary.json for time_limit, which ends cleanly).
EXIT_CODES = {"done": 0, "time_limit": 0, "failed": 1, "interrupted": 130}


class Tee:
    """print() to the console and to the run's train.log."""

    def __init__(self, path: Path):
        self.file = open(path, "a", encoding="utf-8")

    def __call__(self, message: str) -> None:
        print(message, flush=True)
        self.file_only(message)

    def file_only(self, message: str) -> None:
        self.file.write(message + "\n")
        self.file.flush()


def main(run_dir: Path, resume: bool = False) -> int:
    """Train the run; under torchrun every rank runs this, and rank 0 alone logs and writes files."""
    main_rank = int(os.environ.get("RANK", "0")) == 0
    log = Tee(run_dir / "train.log") if main_rank else Quiet()
    dist = None
    try:
        from data.prepare import prepare
        from parallel import runtime
        from train.trainer import Trainer, write_summary

        _, cfg = load(run_dir / ".config")
        dist = runtime.init(cfg)
        if not dist.main:  # rank 0 prepares (or finds) the data first; the others then read it
            runtime.barrier(dist)
        data = prepare(cfg, ROOT, log=log)
        if dist.main:
            runtime.barrier(dist)
        trainer = Trainer(cfg, data, run_dir, log=log, dist=dist)
        if resume:
            trainer.resume()
        summary = trainer.run()
        if dist.main:
            write_summary(run_dir, summary)
        # Every rank's outstanding collectives (FSDP2's last all-gathers) complete before any rank tears
        # its process group down: gloo aborts a process destroyed with work in flight.
        runtime.barrier(dist)
        return EXIT_CODES[summary["status"]]
    except KeyboardInterrupt:  # a signal before the training loop took over its handling
        log("interrupted before training started")
        return EXIT_CODES["interrupted"]
    except BaseException as e:  # recorded for plan.json; the traceback goes to the log (every rank: stderr)
        if isinstance(e, (SystemExit, GeneratorExit)):
            raise  # (torch's distributed CheckpointException is a BaseException too: recorded like the rest)
        if not main_rank:
            print(f"rank {os.environ.get('RANK')}: {traceback.format_exc()}", file=sys.stderr, flush=True)
            return 1
        if isinstance(e, NamedError):  # raised on purpose with what to do: the message on screen
            print(f"error: {e}", file=sys.stderr, flush=True)
            log.file_only(traceback.format_exc())
        else:
            log(traceback.format_exc())
        from train.trainer import write_summary

        named = isinstance(e, NamedError)  # says what to do already; a class name adds nothing
        write_summary(run_dir, {"status": "failed", "error": str(e) if named else f"{type(e).__name__}: {e}"})
        return 1
    finally:
        if dist is not None:
            from parallel import runtime

            runtime.shutdown(dist)


class Quiet:
    """The log of ranks other than 0: nothing (their errors go to stderr)."""

    def __call__(self, message: str) -> None:
        pass


if __name__ == "__main__":
    args = sys.argv[1:]
    if len(args) not in (1, 2) or (len(args) == 2 and args[1] != "--resume"):
        sys.exit("usage: python -m train RUN_DIR [--resume]")
    sys.exit(main(Path(args[0]), resume=len(args) == 2))
