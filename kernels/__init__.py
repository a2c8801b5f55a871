"""Fused Triton kernels of mskd-fast, installed as ``mskd_fast.kernels``.

Each op is a ``torch.library.triton_op`` in the ``mskd`` namespace (launched through
``wrap_triton``, differentiable ones with ``register_autograd``), so ``torch.compile`` traces into
the kernels without graph breaks. The public entry points are :func:`mbd_loss`,
:func:`relation_loss` and :func:`reconstruct_logits`; :mod:`mskd_fast.ops` calls them for CUDA
tensors. On CPU tensors they only run under the Triton interpreter (``TRITON_INTERPRET=1``); there
the ops are registered as opaque ``custom_op`` s instead (see :func:`._utils.register_op`), so that
``torch.compile`` of them still works on a machine without a GPU.
"""

from .graph import reconstruct_logits
from .mbd import mbd_loss
from .relation import relation_loss

__all__ = ["mbd_loss", "relation_loss", "reconstruct_logits"]
