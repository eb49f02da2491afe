"""Device seam: every device-specific question is asked of the current Platform.

Nothing outside this package names a device. Out-of-tree devices register through the
entry-point group `zili.platforms` (see the platforms issue); CPU is always available.
"""

from __future__ import annotations

from functools import lru_cache

from zili.platforms.interface import Platform


@lru_cache(maxsize=1)
def current_platform() -> Platform:
    from zili.platforms.cpu import CpuPlatform

    return CpuPlatform()


__all__ = ["Platform", "current_platform"]
