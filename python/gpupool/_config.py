"""Keyword arguments to the configuration string of ``gpupool_configure``.

The keys are the Rust ``PoolConfigBuilder``'s setters, the same as the C string's
(``crates/gpupool-ffi/src/config_string.rs``): ``config_string(steps_per_doubling=4,
budget_bytes=1 << 30)`` is ``"steps_per_doubling=4,budget_bytes=1073741824"``. ``None`` is
``none`` (the optional settings), booleans are ``true``/``false``, ``maintenance_interval`` is
seconds (a number or a ``datetime.timedelta``). An unknown key is a ``TypeError`` here, as an
unknown keyword argument is in Python; values are checked by the library.
"""

from __future__ import annotations

import datetime
from typing import Any

#: The configuration keys, in the order of the builder's setters.
KEYS = (
    "min_class_bytes",
    "max_class_bytes",
    "steps_per_doubling",
    "max_idle_per_class",
    "max_idle_bytes_per_class",
    "min_idle_per_class",
    "maintenance_interval",
    "budget_bytes",
    "pooling",
    "zero_on_reuse",
    "shards",
    "large_threshold_bytes",
    "virtual_memory_pages",
    "reclaim_at_peak",
    "release_idle_at_peak",
    "carve_class_blocks",
    "shared_class_pages",
)


def _value(key: str, value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime.timedelta):
        return repr(value.total_seconds())
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and key == "maintenance_interval":
        return repr(value)
    if isinstance(value, str) and "," not in value and "=" not in value:
        return value
    raise TypeError(f"gpupool: {key}={value!r}: expected an int, a bool or None")


def config_string(**config: Any) -> str:
    """The configuration string for these settings (see the module documentation)."""
    unknown = sorted(set(config) - set(KEYS))
    if unknown:
        raise TypeError(
            f"gpupool: unknown configuration key(s) {', '.join(unknown)}; "
            f"known keys: {', '.join(KEYS)}"
        )
    return ",".join(f"{key}={_value(key, value)}" for key, value in config.items())
