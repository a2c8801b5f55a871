"""The student models :class:`mskd_fast.MSKD` accepts, behind one interface.

MSKD needs, from one backbone pass over images ``x (B,3,H,W)``: the image logits ``q (B,C)`` and the logits of the
ROI-pooled crop regions ``r (B,S,C)`` (SPEC 5-6). :func:`as_student` turns what a user has into a module with

* ``forward(x) -> q`` and ``forward(x, boxes (B,S,4)) -> (q, r)`` (one feature map for both),
* ``features(x) -> (B,D,h,w)`` (NCHW view), ``num_classes`` (``C``) and ``classifier_parameters()``.

Accepted (anything else is a ``TypeError`` naming what is missing):

* :class:`mskd_fast.models.MSKDModel` (the trainer's model; also DDP-wrapped): used as it is;
* a timm model (``forward_features`` and ``forward_head``): :class:`TimmStudent`, which runs the model's own head
  (its pooling, norm, dropout and classifier) on the feature map for ``q`` and on each ROI-pooled ``(D,1,1)``
  region for ``r`` (a global pool of a 1x1 map is the identity; ``global_pool='catavgmax'`` doubles the width
  and is refused);
* anything with ``features(x) -> (B,D,h,w)`` and ``head(pooled (N,D)) -> (N,C)``: :class:`ProtocolStudent`,
  ``q = head(mean over h,w)``, ``r = head(roi_pool(...))``; ``C`` from ``model.num_classes`` or, for an
  ``nn.Linear`` head, its ``out_features``.

The adapters wrap the user's module (same parameter objects: the user's optimizer, EMA and checkpoints see the
same tensors). Logits are returned as float32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from mskd_fast.models import MSKDModel, spatial_scale, unwrap

__all__ = ["ProtocolStudent", "TimmStudent", "as_student"]

ROI_MODES = ("max", "avg")


def _spatial(name: str, f: torch.Tensor) -> torch.Tensor:
    if f.dim() != 4:
        raise ValueError(f"model: {name} returned shape {tuple(f.shape)}; MSKD needs a spatial feature map (B,D,h,w) "
                         "(or (B,h,w,D) with output_fmt='NHWC'); token-sequence models such as a plain ViT have none")
    return f


def _crop_logits(head, f: torch.Tensor, x: torch.Tensor, boxes: torch.Tensor, roi_mode: str, as_map: bool):
    from mskd_fast.ops import roi_pool

    batch, crops = boxes.shape[0], boxes.shape[1]
    pooled = roi_pool(f, boxes, spatial_scale(f, x), output_size=1, mode=roi_mode)  # (B*S, D, 1, 1)
    logits = head(pooled if as_map else pooled.flatten(1))
    return logits.float().reshape(batch, crops, -1)


class TimmStudent(nn.Module):
    """A timm classifier as an MSKD student: ``q`` = the model's ``forward_head`` on its feature map, ``r`` = the
    same ``forward_head`` on each ROI-pooled region (SPEC 6: the student's head on the crop's pooled features).

    Args:
        model: a timm model with a classifier (``num_classes >= 1``) and a spatial ``forward_features`` map.
        roi_mode: ``"max"`` (SPEC default) or ``"avg"`` (see :func:`mskd_fast.ops.roi_pool`).
    """

    def __init__(self, model: nn.Module, roi_mode: str = "max"):
        super().__init__()
        num_classes = getattr(model, "num_classes", None)
        if not isinstance(num_classes, int) or num_classes < 1:
            raise TypeError(f"model: {type(model).__name__} has num_classes={num_classes!r}; MSKD needs the model's "
                            "own classifier (create it with num_classes=C >= 1)")
        if str(getattr(model, "global_pool", "")) == "catavgmax" or "catavgmax" in str(getattr(model, "head", "")):
            raise TypeError("model: global_pool='catavgmax' changes the feature width; use 'avg' for MSKD")
        if roi_mode not in ROI_MODES:
            raise ValueError(f"roi_mode must be one of {ROI_MODES}, got {roi_mode!r}")
        self.model = model
        self.num_classes = num_classes
        self.roi_mode = roi_mode
        self.nhwc = str(getattr(model, "output_fmt", "NCHW")).upper() == "NHWC"

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``(B,D,h,w)`` feature map (an NCHW view of an NHWC map)."""
        f = _spatial(f"{type(self.model).__name__}.forward_features", self.model.forward_features(x))
        return f.permute(0, 3, 1, 2) if self.nhwc else f

    def _head(self, f: torch.Tensor) -> torch.Tensor:
        return self.model.forward_head(f.permute(0, 2, 3, 1) if self.nhwc else f)

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None):
        f = self.features(x)
        q = self._head(f).float()
        if boxes is None:
            return q
        return q, _crop_logits(self._head, f, x, boxes, self.roi_mode, as_map=True)

    def classifier_parameters(self):
        """The parameters of the final classifier (the training diagnostics' gradients are taken there)."""
        return self.model.get_classifier().parameters()


