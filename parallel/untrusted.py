"""Sharded checkpoint folders read without running code from them.

A run folder may come from someone else (copied, downloaded, shared), and the engines' own
readers unpickle parts of it with plain pickle, which calls whatever the file names:

- torch distributed checkpointing (FSDP2): ``FileSystemReader.read_metadata`` is ``pickle.load``
  of ``.metadata``; ``DefaultLoadPlanner.load_bytes`` is ``torch.load(weights_only=False)`` of each
  non-tensor entry of the ``.distcp`` files (the optimizer's param_groups: lr, betas, names...).
  Tensor entries are already read with ``weights_only=True``.
- DeepSpeed: ``TorchCheckpointEngine.load`` (``load_checkpoint``) and ``zero_to_fp32`` (``make
  sample``) are ``torch.load(weights_only=False)`` of ``*_model_states.pt`` and ``*_optim_states.pt``.

So before an engine reads a folder, ``check_dcp_folder`` / ``check_deepspeed_folder`` read those
pickles here: ``.metadata`` through an unpickler that admits only DCP's metadata classes, the
other pickles through torch's weights_only loader (plus three DeepSpeed data classes). DCP's own
reads go through ``SafeFileSystemReader`` and the ``Safe*Planner`` classes, which apply the same
checks at the point of use. Anything else is refused with ``UntrustedCheckpointError``, naming
the file and the global it pickles. A folder this tool wrote never contains one.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import zipfile
from pathlib import Path

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, _EmptyStateDictLoadPlanner
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, StorageMeta

from parallel.errors import CheckpointError

METADATA = ".metadata"  # DCP's index of a folder: what each entry is and where its bytes lie

_DCP = "torch.distributed.checkpoint.metadata"
# Every global a DCP .metadata pickles (measured on FSDP2 checkpoints of this repo, torch 2.13),
# besides the torch dtypes, which are admitted by type below.
_METADATA_GLOBALS = {
    *((_DCP, name) for name in ("Metadata", "StorageMeta", "MetadataIndex", "TensorStorageMetadata",
                                "BytesStorageMetadata", "ChunkStorageMetadata", "TensorProperties",
                                "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout from its name (a lookup in torch's layouts)
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"),  # StorageMeta.checkpoint_id
    ("pathlib._local", "PosixPath"), ("pathlib._local", "PurePosixPath"),  # the same on Python 3.13+
    ("collections", "OrderedDict"),
}
# torch words a refused global "Unsupported global: GLOBAL x.y was not an allowed global..." or
# "Trying to load unsupported GLOBAL x.y whose module x is blocked"
_REFUSED_GLOBAL = re.compile(r"GLOBAL (\S+)")


class UntrustedCheckpointError(CheckpointError, ValueError):
    """A checkpoint file pickles something other than checkpoint data; it is not loaded.
    (A ValueError too, so the command line reports it as an error, without a traceback.)"""


def _refusal(path, what: str) -> UntrustedCheckpointError:
    return UntrustedCheckpointError(
        f"{path}: refusing to load: it pickles {what}, which is not checkpoint data; this folder may "
        "not come from this tool — do not load checkpoints from people you do not trust")


class _MetadataUnpickler(pickle.Unpickler):
    """pickle.Unpickler that resolves only DCP's metadata classes and torch dtypes."""

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str):
        if (module, name) in _METADATA_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # no lazy import by name
            return vars(torch)[name]
        raise _refusal(self.path, f"{module}.{name}")


def read_dcp_metadata(path: Path) -> Metadata:
    """A DCP ``.metadata`` file, unpickled with only the metadata classes admitted."""
    try:
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(f, path).load()
    except UntrustedCheckpointError:
        raise
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing: this folder is not a complete torch distributed "
                              "checkpoint; use an earlier checkpoint") from None
    except Exception as e:  # truncated or not a pickle at all
        raise CheckpointError(f"{path} is not readable DCP metadata ({type(e).__name__}: {e})") from None
    if not isinstance(metadata, Metadata):
        raise _refusal(path, f"a {type(metadata).__name__} instead of DCP metadata")
    return metadata


