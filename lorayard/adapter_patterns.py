"""Which modules an adapter config targets, and with what rank and alpha: PEFT's semantics, in bounded time.

An ``adapter_config.json`` carries regular expressions (``target_modules`` as a string,
``exclude_modules``, ``rank_pattern`` and ``alpha_pattern`` keys, ``layers_pattern``), and whoever
writes a folder on the volume writes them. Run through Python's ``re`` a pattern such as
``(.*)*(.*)*y`` backtracks for hours while holding the GIL, freezing every request and SIGTERM.
So they run here through the ``regex`` module (a well-kept superset of ``re``, already a dependency of
transformers) with ``concurrent=True`` (the GIL is released while matching) and one time budget per
adapter: a pattern that cannot be matched within it, or at all, is refused, naming the field.

The rules are PEFT's own (``peft.tuners.tuners_utils.check_target_module_exists`` and
``peft.utils.other.get_pattern_key``, PEFT 0.17-0.21), applied to module names such as
``model.layers.3.self_attn.q_proj``:

- ``target_modules`` a string: ``fullmatch`` against the name; a list: the name equals an entry or
  ends with ``"." + entry``; ``"all-linear"``: every linear we serve.
- ``exclude_modules``: the same, and it wins over ``target_modules``.
- ``layers_to_transform`` (with ``layers_pattern``, list entries only): the layer index after
  ``layers_pattern`` (default: the first numbered segment) must be listed.
- ``rank_pattern`` / ``alpha_pattern``: the first key ``k`` (in file order) for which
  ``(.*\\.)?(k)$`` matches the start of the name gives that module's rank / alpha.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import regex

MATCH_BUDGET_S = 1.0
"""Time one adapter's patterns may take, all matches together; far above what a real config needs
(milliseconds) and far below what a client would notice as a hang."""

MAX_PATTERN_CHARS = 1024
"""Longest pattern accepted: a full module name is ~40 characters."""

MAX_PATTERNS = 10_000
"""Most keys in one pattern field: one per module of a 100-layer model is 700."""


class PatternRefused(ValueError):
    """A config pattern that cannot be matched exactly in bounded time; ``field`` names its field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


class _Budget:
    """What is left of one adapter's matching time."""

    def __init__(self, seconds: float) -> None:
        self.deadline = time.monotonic() + seconds

    def left(self, field: str) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining <= 0:
            raise PatternRefused(field, f"matching took longer than {MATCH_BUDGET_S} s; simplify the pattern")
        return remaining


def _compile(field: str, pattern: Any) -> regex.Pattern[str]:
    if not isinstance(pattern, str):
        raise PatternRefused(field, f"expected a string pattern, got {type(pattern).__name__}")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternRefused(field, f"a pattern of {len(pattern)} characters (at most {MAX_PATTERN_CHARS})")
    try:
        return regex.compile(pattern, flags=regex.VERSION0)
    except (regex.error, ValueError, OverflowError, RecursionError) as exc:
        raise PatternRefused(field, f"{pattern[:80]!r} is not a valid regular expression ({exc})") from exc


@dataclass(frozen=True)
class _Compiled:
    field: str
    source: str
    pattern: regex.Pattern[str]


