# Copyright (c) the BraTS distillation bundle authors. Licensed under the Apache License, Version 2.0.
"""Package the trained bundle as a MONAI Model Zoo release zip that ``python -m monai.bundle download`` accepts.

The zip ``<output_dir>/<name>_v<version>.zip`` holds one top-level folder ``<name>/`` with ``configs/``,
``scripts/`` (``*.py`` only), ``docs/``, ``models/`` (``model.pt``, its TorchScript export ``model.ts`` as Model
Zoo bundles publish it, and ``teacher.pt`` when present), ``LICENSE`` and a ``large_files.yml`` recording the url
and md5 of each packaged weights file: what the bundle runs, and none of the developer tools (``tools/``), tests or
build files. ``model.ts`` is exported from ``model.pt`` while packaging, with ``monai.bundle ckpt_export`` and
``configs/inference.json``, so it always holds the packaged weights. MONAI's ``download --url``
saves the zip as ``<bundle_dir>/<name>.zip`` and extracts it into ``<bundle_dir>``, so the bundle lands in
``<bundle_dir>/<name>/`` (the layout ``--source github`` also expects of ``<name>_v<version>.zip`` assets).

Usage, from the bundle root::

    python -m tools.package_bundle --output_dir dist
    python -m monai.bundle download --name brats_kd_segmentation --url <url of the zip> --bundle_dir <dir>

The zip is reproducible (sorted entries, fixed timestamps), so packaging the same files twice gives the same md5.
``monai.bundle download --url`` does not check a hash; ``monai.apps.download_url(url, filepath, hash_val=<md5>,
hash_type="md5")`` downloads the zip and checks the md5 printed here.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

from scripts.atomic_files import atomic_path

__all__ = [
    "DEFAULT_BASE_URL",
    "DEFAULT_NAME",
    "TORCHSCRIPT",
    "WEIGHTS",
    "export_torchscript",
    "file_md5",
    "large_files_yaml",
    "package_bundle",
]

DEFAULT_NAME = "brats_kd_segmentation"
# Placeholder: replace OWNER with the GitHub account that publishes the release (or pass --base_url).
DEFAULT_BASE_URL = "https://github.com/OWNER/brats_kd_segmentation/releases/download/v{version}"
# checkpoints packaged from models/, and whether each is required
WEIGHTS = {"models/model.pt": True, "models/teacher.pt": False}
TORCHSCRIPT = "models/model.ts"  # exported from models/model.pt while packaging
REQUIRED_FILES = ("configs/metadata.json", "LICENSE")
_NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]+$")
_ZIP_DATE = (1980, 1, 1, 0, 0, 0)  # fixed timestamp: the zip's md5 depends on the files' content only


def file_md5(path: str | os.PathLike) -> str:
    """md5 hex digest of a file, read in 1 MiB chunks.

    Args:
        path: the file.

    Returns:
        The 32-character hex digest.
    """
    digest = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def large_files_yaml(entries: list[dict[str, str]]) -> str:
    """Model Zoo ``large_files.yml`` text for ``entries``.

    Args:
        entries: dicts with keys ``path``, ``url``, ``hash_val`` and ``hash_type``.

    Returns:
        YAML text: a ``large_files:`` list, one mapping per entry, values double-quoted.
    """
    lines = ["large_files:"]
    for entry in entries:
        keys = ("path", "url", "hash_val", "hash_type")
        lines += [f"  {'-' if i == 0 else ' '} {key}: {json.dumps(entry[key])}" for i, key in enumerate(keys)]
    return "\n".join(lines) + "\n"


def _files_under(root: Path, folder: str, suffix: str = "") -> Iterator[tuple[Path, str]]:
    """(source path, archive name relative to the bundle root) of the files under ``root/folder``, sorted."""
    base = root / folder
    if not base.is_dir():
        return
    for path in sorted(base.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or "__pycache__" in rel.parts or any(p.startswith(".") for p in rel.parts):
            continue
        if suffix and path.suffix != suffix:
            continue
        yield path, rel.as_posix()


def _write_member(archive: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=_ZIP_DATE)
    info.compress_type = zipfile.ZIP_DEFLATED
    info.external_attr = 0o644 << 16
    archive.writestr(info, data)


def package_bundle(
    output_dir: str | os.PathLike,
    bundle_root: str | os.PathLike = ".",
    name: str = DEFAULT_NAME,
    version: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
) -> tuple[Path, str]:
    """Write the Model Zoo release zip of a trained bundle.

    Args:
        output_dir: folder receiving ``<name>_v<version>.zip`` (created if needed). The zip is written to a
            temporary file there and renamed into place, so an interrupted run never leaves a partial zip.
        bundle_root: the bundle to package.
        name: the bundle's Model Zoo name: the zip's top-level folder and the ``--name`` given to
            ``monai.bundle download``.
        version: release version; defaults to ``version`` in ``configs/metadata.json`` and must equal it.
        base_url: url of the folder the weights are published in, recorded in the packaged ``large_files.yml``
            as ``<base_url>/<file name>``; ``{version}`` is replaced by the version. The default is a placeholder
            GitHub release url, to be replaced when the release is published.

    Returns:
        The zip's path and its md5 hex digest.

    Raises:
        ValueError: if ``name`` is not a plain folder name or ``version`` differs from the metadata's.
        FileNotFoundError: if ``models/model.pt``, ``configs/metadata.json`` or ``LICENSE`` is missing.
        RuntimeError: if ``models/model.pt`` cannot be exported to TorchScript.
    """
    root = Path(bundle_root).resolve()
    if not _NAME_PATTERN.match(name):
        raise ValueError(f"name must contain only letters, digits, '_' and '-', got {name!r}.")
    missing = [rel for rel in REQUIRED_FILES if not (root / rel).is_file()]
    missing += [rel for rel, required in WEIGHTS.items() if required and not (root / rel).is_file()]
    if missing:
        raise FileNotFoundError(
            f"cannot package bundle {str(root)!r}: missing {', '.join(missing)}"
            + (" (train the student first: configs/distill.json)" if "models/model.pt" in missing else "")
        )
    meta_version = str(json.loads((root / "configs" / "metadata.json").read_text(encoding="utf-8"))["version"])
    version = meta_version if version is None else str(version)
    if version != meta_version:
        raise ValueError(
            f"version {version!r} differs from configs/metadata.json's version {meta_version!r}; "
            "bump the metadata's version and changelog instead."
        )

    members: list[tuple[Path, str]] = []
    members += _files_under(root, "configs")
    members += _files_under(root, "scripts", suffix=".py")
    members += _files_under(root, "docs")
    members.append((root / "LICENSE", "LICENSE"))
    with tempfile.TemporaryDirectory() as export_dir:
        torchscript = Path(export_dir) / Path(TORCHSCRIPT).name
        export_torchscript(root, torchscript)
        weights = [(root / rel, rel) for rel in WEIGHTS if (root / rel).is_file()] + [(torchscript, TORCHSCRIPT)]
        members += weights
        url = base_url.format(version=version).rstrip("/")
        entries = [
            {"path": rel, "url": f"{url}/{Path(rel).name}", "hash_val": file_md5(path), "hash_type": "md5"}
            for path, rel in weights
        ]
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        zip_path = output_dir / f"{name}_v{version}.zip"
        with atomic_path(zip_path) as tmp, zipfile.ZipFile(tmp, "w") as archive:
            for path, arcname in sorted(members, key=lambda m: m[1]):
                _write_member(archive, f"{name}/{arcname}", path.read_bytes())
            _write_member(archive, f"{name}/large_files.yml", large_files_yaml(entries).encode())
    return zip_path, file_md5(zip_path)


def export_torchscript(bundle_root: Path, filepath: Path) -> None:
    """Export the bundle's ``models/model.pt`` to TorchScript, as the README's ``ckpt_export`` command does.

    Args:
        bundle_root: the bundle, whose ``configs/inference.json`` defines ``network_def``.
        filepath: the TorchScript file to write (its name is also the archive's inner folder).

    Raises:
        RuntimeError: with MONAI's output, if the export fails.
    """
    command = [
        sys.executable, "-m", "monai.bundle", "ckpt_export", "network_def", "--filepath", str(filepath),
        "--ckpt_file", str(bundle_root / "models" / "model.pt"),
        "--meta_file", str(bundle_root / "configs" / "metadata.json"),
        "--config_file", str(bundle_root / "configs" / "inference.json"), "--bundle_root", str(bundle_root),
    ]  # fmt: skip
    # TorchScript writes module constants in set order: a fixed hash seed makes the export, and the zip, reproducible
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    result = subprocess.run(command, cwd=bundle_root, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise RuntimeError(
            f"TorchScript export of {bundle_root / 'models' / 'model.pt'} failed:\n{result.stderr[-4000:]}"
        )


def main(
    output_dir: str = "dist",
    bundle_root: str = ".",
    name: str = DEFAULT_NAME,
    version: str | None = None,
    base_url: str = DEFAULT_BASE_URL,
) -> None:
    """Command-line entry: package the bundle and print the zip's path, md5 and the download command.

    Args:
        output_dir: folder receiving the zip.
        bundle_root: the bundle to package.
        name: the bundle's Model Zoo name.
        version: release version (default: the metadata's).
        base_url: url of the folder the weights are published in (``{version}`` is substituted).
    """
    zip_path, md5 = package_bundle(output_dir, bundle_root, name=name, version=version, base_url=base_url)
    with zipfile.ZipFile(zip_path) as archive:
        count = len(archive.namelist())
    print(f"wrote {zip_path} ({count} files, {zip_path.stat().st_size / 2**20:.2f} MiB)")
    print(f"md5 {md5}  {zip_path.name}")
    print(f"download: python -m monai.bundle download --name {name} --url <url of {zip_path.name}> --bundle_dir <dir>")


if __name__ == "__main__":
    import fire

    fire.Fire(main)