def load_weights_only(source, path, extra_globals=(), mmap: bool | None = None):
    """torch.load with weights_only=True (tensors and plain containers), plus ``extra_globals``;
    ``path`` names the file in errors. A refused global raises UntrustedCheckpointError. ``mmap``
    None: map a zip file (a check reads no tensor data); False: read it (the tensors are kept)."""
    if mmap is None:
        mmap = isinstance(source, (str, Path)) and zipfile.is_zipfile(source)
    try:
        with torch.serialization.safe_globals(list(extra_globals)):
            return torch.load(source, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        found = _REFUSED_GLOBAL.search(str(e))
        raise _refusal(path, found[1] if found else f"something torch's weights_only loader refuses "
                                                    f"({_reason(e)})") from None


def _reason(e: pickle.UnpicklingError) -> str:
    """The specific lines of torch's weights_only error, without its advice around them."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    return (" ".join(lines[1:-1]) or lines[0]) if lines else type(e).__name__


def check_dcp_folder(folder: Path) -> Metadata:
    """Refuse a DCP folder whose metadata or non-tensor entries pickle anything but data; its
    metadata otherwise. Nothing in the folder is executed."""
    folder = Path(folder)
    metadata = read_dcp_metadata(folder / METADATA)
    for index, info in metadata.storage_data.items():
        name = Path(str(info.relative_path))
        if name.is_absolute() or len(name.parts) != 1 or name.name in ("", ".", ".."):
            raise UntrustedCheckpointError(
                f"{folder / METADATA}: refusing to load: entry {index.fqn} points to {info.relative_path}, "
                "outside the folder; this folder does not come from this tool")
        kind = metadata.state_dict_metadata.get(index.fqn)
        if isinstance(kind, BytesStorageMetadata) and not info.transform_descriptors:
            # A transformed (compressed) entry is checked when read, by the Safe*Planner below.
            with open(folder / name, "rb") as f:
                f.seek(info.offset)
                load_weights_only(io.BytesIO(f.read(info.length)), f"{folder / name} (entry {index.fqn})")
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """DCP's file reader with ``.metadata`` (and rank-local metadata) read by the restricted
    unpickler instead of ``pickle.load``."""

    def read_metadata(self, *args, **kwargs) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:  # as FileSystemReader.read_metadata
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _CheckedBytes:
    """A load planner mixin: each non-tensor entry must load weights_only before the planner's own
    ``torch.load(weights_only=False)`` of the same bytes."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        load_weights_only(io.BytesIO(value.getvalue()), f"checkpoint entry {read_item.dest_index.fqn}")
        value.seek(0)
        super().load_bytes(read_item, value)


class SafeLoadPlanner(_CheckedBytes, DefaultLoadPlanner):
    """dcp.load's default planner, with checked non-tensor entries."""


class SafeEmptyLoadPlanner(_CheckedBytes, _EmptyStateDictLoadPlanner):
    """The planner that rebuilds a state dict from the metadata alone, with checked entries."""


@contextlib.contextmanager
def dcp_refusals():
    """Re-raise a refusal that DCP wrapped in its CheckpointException (a BaseException listing each
    rank's failure) as itself, so callers see the named error."""
    try:
        yield
    except CheckpointException as e:
        for exc, _trace in e.failures.values():
            if isinstance(exc, CheckpointError):
                raise exc from None
        raise


def deepspeed_globals() -> list:
    """The classes besides tensors and containers in DeepSpeed's checkpoint files (ZeRO 1-3,
    deepspeed 0.19): plain data holders whose unpickling runs no code of the file's choosing."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def check_deepspeed_folder(folder: Path) -> None:
    """Refuse a DeepSpeed checkpoint folder in which any .pt file (every file DeepSpeed loads from
    it) pickles more than tensors, containers and DeepSpeed's data classes."""
    folder = Path(folder)
    files = sorted(folder.rglob("*.pt"))
    if not files:
        raise CheckpointError(f"{folder}: no DeepSpeed checkpoint files (*.pt) in this folder")
    allowed = deepspeed_globals()
    for path in files:
        try:
            load_weights_only(path, path, allowed)
        except UntrustedCheckpointError:
            raise
        except Exception as e:  # truncated, not a torch file
            raise CheckpointError(f"{path} is not a readable checkpoint file ({type(e).__name__}: {e}); "
                                  "use an earlier checkpoint") from None
