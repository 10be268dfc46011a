"""The dual-branch fusion network (DESIGN.md, "The model") and its pretrained weights.

Module layout (the FP16 exporter relies on these names):

- ``model.preprocess``: uint8 NHWC -> float32 0..1 -> z-score with buffers -> NCHW.
- ``model.pathology`` / ``model.radiology``: torchvision ResNets with ``fc`` removed (``radiology`` is
  None for fusion "none" and "early"; for "early", ``pathology`` is the single 4-channel ResNet).
- ``model.fusion3`` / ``model.fusion4``: cross-modal attention after layer3 / layer4 (None unless
  fusion is "attention").
- ``model.head``: dropout + linear.

Explanations: the head is linear on the average-pooled final maps, so ``forward_cams`` splits every
logit exactly into one class activation map per branch plus the bias (DESIGN.md, "Explanations").

Transfer learning (``load_pretrained``): torchvision ImageNet weights (or a saved torchvision state dict)
into each branch. Stem adaptation, stated once:

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
import math
from pathlib import Path

import torch
import torchvision
from torch import nn

from crc_train.config import ModelConfig
from crc_train.errors import ConfigError

__all__ = [
    "CrossModalAttention",
    "FusionNet",
    "ModelConfig",
    "Preprocess",
    "adapt_state_dict",
    "branches",
    "build_model",
    "load_pretrained",
    "set_backbones_trainable",
    "source_state_dict",
]


log = logging.getLogger(__name__)

# Placeholder statistics for a model built without data; training always passes the real ones and the
# checkpoint restores them through the state dict.
_NEUTRAL = {"pathology": {"mean": [0.5] * 3, "std": [0.25] * 3}, "radiology": {"mean": [0.5], "std": [0.25]}}


class Preprocess(nn.Module):
    """uint8 (or float 0..255) NHWC images -> z-scored float32 NCHW, inside the exported graph."""

    def __init__(self, normalization: dict) -> None:
        super().__init__()
        for name, channels in (("pathology", 3), ("radiology", 1)):
            mean = torch.tensor(normalization[name]["mean"], dtype=torch.float32)
            std = torch.tensor(normalization[name]["std"], dtype=torch.float32)
            if mean.shape != (channels,) or std.shape != (channels,):
                raise ValueError(f"normalization[{name!r}] needs {channels} mean and std values")
            self.register_buffer(f"{name}_mean", mean)
            self.register_buffer(f"{name}_std", std)

    def forward(self, pathology: torch.Tensor, radiology: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns pathology [N, 3, S, S] and radiology [N, 1, S, S], z-scored float32."""
        p = (pathology.to(torch.float32) / 255.0 - self.pathology_mean) / self.pathology_std
        r = (radiology.to(torch.float32) / 255.0 - self.radiology_mean) / self.radiology_std
        return p.permute(0, 3, 1, 2), r.permute(0, 3, 1, 2)


