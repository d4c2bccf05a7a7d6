"""Checks of user-given values, one line per mistake: the field, the value and the fix.

Shared by the library's own configuration dataclasses (`client.LocalConfig`, `client.DataSpec`,
`federated.RoundConfig`), which check themselves on construction, and by `configuration.validate`,
which checks a run's whole ConfigDict before anything is loaded or compiled. `owner` is how the
message names the holder of the field: 'config' for a run's ConfigDict, the class name otherwise.
"""

from __future__ import annotations

import math
import numbers

import numpy as np


class ConfigError(ValueError):
    """A field has a value that cannot be used; the message names the field and the fix."""


def choice(owner: str, field: str, value, allowed) -> None:
    if value not in allowed:
        raise ConfigError(
            f'{owner}.{field}={value!r} is not allowed; use one of: {", ".join(map(str, allowed))}.'
        )


def number(
    owner: str,
    field: str,
    value,
    *,
    positive: bool = False,
    non_negative: bool = False,
    integer: bool = False,
    at_most=None,
) -> None:
    kind = 'an integer' if integer else 'a number'
    ok_type = isinstance(value, numbers.Integral if integer else numbers.Real)
    if isinstance(value, (bool, np.bool_)) or not ok_type:
        raise ConfigError(f'{owner}.{field}={value!r} must be {kind}.')
    if not math.isfinite(value):
        raise ConfigError(f'{owner}.{field}={value!r} must be a finite number.')
    if positive and not value > 0:
        raise ConfigError(f'{owner}.{field}={value!r} must be > 0.')
    if non_negative and value < 0:
        raise ConfigError(f'{owner}.{field}={value!r} must be >= 0.')
    if at_most is not None and value > at_most:
        raise ConfigError(f'{owner}.{field}={value!r} must be <= {at_most}.')


def boolean(owner: str, field: str, value) -> None:
    if not isinstance(value, (bool, np.bool_)):
        raise ConfigError(f'{owner}.{field}={value!r} must be True or False.')
