"""`--print-config --explain`: the resolved config, one dotted key a line, each with its comment from utils/config.py.

The comments are read from the dataclasses' source (a comment beside a field, and the comment lines right above
it), so the explanation is the code's own and cannot drift from it. The output is YAML: dotted keys with flow-style
values, the explanations as YAML comments.
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import io
import tokenize
import typing
from typing import Any

import yaml
from omegaconf import OmegaConf


def _comments_by_line(source: str) -> tuple[dict[int, str], set[int]]:
    """Line number -> comment text (without '#'), and the lines that hold nothing but a comment."""
    comments, alone = {}, set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            line = token.start[0]
            comments[line] = token.string.lstrip("#").strip()
            if not token.line[:token.start[1]].strip():
                alone.add(line)
    return comments, alone


def field_comments(module) -> dict[str, dict[str, str]]:
    """Class name -> field name -> its comment, for every class in `module`'s source: the comment lines directly
    above a field (joined) followed by the one beside it."""
    source = inspect.getsource(module)
    comments, alone = _comments_by_line(source)
    found: dict[str, dict[str, str]] = {}
    for node in ast.walk(ast.parse(source)):
        if not isinstance(node, ast.ClassDef):
            continue
        fields = found.setdefault(node.name, {})
        for statement in node.body:
            if not (isinstance(statement, ast.AnnAssign) and isinstance(statement.target, ast.Name)):
                continue
            above, line = [], statement.lineno - 1
            while line in alone:
                above.insert(0, comments[line])
                line -= 1
            beside = [comments[n] for n in range(statement.lineno, statement.end_lineno + 1)
                      if n in comments and n not in alone]
            text = " ".join(above + beside)
            if text:
                fields[statement.target.id] = text
    return found


def _flow(value: Any) -> str:
    """A value as one line of YAML flow style (a list as [a, b])."""
    text = yaml.safe_dump(value, default_flow_style=True, width=1 << 20).strip()
    return text[:-len("\n...")].strip() if text.endswith("\n...") else text


def _lines(node: Any, values: dict, prefix: str, comments: dict[str, dict[str, str]]) -> list[str]:
    """`key: value  # comment` for each leaf of the dataclass `node`, nested sections recursed into."""
    own = comments.get(type(node).__name__, {})
    hints = typing.get_type_hints(type(node))
    lines = []
    for f in dataclasses.fields(node):
        key, child = f"{prefix}{f.name}", getattr(node, f.name)
        if dataclasses.is_dataclass(hints.get(f.name)):
            lines += _lines(child, values[f.name], key + ".", comments)
            continue
        comment = own.get(f.name, "")
        lines.append(f"{key}: {_flow(values[f.name])}" + (f"  # {comment}" if comment else ""))
    return lines


def explained_yaml(cfg) -> str:
    """The resolved config `cfg` (utils.config.Config) as YAML, one dotted key a line with its comment, each
    section headed by its class's docstring where it has one."""
    from utils import config as config_module

    comments = field_comments(config_module)
    values = OmegaConf.to_container(OmegaConf.structured(cfg))
    out = []
    for section in dataclasses.fields(cfg):
        node = getattr(cfg, section.name)
        doc = " ".join((type(node).__doc__ or "").split())
        # dataclass() gives an undocumented class its signature as docstring; only a written one is shown.
        header = [] if doc.startswith(type(node).__name__ + "(") else [f"# {section.name}: {doc}"]
        out += ["", *header, *_lines(node, values[section.name], section.name + ".", comments)]
    return "\n".join(out[1:]) + "\n"
