"""Nothing from a run directory executes code: sharded checkpoints (FSDP2's torch distributed
checkpoint folders, DeepSpeed's) whose pickles name a callable are refused with a named error
before an engine reads them, through 'make sample' and resume too, and genuine ones still load."""

from __future__ import annotations

import io
import os
import pickle
import re
import shlex
import shutil
import subprocess

import pytest
import torch

from parallel import runtime
from parallel.launch import train_command
from parallel import untrusted
from parallel.untrusted import UntrustedCheckpointError

REFUSED = r"refusing to load: it pickles posix\.system, which is not checkpoint data"


class Exploit:
    """Unpickling this runs a shell command that creates ``marker``: any code a file could name."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {shlex.quote(self.marker)}",)


def test_the_exploit_runs_under_plain_pickle_and_torchs_dcp_reader(tmp_path):
    """What the guard is for: torch's own DCP reader runs a crafted .metadata (torch 2.13). If this
    starts failing, torch's reader became safe; the guard stays correct either way."""
    from torch.distributed.checkpoint import FileSystemReader

    (tmp_path / ".metadata").write_bytes(pickle.dumps(Exploit(tmp_path / "marker")))
    with pytest.raises(Exception):
        FileSystemReader(str(tmp_path)).read_metadata()
    assert (tmp_path / "marker").exists()


# --- DCP (FSDP2) folders, written in this process the way save_sharded writes them ---

def tiny_model_and_optimizer(seed: int):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, betas=(0.8, 0.95))
    model(torch.randn(5, 4)).square().mean().backward()
    optimizer.step()  # Adam moments and step counts to save
    return model, optimizer


@pytest.fixture
def dcp_folder(tmp_path):
    """A genuine DCP checkpoint folder (model and AdamW state) and the model it holds."""
    model, optimizer = tiny_model_and_optimizer(seed=0)
    folder = tmp_path / "step-00000001"
    runtime.save_sharded(runtime.Dist("none"), folder, model, optimizer, None)
    return folder, model, optimizer


def test_genuine_dcp_folder_round_trips(dcp_folder):
    folder, model, optimizer = dcp_folder
    other, other_optimizer = tiny_model_and_optimizer(seed=1)
    assert not torch.equal(other[0].weight, model[0].weight)
    runtime.load_sharded(runtime.Dist("none"), folder, other, other_optimizer, None)
    for name, value in model.state_dict().items():
        assert torch.equal(other.state_dict()[name], value), name
    for mine, theirs in zip(optimizer.state.values(), other_optimizer.state.values()):
        assert all(torch.equal(mine[k], theirs[k]) for k in ("step", "exp_avg", "exp_avg_sq"))
    assert other_optimizer.param_groups[0]["betas"] == (0.8, 0.95)  # a non-tensor (pickled) entry
    weights = runtime.full_weights(folder, "fsdp2")
    assert weights.keys() == model.state_dict().keys()
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())


def test_weights_of_other_dtypes_are_admitted(tmp_path):
    """The metadata names each tensor's dtype (torch.bfloat16, ...): every dtype passes."""
    import torch.distributed.checkpoint as dcp

    weights = {"bf16": torch.randn(3, 2).to(torch.bfloat16), "fp16": torch.randn(4).half(),
               "ids": torch.arange(5), "mask": torch.tensor([True, False])}
    dcp.save({"model": weights}, checkpoint_id=str(tmp_path / "ckpt"))
    loaded = runtime.full_weights(tmp_path / "ckpt", "fsdp2")
    assert all(loaded[k].dtype == v.dtype and torch.equal(loaded[k], v) for k, v in weights.items())


def craft_metadata(folder, marker, nested: bool) -> None:
    """Replace .metadata by an exploit: alone, or hidden inside the genuine metadata object."""
    path = folder / ".metadata"
    if nested:
        metadata = untrusted.read_dcp_metadata(path)
        metadata.planner_data["model.0.weight"] = Exploit(marker)
        path.write_bytes(pickle.dumps(metadata))
    else:
        path.write_bytes(pickle.dumps(Exploit(marker)))


