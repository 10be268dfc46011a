"""Read, verify and write bundles (docs/bundle.md): the only contract between crc-export and crc-infer.

Every field of manifest.json is checked against one schema (:data:`MANIFEST_SCHEMA`, a small typed
loader) before anything uses it, and reference.npz is read array by array with its declared sizes checked
first; whatever a damaged or hostile bundle holds, the result is one :class:`BundleError` line naming the
file, the field and what to do, never a traceback.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import stat
import zipfile
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .atomic import atomic_write_text
from .errors import BundleError, os_reason

if TYPE_CHECKING:
    from .backends.base import TensorSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
KNOWN_SCHEMA_VERSIONS = (1,)
MANIFEST_NAME = "manifest.json"
REFERENCE_KEYS = ("pathology", "radiology", "labels", "logits")
MAX_MANIFEST_BYTES = 16 << 20  # crc-export writes a few KB; anything this big is not a manifest
MAX_IMAGE_SIZE = 4096  # resize.size S: the paper's models take 28..224 px
MAX_REFERENCE_BYTES = 4 << 30  # reference.npz arrays, decompressed (64 pairs at 224 px are ~13 MB)
DTYPES = ("uint8", "int8", "int32", "int64", "float16", "float32", "float64", "bool")
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


def _why(exc: OSError) -> str:
    return os_reason(exc) or type(exc).__name__.lower()


def _describe_spec(spec: dict) -> str:
    dims = ", ".join(str(d) for d in spec["shape"])
    return f"{spec['name']} {spec['dtype']} [{dims}]"


@dataclass
class Bundle:
    """A loaded, verified bundle.

    Attributes:
        path: The bundle folder.
        manifest: The whole manifest.json (every field checked against :data:`MANIFEST_SCHEMA`).
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

    def paths(self) -> list[Path]:
        """manifest.json and every file it lists: what a run reads and must never write."""
        return [self.path / MANIFEST_NAME, *(self.path / name for name in self.manifest["files"])]

    def artifact(self, file_or_precision: str, kind: str | None = "onnx") -> dict:
        """The artifact entry with this file name, or else the first of this kind with this precision.

        Args:
            file_or_precision: A file name (``model.onnx``) or a precision (``fp32``, ``fp16``, ``int8``).
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

    def check_model(
        self,
        inputs: Sequence[TensorSpec],
        outputs: Sequence[TensorSpec],
        where: str | os.PathLike,
        declared_outputs: Sequence[dict] | None = None,
    ) -> None:
        """The manifest's inputs and outputs must be the model's own: names, dtypes, ranks, fixed sizes.

        ``crc-infer`` runs and ``crc-infer validate`` both call this on every backend they open, so a
        bundle one of them refuses the other refuses too.

        Args:
            inputs: The model's inputs as the backend sees them (``backend.input_specs``).
            outputs: The model's outputs (``backend.output_specs``).
            where: The artifact file, named in the error.
            declared_outputs: The outputs the artifact itself declares (the explain artifact lists its
                own); None: the manifest's ``outputs``.

        Raises:
            BundleError: One line naming the first disagreement.
        """
        declared_out = self.outputs if declared_outputs is None else declared_outputs
        for kind, declared, actual in (("input", self.inputs, inputs), ("output", declared_out, outputs)):
            model = {spec.name: spec for spec in actual}
            wanted = {spec["name"]: spec for spec in declared}
            if set(model) != set(wanted):
                raise BundleError(
                    f"{where}: manifest {kind}s {sorted(wanted)} but the model has {sorted(model)}; "
                    f"{_REEXPORT}"
                )
            for name, spec in wanted.items():
                have = model[name]
                fixed_differ = any(
                    isinstance(a, int) and isinstance(b, int) and a != b
                    for a, b in zip(spec["shape"], have.shape, strict=False)
                )
                if have.dtype != spec["dtype"] or len(have.shape) != len(spec["shape"]) or fixed_differ:
                    raise BundleError(
                        f"{where}: manifest says {kind} {_describe_spec(spec)}, the model has "
                        f"{have.describe()}; {_REEXPORT}"
                    )

    def check_logits(self, logits: np.ndarray, where: str | os.PathLike) -> None:
        """Logits from a model call must be ``[N, classes]`` (a model with a free class axis is only
        caught here).

        Raises:
            BundleError: The model gives another shape than the manifest's class list says.
        """
        if logits.ndim != 2 or logits.shape[1] != len(self.classes):
            raise BundleError(
                f"{where}: model gives logits {list(logits.shape)} but the manifest lists "
                f"{len(self.classes)} classes; {_REEXPORT}"
            )

    def load_arrays(self, name: str, keys: Sequence[str]) -> dict[str, np.ndarray]:
        """The arrays ``keys`` of the listed .npz file ``name``, read as reference.npz is (headers
        checked first, no pickle).

        Raises:
            BundleError: One line naming the file and what is wrong.
        """
        return _read_npz(self.file(name), keys)

    def load_reference(self) -> dict[str, np.ndarray]:
        """The parity set from reference.npz, checked against the manifest.

        Each array's declared dtype and size is read from its header and checked before any data is
        (object arrays are never loaded: no pickle), then the arrays must fit the manifest: inputs of the
        model's dtypes and sizes, ``labels`` integers in ``0 .. classes - 1``, ``logits`` finite
        ``[N, classes]``, the same N everywhere and N >= 1.

        Raises:
            BundleError: One line naming reference.npz, the array and what is wrong.
        """
        name = self.manifest.get("reference", {}).get("file", "reference.npz")
        path = self.file(name)
        ref = _read_npz(path, REFERENCE_KEYS)
        n = len(ref["labels"]) if ref["labels"].ndim else 0
        if ref["labels"].dtype.kind not in "iu" or ref["labels"].shape != (n,):
            raise BundleError(
                f"{path}: labels is {ref['labels'].dtype} {list(ref['labels'].shape)}, expected integers "
                f"[N]; {_REEXPORT}"
            )
        if ref["logits"].dtype.kind != "f" or ref["logits"].shape != (n, len(self.classes)):
            raise BundleError(
                f"{path}: logits is {ref['logits'].dtype} {list(ref['logits'].shape)}, expected float "
                f"[{n}, {len(self.classes)}] ({n} labels, {len(self.classes)} classes); {_REEXPORT}"
            )
        for spec in self.inputs:
            _check_array(path, ref, spec["name"], spec["dtype"], [n, *spec["shape"][1:]])
        if n == 0:
            raise BundleError(f"{path}: holds no reference pairs (N = 0); {_REEXPORT}")
        labels = ref["labels"]
        if labels.min() < 0 or labels.max() >= len(self.classes):
            raise BundleError(
                f"{path}: labels range {labels.min()}..{labels.max()}, outside 0..{len(self.classes) - 1} "
                f"(the manifest's classes); {_REEXPORT}"
            )
        if not np.isfinite(ref["logits"]).all():
            bad = int((~np.isfinite(ref["logits"])).any(axis=1).sum())
            raise BundleError(f"{path}: {bad} of {n} reference logit rows are NaN or infinite; {_REEXPORT}")
        return ref


def _check_array(path: Path, ref: dict, key: str, dtype: str, shape: list) -> None:
    array = ref.get(key)
    if array is None:
        raise BundleError(f"{path}: no array {key} for the model input {key}; {_REEXPORT}")
    fits = array.ndim == len(shape) and all(
        not isinstance(want, int) or want == got for want, got in zip(shape, array.shape, strict=True)
    )
    if array.dtype != np.dtype(dtype) or not fits:
        want = ", ".join(str(d) for d in shape)
        raise BundleError(
            f"{path}: {key} is {array.dtype} {list(array.shape)}, expected {dtype} [{want}] as the "
            f"manifest's inputs say; {_REEXPORT}"
        )


def _read_npz(path: Path, keys: Sequence[str]) -> dict[str, np.ndarray]:
    """The arrays ``keys`` of an .npz, each header checked before its data is read.

    A header that declares more bytes than the member holds (or more than :data:`MAX_REFERENCE_BYTES`)
    is refused before numpy allocates anything; object arrays are refused (no pickle is ever loaded).
    """
    unreadable = f"{path}: not a readable .npz"
    try:
        with zipfile.ZipFile(path) as archive:
            members = {name.removesuffix(".npy"): archive.getinfo(name) for name in archive.namelist()}
            declared = 0
            for key in (k for k in keys if k in members):
                declared += _npy_header_check(path, key, archive, members[key])
                if declared > MAX_REFERENCE_BYTES:
                    raise BundleError(
                        f"{path}: arrays declare {declared:,} bytes, over the limit of "
                        f"{MAX_REFERENCE_BYTES:,}; {_REEXPORT}"
                    )
            missing = [key for key in keys if key not in members]
            if missing:
                raise BundleError(f"{path}: missing arrays {missing} (has {sorted(members)}); {_REEXPORT}")
            arrays = {}
            for key in keys:
                with archive.open(members[key]) as fh:
                    arrays[key] = np.lib.format.read_array(fh, allow_pickle=False)
            return arrays
    except BundleError:
        raise
    except PermissionError as exc:
        raise BundleError(f"{path}: cannot read ({_why(exc)}); fix its permissions") from None
    # A damaged archive or array raises any of these from zipfile, zlib or numpy's header parser.
    except (
        OSError,
        ValueError,
        EOFError,
        KeyError,
        NotImplementedError,
        RuntimeError,
        zipfile.BadZipFile,
        zlib.error,
    ) as exc:
        raise BundleError(f"{unreadable} ({str(exc) or type(exc).__name__}); {_REEXPORT}") from None


def _npy_header_check(path: Path, key: str, archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> int:
    """Bytes the array ``key`` declares, after checking its header against the member's size."""
    with archive.open(info) as fh:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise BundleError(f"{path}: {key} is .npy format version {version}, not 1.0 or 2.0; {_REEXPORT}")
        header = fh.tell()
    if dtype.hasobject:
        raise BundleError(
            f"{path}: not a readable .npz (Object arrays cannot be loaded when allow_pickle=False), "
            f"{key} is one; {_REEXPORT}"
        )
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != info.file_size - header:
        raise BundleError(
            f"{path}: {key} declares {list(shape)} {dtype} ({nbytes:,} bytes) but holds "
            f"{info.file_size - header:,} bytes; {_REEXPORT}"
        )
    return nbytes


