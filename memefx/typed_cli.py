"""One command-line face for memefx's tools: a subcommand is a typed function, its options come from the
signature and its help from the docstring (jsonargparse, as ``memefx icl`` and ``memefx synth``).

Two conveniences keep the commands users already type: ``--some-option`` and ``--some_option`` are one
option, and a boolean option is a switch (``--json``) instead of ``--json true``. Options a
command takes as positional arguments (``memefx report RUN``) or with several values
(``--compare RUN_A RUN_B``) are named by the caller; they are still parameters of the function.
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence


def dash_to_underscore(arg: str) -> str:
    """``--n-memes`` and ``--n_memes`` alike (parameters have underscores; shells like dashes)."""
    if not arg.startswith("--") or arg == "--":
        return arg
    name, eq, value = arg[2:].partition("=")
    return "--" + name.replace("-", "_") + eq + value


def _bools(func: Callable) -> list[str]:
    hints = typing.get_type_hints(func)
    return [name for name in inspect.signature(func).parameters if hints.get(name) is bool]


def _arg_docs(func: Callable) -> dict[str, str]:
    from docstring_parser import parse

    return {p.arg_name: p.description or "" for p in parse(func.__doc__ or "").params}


def parser_for(func: Callable, prog: str, positional: Sequence[str] = (), several: dict[str, int] | None = None,
               skip: Sequence[str] = ()):
    """The parser of ``func``: typed options from its signature, help from its Google-style docstring
    (``skip``: parameters the caller fills itself)."""
    from jsonargparse import ActionYesNo, ArgumentParser

    params = inspect.signature(func).parameters
    docs = _arg_docs(func)
    several = several or {}
    parser = ArgumentParser(prog=prog, description=(func.__doc__ or "").strip().split("\n\n")[0], exit_on_error=True)
    for name in positional:
        optional = params[name].default is not inspect.Parameter.empty
        parser.add_argument(name, nargs="?" if optional else None, help=docs.get(name))
    for name, count in several.items():
        parser.add_argument(f"--{name}", nargs=count, default=params[name].default, help=docs.get(name))
    bools = [name for name in _bools(func) if name not in skip]
    for name in bools:
        parser.add_argument(f"--{name}", action=ActionYesNo(no_prefix=None), default=params[name].default,
                            help=docs.get(name))
    parser.add_function_arguments(func, skip={*positional, *several, *bools, *skip}, as_group=False, fail_untyped=True)
    return parser


def run_typed(func: Callable, argv: Sequence[str], prog: str, positional: Sequence[str] = (),
              several: dict[str, int] | None = None):
    """Parse ``argv`` by ``func``'s signature and call it with the values."""
    parser = parser_for(func, prog, positional, several)
    config = parser.parse_args([dash_to_underscore(a) for a in argv])
    return func(**{name: config[name] for name in inspect.signature(func).parameters})


def split_own(func: Callable, argv: Sequence[str], skip: Sequence[str] = ("fit_args",)) -> tuple[list[str], list[str]]:
    """(the options ``func`` takes, the rest) of ``argv``: a command that hands the rest on (``memefx study``
    passes it to ``memefx fit``)."""
    params = set(inspect.signature(func).parameters) - set(skip)
    bools = set(_bools(func))
    own, rest, k = [], [], 0
    argv = list(argv)
    while k < len(argv):
        arg = dash_to_underscore(argv[k])
        name = arg[2:].partition("=")[0] if arg.startswith("--") else None
        base = name
        if base in params or arg in ("-h", "--help"):
            own.append(arg)
            if base in params and base not in bools and "=" not in arg and k + 1 < len(argv):
                own.append(argv[k + 1])
                k += 1
        else:
            rest.append(argv[k])
        k += 1
    return own, rest
