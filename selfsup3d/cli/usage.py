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
``--help``, instead of the usage. ``JSONARGPARSE_DEBUG=true`` still raises with the full message.

jsonargparse does not say which entry of a mapping of components (a multi-task run's ``objectives``, a combined
datamodule's ``sources``) holds the problem; the entry is found in the given value (parsed, never evaluated) and
named in the key: ``model.init_args.objectives.masked_view.init_args.dimm: not an argument of ...``. Values and
lists of choices are shortened; the message itself (selfsup3d's own, with its advice) is never cut.
"""

from __future__ import annotations

import ast
import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NoReturn

from lightning.pytorch.cli import LightningArgumentParser

from selfsup3d.errors import shorten

_KEY = re.compile(r'^Parser key "([^"]+)":\s*(.*)$')
_CLASS = re.compile(r"^Problem with given class_path '([^']+)':\s*(.*)$")
_OPTION = re.compile(r"^Option '([^']+)' is not accepted$")
_EXPECTED = re.compile(r"^Expected a (.+?)(?:\. Got value: (.*))?$")
_IMPORT = re.compile(r"^Expected a dot import path string: (.+)$")
_COMPONENT = re.compile(r"^Type .+? expects a function or a callable class: (.*)$", re.S)
_GIVEN = "Given value:"
_NOISE = ("Does not validate against", "Subtypes:", "Given value", "Expected a path but", "Errors:")
MAX_VALUE_LENGTH = 120
"""Values and lists of choices quoted in an explanation are shortened to this many characters."""


@dataclass
class _Node:
    text: str
    children: list[_Node] = field(default_factory=list)

    def render(self, indent: int = 0) -> list[str]:
        """The node's lines as jsonargparse wrote them (indented by two per level)."""
        return [" " * indent + self.text, *(line for c in self.children for line in c.render(indent + 2))]


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
        return f"one of {shorten(match.group(1), MAX_VALUE_LENGTH)}"
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
        return f"expected {_type_name(match.group(1))}" + (f", got {_quoted(value)}" if value is not None else "")
    return text


def _quoted(value: str) -> str:
    return shorten(repr(value), MAX_VALUE_LENGTH)


def _plain(node: ast.AST) -> Any:
    """A parsed repr as plain data: literals, dicts, lists, and ``Namespace(...)``/``NestedArg(...)`` calls as
    dicts of their keyword arguments. Raises ``ValueError`` for anything else."""
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and not node.args:
        return {kw.arg: _plain(kw.value) for kw in node.keywords if kw.arg}
    if isinstance(node, ast.Dict):
        return {_plain(k): _plain(v) for k, v in zip(node.keys, node.values) if k is not None}
    if isinstance(node, (ast.List, ast.Tuple)):
        return [_plain(e) for e in node.elts]
    return ast.literal_eval(node)


def _parse_value(text: str | None) -> Any:
    """A value as jsonargparse printed it (``repr`` of dicts, lists and namespaces), or ``None``."""
    try:
        return _plain(ast.parse(text.strip(), mode="eval").body) if text else None
    except (SyntaxError, ValueError, TypeError):
        return None


def _entry_name(root: Any, keys: list[str], entry: Mapping[str, Any], option: str | None) -> str | None:
    """The name of ``entry`` in the mapping of components that ``keys`` lead to in ``root``, the given value of the
    first key: the one entry with ``entry``'s class (and holding ``option``, when the problem is one), or the
    name in a command-line override (``NestedArg(key="objectives.NAME.init_args...")``)."""
    if isinstance(root, Mapping) and set(root) == {"key", "val"} and isinstance(root["key"], str):
        parts = root["key"].split(".")
        if keys[-1] in parts[:-1]:
            return parts[parts.index(keys[-1]) + 1]
        return parts[0] if len(keys) == 1 or parts[0] not in ("init_args", "class_path") else None
    mapping = root
    for key in keys[1:]:
        mapping = mapping.get(key) if isinstance(mapping, Mapping) else None
    if not isinstance(mapping, Mapping):
        return None
    names = [
        name
        for name, value in mapping.items()
        if isinstance(value, Mapping)
        and value.get("class_path") == entry.get("class_path")
        and (option is None or option in (value.get("init_args") or {}))
    ]
    return names[0] if len(names) == 1 else None


def _component(text: str, children: list[_Node], keys: list[str], root: Any) -> str | None:
    """``Type ... expects a function or a callable class: <problem>. Got value: <entry>``: the problem of one
    entry of a mapping of components (``objectives``, ``sources``), explained under the entry's name."""
    lines = [text, *(line for child in children for line in child.render(2))]
    message = "\n".join(lines)
    cut = max(message.rfind(". Got value: Namespace("), message.rfind(". Got value: {"))
    entry = _parse_value(message[cut + len(". Got value: ") :]) if cut >= 0 else None
    if cut >= 0:
        message = message[:cut]
    entry = entry if isinstance(entry, Mapping) else {}
    option = _OPTION.match(message.strip()) or _KEY.match(message.strip().splitlines()[0])
    name = _entry_name(root, keys, entry, option.group(1) if option else None) if keys else None
    cls = entry.get("class_path")
    if name is not None:
        keys.append(name)
        if option is not None:
            keys.append("init_args")
    elif cls:
        keys.append(f"<the {str(cls).rsplit('.', 1)[-1]} entry>")
        if option is not None:
            keys.append("init_args")
    return _explain(_tree(message), keys, cls, root) or message.strip()


def _explain(nodes: list[_Node], keys: list[str], cls: str | None = None, root: Any = None) -> str | None:
    """The explanation of ``nodes``; appends the keys on its way to ``keys``. ``root`` is the given value of the
    first key (where the entries of mappings of components are looked up)."""
    given = _given(nodes)
    for node in nodes:
        if match := _KEY.match(node.text):
            if not keys:
                root = _parse_value(_given(node.children))
            keys.append(match.group(1))
            if component := _COMPONENT.match(match.group(2)):
                return _component(component.group(1), node.children, keys, root)
            if match.group(2):
                return _leaf(match.group(2), given)
            return _explain(node.children, keys, cls, root) or _leaf(node.text, given)
        if match := _COMPONENT.match(node.text):
            return _component(match.group(1), node.children, keys, root)
        if match := _OPTION.match(node.text):
            keys.append(match.group(1))
            return f"not an argument of {cls}" if cls else "no such argument"
        if _CLASS.match(node.text):
            return _class_branch(node, keys, root)
    errors = next((n for n in nodes if n.text == "Errors:"), None)
    branches = errors.children if errors else []
    for branch in branches:  # a class_path that was tried: the error is inside it (the first such branch)
        if _CLASS.match(branch.text):
            return _class_branch(branch, keys, root)
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


def _class_branch(node: _Node, keys: list[str], root: Any = None) -> str | None:
    """``Problem with given class_path 'C':``: an argument of ``C`` (then under ``init_args``) or ``C`` itself."""
    match = _CLASS.match(node.text)
    assert match is not None
    inner = node.children
    if inner and (_KEY.match(inner[0].text) or _OPTION.match(inner[0].text)):
        keys.append("init_args")
        return _explain(inner, keys, match.group(1), root)
    reason = match.group(2) or "; ".join(n.text for n in inner)
    return f"class_path {match.group(1)!r}: {reason}"


def condense_error(message: str) -> str:
    """One line for a jsonargparse (or selfsup3d) error message: ``key.path: what is wrong``."""
    keys: list[str] = []
    structured = re.search(r"^\s*(- )?(Parser key \"|Problem with given class_path|Errors:|Option ')", message, re.M)
    detail = _explain(_tree(message), keys) if structured else None
    if not detail:
        detail = " ".join(line.strip() for line in message.splitlines() if line.strip())
    return f"{'.'.join(keys)}: {detail}" if keys else detail


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
