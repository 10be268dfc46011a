"""The data: PathMNIST + OrganAMNIST npz files, checked on load and paired, and the synthetic stand-in.

The npz files are read (and, with ``--download``, fetched) by the medmnist package's own dataset classes;
``read_npz_split`` first checks every array's header (keys, dtype, shape, channels, size, label count; an
object array is refused before anything unpickles it) and then the labels' range, and refuses anything
else in one line naming the file and the key.

The pairing is synthetic (the two datasets come from different patients): within each split, pathology
sample i gets radiology sample perm[i mod M], perm a seeded permutation of the M radiology samples of
that split. The labels are the pathology labels.

Synthetic PathMNIST / OrganAMNIST files (``write_synthetic_medmnist``) are written in MedMNIST's exact
npz format, so the whole pipeline (training, export, runtime) runs without the real datasets. Their
images are learnable but not trivially so: pathology classes differ by hue *and* stripe frequency /
orientation, with hue jitter wide enough that neighbouring classes overlap in colour, random stripe phase
and pixel noise. Radiology images are gray blobs whose position and size depend on one of 11 organ
classes. They are read back through the medmnist package like the real data.
"""

from __future__ import annotations

import logging
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from crc_train.config import DataConfig
from crc_train.errors import DataError, first_line, shown

__all__ = [
    "DataConfig",
    "DataError",
    "PairedDataset",
    "PairedSplit",
    "SPLITS",
    "channel_stats",
    "class_names",
    "load_split",
    "pairing_permutation",
    "read_npz_split",
    "resolve_root",
]


log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
DEFAULT_ROOT = "~/.medmnist"
DEFAULT_SYNTHETIC_ROOT = "~/.cache/crc-fusion/synthetic"


@dataclass
class PairedSplit:
    """One split of paired images, ready for a Dataset."""

    #: pathology images, uint8 [N, S, S, 3].
    pathology: np.ndarray
    #: paired radiology images, uint8 [N, S, S, 1].
    radiology: np.ndarray
    #: pathology labels, int64 [N].
    labels: np.ndarray
    #: class names ordered by label index.
    classes: list[str]

    def __len__(self) -> int:
        return len(self.labels)


def class_names() -> list[str]:
    """PathMNIST class names ordered by index, from medmnist's INFO."""
    import medmnist

    label = medmnist.INFO["pathmnist"]["label"]
    return [label[str(i)] for i in range(len(label))]


def resolve_root(cfg: DataConfig) -> Path:
    """The folder holding the npz files; for the synthetic source, writes them there first."""
    if cfg.source == "synthetic":
        root = Path(cfg.root or DEFAULT_SYNTHETIC_ROOT).expanduser()
        if not _synthetic_matches(root, cfg):
            write_synthetic_medmnist(
                root, cfg.size, cfg.synthetic_train, cfg.synthetic_val, cfg.synthetic_test, seed=0
            )
        return root
    if cfg.source != "medmnist":
        raise DataError(f"unknown data source {cfg.source!r}: use medmnist or synthetic")
    root = Path(cfg.root or DEFAULT_ROOT).expanduser()
    if cfg.download:
        root.mkdir(parents=True, exist_ok=True)
    return root


def _synthetic_matches(root: Path, cfg: DataConfig) -> bool:
    """True when root already holds synthetic files of the requested size and split counts."""
    want = {"train": cfg.synthetic_train, "val": cfg.synthetic_val, "test": cfg.synthetic_test}
    for flag in ("pathmnist", "organamnist"):
        path = root / f"{flag}{size_flag(cfg.size)}.npz"
        if not path.exists():
            return False
        try:
            with np.load(path) as npz:
                if any(npz[f"{k}_labels"].shape[0] != n for k, n in want.items()):
                    return False
        except (*_READ_ERRORS, KeyError):
            return False
    return True


def _missing_message(root: Path, size: int) -> str:
    flag = size_flag(size)
    return (
        f"MedMNIST data not found in {root}: pass --download, or --data-root pointing to a folder with "
        f"pathmnist{flag}.npz and organamnist{flag}.npz"
    )


