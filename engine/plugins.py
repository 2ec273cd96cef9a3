"""The plugin manager: default plugins, entry points in group ``mrfm``, and the registries built
from the ``register_*`` hooks.

A broken plugin never takes mrfm down: an import error, a hook that raises, a misspelled hook or
an invalid head manifest is recorded with its reason (``load_errors``, :func:`get_broken_heads`)
and that plugin or head is skipped, so everything else keeps working.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Callable, Iterable

import pluggy

from . import hookspecs
from .errors import UsageError, one_line

DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.readers",
    "plugins.backends",
    "plugins.encoders",
    "plugins.exporters",
    "plugins.sources",
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
load_errors: dict[str, str] = {}  # plugin -> why it could not be loaded or was dropped
_disabled: set[str] = set()  # names given to disable() (MRFM_DISABLE_PLUGINS is read at each check)


@dataclass
class Registered:
    obj: Any
    plugin: str


@dataclass
class Broken:
    """A registration that was refused: which plugin made it and why."""

    plugin: str
    reason: str


def _names(value: str | None) -> set[str]:
    return {w.strip() for w in (value or "").split(",") if w.strip()}


def disabled_names() -> set[str]:
    """Names disabled by ``MRFM_DISABLE_PLUGINS`` and :func:`disable`."""
    return _names(os.environ.get("MRFM_DISABLE_PLUGINS")) | _disabled


def _is_disabled(*names: str | None) -> bool:
    off = disabled_names()
    # a default plugin may be named in full (contrib_heads.ground) or by its last part (ground)
    candidates = {n for n in names if n} | {n.rsplit(".", 1)[-1] for n in names if n}
    return bool(off & candidates)


def disable(names: Iterable[str]) -> list[str]:
    """Disable plugins by plugin, entry-point or distribution name (what ``--disable-plugins``
    calls); plugins already loaded are unregistered. Returns the plugin names removed."""
    _disabled.update(n.strip() for n in names if n and n.strip())
    dists = _entry_point_dists()
    removed = []
    for plugin in list(pm.get_plugins()):
        name = pm.get_name(plugin)
        if _is_disabled(name, dists.get(name or "", (None,))[0]):
            pm.unregister(plugin)
            removed.append(name)
    return removed


def _record_error(name: str, reason: str) -> None:
    load_errors[name] = reason
    warnings.warn(f"mrfm plugin {name!r} could not be loaded: {reason}", stacklevel=3)


def _describe(exc: BaseException) -> str:
    return one_line(exc, named=True)


def _one_line(text: str) -> str:
    """Schema errors come one violation a line; listings and usage errors want one line."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return (
        lines[0] + (" " if lines[0].endswith(":") else "; ") + "; ".join(lines[1:])
        if len(lines) > 1
        else "".join(lines)
    )


def _unknown_hooks(plugin: object) -> list[str]:
    """Hook implementations with no spec: a misspelled hook name in a plugin."""
    return sorted(c.name for c in pm.get_hookcallers(plugin) or [] if c.spec is None)


def _register(obj: object, name: str, where: str) -> None:
    """Register one plugin; a plugin that pluggy refuses or that names unknown hooks is dropped."""
    try:
        pm.register(obj, name=name)
    except Exception as exc:
        _record_error(name, f"{where}: {_describe(exc)}")
        return
    unknown = _unknown_hooks(obj)
    if unknown:
        pm.unregister(obj)
        _record_error(name, f"{where}: unknown hook(s) {', '.join(unknown)} (see engine/hookspecs.py)")


def _load_defaults() -> None:
    for name in DEFAULT_PLUGINS:
        if _is_disabled(name) or pm.get_plugin(name) is not None:
            continue
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # the module is there but one of its imports is not
                _record_error(name, _describe(exc))
            continue  # a default head may be absent from a slim install
        except Exception as exc:
            _record_error(name, _describe(exc))
            continue
        if not pm.is_registered(mod):
            _register(mod, name, name)


def _entry_points_allowed() -> set[str] | None:
    """None: load every entry point. Under pytest only those named in MRFM_LOAD_PLUGINS load,
    so tests see a predictable set."""
    wanted = os.environ.get("MRFM_LOAD_PLUGINS")
    if wanted is None and "pytest" in sys.modules:
        wanted = ""
    return None if wanted is None else _names(wanted)