# ---------------------------------------------------------------- the manifest schema

_MISSING = object()
Check = Callable[[object, str], None]


class _Invalid(Exception):
    """A manifest field that does not fit the schema: where it is, what was expected, what was found."""

    def __init__(self, at: str, expected: str, value: object) -> None:
        super().__init__(at)
        self.at, self.expected, self.value = at, expected, value


def _found(value: object) -> str:
    """A short description of a JSON value (never its whole text: it may be huge or deeply nested)."""
    if value is _MISSING:
        return "nothing"
    if isinstance(value, dict):
        return f"an object of {len(value)} keys"
    if isinstance(value, list):
        return f"a list of {len(value)} items"
    if isinstance(value, str):
        return f"{value[:40]!r}" + ("..." if len(value) > 40 else "")
    return json.dumps(value)  # a number, true, false or null


def _shown(value: object) -> str:
    """A value as it would be written in a message: strings bare (cut at 40 characters), others described."""
    return value[:40] if isinstance(value, str) else _found(value)


def _type(kinds: type | tuple[type, ...], expected: str) -> Check:
    def check(value: object, at: str) -> None:
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in _flat(kinds)):
            raise _Invalid(at, expected, value)

    return check


def _flat(kinds: type | tuple[type, ...]) -> tuple[type, ...]:
    return kinds if isinstance(kinds, tuple) else (kinds,)


