"""Shared argparse pieces of the command-line tools (``mskd_fast.train``, ``mskd_fast.evaluate``).

* :class:`HelpFormatter` appends ``(default: X)`` to a flag's help only when it says something: not
  for ``None`` defaults, not for off-by-default switches, and not when the help text already
  states its default.
* :class:`ArgumentParser` reports a bad command line as one error line plus a pointer to
  ``--help``, instead of printing the full usage block first.
"""

from __future__ import annotations

import argparse
import re
import sys

__all__ = ["ArgumentParser", "HelpFormatter", "set_help"]

_STATES_DEFAULT = re.compile(r"\bdefault\b|\bunset\b|%\(default\)", re.IGNORECASE)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults shown once: only informative ones, and only where the help text does not give one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        silent = (
            default is None
            or default is argparse.SUPPRESS
            or (action.nargs == 0 and default is False)  # store_true switches: off unless given
            or default == {}
            or _STATES_DEFAULT.search(text) is not None
            or not (action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE))
        )
        return text if silent else f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are ``PROG: error: MESSAGE`` and a hint to run ``--help``."""

    def error(self, message: str):
        sys.stderr.write(f"{self.prog}: error: {message}\nrun '{self.prog} --help' for the list of flags\n")
        sys.exit(2)


def set_help(parser: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Replace the help text of the flag whose argparse ``dest`` is ``dest`` (``KeyError`` if there is none)."""
    for action in parser._actions:
        if action.dest == dest:
            action.help = text
            return
    raise KeyError(f"parser {parser.prog!r} has no flag with dest {dest!r}")
