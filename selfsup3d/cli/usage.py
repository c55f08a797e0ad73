"""Usage errors in two lines: the problem, naming the key, then where to get help.

argparse prints the whole usage (some 60 lines for ``fit``) before an error, and jsonargparse explains a value
that fits none of a union's types as a tree, one branch per type it tried::

    Parser key "model":
      Does not validate against any of the Union subtypes
      Subtypes: [<class 'selfsup3d.objectives.base.PretrainObjective'>, <class 'NoneType'>]
      Errors:
        - Problem with given class_path 'toy.RotationPrediction':
            Parser key "lr":
              Expected a <class 'float'>. Got value: fast
        - Expected a <class 'NoneType'>
      Given value type: <class 'jsonargparse._util.NestedArg'>
      Given value: NestedArg(key='lr', val='fast')

:func:`condense_error` follows the branch that explains it and joins the keys on the way:
``model.init_args.lr: expected float, got 'fast'``. :class:`ConciseArgumentParser` prints that, and a line on
``--help``, instead of the usage. ``JSONARGPARSE_DEBUG=1`` still raises with the full message.
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':\s*(.*)$")
_OPTION = re.compile(r"^Option '([^']+)' is not accepted$")
_EXPECTED = re.compile(r"^Expected a (.+?)(?:\. Got value: (.*))?$")
_IMPORT = re.compile(r"^Expected a dot import path string: (.+)$")
_GIVEN = "Given value:"
_NOISE = ("Does not validate against", "Subtypes:", "Given value", "Expected a path but", "Errors:")
MAX_LENGTH = 400
"""Longer explanations are cut (a ``Literal`` with many choices, a long given value)."""


@dataclass
class _Node:
    text: str
    children: list[_Node] = field(default_factory=list)


def _tree(message: str) -> list[_Node]:
    """jsonargparse's indented explanation as a forest (``- `` items count as indented by two more)."""
    roots: list[_Node] = []
    stack: list[tuple[int, _Node]] = []
    for raw in message.splitlines():
        text = raw.strip()
        if not text:
            continue
        indent = len(raw) - len(raw.lstrip())
        if text.startswith("- "):
            text, indent = text[2:].strip(), indent + 2
        node = _Node(text)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        (stack[-1][1].children if stack else roots).append(node)
        stack.append((indent, node))
    return roots


def _type_name(text: str) -> str:
    text = text.strip()
    if match := re.fullmatch(r"<class '([\w.]+)'>", text):
        name = match.group(1).rsplit(".", 1)[-1]
        return "None" if name == "NoneType" else name
    if match := re.fullmatch(r"typing\.Literal\[(.*)\]", text):
        return f"one of {match.group(1)}"
    return text


def _given(nodes: list[_Node]) -> str | None:
    for node in nodes:
        if node.text.startswith(_GIVEN):
            return node.text[len(_GIVEN) :].strip()
    return None


def _leaf(text: str, given: str | None) -> str:
    """One explanation line in plain words."""
    if match := _IMPORT.match(text):
        return f"{match.group(1)!r} is not a class it can import (give its class_path, e.g. package.module.Class)"
    if match := _EXPECTED.match(text):
        value = match.group(2) if match.group(2) is not None else given
        return f"expected {_type_name(match.group(1))}" + (f", got {value!r}" if value is not None else "")
    return text


def _explain(nodes: list[_Node], keys: list[str], cls: str | None = None) -> str | None:
    """The explanation of ``nodes``; appends the keys on its way to ``keys``."""
    given = _given(nodes)
    for node in nodes:
        if match := _KEY.match(node.text):
            keys.append(match.group(1))
            if match.group(2):
                return _leaf(match.group(2), given)
            return _explain(node.children, keys, cls) or _leaf(node.text, given)
        if match := _OPTION.match(node.text):
            keys.append(match.group(1))
            return f"not an argument of {cls}" if cls else "no such argument"
        if _CLASS.match(node.text):
            return _class_branch(node, keys)
    errors = next((n for n in nodes if n.text == "Errors:"), None)
    branches = errors.children if errors else []
    for branch in branches:  # a class_path that was tried: the error is inside it (the first such branch)
        if _CLASS.match(branch.text):
            return _class_branch(branch, keys)
    if branches:
        imports = [b.text for b in branches if _IMPORT.match(b.text)]
        if imports:
            return _leaf(imports[0], given)
        expected = [m.group(1) for b in branches if (m := _EXPECTED.match(b.text))]
        if len(expected) == len(branches):
            names = list(dict.fromkeys(_type_name(t) for t in expected))
            return f"expected {' or '.join(names)}" + (f", got {given!r}" if given is not None else "")
        return "; ".join(dict.fromkeys(_leaf(b.text, given) for b in branches))
    for node in nodes:
        if not node.text.startswith(_NOISE):
            return _leaf(node.text, given)
    return None


def _class_branch(node: _Node, keys: list[str]) -> str | None:
    """``Problem with given class_path 'C':``: an argument of ``C`` (then under ``init_args``) or ``C`` itself."""
    match = _CLASS.match(node.text)
    assert match is not None
    inner = node.children
    if inner and (_KEY.match(inner[0].text) or _OPTION.match(inner[0].text)):
        keys.append("init_args")
        return _explain(inner, keys, match.group(1))
    reason = match.group(2) or "; ".join(n.text for n in inner)
    return f"class_path {match.group(1)!r}: {reason}"


def condense_error(message: str) -> str:
    """One line for a jsonargparse (or selfsup3d) error message: ``key.path: what is wrong``."""
    keys: list[str] = []
    structured = re.search(r"^\s*(- )?(Parser key \"|Problem with given class_path|Errors:|Option ')", message, re.M)
    detail = _explain(_tree(message), keys) if structured else None
    if not detail:
        detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
    line = f"{'.'.join(keys)}: {detail}" if keys else detail
    return line if len(line) <= MAX_LENGTH else line[: MAX_LENGTH - 3] + "..."


class ConciseArgumentParser(LightningArgumentParser):
    """A LightningCLI parser whose usage errors are two lines: ``PROG: error: <condensed message>`` and a pointer
    to ``PROG --help``; the exit status stays 2."""

    def error(self, message: str, ex: Exception | None = None) -> NoReturn:
        if not self.exit_on_error or os.environ.get("JSONARGPARSE_DEBUG", "").lower() in {"1", "true", "yes", "on"}:
            super().error(message, ex)
        parser: Any = getattr(ex, "subcommand_parser", None) or self
        prog = str(parser.prog).replace(" [options]", "")
        sys.stderr.write(f"{prog}: error: {condense_error(message)}\n")
        sys.stderr.write(f"{prog}: `{prog} --help` lists the options\n")
        self.exit(2)
