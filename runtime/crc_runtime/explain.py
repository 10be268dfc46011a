"""Explanations of a prediction, torch-free: where each branch looked, and how much each modality decided.

The bundle's explain artifact (``model.explain.onnx``, kind ``explain``; docs/bundle.md) outputs, next to
the ``logits``, one class activation map per branch (``pathology_cam``, ``radiology_cam``; ``fused_cam``
for early fusion) of shape ``[N, classes, h, w]`` and the head's ``bias`` broadcast to ``[N, classes]``.
The model's head is linear on the average-pooled final maps, so for every pair and class, exactly (up to
float rounding)::

    logits[c] = sum over branches of mean_xy(CAM_branch[c]) + bias[c]

From that identity this module makes:

- the **margin split** (:func:`margin_split`): the predicted class a's margin over the runner-up b,
  ``logits[a] - logits[b]``, as the sum of one term per branch,
  ``mean_xy(CAM_branch[a]) - mean_xy(CAM_branch[b])``, and the bias term ``bias[a] - bias[b]``;
- the **overlay** (:func:`overlay`): the predicted class's map of one branch, stretched to the input
  image's own size (Pillow BILINEAR, pixel centres aligned), coloured with viridis and blended over
  the image;
- :class:`ExplainWriter`, which does both for every batch of a ``crc-infer FOLDER --explain DIR`` run.

Nothing here imports torch or matplotlib: the colour map is viridis as a 256-entry table.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import atomic_path
from .bundle import Bundle
from .confine import Confined
from .errors import BundleError, ImageError, UserError
from .images import decode_image

log = logging.getLogger(__name__)

EXPLAIN_KIND = "explain"
#: Largest |logits - (sum of the CAM means + bias)| an explain artifact may show (FP32, docs/export.md).
IDENTITY_TOLERANCE = 1e-4
#: Share of the overlay colour in each output pixel; the rest is the original image.
ALPHA = 0.5
_DECIMALS = 6  # the margin columns are fixed-point with this many decimals

# matplotlib's viridis (perceptually uniform, readable in gray and by colour-blind readers) sampled at
# 256 points, as RGB bytes; tests/runtime checks it against matplotlib where matplotlib is installed.
_VIRIDIS_HEX = (
    "44015444025645045745055946075a46085c460a5d460b5e470d60470e61471063471164471365481467481668481769"
    "48186a481a6c481b6d481c6e481d6f481f70482071482173482374482475482576482677482878482979472a7a472c7a"
    "472d7b472e7c472f7d46307e46327e46337f463480453581453781453882443983443a83443b84433d84433e85423f85"
    "4240864241864142874144874045884046883f47883f48893e49893e4a893e4c8a3d4d8a3d4e8a3c4f8a3c508b3b518b"
    "3b528b3a538b3a548c39558c39568c38588c38598c375a8c375b8d365c8d365d8d355e8d355f8d34608d34618d33628d"
    "33638d32648e32658e31668e31678e31688e30698e306a8e2f6b8e2f6c8e2e6d8e2e6e8e2e6f8e2d708e2d718e2c718e"
    "2c728e2c738e2b748e2b758e2a768e2a778e2a788e29798e297a8e297b8e287c8e287d8e277e8e277f8e27808e26818e"
    "26828e26828e25838e25848e25858e24868e24878e23888e23898e238a8d228b8d228c8d228d8d218e8d218f8d21908d"
    "21918c20928c20928c20938c1f948c1f958b1f968b1f978b1f988b1f998a1f9a8a1e9b8a1e9c891e9d891f9e891f9f88"
    "1fa0881fa1881fa1871fa28720a38620a48621a58521a68522a78522a88423a98324aa8325ab8225ac8226ad8127ad81"
    "28ae8029af7f2ab07f2cb17e2db27d2eb37c2fb47c31b57b32b67a34b67935b77937b87838b9773aba763bbb753dbc74"
    "3fbc7340bd7242be7144bf7046c06f48c16e4ac16d4cc26c4ec36b50c46a52c56954c56856c66758c7655ac8645cc863"
    "5ec96260ca6063cb5f65cb5e67cc5c69cd5b6ccd5a6ece5870cf5773d05675d05477d1537ad1517cd2507fd34e81d34d"
    "84d44b86d54989d5488bd6468ed64590d74393d74195d84098d83e9bd93c9dd93ba0da39a2da37a5db36a8db34aadc32"
    "addc30b0dd2fb2dd2db5de2bb8de29bade28bddf26c0df25c2df23c5e021c8e020cae11fcde11dd0e11cd2e21bd5e21a"
    "d8e219dae319dde318dfe318e2e418e5e419e7e419eae51aece51befe51cf1e51df4e61ef6e620f8e621fbe723fde725"
)
VIRIDIS = np.frombuffer(bytes.fromhex(_VIRIDIS_HEX), dtype=np.uint8).reshape(256, 3)


def cam_output(branch: str) -> str:
    """The explain graph's output holding ``branch``'s maps: ``pathology_cam``, ``radiology_cam``, ..."""
    return f"{branch}_cam"


def explain_artifact(bundle: Bundle) -> dict:
    """The bundle's usable explain artifact, checked for what the explanations read.

    Raises:
        UserError: The bundle has none (one line saying to re-export), it is marked unusable, or its
            entry lacks ``branches`` or ``outputs`` (a BundleError).
    """
    found = [a for a in bundle.artifacts if a.get("kind") == EXPLAIN_KIND]
    if not found:
        raise UserError(
            f"{bundle.path}: has no explain artifact (model.explain.onnx); --explain needs a bundle "
            "written by a crc-export that makes one: re-export the run"
        )
    art = bundle.artifact(found[0]["file"])  # refuses an unusable or unlisted one, with the reasons
    where = bundle.path / art["file"]
    if not art.get("branches") or not art.get("outputs"):
        raise BundleError(
            f"{where}: its manifest entry lists no 'branches' or 'outputs'; re-export the bundle"
        )
    check_explain_outputs(art, [o["name"] for o in art["outputs"]], where)
    return art


def explain_outputs(artifact: dict) -> list[str]:
    """The outputs an explain artifact must have: ``logits``, ``<branch>_cam`` per branch, ``bias``."""
    return ["logits", *(cam_output(b) for b in artifact["branches"]), "bias"]


def check_explain_outputs(artifact: dict, names: Sequence[str], where: str | os.PathLike) -> None:
    """Refuse an explain model that lacks an output the explanations read.

    Raises:
        BundleError: One line naming the missing outputs.
    """
    missing = [name for name in explain_outputs(artifact) if name not in names]
    if missing:
        raise BundleError(
            f"{where}: the explain artifact has no output {', '.join(missing)} (it has "
            f"{', '.join(names)}); re-export the bundle"
        )


@dataclass(frozen=True)
class MarginSplit:
    """The predicted class's margin over the runner-up, split into one term per branch and the bias.

    Attributes:
        predicted: Index of the predicted class (largest logit) per pair, int ``[N]``.
        runner_up: Index of the second largest logit per pair, int ``[N]``.
        margin: ``logits[a] - logits[b]`` from the model's logits, float64 ``[N]``.
        terms: Branch name -> ``mean_xy(CAM[a]) - mean_xy(CAM[b])``, float64 ``[N]``.
        bias: ``bias[a] - bias[b]``, float64 ``[N]``.
    """

    predicted: np.ndarray
    runner_up: np.ndarray
    margin: np.ndarray
    terms: dict[str, np.ndarray]
    bias: np.ndarray

    @property
    def identity_error(self) -> np.ndarray:
        """|margin - (sum of the terms + bias)| per pair: float rounding only, for a sound artifact."""
        return np.abs(self.margin - sum(self.terms.values()) - self.bias)


def margin_split(logits: np.ndarray, cams: dict[str, np.ndarray], bias: np.ndarray) -> MarginSplit:
    """Split each pair's winning margin by branch (module docstring).

    Args:
        logits: ``[N, C]``.
        cams: Branch name -> CAM ``[N, C, h, w]``.
        bias: ``[N, C]`` (the head's bias per pair) or ``[C]``.

    Returns:
        The split; ties between logits go to the lower class index, as ``argmax`` does.
    """
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 2 or z.shape[1] < 2:
        raise ValueError(f"logits must be [N, C] with C >= 2, got {list(z.shape)}")
    rows = np.arange(len(z))
    order = np.argsort(-z, axis=1, kind="stable")
    a, b = order[:, 0], order[:, 1]
    b_all = np.broadcast_to(np.asarray(bias, dtype=np.float64), z.shape)
    terms = {}
    for name, cam in cams.items():
        means = np.asarray(cam, dtype=np.float64).mean(axis=(2, 3))
        terms[name] = means[rows, a] - means[rows, b]
    return MarginSplit(a, b, z[rows, a] - z[rows, b], terms, b_all[rows, a] - b_all[rows, b])


def split_columns(branches: Sequence[str]) -> list[str]:
    """predictions.csv columns of the margin split: runner_up, margin, margin_<branch>..., margin_bias."""
    return ["runner_up", "margin", *(f"margin_{b}" for b in branches), "margin_bias"]


def _fixed(units: int) -> str:
    """An integer count of 1e-6 as fixed-point text, exactly (no float in between)."""
    whole, frac = divmod(abs(units), 10**_DECIMALS)
    return f"{'-' if units < 0 else ''}{whole}.{frac:0{_DECIMALS}d}"


def split_rows(split: MarginSplit, classes: Sequence[str]) -> list[list[str]]:
    """The margin split as predictions.csv cells (``split_columns`` order), one row per pair.

    Each term is rounded to 6 decimals and ``margin`` is printed as their exact sum, so every row adds
    up to the last digit; it equals the model's logit margin up to ``identity_error`` plus the
    rounding of the terms (at most 0.5e-6 each; docs/runtime.md).
    """
    scale = 10**_DECIMALS
    rows = []
    for i in range(len(split.margin)):
        parts = [round(float(t[i]) * scale) for t in split.terms.values()]
        parts.append(round(float(split.bias[i]) * scale))
        rows.append([classes[int(split.runner_up[i])], _fixed(sum(parts)), *map(_fixed, parts)])
    return rows


def colour_scale(maps: Sequence[np.ndarray]) -> tuple[float, float]:
    """One (low, high) for all maps of a pair, so a branch that contributed less also looks darker."""
    lo = min(float(np.min(m)) for m in maps)
    hi = max(float(np.max(m)) for m in maps)
    return lo, hi


def overlay(image: Image.Image, cam: np.ndarray, lo: float, hi: float, alpha: float = ALPHA) -> Image.Image:
    """The map ``cam`` [h, w], coloured and blended over ``image`` at the image's own size.

    The map is stretched over the whole image with Pillow's BILINEAR (cell centres on the stretched
    grid), mapped linearly from [lo, hi] to viridis (dark purple = lo, yellow = hi), and blended:
    ``(1 - alpha) * image + alpha * colour``, so the tissue stays visible under every pixel.

    Returns:
        An RGB image of ``image.size``.
    """
    width, height = image.size
    heat = Image.fromarray(np.ascontiguousarray(cam, dtype=np.float32), mode="F")
    heat = np.asarray(heat.resize((width, height), Image.Resampling.BILINEAR))
    span = hi - lo
    # float32 is plenty for 256 colour levels; the blend is Pillow's (C), not numpy temporaries.
    level = (heat - np.float32(lo)) * np.float32(255 / span) if span > 0 else np.full(heat.shape, 127.5)
    colour = VIRIDIS[np.clip(np.rint(level), 0, 255).astype(np.uint8)]
    return Image.blend(image.convert("RGB"), Image.fromarray(colour, "RGB"), alpha)


def file_stem(pair_id: str) -> str:
    """A file name stem for a pair id: the id itself when it is a safe name, else a cleaned id with a
    short hash of the original (two ids never share a stem)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", pair_id).strip("._") or "pair"
    if safe == pair_id and len(safe) <= 120:
        return safe
    return f"{safe[:120]}-{hashlib.sha256(pair_id.encode('utf-8', 'surrogatepass')).hexdigest()[:10]}"


