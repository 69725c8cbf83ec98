"""Pydantic fields as flags: the argparse form follows the field's type; the docs table follows the fields."""

import argparse
from pathlib import Path
from typing import Literal

import pytest
from pydantic import BaseModel, Field

from lorayard.flags import add_field_flags, flags_table


def _default_name() -> str:
    """The name of the day."""
    return "today"


class Example(BaseModel):
    count: int = Field(3, description="how many")
    ratio: float | None = Field(None, description="a share")
    folder: Path = Field(Path("out"), description="where")
    on: bool = Field(False, description="a switch")
    mode: Literal["a", "b"] | None = Field(None, description="a | b")
    files: list[Path] = Field(default_factory=list, description="inputs")
    tags: list[Literal["x", "y"]] = Field(default_factory=lambda: ["x"], description="labels")
    name: str = Field(default_factory=_default_name, description="a name")


def _parse(argv: list[str], **kwargs) -> dict:
    parser = argparse.ArgumentParser()
    add_field_flags(parser, Example.model_fields, **kwargs)
    return vars(parser.parse_args(argv))


def test_not_given_is_none_so_the_model_default_applies():
    assert set(_parse([]).values()) == {None}


def test_types_follow_the_annotations():
    args = _parse(["--count", "5", "--ratio", "0.5", "--folder", "x", "--no-on", "--mode", "b"])
    assert args["count"] == 5 and args["ratio"] == 0.5 and args["folder"] == Path("x")
    assert args["on"] is False and args["mode"] == "b"
    args = _parse(["--files", "a", "b", "--tags", "y", "x", "--on"])
    assert args["files"] == [Path("a"), Path("b")] and args["tags"] == ["y", "x"] and args["on"] is True
    assert Example.model_validate({k: v for k, v in args.items() if v is not None}).files == [
        Path("a"),
        Path("b"),
    ]


@pytest.mark.parametrize("argv", [["--mode", "c"], ["--tags", "z"], ["--count", "many"]])
def test_values_outside_the_type_are_refused(argv):
    with pytest.raises(SystemExit):
        _parse(argv)


def test_aliases_and_custom_parsers():
    args = _parse(["-n", "7", "--name", "A,B"], aliases={"count": ["-n"]}, parse={"name": str.lower})
    assert args["count"] == 7 and args["name"] == "a,b"


def test_table_rows_show_flags_defaults_and_escaped_meanings():
    table = flags_table(Example.model_fields, aliases={"count": ["-n"]}, env=lambda n: f"X_{n.upper()}")
    lines = table.splitlines()
    assert lines[0] == "| flag | env | default | meaning |"
    assert "| `--count` / `-n` | `X_COUNT` | `3` | how many |" in lines
    assert "| `--on` / `--no-on` | `X_ON` | off | a switch |" in lines
    assert "| `--mode` | `X_MODE` | none | a \\| b |" in lines
    assert "| `--files` | `X_FILES` | none | inputs |" in lines
    assert "| `--tags` | `X_TAGS` | `x` | labels |" in lines
    assert "| `--name` | `X_NAME` | The name of the day | a name |" in lines
