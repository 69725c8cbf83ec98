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


@pytest.mark.parametrize(
    "argv",
    [
        ["--tensor-parallel-size", "2"],
        ["--max-loras", "2"],
        ["--distributed-executor-backend", "ray"],
        ["--parity-probe", "off"],
    ],
)
def test_vllm_only_flags_are_refused_with_the_native_engine(argv, capsys):
    with pytest.raises(SystemExit):
        parse_settings(argv)
    assert f"{argv[0]} need --engine vllm" in capsys.readouterr().err


def test_vllm_flags_pass_through_to_vllms_engine_arguments(tmp_path):
    from lorayard.server.engine_vllm.config import engine_arguments

    settings = parse_settings(
        ["--engine", "vllm", "--tensor-parallel-size", "2", "--max-loaded-adapters", "6"]
    )
    kwargs = engine_arguments(settings, tmp_path, "cpu", "float32", 2048)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["max_cpu_loras"] == 6 and kwargs["max_loras"] == 6
    assert kwargs["pipeline_parallel_size"] == 1 and kwargs["model"] == str(tmp_path)


def test_our_engines_own_tuning_is_refused_by_name_with_engine_vllm(tmp_path):
    from lorayard.server.engine_vllm.config import VllmSettingsError, engine_arguments

    settings = parse_settings(["--engine", "vllm", "--decode-mode", "static"])
    with pytest.raises(VllmSettingsError, match="--decode-mode"):
        engine_arguments(settings, tmp_path, "cpu", "float32", 2048)


def test_a_lora_rank_vllm_cannot_be_sized_for_is_refused(capsys):
    with pytest.raises(SystemExit):
        parse_settings(["--engine", "vllm", "--max-lora-rank", "12"])
    assert "--max-lora-rank" in capsys.readouterr().err
