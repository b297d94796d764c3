"""The search space: ``hydra.sweeper.params`` (and sweeps on the command line) parsed with Hydra's own
override parser and mapped to Optuna distributions.

Grammar (the same as Hydra's sweepers):

- ``choice(a, b, c)`` (or ``a,b,c``): ``CategoricalDistribution`` over the values (a list or dict choice as
  its override text); each job gets its choice written so that it parses back to the same value;
- ``range(start, stop[, step])``: ``IntDistribution`` (or ``FloatDistribution`` with ``step`` when a bound or
  the step is a float) over ``start, start + step, ...`` below ``stop``, as Hydra's ``range`` lists them;
  ``shuffle(range(...))``: categorical over those values; ``tag(log, range(...))``: integers on a log scale
  (step 1);
- ``interval(low, high)``: ``FloatDistribution(low, high)`` (Hydra reads interval bounds as floats: use
  ``range`` for ints); ``tag(log, interval(low, high))``: the same on a log scale;
- anything else that is not a sweep (``optimizer.lr=1e-3``): fixed, passed to every trial as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import ChoiceSweep, IntervalSweep, Override, RangeSweep, Transformer
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution


class ParamError(ValueError):
    """A ``params`` entry that does not parse or maps to no distribution (the message is one line)."""


@dataclass
class SearchSpace:
    distributions: dict[str, BaseDistribution] = field(default_factory=dict)
    fixed: dict[str, str] = field(default_factory=dict)  # key -> the value as the override writes it
    choice_texts: dict[str, list[str]] = field(default_factory=dict)  # key -> each choice as an override writes it

    def text(self, name: str, value: Any) -> str:
        """A sampled value as an override writes it: a choice as it parses back to itself (``'a,b'`` ->
        ``a\\,b``), a number as Python writes it."""
        texts, dist = self.choice_texts.get(name), self.distributions.get(name)
        if texts is not None and dist is not None:
            return texts[int(dist.to_internal_repr(value))]
        return str(value)

    def overrides(self, params: Mapping[str, Any]) -> list[str]:
        """A trial's job overrides: its sampled values, then the fixed ones (``key=value``)."""
        return [*(f"{k}={self.text(k, v)}" for k, v in params.items()), *(f"{k}={v}" for k, v in self.fixed.items())]


def _round_trips(text: str, value: Any) -> bool:
    try:
        back = OverridesParser.create().parse_override(f"x={text}").value()
    except Exception:
        return False
    return type(back) is type(value) and back == value


def quote(value: str) -> str:
    """``value`` as a quoted Hydra override value that parses back to itself."""
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)  # backslashes before a quote, the quote
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)  # backslashes before the closing quote
    return "'" + value.replace("${", "\\${") + "'"


def choice_text(value: Any) -> str:
    """One choice as an override value that parses back to it (Hydra's escaping, else quoted)."""
    text = Transformer.str(value)
    return text if not isinstance(value, str) or _round_trips(text, value) else quote(value)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _choices(override: Override) -> tuple[tuple[Any, ...], list[str]]:
    """The choices (a list or dict choice as its text: Optuna's choices are primitives) and their texts."""
    values = list(override.sweep_iterator())
    texts = [choice_text(v) for v in values]
    return tuple(v if isinstance(v, (str, int, float, bool)) else t for v, t in zip(values, texts)), texts


def distribution(override: Override) -> tuple[BaseDistribution, list[str] | None] | None:
    """The Optuna distribution of one parsed override (with its choices' texts when categorical);
    None for a fixed value (not a sweep)."""
    if not override.is_sweep_override():
        return None
    value = override.value()
    try:
        if isinstance(value, ChoiceSweep) or (isinstance(value, RangeSweep) and value.shuffle):
            choices, texts = _choices(override)
            return CategoricalDistribution(choices), texts
        if isinstance(value, RangeSweep):
            start, stop, step = value.start, value.stop, value.step
            if step == 0:
                raise ParamError("range step must not be 0")
            n = math.ceil((stop - start) / step)  # as Hydra's range: start, start + step, ... below stop
            if n <= 0 or step < 0:
                raise ParamError("empty range (Optuna needs start < stop and a positive step)")
            high = start + (n - 1) * step
            if "log" in value.tags:
                if not (_is_int(start) and _is_int(stop) and step == 1):
                    raise ParamError("tag(log, range(...)) needs int bounds and step 1")
                return IntDistribution(int(start), int(high), log=True), None
            if _is_int(start) and _is_int(stop) and _is_int(step):
                return IntDistribution(int(start), int(high), step=int(step)), None
            return FloatDistribution(float(start), float(high), step=float(step)), None
        if isinstance(value, IntervalSweep):  # Hydra's grammar reads interval bounds as floats
            return FloatDistribution(float(value.start), float(value.end), log="log" in value.tags), None
    except ParamError:
        raise
    except Exception as exc:  # Optuna's own checks (low > high, log of a bound <= 0, ...)
        raise ParamError(_first_line(exc)) from exc
    raise ParamError(f"{type(value).__name__} maps to no Optuna distribution "
                     "(use choice(...), range(...), interval(...) or tag(log, interval(...)))")


