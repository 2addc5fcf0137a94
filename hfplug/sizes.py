"""Memory sizes as people type them (``15GiB``, ``16GB``, ``6000MiB``), for flags such as ``--max_host_memory``."""

from __future__ import annotations

import re

GiB = 1024**3
MiB = 1024**2


def parse_memory(text: str) -> int:
    """``"15GiB"``, ``"16GB"``, ``"15"`` (GiB) -> bytes; anything else raises ``ValueError``."""
    match = re.fullmatch(r"\s*([\d.]+)\s*(gib|gb|mib|mb|g|m)?\s*", str(text).lower())
    if not match:
        raise ValueError(f"{text!r} is not a memory size like 15GiB, 16GB or 15000MiB")
    value, unit = float(match.group(1)), match.group(2) or "gib"
    scale = {"gib": GiB, "g": GiB, "gb": 1e9, "mib": MiB, "m": MiB, "mb": 1e6}[unit]
    return int(value * scale)
