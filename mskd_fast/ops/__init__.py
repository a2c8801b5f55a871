"""Public MSKD operations (stable API).

Losses and graph ops (SPEC 1-4) take ``backend="auto"|"reference"|"triton"``: ``auto`` runs the
fused Triton kernels for CUDA tensors and the PyTorch reference otherwise. ``crop_resize`` and
``roi_pool`` (SPEC 6) run the C++/CUDA extension ``mskd_fast._C`` and fall back to torchvision.
"""

from .crops import crop_resize, roi_pool
from .graph import match_logit_scale, pseudo_labels, reconstruct_logits
from .mbd import kd_loss, mbd_loss, reformulated_softmax
from .relation import relation_loss

__all__ = [
    "reformulated_softmax",
    "mbd_loss",
    "kd_loss",
    "relation_loss",
    "pseudo_labels",
    "reconstruct_logits",
    "match_logit_scale",
    "crop_resize",
    "roi_pool",
]