STRING = _type(str, "a string")
BOOL = _type(bool, "true or false")
NUMBER = _type((int, float), "a number")


def _int(low: int, high: int | None = None) -> Check:
    expected = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"

    def check(value: object, at: str) -> None:
        if (
            not isinstance(value, int)
            or isinstance(value, bool)
            or value < low
            or (high is not None and value > high)
        ):
            raise _Invalid(at, expected, value)

    return check


def _finite(value: object, at: str) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
        raise _Invalid(at, "a finite number", value)


def _nullable(check: Check) -> Check:
    def nullable(value: object, at: str) -> None:
        if value is not None:
            check(value, at)

    return nullable


def _one_of(*choices: str) -> Check:
    def check(value: object, at: str) -> None:
        if not isinstance(value, str) or value not in choices:
            raise _Invalid(at, f"one of {', '.join(choices)}", value)

    return check


def _plain_name(value: object, at: str) -> None:
    if not _is_plain_name(value):
        raise _Invalid(at, "a plain file name inside the bundle", value)


def _dim(value: object, at: str) -> None:
    """A tensor dimension: a positive size, or a name for a free one (``"batch"``)."""
    if isinstance(value, str) and value:
        return
    _int(1)(value, at)


def _list(item: Check, expected: str, min_items: int = 0) -> Check:
    def check(value: object, at: str) -> None:
        if not isinstance(value, list) or len(value) < min_items:
            raise _Invalid(at, expected, value)
        for i, element in enumerate(value):
            item(element, f"{at}[{i}]")

    return check


