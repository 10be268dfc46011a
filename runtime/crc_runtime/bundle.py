"""Read, verify and write bundles (docs/bundle.md): the only contract between crc-export and crc-infer."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .atomic import atomic_write_text
from .errors import BundleError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
REFERENCE_KEYS = ("pathology", "radiology", "labels", "logits")
_REEXPORT = "re-export the bundle with crc-export"


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in chunks so engines of any size fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_size), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(bundle_dir: str | os.PathLike, manifest: dict) -> Path:
    """Write ``manifest.json`` atomically (sorted keys, indent 2, trailing newline).

    Returns:
        The path of the manifest.
    """
    path = Path(bundle_dir) / MANIFEST_NAME
    atomic_write_text(path, json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _is_plain_name(name: object) -> bool:
    return (
        isinstance(name, str)
        and name not in ("", ".", "..")
        and "/" not in name
        and "\\" not in name
        and "\x00" not in name
        and not os.path.isabs(name)
    )


def artifact_files(artifact: dict) -> list[str]:
    """The files one artifact runs from: its ``file`` and the weight files in its ``external_data``."""
    return [artifact["file"], *artifact.get("external_data", [])]


@dataclass
class Bundle:
    """A loaded, verified bundle.

    Attributes:
        path: The bundle folder.
        manifest: The whole manifest.json.
        classes: Class names, in logit order.
        image_size: S, the side of the square inputs.
        inputs: The manifest's input specs (name, dtype, shape, color_mode).
        outputs: The manifest's output specs.
        artifacts: The manifest's artifact entries (file, kind, precision, usable, parity).
    """

    path: Path
    manifest: dict
    classes: list[str]
    image_size: int
    inputs: list[dict]
    outputs: list[dict]
    artifacts: list[dict]

    def file(self, name: str) -> Path:
        """Path of a file listed (and verified) in the manifest's ``files``."""
        if name not in self.manifest["files"]:
            raise BundleError(f"{self.path / name}: not listed in manifest.json 'files'; {_REEXPORT}")
        return self.path / name

    def artifact(self, file_or_precision: str, kind: str | None = "onnx") -> dict:
        """The artifact entry with this file name, or else the first of this kind with this precision.

        Args:
            file_or_precision: A file name (``model.onnx``) or a precision (``fp32``, ``fp16``).
            kind: Kind to match when looking up by precision (None: any kind).

        Raises:
            BundleError: No such artifact, it is not listed in ``files``, or it is marked unusable.
        """
        matches = [a for a in self.artifacts if a.get("file") == file_or_precision]
        if not matches:
            matches = [
                a
                for a in self.artifacts
                if a.get("precision") == file_or_precision and (kind is None or a.get("kind") == kind)
            ]
        if not matches:
            known = ", ".join(f"{a.get('file')} ({a.get('precision')})" for a in self.artifacts) or "none"
            raise BundleError(
                f"{self.path}: no artifact '{file_or_precision}' in manifest.json (artifacts: {known})"
            )
        usable = [a for a in matches if a.get("usable") is True]
        if not usable:
            art = matches[0]
            reasons = "; ".join((art.get("parity") or {}).get("reasons") or []) or "no reason recorded"
            raise BundleError(
                f"{self.path / art['file']}: marked unusable in manifest.json ({reasons}); "
                "use another artifact or re-export"
            )
        self.artifact_path(usable[0])
        return usable[0]

    def artifact_path(self, artifact: dict) -> Path:
        """Path of an artifact's file, once it and its external weight files are known to be listed."""
        paths = [self.file(name) for name in artifact_files(artifact)]
        return paths[0]

    def usable_artifacts(self) -> list[dict]:
        """Artifacts marked ``"usable": true`` whose files (the artifact and its weights) are all listed."""
        listed = self.manifest["files"]
        return [
            a
            for a in self.artifacts
            if a.get("usable") is True and all(name in listed for name in artifact_files(a))
        ]

    def load_reference(self) -> dict[str, np.ndarray]:
        """The parity set from reference.npz (loaded with ``allow_pickle=False``)."""
        name = (self.manifest.get("reference") or {}).get("file", "reference.npz")
        path = self.file(name)
        try:
            with np.load(path, allow_pickle=False) as data:
                ref = {key: data[key] for key in data.files}
        except (OSError, ValueError, zipfile.BadZipFile) as exc:
            raise BundleError(f"{path}: not a readable .npz ({exc}); {_REEXPORT}") from None
        missing = [key for key in REFERENCE_KEYS if key not in ref]
        if missing:
            raise BundleError(f"{path}: missing arrays {missing} (has {sorted(ref)}); {_REEXPORT}")
        return ref


