"""The real-object accuracy study's variants and its decision rules (``bench/accuracy_study.py --profile fashion``).

Written before any run of the study; the rules only read validation numbers. Every variant trains the same
pretrained backbone on the same ``fashion-multi`` data with the same budget and seeds; only the method flags
below differ.

Phase 1 (seeds 1-3 each):

* ``vanilla`` (BCE); the MSKD recipes ``stable``, ``paper`` and ``official`` (the authors' code's intent);
* ``stable`` with the four corner crops, and with a batch-statistics teacher (``--teacher-bn batch``: the
  "weak teacher" hypothesis);
* ``stable`` with a sharper R-SD crop softmax (``--rsd-crop-temperature 0.25``, a labelled departure: the
  hypothesis that eq. 8's soft crop weights average a class visible in one crop away);
* the **label-push control** ``ud``: BCE + c x the partial-softmax cross-entropy, no crops, no teacher, no
  self-distillation (T = 4), c in :data:`UD_GRID`;
* **S-SD alone with the paper-form MBD** (``--recipe paper --no-lsd --no-rsd --lambda L``), L in
  :data:`SSD_GRID`, the one variant at vanilla's level in the issue's trial;
* the paper's comparison methods (:data:`METHODS`: TF-KD, PS-KD, DLB, DDGSD, USKD, MulSupCon) at their
  defaults (docs/METHODS.md); they are reported, never candidates for the MSKD default.

Rules applied after phase 1 (val only):

1. ``c`` of the control and ``L`` of S-SD alone: the grid value with the best mean val mAP (:func:`best_of`).
2. The best MSKD candidate: among the MSKD variants (``stable``, ``paper``, ``official``, the three ``stable``
   variants, S-SD alone at its chosen ``L``) whose seeds were never flagged as collapsed by the trainer's
   guard, the best mean val mAP (:func:`choose_default`).

Phase 2: the ablations of that candidate (each of its switched-on terms off in turn; dropping its only term
would be vanilla and is skipped), S-SD alone at its ``L`` with a batch-statistics teacher (the S-SD BN
question of SPEC 5), S-SD alone at its ``L`` for twice the epochs (is its growing term bounded?), and seeds
4 and 5 of vanilla and of the two best non-vanilla variants by mean val mAP (after the ablations).

Rule 3, the decision: the default recipe becomes the candidate among *all* MSKD variants (phase 1, the
ablations, over every seed run) with the best mean val mAP that does not collapse. ``paper`` and
``official`` stay exact reproductions whatever the result.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

UD_GRID = (0.05, 0.1, 0.25)
SSD_GRID = (0.1, 0.25, 0.5)
EXTRA_SEEDS = (4, 5)
TERM_FLAGS = {"lsd": "--no-lsd", "rsd": "--no-rsd", "ssd": "--no-ssd"}


@dataclass(frozen=True)
class Variant:
    """One method setting: folder name, table label, trainer flags; ``kind`` is ``vanilla``, ``mskd``,
    ``control`` or ``method``; ``terms`` the MSKD terms it switches on; ``epochs_factor`` scales the budget."""

    name: str
    label: str
    flags: tuple[str, ...]
    kind: str = "mskd"
    terms: tuple[str, ...] = ("lsd", "rsd", "ssd")
    epochs_factor: int = 1


VANILLA = Variant("vanilla", "Vanilla (BCE)", ("--method", "vanilla"), kind="vanilla", terms=())
STABLE = Variant("stable", "MSKD stable", ("--method", "mskd", "--recipe", "stable"))
PAPER = Variant("paper", "MSKD paper", ("--method", "mskd", "--recipe", "paper"))
OFFICIAL = Variant("official", "MSKD official (authors' code intent)", ("--method", "mskd", "--recipe", "official"))
STABLE_CORNERS = Variant("stable-corners", "MSKD stable, corner crops",
                         ("--method", "mskd", "--recipe", "stable", "--crop-mode", "corners"))
STABLE_BN_BATCH = Variant("stable-bnbatch", "MSKD stable, batch-statistics teacher",
                          ("--method", "mskd", "--recipe", "stable", "--teacher-bn", "batch"))
STABLE_CROP_T = Variant("stable-cropT0.25", "MSKD stable, R-SD crop softmax T=0.25 (departure)",
                        ("--method", "mskd", "--recipe", "stable", "--rsd-crop-temperature", "0.25"))


def ud_variant(c: float) -> Variant:
    return Variant(f"ud-c{c:g}", f"Label-push control: BCE + {c:g} x partial softmax",
                   ("--method", "ud", "--ud-weight", f"{c:g}", "--ud-temperature", "4"), kind="control", terms=())


def ssd_variant(lam: float, *extra: str, epochs_factor: int = 1, suffix: str = "", label: str = "") -> Variant:
    flags = ("--method", "mskd", "--recipe", "paper", "--no-lsd", "--no-rsd", "--lambda", f"{lam:g}", *extra)
    return Variant(f"ssd-paper-l{lam:g}{suffix}", f"S-SD alone, paper MBD, lambda={lam:g}{label}", flags,
                   terms=("ssd",), epochs_factor=epochs_factor)


UD = tuple(ud_variant(c) for c in UD_GRID)
SSD = tuple(ssd_variant(lam) for lam in SSD_GRID)
# The paper's comparison methods (docs/METHODS.md), each at its own paper's/code's defaults (the trainer's).
METHODS = tuple(Variant(name, label, ("--method", name), kind="method", terms=()) for name, label in (
    ("tfkd", "TF-KD (teacher-free KD)"), ("pskd", "PS-KD (progressive self-KD)"), ("dlb", "DLB (last mini-batch)"),
    ("ddgsd", "DDGSD (two distorted views)"), ("uskd", "USKD (normalised KD, aux head)"),
    ("mulsupcon", "MulSupCon (joint, supervised contrastive)")))
PHASE1 = (VANILLA, STABLE, PAPER, OFFICIAL, STABLE_CORNERS, STABLE_BN_BATCH, STABLE_CROP_T, *UD, *SSD, *METHODS)


def ablations(base: Variant) -> list[Variant]:
    """``base`` with each of its switched-on terms off (none when it has a single term)."""
    if len(base.terms) < 2:
        return []
    out = []
    for term in base.terms:
        rest = tuple(t for t in base.terms if t != term)
        out.append(Variant(f"{base.name}-no-{term}", f"{base.label} w/o {term.upper().replace('SD', '-SD')}",
                           (*base.flags, TERM_FLAGS[term]), terms=rest))
    return out


def phase2(best: Variant, ssd_best: Variant) -> list[Variant]:
    """The ablations of ``best``, S-SD alone at its lambda with a batch teacher and for twice the epochs."""
    lam = ssd_best.flags[ssd_best.flags.index("--lambda") + 1]
    return [*ablations(best),
            ssd_variant(float(lam), "--teacher-bn", "batch", suffix="-bnbatch", label=", batch-statistics teacher"),
            ssd_variant(float(lam), epochs_factor=2, suffix="-2x", label=", 2x epochs")]


def lr_check(chosen: Variant, lrs: list[float]) -> list[Variant]:
    """Vanilla and ``chosen`` at other head LRs (the trainer takes the last ``--lr``): an LR-sensitivity check
    of the decision, run after it and never used by it."""
    return [Variant(f"{v.name}-lr{lr:g}", f"{v.label}, LR {lr:g}", (*v.flags, "--lr", f"{lr:g}"), kind="lr-check",
                    terms=v.terms) for lr in lrs for v in (VANILLA, chosen)]


# ---------------------------------------------------------------------------------------------- statistics
def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``nan`` std for a single value; NaNs ignored)."""
    vals = [v for v in values if isinstance(v, (int, float)) and not math.isnan(v)]
    if not vals:
        return math.nan, math.nan
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else math.nan)


