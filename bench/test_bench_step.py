"""Trainer step throughput: the MSKD step vs the vanilla (BCE) step vs the "backbone floor", same settings.

Groups (one per setting; entries measured in the same run, ``floor`` is the baseline):

* ``step-resnet34-B64-224-C20-S4-bf16-compiled-cuda`` (the issue's target: MSKD <= 1.15x the floor's
  time, peak memory <= 1.3x vanilla's);
* ``step-resnet10t-B8-64-C20-S4-bf16-eager-cpu`` (a small CPU entry).

Entries (one full optimizer step each: forward, backward, clipping, fused SGD, LR schedule):

* ``vanilla``: ``TrainStep`` around ``VanillaBCE`` (BCE only, no crops, no teacher);
* ``floor``: the vanilla step plus a no-grad eval-mode forward of ``S*B`` crops and of the ``B``
  images (the teacher's work of the MSKD step; done as one forward of ``(S+1)*B`` inputs, its fastest
  form, compiled in the compiled setting). The crops are precomputed, so the floor excludes box sampling,
  ``crop_resize``, ROI pooling, the three self-distillation losses and the S-SD parameter snapshot (its copy
  per update and its separate forward): the MSKD step's overhead over the floor is exactly that;
* ``mskd``: ``TrainStep`` around :class:`mskd_fast.MSKD` with every term on (S-SD active: ``q_prev`` from the
  parameter snapshot);
* ``mskd-diagnosed``: the ``mskd`` step with the training diagnostics on (``diagnose=True``: the per-term
  gradients on the classifier, :mod:`mskd_fast.diagnostics`), which the trainer does every ``--log-interval``
  steps; its ratio to ``mskd`` is the cost of one diagnosed step;
* ``plain``: :class:`PlainMSKDStep`, the careful plain-PyTorch MSKD step a user would write (the same
  objective, the reference losses, torchvision ``roi_align`` crops and ``roi_pool`` regions, S-SD from a parameter
  snapshot taken before each optimizer step), compiled the same way (fullgraph forward) in the compiled setting.

``bench/report.py`` prints, per group, MSKD against the floor, vanilla and the plain step (time and peak memory).

``extra_info`` records images/s (``B / mean``) and, on CUDA, peak memory (MiB) of the timed rounds.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torchvision.ops import roi_align
from torchvision.ops import roi_pool as tv_roi_pool

from mskd_fast import reference as ref
from mskd_fast.losses import MSKDLoss
from mskd_fast.models import create_model, eval_twin, spatial_scale
from mskd_fast.mskd import MSKD, VanillaBCE
from mskd_fast.step import StepConfig, TrainStep, build_optimizer, sample_boxes

SETTINGS = {
    "cuda": dict(model="resnet34", batch=64, size=224, classes=20, crops=4, compile=True, kwargs={}),
    "cpu": dict(model="resnet10t", batch=8, size=64, classes=20, crops=4, compile=False, kwargs={}),
}


class PlainMSKDStep:
    """The MSKD step as a careful user would write it in plain PyTorch: the baseline of the ``plain`` entry.

    Same objective and settings as ``TrainStep`` with every term on (``loss_fn``'s weights, temperature, MBD form
    and R-SD teacher scaling), but built from ``mskd_fast.reference`` losses and torchvision ops: crops by
    ``roi_align(images, rois, (H, W), 1, sampling_ratio=1, aligned=True)``, regions by ``roi_pool`` (``roi_align``
    mean for ``roi_mode="avg"``) on the student's feature map; the teacher (``eval_twin``) forwards the crops under
    no grad. S-SD: a second eval-mode copy of the model holds a snapshot of the parameters and buffers taken just
    before each optimizer step (one ``foreach`` copy), so ``q_prev`` of the next batch is a no-grad forward of
    that batch with the previous step's parameters (absent at the first step). Then backward, gradient-norm
    clipping and the same fused SGD. ``compile=True`` compiles the forward with ``fullgraph=True``. No
    non-finite-step protection (TrainStep's is free of host syncs; a user's would not be).
    """

    def __init__(self, model, teacher, loss_fn: MSKDLoss, optimizer, config: StepConfig, generator, *,
                 crops: int = 4, compile: bool = False):
        self.model, self.teacher, self.loss_fn = model, teacher, loss_fn
        self.optimizer, self.config, self.generator, self.crops = optimizer, config, generator, crops
        self.previous = copy.deepcopy(teacher).eval().requires_grad_(False)  # independent tensors
        self.live = list(model.parameters()) + [b for b in model.buffers() if b.is_floating_point()]
        self.snap = list(self.previous.parameters()) + [b for b in self.previous.buffers() if b.is_floating_point()]
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.has_previous = False
        self.forward = torch.compile(self.forward_loss, fullgraph=True, dynamic=False) if compile \
            else self.forward_loss

    def forward_loss(self, images, targets, boxes, with_previous: bool):
        lf = self.loss_fn
        batch, crops, height, width = images.shape[0], boxes.shape[1], images.shape[-2], images.shape[-1]
        rois = ref.boxes_to_rois(boxes)
        with torch.autocast(images.device.type, dtype=torch.bfloat16):
            with torch.no_grad():
                patches = roi_align(images.float(), rois, (height, width), 1.0, sampling_ratio=1, aligned=True)
                o = self.teacher(patches.contiguous(memory_format=torch.channels_last)).view(batch, crops, -1)
                q_prev = self.previous(images) if with_previous else None
            f = self.model.features(images)
            q = self.model.head(f.mean(dim=(2, 3)))
            scale = spatial_scale(f, images)
            # torchvision's ROI kernels have no bfloat16 CPU path (and autocast runs them in float32 on CUDA)
            if self.model.roi_mode == "max":
                pooled = tv_roi_pool(f.float(), rois, (1, 1), scale)
            else:
                pooled = roi_align(f.float(), rois, (1, 1), scale, sampling_ratio=-1, aligned=True)
            r = self.model.head(pooled.flatten(1)).view(batch, crops, -1)
        mbd = dict(temperature=lf.temperature, omega=lf.omega, gamma_pos=lf.gamma_pos, gamma_neg=lf.gamma_neg,
                   form=lf.mbd_form)
        total = F.binary_cross_entropy_with_logits(q, targets)
        lsd = ref.relation_loss(r, o, delta=lf.delta)
        z = ref.reconstruct_logits(o, q.detach(), targets, layers=lf.layers)
        if lf.rsd_teacher_scale == "match":
            z = ref.match_logit_scale(z, q.detach())
        total = total + lf.iota * lsd + lf.kappa * ref.mbd_loss(q, z, targets, **mbd)
        ssd = total.new_zeros(())
        if q_prev is not None:
            ssd = ref.mbd_loss(q, q_prev, targets, **mbd)
            total = total + lf.lam * ssd
        return total, ssd.detach()

    def __call__(self, images, targets):
        boxes = sample_boxes(images.shape[0], self.crops, images.shape[-2], images.shape[-1], "random",
                             self.generator, images.device)
        self.optimizer.zero_grad(set_to_none=True)
        total, ssd = self.forward(images, targets, boxes, self.has_previous)
        total.backward()
        torch.nn.utils.clip_grad_norm_(self.params, self.config.clip_grad, foreach=True)
        with torch.no_grad():
            torch._foreach_copy_(self.snap, self.live)  # the parameters before this optimizer step
        self.optimizer.step()
        self.has_previous = True
        return {"total": total.detach(), "ssd": ssd}


def _make(kind, device, s):
    torch.manual_seed(0)
    model, _ = create_model(s["model"], s["classes"], **s["kwargs"])
    model = model.to(device).to(memory_format=torch.channels_last)
    teacher = eval_twin(model)
    model.train()
    config = StepConfig(amp_dtype=torch.bfloat16)
    opt = build_optimizer(model, 0.01)
    gen = torch.Generator(device=device).manual_seed(1)
    if kind == "plain":
        return PlainMSKDStep(model, teacher, MSKDLoss(recipe="stable"), opt, config, gen, crops=s["crops"],
                             compile=s["compile"]), teacher
    if kind in ("vanilla", "floor"):
        method = VanillaBCE(model, generator=gen, channels_last=True)
    else:  # mskd, mskd-diagnosed
        method = MSKD(model, recipe="stable", crops=s["crops"], generator=gen, channels_last=True)
    step = TrainStep(method, opt, None, config, compile=s["compile"])
    return step, teacher


def _inputs(device, s, seed):
    g = torch.Generator().manual_seed(seed)
    b, size, c = s["batch"], s["size"], s["classes"]
    images = torch.randn(b, 3, size, size, generator=g).to(device).contiguous(memory_format=torch.channels_last)
    targets = (torch.rand(b, c, generator=g) < 0.15).float().to(device)
    targets[:, 0] = 1
    return images, targets


@pytest.mark.parametrize("kind", ["floor", "vanilla", "mskd", "mskd-diagnosed", "plain"])
def test_bench_train_step(benchmark, bench_run, device, kind):
    s = SETTINGS[device.type]
    mode = "compiled" if s["compile"] else "eager"
    benchmark.group = (f"step-{s['model']}-B{s['batch']}-{s['size']}-C{s['classes']}-S{s['crops']}-bf16-{mode}"
                       f"-{device.type}")
    torch._dynamo.reset()
    step, teacher = _make(kind, device, s)
    x1, y1 = _inputs(device, s, 1)
    x2, y2 = _inputs(device, s, 2)
    if kind == "floor":
        crops = torch.randn(s["batch"] * s["crops"], 3, s["size"], s["size"], device=device)
        teacher_in = torch.cat([crops.contiguous(memory_format=torch.channels_last), x1])

        def forward(x):
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16):
                return teacher(x)

        teacher_fwd = torch.compile(forward, fullgraph=True, dynamic=False) if s["compile"] else forward

        def run():
            teacher_fwd(teacher_in)
            return step(x1, y1)
    else:
        batches = [(x1, y1), (x2, y2)]
        state = {"i": 0}

        def run():  # alternate two batches (S-SD active from the second step on)
            i = state["i"]
            state["i"] = 1 - i
            x, y = batches[i]
            if kind == "mskd-diagnosed":
                return step(x, y, diagnose=True)
            return step(x, y)

    out = bench_run(benchmark, run, device=device, warmup=3, kind=kind, batch=s["batch"])
    assert torch.isfinite(out["total"])
    if kind == "mskd-diagnosed":
        assert torch.isfinite(out["gcos_rsd"]) and torch.isfinite(out["gnorm_bce"])
    if kind in ("mskd", "mskd-diagnosed", "plain"):
        assert out["ssd"] != 0  # S-SD was active in the timed steps
    if benchmark.stats is not None:  # None under --benchmark-disable (the CI smoke run)
        benchmark.extra_info["images_per_s"] = s["batch"] / benchmark.stats.stats.mean
    benchmark.extra_info["baseline"] = kind == "floor"