def _require(manifest: dict, key: str, kind: type, where: Path):
    value = manifest.get(key)
    if not isinstance(value, kind) or (kind is list and not value):
        raise BundleError(
            f"{where}: '{key}' missing or not a {'non-empty ' if kind is list else ''}"
            f"{kind.__name__}; {_REEXPORT}"
        )
    return value


def _check_inside(bundle: Path, path: Path) -> None:
    """A bundle file may be a symlink only to another file of the same bundle: nothing is read outside."""
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(bundle):
        raise BundleError(
            f"{path}: a symlink to {real}, outside the bundle; a bundle holds its own files, copy them in"
        )


def _read_manifest(bundle: Path) -> dict:
    if not bundle.is_dir():
        raise BundleError(f"{bundle}: not a folder; pass the bundle folder written by crc-export")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{path}: missing; is {bundle} a bundle written by crc-export?")
    _check_inside(bundle, path)
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); {_REEXPORT}") from None
    if not isinstance(manifest, dict):
        raise BundleError(f"{path}: expected a JSON object, found {type(manifest).__name__}; {_REEXPORT}")
    return manifest


def _verify_files(bundle: Path, files: dict, where: Path) -> None:
    for name, expected in files.items():
        if not _is_plain_name(name):
            raise BundleError(
                f"{where}: files entry {name!r} is not a plain file name inside the bundle; "
                "the bundle may be tampered with, re-export it"
            )
        path = bundle / name
        if not path.is_file():
            raise BundleError(f"{path}: listed in manifest.json but missing; copy the whole bundle folder")
        _check_inside(bundle, path)
        actual = sha256_file(path)
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 {actual[:12]}... does not match manifest.json ({str(expected)[:12]}...); "
                "the file is corrupt or changed, copy the bundle again or re-export it"
            )


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """Load and verify a bundle: schema version, file names, presence and sha256 of every file.

    Raises:
        BundleError: One line naming the offending file and what to do.
    """
    bundle = Path(bundle_dir)
    where = bundle / MANIFEST_NAME
    manifest = _read_manifest(bundle)
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in KNOWN_SCHEMA_VERSIONS:
        raise BundleError(
            f"{where}: schema_version {version!r} is not one this runtime knows "
            f"({', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}); upgrade crc-fusion or re-export the bundle"
        )
    classes = _require(manifest, "classes", list, where)
    inputs = _require(manifest, "inputs", list, where)
    outputs = _require(manifest, "outputs", list, where)
    files = _require(manifest, "files", dict, where)
    artifacts = manifest.get("artifacts") or []
    resize = manifest.get("resize") or {}
    if resize.get("library") != "Pillow" or resize.get("filter") != "BILINEAR":
        raise BundleError(
            f"{where}: resize rule {resize.get('library')}/{resize.get('filter')} is not one this runtime "
            "knows (Pillow/BILINEAR); upgrade crc-fusion or re-export the bundle"
        )
    size = resize.get("size")
    if not (isinstance(size, list) and len(size) == 2 and size[0] == size[1] and isinstance(size[0], int)):
        raise BundleError(f"{where}: resize.size {size!r} is not [S, S]; {_REEXPORT}")
    for spec in inputs:
        if not isinstance(spec, dict) or not {"name", "dtype", "shape"} <= spec.keys():
            raise BundleError(f"{where}: input spec {spec!r} needs name, dtype and shape; {_REEXPORT}")
        shape = spec["shape"]
        if not (isinstance(shape, list) and len(shape) == 4 and shape[1] == shape[2] == size[0]):
            raise BundleError(
                f"{where}: input {spec['name']} shape {shape!r} is not [batch, {size[0]}, {size[0]}, C] "
                f"as resize.size says; {_REEXPORT}"
            )
    for art in artifacts if isinstance(artifacts, list) else [artifacts]:
        if not isinstance(art, dict) or not isinstance(art.get("file"), str):
            raise BundleError(f"{where}: artifact entry {art!r} needs at least a 'file' name; {_REEXPORT}")
        data = art.get("external_data", [])
        if not (isinstance(data, list) and all(_is_plain_name(name) for name in data)):
            raise BundleError(
                f"{where}: artifact {art['file']}: external_data {data!r} is not a list of plain file names "
                f"inside the bundle; {_REEXPORT}"
            )
    _verify_files(bundle, files, where)
    log.info(
        "bundle %s: schema %s, %d classes, size %d, %d files verified",
        bundle,
        version,
        len(classes),
        size[0],
        len(files),
    )
    return Bundle(
        path=bundle,
        manifest=manifest,
        classes=[str(c) for c in classes],
        image_size=size[0],
        inputs=inputs,
        outputs=outputs,
        artifacts=list(artifacts),
    )
