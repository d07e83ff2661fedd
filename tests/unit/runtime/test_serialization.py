from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import pytest

from harmoniad.runtime.serialization import ConfigError, from_dict, to_dict


@dataclass(frozen=True)
class Inner:
    width: int = 4


@dataclass(frozen=True)
class Example:
    name: str = "a"
    ratio: float = 0.25
    layers: tuple[int, ...] | None = None
    mode: Literal["both", "high", "low"] = "both"
    flag: bool = True
    inner: Inner = Inner()


def test_round_trip_restores_tuples_and_nested() -> None:
    cfg = Example(layers=(1, 2), mode="low", inner=Inner(8))
    assert from_dict(Example, to_dict(cfg)) == cfg


def test_int_is_accepted_for_float() -> None:
    assert from_dict(Example, {"ratio": 1}).ratio == 1.0


@pytest.mark.parametrize(
    "data, needle",
    [
        ({"surprise": 1}, "unknown Example keys ['surprise']"),
        ({"ratio": "0.3"}, "Example.ratio"),
        ({"flag": 1}, "Example.flag"),
        ({"mode": "mid"}, "Example.mode"),
        ({"layers": [1, "x"]}, "Example.layers"),
        ({"inner": {"width": 2.5}}, "Inner.width"),
        ([], "expected a JSON object"),
    ],
)
def test_bad_values_are_refused_with_the_field_named(data: object, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        from_dict(Example, data, where="ckpt/config.json")
    assert needle in str(info.value)
    assert "ckpt/config.json" in str(info.value)
