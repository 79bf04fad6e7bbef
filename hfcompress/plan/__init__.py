"""Which module gets which spec: the targets a config selects and the per-layer specs pinned in its overrides.

* :mod:`.targets`: :func:`resolve_layers` maps each module a config compresses to its
  :class:`~hfcompress.spec.LayerSpec` (targets, ignore list, overrides, tied weights).
* :mod:`.allocation`: non-uniform sparsity allocations run on the model and pinned per module
  (:func:`allocated_config`, :func:`config_with_layer_specs`).

Everything that compresses (``from_pretrained``, :func:`hfcompress.compress`, :func:`hfcompress.oneshot`,
streaming) asks this layer, so the answer is the same on every path.
"""

from .allocation import allocate_layer_specs, allocated_config, allocation_pending, config_with_layer_specs
from .targets import DEFAULT_IGNORE, MODULE_TYPES, default_ignore, resolve_layers, tied_module_names

__all__ = [
    "DEFAULT_IGNORE",
    "MODULE_TYPES",
    "allocate_layer_specs",
    "allocated_config",
    "allocation_pending",
    "config_with_layer_specs",
    "default_ignore",
    "resolve_layers",
    "tied_module_names",
]