def pm(values: list[float], digits: int = 2) -> str:
    """``mean ± std`` (just the mean for one value, ``-`` for none)."""
    m, s = mean_std(values)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f}" if math.isnan(s) else f"{m:.{digits}f} ± {s:.{digits}f}"


def _mean(values: list[float]) -> float:
    return mean_std(values)[0]


# ---------------------------------------------------------------------------------------------- rules

def best_of(val_map: dict[str, list[float]]) -> str:
    """Rule 1: the key with the best mean val mAP (ties: the first in order)."""
    return max(val_map, key=lambda k: (_mean(val_map[k]), -list(val_map).index(k)))


def choose_default(candidates: dict[str, dict]) -> dict:
    """Rules 2/3: ``candidates`` maps a variant name to ``{"val": [mAP per seed], "collapsed": [0/1 per seed]}``;
    returns ``{"chosen", "ranking": [(name, mean, collapsed count)], "excluded": [names]}``."""
    ranking = sorted(((name, _mean(c["val"]), int(sum(c["collapsed"]))) for name, c in candidates.items()),
                     key=lambda t: -t[1] if not math.isnan(t[1]) else math.inf)
    ok = [r for r in ranking if r[2] == 0 and not math.isnan(r[1])]
    return {"chosen": ok[0][0] if ok else None, "ranking": ranking, "excluded": [r[0] for r in ranking if r[2] > 0]}


