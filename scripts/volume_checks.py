# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Checks of one case's volumes as read from disk: dimensionality, intensities, voxel size and header geometry.

One rule for all of them, as in the README's bad-input table: a volume that cannot be read one way only, or whose
values cannot be used, is refused (``BraTSDataError``, naming the case and the file); a volume that can be read but
is far from what the networks were trained on (skull-stripped, zero background, 1 mm voxels, no dominant outlier)
gets a warning naming the case and the file, and is processed as it is.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Sequence

import nibabel as nib
import numpy as np
import torch
from scripts.brats_data import BraTSDataError

__all__ = [
    "GEOMETRY_ATOL_MM",
    "MIN_ZERO_SHARE",
    "OUTLIER_SPREAD_RATIO",
    "SPACING_RANGE_MM",
    "check_header_geometry",
    "check_intensities",
    "check_volume_shape",
    "warn_case",
]

# the in-plane voxel size (mm) the networks expect: BraTS volumes are resampled to 1 mm
SPACING_RANGE_MM = (0.8, 1.25)
# sform and qform closer than this (mm, any affine entry) are one geometry
GEOMETRY_ATOL_MM = 1e-3
# skull-stripped BraTS sequences are 0 on 80-87% of their voxels; a sequence 0 on fewer than 1% has no zero background
MIN_ZERO_SHARE = 0.01
# the standard deviation of a sequence's brain voxels over that of its 0.1-99.9 percentile range: at most 1.06 on the
# shared real cases; above 2, a few voxels set the z-scoring scale and flatten the rest of the sequence
OUTLIER_SPREAD_RATIO = 2.0
_TRIM_SHARE = 0.001  # of the brain voxels, at each end
_SAMPLE_SIZE = 200_000  # voxels sampled for the percentiles (about 35,000 brain voxels of a BraTS volume)
_CONSTANT_RTOL = 1e-5  # the mean of a constant sequence's non-zero voxels, from float32 var_mean, is this close
_FLOAT32_MAX = float(torch.finfo(torch.float32).max)
_LOGGER = logging.getLogger(__name__)


def warn_case(message: str) -> None:
    """Report one input that is processed although it is off the networks' training distribution.

    Args:
        message: names the case and the file.
    """
    warnings.warn(message, UserWarning, stacklevel=3)
    _LOGGER.warning(message)


def check_volume_shape(volume: torch.Tensor, path: str, case_id: str, what: str, channels: int | None = 1) -> None:
    """Refuse a file that is not a 3D volume (with ``channels`` channels) once read channel-first.

    Args:
        volume: the file as read channel-first (``LoadImage(ensure_channel_first=True)``).
        path: the file, for messages.
        case_id: the case, for messages.
        what: what the file should hold (``"a sequence"``, ``"the label"``, ...), for messages.
        channels: the number of volumes the file must hold; None for any (an MSD 4D image).

    Raises:
        BraTSDataError: naming the case and the file, with the file's own shape.
    """
    if volume.ndim == 4 and (channels is None or volume.shape[0] == channels):
        return
    shape = list(nib.load(path).shape)
    if volume.ndim != 4:
        raise BraTSDataError(
            f"case {case_id}: {path} holds a {len(shape)}D array of shape {shape}, but {what} must be a 3D volume "
            "(x, y, z); convert the file or remove the case."
        )
    raise BraTSDataError(
        f"case {case_id}: {path} holds {volume.shape[0]} volumes (shape {shape}), but {what} must be one 3D "
        "volume; keep one volume per file or remove the case."
    )