class ProtocolStudent(nn.Module):
    """Any module with ``features(x) -> (B,D,h,w)`` and ``head(pooled (N,D)) -> (N,C)`` as an MSKD student:
    ``q = head(features.mean((2,3)))``, ``r = head(roi_pool(features, boxes))``."""

    def __init__(self, model: nn.Module, roi_mode: str = "max"):
        super().__init__()
        num_classes = getattr(model, "num_classes", None)
        head = model.head
        if num_classes is None and isinstance(head, nn.Linear):
            num_classes = head.out_features
        if not isinstance(num_classes, int) or num_classes < 1:
            raise TypeError(f"model: cannot tell the number of classes of {type(model).__name__}: give it an int "
                            "attribute num_classes (or make its head an nn.Linear)")
        if roi_mode not in ROI_MODES:
            raise ValueError(f"roi_mode must be one of {ROI_MODES}, got {roi_mode!r}")
        self.model = model
        self.num_classes = num_classes
        self.roi_mode = roi_mode

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return _spatial(f"{type(self.model).__name__}.features", self.model.features(x))

    def forward(self, x: torch.Tensor, boxes: torch.Tensor | None = None):
        f = self.features(x)
        q = self.model.head(f.mean(dim=(2, 3))).float()
        if boxes is None:
            return q
        return q, _crop_logits(self.model.head, f, x, boxes, self.roi_mode, as_map=False)

    def classifier_parameters(self):
        head = self.model.head
        return head.parameters() if isinstance(head, nn.Module) else iter(())


def as_student(model: nn.Module, roi_mode: str | None = None) -> nn.Module:
    """``model`` as a module with MSKD's student interface (see the module docstring); DDP wrappers are kept.

    ``roi_mode``: for the adapters (``None``: ``"max"``); an ``MSKDModel`` keeps its own.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    inner = unwrap(model)
    if isinstance(inner, (MSKDModel, TimmStudent, ProtocolStudent)):
        if roi_mode is not None and roi_mode != inner.roi_mode:
            raise ValueError(f"roi_mode={roi_mode!r} but the model pools with {inner.roi_mode!r}")
        return model
    if inner is not model:
        raise TypeError(f"model: a wrapped {type(inner).__name__} is not accepted; pass the model itself and wrap "
                        "MSKD's student for DDP (MSKD.prepare_distributed)")
    mode = roi_mode or "max"
    if callable(getattr(model, "forward_features", None)) and callable(getattr(model, "forward_head", None)):
        return TimmStudent(model, mode)
    if callable(getattr(model, "features", None)) and callable(getattr(model, "head", None)):
        return ProtocolStudent(model, mode)
    missing = [name for name in ("forward_features", "forward_head") if not callable(getattr(model, name, None))]
    raise TypeError(f"model: {type(model).__name__} is neither a timm model (missing {', '.join(missing)}), an "
                    "MSKDModel, nor follows the protocol features(x) -> (B,D,h,w) and head(pooled) -> (B,C)")


def classifier_parameters(student: nn.Module):
    """The final classifier's parameters of a student from :func:`as_student`."""
    inner = unwrap(student)
    if isinstance(inner, MSKDModel):
        return inner.fc.parameters()
    return inner.classifier_parameters()
