# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Fast slice-by-slice inference of a 2D network over a 3D volume: only the brain's slices, only its bounding box.

``BrainSliceInferer`` is what ``configs/inference.json`` (and so MONAI Label) uses by default. It gives the
same output as MONAI's ``SliceInferer(roi_size=(-1, -1), spatial_dim=2)`` on the same network, up to float
tolerance, with these exact shortcuts:

- the network is prepared for inference once per call: a copy with every BatchNorm folded into the convolution
  before it (``fold_batchnorm``; a ``SeparableUNet`` also loses its decoder's concatenations, see
  ``SeparableUNetForInference``) and, on request, channels-last memory (oneDNN's fast layout for depthwise
  convolutions on CPU);
- slices without brain (every input channel 0, as z-scoring with ``nonzero=True`` leaves background) are not run:
  the network's output on an all-zero slice is computed once and copied there, which is exactly what the plain path
  computes for them;
- consecutive brain slices are batched ``sw_batch_size`` at a time, each batch a view of the volume (no copy by index);
- optionally (``backend="onnxruntime"``, CPU only, ``pip install onnxruntime onnx``) the prepared network is exported to
  ONNX once per set of weights and run by ONNX Runtime instead of PyTorch (``tools.benchmark`` times both; on
  the 2-core machine of ``docs/benchmark`` PyTorch's channels-last path is the faster one, hence the default).

With ``crop_to_brain=True`` (the default of ``configs/inference.json``) each batch of brain slices is also cropped
in plane to the bounding box of its brain voxels plus ``margin`` voxels, aligned to the network's ``divisor`` grid;
voxels outside the box get the all-zero slice's output. This one is not exact: the convolutions' zero padding at
the box's edge replaces the background features the full slice would give, so logits near the box's edge move a
little. Its effect on the label map is measured by ``tools.benchmark`` and tested; ``crop_to_brain=False`` keeps
the result exact.
"""

from __future__ import annotations

import copy
import functools
import io
import math
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from monai.inferers import Inferer
from monai.utils import convert_to_dst_type, optional_import
from monai.utils.type_conversion import dtype_torch_to_numpy
from scripts.checkpoints import state_dict_fingerprint
from scripts.separable_unet import SeparableUNet
from scripts.separable_unet_inference import SeparableUNetForInference
from torch import nn
from torch.nn.utils.fusion import fuse_conv_bn_eval

ort, _has_ort = optional_import("onnxruntime")
_, _has_onnx = optional_import("onnx")  # torch.onnx.export serialises the model with it
has_onnxruntime = _has_ort and _has_onnx  # what the "onnxruntime" backend needs
ONNX_MISSING = "BrainSliceInferer backend 'onnxruntime' needs ONNX Runtime and ONNX: pip install onnxruntime onnx"

__all__ = [
    "BACKENDS",
    "BrainSliceInferer",
    "OnnxRuntimeNetwork",
    "brain_bounding_box",
    "empty_output",
    "fold_batchnorm",
    "prepare_for_inference",
]

BACKENDS = ("torch", "onnxruntime")


def _last_conv(module: nn.Module) -> nn.Conv2d | None:
    """The ``Conv2d`` whose output ``module`` returns, if ``module`` is one or a ``Sequential`` ending in one."""
    while isinstance(module, nn.Sequential) and len(module) > 0:
        module = module[-1]
    return module if type(module) is nn.Conv2d else None


def fold_batchnorm(network: nn.Module) -> int:
    """Fold, in place, every eval-mode ``BatchNorm2d`` into the ``Conv2d`` that feeds it inside an ``nn.Sequential``.

    The convolution's weight and bias absorb the normalisation and the BatchNorm becomes ``nn.Identity``, so the
    network computes the same function with one memory-bound pass less per block. Only a BatchNorm directly after
    a ``Conv2d`` (or after a ``Sequential`` ending in one, such as a separable convolution) in the same
    ``Sequential`` is folded.

    Args:
        network: a network in eval mode.

    Returns:
        the number of BatchNorm layers folded.

    Raises:
        ValueError: when ``network`` is in training mode (its BatchNorm layers use batch statistics then).
    """
    if network.training:
        raise ValueError("fold_batchnorm needs a network in eval mode (call network.eval() first).")
    folded = 0
    for parent in network.modules():
        if not isinstance(parent, nn.Sequential):
            continue
        for index in range(1, len(parent)):
            norm, conv = parent[index], _last_conv(parent[index - 1])
            if type(norm) is nn.BatchNorm2d and conv is not None and norm.track_running_stats:
                fused = fuse_conv_bn_eval(conv, norm)
                conv.weight, conv.bias = fused.weight, fused.bias
                parent[index] = nn.Identity()
                folded += 1
    return folded


def prepare_for_inference(network: nn.Module, channels_last: bool = True) -> nn.Module:
    """A copy of ``network`` made fast for inference: BatchNorm folded, optionally in channels-last memory format.

    A ``SeparableUNet`` is rebuilt as ``SeparableUNetForInference`` (BatchNorm folded, and no concatenation in its
    decoder); any other network is copied with ``fold_batchnorm`` applied. A ``DistributedDataParallel`` wrapper is
    unwrapped (inference needs no gradient synchronisation). A TorchScript module, or a network in training mode,
    is returned unchanged (nothing can be folded safely).

    Args:
        network: the 2D network.
        channels_last: store the copy's 4D weights channels-last.

    Returns:
        the prepared copy (or ``network`` itself, see above).
    """
    network = network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network
    if isinstance(network, torch.jit.ScriptModule) or network.training:
        return network
    if isinstance(network, SeparableUNet):
        prepared = SeparableUNetForInference(network)
    else:
        prepared = copy.deepcopy(network)
        fold_batchnorm(prepared)
    if channels_last:
        prepared = prepared.to(memory_format=torch.channels_last)
    return prepared


def empty_output(shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor of ``shape`` with the dtype and device of ``like``, for a whole inferred volume.

    On CPU it is allocated by NumPy, which asks Linux for transparent huge pages for large arrays (``madvise``, NumPy's
    default). The first write into a fresh 140 MB output then takes a quarter of the time it takes with PyTorch's
    allocator, whose 4 KiB pages each fault on first touch (9 against 31 ms on the machine of ``docs/benchmark``).
    The first few such outputs of a process cost more while the kernel assembles huge pages (0.05 to 0.2 s each
    there), so the gain is for processes that segment many volumes (MONAI Label, a dataset, validation). Dtypes
    NumPy lacks (bfloat16) and other devices get ``torch.empty``.

    Args:
        shape: the output's shape.
        like: a tensor of the wanted dtype and device.

    Returns:
        the uninitialised tensor (contiguous).
    """
    if like.device.type == "cpu":
        try:
            return torch.from_numpy(np.empty(tuple(shape), dtype=dtype_torch_to_numpy(like.dtype)))
        except TypeError:  # MONAI's mapping has no NumPy dtype for it
            pass
    return torch.empty(tuple(shape), dtype=like.dtype, device=like.device)


def _grid_span(low: int, high: int, size: int, margin: int, divisor: int) -> slice:
    """``[low, high]`` widened by ``margin``, its start on the ``divisor`` grid, its length a multiple of it."""
    start = max(0, low - margin) // divisor * divisor
    length = math.ceil((min(size, high + 1 + margin) - start) / divisor) * divisor
    stop = min(size, start + length)
    return slice(max(0, stop - length), stop)


def brain_bounding_box(brain: torch.Tensor, margin: int, divisor: int) -> tuple[slice, slice] | None:
    """In-plane bounding box of the brain voxels of a stack of slices, widened and aligned for the network.

    Args:
        brain: boolean mask of shape (H, W, D), true on brain voxels.
        margin: voxels added on every side of the box.
        divisor: the box starts on multiples of ``divisor`` and its sides are multiples of it (within (H, W)).

    Returns:
        ``(rows, columns)`` slices of the box, or None when the mask is empty.
    """
    return _occupied_box(brain.any(dim=(1, 2)), brain.any(dim=(0, 2)), margin, divisor)


def _occupied_box(rows: torch.Tensor, columns: torch.Tensor, margin: int, divisor: int) -> tuple[slice, slice] | None:
    """``brain_bounding_box`` of a mask given as its occupied rows (H,) and columns (W,)."""
    if not bool(rows.any()):
        return None
    row_index, column_index = torch.nonzero(rows).flatten(), torch.nonzero(columns).flatten()
    return (
        _grid_span(int(row_index[0]), int(row_index[-1]), rows.shape[0], margin, divisor),
        _grid_span(int(column_index[0]), int(column_index[-1]), columns.shape[0], margin, divisor),
    )


class OnnxRuntimeNetwork:
    """A 2D network exported to ONNX and run by ONNX Runtime on CPU, called like the network on (N, C, H, W).

    Args:
        network: the network, in eval mode (exported as it is: prepare it first, e.g. with BatchNorm folded).
        in_channels: channels of its input.
        num_threads: ONNX Runtime's intra-op threads (default: PyTorch's ``torch.get_num_threads()``).

    Raises:
        ImportError: if ``onnxruntime`` or ``onnx`` is not installed.
    """

    def __init__(self, network: nn.Module, in_channels: int, num_threads: int | None = None) -> None:
        if not has_onnxruntime:
            raise ImportError(ONNX_MISSING)
        buffer = io.BytesIO()
        example = torch.zeros(1, in_channels, 32, 32)
        with warnings.catch_warnings():  # the tracer warns about the network's own shape check, which stays valid
            warnings.simplefilter("ignore")
            torch.onnx.export(
                network.cpu(),
                (example,),
                buffer,
                input_names=["image"],
                output_names=["logits"],
                dynamic_axes={
                    "image": {0: "batch", 2: "height", 3: "width"},
                    "logits": {0: "batch", 2: "height", 3: "width"},
                },
                opset_version=17,
                dynamo=False,
            )
        options = ort.SessionOptions()
        options.intra_op_num_threads = num_threads or torch.get_num_threads()
        self.session = ort.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    def __call__(self, slices: torch.Tensor) -> torch.Tensor:
        """Logits of (N, C, H, W) float32 CPU slices."""
        array = slices.detach().to(torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run(None, {"image": array})[0])


class BrainSliceInferer(Inferer):
    """Run a 2D network on the axial slices of (B, C, H, W, D) volumes, skipping slices and voxels without brain.

    Args:
        sw_batch_size: slices per forward pass.
        crop_to_brain: crop each batch of brain slices in plane to their brain's bounding box (see the module's
            docstring: not exact near the box's edge).
        margin: voxels of background kept around the brain's bounding box.
        divisor: the network's size divisor (``2 ** number of poolings``); cropped boxes are aligned to it.
        channels_last: run the network on channels-last tensors.
        fold_bn: prepare the network with ``prepare_for_inference``: BatchNorm folded into convolutions, and a
            ``SeparableUNet`` run as ``SeparableUNetForInference``.
        backend: ``torch``, or ``onnxruntime`` (CPU inputs and an ``nn.Module`` in eval mode; the ONNX export is
            kept while the network's weights stay the same).

    Raises:
        ValueError: on inputs that are not 5D, on a non-positive ``sw_batch_size``, ``margin`` < 0, ``divisor``
            < 1, an unknown ``backend``, or the ``onnxruntime`` backend asked for CUDA inputs.
        ImportError: when the ``onnxruntime`` backend is asked for but ONNX Runtime or ONNX is not installed.
    """

    def __init__(
        self,
        sw_batch_size: int = 1,
        crop_to_brain: bool = True,
        margin: int = 8,
        divisor: int = 16,
        channels_last: bool = True,
        fold_bn: bool = True,
        backend: str = "torch",
    ) -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}.")
        if backend == "onnxruntime" and not has_onnxruntime:
            raise ImportError(ONNX_MISSING)
        if sw_batch_size < 1 or margin < 0 or divisor < 1:
            raise ValueError(
                f"BrainSliceInferer needs sw_batch_size >= 1, margin >= 0 and divisor >= 1; got {sw_batch_size}, "
                f"{margin} and {divisor}."
            )
        self.sw_batch_size = sw_batch_size
        self.crop_to_brain = crop_to_brain
        self.margin = margin
        self.divisor = divisor
        self.channels_last = channels_last
        self.fold_bn = fold_bn
        self.backend = backend
        self._onnx: tuple[str, OnnxRuntimeNetwork] | None = None  # (weights fingerprint, exported network)

    def _network_input(self, slices: torch.Tensor) -> torch.Tensor:
        if self.channels_last and self.backend == "torch":
            return slices.contiguous(memory_format=torch.channels_last)
        return slices.contiguous()

    def _onnxruntime_network(self, network: nn.Module, in_channels: int) -> OnnxRuntimeNetwork:
        """The ONNX Runtime copy of the prepared ``network``, exported again only when its weights change."""
        if not isinstance(network, nn.Module) or isinstance(network, torch.jit.ScriptModule) or network.training:
            raise ValueError("BrainSliceInferer backend 'onnxruntime' needs an nn.Module in eval mode.")
        fingerprint = state_dict_fingerprint(network)
        if self._onnx is None or self._onnx[0] != fingerprint:
            prepared = prepare_for_inference(network, channels_last=False) if self.fold_bn else network
            self._onnx = (fingerprint, OnnxRuntimeNetwork(prepared, in_channels))
        return self._onnx[1]

    def _prepared_network(self, network: Any, inputs: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.backend == "onnxruntime":
            if inputs.device.type != "cpu":
                raise ValueError("BrainSliceInferer backend 'onnxruntime' runs on CPU; use backend 'torch' on CUDA.")
            return self._onnxruntime_network(network, inputs.shape[1])
        if self.fold_bn:
            return prepare_for_inference(network, self.channels_last)
        if self.channels_last and isinstance(network, nn.Module) and not isinstance(network, torch.jit.ScriptModule):
            return copy.deepcopy(network).to(memory_format=torch.channels_last)
        return network

    def _slice_batches(self, has_brain: torch.Tensor) -> list[slice]:
        """Consecutive brain slices, ``sw_batch_size`` at most per batch, a batch never spanning a slice without brain.

        Ranges rather than lists of indices make each batch a view of the volume and of the output: no indexing
        copies.
        """
        batches: list[slice] = []
        padded = torch.nn.functional.pad(has_brain.to(torch.int8), (1, 1))
        edges = torch.nonzero(padded[1:] != padded[:-1]).flatten().tolist()  # run starts and stops, alternating
        for run_start, run_stop in zip(edges[::2], edges[1::2]):
            for start in range(run_start, run_stop, self.sw_batch_size):
                batches.append(slice(start, min(start + self.sw_batch_size, run_stop)))
        return batches

    def _segment_brain(
        self, network: Callable[[torch.Tensor], torch.Tensor], volume: torch.Tensor, output: torch.Tensor
    ) -> None:
        """Write the logits of the brain slices of one (C_in, H, W, D) volume into ``output`` (C_out, H, W, D)."""
        brain = functools.reduce(torch.logical_or, [channel != 0 for channel in volume])  # (H, W, D)
        brain_bytes = brain.view(torch.uint8)  # max over uint8 is ~10x faster than any() over bool here
        rows_by_slice, columns_by_slice = brain_bytes.amax(dim=1).bool(), brain_bytes.amax(dim=0).bool()  # (H|W, D)
        slices = volume.permute(3, 0, 1, 2)  # (D, C_in, H, W), a view
        for batch in self._slice_batches(rows_by_slice.any(dim=0)):
            rows, columns = slice(0, volume.shape[1]), slice(0, volume.shape[2])
            if self.crop_to_brain:  # every batch holds brain, so it has a box
                rows_in_batch, columns_in_batch = (
                    rows_by_slice[:, batch].any(dim=1),
                    columns_by_slice[:, batch].any(dim=1),
                )
                rows, columns = _occupied_box(rows_in_batch, columns_in_batch, self.margin, self.divisor)
            logits = network(self._network_input(slices[batch, :, rows, columns]))
            output[:, rows, columns, batch] = logits.permute(1, 2, 3, 0).to(output.dtype)

    def __call__(self, inputs: torch.Tensor, network: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Segment ``inputs`` of shape (B, C, H, W, D) with the 2D ``network``.

        Args:
            inputs: a batch of volumes; a ``MetaTensor``'s metadata is kept on the output.
            network: a 2D network taking (N, C, H, W).
            args: unused (for the ``Inferer`` interface).
            kwargs: unused (for the ``Inferer`` interface).

        Returns:
            the logits, (B, C_out, H, W, D), of the type of ``inputs``.

        Raises:
            ValueError: when ``inputs`` is not 5D.
        """
        if inputs.ndim != 5:
            raise ValueError(f"BrainSliceInferer expects (B, C, H, W, D) volumes, got shape {tuple(inputs.shape)}.")
        network = self._prepared_network(network, inputs)
        volumes = inputs.as_tensor() if hasattr(inputs, "as_tensor") else inputs
        num_volumes, in_channels, height, width, depth = volumes.shape
        empty_logits = network(self._network_input(volumes.new_zeros((1, in_channels, height, width))))[0]
        outputs = empty_output((num_volumes, *empty_logits.shape, depth), empty_logits)
        outputs.copy_(empty_logits[None, ..., None].expand(outputs.shape))  # the output of every empty slice
        for volume, output in zip(volumes, outputs):
            self._segment_brain(network, volume, output)
        return convert_to_dst_type(outputs, inputs)[0]

    def __repr__(self) -> str:
        fields: Sequence[str] = (
            "sw_batch_size", "crop_to_brain", "margin", "divisor", "channels_last", "fold_bn", "backend"
        )  # fmt: skip
        return f"{type(self).__name__}({', '.join(f'{name}={getattr(self, name)}' for name in fields)})"