def _read(flag: str, cfg: DataConfig, root: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of one MedMNIST file's split, downloaded first with ``cfg.download``."""
    path = root / f"{flag}{size_flag(cfg.size)}.npz"
    if not cfg.download and not path.is_file():
        raise DataError(_missing_message(root, cfg.size))
    return read_npz_split(path, flag, split, cfg.size, mmap=cfg.mmap, download=cfg.download)


#: What each MedMNIST file must hold: modality, number of classes, channels (None = gray N x S x S).
NPZ_FILES = {"pathmnist": ("pathology", 9, 3), "organamnist": ("radiology", 11, None)}
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


def read_npz_split(
    path: str | Path, flag: str, split: str, size: int, mmap: bool = False, download: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """One split of a MedMNIST npz file, loaded by medmnist's own dataset class and checked.

    Before medmnist reads the arrays, their headers (dtype, shape) are checked, so an object array is
    refused without unpickling anything (and medmnist loads with numpy's ``allow_pickle=False`` anyway)
    and a float copy of a 224-px file is refused before it is read: images uint8 ``N x S x S x 3``
    (pathology) or ``N x S x S`` / ``N x S x S x 1`` (radiology) at ``size``; labels of an integer type,
    ``N`` or ``N x 1``, as many as images. After loading, every label must be in ``0 .. classes - 1``.
    The class's ``.imgs`` / ``.labels`` are used, never its ``__len__`` (it asserts the official counts).

    Args:
        path: the npz file, named as medmnist names it (``{flag}{_size}.npz``).
        flag: "pathmnist" or "organamnist" (what the file must hold: ``NPZ_FILES``).
        split: "train", "val" or "test".
        size: the run's image side in pixels.
        mmap: medmnist's ``mmap_mode="r"`` (numpy reads npz members into memory either way).
        download: let medmnist fetch the file (md5-checked) when it is missing.

    Returns:
        (images, labels) as stored.

    Raises:
        DataError: one line naming the file and the key that is wrong, or saying the download failed.
    """
    import medmnist

    path = Path(path)
    cls = {"pathmnist": medmnist.PathMNIST, "organamnist": medmnist.OrganAMNIST}[flag]
    if path.is_file():  # a file about to be downloaded is checked once medmnist has fetched it
        _check_headers(path, flag, split, size)
    try:
        mmap_mode = "r" if mmap else None
        ds = cls(split=split, root=str(path.parent), size=size, download=download, mmap_mode=mmap_mode)
        images, labels = ds.imgs, ds.labels
    except RuntimeError as exc:  # medmnist: the file is missing, or its download / md5 check failed
        if download:
            reason = first_line(exc)
            raise DataError(f"downloading {path.name} into {path.parent} failed ({reason})") from None
        raise DataError(_missing_message(path.parent, size)) from None
    except (*_READ_ERRORS, KeyError) as exc:  # a damaged member (bad CRC, truncated deflate stream)
        _check_headers(path, flag, split, size, read_members=True)  # names the key that is at fault
        raise DataError(f"{path}: {split} arrays cannot be read ({first_line(exc)})") from None
    if download:
        _check_headers(path, flag, split, size)
    n_classes = NPZ_FILES[flag][1]
    flat = np.asarray(labels).reshape(-1)
    outside = (flat < 0) | (flat >= n_classes)
    if outside.any():
        raise DataError(
            f"{path}: {split}_labels holds label {flat[outside][0]}; {flag} has {n_classes} classes "
            f"(0..{n_classes - 1})"
        )
    return images, labels


def _check_headers(path: Path, flag: str, split: str, size: int, read_members: bool = False) -> None:
    """Keys, dtypes and shapes of one split's arrays, from their .npy headers alone (no data read).

    ``read_members`` also reads both arrays, so that a damaged one (zip's CRC check) is named by its key:
    only after a read has failed, since reading them is the load itself (1 GB for PathMNIST at 64 px).
    """
    modality, _n_classes, channels = NPZ_FILES[flag]
    not_npz = f"{path}: not an npz archive (MedMNIST's zip of {split}_images, {split}_labels, ...)"
    try:
        with path.open("rb") as fh:
            if fh.read(4) not in (b"PK\x03\x04", b"PK\x05\x06"):  # numpy would try it as .npy or pickle
                raise DataError(not_npz)
        npz = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: not a readable npz file ({first_line(exc)})") from None
    with npz:
        img_key, label_key = f"{split}_images", f"{split}_labels"
        img_shape, img_dtype = _npz_header(npz, path, img_key)
        label_shape, label_dtype = _npz_header(npz, path, label_key)
        if img_dtype != np.uint8:
            raise DataError(
                f"{path}: {img_key} is {img_dtype}, expected uint8 (pixels 0..255, as MedMNIST stores them)"
            )
        want = (size, size, channels) if channels else (size, size)
        if not (img_shape[1:] == want or (channels is None and img_shape[1:] == (size, size, 1))):
            layout = f"N x {size} x {size}" + (f" x {channels} (RGB)" if channels else " (gray)")
            raise DataError(
                f"{path}: {img_key} has shape {img_shape}, expected {layout} {modality} images "
                f"for --size {size}"
            )
        if label_dtype.kind not in "iu":
            raise DataError(f"{path}: {label_key} is {label_dtype}, expected integer class indices")
        if label_shape not in ((img_shape[0],), (img_shape[0], 1)):
            raise DataError(
                f"{path}: {label_key} has shape {label_shape}, expected one label per image "
                f"({img_shape[0]} x 1, as {img_key} holds {img_shape[0]} images)"
            )
        if read_members:
            for key in (img_key, label_key):
                _npz_array(npz, path, key)


def _npz_header(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """(shape, dtype) of one member, from its .npy header alone."""
    member = f"{key}.npy"
    if key not in npz.files or member not in npz.zip.namelist():
        found = ", ".join(shown(k) for k in sorted(npz.files)[:8]) or "nothing"
        raise DataError(f"{path}: no array {key!r} (found: {found}); is it a MedMNIST npz file?")
    readers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    try:
        with npz.zip.open(member) as fh:
            reader = readers.get(np.lib.format.read_magic(fh))
            if reader is None:
                raise DataError(f"{path}: {key} is not a plain array (npy format 1.0 or 2.0)")
            shape, _fortran, dtype = reader(fh)
    except _READ_ERRORS as exc:
        raise DataError(f"{path}: {key} is not a readable array ({first_line(exc)})") from None
    if dtype.hasobject:
        raise DataError(f"{path}: {key} is an object array; refused (reading it would unpickle code)")
    return tuple(shape), dtype


def _npz_array(npz: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    try:
        return npz[key]
    except _READ_ERRORS as exc:  # a damaged member (bad CRC, truncated deflate stream)
        raise DataError(f"{path}: {key} cannot be read ({first_line(exc)})") from None


def pairing_permutation(pairing_seed: int, split: str, m: int) -> np.ndarray:
    """The seeded permutation of the M radiology samples used for one split.

    Each split gets its own stream derived from (pairing_seed, crc32(split)), so the pairing of one split
    does not depend on the others and is stable across Python processes (unlike ``hash``).
    """
    rng = np.random.default_rng([pairing_seed, zlib.crc32(split.encode())])
    return rng.permutation(m)


def load_split(cfg: DataConfig, split: str) -> PairedSplit:
    """Load one split of both modalities and pair them.

    Args:
        cfg: data configuration.
        split: "train", "val" or "test".

    Returns:
        The paired split; ``max_train_pairs`` caps the training split only.

    Raises:
        DataError: the npz files are missing or malformed (``read_npz_split``), or the split is unknown.
    """
    if split not in SPLITS:
        raise DataError(f"unknown split {split!r}: use one of {', '.join(SPLITS)}")
    root = resolve_root(cfg)
    if not root.is_dir():
        raise DataError(_missing_message(root, cfg.size))
    p_imgs, p_labels = _read("pathmnist", cfg, root, split)
    r_imgs, _ = _read("organamnist", cfg, root, split)
    n = p_imgs.shape[0]
    if split == "train" and cfg.max_train_pairs is not None:
        n = min(n, cfg.max_train_pairs)
    m = r_imgs.shape[0]
    if m == 0 or n == 0:
        raise DataError(f"the {split} split in {root} is empty")
    perm = pairing_permutation(cfg.pairing_seed, split, m)
    r_index = perm[np.arange(n) % m]
    pathology = np.ascontiguousarray(p_imgs[:n])
    radiology = np.asarray(r_imgs[r_index])
    if radiology.ndim == 3:
        radiology = radiology[..., None]
    labels = np.asarray(p_labels[:n]).reshape(-1).astype(np.int64)
    log.info("%s: %d pairs (%d radiology samples) from %s", split, n, m, root)
    return PairedSplit(pathology, np.ascontiguousarray(radiology), labels, class_names())


def channel_stats(split: PairedSplit) -> dict[str, dict[str, list[float]]]:
    """Per-channel mean and std, in 0..1 units, of a (training) split.

    Returns:
        ``{"pathology": {"mean": [3], "std": [3]}, "radiology": {"mean": [1], "std": [1]}}``, the
        ``normalization`` dict the model and the checkpoint carry.
    """
    out = {}
    for name, imgs in (("pathology", split.pathology), ("radiology", split.radiology)):
        c = imgs.shape[-1]
        s = np.zeros(c)
        s2 = np.zeros(c)
        count = 0
        # float64 sums over chunks: exact enough and bounded memory at 224 px.
        for start in range(0, imgs.shape[0], 1024):
            x = imgs[start : start + 1024].reshape(-1, c).astype(np.float64) / 255.0
            s += x.sum(0)
            s2 += (x * x).sum(0)
            count += x.shape[0]
        mean = s / count
        std = np.sqrt(np.maximum(s2 / count - mean**2, 0.0))
        std = np.maximum(std, 1e-3)  # a constant channel must not divide by zero
        out[name] = {"mean": [float(v) for v in mean], "std": [float(v) for v in std]}
    return out


class PairedDataset(Dataset):
    """Torch Dataset over a PairedSplit: yields (pathology uint8 [S,S,3], radiology uint8 [S,S,1], label)."""

    def __init__(self, split: PairedSplit) -> None:
        self.split = split

    def __len__(self) -> int:
        return len(self.split.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int]:
        return (
            torch.from_numpy(np.asarray(self.split.pathology[index])),
            torch.from_numpy(np.asarray(self.split.radiology[index])),
            int(self.split.labels[index]),
        )


# ---- synthetic MedMNIST files

PATHOLOGY_CLASSES = 9
RADIOLOGY_CLASSES = 11
_CHUNK = 128  # images generated at once: bounds memory at 224 px


def size_flag(size: int) -> str:
    """MedMNIST's file-name suffix: empty at 28 px, "_<size>" otherwise."""
    return "" if size == 28 else f"_{size}"


def _hsv_to_rgb(h: np.ndarray, s: float, v: np.ndarray) -> np.ndarray:
    """Vectorised HSV -> RGB, h in [0, 1), s scalar, v array; returns [..., 3] in 0..1."""
    i = np.floor(h * 6.0).astype(int) % 6
    f = h * 6.0 - np.floor(h * 6.0)
    p = v * (1.0 - s)
    q = v * (1.0 - s * f)
    t = v * (1.0 - s * (1.0 - f))
    choices = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    rgb = np.zeros((*np.broadcast(h, v).shape, 3))
    for k, (r, g, b) in enumerate(choices):
        mask = i == k
        rgb[..., 0] = np.where(mask, r, rgb[..., 0])
        rgb[..., 1] = np.where(mask, g, rgb[..., 1])
        rgb[..., 2] = np.where(mask, b, rgb[..., 2])
    return rgb


def _pathology(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """RGB uint8 [N, S, S, 3]: class c has hue ~c/9, stripe frequency c//3 and orientation c%3."""
    n = len(labels)
    out = np.empty((n, size, size, 3), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(0, 1, size), np.linspace(0, 1, size), indexing="ij")
    for start in range(0, n, _CHUNK):
        c = labels[start : start + _CHUNK].astype(float)
        m = len(c)
        # Hue jitter of +-0.08 (about 0.7 class spacings): colour alone cannot separate neighbours.
        hue = (c / PATHOLOGY_CLASSES + rng.uniform(-0.08, 0.08, m)) % 1.0
        freq = 2.0 + 1.5 * (c // 3) + rng.uniform(-0.3, 0.3, m)
        angle = np.pi * (c % 3) / 3.0 + rng.uniform(-0.2, 0.2, m)
        phase = rng.uniform(0, 2 * np.pi, m)
        proj = np.cos(angle)[:, None, None] * xx + np.sin(angle)[:, None, None] * yy
        stripes = 0.5 + 0.5 * np.sin(2 * np.pi * freq[:, None, None] * proj + phase[:, None, None])
        value = 0.35 + 0.5 * stripes + rng.normal(0, 0.12, (m, size, size))
        rgb = _hsv_to_rgb(hue[:, None, None] + np.zeros((m, size, size)), 0.6, np.clip(value, 0, 1))
        rgb += rng.normal(0, 0.05, rgb.shape)
        out[start : start + m] = np.clip(rgb * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def _radiology(labels: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Gray uint8 [N, S, S] (no channel axis, like OrganAMNIST): one bright blob per image."""
    n = len(labels)
    out = np.empty((n, size, size), dtype=np.uint8)
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    for start in range(0, n, _CHUNK):
        c = labels[start : start + _CHUNK].astype(float)
        m = len(c)
        theta = 2 * np.pi * c / RADIOLOGY_CLASSES + rng.uniform(-0.2, 0.2, m)
        cx, cy = 0.45 * np.cos(theta), 0.45 * np.sin(theta)
        radius = 0.15 + 0.02 * (c % 4) + rng.uniform(-0.03, 0.03, m)
        d2 = (xx - cx[:, None, None]) ** 2 + (yy - cy[:, None, None]) ** 2
        blob = np.exp(-d2 / (2 * radius[:, None, None] ** 2))
        body = np.exp(-(xx**2 + yy**2) / 0.5)  # a dim "body" behind the organ
        img = 0.25 * body + 0.7 * blob + rng.normal(0, 0.06, (m, size, size))
        out[start : start + m] = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return out


def write_synthetic_medmnist(
    root: str | Path,
    size: int = 28,
    n_train: int = 600,
    n_val: int = 150,
    n_test: int = 150,
    seed: int = 0,
) -> Path:
    """Write synthetic ``pathmnist{flag}.npz`` and ``organamnist{flag}.npz`` into ``root``.

    The layout is MedMNIST's: keys ``{train,val,test}_{images,labels}``; pathology images uint8
    [N, S, S, 3], radiology images uint8 [N, S, S], labels uint8 [N, 1]; ``np.savez_compressed``.
    Both modalities get the same number of samples per split; labels cycle through every class so each
    split holds all of them.

    Args:
        root: folder to write into (created if missing).
        size: image side, one of 28, 64, 128, 224.
        n_train: samples per modality in the training split.
        n_val: samples per modality in the validation split.
        n_test: samples per modality in the test split.
        seed: seed of the generator; the same arguments give the same bytes.

    Returns:
        The folder, usable as the medmnist ``root``.
    """
    root = Path(root).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    counts = {"train": n_train, "val": n_val, "test": n_test}
    for flag, n_classes, make in (
        ("pathmnist", PATHOLOGY_CLASSES, _pathology),
        ("organamnist", RADIOLOGY_CLASSES, _radiology),
    ):
        arrays = {}
        for split, n in counts.items():
            labels = rng.permutation(np.arange(n) % n_classes).astype(np.uint8)
            arrays[f"{split}_images"] = make(labels, size, rng)
            arrays[f"{split}_labels"] = labels[:, None]
        path = root / f"{flag}{size_flag(size)}.npz"
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez_compressed(tmp, **arrays)
        tmp.replace(path)
        log.info("wrote %s (%s)", path, ", ".join(f"{k} {v}" for k, v in counts.items()))
    return root
