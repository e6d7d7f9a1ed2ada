"""Command-line settings of the components, each declared once with its environment twin.

A `Setting` names the flag, the default, the type and the help; its twin is PCIPT_<FLAG> (or a
name given). The flag wins: a twin is read only when the flag is absent from the command line,
so a stray variable cannot matter then. A twin of the wrong type is one line naming the variable
and the type expected, never a traceback. Kubernetes injects service-link variables such as
PCIPT_WEBHOOK_PORT=tcp://10.96.0.7:443 into pods of a namespace that has a Service named
pcipt-webhook; the chart turns them off (enableServiceLinks: false), and this is the second depth.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

PREFIX = "PCIPT_"


def env(name: str, default: str) -> str:
    """The value of PCIPT_<name>, or default when it is unset."""
    return os.environ.get(PREFIX + name, default)


class SettingError(ValueError):
    """A setting's value could not be read; the message is one line that names where it came
    from (the flag or the variable) and what was expected."""


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def parse_bool(text: str) -> bool:
    value = text.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ValueError(text)


def default_of(cls: type, name: str) -> Any:
    """The default a settings dataclass declares for a field: the CLI takes its defaults from
    the dataclass the program runs with, so each default is written once."""
    return cls.__dataclass_fields__[name].default  # type: ignore[attr-defined]


def optional_path(text: str) -> Path | None:
    return Path(text) if text else None


# What each parser expects, in words, for the one-line error.
_EXPECTS: dict[Callable[[str], Any], str] = {
    int: "an integer",
    float: "a number",
    parse_bool: "a boolean (1/0, true/false, yes/no)",
    Path: "a path",
    optional_path: "a path (empty for none)",
}


@dataclass(frozen=True)
class Setting:
    """One command-line setting: flag, default, type (a parser from text), help, env twin.

    `default` may be a callable, evaluated only when neither the flag nor the twin is given.
    `kind` "flag" makes a switch (--x / --no-x with BooleanOptionalAction when `negatable`).
    """

    flag: str
    default: Any
    help: str
    parse: Callable[[str], Any] = str
    choices: Sequence[str] | None = None
    env: str | None = None  # the twin's name without the prefix; None: from the flag
    kind: str = "value"  # "value" or "flag"
    negatable: bool = False
    metavar: str | None = None
    prefixed: bool = True  # False: the twin is spelled exactly as `env` (KUBECONFIG)

    @property
    def dest(self) -> str:
        return self.flag.lstrip("-").replace("-", "_")

    @property
    def variable(self) -> str:
        name = self.env or self.dest.upper()
        return PREFIX + name if self.prefixed else name

    @property
    def expects(self) -> str:
        if self.kind == "flag":
            return _EXPECTS[parse_bool]
        if self.choices:
            return "one of " + ", ".join(self.choices)
        return _EXPECTS.get(self.parse, "a string")

    def from_text(self, text: str, source: str) -> Any:
        """Parse text from `source` (a flag or a variable) or raise SettingError in one line."""
        parse = parse_bool if self.kind == "flag" else self.parse
        try:
            value = parse(text)
        except (ValueError, TypeError):
            value = None
            bad = True
        else:
            bad = self.choices is not None and value not in self.choices
        if bad:
            hint = ""
            if source.startswith(PREFIX) and text.startswith(("tcp://", "udp://")):
                hint = (
                    " (this looks like a Kubernetes service link for a Service whose name starts"
                    " with pcipt-: set enableServiceLinks: false on the pod, or give the flag)"
                )
            raise SettingError(f"{source}={text!r}: expected {self.expects}{hint}")
        return value

    def default_value(self) -> Any:
        return self.default() if callable(self.default) else self.default

    def add_to(self, parser: argparse.ArgumentParser | Any) -> None:
        """Declare the flag. Its value is left unset (SUPPRESS) when absent; `resolve` fills it."""
        plain = self.kind != "flag" and not callable(self.default)
        shown = f"; default {self.default}" if plain and self.default not in (None, "") else ""
        help_text = f"{self.help} (env {self.variable}{shown})"
        if self.kind == "flag":
            action: Any = argparse.BooleanOptionalAction if self.negatable else "store_true"
            parser.add_argument(
                self.flag, dest=self.dest, action=action, default=argparse.SUPPRESS, help=help_text
            )
            return

        def typed(text: str) -> Any:
            try:
                return self.from_text(text, self.flag)
            except SettingError:
                # argparse names the flag itself: "argument --x: 'y': expected an integer".
                raise argparse.ArgumentTypeError(f"{text!r}: expected {self.expects}") from None

        parser.add_argument(
            self.flag,
            dest=self.dest,
            type=typed,
            default=argparse.SUPPRESS,
            help=help_text,
            metavar=self.metavar
            or ("{" + ",".join(self.choices) + "}" if self.choices else self.dest.upper()),
        )


KUBECONFIG = Setting(
    "--kubeconfig",
    None,
    "kubeconfig (default: ~/.kube/config, then in-cluster)",
    env="KUBECONFIG",
    prefixed=False,
)
"""Both components' --kubeconfig, whose twin is the KUBECONFIG every Kubernetes tool reads."""


def add_settings(parser: argparse.ArgumentParser | Any, settings: Iterable[Setting]) -> None:
    for s in settings:
        s.add_to(parser)


def resolve(
    args: argparse.Namespace,
    settings: Iterable[Setting],
    environ: Mapping[str, str] | None = None,
) -> None:
    """Fill every setting absent from the command line from its twin, else its default.

    Raises SettingError (one line) for a twin that does not parse.
    """
    variables = os.environ if environ is None else environ
    for s in settings:
        if hasattr(args, s.dest):
            continue  # the flag was given: its twin does not matter
        text = variables.get(s.variable)
        value = s.default_value() if text is None else s.from_text(text, s.variable)
        setattr(args, s.dest, value)


def parse_args(
    parser: argparse.ArgumentParser,
    settings_by_command: dict[str, Sequence[Setting]],
    argv: Sequence[str] | None,
    *,
    command: str = "cmd",
) -> argparse.Namespace:
    """parse_args, then `resolve` for the chosen sub-command; a bad twin exits 2 in one line."""
    args = parser.parse_args(argv)
    try:
        resolve(args, settings_by_command.get(getattr(args, command, ""), ()))
    except SettingError as e:
        _exit(parser, str(e))
    return args


def _exit(parser: argparse.ArgumentParser, message: str) -> NoReturn:
    parser.exit(2, f"{parser.prog}: {message}\n")