class ModulePatterns:
    """An adapter config's module patterns, compiled once; every match shares one time budget.

    Raises PatternRefused from the constructor (a malformed field) or from any method (out of time).
    """

    def __init__(
        self, config: dict[str, Any], all_linear: Iterable[str], budget_s: float = MATCH_BUDGET_S
    ) -> None:
        """config: the parsed adapter_config.json; all_linear: the short names ``"all-linear"`` means."""
        self._budget = _Budget(budget_s)
        self._all_linear = frozenset(all_linear)
        self._targets = self._module_spec("target_modules", config.get("target_modules"))
        self._excludes = self._module_spec("exclude_modules", config.get("exclude_modules"))
        self._layers = _layer_indexes(config.get("layers_to_transform"))
        patterns = config.get("layers_pattern") or []
        patterns = [patterns] if isinstance(patterns, str) else patterns
        self._layers_patterns = [
            _Compiled("layers_pattern", p, _compile("layers_pattern", rf"(?:^|.*?\.){p}\.(?P<idx>\d+)\."))
            for p in _listed("layers_pattern", patterns)
        ]
        self._rank = self._keyed("rank_pattern", config.get("rank_pattern"))
        self._alpha = self._keyed("alpha_pattern", config.get("alpha_pattern"))

    # -- construction ----------------------------------------------------------------------------
    def _module_spec(self, field: str, value: Any) -> _Compiled | frozenset[str] | None:
        """A string -> one fullmatch pattern; a list -> names matched exactly or as a dotted suffix."""
        if value is None:
            return None
        if isinstance(value, str):
            if value == "all-linear":
                return self._all_linear
            return _Compiled(field, value, _compile(field, value))
        names = _listed(field, value)
        for name in names:
            if not isinstance(name, str):
                raise PatternRefused(field, f"expected module names, got {name!r}")
        return frozenset(names)

    def _keyed(self, field: str, value: Any) -> list[tuple[_Compiled, Any]]:
        if value is None:
            return []
        if not isinstance(value, dict):
            raise PatternRefused(field, f"expected an object of pattern -> value, got {type(value).__name__}")
        if len(value) > MAX_PATTERNS:
            raise PatternRefused(field, f"{len(value)} patterns (at most {MAX_PATTERNS})")
        compiled = []
        for key, setting in value.items():
            _compile(field, key)  # the key alone must be a valid pattern: PEFT embeds it in a group
            compiled.append((_Compiled(field, key, _compile(field, rf"(.*\.)?({key})$")), setting))
        return compiled

    # -- matching --------------------------------------------------------------------------------
    def _search(self, compiled: _Compiled, name: str, *, full: bool) -> regex.Match[str] | None:
        timeout = self._budget.left(compiled.field)
        try:
            if full:
                return compiled.pattern.fullmatch(name, timeout=timeout, concurrent=True)
            return compiled.pattern.match(name, timeout=timeout, concurrent=True)
        except TimeoutError as exc:
            raise PatternRefused(
                compiled.field,
                f"{compiled.source[:80]!r} cannot be matched in bounded time (catastrophic backtracking?)",
            ) from exc

    def _listed_or_matched(self, spec: _Compiled | frozenset[str], name: str) -> bool:
        if isinstance(spec, _Compiled):
            return self._search(spec, name, full=True) is not None
        return name in spec or any(name.endswith(f".{entry}") for entry in spec)

    def targets(self, name: str) -> bool:
        """Whether PEFT puts a LoRA layer on the module ``name`` (e.g. ``model.layers.3.mlp.up_proj``)."""
        if self._excludes is not None and self._listed_or_matched(self._excludes, name):
            return False
        if self._targets is None:
            return False
        if isinstance(self._targets, _Compiled):
            return self._search(self._targets, name, full=True) is not None
        if name in self._targets:  # PEFT: an exact name skips the layer filter
            return True
        if not any(name.endswith(f".{entry}") for entry in self._targets):
            return False
        return self._layer_selected(name)

    def _layer_selected(self, name: str) -> bool:
        if self._layers is None:
            return True
        index = None
        if not self._layers_patterns:
            # PEFT's default: the first numbered segment; a fixed pattern of ours, no backtracking risk.
            match = regex.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
            index = None if match is None else match["idx"]
        for compiled in self._layers_patterns:
            match = self._search(compiled, name, full=False)
            if match is not None:
                index = match["idx"]
                break
        return index is not None and int(index) in self._layers

    def rank(self, name: str, default: int) -> tuple[int, str]:
        """The rank PEFT gives ``name`` and the field it came from (``rank_pattern`` or ``r``)."""
        value, field = self._first(self._rank, name, default, "r")
        return value, field

    def alpha(self, name: str, default: float) -> tuple[float, str]:
        """The alpha PEFT gives ``name`` and the field it came from (``alpha_pattern`` or ``lora_alpha``)."""
        return self._first(self._alpha, name, default, "lora_alpha")

    def _first(self, keyed: list[tuple[_Compiled, Any]], name: str, default: Any, field: str) -> Any:
        for compiled, value in keyed:
            if self._search(compiled, name, full=False) is not None:
                return value, compiled.field
        return default, field


def _listed(field: str, value: Any) -> list[Any]:
    if not isinstance(value, list | tuple):
        raise PatternRefused(field, f"expected a string or a list, got {type(value).__name__}")
    if len(value) > MAX_PATTERNS:
        raise PatternRefused(field, f"{len(value)} entries (at most {MAX_PATTERNS})")
    return list(value)


def _layer_indexes(value: Any) -> frozenset[int] | None:
    """``layers_to_transform``: an int, a list of ints, or nothing (every layer)."""
    if value is None or value == []:
        return None
    values = [value] if isinstance(value, int) else _listed("layers_to_transform", value)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise PatternRefused("layers_to_transform", f"expected layer indexes, got {value!r}")
    return frozenset(values)