def _load_entry_points() -> None:
    allow = _entry_points_allowed()
    for ep in metadata.entry_points(group="mrfm"):
        dist = ep.dist.name if ep.dist else ""
        if allow is not None and ep.name not in allow and dist not in allow:
            continue
        if _is_disabled(ep.name, dist) or pm.get_plugin(ep.name) is not None:
            continue
        try:
            obj = ep.load()
        except Exception as exc:  # a broken third-party package must not take mrfm down
            _record_error(ep.name, f"{dist or ep.value}: {_describe(exc)}")
            continue
        _register(obj, ep.name, dist or ep.value)


def load_plugins() -> None:
    """Register default plugins and installed entry points once.

    ``MRFM_LOAD_PLUGINS`` (comma-separated distribution or entry-point names) restricts which
    entry points load; set it empty to load none. ``MRFM_DISABLE_PLUGINS`` names plugins
    (default ones too, e.g. ``contrib_heads.ground`` or ``ground``), entry points or
    distributions that must not load. Under pytest, entry points load only when
    ``MRFM_LOAD_PLUGINS`` names them.
    """
    global _loaded
    if _loaded:
        return
    _loaded = True
    _load_defaults()
    _load_entry_points()


def _call_hook(hook_name: str, on_register: Callable[[Any, str], None]) -> None:
    """Call every implementation of a ``register_*`` hook with its own ``register`` callback;
    an implementation that raises is recorded against its plugin and skipped."""
    load_plugins()
    for impl in getattr(pm.hook, hook_name).get_hookimpls():
        plugin_name = pm.get_name(impl.plugin) or repr(impl.plugin)
        if _is_disabled(plugin_name):
            continue
        try:
            impl.function(register=lambda obj, _p=plugin_name: on_register(obj, _p))
        except Exception as exc:
            load_errors[plugin_name] = f"{hook_name} raised {_describe(exc)}"


def _collect(hook_name: str, key: Callable[[Any], str]) -> dict[str, Registered]:
    found: dict[str, Registered] = {}

    def register(obj: Any, plugin: str) -> None:
        name = key(obj)
        if name in found and found[name].obj is not obj:
            raise UsageError(
                f"{hook_name}: {name!r} from plugin {plugin!r} is already registered by {found[name].plugin!r}"
            )
        found[name] = Registered(obj, plugin)

    _call_hook(hook_name, register)
    return found


# ---- heads: validated at registration ------------------------------------------------------------
def _head_label(obj: Any) -> str:
    """The name a refused head is listed under: its manifest's name when that can be read."""
    try:
        name = json.loads(Path(obj.manifest_path).read_text()).get("name")
        if isinstance(name, str) and name:
            return name
    except Exception:
        pass
    return getattr(obj, "__qualname__", None) or repr(obj)


def head_problem(obj: Any) -> str | None:
    """Why ``obj`` cannot be used as a head (None when it can): not a Head subclass, no
    ``predict``, a manifest that is missing or breaks schemas/head.schema.json, missing weights."""
    from .heads import Head  # the manager stays free of torch: discovery imports it for readers

    if not (isinstance(obj, type) and issubclass(obj, Head)):
        return f"{obj!r} is not a subclass of engine.Head"
    if obj.predict is Head.predict:
        return f"{obj.__qualname__} does not implement predict()"
    try:
        obj.manifest()
        weights = obj.weights_path()
    except Exception as exc:
        text = _one_line(str(exc))
        return text if "manifest" in text else f"manifest {getattr(obj, 'manifest_path', '?')}: {_describe(exc)}"
    if weights is not None and not weights.is_file():
        return f"declared weights {weights.name} are missing next to {Path(obj.manifest_path).name}"
    return None


def _head_registry() -> tuple[dict[str, Registered], dict[str, Broken]]:
    claims: dict[str, list[Registered]] = {}
    refused: list[tuple[str, Broken]] = []

    def register(obj: Any, plugin: str) -> None:
        problem = head_problem(obj)
        if problem:
            refused.append((_head_label(obj), Broken(plugin, problem)))
            return
        regs = claims.setdefault(obj.manifest()["name"], [])
        if all(r.obj is not obj for r in regs):
            regs.append(Registered(obj, plugin))

    _call_hook("register_heads", register)
    good: dict[str, Registered] = {}
    broken: dict[str, Broken] = {}
    for name, regs in claims.items():
        if len(regs) == 1:
            good[name] = regs[0]
        else:  # two plugins claim one name: running either would be a guess
            by = ", ".join(sorted(r.plugin for r in regs))
            broken[name] = Broken(
                regs[-1].plugin,
                f"head name {name!r} is registered by plugins {by}; disable one with MRFM_DISABLE_PLUGINS",
            )
    for label, b in refused:
        # a refused head never hides a working head that has the same name
        broken[label if label not in good and label not in broken else f"{label}@{b.plugin}"] = b
    return good, broken


