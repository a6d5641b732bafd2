"""Hypothesis strategies for GroupNorm calls: shapes with size-1 dims everywhere, every
memory layout a user can hand in, shared/per-sample/absent parameters, dtypes, eps and
large means.

The example count is small by default so that CI stays fast, and fixed (derandomized)
so that CI is reproducible. ``PERSAMPLE_HYPOTHESIS_EXAMPLES=N`` raises it for a long
local run and draws fresh random examples each run.
"""

import dataclasses
import math
import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

LONG_RUN = int(os.environ.get("PERSAMPLE_HYPOTHESIS_EXAMPLES", "0"))

settings.register_profile(
    "persample",
    deadline=None,
    derandomize=not LONG_RUN,
    print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("persample")


def describe(t):
    """A tensor as a failing example should print it: shape, strides, offset, dtype."""
    if t is None:
        return "None"
    return f"{tuple(t.shape)}:{t.stride()}+{t.storage_offset()}:{t.dtype}"


def examples(default, long_share=1.0):
    """``settings`` for a property: ``default`` examples in CI, ``long_share`` of the
    long run's count otherwise (compiled properties cost seconds an example)."""
    return settings(max_examples=max(1, int(LONG_RUN * long_share)) if LONG_RUN else default)


F64, F32, BF16, F16 = torch.float64, torch.float32, torch.bfloat16, torch.float16
REDUCED = (BF16, F16)
FORMATS = {4: torch.channels_last, 5: torch.channels_last_3d}

# How a tensor of a given logical shape lies in memory.
LAYOUTS = (
    "contiguous",
    "channels_last",  # .to(memory_format=...): restrides size-1 dims too (rank 4/5 only)
    "channels_last_kept",  # .contiguous(memory_format=...): keeps ambiguous strides as they are
    "size1_strides",  # arbitrary strides on size-1 dims (they never move in memory)
    "offset",  # a view at a nonzero storage offset
    "sliced",  # step 2 along one dim
    "permuted",  # dims stored in another order
    "expanded",  # stride 0 along one dim
)

# Weight/bias kinds; [N, C] ones are per-sample.
PARAMS = (None, "shared", "per_sample", "expanded", "transposed", "equal_rows", "sliced")


@dataclasses.dataclass
class Call:
    """One GroupNorm problem: a forward call, plus the gradient the backward gets."""

    x: torch.Tensor
    groups: int
    weight: torch.Tensor
    bias: torch.Tensor
    eps: float
    grad_out: torch.Tensor
    requires_grad: tuple  # (x, weight, bias)

    def __repr__(self):
        desc = describe
        return (f"Call(x={desc(self.x)}, groups={self.groups}, weight={desc(self.weight)}, "
                f"bias={desc(self.bias)}, eps={self.eps}, grad_out={desc(self.grad_out)}, "
                f"requires_grad={self.requires_grad})")

    def _repr_pretty_(self, printer, cycle):  # hypothesis prints failing examples with it
        printer.text(repr(self))


@st.composite
def layouts(draw, rank):
    """``(name, detail)``: a layout for a tensor of this rank, with what it needs drawn."""
    names = [n for n in LAYOUTS if not n.startswith("channels_last") or rank in FORMATS]
    name = draw(st.sampled_from(names))
    if name in ("sliced", "expanded"):
        return name, draw(st.integers(0, rank - 1))
    if name == "permuted":
        return name, draw(st.permutations(range(rank)))
    if name == "size1_strides":
        return name, draw(st.lists(st.sampled_from([0, 1, 3, 10**6]), min_size=rank, max_size=rank))
    return name, None


def arrange(shape, layout, make):
    """A tensor of logical ``shape`` in ``layout``; ``make(shape)`` draws values."""
    name, detail = layout
    if name == "contiguous":
        return make(shape)
    if name == "channels_last":
        return make(shape).to(memory_format=FORMATS[len(shape)])
    if name == "channels_last_kept":
        return make(shape).contiguous(memory_format=FORMATS[len(shape)])
    if name == "size1_strides":
        t = make(shape)
        strides = [s if n != 1 else odd for s, n, odd in zip(t.stride(), shape, detail)]
        return t.as_strided(shape, strides)
    if name == "offset":
        return make((math.prod(shape) + 3,))[3:].view(shape)
    if name == "sliced":
        big = list(shape)
        big[detail] *= 2
        return make(big)[(slice(None),) * detail + (slice(None, None, 2),)]
    if name == "permuted":
        stored = make([shape[p] for p in detail])
        return stored.permute([detail.index(i) for i in range(len(shape))])
    if name == "expanded":
        base = list(shape)
        base[detail] = 1
        return make(base).expand(shape)
    raise ValueError(name)


def make_param(kind, n, c, dtype, gen):
    def randn(*shape):
        return torch.randn(shape, generator=gen, dtype=F64).to(dtype)

    if kind is None:
        return None
    return {
        "shared": lambda: randn(c),
        "per_sample": lambda: randn(n, c),
        "expanded": lambda: randn(c).expand(n, c),
        "transposed": lambda: randn(c, n).t(),
        "equal_rows": lambda: randn(c).repeat(n, 1),
        "sliced": lambda: randn(n, 2 * c)[:, ::2],
    }[kind]()


@st.composite
def calls(draw, dtypes=(F64, F32, BF16, F16), params=PARAMS):
    """A valid :class:`Call`, with every size from 1 up and total size kept small."""
    rank = draw(st.integers(2, 5))
    n = draw(st.integers(1, 4))
    # One channel, one group and one group per channel are the edge cases: drawn often.
    groups = draw(st.sampled_from([1, 1, 2, 3, 4]))
    c = groups * draw(st.sampled_from([1, 1, 2, 3]))
    max_side = {2: 1, 3: 7, 4: 5, 5: 3}[rank]
    shape = (n, c, *draw(st.lists(st.integers(1, max_side), min_size=rank - 2, max_size=rank - 2)))
    dtype = draw(st.sampled_from(dtypes))
    param_dtype = draw(st.sampled_from((dtype, F32))) if dtype in REDUCED else dtype
    x_layout = draw(layouts(rank))
    group_size = math.prod(shape[2:]) * (c // groups)
    # eps = 0 needs a variance that cannot round to zero: fp32/fp64 groups of >= 2 that
    # are not copies of one value (stride 0).
    zero_eps_ok = dtype not in REDUCED and group_size >= 2 and x_layout[0] != "expanded"
    eps = draw(st.sampled_from([1e-5, 1e-3, 0.5] + ([0.0] if zero_eps_ok else [])))
    mean = draw(st.sampled_from([0.0, 0.0, 3.0, -50.0, 1e3]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    def values(offset):
        return lambda s: (torch.randn(s, generator=gen, dtype=F64) + offset).to(dtype)

    x = arrange(shape, x_layout, values(mean))
    grad_out = arrange(shape, draw(layouts(rank)), values(0.0))
    weight, bias = (make_param(draw(st.sampled_from(params)), n, c, param_dtype, gen) for _ in "wb")
    requires_grad = (draw(st.booleans()), weight is not None and draw(st.booleans()),
                     bias is not None and draw(st.booleans()))
    return Call(x, groups, weight, bias, eps, grad_out, requires_grad)
