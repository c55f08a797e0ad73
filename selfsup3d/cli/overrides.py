"""``--trainer.callbacks.init_args.KEY VALUE`` (or ``--trainer.callbacks.KEY VALUE``): set an argument of the one
callback in the configured list that takes it.

jsonargparse applies such an argument to the *last* callback of the list. That is what it means after an append,
``--trainer.callbacks+=CLASS --trainer.callbacks.KEY VALUE`` (Lightning's documented way to add a callback), and
that use is left alone. For a callback a YAML file configured, though, the last one is rarely the one meant:
``--trainer.callbacks.init_args.num_classes 3`` with ``configs/triplane.yaml`` reached ``EncoderExport`` and
failed. So when no ``--trainer.callbacks`` list or append comes before it, such an argument goes to the callback
of the list that takes ``KEY``; none or several is a usage error that names them.

How: :func:`route_callback_arguments` takes those arguments out of the command line, parses the rest once to see
the list they refer to, and puts the list back, with the values set, as one ``--trainer.callbacks=[...]`` where the
first of them stood; jsonargparse then parses and checks everything as usual (``--print_config`` included).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from jsonargparse import Namespace, get_loader

LIST_OPTION = "--trainer.callbacks"
_ARGUMENT = re.compile(r"^--trainer\.callbacks\.(?:init_args\.)?([A-Za-z_]\w*)(?:=(.*))?$", re.S)
_NOT_ARGUMENTS = {"class_path", "init_args", "help"}
_HELP = ("-h", "--help")


@dataclass
class CallbackArgument:
    """One ``--trainer.callbacks[.init_args].KEY VALUE`` taken out of the command line."""

    option: str
    key: str
    value: str


def _is_list_token(token: str) -> bool:
    return token == LIST_OPTION or token.startswith((f"{LIST_OPTION}=", f"{LIST_OPTION}+="))


def _span(argv: list[str], i: int) -> int:
    """Tokens taken by the ``--trainer.callbacks...`` option at ``argv[i]`` (``--opt=value``: 1, else 2)."""
    token = argv[i]
    if "=" in token or i + 1 >= len(argv):
        return 1
    return 2


def split_callback_arguments(argv: list[str]) -> tuple[list[str], list[CallbackArgument], int]:
    """``argv`` without the callback arguments to route, those arguments, and where the first one stood in the
    returned list (``-1`` when there are none). Arguments after a ``--trainer.callbacks`` list or append stay."""
    rest: list[str] = []
    found: list[CallbackArgument] = []
    first = -1
    touched = False
    i = 0
    while i < len(argv):
        token = argv[i]
        if token == "--":
            rest.extend(argv[i:])
            break
        touched = touched or _is_list_token(token)
        match = _ARGUMENT.match(token)
        inline = match is not None and match.group(2) is not None
        if match and not touched and match.group(1) not in _NOT_ARGUMENTS and (inline or i + 1 < len(argv)):
            value = match.group(2) if inline else argv[i + 1]
            first = len(rest) if first < 0 else first
            found.append(CallbackArgument(token.split("=", 1)[0], match.group(1), value))
            i += 1 if inline else 2
            continue
        rest.append(token)
        i += 1
    return rest, found, first


def _without_callbacks_and_printing(argv: list[str], start: int) -> list[str]:
    """``argv`` for the look at the list: from ``start`` on, no callbacks options (they come after the routed
    arguments); nowhere ``--print_config``, which would print and exit."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        token = argv[i]
        if token.startswith("--print_config"):
            i += 1
            continue
        if i >= start and token.startswith(LIST_OPTION):
            i += _span(argv, i)
            continue
        out.append(token)
        i += 1
    return out


def _callback_list(section: Any) -> list[dict[str, Any]]:
    value = section.get("trainer", Namespace()).get("callbacks") if isinstance(section, Namespace) else None
    items = value if isinstance(value, list) else ([] if value is None else [value])
    return [item.as_dict() if isinstance(item, Namespace) else dict(item) for item in items]


def _name(callback: dict[str, Any]) -> str:
    return str(callback.get("class_path", "?")).rsplit(".", 1)[-1]


def route_callback_arguments(
    argv: list[str], parse: Callable[[list[str]], Namespace], error: Callable[[str], Any], mode: str = "yaml"
) -> list[str]:
    """The command line with ``--trainer.callbacks[.init_args].KEY VALUE`` arguments set on the callback that takes
    ``KEY`` (see the module docstring).

    Args:
        argv: the command line after the program name (subcommand first).
        parse: parses a command line (the CLI's parser), used once to see the configured callbacks.
        error: reports a usage error and exits (the parser's ``error``).
        mode: the parser's value loader (``parser_mode``), used for ``VALUE``.
    """
    if any(token in _HELP for token in argv):
        return argv
    rest, found, first = split_callback_arguments(argv)
    if not found:
        return argv
    cfg = parse(_without_callbacks_and_printing(rest, first))
    subcommand = cfg.get("subcommand")
    callbacks = _callback_list(cfg.get(subcommand) if subcommand else cfg)
    load = get_loader(mode)
    names = ", ".join(_name(c) for c in callbacks) or "none"
    for arg in found:
        takers = [i for i, c in enumerate(callbacks) if arg.key in (c.get("init_args") or {})]
        if len(takers) != 1:
            which = ", ".join(_name(callbacks[i]) for i in takers)
            problem = f"{len(takers)} callbacks take {arg.key!r} ({which})" if takers else "no callback takes it"
            error(
                f"{arg.option.removeprefix('--')}: {problem}; the callbacks are {names}. Set it in the config file, "
                f"or append the callback you mean with --trainer.callbacks+=CLASS followed by its arguments"
            )
        callbacks[takers[0]]["init_args"][arg.key] = load(arg.value)
    return [*rest[:first], f"{LIST_OPTION}={json.dumps(callbacks, default=str)}", *rest[first:]]
