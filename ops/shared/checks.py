"""What every norm's validation shares: the message helpers and the dtype rules.

Every kernel and every fake impl of the family validates through these, so a bad call
fails with the same ``RuntimeError`` text in eager, under FakeTensorMode, under
``torch.compile`` and under ``torch.export``. ``torch._check`` (not ``assert``) keeps
the checks alive under ``python -O`` and lets them run on SymInts without forcing a
specialisation.
"""

import torch

REDUCED = (torch.float16, torch.bfloat16)
"""Input dtypes whose statistics and accumulation are fp32."""


def _v(size):
    """A size as the user passed it: the concrete hint of a SymInt, so that messages
    read the same under compile as in eager."""
    if isinstance(size, torch.SymInt) and size.node.has_hint():
        return size.node.hint
    return size


def _shape(t):
    return tuple(_v(s) for s in t.shape)


def _check(cond, message):
    # Eager conditions are plain bools; skipping torch._check for them saves ~1 us per
    # check, which matters at small shapes. SymBools (fake/compile) go to torch._check.
    if cond is not True:
        torch._check(cond, message)


def acc_dtype(input_dtype):
    """Dtype of the saved statistics and of the fp32-or-wider accumulation."""
    return torch.float32 if input_dtype in REDUCED else input_dtype


def check_param_placement(prefix, name, p, input):
    """A parameter's device and dtype against the input's: the input's dtype, or fp32
    for fp16/bf16 input. ``prefix`` names the op in the message."""
    _check(
        p.device == input.device,
        lambda: f"{prefix}: {name} is on {p.device} but input is on {input.device}",
    )
    allowed = (input.dtype, torch.float32) if input.dtype in REDUCED else (input.dtype,)
    _check(
        p.dtype in allowed,
        lambda: f"{prefix}: {name} has dtype {p.dtype}, expected {input.dtype}"
        + (" or torch.float32" if input.dtype in REDUCED else ""),
    )
