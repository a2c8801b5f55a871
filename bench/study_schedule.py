"""The schedule study's variants and rules (``bench/accuracy_study.py --profile fashion-long``): does MSKD help
under the paper's training schedule (long, RandAugment, weight decay 5e-4), in miniature?

Written before any run of the study (issue 23); the rules read validation numbers only, and the collapse flag
of a run is the one its own trainer wrote (the guard of the code that trained it, which the run's source hash
names; docs/ACCURACY.md). Every run fine-tunes the real-object study's pretrained backbone on the same
``fashion-multi`` data with the same budget: the profile's epochs, RandAugment(2, 9), SGD momentum 0.9, weight
decay 5e-4, cosine, batch 32, backbone LR x0.1, no warm-up; only the method flags (and, where named, the head LR)
differ. Every run is evaluated on val after every epoch (the per-epoch curves), then on test and train-fit.

A run whose trainer's collapse guard flags two consecutive evaluations is stopped there
(``--stop-on-collapse 2``: a collapsed run's later epochs carry no information and cost up to half the study's
time); it counts as collapsed, its test and train-fit numbers are those of its last model, and its curve ends
there. A variant with a collapsed seed is never chosen.

Phase 0, the head LR (vanilla only, seed 1, before any other run): each LR of :data:`LR_GRID`. Rule 0: the LR
with the best val mAP, except that a lower LR within :data:`LR_TIE` mAP of the best is taken instead (the lowest
such; the paper's head LR is 0.01, so among equals the one nearer its regime).

Phase 1 (seeds 1-3, at the calibrated LR): vanilla; the default recipe (``--recipe step``: S-SD alone, paper
MBD, lambda 0.1, batch-statistics teacher); ``stable``; ``paper``; ``official``; the label-push control
(``--method ud``, c = 0.1, chosen on val in the 2026-12-02 study); TF-KD and USKD (the best two peers of that
study), at their defaults.

Phase 2, only if a seed of ``stable`` collapsed in phase 1 (rule 2): ``stable`` with a batch-statistics S-SD
teacher (``--teacher-bn batch``), and ``stable`` at the next lower LR of :data:`LR_GRID`, going down one grid
step at a time until none of its three seeds collapses or the grid ends (the highest such LR is labelled in the
table): does the full method train at all under this schedule?

Phase 3: the ablations of the best MSKD variant by mean val mAP among those with no collapsed seed (each of its
switched-on terms off in turn; none when it has a single term: without it, it is vanilla), then seeds 4 and 5
of vanilla and of the two best non-vanilla variants at the calibrated LR by mean val mAP.

Rule 3, the decision: the best MSKD variant (phase 1-3, calibrated LR, no collapsed seed, every seed run) by
mean val mAP becomes the default recipe only if its mean val mAP exceeds vanilla's by more than one standard
deviation (the larger of the two sample standard deviations); otherwise the default does not change. (The rule
of the 2026-12-02 study, "the best MSKD variant", had no margin over vanilla: a flaw, since it can pick a
variant that is level with vanilla; issue 23 asks for the margin.) ``paper`` and ``official`` stay exact
reproductions whatever the result.
"""

from __future__ import annotations

import math

import study_fashion as fashion
from study_fashion import Variant, mean_std

LR_GRID = (0.01, 0.05, 0.2, 0.8)
LR_TIE = 0.3
UD_C = 0.1
EXTRA_SEEDS = (4, 5)

VANILLA = fashion.VANILLA
DEFAULT = Variant("default", "MSKD default recipe (step: S-SD alone)", ("--method", "mskd", "--recipe", "step"),
                  terms=("ssd",))
STABLE = fashion.STABLE
PAPER = fashion.PAPER
OFFICIAL = fashion.OFFICIAL
UD = fashion.ud_variant(UD_C)
TFKD = next(v for v in fashion.METHODS if v.name == "tfkd")
USKD = next(v for v in fashion.METHODS if v.name == "uskd")
PHASE1 = (VANILLA, DEFAULT, STABLE, PAPER, OFFICIAL, UD, TFKD, USKD)
STABLE_BN_BATCH = fashion.STABLE_BN_BATCH


def with_lr(v: Variant, lr: float, kind: str | None = None, note: str = "") -> Variant:
    """``v`` at head LR ``lr`` (the trainer takes the last ``--lr``)."""
    return Variant(f"{v.name}-lr{lr:g}", f"{v.label}, head LR {lr:g}{note}", (*v.flags, "--lr", f"{lr:g}"),
                   kind=kind or v.kind, terms=v.terms)


def calibration() -> list[Variant]:
    """Phase 0: vanilla at each LR of the grid."""
    return [with_lr(VANILLA, lr, kind="calibration") for lr in LR_GRID]


def choose_lr(val_by_lr: dict[float, float], tie: float = LR_TIE) -> dict:
    """Rule 0: ``{"chosen", "best", "val"}`` from ``{lr: val mAP}`` (NaN = missing)."""
    ok = {lr: m for lr, m in val_by_lr.items() if not math.isnan(m)}
    if not ok:
        return {"chosen": None, "best": None, "val": val_by_lr}
    best = max(ok, key=lambda lr: (ok[lr], -lr))
    chosen = min(lr for lr, m in ok.items() if lr <= best and m >= ok[best] - tie)
    return {"chosen": chosen, "best": best, "val": val_by_lr}


def lower_lrs(lr: float) -> list[float]:
    """The grid LRs below ``lr``, highest first (phase 2's descent)."""
    return sorted((x for x in LR_GRID if x < lr), reverse=True)


def stable_at(lr: float) -> Variant:
    return with_lr(STABLE, lr, kind="mskd")


