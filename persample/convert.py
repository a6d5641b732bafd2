"""Route every group norm of a model through ``persample::group_norm``.

Models from model libraries compute GroupNorm three ways: stock ``nn.GroupNorm``
modules, subclasses of it with their own ``forward`` (e.g. a GroupNorm fused with its
activation, which calls ``F.group_norm`` and then the activation), and modules that call
``F.group_norm`` / ``torch.group_norm`` directly (adaptive or conditional norms).

- Stock ``nn.GroupNorm`` modules are replaced by :class:`persample.nn.GroupNorm`.
- Every other module whose code calls a group norm keeps its own ``forward``, which then
  runs under a :class:`torch.overrides.TorchFunctionMode` that sends the
  ``F.group_norm`` and ``torch.group_norm`` calls to :func:`persample.group_norm`. The
  module's class is swapped in place for a subclass that enters the mode (as
  ``fully_shard`` swaps in its ``FSDP<Class>``), so the object, its parameters, hooks and
  ``state_dict`` keys stay; :func:`revert_group_norm` swaps the class back.

Why a mode, and why scoped to the module: a mode sees the call whatever spelling reaches
it (``F.group_norm``, ``torch.group_norm``, ``nn.GroupNorm.forward``), and dynamo and
``torch.export`` trace through a mode entered inside the traced code, so the routed call
is the persample op in eager, compiled and exported graphs. Scoping it to the modules
that call a group norm, rather than to the whole model's forward, keeps every other op
off the mode's Python handler (a mode intercepts every torch call while active) and keeps
the C++ eager fast path, which a surrounding mode disables.

Which modules call a group norm is read from their classes' source (a call spelled
``F.group_norm(``, ``functional.group_norm(``, ``torch.group_norm(`` or a bare
``group_norm(``); a call made elsewhere, e.g. in a helper function of another file, is
not seen. :func:`unrouted_group_norms` runs a model once and names every group norm that
did not reach persample, with its module path, so that nothing is missed silently.
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
from .nn import GroupNorm
from .ops.functional import group_norm

__all__ = ["convert_group_norm", "revert_group_norm", "routed_modules", "unrouted_group_norms"]

_GROUP_NORMS = (F.group_norm, torch.group_norm)
# A call of F.group_norm, functional.group_norm, torch.group_norm or a bare group_norm;
# not self.group_norm(...), which is usually a submodule that conversion handles itself.
_CALL = re.compile(r"(?:\b(?:F|functional|torch)\.|(?<![\w.]))group_norm\s*\(")


class _Route(TorchFunctionMode):
    """Sends group norm calls made while ``module``'s forward runs to persample."""

    def __init__(self, module):
        super().__init__()
        self.module = module

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _GROUP_NORMS:
            return _routed_group_norm(self.module, *args, **kwargs)
        return func(*args, **kwargs)


def _routed_group_norm(module, input, num_groups, weight=None, bias=None, eps=1e-5, cudnn_enabled=True):
    """``F.group_norm``'s arguments, run by persample; while
    ``persample.call_for_per_sample_grads`` runs, the module's parameters get its
    per-sample leaves added (see persample/grad_sample.py)."""
    leaves = _leaves.current(module._persample_leaves, module)
    if leaves is not None:
        weight, bias = _with_leaf(module, weight, leaves), _with_leaf(module, bias, leaves)
    return group_norm(input, num_groups, weight, bias, eps)


def _with_leaf(module, param, leaves):
    if param is None:
        return None
    for name, leaf in leaves.items():
        if param is getattr(module, name):
            return param + leaf
    if isinstance(param, torch.nn.Parameter) and param.requires_grad:
        raise ValueError(
            f"persample.call_for_per_sample_grads: a {type(module).__name__} passes a "
            f"parameter that is not its own (shape {tuple(param.shape)}) to a group norm; "
            "its per-sample gradient cannot be collected here: use torch.func or Opacus"
        )
    return param


def _routed_forward(self, *args, **kwargs):
    with _Route(self):
        return self._persample_original.forward(self, *args, **kwargs)


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
def calls_group_norm(cls):
    """Whether a method that ``cls`` (or a base class outside torch) defines calls a
    group norm, by its source. None where the source is unavailable."""
    for base in cls.__mro__:
        if base.__module__.startswith("torch.") or base is object:
            continue
        for value in vars(base).values():
            if inspect.isfunction(value):
                try:
                    if _CALL.search(inspect.getsource(value)):
                        return True
                except (OSError, TypeError):
                    return None
    return False