# ---------------------------------------------------------------------------------------------- report
REPORT_METRICS = ("mAP", "OP", "OR", "OF1", "CP", "CR", "CF1", "P@1", "R@1")
SD_TERMS = ("lsd", "rsd", "ssd", "ud")


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _header(cells: list[str]) -> list[str]:
    return [_row(cells), "|---|" + "---:|" * (len(cells) - 1)]


def test_table(groups: list[tuple[Variant, list[dict]]], vanilla: list[dict]) -> str:
    """Every metric on test, mean ± std over seeds, the mAP gap to vanilla, train-fit mAP, collapsed seeds."""
    base = _mean([r["test"]["mAP"] for r in vanilla]) if vanilla else math.nan
    lines = _header(["run", "seeds", *REPORT_METRICS, "mAP - vanilla", "train-fit mAP", "collapsed"])
    for v, rs in groups:
        gap = "-" if v.kind == "vanilla" or math.isnan(base) else f"{_mean([r['test']['mAP'] for r in rs]) - base:+.2f}"
        metrics = (pm([r["test"].get(k, math.nan) for r in rs]) for k in REPORT_METRICS)
        lines.append(_row([v.label, str(len(rs)), *metrics, gap, pm([r["train_fit_mAP"] for r in rs]),
                           f"{sum(1 for r in rs if r['signals']['collapse'] == 1)}/{len(rs)}"]))
    return "\n".join(lines) + "\n"


def val_table(groups: list[tuple[Variant, list[dict]]]) -> str:
    lines = _header(["run", "seeds", "val mAP", "val OF1", "val CF1", "val P@1", "final train BCE",
                     "top-1 mode fraction", "max abs logit"])
    for v, rs in groups:
        lines.append(_row([v.label, str(len(rs)), *(pm([r["val"].get(k, math.nan) for r in rs]) for k in
                                                     ("mAP", "OF1", "CF1", "P@1")),
                           pm([r["losses"].get("bce", math.nan) for r in rs], 3),
                           pm([r["signals"]["top1_mode_frac"] for r in rs]),
                           pm([r["signals"]["max_abs_logit"] for r in rs], 1)]))
    return "\n".join(lines) + "\n"


