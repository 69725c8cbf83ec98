"""Server settings from flags and LORAYARD_* env: one spelling per flag, the old quantization aliases."""

import pytest

from lorayard.server.settings import Settings, flags_markdown, parse_settings


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        ([], None),
        (["--quantization", "4bit"], "4bit"),
        (["--quantization", "8bit"], "8bit"),
        (["--load-in-4bit"], "4bit"),
        (["--load-in-8bit"], "8bit"),
        (["--load-in-4bit", "--quantization", "4bit"], "4bit"),
    ],
)
def test_quantization_flag_and_its_aliases(argv, expected):
    assert parse_settings(argv).quantization == expected


@pytest.mark.parametrize(
    "argv", [["--load-in-4bit", "--load-in-8bit"], ["--quantization", "8bit", "--load-in-4bit"]]
)
def test_two_quantizations_are_refused(argv, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv)
    assert "--quantization" in capsys.readouterr().err


def test_quantization_from_the_environment(monkeypatch, capsys):
    monkeypatch.setenv("LORAYARD_LOAD_IN_8BIT", "true")
    assert parse_settings([]).quantization == "8bit"
    assert parse_settings(["--quantization", "4bit"]).quantization == "4bit"  # a flag wins over env
    monkeypatch.delenv("LORAYARD_LOAD_IN_8BIT")
    monkeypatch.setenv("LORAYARD_QUANTIZATION", "3bit")
    with pytest.raises(SystemExit):
        parse_settings([])
    assert "--quantization" in capsys.readouterr().err


def test_flags_table_lists_every_setting():
    table = flags_markdown()
    for name in Settings.model_fields:
        assert f"`--{name.replace('_', '-')}`" in table
        assert f"`LORAYARD_{name.upper()}`" in table
    assert "`--load-in-4bit`" in table