def _needs_route(module):
    cls = type(module)
    if cls is torch.nn.GroupNorm or isinstance(module, GroupNorm) or "_persample_original" in vars(cls):
        return False
    if isinstance(module, torch.nn.GroupNorm) and cls.forward is torch.nn.GroupNorm.forward:
        return True  # a subclass with nn.GroupNorm's forward: that forward calls F.group_norm
    return bool(calls_group_norm(cls))


def convert_group_norm(module):
    """Route every group norm of ``module`` through persample; see the module docstring.

    Stock ``nn.GroupNorm`` layers become :class:`persample.nn.GroupNorm` (sharing the
    original ``Parameter`` objects); subclasses of it, and modules whose code calls
    ``F.group_norm`` or ``torch.group_norm``, keep their own forward, which then calls
    persample (their class is swapped in place). Modules of a wrapper that
    ``torch.compile``, DDP or ``fully_shard`` built must be converted before wrapping.

    Args:
        module (nn.Module): a model, or a single GroupNorm.

    Returns:
        nn.Module: the converted module (``module`` itself unless it is a stock
        ``nn.GroupNorm``).
    """
    if type(module) is torch.nn.GroupNorm:
        new = GroupNorm(module.num_groups, module.num_channels, module.eps, affine=False)
        new.affine = module.affine
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
    if _needs_route(module):
        if type(module).__dict__.get("__slots__") is not None:
            raise TypeError(f"persample.convert_group_norm: cannot swap the class of a {type(module).__name__} (__slots__)")
        module.__class__ = routed_class(type(module))
    return _map_children(module, convert_group_norm)


def revert_group_norm(module):
    """The inverse of :func:`convert_group_norm`: :class:`persample.nn.GroupNorm`
    layers become ``nn.GroupNorm`` (sharing the ``Parameter`` objects, keeping ``eps``,
    ``affine``, the training flag and the ``state_dict`` keys), and routed modules get
    their original class back.

    Args:
        module (nn.Module): a model, or a single GroupNorm.

    Returns:
        nn.Module: the reverted module.
    """
    if type(module) is GroupNorm:
        new = torch.nn.GroupNorm(module.num_groups, module.num_channels, module.eps, affine=False)
        new.affine = module.affine
        new.weight, new.bias = module.weight, module.bias
        new.train(module.training)
        return new
    original = vars(type(module)).get("_persample_original")
    if original is not None:
        module.__class__ = original
    elif any("_persample_original" in vars(c) for c in type(module).__mro__):
        raise TypeError(
            f"persample.revert_group_norm: {type(module).__name__} wraps a routed class "
            "(e.g. fully_shard's FSDP<Class>); revert before wrapping"
        )
    return _map_children(module, revert_group_norm)


def _map_children(module, fn):
    """``module`` with each child replaced by ``fn(child)`` where that is another module."""
    for name, child in module.named_children():
        new_child = fn(child)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def routed_modules(module):
    """``[(path, module)]``: the modules of ``module`` whose forward runs under a route."""
    return [(k, m) for k, m in module.named_modules() if any("_persample_original" in vars(c) for c in type(m).__mro__)]


class _Audit(TorchFunctionMode):
    """Records group norm calls that no route caught (a route's handler runs with the
    modes below it, this one included, still active, and calls persample, not these)."""

    def __init__(self, stack):
        super().__init__()
        self.stack, self.missed = stack, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in _GROUP_NORMS:
            self.missed.append(self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


def unrouted_group_norms(model, *args, warn=True, **kwargs):
    """Run ``model(*args, **kwargs)`` once (eager, no grad) and return the module paths
    of the group norm calls that did not reach persample, warning with them unless
    ``warn`` is false. An empty list means every group norm of that forward ran
    through persample.

    Args:
        model (nn.Module): a converted model (not a compiled wrapper).
        *args, **kwargs: example inputs for ``model``.

    Returns:
        list[str]: module paths (``""`` is the root), one per missed call.
    """
    names = {m: k for k, m in model.named_modules()}
    stack = []

    def push(mod, _):
        stack.append(names.get(mod, stack[-1] if stack else ""))

    def pop(mod, _, __):
        stack.pop()

    audit = _Audit(stack)
    handles = [m.register_forward_pre_hook(push) for m in names] + [m.register_forward_hook(pop) for m in names]
    try:
        with torch.no_grad(), audit:
            model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    if audit.missed and warn:
        warnings.warn(
            "persample: group norm calls that do not run through persample, in modules "
            f"{sorted(set(audit.missed))}: their code calls it from elsewhere (e.g. a helper "
            "function); route them with persample.group_norm",
            stacklevel=2,
        )
    return audit.missed
