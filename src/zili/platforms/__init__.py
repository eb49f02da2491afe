"""Device seam: every device-specific question is asked of the current Platform.

Nothing outside this package names a device. The platform is chosen once per process:

1. `ZILI_PLATFORM=<name>` picks one by name (a built-in or a plugin); it must be available.
2. Otherwise an out-of-tree plugin whose `is_available()` says yes wins over the built-ins (a
   machine with an NPU plugin installed wants the NPU). Two at once is ambiguous: set ZILI_PLATFORM.
3. Otherwise CUDA when a GPU is visible, else the CPU.

Plugins register in the entry-point group `zili.platforms` (the idea of vLLM's platform plugins):

    [project.entry-points."zili.platforms"]
    npu = "zili_ascend:NpuPlatform"

The entry point names a `Platform` subclass (asked through its `is_available()` classmethod), or a
zero-argument function that returns a Platform instance or None when its device is absent. A plugin
that fails to import is logged and skipped: a broken plugin must not stop the CPU from working.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from functools import lru_cache
from importlib.metadata import entry_points

from zili import envs
from zili.platforms.interface import AcceleratorPlatform, Platform

logger = logging.getLogger(__name__)

ENTRY_POINT_GROUP = "zili.platforms"
ENV_VAR = envs.ZILI_PLATFORM.name


def _builtin_platforms() -> dict[str, type[Platform]]:
    from zili.platforms.cpu import CpuPlatform
    from zili.platforms.cuda import CudaPlatform

    return {"cuda": CudaPlatform, "cpu": CpuPlatform}  # in order of preference


def plugin_platforms() -> dict[str, Callable[[], Platform | None]]:
    """Installed plugins, by entry-point name: each a function that builds the platform when its
    device is available and returns None otherwise."""
    found: dict[str, Callable[[], Platform | None]] = {}
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
        except Exception as e:
            logger.warning("platform plugin %r (%s) failed to load: %s", ep.name, ep.value, e)
            continue
        found[ep.name] = _as_factory(ep.name, target)
    return found


def _as_factory(name: str, target) -> Callable[[], Platform | None]:
    def build() -> Platform | None:
        try:
            if isinstance(target, type) and issubclass(target, Platform):
                return target() if target.is_available() else None
            made = target()
        except Exception as e:
            logger.warning("platform plugin %r failed: %s", name, e)
            return None
        if made is not None and not isinstance(made, Platform):
            logger.warning("platform plugin %r returned %r, not a zili Platform; ignored", name, made)
            return None
        return made
    return build


def resolve_platform(requested: str | None = None) -> Platform:
    """Choose the platform (see the module docstring). `requested` overrides ZILI_PLATFORM."""
    requested = requested or envs.platform_name()
    builtins = _builtin_platforms()
    plugins = plugin_platforms()
    if requested:
        return _by_name(requested, builtins, plugins)
    available = {name: p for name, build in plugins.items() if (p := build()) is not None}
    if len(available) > 1:
        raise RuntimeError(f"several platform plugins are available ({', '.join(sorted(available))}); "
                           f"choose one with {ENV_VAR}=<name>")
    if available:
        name, chosen = available.popitem()
        logger.info("platform: %s (plugin %r)", chosen.device_name(), name)
        return chosen
    for cls in builtins.values():
        if cls.is_available():
            return cls()
    raise RuntimeError("no platform is available")  # unreachable: the CPU always is


def _by_name(name: str, builtins: dict[str, type[Platform]],
             plugins: dict[str, Callable[[], Platform | None]]) -> Platform:
    if name in plugins:
        chosen = plugins[name]()
    elif name in builtins:
        chosen = builtins[name]() if builtins[name].is_available() else None
    else:
        known = sorted(set(builtins) | set(plugins))
        raise ValueError(f"{ENV_VAR}={name!r} names no platform; known: {', '.join(known)} (plugins register "
                         f"in the entry-point group {ENTRY_POINT_GROUP!r})")
    if chosen is None:
        raise RuntimeError(f"{ENV_VAR}={name!r}: that platform is installed but its device is not available here")
    return chosen


@lru_cache(maxsize=1)
def current_platform() -> Platform:
    """The platform of this process, chosen on first use. `current_platform.cache_clear()` re-chooses."""
    return resolve_platform()


__all__ = ["AcceleratorPlatform", "ENTRY_POINT_GROUP", "ENV_VAR", "Platform", "current_platform",
           "plugin_platforms", "resolve_platform"]