def parse_entry(key: str, value: Any, parser: OverridesParser | None = None
                ) -> tuple[str, tuple[BaseDistribution, list[str] | None] | str]:
    """``(key, (distribution, choice texts))`` for a sweep, ``(key, value as an override writes it)`` for
    a fixed value."""
    parser = parser or OverridesParser.create()
    line = f"{key}={value}"
    try:
        override = parser.parse_override(line)
    except Exception as exc:
        raise ParamError(f"does not parse: {_first_line(exc)}") from exc
    try:
        dist = distribution(override)
    except ParamError:
        raise
    except Exception as exc:  # e.g. glob(...), which needs Hydra's config loader
        raise ParamError(f"maps to no Optuna distribution: {_first_line(exc)}") from exc
    name = override.get_key_element()
    return (name, dist) if dist is not None else (name, override.get_value_element_as_str())


def search_space(params: Mapping[str, Any] | None, arguments: Iterable[str] = (),
                 legacy: Mapping[str, BaseDistribution] | None = None) -> tuple[SearchSpace, list[str]]:
    """The search space of ``params`` (``hydra.sweeper.params``), the deprecated ``search_space``
    distributions (``legacy``) and the command line's overrides (``arguments``, which win), with a
    problem line per bad entry (``hydra.sweeper.params.<key>=<value>: why``)."""
    parser = OverridesParser.create()
    space, problems = SearchSpace(distributions=dict(legacy or {})), []
    for name, dist in space.distributions.items():
        if isinstance(dist, CategoricalDistribution):
            space.choice_texts[name] = [choice_text(c) for c in dist.choices]

    def add(name: str, what: tuple[BaseDistribution, list[str] | None] | str) -> None:
        for known in (space.distributions, space.fixed, space.choice_texts):
            known.pop(name, None)
        if isinstance(what, str):
            space.fixed[name] = what
            return
        space.distributions[name] = what[0]
        if what[1] is not None:
            space.choice_texts[name] = what[1]

    for key, value in (params or {}).items():
        try:
            add(*parse_entry(str(key), value, parser))
        except ParamError as exc:
            problems.append(f"hydra.sweeper.params.{key}={value!r}: {exc}")
    for arg in arguments:
        key, _, value = str(arg).partition("=")
        try:
            add(*parse_entry(key, value, parser))
        except ParamError as exc:
            problems.append(f"{arg!r}: {exc}")
    return space, problems


def legacy_distribution(node: Mapping[str, Any]) -> BaseDistribution:
    """One entry of the deprecated ``hydra.sweeper.search_space`` ({type: int|float|categorical, low,
    high, log, step, choices}), as Hydra's optuna sweeper read it."""
    kind = str(node.get("type", "")).rsplit(".", 1)[-1]
    try:
        if kind == "categorical":
            return CategoricalDistribution(tuple(node["choices"]))
        low, high, log, step = node.get("low"), node.get("high"), bool(node.get("log", False)), node.get("step")
        if kind == "int":
            return IntDistribution(int(low), int(high), log=log, step=int(step) if step is not None else 1)
        if kind == "float":
            return FloatDistribution(float(low), float(high), log=log, step=float(step) if step is not None else None)
    except Exception as exc:
        raise ParamError(_first_line(exc)) from exc
    raise ParamError(f"type must be int, float or categorical, not {node.get('type')!r}")


def grid_values(name: str, dist: BaseDistribution) -> list[Any]:
    """The points a GridSampler walks for one parameter (choices, or a range with a step)."""
    if isinstance(dist, CategoricalDistribution):
        return list(dist.choices)
    if isinstance(dist, IntDistribution) and not dist.log:
        return list(range(dist.low, dist.high + 1, dist.step))
    if isinstance(dist, FloatDistribution) and dist.step is not None and not dist.log:
        n = int(round((dist.high - dist.low) / dist.step)) + 1
        return [dist.low + i * dist.step for i in range(n)]
    raise ParamError(f"{name}: GridSampler needs choice(...) or range(...), not a continuous {type(dist).__name__}")