def identity_error(logits: np.ndarray, cams: dict[str, np.ndarray], bias: np.ndarray) -> np.ndarray:
    """|logits - (sum of the CAM means + bias)| per pair and class, float64 ``[N, C]``."""
    total = np.asarray(bias, dtype=np.float64) + sum(
        np.asarray(c, dtype=np.float64).mean(axis=(2, 3)) for c in cams.values()
    )
    return np.abs(np.asarray(logits, dtype=np.float64) - total)


def reference_cams(bundle: Bundle, artifact: dict) -> dict[str, np.ndarray]:
    """The PyTorch maps of the reference pairs (``artifact["reference"]``), by output name.

    Raises:
        BundleError: The file is not listed, unreadable or lacks a branch's maps.
    """
    wanted = [cam_output(b) for b in artifact["branches"]]
    return bundle.load_arrays(str(artifact.get("reference", "")), wanted)


def explain_parity(
    ref: dict[str, np.ndarray],
    ref_cams: dict[str, np.ndarray],
    outputs: dict[str, np.ndarray],
    branches: Sequence[str],
    limits: dict,
) -> dict:
    """The parity entry of an explain artifact: its logits gated like any FP32 artifact, plus its maps.

    Args:
        ref: reference.npz (inputs, labels, PyTorch logits).
        ref_cams: PyTorch's CAMs of the same pairs, by output name (:func:`reference_cams`).
        outputs: The artifact's outputs on the reference inputs (``logits``, the CAMs, ``bias``).
        branches: The artifact's branches.
        limits: The FP32 thresholds; ``max_abs_diff`` also bounds each map cell's share of the logit.

    The maps are gated in logit units: a cell's share of a logit is its map value divided by h * w (the
    logit term is the mean over the cells), so the FP32 logit gate applied to every cell's share bounds
    the logit terms exactly as the logits are bounded. Raw map values are h * w times larger, and so are
    their float32 rounding differences.

    Returns:
        :func:`~crc_runtime.validate.parity_row` of the logits, with ``explain``: ``cam_max_abs_diff``
        (map units, against PyTorch), ``cam_cell_max_abs_diff`` (the same divided by h * w: what is
        gated), ``identity_max_abs_diff`` (``logits`` against the sum of the map means and the bias, in
        the artifact's own outputs) and the two limits; ``passed`` needs all three gates.
    """
    from .validate import parity_row

    row = parity_row(ref, outputs["logits"], "fp32", limits)
    cams = {b: outputs[cam_output(b)] for b in branches}
    cam_diff = cell_diff = 0.0
    for b, cam in cams.items():
        want = ref_cams[cam_output(b)]
        if want.shape != cam.shape:
            raise BundleError(
                f"{cam_output(b)}: reference maps {list(want.shape)}, the artifact gives {list(cam.shape)}; "
                "re-export the bundle"
            )
        diff = float(np.abs(cam.astype(np.float64) - want).max(initial=0.0))
        cam_diff = max(cam_diff, diff)
        cell_diff = max(cell_diff, diff / (cam.shape[-2] * cam.shape[-1]))
    identity = float(identity_error(outputs["logits"], cams, outputs["bias"]).max(initial=0.0))
    cell_limit = float(limits.get("max_abs_diff", 1e-3))
    checks = {
        "cam_cell_abs_diff": (cell_diff, "max_cam_cell_abs_diff", cell_limit),
        "identity_error": (identity, "max_identity_error", IDENTITY_TOLERANCE),
    }
    for label, (value, key, limit) in checks.items():
        if not value <= limit:  # NaN fails too
            row["reasons"].append(
                f"fp32 {label} {value:.6g} > {key} {limit:.6g} (would pass with {key} >= {value:.6g})"
            )
    row["passed"] = not row["reasons"]
    row["explain"] = {
        "cam_max_abs_diff": cam_diff,
        "cam_cell_max_abs_diff": cell_diff,
        "identity_max_abs_diff": identity,
        "max_cam_cell_abs_diff": cell_limit,
        "max_identity_error": IDENTITY_TOLERANCE,
    }
    return row


