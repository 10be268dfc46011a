"""Transfer learning: torchvision ImageNet weights (or a saved torchvision state dict) into each branch.

Stem adaptation, stated once:

- 28/64 px models have a 3x3 stride-1 stem; ImageNet's is 7x7 stride 2. We take the **centre 3x3 crop**
  of each 7x7 kernel (taps [2:5, 2:5]), unscaled: the centre taps carry most of the energy of ImageNet's
  Gabor/blob-like stem filters, and a crop keeps their orientation selectivity, which averaging the
  7x7 into 3x3 would blur away.
- ``--fusion early`` has a 4-channel stem (pathology RGB + radiology gray): the gray channel gets the
  mean of the RGB kernels (a gray image repeated to RGB would see the same filter).
- The radiology branch takes gray repeated to 3 channels, so it loads the RGB weights as they are.

The ``fc`` layer of the source is dropped (our head is new); BatchNorm statistics are loaded too.
The checkpoint stores the trained weights, so rebuilding a model from it never downloads anything.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch import nn

from crc_train.errors import ConfigError

__all__ = ["adapt_state_dict", "branches", "load_pretrained", "set_backbones_trainable", "source_state_dict"]

log = logging.getLogger(__name__)


def source_state_dict(source: str, backbone: str) -> dict[str, torch.Tensor]:
    """The torchvision ResNet state dict named by ``source``: "imagenet" or a file path.

    Raises:
        ConfigError: the file is missing / unreadable, or the download fails.
    """
    if source == "imagenet":
        import torchvision

        weights = torchvision.models.get_model_weights(backbone).DEFAULT
        try:
            return weights.get_state_dict(progress=True)
        except Exception as exc:  # noqa: BLE001 - network errors come in many types
            raise ConfigError(
                f"cannot download the ImageNet weights {weights} ({type(exc).__name__}); without internet, "
                f"save torchvision.models.{backbone}(weights='DEFAULT').state_dict() elsewhere and pass "
                "--pretrained PATH"
            ) from exc
    path = Path(source).expanduser()
    if not path.is_file():
        raise ConfigError(f"--pretrained: {path} not found (give 'imagenet' or a saved state dict)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is the same user error
        kind = type(exc).__name__
        raise ConfigError(f"--pretrained: cannot read {path} as a torch state dict ({kind})") from exc
    for key in ("state_dict", "model"):  # common wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"--pretrained: {path} does not hold a state dict of tensors")
    return state


def adapt_state_dict(state: dict[str, torch.Tensor], net: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` reshaped for ``net``: fc dropped, the stem kernel cropped / given a 4th channel."""
    out = {k: v for k, v in state.items() if not k.startswith("fc.")}
    want = net.conv1.weight.shape  # [64, in_channels, k, k]
    w = out.get("conv1.weight")
    if w is None:
        raise ConfigError("--pretrained: the state dict has no conv1.weight; is it a torchvision ResNet?")
    if w.shape[-1] != want[-1]:
        start = (w.shape[-1] - want[-1]) // 2
        w = w[:, :, start : start + want[-1], start : start + want[-1]]
    if w.shape[1] == 3 and want[1] == 4:
        w = torch.cat([w, w.mean(dim=1, keepdim=True)], dim=1)
    out["conv1.weight"] = w.contiguous()
    return out


def branches(model: nn.Module) -> dict[str, nn.Module]:
    """The model's ResNet branches by name (radiology absent for fusion none / early)."""
    found = {"pathology": model.pathology}
    if getattr(model, "radiology", None) is not None:
        found["radiology"] = model.radiology
    return found


def load_pretrained(
    model: nn.Module, source: str, backbone: str, state: dict[str, torch.Tensor] | None = None
) -> None:
    """Load ``source`` (see ``source_state_dict``) into every branch of ``model`` in place.

    Args:
        model: a FusionNet.
        source: "imagenet" or a path (also names the weights in messages).
        backbone: the branches' architecture.
        state: the already loaded state dict of ``source`` (read here when None).

    Raises:
        ConfigError: the weights do not fit ``backbone`` (names or shapes differ).
    """
    if state is None:
        state = source_state_dict(source, backbone)
    for name, net in branches(model).items():
        adapted = adapt_state_dict(state, net)
        try:
            net.load_state_dict(adapted, strict=True)
        except RuntimeError as exc:
            first = str(exc).strip().splitlines()[0]
            raise ConfigError(f"--pretrained {source} does not fit a {backbone} branch: {first}") from exc
        log.info("%s branch: loaded %s weights (%d tensors)", name, source, len(adapted))


def set_backbones_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze or unfreeze the branch parameters (fusion blocks and head always train).

    A frozen branch keeps its BatchNorm layers in train mode: their running statistics still adapt to
    the new domain, only the learned weights are fixed.
    """
    for net in branches(model).values():
        for p in net.parameters():
            p.requires_grad_(trainable)
