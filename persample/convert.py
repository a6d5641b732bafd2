"""Route every norm of a model through persample: group, layer, RMS and instance norms.

Models from model libraries compute a norm three ways: stock modules (``nn.GroupNorm``,
``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.InstanceNorm*d``), subclasses of them with their
own ``forward`` (e.g. a GroupNorm fused with its activation, which calls
``F.group_norm`` and then the activation), and modules that call ``F.group_norm``,
``F.layer_norm``, ``F.rms_norm`` or ``F.instance_norm`` directly (adaptive or
conditional norms, hand-written transformer blocks).

- Stock modules become their :mod:`persample.nn` drop-ins.
- Every other module whose code calls a norm keeps its own ``forward``, which then runs
  under a :class:`torch.overrides.TorchFunctionMode` that sends those calls (``F.`` or
  ``torch.`` spelling) to persample's functions. The module's class is swapped in place
  for a subclass that enters the mode (as ``fully_shard`` swaps in its
  ``FSDP<Class>``), so the object, its parameters, hooks and ``state_dict`` keys stay;
  :func:`revert_norms` swaps the class back.
- InstanceNorm is GroupNorm with one channel per group, when it keeps no running
  statistics; with them (a batch average) it has no per-sample form, and stays stock,
  named by a warning.

Why a mode, and why scoped to the module: a mode sees the call whatever spelling reaches
it (``F.group_norm``, ``torch.group_norm``, ``nn.GroupNorm.forward``), and dynamo and
``torch.export`` trace through a mode entered inside the traced code, so the routed call
is the persample op in eager, compiled and exported graphs, checkpointed or not (see
``_unchecked``). Scoping it to the modules that call a norm, rather than to the whole
model's forward, keeps every other op off the mode's Python handler (a mode intercepts
every torch call while active) and keeps the C++ eager fast path, which a surrounding
mode disables.

Which modules call a norm is read from their classes' source (a call spelled
``F.layer_norm(``, ``functional.layer_norm(``, ``torch.layer_norm(`` or a bare
``layer_norm(``, and so on); a call made elsewhere, e.g. in a helper function of another
file, is not seen. :func:`unrouted_norms` runs a model once and names every norm call
that did not reach persample, with its module path, so that nothing is missed silently.
"""

import functools
import importlib
import inspect
import re
import warnings

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from . import leaves as _leaves
from . import nn as _nn
from .ops.functional import group_norm, layer_norm, rms_norm

__all__ = [
    "KINDS",
    "convert_group_norm",
    "convert_norms",
    "revert_group_norm",
    "revert_norms",
    "routed_modules",
    "unrouted_group_norms",
    "unrouted_norms",
]

KINDS = ("group_norm", "layer_norm", "rms_norm", "instance_norm")
"""The norms that conversion routes through persample (instance_norm: as group_norm with
one channel per group, when it keeps no running statistics)."""

# {kind: (stock module classes, persample class for each)}
_MODULES = {
    "group_norm": {torch.nn.GroupNorm: _nn.GroupNorm},
    "layer_norm": {torch.nn.LayerNorm: _nn.LayerNorm},
    "rms_norm": {torch.nn.RMSNorm: _nn.RMSNorm},
    "instance_norm": {
        torch.nn.InstanceNorm1d: _nn.InstanceNorm1d,
        torch.nn.InstanceNorm2d: _nn.InstanceNorm2d,
        torch.nn.InstanceNorm3d: _nn.InstanceNorm3d,
    },
}
_STOCK = {stock: (kind, ours) for kind, table in _MODULES.items() for stock, ours in table.items()}
_OURS = {ours: stock for stock, (_, ours) in _STOCK.items()}
_FUNCTIONS = {
    "group_norm": (F.group_norm, torch.group_norm),
    "layer_norm": (F.layer_norm, torch.layer_norm),
    "rms_norm": (F.rms_norm, torch.rms_norm),
    "instance_norm": (F.instance_norm, torch.instance_norm),
}
_KIND_OF = {f: kind for kind, fs in _FUNCTIONS.items() for f in fs}


def _call_pattern(kind):
    # A call of F.<kind>, functional.<kind>, torch.<kind> or a bare <kind>; not
    # self.<kind>(...), which is usually a submodule that conversion handles itself.
    return re.compile(rf"(?:\b(?:F|functional|torch)\.|(?<![\w.])){kind}\s*\(")


