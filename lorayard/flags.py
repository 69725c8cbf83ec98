"""Pydantic fields as command-line flags, and as the docs' flag table: one rule for the server and the job.

A field ``max_batch_size`` is the flag ``--max-batch-size``; its type picks the argparse form (a bool is
``--x`` / ``--no-x``, a ``Literal`` has choices, a list takes several values) and its description is the
help text. Values stay unvalidated here: the pydantic model checks them, so each rule lives in the model.
"""

from __future__ import annotations

import argparse
import types
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from pydantic.fields import FieldInfo


def flag_name(name: str) -> str:
    """``max_batch_size`` -> ``--max-batch-size``."""
    return "--" + name.replace("_", "-")


def _arms(annotation: Any) -> list[Any]:
    """The members of a union (``X | None`` included), else the annotation itself; None dropped."""
    if get_origin(annotation) in (Union, types.UnionType):
        return [arm for arm in get_args(annotation) if arm is not type(None)]
    return [annotation]


def literal_choices(annotation: Any) -> list[str] | None:
    """The allowed values of a ``Literal`` annotation (or ``Literal | None``), else None."""
    literals = [arm for arm in _arms(annotation) if get_origin(arm) is Literal]
    return [str(value) for value in get_args(literals[0])] if len(literals) == 1 else None


def _scalar_type(annotation: Any) -> Callable[[str], Any] | None:
    return annotation if annotation in (int, float, Path) else None


def add_field_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    fields: Mapping[str, FieldInfo],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    parse: Mapping[str, Callable[[str], Any]] | None = None,
    help_suffix: Callable[[str], str] = lambda name: "",
) -> None:
    """One flag per field (default None: not given), plus ``aliases[name]`` spellings of it.

    ``parse[name]`` converts one value when the annotation alone cannot say how (a comma list).
    """
    aliases, parse = aliases or {}, parse or {}
    for name, field in fields.items():
        spellings = [flag_name(name), *aliases.get(name, ())]
        kwargs: dict[str, Any] = {"dest": name, "default": None}
        kwargs["help"] = f"{field.description}{help_suffix(name)}"
        arms = _arms(field.annotation)
        if name in parse:
            kwargs["type"] = parse[name]
        elif arms == [bool]:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif len(arms) == 1 and get_origin(arms[0]) is list:
            (item,) = get_args(arms[0])
            kwargs["nargs"] = "+"
            kwargs["choices"] = literal_choices(item)
            kwargs["type"] = _scalar_type(item)
        else:
            kwargs["choices"] = literal_choices(field.annotation)
            kwargs["type"] = _scalar_type(arms[0]) if len(arms) == 1 else None
        parser.add_argument(
            *spellings, **{k: v for k, v in kwargs.items() if v is not None or k == "default"}
        )


def default_text(field: FieldInfo) -> str:
    """A field's default as a docs table shows it (a computed one by its factory's docstring)."""
    factory = field.default_factory
    if factory is not None:
        if isinstance(factory, types.FunctionType) and factory.__name__ != "<lambda>" and factory.__doc__:
            return factory.__doc__.strip().splitlines()[0].rstrip(".")
        value = field.get_default(call_default_factory=True)
        if isinstance(value, list):
            return f"`{','.join(map(str, value))}`" if value else "none"
        return f"`{value}`"
    if field.default is None:
        return "none"
    if isinstance(field.default, bool):
        return "on" if field.default else "off"
    return f"`{field.default}`"


def flags_table(
    fields: Mapping[str, FieldInfo],
    *,
    aliases: Mapping[str, Sequence[str]] | None = None,
    env: Callable[[str], str] | None = None,
) -> str:
    """A markdown table of the flags :func:`add_field_flags` makes (with an env column if ``env``)."""
    aliases = aliases or {}
    header = ["flag", *(["env"] if env else []), "default", "meaning"]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name, field in fields.items():
        spellings = [flag_name(name), *aliases.get(name, ())]
        if _arms(field.annotation) == [bool]:
            spellings.append("--no-" + flag_name(name)[2:])
        cells = [" / ".join(f"`{s}`" for s in spellings)]
        if env:
            cells.append(f"`{env(name)}`")
        cells += [default_text(field), str(field.description)]
        rows.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(rows) + "\n"
