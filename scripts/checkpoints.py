# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Checkpoints: atomic saving, resumable training state, and checked loading of network weights."""

from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, DiskSaver
from monai.handlers import CheckpointLoader, CheckpointSaver
from scripts.atomic_files import atomic_path
from torch import nn

__all__ = [
    "CheckpointMismatchError",
    "AtomicCheckpointSaver",
    "BestMetricState",
    "ResumeCheckpointLoader",
    "NetworkCheckpointLoader",
    "atomic_torch_save",
    "read_checkpoint",
    "state_dict_fingerprint",
]


class CheckpointMismatchError(RuntimeError):
    """A checkpoint is unreadable, unsafe, or does not fit the network of the config; the message names the file."""


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file beside ``path`` then ``os.replace``: ``path`` is complete or untouched.

    Args:
        obj: what to save.
        path: destination file.
    """
    with atomic_path(path, suffix=".partial") as tmp:
        torch.save(obj, tmp)


class _AtomicDiskSaver(DiskSaver):
    """Ignite ``DiskSaver`` (rank 0 only) writing atomically, optionally to one fixed file name.

    With a fixed file name the previous checkpoint is replaced by the atomic rename, never deleted first: ignite
    removes the outdated file *before* writing the new one, which would leave no checkpoint if killed in between.
    """

    def __init__(self, dirname: str, filename: str | None = None) -> None:
        super().__init__(dirname=dirname, require_empty=False, atomic=True)
        self.filename = filename

    def __call__(self, checkpoint: Mapping, filename: str, metadata: Mapping | None = None) -> None:
        super().__call__(checkpoint, self.filename or filename, metadata)

    def _save_func(self, checkpoint: Mapping, path, func) -> None:
        atomic_torch_save(checkpoint, path)

    def remove(self, filename: str) -> None:
        if self.filename is None:
            super().remove(filename)


class AtomicCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose files are written atomically (temporary file, then rename).

    MONAI's saver writes in place (``DiskSaver(atomic=False)``) and deletes the previous best file before writing the
    new one, so a run killed at that moment leaves a truncated or missing ``models/*.pt``; this saver does not.
    As MONAI's, it writes on rank 0 only in a distributed run and unwraps ``DistributedDataParallel`` networks.

    Args:
        save_dir, save_dict, name, file_prefix, save_final, final_filename, save_key_metric, key_metric_name,
            key_metric_n_saved, key_metric_filename, key_metric_save_state, key_metric_greater_or_equal,
            key_metric_negative_sign, epoch_level, save_interval, n_saved: as MONAI's ``CheckpointSaver``.
        interval_filename: a fixed file name for the interval checkpoints (with ``n_saved`` 1: the last one),
            e.g. ``teacher_last.pt``; None for MONAI's ``checkpoint_epoch=N.pt`` names.
        engine_key: if set, the engine this handler is attached to (the trainer) is saved under this key too,
            so that a config can save its trainer's state without referring to the trainer from its own handlers.

    When it saves the key metric's best model and the evaluator already knows a best metric (restored by
    :class:`ResumeCheckpointLoader` through :class:`BestMetricState`), the saver starts from that value, so a resumed
    run replaces the best model only with a better one.
    """

    def __init__(
        self,
        save_dir: str,
        save_dict: dict,
        interval_filename: str | None = None,
        engine_key: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(save_dir=save_dir, save_dict=dict(save_dict), **kwargs)
        self.engine_key = engine_key
        self.key_metric_negative_sign = bool(kwargs.get("key_metric_negative_sign", False))
        self.key_metric_filename = kwargs.get("key_metric_filename")
        for checkpoint, filename in (
            (self._final_checkpoint, kwargs.get("final_filename")),
            (self._key_metric_checkpoint, kwargs.get("key_metric_filename")),
            (self._interval_checkpoint, interval_filename),
        ):
            if checkpoint is not None:
                checkpoint.save_handler = _AtomicDiskSaver(self.save_dir, filename)

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer or evaluator, as MONAI's ``CheckpointSaver``.

        Args:
            engine: the ignite engine.
        """
        if self.engine_key is not None:
            for checkpoint in (self._final_checkpoint, self._key_metric_checkpoint, self._interval_checkpoint):
                if checkpoint is not None:
                    checkpoint.to_save[self.engine_key] = engine
        if self._key_metric_checkpoint is not None:
            engine.add_event_handler(Events.STARTED, self._start_from_known_best)
        super().attach(engine)

    def _start_from_known_best(self, engine: Engine) -> None:
        checkpoint = self._key_metric_checkpoint
        if checkpoint._saved or getattr(engine.state, "best_metric_epoch", -1) in (-1, None):
            return
        best = float(engine.state.best_metric)
        priority = -best if self.key_metric_negative_sign else best
        name = self.key_metric_filename or "restored_best.pt"
        checkpoint._saved.append(Checkpoint.Item(priority, name))

    def state_dict(self) -> dict:
        """The key metric tracking list (see MONAI's ``load_state_dict``); empty when no key metric is saved."""
        return self._key_metric_checkpoint.state_dict() if self._key_metric_checkpoint is not None else {}


class BestMetricState:
    """The best validation metric of an evaluator (``best_metric``, ``best_metric_epoch``) as a checkpointable object.

    Args:
        evaluator: a MONAI evaluator with a key metric.
    """

    def __init__(self, evaluator: Engine) -> None:
        self.evaluator = evaluator

    def state_dict(self) -> dict[str, float | int]:
        """``{"best_metric": float, "best_metric_epoch": int}`` (-1, -1 before the first validation)."""
        return {
            "best_metric": float(self.evaluator.state.best_metric),
            "best_metric_epoch": int(self.evaluator.state.best_metric_epoch),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore the evaluator's best metric and its epoch.

        Args:
            state: as returned by :meth:`state_dict`.
        """
        self.evaluator.state.best_metric = float(state["best_metric"])
        self.evaluator.state.best_metric_epoch = int(state["best_metric_epoch"])


class ResumeCheckpointLoader(CheckpointLoader):
    """Resume a training run from its last checkpoint (written by :class:`AtomicCheckpointSaver`), when enabled.

    When ``enabled`` is False (the default of a config's ``resume``) the handler does nothing. When True, the
    checkpoint must exist; at the start of the run it restores every object of ``load_dict`` plus the trainer's
    state (epoch, iteration) under ``engine_key``, so the run continues with the next epoch up to ``max_epochs``.
    The file is read with ``weights_only=True``.

    Args:
        load_path: the last checkpoint, e.g. ``models/teacher_last.pt``.
        load_dict: the objects to restore, e.g. network, optimizer, lr scheduler, best metric state.
        enabled: whether to resume.
        engine_key: key of the trainer's state in the checkpoint.
        map_location: as ``torch.load``.

    Raises:
        FileNotFoundError: if ``enabled`` and ``load_path`` does not exist.
    """

    def __init__(
        self,
        load_path: str,
        load_dict: dict,
        enabled: bool = False,
        engine_key: str = "trainer",
        map_location: Any = None,
        name: str | None = "ResumeCheckpointLoader",
    ) -> None:
        if enabled and not os.path.isfile(load_path):
            raise FileNotFoundError(
                f"cannot resume: last checkpoint {load_path} not found (it is written at the end of every epoch); "
                "run without --resume true to start from scratch."
            )
        super().__init__(load_path=load_path, load_dict=dict(load_dict), name=name, map_location=map_location)
        self.enabled = enabled
        self.engine_key = engine_key

    def attach(self, engine: Engine) -> None:
        """Restore the run's state when ``engine`` starts, if enabled.

        Args:
            engine: the trainer.
        """
        if not self.enabled:
            return
        self.load_dict[self.engine_key] = engine
        super().attach(engine)

    def __call__(self, engine: Engine) -> None:
        super().__call__(engine)
        self.logger.info(f"resumed from {self.load_path}: epoch {engine.state.epoch} of {engine.state.max_epochs} done")


def read_checkpoint(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Read a checkpoint with ``weights_only=True``, with errors that name the file.

    Args:
        path: the checkpoint file.
        what: how to call the file in messages (``"checkpoint"``, ``"teacher checkpoint"``...).

    Returns:
        the loaded object.

    Raises:
        CheckpointMismatchError: if the file is missing, a TorchScript archive or a NIfTI image, corrupt, or refused
            by ``weights_only`` loading (pickled code or objects other than tensors and containers).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointMismatchError(f"{what} {path} not found.")
    kind = _other_file_kind(path)
    if kind is not None:
        raise CheckpointMismatchError(
            f"{what} {path} is {kind}, not a checkpoint of network weights (a state dict saved with torch.save, "
            "as models/model.pt); pass the .pt checkpoint instead."
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointMismatchError(
            f"{what} {path} is refused: it holds more than tensors (pickled code or objects), which safe loading "
            f"(weights_only=True) does not run ({first})."
        ) from e
    except Exception as e:
        raise CheckpointMismatchError(f"cannot read {what} {path} (corrupt or truncated?): {e}") from e


_NIFTI_MAGIC = {344: (b"n+1\x00", b"ni1\x00"), 4: (b"n+2\x00", b"ni2\x00")}  # header offset -> NIfTI-1/-2 magic


def _other_file_kind(path: str) -> str | None:
    """What a file given as a checkpoint is instead, when it is a known other format: TorchScript or NIfTI."""
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as archive:
            if any("/code/" in name or name.endswith("/constants.pkl") for name in archive.namelist()):
                return "a TorchScript archive (as models/model.ts, for deployment)"
        return None
    with open(path, "rb") as file:
        start = file.read(2)
    try:
        opener = gzip.open if start == b"\x1f\x8b" else open
        with opener(path, "rb") as file:
            header = file.read(348)
    except (OSError, EOFError):
        return None
    if any(header[offset : offset + 4] in magics for offset, magics in _NIFTI_MAGIC.items()):
        return "a NIfTI image"
    return None


def state_dict_fingerprint(network: nn.Module) -> str:
    """SHA-1 of a network's state dict (names, shapes, dtypes and values): equal fingerprints, equal weights.

    Args:
        network: any module.

    Returns:
        the hex digest.
    """
    digest = hashlib.sha1()
    for name, value in network.state_dict().items():
        digest.update(f"{name}:{tuple(value.shape)}:{value.dtype}".encode())
        digest.update(value.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _network_state(checkpoint: Any, key: str, path: str, what: str) -> Mapping[str, torch.Tensor]:
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get(key), Mapping):
        checkpoint = checkpoint[key]
    if not isinstance(checkpoint, Mapping) or not all(isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointMismatchError(f"{what} {path} holds no network state dict.")
    return checkpoint


def check_network_checkpoint(
    network: nn.Module,
    path: str,
    key: str = "model",
    what: str = "checkpoint",
    max_keys: int = 5,
    config_id: str = "network_def",
) -> Mapping[str, torch.Tensor]:
    """Check that a checkpoint fits a network, with a message that says what differs.

    The first weight of the network tells its input channels (``in_channels``, one per entry of ``modalities``)
    and the last its output channels (``num_classes``); a difference there is reported as such rather than as a
    list of size mismatches.

    Args:
        network: the network of the config (a ``DistributedDataParallel`` wrapper is unwrapped).
        path: the checkpoint file.
        key: the entry holding the weights when the checkpoint holds more than the network.
        what: how to call the file in messages.
        max_keys: how many mismatching keys a message lists.
        config_id: the config id defining ``network``, named in messages.

    Returns:
        the checkpoint's network state dict.

    Raises:
        CheckpointMismatchError: naming the file, if it cannot be read safely, does not fit ``network``, or holds
            NaN or infinite weights (naming the tensors).
    """
    network = getattr(network, "module", network)
    state = _network_state(read_checkpoint(path, what), key, path, what)
    expected = network.state_dict()
    weights = [k for k, v in expected.items() if v.ndim >= 2]
    if weights and all(k in state for k in (weights[0], weights[-1])):
        first, last = weights[0], weights[-1]
        # a depthwise first conv has shape (in, 1, k, k); a plain one (out, in, ...)
        in_dim = 0 if expected[first].shape[1] == 1 else 1
        if state[first].ndim == expected[first].ndim and state[first].shape[in_dim] != expected[first].shape[in_dim]:
            raise CheckpointMismatchError(
                f"{what} {path} was trained on {state[first].shape[in_dim]} input channels but the config's network "
                f"takes {expected[first].shape[in_dim]} (in_channels/modalities mismatch: set --modalities to the "
                f"{state[first].shape[in_dim]} sequences the checkpoint was trained on, or use a matching checkpoint)."
            )
        if state[last].ndim == expected[last].ndim and state[last].shape[0] != expected[last].shape[0]:
            raise CheckpointMismatchError(
                f"{what} {path} predicts {state[last].shape[0]} classes but the config's network "
                f"{expected[last].shape[0]} (out_channels/num_classes mismatch: set --num_classes "
                f"{state[last].shape[0]})."
            )
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [
        f"{k} {list(state[k].shape)} vs {list(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or wrong:
        details = [
            f"{name} ({len(keys)}): {', '.join(keys[:max_keys])}{', ...' if len(keys) > max_keys else ''}"
            for name, keys in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatch", wrong))
            if keys
        ]
        raise CheckpointMismatchError(
            f"{what} {path} does not fit {config_id} ({type(network).__name__}: other channel widths or depth?); "
            + "; ".join(details)
        )
    non_finite = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        raise CheckpointMismatchError(
            f"{what} {path} holds NaN or infinite weights in {len(non_finite)} tensor(s) "
            f"({', '.join(non_finite[:max_keys])}{', ...' if len(non_finite) > max_keys else ''}): the training that "
            "wrote it diverged; use another checkpoint or train again."
        )
    return state


class NetworkCheckpointLoader(CheckpointLoader):
    """MONAI's ``CheckpointLoader`` for network weights, checking the file first (see :func:`check_network_checkpoint`).

    A checkpoint that cannot be read safely (``weights_only=True``) or was trained for other sequences or classes
    stops the run when it starts, before any case is processed, with a message naming the file, instead of a raw
    unpickling error or a ``size mismatch`` dump.

    Args:
        load_path: the checkpoint, e.g. ``models/model.pt``.
        load_dict: ``{"model": network}``.
        map_location: as ``torch.load``.
        name: logger name.
    """

    def __init__(self, load_path: str, load_dict: dict, map_location: Any = None, name: str | None = None) -> None:
        super().__init__(load_path=load_path, load_dict=load_dict, map_location=map_location, name=name)

    def __call__(self, engine: Engine) -> None:
        key, network = next(iter(self.load_dict.items()))
        check_network_checkpoint(network, self.load_path, key=key)
        super().__call__(engine)