_CALLS = {kind: _call_pattern(kind) for kind in KINDS}


class _Route(TorchFunctionMode):
    """Sends the norm calls made while ``module``'s forward runs to persample."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        kind = _KIND_OF.get(func)
        if kind is not None and kind in self.module._persample_kinds:
            routed = _ROUTED[func](self.module, *args, **kwargs)
            if routed is not NotImplemented:
                return routed
        return func(*args, **kwargs)


def _params(module, *params):
    """The parameters, with ``persample.call_for_per_sample_grads``'s per-sample leaves
    added to the module's own while it runs (see persample/grad_sample.py)."""
    leaves = _leaves.current(module._persample_leaves, module)
    if leaves is None:
        return params
    return tuple(_with_leaf(module, p, leaves) for p in params)


def _routed_group_norm(module, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """``F.group_norm``'s (and ``torch.group_norm``'s) arguments, run by persample."""
    return group_norm(input, num_groups, *_params(module, weight, bias), eps)


def _routed_layer_norm(module, input, normalized_shape, weight=None, bias=None, eps=1e-5, cudnn_enable=True):
    return layer_norm(input, normalized_shape, *_params(module, weight, bias), eps)


def _routed_rms_norm(module, input, normalized_shape, weight=None, eps=None):
    (weight,) = _params(module, weight)
    return rms_norm(input, normalized_shape, weight, eps)


def _routed_instance_norm(module, input, running_mean=None, running_var=None, weight=None, bias=None,
                          use_input_stats=True, momentum=0.1, eps=1e-5):
    """``F.instance_norm`` as group_norm with one channel per group; with running
    statistics it has no per-sample form, and runs stock (``unrouted_norms`` names it)."""
    if running_mean is not None or running_var is not None or not use_input_stats or input.dim() < 2:
        return NotImplemented
    return group_norm(input, input.shape[1], *_params(module, weight, bias), eps)


def _routed_torch_instance_norm(module, input, weight, bias, running_mean, running_var, use_input_stats,
                                momentum, eps, cudnn_enabled):
    return _routed_instance_norm(module, input, running_mean, running_var, weight, bias, use_input_stats,
                                 momentum, eps)


_ROUTED = {
    F.group_norm: _routed_group_norm,
    torch.group_norm: _routed_group_norm,
    F.layer_norm: _routed_layer_norm,
    torch.layer_norm: _routed_layer_norm,
    F.rms_norm: _routed_rms_norm,
    torch.rms_norm: _routed_rms_norm,
    F.instance_norm: _routed_instance_norm,
    torch.instance_norm: _routed_torch_instance_norm,
}


def _with_leaf(module, param, leaves):
    if param is None:
        return None
    for name, leaf in leaves.items():
        if param is getattr(module, name):
            return param + leaf
    if isinstance(param, torch.nn.Parameter) and param.requires_grad:
        raise ValueError(
            f"persample.call_for_per_sample_grads: a {type(module).__name__} passes a "
            f"parameter that is not its own (shape {tuple(param.shape)}) to a norm; "
            "its per-sample gradient cannot be collected here: use torch.func or Opacus"
        )
    return param


def _routed_forward(self, *args, **kwargs):
    route = _Route(self)
    _unchecked(route.__enter__)
    try:
        return self._persample_original.forward(self, *args, **kwargs)
    finally:
        _unchecked(route.__exit__, None, None, None)


def _unchecked(fn, *args):
    """``fn(*args)``; while dynamo traces, without its side-effect check for that call.

    Entering and leaving a mode push and pop the torch function mode stack, which dynamo
    refuses inside a non-reentrant ``torch.utils.checkpoint`` region as a side effect the
    recomputation would not replay (``handle_push_torch_function`` in
    torch/_dynamo/variables/torch.py, then ``check_allowed_side_effect``). The push and
    the pop cancel within this forward, and the graph already holds the routed op, so
    nothing needs replaying. Dynamo's hook lifts the check for this one call, not for the
    module's own code, as ``config.skip_fwd_side_effects_in_bwd_under_checkpoint`` would."""
    if torch.compiler.is_compiling():
        lift = getattr(torch._dynamo.utils, "_disable_side_effect_safety_checks_for_current_subtracer", None)
        if lift is not None:
            return lift(fn, *args)
    return fn(*args)


@functools.cache
def routed_class(cls):
    """The subclass of ``cls`` whose forward runs ``cls.forward`` under :class:`_Route`.

    Its name is importable from this module (see ``__getattr__`` below), so that a
    converted model pickles and unpickles like the original."""
    return type(
        cls.__name__,
        (cls,),
        {
            "forward": _routed_forward,
            "_persample_original": cls,
            "_persample_leaves": None,
            "_persample_kinds": KINDS,
            "__module__": __name__,
            "__qualname__": _encode(cls),
            "__doc__": cls.__doc__,
        },
    )


def _encode(cls):
    return "_routed__" + f"{cls.__module__}:{cls.__qualname__}".replace(".", "__dot__")


def __getattr__(name):
    """Rebuild a routed class from its pickled name (PEP 562)."""
    if not name.startswith("_routed__"):
        raise AttributeError(name)
    module, qualname = name[len("_routed__") :].replace("__dot__", ".").split(":")
    cls = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return routed_class(cls)


@functools.cache
def calls_norm(cls, kind="group_norm"):
    """Whether a method that ``cls`` (or a base class outside torch) defines calls the
    norm ``kind`` (e.g. ``"group_norm"``), by its source. None where the source is
    unavailable."""
    for base in cls.__mro__:
        if base.__module__.startswith("torch.") or base is object:
            continue
        for value in vars(base).values():
            if inspect.isfunction(value):
                try:
                    if _CALLS[kind].search(inspect.getsource(value)):
                        return True
                except (OSError, TypeError):
                    return None
    return False


def calls_group_norm(cls):
    return calls_norm(cls, "group_norm")


def _stock_base(cls):
    """The stock norm class that ``cls`` subclasses keeping its forward, else None."""
    for stock in _STOCK:
        if issubclass(cls, stock) and cls.forward is stock.forward:
            return stock
    return None


def _route_kinds(module, kinds):
    """The kinds of norm that ``module``'s own code calls, among ``kinds``."""
    cls = type(module)
    if cls in _STOCK or cls in _OURS or "_persample_original" in vars(cls):
        return ()
    stock = _stock_base(cls)
    if stock is not None:  # a subclass with a stock forward: that forward calls F.<kind>
        return (_STOCK[stock][0],) if _STOCK[stock][0] in kinds else ()
    return tuple(kind for kind in kinds if calls_norm(cls, kind))


def _swap_class(module, cls):
    """A new ``cls`` module with ``module``'s state: the same ``Parameter`` objects,
    buffers, hooks, attributes and training flag (its dicts copied, not shared)."""
    new = cls.__new__(cls)
    new.__dict__.update({k: (v.copy() if isinstance(v, dict) else v) for k, v in vars(module).items()})
    return new


def convert_norms(module, kinds=KINDS, _path=""):
    """Route every norm of ``module`` through persample; see the module docstring.

    Stock ``nn.GroupNorm``, ``nn.LayerNorm``, ``nn.RMSNorm`` and
    ``nn.InstanceNorm1d/2d/3d`` layers become their :mod:`persample.nn` drop-ins (with
    the same ``Parameter`` objects, buffers, hooks and flags; an InstanceNorm runs as
    GroupNorm with one channel per group); subclasses of them, and modules whose code
    calls ``F.group_norm``, ``F.layer_norm``, ``F.rms_norm`` or ``F.instance_norm`` (or
    the ``torch.`` spellings), keep their own forward, which then calls persample (their
    class is swapped in place). An InstanceNorm with ``track_running_stats=True`` has
    no per-sample form: it stays stock, with a warning naming it. Modules of a wrapper
    that ``torch.compile``, DDP or ``fully_shard`` built must be converted before
    wrapping.

    Args:
        module (nn.Module): a model, or a single norm layer.
        kinds (sequence of str): the norms to route, among :data:`KINDS`.

    Returns:
        nn.Module: the converted module (a new one if ``module`` is a stock norm layer,
        else ``module`` itself).
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"persample.convert_norms: unknown kinds {sorted(unknown)}; choose among {KINDS}")
    cls = type(module)
    if cls in _STOCK and _STOCK[cls][0] in kinds:
        if getattr(module, "track_running_stats", False):
            warnings.warn(
                f"persample.convert_norms: {cls.__name__} at {_path or '<root>'!r} tracks running "
                "statistics, which have no per-sample form; it stays stock, and its parameters get "
                "no per-sample gradients",
                stacklevel=2,
            )
            return module
        return _swap_class(module, _STOCK[cls][1])
    routed = _route_kinds(module, kinds)
    if routed:
        if cls.__dict__.get("__slots__") is not None:
            raise TypeError(f"persample.convert_norms: cannot swap the class of a {cls.__name__} (__slots__)")
        module.__class__ = routed_class(cls)
        module._persample_kinds = routed
    return _map_children(module, lambda child, name: convert_norms(child, kinds, f"{_path}.{name}".lstrip(".")))


def convert_group_norm(module):
    """:func:`convert_norms` for group norms only."""
    return convert_norms(module, ("group_norm",))


def revert_norms(module):
    """The inverse of :func:`convert_norms`: persample norm layers become the stock ones
    (with the same ``Parameter`` objects, buffers, hooks and flags), and routed modules
    get their original class back.

    Args:
        module (nn.Module): a model, or a single norm layer.

    Returns:
        nn.Module: the reverted module.
    """
    stock = _OURS.get(type(module))
    if stock is not None:
        return _swap_class(module, stock)
    original = vars(type(module)).get("_persample_original")
    if original is not None:
        module.__class__ = original
        module.__dict__.pop("_persample_kinds", None)
    elif any("_persample_original" in vars(c) for c in type(module).__mro__):
        raise TypeError(
            f"persample.revert_norms: {type(module).__name__} wraps a routed class "
            "(e.g. fully_shard's FSDP<Class>); revert before wrapping"
        )
    return _map_children(module, lambda child, name: revert_norms(child))


def revert_group_norm(module):
    """:func:`revert_norms` (it reverts every persample norm)."""
    return revert_norms(module)


def _map_children(module, fn):
    """``module`` with each child replaced by ``fn(child, name)`` where that is another
    module."""
    for name, child in module.named_children():
        new_child = fn(child, name)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def routed_modules(module):
    """``[(path, module)]``: the modules of ``module`` whose forward runs under a route."""
    return [(k, m) for k, m in module.named_modules() if any("_persample_original" in vars(c) for c in type(m).__mro__)]


class _Audit(TorchFunctionMode):
    """Records norm calls that no route caught (a route's handler runs with the modes
    below it, this one included, still active, and calls persample, not these)."""

    def __init__(self, stack, kinds):
        super().__init__()
        self.stack, self.missed = stack, []
        self.functions = {f for kind in kinds for f in _FUNCTIONS[kind]}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in self.functions:
            self.missed.append(self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


def unrouted_group_norms(model, *args, warn=True, **kwargs):
    """:func:`unrouted_norms` for group norms only."""
    return unrouted_norms(model, *args, warn=warn, kinds=("group_norm",), **kwargs)


def unrouted_norms(model, *args, warn=True, kinds=KINDS, **kwargs):
    """Run ``model(*args, **kwargs)`` once (eager, no grad) and return the module paths
    of the norm calls that did not reach persample, warning with them unless ``warn``
    is false. An empty list means every norm of that forward ran through persample.

    Args:
        model (nn.Module): a converted model (not a compiled wrapper).
        *args, **kwargs: example inputs for ``model``.
        kinds (sequence of str): the norms to look for, among :data:`KINDS`.

    Returns:
        list[str]: module paths (``""`` is the root), one per missed call.
    """
    names = {m: k for k, m in model.named_modules()}
    stack = []

    def push(mod, _):
        stack.append(names.get(mod, stack[-1] if stack else ""))

    def pop(mod, _, __):
        stack.pop()

    audit = _Audit(stack, kinds)
    handles = [m.register_forward_pre_hook(push) for m in names] + [m.register_forward_hook(pop) for m in names]
    try:
        with torch.no_grad(), audit:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if audit.missed and warn:
        warnings.warn(
            "persample: norm calls that do not run through persample, in modules "
            f"{sorted(set(audit.missed))}: their code calls them from elsewhere (e.g. a helper "
            "function), or they keep running statistics; route them with persample's functions",
            stacklevel=2,
        )
    return audit.missed