def _mapping(item: Check, expected: str) -> Check:
    def check(value: object, at: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(at, expected, value)
        for key, element in value.items():
            item(element, f"{at}.{key}")

    return check


def _object(required: dict[str, Check], optional: dict[str, Check] | None = None) -> Check:
    """A JSON object with these fields; fields the schema does not name are allowed and never read."""
    optional = optional or {}

    def check(value: object, at: str) -> None:
        if not isinstance(value, dict):
            raise _Invalid(at, "an object", value)
        for key, field in required.items():
            field(value.get(key, _MISSING), f"{at}.{key}" if at else key)
        for key, field in optional.items():
            if key in value:
                field(value[key], f"{at}.{key}" if at else key)

    return check


def _any(value: object, at: str) -> None:
    """Informational fields the runtime never reads: any JSON value."""


_SHA256 = _type(str, "a sha256 hex string")
_DTYPE = _one_of(*DTYPES)
_SHAPE = _list(_dim, "a list of dimensions (positive integers or names)", min_items=1)
_OUTPUT_SPECS = _list(
    _object({"name": STRING, "dtype": _DTYPE, "shape": _SHAPE}),
    "a non-empty list of output specs",
    min_items=1,
)
_OPTIONAL_STRING = _nullable(STRING)
_PARITY = _object(
    {},
    {
        "backend": STRING,
        "pairs": _int(0),
        "passed": _nullable(BOOL),
        "reasons": _list(STRING, "a list of strings"),
        "thresholds": _mapping(_finite, "an object of threshold name -> number"),
        "would_pass_with": _mapping(_nullable(NUMBER), "an object of threshold name -> number"),
        **{
            key: _nullable(NUMBER)  # NaN when nothing was compared: informational only
            for key in (
                "top1_agreement",
                "reference_accuracy",
                "accuracy",
                "max_abs_diff",
                "mean_abs_diff",
                "cosine",
            )
        },
    },
)
_ENGINE = _object(
    {},
    {
        "gpu_name": STRING,
        "compute_capability": STRING,
        "tensorrt_version": STRING,
        "cuda_runtime": _nullable(_any),
        "source": STRING,
        "profile": _object({}, {k: _int(1) for k in ("min_batch", "opt_batch", "max_batch")}),
    },
)
_ARTIFACT = _object(
    {"file": STRING, "kind": STRING},
    {
        "precision": STRING,
        "usable": BOOL,
        "external_data": _list(_plain_name, "a list of plain file names inside the bundle"),
        "parity": _PARITY,
        "engine": _nullable(_ENGINE),
        "timing_cache": _plain_name,
        "graph": _any,
        # The explain artifact (docs/bundle.md): its branches, its own outputs, its reference maps.
        "branches": _list(STRING, "a non-empty list of branch names", min_items=1),
        "outputs": _OUTPUT_SPECS,
        "reference": _plain_name,
    },
)

#: Schema version 1, field by field (docs/bundle.md). ``schema_version`` is checked before it.
MANIFEST_SCHEMA: Check = _object(
    {
        "classes": _list(STRING, "a non-empty list of class names", min_items=1),
        "inputs": _list(
            _object(
                {"name": _one_of("pathology", "radiology"), "dtype": _DTYPE, "shape": _SHAPE},
                {"color_mode": _one_of("RGB", "L")},
            ),
            "a non-empty list of input specs",
            min_items=1,
        ),
        "outputs": _OUTPUT_SPECS,
        "files": _mapping(_SHA256, "a dict of file name -> sha256"),
        "resize": _object(
            {"library": _any, "filter": _any, "size": _any}, {"when": STRING}
        ),  # its values get the messages of _check_resize
    },
    {
        "artifacts": _list(_ARTIFACT, "a list of artifact entries"),
        "reference": _object(
            {},
            {"file": _plain_name, "pairs": _int(0), "split": STRING, "accuracy": _nullable(NUMBER)},
        ),
        "model": _object({}, {"image_size": _nullable(_int(1)), "backbone": _OPTIONAL_STRING}),
        "provenance": _object({}, {"run_id": _OPTIONAL_STRING, "git_commit": _OPTIONAL_STRING}),
    },
)


def _check_manifest(manifest: dict, where: Path) -> None:
    """Schema version first (its own message says to upgrade), then every field, then how they agree."""
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version not in KNOWN_SCHEMA_VERSIONS:
        raise BundleError(
            f"{where}: schema_version {version!r} is not one this runtime knows "
            f"({', '.join(map(str, KNOWN_SCHEMA_VERSIONS))}); upgrade crc-fusion or re-export the bundle"
        )
    try:
        MANIFEST_SCHEMA(manifest, "")
    except _Invalid as bad:
        raise BundleError(
            f"{where}: '{bad.at}' missing or not {bad.expected} (found {_found(bad.value)}); {_REEXPORT}"
        ) from None
    size = _check_resize(manifest["resize"], where)
    classes = manifest["classes"]
    if len(set(classes)) != len(classes):
        repeated = sorted({c for c in classes if classes.count(c) > 1})
        raise BundleError(f"{where}: classes {repeated} appear more than once; {_REEXPORT}")
    for kind in ("inputs", "outputs"):
        names = [spec["name"] for spec in manifest[kind]]
        if len(set(names)) != len(names):
            raise BundleError(f"{where}: {kind} names {names} repeat a name; {_REEXPORT}")
    for spec in manifest["inputs"]:
        shape = spec["shape"]
        if not (len(shape) == 4 and shape[1] == shape[2] == size):
            raise BundleError(
                f"{where}: input {spec['name']} shape {shape!r} is not [batch, {size}, {size}, C] "
                f"as resize.size says; {_REEXPORT}"
            )
    logits = [spec for spec in manifest["outputs"] if spec["name"] == "logits"]
    if not logits:
        raise BundleError(
            f"{where}: outputs {[s['name'] for s in manifest['outputs']]} have no 'logits'; the runtime "
            f"reads the class scores from an output named logits; {_REEXPORT}"
        )
    shape = logits[0]["shape"]
    if len(shape) != 2 or (isinstance(shape[1], int) and shape[1] != len(classes)):
        raise BundleError(
            f"{where}: output logits shape {shape!r} is not [batch, {len(classes)}] for the "
            f"{len(classes)} classes listed; {_REEXPORT}"
        )


def _check_resize(resize: dict, where: Path) -> int:
    """The only rule this runtime reproduces bit-exactly (docs/bundle.md); returns S."""
    if resize.get("library") != "Pillow" or resize.get("filter") != "BILINEAR":
        library, filt = (_shown(resize.get(key)) for key in ("library", "filter"))
        raise BundleError(
            f"{where}: resize rule {library}/{filt} is not one this runtime "
            "knows (Pillow/BILINEAR); upgrade crc-fusion or re-export the bundle"
        )
    size = resize.get("size")
    try:
        _list(_int(1, MAX_IMAGE_SIZE), "", min_items=2)(size, "resize.size")
        ok = len(size) == 2 and size[0] == size[1]
    except _Invalid:
        ok = False
    if not ok:
        raise BundleError(
            f"{where}: resize.size {_found(size)} is not [S, S] with S in 1..{MAX_IMAGE_SIZE}; {_REEXPORT}"
        )
    return size[0]


# ---------------------------------------------------------------- reading and verifying a bundle


def _check_inside(bundle: Path, path: Path) -> None:
    """A bundle file may be a symlink only to another file of the same bundle: nothing is read outside."""
    real = os.path.realpath(path)
    if os.path.dirname(real) != os.path.realpath(bundle):
        raise BundleError(
            f"{path}: a symlink to {real}, outside the bundle; a bundle holds its own files, copy them in"
        )


def _stat_file(path: Path, missing: str) -> os.stat_result:
    """Stat a bundle file: missing and unreadable each get their own line."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:  # permission denied on the folder, a symlink loop, ...
        raise BundleError(
            f"{path}: cannot read ({_why(exc)}); fix its permissions or copy the bundle"
        ) from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(missing)
    return st


def _read_manifest(bundle: Path) -> dict:
    try:
        is_dir = stat.S_ISDIR(os.stat(bundle).st_mode)
    except FileNotFoundError:
        is_dir = False
    except OSError as exc:
        raise BundleError(f"{bundle}: cannot read ({_why(exc)}); fix its permissions") from None
    if not is_dir:
        raise BundleError(f"{bundle}: not a folder; pass the bundle folder written by crc-export")
    path = bundle / MANIFEST_NAME
    st = _stat_file(path, f"{path}: missing; is {bundle} a bundle written by crc-export?")
    _check_inside(bundle, path)
    if st.st_size > MAX_MANIFEST_BYTES:
        raise BundleError(
            f"{path}: {st.st_size:,} bytes, more than any manifest crc-export writes "
            f"(limit {MAX_MANIFEST_BYTES:,}); {_REEXPORT}"
        )
    try:
        manifest = json.loads(path.read_bytes().decode("utf-8"))
    except OSError as exc:
        raise BundleError(f"{path}: cannot read ({_why(exc)}); fix its permissions") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BundleError(f"{path}: not valid JSON ({exc}); {_REEXPORT}") from None
    except RecursionError:
        raise BundleError(
            f"{path}: not valid JSON (nested too deeply to be a manifest); {_REEXPORT}"
        ) from None
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
        _stat_file(path, f"{path}: listed in manifest.json but missing; copy the whole bundle folder")
        _check_inside(bundle, path)
        try:
            actual = sha256_file(path)
        except OSError as exc:
            raise BundleError(f"{path}: cannot read ({_why(exc)}); fix its permissions") from None
        if actual != expected:
            raise BundleError(
                f"{path}: sha256 {actual[:12]}... does not match manifest.json ({str(expected)[:12]}...); "
                "the file is corrupt or changed, copy the bundle again or re-export it"
            )


def load_bundle(bundle_dir: str | os.PathLike) -> Bundle:
    """Load and verify a bundle: every manifest field against the schema, then every file's sha256.

    Raises:
        BundleError: One line naming the offending file (and field) and what to do.
    """
    bundle = Path(bundle_dir)
    where = bundle / MANIFEST_NAME
    manifest = _read_manifest(bundle)
    _check_manifest(manifest, where)
    files = manifest["files"]
    _verify_files(bundle, files, where)
    size = manifest["resize"]["size"][0]
    log.info(
        "bundle %s: schema %s, %d classes, size %d, %d files verified",
        bundle,
        manifest["schema_version"],
        len(manifest["classes"]),
        size,
        len(files),
    )
    return Bundle(
        path=bundle,
        manifest=manifest,
        classes=list(manifest["classes"]),
        image_size=size,
        inputs=manifest["inputs"],
        outputs=manifest["outputs"],
        artifacts=list(manifest.get("artifacts", [])),
    )
