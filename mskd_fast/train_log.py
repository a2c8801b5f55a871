"""What the trainer prints: the run header, progress text, the epoch line and the final summary."""

from __future__ import annotations

import sys
import time

__all__ = ["TERMS", "diagnostics_text", "epoch_line", "final_summary", "header", "progress_text", "say", "terms_for"]

TERMS = ("loss", "bce", "lsd", "rsd", "ssd")  # mskd and vanilla (vanilla's SD terms are 0)


def terms_for(method: str) -> tuple[str, ...]:
    """The loss columns (epoch means in summary.csv, the epoch line) of ``--method``: ``loss`` first.

    :data:`TERMS` for mskd/vanilla; ``loss`` and the method object's ``terms`` for the others
    (:mod:`mskd_fast.methods`).
    """
    if method in ("mskd", "vanilla"):
        return TERMS
    from mskd_fast.methods import method_terms

    return ("loss", *method_terms(method))


def say(msg: str) -> None:
    """Print one message without breaking a tqdm progress bar."""
    try:
        from tqdm import tqdm

        tqdm.write(msg)
    except ImportError:  # pragma: no cover
        print(msg, flush=True)
    sys.stdout.flush()


def header(t) -> str:
    """The run header of trainer ``t``: model, data, device, schedule, MSKD settings, resume state, folder."""
    a = t.args
    amp = str(t.amp_dtype).removeprefix("torch.") if t.amp_dtype is not None else "off"
    lines = [
        f"mskd_fast.train: {a.method} | {a.model} ({t.init_note}) | {a.dataset}, {t.num_classes} classes",
        f"  train {t.train_index.summary()}",
        f"  eval  {t.eval_index.summary()}",
        f"  device {t.device} x{t.ctx.world_size} | loader {t.loader_backend} | img {a.img_size}px | "
        f"batch {a.batch_size}/process | epochs {a.epochs} x {t.steps_per_epoch} steps | "
        f"lr {a.lr} (backbone x{a.lr_backbone_mult}) {a.sched} warmup {a.warmup_epochs} | "
        f"clip-grad {a.clip_grad or 'off'} | amp {amp} | compile {a.compile} | channels_last {a.channels_last}",
    ]
    if a.method == "mskd":
        lines.append(f"  MSKD recipe {a.recipe}: MBD form {a.mbd_form}, R-SD teacher scale {a.rsd_teacher_scale} | "
                     f"S={a.crops} {a.crop_mode} crops, T={a.temperature} omega={a.omega} "
                     f"gamma+={a.gamma_pos} gamma-={a.gamma_neg} layers={a.gp_layers} iota={a.iota} "
                     f"kappa={a.kappa} lambda={a.lam} L-SD terms {a.lsd_terms} R-SD teacher {a.rsd_teacher_reduce} "
                     f"crop-T {a.rsd_crop_temperature} | L-SD {not a.no_lsd} R-SD {not a.no_rsd} "
                     f"S-SD {not a.no_ssd} MBD {not a.no_mbd} | teacher BN {a.teacher_bn}"
                     + (f" | SD warm-up {a.sd_warmup_epochs} epochs" if getattr(a, "sd_warmup_epochs", 0) else ""))
    elif a.method != "vanilla":
        lines.append(f"  {t.method.title}: {t.method.describe()}")
    lines.extend(f"  chosen: {note}" for note in t.notes)
    if t.resumes:
        r = t.resumes[-1]
        changed = "; ".join(f"--{k.replace('_', '-')} {old} -> {new}" for k, (old, new) in r["changed"].items())
        lines.append(f"  resuming {r['from']} at epoch {t.epoch + 1} step {t.step_in_epoch} "
                     f"(S-SD state {getattr(t.method, 'ssd_state', 'absent')})"
                     + (f"; changed at resume: {changed}" if changed else ""))
    lines.extend(f"  resume: {note}" for note in t.resume_notes)
    lines.append(f"  output {t.out_dir}")
    return "\n".join(lines)


def progress_text(method: str, means: dict, rate: float, skipped: int) -> str:
    """``loss 0.6931 bce 0.6931 ... 312.0 img/s [skipped N]`` for a progress bar or log line."""
    shown = {"loss": means["loss"], "bce": means["bce"]}
    if method != "vanilla":
        shown.update({k: means[k] for k in terms_for(method) if k not in shown})
    text = " ".join(f"{k} {v:.4f}" for k, v in shown.items()) + f" {rate:.1f} img/s"
    return text + (f" skipped {skipped}" if skipped else "")


