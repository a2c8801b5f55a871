"""MSKD as a timm training task: ``MSKDTask(model, **MSKD options)`` for timm's task-based ``train.py`` loop.

timm (>= 1.0.31, ``timm.task``) lets a :class:`timm.task.TrainingTask` own the forward and the loss while its loop
owns the update (optimizer, AMP scaler, gradient accumulation, EMA, checkpoints). :class:`MSKDTask` is such a task
around one :class:`mskd_fast.MSKD`::

    task = MSKDTask(model, recipe="stable")                 # model: a timm classifier with a spatial feature map
    optimizer = timm.optim.create_optimizer_v2(task.get_trainable_module(), "sgd", lr=0.01, momentum=0.9)
    out = task(images, targets)                             # {"loss", "output", "bce", "lsd", "rsd", "ssd"}

* ``targets``: multi-hot ``(B, C)`` 0/1 (MSKD's terms need hard labels: no mixup, cutmix or label smoothing);
* ``get_trainable_module()``: the timm model (after :meth:`MSKDTask.prepare_distributed`: the DDP-wrapped student,
  so that timm's loop finds ``no_sync``); ``get_eval_model()``: the timm model (compiled after ``compile``), whose
  ``forward`` is MSKD's ``q``; checkpoints hold its plain timm ``state_dict``;
* ``get_task_state()`` / ``load_task_state()``: MSKD's S-SD snapshot and crop-box generator, so a resume through
  ``timm.utils.CheckpointSaver`` and ``timm.task.resume_task_checkpoint`` continues exactly; the EMA model has no
  task state;
* the teachers (crop teacher and S-SD snapshot) are not sub-modules: their eval behaviour does not follow
  ``task.train()`` or ``trainable_module.train()`` (timm's loop calls the latter);
* ``create_evaluator()``: timm's ``MultiLabelClassificationEvaluator`` (mAP, F1) at ``threshold``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

try:
    from timm.task import TrainingTask
except ImportError as exc:  # pragma: no cover - timm < 1.0.31
    raise ImportError("mskd_fast.integrations.timm needs timm >= 1.0.31 (timm.task); "
                      "pip install -U 'timm>=1.0.31'") from exc

from mskd_fast.mskd import MSKD

__all__ = ["MSKDTask"]


class MSKDTask(TrainingTask):
    """MSKD (:class:`mskd_fast.MSKD`) as a :class:`timm.task.TrainingTask`; see the module docstring.

    Args:
        model: a timm model with a classifier (``num_classes >= 1``) and a spatial ``forward_features`` map.
        threshold: sigmoid threshold of the evaluator's F1 metrics.
        device, dtype, verbose: as :class:`timm.task.TrainingTask`.
        **mskd_options: :class:`mskd_fast.MSKD` options (``recipe``, ``crops``, ``use_ssd``, ``seed``, loss
            settings, ...).
    """

    def __init__(self, model: nn.Module, *, threshold: float = 0.5, device: torch.device | None = None,
                 dtype: torch.dtype | None = None, verbose: bool = True, **mskd_options):
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        self.trainable_module = model
        self.threshold = threshold
        object.__setattr__(self, "mskd", MSKD(model, **mskd_options))  # not a sub-module (its state is task state)

    # ------------------------------------------------------------------ modules
    def get_trainable_module(self, ema: bool = False) -> nn.Module | None:
        if ema:
            return getattr(self, "trainable_module_ema", None)
        if isinstance(self.mskd.student, nn.parallel.DistributedDataParallel):
            return self.mskd.student  # after prepare_distributed: timm's loop looks for no_sync() here
        return self.trainable_module

    def get_eval_model(self, module: nn.Module | None = None, ema: bool = False) -> nn.Module | None:
        if module is not None:
            return module
        if ema:
            return getattr(self, "eval_model_ema", getattr(self, "trainable_module_ema", None))
        return getattr(self, "eval_model", self.trainable_module)

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device: torch.device | None = None,
                  **kwargs) -> nn.Module:
        from timm.utils.model_ema import ModelEmaV3

        self.trainable_module_ema = ModelEmaV3(self.trainable_module, decay=decay, use_warmup=use_warmup,
                                               device=device, **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: int | None = None) -> None:
        if self.has_ema():
            self.trainable_module_ema.update(self.trainable_module, step=step)

    def compile(self, backend: str = "inductor", mode: str | None = None, **compile_kwargs) -> nn.Module:
        """Compile MSKD's tensor region (``fullgraph=True``) and the eval model; returns the latter."""
        self._compile_args = dict(backend=backend, mode=mode)
        self.mskd.compile(fullgraph=True, **self._compile_args)
        self.eval_model = torch.compile(self.trainable_module, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def prepare_distributed(self, device_ids: list | None = None, **ddp_kwargs) -> MSKDTask:
        """Wrap MSKD's student (only it) in ``DistributedDataParallel``; returns ``self``. After :meth:`compile`
        (timm compiles first), the region is recompiled without ``fullgraph`` (DDP splits the graph at its buckets)."""
        self.mskd.prepare_distributed(device_ids=device_ids, **ddp_kwargs)
        if getattr(self, "_compile_args", None) is not None:
            self.mskd.compile(fullgraph=False, **self._compile_args)
        return self

    # ------------------------------------------------------------------ state
    def get_task_state(self, module: nn.Module | None = None, ema: bool = False) -> dict[str, Any]:
        if ema:
            return {}
        return {"mskd": {k: v.detach().cpu() for k, v in self.mskd.state_dict().items()}}

    def load_task_state(self, state: dict[str, Any] | None, strict: bool = True, module: nn.Module | None = None,
                        ema: bool = False) -> None:
        if ema:
            return
        if not state or "mskd" not in state:
            if strict:
                raise ValueError("MSKDTask: the checkpoint has no task_state['mskd'] (the S-SD snapshot and box "
                                 "generator); pass strict=False to start them afresh")
            return
        self.mskd.load_state_dict(state["mskd"])

    # ------------------------------------------------------------------ forward
    def forward(self, input: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
        """``input (B,3,H,W)``, ``target (B,C)`` multi-hot -> ``{"loss", "output", "bce", "lsd", "rsd", "ssd"}``."""
        out = self.mskd(input, target)
        result = {"loss": out["loss"], "output": out["logits"]}
        result.update({k: out[k] for k in self.mskd.terms})
        return result

    def create_evaluator(self, **kwargs):
        from timm.task import MultiLabelClassificationEvaluator

        return MultiLabelClassificationEvaluator(device=self.device, threshold=self.threshold, **kwargs)