def get_head_classes() -> dict[str, Registered]:
    """Head name -> registered head class, from every plugin; broken heads are left out."""
    return _head_registry()[0]


def get_broken_heads() -> dict[str, Broken]:
    """Head name (or class name, when the manifest has none) -> the plugin and why it is refused."""
    return _head_registry()[1]


def select_heads(names: list[str] | None) -> dict[str, Registered]:
    """The heads a run uses: every working head when ``names`` is None, else exactly ``names``.

    Raises :class:`~engine.errors.UsageError` for a broken head (with its reason) or an unknown one.
    """

    good, broken = _head_registry()
    if names is None:
        return dict(sorted(good.items()))
    problems = [f"head {n!r} is broken ({broken[n].plugin}: {broken[n].reason})" for n in names if n in broken]
    unknown = [n for n in names if n not in good and n not in broken]
    # an entry point named like the head that could not be loaded says why the head is missing
    problems += [f"head {n!r} could not be loaded ({load_errors[n]})" for n in unknown if n in load_errors]
    unknown = [n for n in unknown if n not in load_errors]
    if unknown:
        problems.append(f"unknown head(s) {', '.join(unknown)}; installed: {', '.join(sorted(good)) or 'none'}")
    if problems:
        raise UsageError("; ".join(problems))
    return {n: good[n] for n in names}


# ---- other registries ------------------------------------------------------------------------------
def get_backends() -> dict[str, Registered]:
    """Backend name -> registered backend class."""
    return _collect("register_backends", lambda cls: cls.name)


def get_readers() -> dict[str, Registered]:
    """Reader name -> registered reader."""
    return _collect("register_readers", lambda r: r.name)


def get_encoders() -> dict[str, Registered]:
    """Encoder architecture name (the model card's ``encoder.architecture``) -> architecture."""
    return _collect("register_encoders", lambda a: a.name)


def get_exporters() -> dict[str, Registered]:
    """Exporter name -> registered exporter."""
    return _collect("register_exporters", lambda e: e.name)


def get_sources() -> dict[str, Registered]:
    """Source name -> registered archive source (folders, DICOMweb, DIMSE ...)."""
    return _collect("register_sources", lambda s: s.name)


# ---- listing ---------------------------------------------------------------------------------------
def _entry_point_dists() -> dict[str, tuple[str, str]]:
    dists = {}
    for dist in metadata.distributions():
        for ep in dist.entry_points:
            if ep.group == "mrfm":
                dists[ep.name] = (dist.metadata["Name"], dist.version)
    return dists


def _row(name: str, dists: dict[str, tuple[str, str]], **fields: Any) -> dict[str, Any]:
    dist = dists.get(name)
    return {
        "name": name,
        "hooks": [],
        "default": name in DEFAULT_PLUGINS,
        "package": dist[0] if dist else None,
        "version": dist[1] if dist else None,
        "broken": {},
        "disabled": False,
        **fields,
    }


def plugin_summaries() -> list[dict[str, Any]]:
    """What ``mrfm plugins`` prints: each plugin, its hooks and version, the heads it registered
    that were refused (``broken``: name -> reason), plugins that failed to load (``error``) and
    plugins switched off (``disabled``)."""
    load_plugins()
    dists = _entry_point_dists()
    broken_by: dict[str, dict[str, str]] = {}
    for head, b in get_broken_heads().items():
        broken_by.setdefault(b.plugin, {})[head] = b.reason
    out = []
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin)
        fields: dict[str, Any] = {
            "hooks": sorted(h.name for h in pm.get_hookcallers(plugin) or []),
            "broken": broken_by.get(name, {}),
            "disabled": _is_disabled(name),
        }
        if name in load_errors:
            fields["error"] = load_errors[name]
        out.append(_row(name, dists, **fields))
    listed = {p["name"] for p in out}
    for name, error in load_errors.items():
        if name not in listed:
            out.append(_row(name, dists, error=error))
            listed.add(name)
    for name in [*DEFAULT_PLUGINS, *dists]:
        if name not in listed and _is_disabled(name, dists.get(name, (None,))[0]):
            out.append(_row(name, dists, disabled=True))
            listed.add(name)
    return sorted(out, key=lambda p: (not p["default"], p["name"]))
