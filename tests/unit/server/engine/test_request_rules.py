"""The request rules' one home: the API and the engine's last guard call these same functions."""

import pytest

from lorayard.server.engine.request_rules import (
    check_context,
    check_min_tokens,
    check_token_ids,
    default_max_tokens,
)
from lorayard.server.engine.types import GuidedDecoding, InvalidRequest, PromptTooLong


def test_token_ids_must_be_in_the_vocabulary():
    check_token_ids("prompt", [0, 99], 100)
    with pytest.raises(
        InvalidRequest, match=r"logit_bias: token id 100 is outside the vocabulary \[0, 100\)"
    ) as info:
        check_token_ids("logit_bias", [5, 100], 100)
    assert info.value.param == "logit_bias"
    with pytest.raises(InvalidRequest):
        check_token_ids("stop_token_ids", [-1], 100)


def test_the_context_window_and_the_default_max_tokens():
    check_context(1000, 1048, 2048)
    with pytest.raises(PromptTooLong, match=r"1000 tokens.*1049.*2048"):
        check_context(1000, 1049, 2048)
    assert default_max_tokens(1000, 1024, 2048) == 1024
    assert default_max_tokens(1900, 1024, 2048) == 148
    assert default_max_tokens(2048, 1024, 2048) == 1  # then check_context refuses it


def test_min_tokens_with_a_grammar_is_refused():
    check_min_tokens(None, 5)
    check_min_tokens(GuidedDecoding("json_object"), 0)
    with pytest.raises(InvalidRequest, match="response_format or tools") as info:
        check_min_tokens(GuidedDecoding("structural_tag", "{}"), 1)
    assert info.value.param == "min_tokens"
