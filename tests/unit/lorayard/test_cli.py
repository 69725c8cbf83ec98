"""The one command, ``lorayard <command>``: dispatch, usage, and each command's help naming it as typed."""

from __future__ import annotations

import pytest

from lorayard.cli import main


def test_no_command_prints_the_commands_and_exits_2(capsys):
    assert main([]) == 2
    out = capsys.readouterr().out
    assert "usage: lorayard <command>" in out
    commands = ("serve", "train", "promote", "rollback", "history", "chat", "loadtest")
    assert all(name in out for name in commands)


def test_an_unknown_command_is_named(capsys):
    assert main(["servve"]) == 2
    assert "unknown command 'servve'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["chat", "loadtest"])
def test_client_commands_name_themselves_as_typed(capsys, command):
    with pytest.raises(SystemExit) as exited:
        main([command, "--help"])
    assert exited.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: lorayard {command} ")