def epoch_line(row: dict, epochs: int, evaluated: bool, improved: bool, collapse: list[str],
               terms: tuple[str, ...] = TERMS, opposing: list[str] | None = None) -> str:
    """The log line of one finished epoch (``row``: its summary.csv row; ``terms``: the method's loss columns;
    ``opposing``: :func:`mskd_fast.diagnostics.opposing_terms` phrases)."""
    from mskd_fast.reports import format_metrics

    parts = " ".join(f"{k} {row[k]:.4f}" for k in terms[1:])
    msg = f"epoch {row['epoch']}/{epochs}: loss {row['loss']:.4f} ({parts}) lr {row['lr']:.3g} {row['img_s']:.1f} img/s"
    msg += diagnostics_text(row, terms)
    if evaluated:
        msg += f" | eval {format_metrics(row)}" + (" *best*" if improved else "")
    if row["nonfinite_skipped"]:
        msg += (f" | {row['nonfinite_skipped']} non-finite steps skipped (loss means over the "
                f"{row['steps_counted']} that counted)")
    if collapse:
        msg += " | WARNING collapsing: " + "; ".join(collapse)
    if opposing:
        msg += (" | WARNING self-distillation opposes the supervision: " + "; ".join(opposing)
                + " (see docs/TRAINING.md, 'Diagnostics')")
    return msg


def diagnostics_text(row: dict, terms: tuple[str, ...]) -> str:
    """`` | grad/BCE lsd 0.41x cos +0.05 ... | logit std 1.21 | clipped 3%`` from a summary row ('' if absent)."""
    import math

    def finite(v):
        return isinstance(v, (int, float)) and math.isfinite(v)

    parts = []
    gb = row.get("gnorm_bce")
    for t in terms:
        gn, cos = row.get(f"gnorm_{t}"), row.get(f"gcos_{t}")
        if t not in ("loss", "bce") and finite(gn) and finite(cos) and finite(gb) and gb > 0:
            parts.append(f"{t} {gn / gb:.2f}x cos {cos:+.2f}")
    text = f" | grad/BCE {', '.join(parts)}" if parts else ""
    if finite(row.get("train_logit_row_std")):
        text += f" | logit std {row['train_logit_row_std']:.2f}"
    if finite(row.get("clip_frac")):
        text += f" | clipped {row['clip_frac']:.0%}"
    return text


def final_summary(t) -> str:
    """Per-epoch table, final metrics, best epoch, and the collapse warning of trainer ``t``."""
    from mskd_fast.collapse import advice, collapse_reasons
    from mskd_fast.reports import format_metrics, format_table

    terms = list(terms_for(t.args.method))
    columns = ["epoch", *terms, "img/s", "mAP", "OF1", "CF1", "skipped"]
    keys = ["epoch", *terms, "img_s", "mAP", "OF1", "CF1", "nonfinite_skipped"]
    table = format_table([[r.get(k, float("nan")) for k in keys] for r in t.history], columns)
    last = t.history[-1]
    best = (f"best mAP {t.best['mAP']:.2f} at epoch {t.best['epoch']}"
            if t.best["epoch"] is not None else "no evaluation")
    text = (f"\n{table}\n\nfinal: {format_metrics(last)}\n{best} | wall time "
            f"{time.time() - t.t_start:.0f}s | outputs in {t.out_dir}")
    collapsed = [r["epoch"] for r in t.history if r.get("collapse")]
    if collapsed:
        now = collapse_reasons(last)
        state = ("the final model: " + "; ".join(now)) if now else "the final epoch shows no sign, but check it"
        text += (f"\nWARNING: this run collapsed (signs at epoch{'s' if len(collapsed) > 1 else ''} "
                 f"{', '.join(map(str, collapsed))}; {state}); its metrics describe a degenerate model. "
                 f"{advice(t.args)}. See summary.csv (top1_mode_frac, max_abs_logit, bce_rise, collapse) "
                 "and docs/TRAINING.md.")
    opposed = [r["epoch"] for r in t.history if r.get("sd_opposes_bce")]
    if opposed:
        from mskd_fast.diagnostics import opposing_terms

        now = opposing_terms(t.history)
        state = ("at the end: " + "; ".join(now)) if now else "not at the end"
        text += (f"\nWARNING: self-distillation opposed the supervision (a term's gradient on the classifier pointed "
                 f"against BCE's for {len(opposed)} epoch(s), {state}); such a run usually trails vanilla. Try that "
                 "term's weight lower or the term off (--no-lsd/--no-rsd/--no-ssd). See summary.csv (gnorm_*, gcos_*) "
                 "and docs/TRAINING.md, 'Diagnostics'.")
    return text