def diagnostics_table(groups: list[tuple[Variant, list[dict]]]) -> str:
    """Last epoch's gradient diagnostics (mskd_fast.diagnostics), mean ± std over seeds."""
    lines = _header(["run", "BCE grad norm", *(f"{t}: norm/BCE, cos" for t in SD_TERMS), "train logit row std",
                     "clipped steps", "epochs SD opposed BCE"])
    for v, rs in groups:
        cells = [v.label, pm([r["diagnostics"].get("gnorm_bce", math.nan) for r in rs], 3)]
        for t in SD_TERMS:
            ratios = [r["diagnostics"].get(f"gnorm_{t}", math.nan) / r["diagnostics"]["gnorm_bce"]
                      for r in rs if r["diagnostics"].get("gnorm_bce")]
            cos = [r["diagnostics"].get(f"gcos_{t}", math.nan) for r in rs]
            cells.append("-" if math.isnan(mean_std(ratios)[0]) else f"{pm(ratios)}, {pm(cos)}")
        cells += [pm([r["diagnostics"].get("train_logit_row_std", math.nan) for r in rs]),
                  pm([100 * r["diagnostics"].get("clip_frac", math.nan) for r in rs], 0) + " %",
                  pm([float(sum(1 for x in r["sd_opposes_bce"] if x)) for r in rs], 1)]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def scale_table(groups: list[tuple[Variant, list[dict]]]) -> str:
    ref = groups[0][1][0]["scale_recall"]
    lines = _header(["side px (sqrt area)", "objects", *(v.label for v, _ in groups)])
    for k, row in enumerate(ref):
        if row["objects"] == 0:
            continue
        cells = [f"[{row['bin_lo']:g}, {row['bin_hi']:g})", str(row["objects"])]
        cells += [pm([r["scale_recall"][k]["recall"] for r in rs if k < len(r["scale_recall"])]) for _, rs in groups]
        lines.append(_row(cells))
    return "\n".join(lines) + "\n"


def lr_table(base: list[tuple[Variant, list[dict]]], checks: list[tuple[Variant, list[dict]]], lr: float) -> str:
    """val and test mAP of vanilla and the chosen variant at each LR, and the test gap (variant - vanilla)."""
    by_lr: dict[float, dict[str, list[dict]]] = {lr: {("vanilla" if v.kind == "vanilla" else "mskd"): rs
                                                      for v, rs in base}}
    for v, rs in checks:
        value = float(v.flags[v.flags.index("--lr") + 1])
        by_lr.setdefault(value, {})["vanilla" if v.name.startswith(VANILLA.name + "-lr") else "mskd"] = rs
    lines = _header(["head LR", "vanilla val mAP", "MSKD val mAP", "vanilla test mAP", "MSKD test mAP",
                     "test gap (MSKD - vanilla)"])
    for value in sorted(by_lr):
        van, msk = by_lr[value].get("vanilla", []), by_lr[value].get("mskd", [])
        gap = _mean([r["test"]["mAP"] for r in msk]) - _mean([r["test"]["mAP"] for r in van])
        lines.append(_row([f"{value:g}" + (" (study)" if value == lr else ""),
                           pm([r["val"]["mAP"] for r in van]), pm([r["val"]["mAP"] for r in msk]),
                           pm([r["test"]["mAP"] for r in van]), pm([r["test"]["mAP"] for r in msk]),
                           "-" if math.isnan(gap) else f"{gap:+.2f}"]))
    return "\n".join(lines) + "\n"


def term_history_table(v: Variant, rs: list[dict], term: str = "ssd") -> str:
    """Per epoch, mean ± std over seeds of the training loss ``term`` and BCE (is the S-SD term bounded?)."""
    lines = _header(["epoch", f"{term} (epoch mean)", "bce"])
    epochs = min(len(r["loss_history"]) for r in rs)
    for e in range(epochs):
        lines.append(_row([str(e + 1), pm([r["loss_history"][e].get(term, math.nan) for r in rs], 4),
                           pm([r["loss_history"][e].get("bce", math.nan) for r in rs], 4)]))
    return f"{v.label}:\n\n" + "\n".join(lines) + "\n"
