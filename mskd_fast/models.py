"""timm backbones for MSKD: one feature map, a pooled head for ``q``, the same head on ROI features for ``r``.

``MSKDModel(x)`` returns image logits ``q (B,C)``; ``MSKDModel(x, boxes)`` returns ``(q, r)`` with
``r (B,S,C)`` = the head applied to ``roi_pool(features(x), boxes, spatial_scale=h/H)`` (SPEC notation).
Both come from one backbone pass, so a DDP-wrapped model sees a single forward per step.

Any timm model whose ``forward_features`` returns a spatial map works: NCHW maps (ResNet, MobileNet,
ConvNeXt, ...) are used as they are, NHWC maps (models with ``output_fmt == "NHWC"``, e.g. Swin) are
permuted to NCHW (a free view; with a contiguous NHWC map the result has channels-last strides).
Token sequences (plain ViT) have no spatial map and are refused with a clear error.

Decisions the SPEC leaves open (documented here):
* the image head is global *average* pooling followed by one ``nn.Linear`` (timm's default head);
  the crop head is the same ``nn.Linear`` on the ROI-pooled vector (``roi_pool`` output size 1, so its
  global pool is the identity);
* timm's classifier dropout (``drop_rate``, e.g. ``--model-kwargs drop_rate=0.2``) lives in timm's own head,
  which MSKD replaces; :class:`MSKDModel` applies it itself, to the pooled vector before the linear head, on
  both the image and the crop path (in training mode only: the eval teacher never drops);
* the linear head always runs in float32 outside autocast, so ``q``, ``r`` and teacher logits are fp32
  whatever the AMP dtype (it is a ``(N,D) x (D,C)`` product: negligible cost);
* ``spatial_scale = h / H`` from the real shapes; a map whose ``h/H`` differs from ``w/W`` is refused,
  because ``roi_pool`` takes one scale.
"""

from __future__ import annotations

import copy
import os
import warnings
from dataclasses import dataclass
from itertools import chain
from urllib.parse import urlparse

import torch
import torch.nn as nn

__all__ = [
    "MSKDModel",
    "PretrainedWeightsMissing",
    "check_model",
    "create_model",
    "eval_twin",
    "find_cached_pretrained",
    "hub_offline",
    "load_initial_checkpoint",
    "unwrap",
]


class PretrainedWeightsMissing(FileNotFoundError):
    """``--pretrained`` was asked for but no weights for the model are in the local cache."""