def check_intensities(sequences: torch.Tensor, paths: Sequence[str], case_id: str) -> None:
    """Check each sequence's voxel values before z-scoring (``NormalizeIntensityd(nonzero=True)``).

    The mean and standard deviation of the non-zero voxels come from one pass over the volume (``torch.var_mean``);
    the 0.1-99.9 percentile range that tells the bulk of the values from a few outliers comes from a regular sample
    of about ``_SAMPLE_SIZE`` voxels. An all-zero case is left to the empty-brain handling of ``scripts.brats_output``.

    Args:
        sequences: (C, x, y, z) voxel values, one channel per sequence.
        paths: the file of each channel, for messages.
        case_id: the case, for messages.

    Raises:
        BraTSDataError: naming the case and the file, if a sequence holds NaN or infinite values, or values too large
            for z-scoring in float32 (their mean or standard deviation overflows).
    """
    for sequence, path in zip(sequences, paths):
        voxels = sequence.reshape(-1)
        n = int(torch.count_nonzero(voxels))
        mean, deviations = _nonzero_mean_and_deviations(voxels, n, path, case_id)
        low, high = (float(v) for v in torch.aminmax(voxels))
        value = high if high > 0 else low  # the value of a constant sequence's non-zero voxels
        if low in (0.0, value) and high in (0.0, value) and math.isclose(mean, value, rel_tol=_CONSTANT_RTOL):
            voxels_are = f"every non-zero voxel of {path} is {value:g}" if n else f"every voxel of {path} is 0"
            if sequences.any():  # an all-zero case is an empty brain (scripts.brats_output)
                warn_case(
                    f"case {case_id}: {voxels_are}, so the sequence carries no image (a missing sequence filled "
                    "in?); the segmentation of this case is unreliable."
                )
            continue
        zero_share = 1.0 - n / voxels.numel()
        if zero_share < MIN_ZERO_SHARE:
            warn_case(
                f"case {case_id}: only {100 * zero_share:.2f}% of the voxels of {path} are 0, so its background is "
                "not 0 (not skull-stripped, or shifted intensities) and the whole volume is taken as brain; "
                "skull-strip it and set the background to 0 as in BraTS, or expect a wrong segmentation."
            )
        sample = voxels[:: max(1, voxels.numel() // _SAMPLE_SIZE)]
        sample = sample[sample != 0]
        if sample.numel() < 2:
            continue
        n_trim = max(1, int(_TRIM_SHARE * sample.numel())) if sample.numel() > 2 else 0
        bulk_low, bulk_high = sample.kthvalue(n_trim + 1).values, sample.kthvalue(sample.numel() - n_trim).values
        bulk_std = float(sample[(sample >= bulk_low) & (sample <= bulk_high)].double().std())
        std = (deviations / max(n - 1, 1)) ** 0.5
        if std > OUTLIER_SPREAD_RATIO * bulk_std:
            warn_case(
                f"case {case_id}: a few voxels of {path} (up to {high:.6g}, while 99.9% are at most about "
                f"{float(bulk_high):.6g}) set its intensity scale: z-scoring compresses the rest of the sequence "
                f"{std / bulk_std:.1f}-fold; clip the outliers or expect a wrong segmentation."
            )


def _nonzero_mean_and_deviations(voxels: torch.Tensor, n: int, path: str, case_id: str) -> tuple[float, float]:
    """The mean of the ``n`` non-zero voxels and the sum of their squared deviations from it (0, 0 when n is 0).

    Raises:
        BraTSDataError: for NaN or infinite voxels, or a mean or standard deviation that overflows float32.
    """
    if n == 0:
        return 0.0, 0.0
    var, mean = (float(v) for v in torch.var_mean(voxels))  # over every voxel, zeros included
    if not math.isfinite(mean):
        if not bool(torch.isfinite(voxels).all()):
            raise BraTSDataError(f"case {case_id}: {path} holds NaN or infinite voxel values.")
        raise _too_large(voxels, path, case_id)
    total = voxels.numel()
    if abs(mean) * total > _FLOAT32_MAX:  # z-scoring's float32 sum, and with it the mean, would overflow
        raise _too_large(voxels, path, case_id)
    mean_nonzero = mean * total / n
    if math.isfinite(var):
        squares = var * (total - 1) + total * mean**2
        return mean_nonzero, max(squares - n * mean_nonzero**2, 0.0)
    std = float(voxels[voxels != 0].std())  # float32 var overflows before std does: compute std as z-scoring does
    if not math.isfinite(std):
        raise _too_large(voxels, path, case_id)
    return mean_nonzero, std**2 * (n - 1)


def _too_large(voxels: torch.Tensor, path: str, case_id: str) -> BraTSDataError:
    return BraTSDataError(
        f"case {case_id}: {path} holds values up to {float(voxels.abs().max()):.3g}, too large to z-score in "
        "float32 (their sum or standard deviation overflows); rescale the file or remove the case."
    )


def check_header_geometry(paths: Sequence[str], case_id: str) -> None:
    """Warn about a voxel size far from 1 mm in-plane, or a header whose sform and qform disagree.

    The networks segment axial slices (the first two voxel axes) of 1 mm volumes; nothing is resampled. The files
    of a case share one affine (checked by the loader), so the voxel size is read from the first. When a header's
    sform and qform are both set and disagree, nibabel (and so the bundle) uses the sform, and the segmentation is
    written with it.

    Args:
        paths: the case's NIfTI files, the first one giving the voxel size.
        case_id: the case, for messages.
    """
    headers = {path: nib.load(path).header for path in dict.fromkeys(paths)}
    first = next(iter(headers))
    spacing = np.linalg.norm(headers[first].get_best_affine()[:3, :3], axis=0)
    low, high = SPACING_RANGE_MM
    if not all(low <= s <= high for s in spacing[:2]):
        warn_case(
            f"case {case_id}: {first} has {spacing[0]:.3g} x {spacing[1]:.3g} mm voxels in-plane, but the networks "
            f"were trained on 1 mm voxels (accepted {low}-{high} mm) and nothing is resampled; resample the case "
            "to 1 mm first (e.g. MONAI's Spacingd) or expect a worse segmentation."
        )
    for path, header in headers.items():
        sform, sform_code = header.get_sform(coded=True)
        qform, qform_code = header.get_qform(coded=True)
        if sform_code and qform_code and not np.allclose(sform, qform, atol=GEOMETRY_ATOL_MM):
            difference = float(np.abs(sform - qform).max())
            warn_case(
                f"case {case_id}: the sform and qform of {path} disagree (by up to {difference:.3g} mm); the sform "
                "is used, as nibabel does, and the segmentation is written with it: check its placement in your "
                "viewer, or fix the header."
            )