@pytest.mark.parametrize("nested", [False, True], ids=["whole-file", "inside-genuine-metadata"])
def test_crafted_metadata_is_refused(dcp_folder, tmp_path, nested):
    folder, _, _ = dcp_folder
    marker = tmp_path / "marker"
    craft_metadata(folder, marker, nested)
    model, optimizer = tiny_model_and_optimizer(seed=1)
    with pytest.raises(UntrustedCheckpointError, match=rf"{re.escape(str(folder / '.metadata'))}: {REFUSED}; "
                                                      "this folder may not come from this tool"):
        runtime.load_sharded(runtime.Dist("none"), folder, model, optimizer, None)
    with pytest.raises(UntrustedCheckpointError, match=REFUSED):
        runtime.full_weights(folder, "fsdp2")
    with pytest.raises(UntrustedCheckpointError, match=REFUSED):  # DCP's own read, guarded too
        untrusted.SafeFileSystemReader(str(folder)).read_metadata()
    assert not marker.exists()


@pytest.fixture
def crafted_bytes_entry(tmp_path):
    """A DCP folder whose optimizer param_groups lr (a pickled, non-tensor entry) is an exploit."""
    model, optimizer = tiny_model_and_optimizer(seed=0)
    from torch.distributed.checkpoint.state_dict import get_state_dict
    import torch.distributed.checkpoint as dcp

    weights, optim = get_state_dict(model, optimizer)
    optim["param_groups"][0]["lr"] = Exploit(tmp_path / "marker")
    folder = tmp_path / "step-00000001"
    dcp.save({"model": weights, "optimizer": optim}, checkpoint_id=str(folder))
    return folder, tmp_path / "marker"


def test_crafted_non_tensor_entry_is_refused(crafted_bytes_entry):
    folder, marker = crafted_bytes_entry
    model, optimizer = tiny_model_and_optimizer(seed=1)
    with pytest.raises(UntrustedCheckpointError,
                       match=rf"__0_0\.distcp \(entry optimizer\.param_groups\.0\.lr\): {REFUSED}"):
        runtime.load_sharded(runtime.Dist("none"), folder, model, optimizer, None)
    assert not marker.exists()


def test_dcp_reads_are_guarded_without_the_precheck(crafted_bytes_entry):
    """The reader and planner refuse at the point of use too, and the refusal comes out of DCP's
    CheckpointException as itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    folder, marker = crafted_bytes_entry
    model, optimizer = tiny_model_and_optimizer(seed=1)
    weights, optim = get_state_dict(model, optimizer)
    with pytest.raises(UntrustedCheckpointError, match=rf"entry optimizer\.param_groups\.0\.lr: {REFUSED}"):
        with untrusted.dcp_refusals():
            dcp.load({"model": weights, "optimizer": optim}, planner=untrusted.SafeLoadPlanner(),
                     storage_reader=untrusted.SafeFileSystemReader(str(folder)))
    assert not marker.exists()


def test_storage_entry_outside_the_folder_is_refused(dcp_folder):
    folder, _, _ = dcp_folder
    metadata = untrusted.read_dcp_metadata(folder / ".metadata")
    next(iter(metadata.storage_data.values())).relative_path = "../../elsewhere.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(UntrustedCheckpointError, match=r"points to \.\./\.\./elsewhere\.distcp, outside the folder"):
        runtime.full_weights(folder, "fsdp2")


def test_missing_metadata_is_a_named_error(dcp_folder):
    folder, _, _ = dcp_folder
    (folder / ".metadata").unlink()
    with pytest.raises(untrusted.CheckpointError, match=r"\.metadata is missing: this folder is not a complete"):
        runtime.full_weights(folder, "fsdp2")


# --- Real run folders: one-process FSDP2 and DeepSpeed runs trained by the repo ---

@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """{engine: run directory} of two-step runs whose last checkpoint is checkpoints/step-00000002."""
    pytest.importorskip("deepspeed")
    from test_distributed import configure, train

    out = {}
    for engine in ("FSDP2", "DEEPSPEED"):
        tmp = tmp_path_factory.mktemp(engine.lower())
        run_dir, cfg = configure(tmp, "run", f"PARALLEL_{engine}=y NPROC_PER_NODE=1 MICRO_BATCH=4 GRAD_ACCUM=1 "
                                             "MAX_ITERS=2 CHECKPOINT_INTERVAL=2 EVAL_INTERVAL=2")
        train(run_dir, cfg)
        out[engine] = run_dir, cfg
    return out


def copy_run(runs, engine, tmp_path):
    run_dir, cfg = runs[engine]
    dest = tmp_path / "run"
    shutil.copytree(run_dir, dest)
    return dest, cfg, dest / "checkpoints" / "step-00000002"


def craft_deepspeed_file(folder, name, marker) -> None:
    """Hide an exploit in one of DeepSpeed's files, keeping everything else in it."""
    data = io.BytesIO((folder / name).read_bytes())  # not memory-mapped: the file is rewritten below
    state = untrusted.load_weights_only(data, folder / name, untrusted.deepspeed_globals())
    state["ds_version"] = Exploit(marker)
    torch.save(state, folder / name)


