"""Reading mmengine / mmseg / mmdet checkpoints with torch's safe (weights-only) unpickler.

Since torch 2.6, ``torch.load`` refuses any object outside a small allowlist, and mmengine 0.10.7 calls it with that
default: its own training checkpoints then fail to load (resume, test), because they hold numpy values and the
training log state, a ``HistoryBuffer`` whose statistics methods are pickled as ``getattr(HistoryBuffer, 'mean')``.
Turning the check off (``weights_only=False``) would run whatever a downloaded file contains. Instead the reader
here, `dsan.models.read_checkpoint`, allows exactly what these files hold: numpy arrays, scalars and dtypes,
``HistoryBuffer``, timm's ``argparse.Namespace``, and a ``getattr`` that only resolves public methods of
``HistoryBuffer``. The allowlist is defined once, in `dsan.models._checkpoint.allowed_globals`, so that the
classification loaders read the same files without needing mmengine themselves.

`install()` makes it mmengine's reader of local files (``CheckpointLoader``'s default scheme), and makes mmengine
write local files atomically (a checkpoint is written to a temporary file, synced, then renamed, so an interrupted
run never leaves a truncated checkpoint behind to resume from). Importing `dsan.mm` calls it, so every tool and
config that uses the DSAN backbone reads and writes checkpoints this way.
"""
import os
from typing import Any

from mmengine.fileio import LocalBackend, register_backend
from mmengine.fileio import io as mm_io
from mmengine.runner import CheckpointLoader

from dsan.models._checkpoint import read_checkpoint

__all__ = ['install', 'load_checkpoint_file']


def load_checkpoint_file(filename: str | os.PathLike, map_location: Any = 'cpu') -> Any:
    """Load a local checkpoint with the weights-only unpickler and the allowlist (safetensors too).

    The allowlist is `dsan.models._checkpoint.allowed_globals`, shared with the classification loaders so that
    both read the same files.

    Raises:
        FileNotFoundError: No such file.
        CheckpointError: The file is not a readable checkpoint, or holds objects outside the allowlist (named in
            the message).
    """
    return read_checkpoint(filename, map_location=map_location)


class AtomicLocalBackend(LocalBackend):
    """mmengine's local file backend, writing each file through a temporary file and an atomic rename."""

    def put(self, obj: bytes, filepath: str | os.PathLike) -> None:
        """Write `obj` to `filepath` atomically (parent directories are created)."""
        filepath = os.fspath(filepath)
        os.makedirs(os.path.dirname(filepath) or '.', exist_ok=True)
        tmp = f'{filepath}.tmp-{os.getpid()}'
        try:
            with open(tmp, 'wb') as f:
                f.write(obj)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, filepath)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)


def install() -> None:
    """Make `load_checkpoint_file` mmengine's loader of local paths, and local writes atomic."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_checkpoint_file, force=True)
    register_backend('local', AtomicLocalBackend, force=True, prefixes='')
    # Drop backend instances created before this call, so they are rebuilt with the new class.
    for key in [k for k, v in mm_io.backend_instances.items() if type(v) is LocalBackend]:
        del mm_io.backend_instances[key]
