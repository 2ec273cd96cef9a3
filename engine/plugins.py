"""The plugin manager: default plugins, entry points in group ``mrfm``, and the registries built
from the ``register_*`` hooks."""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs

DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.readers",
    "plugins.backends",
    "contrib_heads.classify",
    "contrib_heads.regress",
    "contrib_heads.segment",
    "contrib_heads.localize",
    "contrib_heads.ground",
    "contrib_heads.retrieve",
)

pm = pluggy.PluginManager("mrfm")
pm.add_hookspecs(hookspecs)

_loaded = False
load_errors: dict[str, str] = {}  # entry point -> why it could not be loaded


def load_plugins() -> None:
    """Register default plugins and installed entry points once.

    ``MRFM_LOAD_PLUGINS`` (comma-separated distribution or entry-point names) restricts which
    entry points load; set it empty to load none. Under pytest, entry points load only when the
    variable names them, so tests see a predictable set.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in DEFAULT_PLUGINS:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:  # a default head may be absent from a slim install
            if exc.name != name:
                raise
            continue
        if not pm.is_registered(mod):
            pm.register(mod, name=name)
    wanted = os.environ.get("MRFM_LOAD_PLUGINS")
    if wanted is None and "pytest" in sys.modules:
        wanted = ""
    allow = None if wanted is None else {w.strip() for w in wanted.split(",") if w.strip()}
    for ep in metadata.entry_points(group="mrfm"):
        dist = ep.dist.name if ep.dist else ""
        if allow is not None and ep.name not in allow and dist not in allow:
            continue
        if pm.get_plugin(ep.name) is None:
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken third-party package must not take mrfm down
                load_errors[ep.name] = f"{dist or ep.value}: {type(exc).__name__}: {exc}"
                warnings.warn(f"mrfm plugin {ep.name!r} could not be loaded: {load_errors[ep.name]}", stacklevel=2)
    pm.check_pending()


@dataclass
class Registered:
    obj: Any
    plugin: str


def _collect(hook_name: str, key) -> dict[str, Registered]:
    load_plugins()
    found: dict[str, Registered] = {}
    hook = getattr(pm.hook, hook_name)
    for impl in hook.get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)

        def register(obj: Any, _plugin: str = plugin_name) -> None:
            name = key(obj)
            if name in found and found[name].obj is not obj:
                raise ValueError(
                    f"{hook_name}: {name!r} from plugin {_plugin!r} is already registered "
                    f"by {found[name].plugin!r}"
                )
            found[name] = Registered(obj, _plugin)

        impl.function(register=register)
    return found


def get_head_classes() -> dict[str, Registered]:
    """Head name -> registered head class, from every plugin."""
    return _collect("register_heads", lambda cls: cls.manifest()["name"])


def get_backends() -> dict[str, Registered]:
    """Backend name -> registered backend class."""
    return _collect("register_backends", lambda cls: cls.name)


def get_readers() -> dict[str, Registered]:
    """Reader name -> registered reader."""
    return _collect("register_readers", lambda r: r.name)


def plugin_summaries() -> list[dict[str, Any]]:
    """What ``mrfm plugins`` prints: each plugin, its hooks and its version."""
    load_plugins()
    dists = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == "mrfm":
                dists[ep.name] = (dist.metadata["Name"], dist.version)
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        dist = dists.get(name)
        out.append(
            {
                "name": name,
                "hooks": hooks,
                "default": name in DEFAULT_PLUGINS,
                "package": dist[0] if dist else None,
                "version": dist[1] if dist else None,
            }
        )
    for name, error in load_errors.items():
        out.append({"name": name, "hooks": [], "default": False, "package": dists.get(name, (None,))[0], "version": None, "error": error})
    return sorted(out, key=lambda p: (not p["default"], p["name"]))