class ExplainWriter:
    """Per batch of a folder run: the margin split columns and one overlay PNG per branch and pair.

    Args:
        folder: Where the PNGs go (created if missing; its parent must exist):
            ``<stem>.<branch>.png`` per pair, ``stem`` from :func:`file_stem`.
        bundle: The loaded bundle (class names).
        artifact: Its explain artifact (:func:`explain_artifact`): the branches and their order.
        colour_modes: Input name -> Pillow mode the image is decoded to (the manifest's color_mode).
        workers: Threads that draw the overlays (0: on the calling thread, batch by batch).
        confined: The input folder's confinement (``PairSet.confined``): images are opened through it
            for their overlays as they were for the model.

    Raises:
        UserError: ``folder`` cannot be made.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        bundle: Bundle,
        artifact: dict,
        colour_modes: dict[str, str],
        workers: int = 1,
        confined: Confined | None = None,
    ) -> None:
        self.folder = Path(folder)
        # Pillow releases the GIL while it decodes and resizes (not while it encodes a PNG, the larger
        # part at 224 px: benchmarks/RESULTS.md), so part of the drawing runs in parallel.
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="crc-explain") if workers > 0 else None
        self.classes = bundle.classes
        self.model_path = bundle.path / artifact["file"]
        self.branches: list[str] = list(artifact["branches"])
        self.colour_modes = colour_modes
        self.confined = confined
        self.columns = split_columns(self.branches)
        self.written = 0  # PNG files
        self.identity_failures: list[str] = []  # pair ids whose split missed the logit margin
        if self.folder.exists() and not self.folder.is_dir():
            raise UserError(f"{self.folder}: exists and is not a folder; pass a folder to --explain")
        try:
            self.folder.mkdir(exist_ok=True)
        except OSError as exc:
            raise UserError(
                f"{self.folder}: cannot create the --explain folder ({exc.strerror or exc}); "
                "its parent folder must exist"
            ) from None

    def check_outputs(self, names: Sequence[str]) -> None:
        """Refuse a model that lacks an output this writer reads (:func:`check_explain_outputs`)."""
        check_explain_outputs({"branches": self.branches}, names, self.model_path)

    def target(self, pair, branch: str) -> Path:
        """Where ``pair``'s overlay of ``branch`` goes."""
        return self.folder / f"{file_stem(pair.id)}.{branch}.png"

    def check_targets(self, pairs: Sequence, reads: Sequence[str | os.PathLike]) -> None:
        """Refuse a run whose overlays would replace a file it reads (an input image, the bundle, the
        predictions file), before anything is written.

        Raises:
            UserError: One line naming the first overlay and the file it would replace.
        """
        read = {os.path.realpath(p) for p in reads}
        for pair in pairs:
            for branch in self.branches:
                target = self.target(pair, branch)
                if os.path.realpath(target) in read:
                    raise UserError(
                        f"--explain {self.folder}: the overlay {target.name} would replace {target}, which "
                        "this run reads; pass another folder"
                    )

    def source(self, branch: str) -> str:
        """The input whose image ``branch``'s map is drawn over (the fused map: over the pathology tile)."""
        return "pathology" if branch in ("pathology", "fused") else branch

    def _draw(self, pair, maps: dict[str, np.ndarray], lo: float, hi: float) -> int:
        """Write one pair's overlays; returns how many were written."""
        written = 0
        for branch, cam in maps.items():
            source = self.source(branch)
            try:
                image = decode_image(getattr(pair, source), self.colour_modes[source], confined=self.confined)
            except ImageError as exc:  # decoded a moment ago; changed since
                log.warning("%s: no %s overlay: %s", pair.id, branch, exc)
                continue
            # Atomic, not fsynced: an fsync per overlay costs more than drawing it (docs/runtime.md).
            with atomic_path(self.target(pair, branch), fsync=False) as tmp:
                overlay(image, cam, lo, hi).save(tmp, format="PNG")
            written += 1
        return written

    def close(self) -> None:
        """Stop the drawing threads (every overlay of a returned batch is already written)."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None

    def write_batch(self, pairs: Sequence, outputs: dict[str, np.ndarray]) -> list[list[str]]:
        """Split the margins of one batch and write its overlays.

        Args:
            pairs: The batch's pairs (``id`` and one image path per input name), in output order.
            outputs: The explain graph's outputs for the batch.

        Returns:
            The ``columns`` cells per pair.
        """
        self.check_outputs(list(outputs))
        cams = {b: outputs[cam_output(b)] for b in self.branches}
        split = margin_split(outputs["logits"], cams, outputs["bias"])
        for i in np.flatnonzero(split.identity_error > IDENTITY_TOLERANCE):
            pid = pairs[i].id
            self.identity_failures.append(pid)
            log.warning(
                "%s: the branch terms miss the logit margin by %.3g (> %g)",
                pid,
                split.identity_error[i],
                IDENTITY_TOLERANCE,
            )
        # The batch's pairs are drawn in parallel, and all of them are on disk before its rows are
        # returned (and written): a predictions row never names a pair whose overlays are missing.
        jobs = []
        for i, pair in enumerate(pairs):
            maps = {b: cams[b][i, int(split.predicted[i])] for b in self.branches}
            jobs.append((pair, maps, *colour_scale(list(maps.values()))))
        drawn = (
            self._pool.map(lambda job: self._draw(*job), jobs)
            if self._pool
            else (self._draw(*j) for j in jobs)
        )
        self.written += sum(drawn)
        return split_rows(split, self.classes)
