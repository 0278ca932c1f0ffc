"""Discovering plugins and the registry of components they provide.

Plugins come from the ``denoiseg.plugins`` entry-point group; the built-ins are found the
same way. :func:`get_registry` is the one place the rest of denoiseg asks "which backbone
is called X".
"""

from __future__ import annotations

import functools
import importlib.metadata
import inspect
from collections.abc import Iterable, Mapping
from importlib.metadata import Distribution

import pluggy

from denoiseg_core import hookspecs
from denoiseg_core.components import (
    BackboneSpec,
    ComponentSpec,
    HeadSpec,
    MaskingSpec,
    RegisteredComponent,
    SemiSupervisedSpec,
)
from denoiseg_core.errors import ConfigError, PluginError

KINDS: dict[str, tuple[str, type]] = {
    # kind -> (hook name, spec class)
    "backbone": ("denoiseg_register_backbones", BackboneSpec),
    "masking": ("denoiseg_register_masking_strategies", MaskingSpec),
    "head": ("denoiseg_register_heads", HeadSpec),
    "semi_supervised": ("denoiseg_register_semi_supervised_objectives", SemiSupervisedSpec),
}
_HOOK_NAMES = {name for name, _ in inspect.getmembers(hookspecs, inspect.isfunction) if name.startswith("denoiseg_")}


def _check_hook_names(pm: pluggy.PluginManager) -> None:
    """Fail on misspelt hooks, marked or not (pluggy alone ignores unmarked functions)."""
    try:
        pm.check_pending()
    except pluggy.PluginValidationError as exc:
        raise PluginError(f"plugin implements an unknown hook: {exc}") from None
    for plugin_name, plugin in pm.list_name_plugin():
        for attr in dir(plugin):
            if attr.startswith("denoiseg_") and attr not in _HOOK_NAMES and callable(getattr(plugin, attr, None)):
                raise PluginError(
                    f"plugin {plugin_name!r} defines {attr!r}, which is not a denoiseg hook "
                    f"(known hooks: {', '.join(sorted(_HOOK_NAMES))})"
                )


def get_plugin_manager(extra_plugins: Iterable[object] = (), load_entry_points: bool = True) -> pluggy.PluginManager:
    """A plugin manager with every installed plugin (and ``extra_plugins``) registered and checked."""
    pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    pm.add_hookspecs(hookspecs)
    if load_entry_points:
        try:
            pm.load_setuptools_entrypoints(hookspecs.ENTRY_POINT_GROUP)
        except (ImportError, AttributeError) as exc:
            raise PluginError(f"a denoiseg plugin failed to import: {exc}") from exc
    for plugin in extra_plugins:
        pm.register(plugin)
    _check_hook_names(pm)
    return pm


class Registry:
    """Every component of every kind, by name, with its plugin and distribution."""

    def __init__(self, components: Iterable[RegisteredComponent]):
        self._by_kind: dict[str, dict[str, RegisteredComponent]] = {kind: {} for kind in KINDS}
        for comp in components:
            table = self._by_kind[comp.kind]
            if comp.name in table:
                other = table[comp.name]
                raise PluginError(
                    f"duplicate {comp.kind} name {comp.name!r}: registered by plugin {other.plugin!r}"
                    f" ({other.distribution or 'not installed'}) and by plugin {comp.plugin!r}"
                    f" ({comp.distribution or 'not installed'})"
                )
            table[comp.name] = comp

    @classmethod
    def from_plugin_manager(cls, pm: pluggy.PluginManager) -> Registry:
        dists: dict[int, Distribution] = {id(plugin): dist for plugin, dist in pm.list_plugin_distinfo()}
        components: list[RegisteredComponent] = []
        for kind, (hook_name, spec_cls) in KINDS.items():
            # Call each implementation on its own so every component keeps its plugin's name.
            for impl in getattr(pm.hook, hook_name).get_hookimpls():
                specs = impl.function()
                if specs is None:
                    continue
                if not isinstance(specs, (list, tuple)):
                    raise PluginError(
                        f"plugin {impl.plugin_name!r}: {hook_name}() must return a list, got {type(specs).__name__}"
                    )
                dist = dists.get(id(impl.plugin))
                for spec in specs:
                    if not isinstance(spec, spec_cls):
                        raise PluginError(
                            f"plugin {impl.plugin_name!r}: {hook_name}() returned {type(spec).__name__},"
                            f" expected {spec_cls.__name__}"
                        )
                    components.append(
                        RegisteredComponent(
                            spec=spec,
                            plugin=_short_plugin_name(impl.plugin_name, impl.plugin),
                            distribution=dist.metadata["Name"] if dist else None,
                            version=dist.version if dist else None,
                        )
                    )
        return cls(components)

    def components(self, kind: str | None = None) -> list[RegisteredComponent]:
        kinds = [kind] if kind else list(KINDS)
        return [comp for k in kinds for _, comp in sorted(self._by_kind[k].items())]

    def names(self, kind: str) -> list[str]:
        return sorted(self._by_kind[kind])

    def get(self, kind: str, name: str, plugins: Mapping[str, str] | None = None) -> RegisteredComponent:
        """The component ``name`` of ``kind``, or a one-line error.

        ``plugins`` is a config's ``{distribution: version}`` record of the distributions
        its components came from: when ``name`` is missing and some of those are not
        installed, the error names them (the usual cause: a run config or checkpoint
        from another environment). Otherwise it lists the installed components.
        """
        try:
            return self._by_kind[kind][name]
        except KeyError:
            missing = _missing_distributions(plugins or {})
            if len(missing) == 1:
                ((dist, version),) = missing.items()
                raise ConfigError(
                    f"{kind} {name!r} is not installed: it comes from distribution {dist!r}"
                    f" (pip install {dist}{'==' + version if version and version != 'unknown' else ''})"
                ) from None
            if missing:
                raise ConfigError(
                    f"{kind} {name!r} is not installed: it comes from one of the distributions"
                    f" {', '.join(map(repr, missing))}, which are not installed (pip install {' '.join(missing)})"
                ) from None
            installed = ", ".join(self.names(kind)) or "none"
            raise ConfigError(f"unknown {kind} {name!r}; installed {kind} components: {installed}") from None

    def spec(self, kind: str, name: str) -> ComponentSpec:
        return self.get(kind, name).spec


def _missing_distributions(plugins: Mapping[str, str]) -> dict[str, str]:
    """The entries of a ``{distribution: version}`` record whose distribution is not installed."""
    missing = {}
    for dist, version in plugins.items():
        try:
            importlib.metadata.distribution(dist)
        except importlib.metadata.PackageNotFoundError:
            missing[dist] = version
    return missing


def _short_plugin_name(registered_name: str, plugin: object) -> str:
    module = getattr(plugin, "__name__", None)
    return module if isinstance(module, str) else registered_name


@functools.lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The registry of installed plugins (cached for the life of the process)."""
    return Registry.from_plugin_manager(get_plugin_manager())


def plugin_versions(registry: Registry, names: Iterable[tuple[str, str]]) -> dict[str, str]:
    """``{distribution: version}`` of the distributions providing the (kind, name) components."""
    out: dict[str, str] = {}
    for kind, name in names:
        comp = registry.get(kind, name)
        if comp.distribution:
            out[comp.distribution] = comp.version or "unknown"
    return out
