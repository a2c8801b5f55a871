"""The paper's comparison methods as method objects of one trainer (``python -m mskd_fast.train --method NAME``).

One module per method; each holds the method's loss as a function (importable on its own) and its method object
(:class:`~mskd_fast.methods.base.SelfDistillationMethod`: owns the forward and the loss; the trainer's
``TrainStep`` owns the update). docs/METHODS.md gives every formula, default and multi-label adaptation.

This module is the registry the trainer reads: :data:`METHODS` (name -> class), :func:`add_method_args` (each
method's flags, one argparse group per method), :func:`validate_method_args`, :func:`build_method` and
:func:`method_terms` (the columns a method adds to summary.csv).
"""

from __future__ import annotations

import argparse

from mskd_fast.methods.base import MethodFlag, SelfDistillationMethod
from mskd_fast.methods.ddgsd import DDGSD, ddgsd_loss
from mskd_fast.methods.dlb import DLB, dlb_loss
from mskd_fast.methods.mulsupcon import MulSupCon, mulsupcon_loss
from mskd_fast.methods.partial_softmax import PartialSoftmaxBCELoss, partial_softmax_loss
from mskd_fast.methods.pskd import PSKD, pskd_alpha, pskd_loss
from mskd_fast.methods.tfkd import TFKD, tfkd_loss
from mskd_fast.methods.ud import UD
from mskd_fast.methods.uskd import USKD, uskd_loss

__all__ = [
    "DDGSD",
    "DLB",
    "METHODS",
    "PSKD",
    "TFKD",
    "UD",
    "USKD",
    "MulSupCon",
    "MethodFlag",
    "PartialSoftmaxBCELoss",
    "SelfDistillationMethod",
    "add_method_args",
    "build_method",
    "ddgsd_loss",
    "dlb_loss",
    "method_terms",
    "mulsupcon_loss",
    "partial_softmax_loss",
    "pskd_alpha",
    "pskd_loss",
    "tfkd_loss",
    "uskd_loss",
    "validate_method_args",
]

METHODS: dict[str, type[SelfDistillationMethod]] = {
    cls.name: cls for cls in (TFKD, PSKD, DLB, DDGSD, USKD, UD, MulSupCon)
}


def add_method_args(parser: argparse.ArgumentParser) -> None:
    """One argument group per method with its flags (defaults: the method's own paper/code, docs/METHODS.md)."""
    for cls in METHODS.values():
        group = parser.add_argument_group(f"{cls.title} (--method {cls.name}; docs/METHODS.md)")
        for flag in cls.flags:
            group.add_argument(flag.option, type=flag.type, default=flag.default,
                               help=flag.help)


def validate_method_args(args: argparse.Namespace) -> None:
    """Check the flags of every method (all are parsed, whichever runs); ``ValueError`` names the flag."""
    for cls in METHODS.values():
        for flag in cls.flags:
            flag.check(getattr(args, flag.dest))
    if args.method in METHODS:
        METHODS[args.method].check_args(args)


def method_terms(name: str) -> tuple[str, ...]:
    """The loss terms a method object reports (``"bce"`` first); ``KeyError`` for ``mskd``/``vanilla``."""
    return METHODS[name].terms


def build_method(name: str, model, args: argparse.Namespace, **context) -> SelfDistillationMethod:
    """The method object ``name`` for ``model`` with its flags from ``args``.

    ``context``: run facts a method may need (``num_samples`` training-set size, ``epochs``, ``generator`` the
    trainer's device generator for random views); each method takes the ones it declares.
    """
    if name not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {name!r}")
    cls = METHODS[name]
    kwargs = {flag.kwarg: getattr(args, flag.dest) for flag in cls.flags}
    missing = [key for key in cls.context if key not in context]
    if missing:
        raise ValueError(f"method {name!r} needs {missing} from the trainer")
    kwargs.update({key: context[key] for key in cls.context})
    return cls(model, **kwargs)