class MSKDModel(nn.Module):
    """A timm backbone plus a linear classifier shared by the image and the crop paths.

    Args:
        backbone: a timm model created with ``num_classes=0`` (its own classifier removed).
        num_classes: ``C``.
        roi_mode: ``"max"`` (SPEC default, ``torchvision.ops.roi_pool``) or ``"avg"`` (``roi_align`` mean).
    """

    def __init__(self, backbone: nn.Module, num_classes: int, roi_mode: str = "max"):
        super().__init__()
        if not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if roi_mode not in ("max", "avg"):
            raise ValueError(f"roi_mode must be 'max' or 'avg', got {roi_mode!r}")
        num_features = getattr(backbone, "num_features", None)
        if not isinstance(num_features, int) or num_features < 1:
            raise TypeError(f"backbone {type(backbone).__name__} has no integer `num_features` attribute")
        self.backbone = backbone
        self.nhwc = str(getattr(backbone, "output_fmt", "NCHW")).upper() == "NHWC"
        self.num_features = num_features
        self.num_classes = num_classes
        self.roi_mode = roi_mode
        drop_rate = float(getattr(backbone, "drop_rate", 0.0) or 0.0)
        if not 0.0 <= drop_rate < 1.0:
            raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
        self.head_drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.fc = nn.Linear(num_features, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Backbone feature map ``(B,D,h,w)`` of images ``x (B,3,H,W)`` (NCHW view; may be channels-last)."""
        f = self.backbone.forward_features(x)
        if f.dim() != 4:
            raise ValueError(
                f"{type(self.backbone).__name__}.forward_features returned shape {tuple(f.shape)}: MSKD needs a "
                "spatial feature map (B,D,h,w) or (B,h,w,D); token-sequence models (e.g. plain ViT) are not supported"
            )
        if self.nhwc:
            f = f.permute(0, 3, 1, 2)
        if f.shape[1] != self.num_features:
            raise ValueError(
                f"feature map has {f.shape[1]} channels but the backbone reports num_features={self.num_features} "
                f"(shape {tuple(f.shape)}; is the output format NHWC without output_fmt='NHWC'?)"
            )
        return f

    def head(self, pooled: torch.Tensor) -> torch.Tensor:
        """Logits ``(N,C)`` float32 from pooled features ``(N,D)`` (run outside autocast; head dropout first)."""
        with torch.autocast(pooled.device.type, enabled=False):
            return self.fc(self.head_drop(pooled.float()))

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None, *, with_features: bool = False):
        """``q (B,C)`` for ``x (B,3,H,W)``; with ``boxes (B,S,4)`` (input pixels, x1,y1,x2,y2) also ``r (B,S,C)``.

        Crop rows are image-major: ``r[i, s]`` is crop ``s`` of image ``i``. ``with_features=True`` (no boxes)
        returns ``(q, pooled)`` with the globally pooled features ``pooled (B,D)`` the head reads (for methods
        with a loss on features, which must forward through a DDP wrapper).
        """
        f = self.features(x)
        pooled = f.mean(dim=(2, 3))
        q = self.head(pooled)
        if with_features:
            if boxes is not None:
                raise ValueError("with_features=True returns (q, pooled) and takes no boxes")
            return q, pooled
        if boxes is None:
            return q
        from mskd_fast.ops import roi_pool

        batch, crops = boxes.shape[0], boxes.shape[1]
        scale = spatial_scale(f, x)
        pooled = roi_pool(f, boxes, scale, output_size=1, mode=self.roi_mode)
        r = self.head(pooled.flatten(1)).view(batch, crops, self.num_classes)
        return q, r


def spatial_scale(features: torch.Tensor, images: torch.Tensor) -> float:
    """``h / H`` for a feature map ``(B,D,h,w)`` of images ``(B,3,H,W)``; refuses unequal h/H and w/W."""
    h, w = features.shape[-2], features.shape[-1]
    big_h, big_w = images.shape[-2], images.shape[-1]
    scale_h, scale_w = h / big_h, w / big_w
    if abs(scale_h - scale_w) > 1e-9:
        raise ValueError(
            f"feature map {h}x{w} of a {big_h}x{big_w} input has different vertical/horizontal scales "
            f"({scale_h:.6g} vs {scale_w:.6g}); roi_pool takes one spatial_scale: use square inputs"
        )
    return scale_h


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        else:
            return model


def eval_twin(model: nn.Module) -> nn.Module:
    """A copy of ``model`` that shares every parameter and buffer object with it and stays in eval mode.

    The twin is the MSKD "teacher": the current parameters with BatchNorm/Dropout in eval behaviour, and
    since BN in eval mode only reads the running statistics it never updates them. Because the tensors are
    shared (not copied), optimizer steps, BN statistic updates of the student and ``load_state_dict`` on the
    student are seen by the twin immediately. Create it after moving ``model`` to its device/memory format
    (``Module.to`` replaces buffers, which would untie them).
    """
    memo = {id(t): t for t in chain(model.parameters(), model.buffers())}
    twin = copy.deepcopy(model, memo)
    twin.eval()
    return twin


def batch_stat_twin(model: nn.Module) -> nn.Module:
    """Like :func:`eval_twin`, but BatchNorm layers normalise with the statistics of the batch they see.

    An opt-in teacher for from-scratch experiments (``--teacher-bn batch``); SPEC 5's teacher is
    :func:`eval_twin`. BatchNorm runs in train mode with ``track_running_stats=False`` on the twin only,
    so it uses batch statistics and never updates the shared running statistics; Dropout and every other
    layer stay in eval behaviour. The twin must not be used for evaluation.
    """
    twin = eval_twin(model)
    for module in twin.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            module.train()
            module.track_running_stats = False
    return twin


@dataclass
class CachedWeights:
    """Where ``find_cached_pretrained`` found weights: a local ``path`` and which ``source`` cache held it."""

    path: str
    source: str


def find_cached_pretrained(model_name: str) -> CachedWeights | None:
    """Locate timm pretrained weights for ``model_name`` in the local caches, without any network access.

    Looks in the Hugging Face hub cache (``HF_HUB_CACHE`` / ``HF_HOME``) for the model's ``hf_hub_id`` and in
    the torch hub checkpoint folder (``TORCH_HOME``) for its legacy URL. Returns ``None`` if neither has it.
    """
    from timm.models import get_pretrained_cfg

    cfg = get_pretrained_cfg(model_name, allow_unregistered=False)
    if cfg is None:
        return None
    if cfg.file and os.path.isfile(cfg.file):
        return CachedWeights(cfg.file, "file")
    if cfg.hf_hub_id:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
            try_to_load_from_cache = None
        if try_to_load_from_cache is not None:
            names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
            for filename in names:
                found = try_to_load_from_cache(cfg.hf_hub_id, filename)
                if isinstance(found, str) and os.path.isfile(found):
                    return CachedWeights(found, "huggingface hub cache")
    if cfg.url:
        path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(urlparse(cfg.url).path))
        if os.path.isfile(path):
            return CachedWeights(path, "torch hub cache")
    return None


def _timm_create(name: str, img_size: int | None, **kwargs) -> nn.Module:
    import timm

    if img_size is not None:
        try:
            return timm.create_model(name, img_size=img_size, **kwargs)
        except TypeError as exc:  # models without an img_size argument (CNNs) take any input size
            if "img_size" not in str(exc):
                raise
    return timm.create_model(name, **kwargs)


def _check_model_name(name) -> None:
    import timm

    if not isinstance(name, str) or not timm.is_model(name):
        close = timm.list_models(f"*{str(name).split('.')[0][:8]}*")[:8]
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ValueError(f"--model {name!r} is not a timm model name{hint}")


_SUPPORTED_EXAMPLES = "resnet34, mobilenetv2_100, convnext_tiny, swin_tiny_patch4_window7_224"


DROP_RATES = ("drop_rate", "drop_path_rate", "drop_block_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate")


def _check_rates(timm_kwargs: dict) -> None:
    """timm's dropout-like arguments must be numbers in [0, 1) (timm itself accepts a string and fails later)."""
    for key in DROP_RATES:
        if key in timm_kwargs:
            value = timm_kwargs[key]
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ValueError(f"--model-kwargs {key} must be a number in [0, 1), got {value!r}")


def check_model(name: str, *, img_size: int | None = None, **timm_kwargs) -> tuple[int, int, int] | None:
    """Check that timm model ``name`` can serve as an MSKD backbone, without allocating any weights.

    Builds the backbone on the ``meta`` device (shapes only, no memory, no initialisation cost) with
    the run's ``img_size`` and ``timm_kwargs`` and runs :meth:`MSKDModel.features` on a meta image, so
    the same rules apply as in training: a spatial feature map (NCHW, or NHWC with ``output_fmt``) whose
    channels equal ``num_features`` and whose vertical and horizontal scales agree.

    Returns the feature map's ``(D, h, w)``, or ``None`` when the model cannot be probed on the meta
    device (some op without a meta kernel): then the check is left to the real build. Raises
    ``ValueError`` naming ``--model`` / ``--model-kwargs`` for an unknown name, a model without a
    spatial feature map (e.g. plain ViT), or arguments timm rejects.
    """
    _check_model_name(name)
    _check_rates(timm_kwargs)
    size = 224 if img_size is None else img_size
    try:
        with torch.device("meta"):
            backbone = _timm_create(name, img_size, pretrained=False, num_classes=0, **timm_kwargs)
            model = MSKDModel(backbone, 1).eval()
            images = torch.empty(1, 3, size, size)
            with torch.no_grad():
                features = model.features(images)
            spatial_scale(features, images)
    except (TypeError, AssertionError, RuntimeError, NotImplementedError, ValueError) as exc:
        if "meta" in str(exc).lower():
            return None
        if isinstance(exc, ValueError) and "feature map" in str(exc):
            raise ValueError(
                f"--model {name!r} is not supported: {exc}. Use a model with a spatial feature map, "
                f"e.g. {_SUPPORTED_EXAMPLES}"
            ) from None
        given = f" and --model-kwargs {timm_kwargs}" if timm_kwargs else ""
        raise ValueError(
            f"--model {name!r} cannot be built with --img-size {size}{given}: {type(exc).__name__}: {exc}"
        ) from None
    return tuple(features.shape[1:])


def hub_offline() -> bool:
    """Whether the Hugging Face hub is switched off (``HF_HUB_OFFLINE`` set to 1/true/yes/on, now or at import)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE"):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - huggingface_hub is a timm dependency
        return False
    return bool(getattr(constants, "HF_HUB_OFFLINE", False))


def _missing_weights_message(name: str, why: str) -> str:
    return (f"--pretrained: no weights for timm model {name!r} in the local cache (searched the Hugging Face hub "
            f"cache and {os.path.join(torch.hub.get_dir(), 'checkpoints')}) and {why}. Fetch them once on a "
            f"machine with network access (python -c \"import timm; timm.create_model('{name}', pretrained=True)\") "
            "and copy the cache, or pass --initial-checkpoint PATH, or add --allow-random-init to train from "
            "scratch.")


def create_model(
    name: str,
    num_classes: int,
    *,
    pretrained: bool = False,
    allow_random_init: bool = False,
    img_size: int | None = None,
    roi_mode: str = "max",
    **timm_kwargs,
) -> tuple[MSKDModel, str]:
    """Build ``MSKDModel`` around ``timm.create_model(name, num_classes=0)``; returns ``(model, init_note)``.

    ``pretrained=True`` loads timm's weights as timm does: from the local cache when they are there (Hugging Face
    hub cache, torch hub checkpoints; no network), else downloaded by timm's own loader through the Hugging Face
    hub into its usual cache. When the hub is offline (``HF_HUB_OFFLINE=1``) or the download fails, raises
    ``PretrainedWeightsMissing`` with instructions, unless ``allow_random_init`` is set, in which case it warns
    and continues from random initialisation. ``img_size`` is passed to models that take it (Swin/ViT-style
    models are built for a fixed size). ``init_note`` says how the weights were initialised, for the run log.
    """
    _check_model_name(name)
    kwargs = dict(num_classes=0, **timm_kwargs)
    if not pretrained:
        return MSKDModel(_timm_create(name, img_size, pretrained=False, **kwargs), num_classes,
                         roi_mode=roi_mode), "random init"
    found = find_cached_pretrained(name)
    if found is not None:
        backbone = _timm_create(name, img_size, pretrained=True,
                                pretrained_cfg_overlay={"file": found.path, "source": ""}, **kwargs)
        return MSKDModel(backbone, num_classes, roi_mode=roi_mode), f"pretrained from {found.source}: {found.path}"
    if hub_offline():
        msg = _missing_weights_message(name, "the Hugging Face hub is offline (HF_HUB_OFFLINE=1)")
    else:
        try:
            backbone = _timm_create(name, img_size, pretrained=True, **kwargs)
        except Exception as exc:  # no network, a proxy, a missing file on the hub: all end the same way
            msg = _missing_weights_message(name, f"downloading them failed ({type(exc).__name__}: {exc})")
        else:
            return (MSKDModel(backbone, num_classes, roi_mode=roi_mode),
                    "pretrained, downloaded by timm through the Hugging Face hub")
    if not allow_random_init:
        raise PretrainedWeightsMissing(msg)
    warnings.warn(msg + " Continuing from random init (--allow-random-init).", stacklevel=2)
    backbone = _timm_create(name, img_size, pretrained=False, **kwargs)
    return (MSKDModel(backbone, num_classes, roi_mode=roi_mode),
            "random init (pretrained weights missing, --allow-random-init)")


def load_initial_checkpoint(model: MSKDModel, path: str) -> str:
    """Load weights from ``path`` into ``model``; returns a one-line description of what was loaded.

    Accepts an mskd-fast checkpoint (``{"model": MSKDModel state}``), a bare ``MSKDModel`` state dict, or a
    timm backbone state dict (the timm classifier keys are ignored). A classifier whose shape differs
    (other ``num_classes``) is left at its initialisation. Raises ``FileNotFoundError`` for a missing file
    and ``ValueError`` if no backbone tensor matches.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--initial-checkpoint: no such file: {path}")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ValueError(f"--initial-checkpoint: cannot read {path}: {exc}") from exc
    state = blob
    for key in ("model", "state_dict", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"--initial-checkpoint: {path} does not hold a state dict of tensors")
    state = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in state.items()}
    own = model.state_dict()
    if not any(k.startswith("backbone.") for k in state):
        state = {f"backbone.{k}": v for k, v in state.items()}
    usable, skipped = {}, []
    for key, value in state.items():
        if key in own and own[key].shape == value.shape:
            usable[key] = value
        else:
            skipped.append(key)
    backbone_keys = [k for k in own if k.startswith("backbone.")]
    loaded_backbone = [k for k in backbone_keys if k in usable]
    if not loaded_backbone:
        raise ValueError(
            f"--initial-checkpoint: no tensor of {path} matches the backbone of this model "
            f"(first keys in the file: {list(state)[:5]})"
        )
    missing = [k for k in backbone_keys if k not in usable]
    if missing:
        raise ValueError(
            f"--initial-checkpoint: {path} lacks {len(missing)} backbone tensors of this model "
            f"(e.g. {missing[:5]}); wrong --model?"
        )
    model.load_state_dict(usable, strict=False)
    head = "with classifier" if "fc.weight" in usable else "classifier left at init"
    extra = f", ignored {len(skipped)} keys (e.g. {skipped[:3]})" if skipped else ""
    return f"initial checkpoint {path}: {len(loaded_backbone)} backbone tensors, {head}{extra}"