class CrossModalAttention(nn.Module):
    """Each branch's tokens attend to the other branch's tokens; gated residual per direction.

    With both gates at 0 (their initial value) the block is the identity, so a fresh model is exactly
    two plain ResNets.
    """

    def __init__(self, channels: int, dim: int, heads: int) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"attention dim {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        for side in ("pathology", "radiology"):
            # q from this side; k, v from the same side (used when the *other* side attends to it).
            self.add_module(f"{side}_q", nn.Conv2d(channels, dim, 1))
            self.add_module(f"{side}_k", nn.Conv2d(channels, dim, 1))
            self.add_module(f"{side}_v", nn.Conv2d(channels, dim, 1))
            self.add_module(f"{side}_out", nn.Conv2d(dim, channels, 1))
        self.pathology_gate = nn.Parameter(torch.zeros(()))
        self.radiology_gate = nn.Parameter(torch.zeros(()))

    def _tokens(self, x: torch.Tensor) -> torch.Tensor:
        """[N, D, H, W] -> [N, heads, H*W, head_dim]."""
        n = x.shape[0]
        return x.reshape(n, self.heads, self.head_dim, -1).transpose(2, 3)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """Scaled dot-product attention written out, query map shape kept; returns [N, D, Hq, Wq]."""
        n, _, h, w = q.shape
        qt, kt, vt = self._tokens(q), self._tokens(k), self._tokens(v)
        # Scores and softmax in float32 (explicit .float()), so an FP16 export can keep them FP32.
        scores = torch.matmul(qt.float(), kt.float().transpose(2, 3)) * (1.0 / math.sqrt(self.head_dim))
        weights = torch.softmax(scores, dim=-1).to(vt.dtype)
        out = torch.matmul(weights, vt)  # [N, heads, Lq, head_dim]
        return out.transpose(2, 3).reshape(n, self.heads * self.head_dim, h, w)

    def forward(self, p: torch.Tensor, r: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (pathology, radiology) feature maps of unchanged shape."""
        p_from_r = self._attend(self.pathology_q(p), self.radiology_k(r), self.radiology_v(r))
        r_from_p = self._attend(self.radiology_q(r), self.pathology_k(p), self.pathology_v(p))
        p_new = p + self.pathology_gate * self.pathology_out(p_from_r)
        r_new = r + self.radiology_gate * self.radiology_out(r_from_p)
        return p_new, r_new


def _resnet(backbone: str, in_channels: int, small_input: bool) -> tuple[nn.Module, int]:
    """A torchvision ResNet (random init) with fc removed; returns (net, pooled feature width)."""
    net = getattr(torchvision.models, backbone)(weights=None)
    if small_input:
        # 28/64 px: a 3x3 stride-1 stem and no max-pool keep layer4 at S/8 instead of S/32.
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    elif in_channels != 3:
        net.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
    if small_input or in_channels != 3:
        nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    width = net.fc.in_features
    net.fc = nn.Identity()
    return net, width


def _stem(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return net.maxpool(net.relu(net.bn1(net.conv1(x))))


def _trunk(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Stem and the four stages of one ResNet: its final (layer4) map."""
    x = _stem(net, x)
    return net.layer4(net.layer3(net.layer2(net.layer1(x))))


def _pool(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.flatten(net.avgpool(x), 1)


class FusionNet(nn.Module):
    """Pathology + radiology classifier; see the module docstring for the layout."""

    def __init__(self, cfg: ModelConfig, normalization: dict | None = None) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.fusion = cfg.fusion
        small = cfg.image_size < 128
        self.preprocess = Preprocess(normalization or _NEUTRAL)
        self.radiology: nn.Module | None = None
        self.fusion3: CrossModalAttention | None = None
        self.fusion4: CrossModalAttention | None = None
        if cfg.fusion == "early":
            self.pathology, width = _resnet(cfg.backbone, 4, small)
            self.embed_dim = width
        elif cfg.fusion == "none":
            self.pathology, width = _resnet(cfg.backbone, 3, small)
            self.embed_dim = width
        else:
            self.pathology, width = _resnet(cfg.backbone, 3, small)
            self.radiology, _ = _resnet(cfg.backbone, 3, small)
            self.embed_dim = 2 * width
            if cfg.fusion == "attention":
                # layer3 has half of layer4's channels in every torchvision ResNet.
                self.fusion3 = CrossModalAttention(width // 2, cfg.attention_dim, cfg.attention_heads)
                self.fusion4 = CrossModalAttention(width, cfg.attention_dim, cfg.attention_heads)
        #: width of one branch's pooled features (the first branch_dim of the embedding are pathology's).
        self.branch_dim = width
        self.head = nn.Sequential(nn.Dropout(cfg.dropout), nn.Linear(self.embed_dim, cfg.num_classes))

    @property
    def branch_names(self) -> list[str]:
        """Names of the final maps in embedding order (the keys of ``forward_maps`` / ``forward_cams``)."""
        return list(self.branch_nets())

    def branch_nets(self) -> dict[str, nn.Module]:
        """The ResNet that makes each final map, by the map's name (see ``forward_maps``)."""
        if self.fusion == "early":
            return {"fused": self.pathology}
        if self.radiology is None:
            return {"pathology": self.pathology}
        return {"pathology": self.pathology, "radiology": self.radiology}

    def _maps(self, p: torch.Tensor, r: torch.Tensor) -> dict[str, torch.Tensor]:
        """Final maps from preprocessed NCHW inputs; see ``forward_maps``."""
        if self.fusion == "none":
            return {"pathology": _trunk(self.pathology, p)}
        if self.fusion == "early":
            return {"fused": _trunk(self.pathology, torch.cat([p, r], dim=1))}
        r = r.expand(-1, 3, -1, -1)  # gray -> 3 channels for a stock ResNet branch
        p, r = _stem(self.pathology, p), _stem(self.radiology, r)
        p, r = self.pathology.layer1(p), self.radiology.layer1(r)
        p, r = self.pathology.layer2(p), self.radiology.layer2(r)
        p, r = self.pathology.layer3(p), self.radiology.layer3(r)
        if self.fusion3 is not None:
            p, r = self.fusion3(p, r)
        p, r = self.pathology.layer4(p), self.radiology.layer4(r)
        if self.fusion4 is not None:
            p, r = self.fusion4(p, r)
        return {"pathology": p, "radiology": r}

    def _pooled(self, maps: dict[str, torch.Tensor], r: torch.Tensor) -> torch.Tensor:
        """The fused embedding: each map average-pooled, concatenated in ``maps`` order."""
        nets = self.branch_nets()
        pooled = torch.cat([_pool(nets[name], fmap) for name, fmap in maps.items()], dim=1)
        if self.fusion == "none":
            # The baseline ignores radiology, but keeps it in the graph (times exactly 0, finite inputs)
            # so every exported model has the same two inputs.
            pooled = pooled + 0.0 * r[:, 0, 0, :1]
        return pooled

    def forward_maps(self, pathology: torch.Tensor, radiology: torch.Tensor) -> dict[str, torch.Tensor]:
        """The final layer4 maps the head pools, [N, branch_dim, h, w] each, in embedding order.

        Keys: ``pathology`` and ``radiology`` (fusion attention: after the second cross-modal block;
        late), ``pathology`` alone (none), ``fused`` (early: one 4-channel ResNet sees both images, so
        its map belongs to neither modality).
        """
        return self._maps(*self.preprocess(pathology, radiology))

    def forward_features(self, pathology: torch.Tensor, radiology: torch.Tensor) -> torch.Tensor:
        """Fused embedding [N, embed_dim] from uint8 NHWC pathology [N,S,S,3] and radiology [N,S,S,1]."""
        p, r = self.preprocess(pathology, radiology)
        return self._pooled(self._maps(p, r), r)

    def forward_head(self, embedding: torch.Tensor) -> torch.Tensor:
        """Logits [N, num_classes] from the fused embedding (dropout + linear)."""
        return self.head(embedding)

    def forward(self, pathology: torch.Tensor, radiology: torch.Tensor) -> torch.Tensor:
        """Logits float32 [N, num_classes] from uint8 NHWC pathology and radiology images."""
        return self.forward_head(self.forward_features(pathology, radiology))

    def head_weights(self) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The linear head split by branch: ({map name: W [num_classes, branch_dim]}, bias [num_classes]).

        The columns of the head's weight follow the embedding, which concatenates the pooled maps in
        ``forward_maps`` order, so each branch owns one contiguous block of columns.
        """
        linear, width = self.head[-1], self.branch_dim
        # Slices, not torch.split: the exported graph then needs no multi-output Split node.
        names = self.branch_names
        split = {name: linear.weight[:, i * width : (i + 1) * width] for i, name in enumerate(names)}
        return split, linear.bias

    def forward_cams(
        self, pathology: torch.Tensor, radiology: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Logits and the class activation map of every branch the head reads.

        ``CAM[b][n, c, x, y] = sum_k W_b[c, k] * F_b[n, k, x, y]`` with F_b the final map of branch b
        (``forward_maps``) and W_b its block of the head's weight (``head_weights``). The head is
        linear on the average-pooled maps, so for every class, exactly (up to float rounding)::

            logits[:, c] = sum_b CAM[b][:, c].mean((-2, -1)) + bias[c]

        in eval mode (in train mode dropout sits between the pooling and the linear layer).

        Returns:
            (logits [N, num_classes] computed as ``forward`` computes them, {map name: CAM
            [N, num_classes, h, w]}).
        """
        p, r = self.preprocess(pathology, radiology)
        maps = self._maps(p, r)
        logits = self.forward_head(self._pooled(maps, r))
        weights, _ = self.head_weights()
        # A 1x1 convolution of the map with the class weights: the same op in torch and in ONNX.
        cams = {
            name: nn.functional.conv2d(fmap, weights[name][:, :, None, None]) for name, fmap in maps.items()
        }
        return logits, cams


def build_model(cfg: ModelConfig, normalization: dict | None = None) -> FusionNet:
    """Build the network described by ``cfg``.

    Args:
        cfg: architecture.
        normalization: ``{"pathology": {"mean": [3], "std": [3]}, "radiology": {"mean": [1], "std": [1]}}``
            in 0..1 units (``data.channel_stats`` of the training split); placeholders when None.

    Returns:
        The model in training mode, randomly initialised (``load_pretrained`` loads ``cfg.pretrained``).
    """
    model = FusionNet(cfg, normalization)
    n_params = sum(p.numel() for p in model.parameters())
    log.debug("built %s/%s: %.1fM parameters", cfg.backbone, cfg.fusion, n_params / 1e6)
    return model


# ---- pretrained weights (transfer learning)


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