def best_mskd(candidates: dict[str, dict]) -> str | None:
    """The MSKD variant with the best mean val mAP and no collapsed seed (``fashion.choose_default``)."""
    return fashion.choose_default(candidates)["chosen"]


def decide(candidates: dict[str, dict], vanilla_val: list[float], current_default: str) -> dict:
    """Rule 3. ``candidates``: ``{name: {"val": [...], "collapsed": [...]}}``; returns ``{"best", "margin",
    "threshold", "changes", "default", "ranking"}``: ``default`` is ``best`` when it beats vanilla's mean val mAP
    by more than the larger sample std, else ``current_default``."""
    ranked = fashion.choose_default(candidates)
    best = ranked["chosen"]
    v_mean, v_std = mean_std(vanilla_val)
    out = {"best": best, "ranking": ranked["ranking"], "margin": math.nan, "threshold": math.nan,
           "changes": False, "default": current_default}
    if best is None or math.isnan(v_mean):
        return out
    b_mean, b_std = mean_std(candidates[best]["val"])
    threshold = max(s for s in (b_std, v_std) if not math.isnan(s)) if not (math.isnan(b_std) and
                                                                            math.isnan(v_std)) else math.nan
    out.update(margin=b_mean - v_mean, threshold=threshold)
    if not math.isnan(threshold) and b_mean - v_mean > threshold:
        out.update(changes=True, default=best)
    return out


# ---------------------------------------------------------------------------------------------- report
def lr_calibration_table(choice: dict) -> str:
    lines = fashion._header(["head LR", "vanilla val mAP", "chosen"])
    for lr, m in sorted(choice["val"].items(), key=lambda kv: float(kv[0])):
        mark = "**chosen**" if float(lr) == choice["chosen"] else ("best" if float(lr) == choice["best"] else "")
        lines.append(fashion._row([f"{float(lr):g}", "-" if math.isnan(m) else f"{m:.2f}", mark]))
    return "\n".join(lines) + "\n"


def code_table(groups: list[tuple[Variant, list[dict]]], code_label) -> str:
    """Per variant: the code of its runs, and the collapse verdicts of the trainer's guard (the rule's input)
    and of this checkout's guard (they differ only if the guard changed after the runs)."""
    lines = fashion._header(["run", "code (commit / source sha256)", "collapsed (trainer's guard)",
                             "collapsed (this checkout's guard)", "stopped as collapsed at epoch"])
    for v, rs in groups:
        codes = sorted({code_label(r.get("code")) for r in rs})
        lines.append(fashion._row([v.label, "; ".join(codes),
                                   f"{sum(1 for r in rs if r['signals']['collapse'] == 1)}/{len(rs)}",
                                   f"{sum(1 for r in rs if r['signals'].get('collapse_current_guard') == 1)}"
                                   f"/{len(rs)}", ", ".join(map(str, _stopped(rs))) or "-"]))
    return "\n".join(lines) + "\n"


def _at(rs: list[dict], e: int) -> list[float]:
    """The val mAP of epoch ``e`` (0-based) of the runs that reached it (a run stopped as collapsed did not)."""
    return [r["val_history"][e] for r in rs if e < len(r["val_history"])]


def mean_curve(rs: list[dict]) -> list[float]:
    """Mean over the seeds that reached each epoch of the val mAP per epoch (NaN where none was evaluated)."""
    epochs = max(len(r["val_history"]) for r in rs)
    return [mean_std(_at(rs, e))[0] for e in range(epochs)]


def _stopped(rs: list[dict]) -> list[int]:
    return sorted(r["stopped_epoch"] for r in rs if r.get("stopped_epoch"))


def curve_table(groups: list[tuple[Variant, list[dict]]], every: int = 5) -> str:
    """Val mAP at every ``every``-th epoch (and the first and last), mean ± std over the seeds that reached it
    (their count in brackets when a seed was stopped as collapsed before), and the stop epochs."""
    n = max(len(r["val_history"]) for _, rs in groups for r in rs)
    marks = sorted({e for e in range(every - 1, n, every)} | {0, n - 1})
    lines = fashion._header(["run", *(f"ep {e + 1}" for e in marks), "stopped as collapsed at epoch"])
    for v, rs in groups:
        cells = []
        for e in marks:
            vals = _at(rs, e)
            cells.append(fashion.pm(vals, 1) + (f" ({len(vals)})" if len(vals) < len(rs) else ""))
        lines.append(fashion._row([v.label, *cells, ", ".join(map(str, _stopped(rs))) or "-"]))
    return "\n".join(lines) + "\n"


def plot_val_curves(groups: list[tuple[Variant, list[dict]]], path: str) -> str:
    """One line per variant: mean over seeds of the val mAP per epoch; written atomically as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from mskd_fast._atomic import atomic_path

    fig = Figure(figsize=(9, 5.5), constrained_layout=True)
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    for v, rs in groups:
        curve = mean_curve(rs)
        points = [(e + 1, m) for e, m in enumerate(curve) if not math.isnan(m)]
        style = "-" if v.kind in ("vanilla", "mskd") else "--"
        stops = _stopped(rs)
        note = f"; {len(stops)} stopped as collapsed" if stops else ""
        line, = ax.plot([e for e, _ in points], [m for _, m in points], style, marker="o", markersize=2,
                        label=f"{v.label} ({len(rs)} seeds{note})", linewidth=2.2 if v.kind == "vanilla" else 1.2)
        for e in stops:  # where a seed was stopped: the mean goes on over the other seeds
            if e - 1 < len(curve) and not math.isnan(curve[e - 1]):
                ax.plot([e], [curve[e - 1]], "x", color=line.get_color(), markersize=8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("val mAP (%)")
    ax.set_title("validation mAP per epoch, mean over seeds")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    return path