@pytest.mark.slow
def test_genuine_deepspeed_folder_loads(runs, tmp_path):
    from train.sample import sample_from

    run_dir, _, folder = copy_run(runs, "DEEPSPEED", tmp_path)
    untrusted.check_deepspeed_folder(folder)  # LossScaler, ZeroStageEnum: admitted
    # zero_to_fp32 gives back the trained weights exactly: the run's own sample repeats.
    assert sample_from(run_dir) + "\n" == (run_dir / "samples.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_optim_states.pt"])
def test_crafted_deepspeed_file_is_refused(runs, tmp_path, name):
    _, _, folder = copy_run(runs, "DEEPSPEED", tmp_path)
    marker = tmp_path / "marker"
    craft_deepspeed_file(folder, name, marker)
    with pytest.raises(UntrustedCheckpointError, match=rf"{re.escape(str(folder / name))}: {REFUSED}"):
        runtime.full_weights(folder, "deepspeed")
    assert not marker.exists()


def resume(run_dir, cfg) -> subprocess.CompletedProcess:
    from kconfig.tree import ROOT

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    return subprocess.run(train_command(cfg, run_dir, True), cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ["FSDP2", "DEEPSPEED"])
def test_resume_refuses_a_crafted_folder(runs, tmp_path, engine):
    run_dir, cfg, folder = copy_run(runs, engine, tmp_path)
    marker = tmp_path / "marker"
    if engine == "FSDP2":
        craft_metadata(folder, marker, nested=True)
    else:
        craft_deepspeed_file(folder, "mp_rank_00_model_states.pt", marker)
    done = resume(run_dir, cfg)
    assert done.returncode != 0
    assert "refusing to load: it pickles posix.system" in (run_dir / "train.log").read_text()
    assert not marker.exists()


@pytest.mark.slow
def test_make_sample_refuses_a_crafted_fsdp2_run(runs, tmp_path, make):
    from train.sample import sample_from

    run_dir, _, folder = copy_run(runs, "FSDP2", tmp_path)
    assert sample_from(run_dir) + "\n" == (run_dir / "samples.txt").read_text()  # genuine: loads
    marker = tmp_path / "marker"
    craft_metadata(folder, marker, nested=False)
    done = make("sample", env={"RUN_DIR": str(run_dir)}, check=False)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"error: {folder / '.metadata'}: refusing to load: it pickles posix.system" in done.stderr
    assert "Traceback" not in done.stderr and not marker.exists()
