"""Config-supplied module patterns: PEFT's own answers, in bounded time, hostile patterns refused."""

import time
from types import SimpleNamespace

import pytest
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils.other import get_pattern_key

from lorayard.adapter_patterns import ModulePatterns, PatternRefused
from lorayard.testing.hostile_adapter import CATASTROPHIC_PATTERN, REGEX_TIMEOUT_PATTERN

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NAMES = [
    f"model.layers.{layer}.{'self_attn' if n in LINEARS[:4] else 'mlp'}.{n}"
    for layer in range(12)
    for n in LINEARS
]

CONFIGS = [
    {"target_modules": ["q_proj", "v_proj"]},
    {"target_modules": ["self_attn.q_proj", "model.layers.3.mlp.up_proj"]},
    {"target_modules": r".*\.(q|k)_proj"},
    {"target_modules": r".*layers\.1\d?\..*"},
    {"target_modules": ["q_proj", "down_proj"], "exclude_modules": ["model.layers.0.self_attn.q_proj"]},
    {"target_modules": ["q_proj", "o_proj"], "exclude_modules": r".*\.1\..*"},
    {"target_modules": ["q_proj", "up_proj"], "layers_to_transform": [0, 2, 11]},
    {"target_modules": ["v_proj"], "layers_to_transform": 3, "layers_pattern": "layers"},
    {"target_modules": ["v_proj"], "layers_to_transform": [1, 4], "layers_pattern": ["blocks", "layers"]},
    {
        "target_modules": ["q_proj"],
        "rank_pattern": {"layers.1.self_attn.q_proj": 2, r"layers\.\d\.self_attn\.q_proj": 4, "q_proj": 6},
        "alpha_pattern": {"^model.*q_proj": 3, "q_proj": 5.5},
    },
]


def _peft_config(config: dict) -> SimpleNamespace:
    fields = {"exclude_modules": None, "modules_to_save": None, "target_parameters": None}
    fields |= {"layers_to_transform": None, "layers_pattern": None}
    return SimpleNamespace(**(fields | config))


@pytest.mark.parametrize("config", CONFIGS)
def test_targets_rank_and_alpha_are_peft_s(config):
    ours = ModulePatterns(config, LINEARS)
    peft = _peft_config(config)
    for name in NAMES:
        assert ours.targets(name) == bool(check_target_module_exists(peft, name)), name
        for field, default, method in (("rank_pattern", 8, ours.rank), ("alpha_pattern", 16, ours.alpha)):
            patterns = config.get(field, {})
            expected = patterns.get(get_pattern_key(list(patterns), name), default)
            assert method(name, default)[0] == expected, (field, name)


def test_all_linear_means_every_linear_we_serve():
    ours = ModulePatterns({"target_modules": "all-linear"}, LINEARS)
    assert all(ours.targets(name) for name in NAMES)


def test_the_catastrophic_pattern_is_matched_at_once():
    """``(.*)*(.*)*y`` backtracks for hours in Python's re; here it is answered in milliseconds."""
    started = time.monotonic()
    ours = ModulePatterns({"target_modules": ["q_proj"], "alpha_pattern": {CATASTROPHIC_PATTERN: 8}}, LINEARS)
    assert [ours.alpha(name, 16)[0] for name in NAMES] == [16] * len(NAMES)
    assert time.monotonic() - started < 1.0


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"target_modules": ["q_proj"], "rank_pattern": {REGEX_TIMEOUT_PATTERN: 4}}, "rank_pattern"),
        ({"target_modules": REGEX_TIMEOUT_PATTERN}, "target_modules"),
        ({"target_modules": ["q_proj"], "exclude_modules": REGEX_TIMEOUT_PATTERN}, "exclude_modules"),
    ],
)
def test_a_pattern_past_the_budget_is_refused_naming_its_field(config, field):
    started = time.monotonic()
    ours = ModulePatterns(config, LINEARS, budget_s=0.3)
    with pytest.raises(PatternRefused, match=field) as refused:
        for name in NAMES:
            ours.targets(name)
            ours.rank(name, 8)
    assert refused.value.field == field
    assert time.monotonic() - started < 3.0  # the regex module's timeout overshoots a little


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"target_modules": "(unclosed"}, "target_modules"),
        ({"target_modules": ["q_proj"], "alpha_pattern": {"x" * 5000: 2}}, "alpha_pattern"),
        ({"target_modules": ["q_proj"], "rank_pattern": ["q_proj"]}, "rank_pattern"),
        ({"target_modules": [3]}, "target_modules"),
        ({"target_modules": ["q_proj"], "layers_to_transform": ["0"]}, "layers_to_transform"),
        (
            {"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": "(("},
            "layers_pattern",
        ),
    ],
)
def test_malformed_fields_are_refused_naming_them(config, field):
    with pytest.raises(PatternRefused, match=field):
        ModulePatterns(config, LINEARS)
