"""The problems that the layer suite (``python -m persample.bench --op ...``) times: one
norm layer, its input and output gradient. The methods of persample.bench.methods
read only what every case has: ``n``, ``x``, ``dy``, ``stock`` (the stock layer),
``param_names``, ``functional`` (persample's function), and the helpers below."""

import copy

import torch

import persample


class _Case:
    """What the cases share; subclasses set the layer, ``functional`` and ``describe``."""

    param_names = ("weight", "bias")

    def _init_data(self, shape, dtype, device, memory_format=torch.contiguous_format):
        self.n = shape[0]
        self.x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        self.dy = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=memory_format)
        self.x.requires_grad_()
        with torch.no_grad():  # not the identity, so that the gradients depend on them
            for p in self.stock.parameters():
                p.normal_()

    def stock_copy(self):
        """A private copy of the layer: Opacus leaves hooks on the modules it wraps."""
        return copy.deepcopy(self.stock)

    def persample_copy(self):
        return persample.convert_norms(copy.deepcopy(self.stock))

    def backward(self, y):
        self.x.grad = None
        y.backward(self.dy)

    def leaves(self):
        """``[N, *param.shape]`` per-sample views of the layer's parameters (stride 0 in
        the sample dim), as autograd leaves, in ``param_names`` order."""
        params = (getattr(self.stock, k).detach() for k in self.param_names)
        return tuple(p.expand(self.n, *p.shape).requires_grad_() for p in params)


class GroupNormCase(_Case):
    """``nn.GroupNorm`` on ``[N, C, H, W]`` fp32 input, contiguous or channels_last.

    Args:
        shape (tuple): ``(N, C, H, W, G)``.
        channels_last (bool): the memory format of the input and its gradient.
    """

    op, plain_name = "group_norm", "nn.GroupNorm"

    def __init__(self, shape, channels_last, device):
        n, c, h, w, g = shape
        self.shape, self.channels_last, self.groups = shape, channels_last, g
        self.stock = torch.nn.GroupNorm(g, c).to(device)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        self._init_data((n, c, h, w), torch.float32, device, fmt)
        eps = self.stock.eps
        self.functional = lambda x, w, b: persample.group_norm(x, g, w, b, eps)

    def describe(self):
        """The case as the JSON rows record it."""
        return {"shape": list(self.shape), "channels_last": self.channels_last}

    @staticmethod
    def label(row):
        return ",".join(map(str, row["shape"])) + (" NHWC" if row["channels_last"] else " NCHW")

    columns = "N,C,H,W,G layout"


class _RowNormCase(_Case):
    """A row norm of width D on ``[N, T, D]`` input (N samples of T tokens), the layer
    and the input in ``dtype``.

    Args:
        shape (tuple): ``(N, T, D)``.
        dtype (torch.dtype): of the input and the layer's parameters.
    """

    columns = "N,T,D dtype"

    def __init__(self, shape, dtype, device):
        d = shape[-1]
        self.shape, self.dtype = shape, dtype
        self.stock = self.stock_class(d).to(device, dtype)
        self.functional = self._functional(d, self.stock.eps)
        self._init_data(shape, dtype, device)

    def describe(self):
        return {"shape": list(self.shape), "dtype": str(self.dtype).removeprefix("torch.")}

    @staticmethod
    def label(row):
        return ",".join(map(str, row["shape"])) + " " + row["dtype"]


class LayerNormCase(_RowNormCase):
    """``nn.LayerNorm(D)``; see :class:`_RowNormCase`."""

    op, plain_name, stock_class = "layer_norm", "nn.LayerNorm", torch.nn.LayerNorm

    @staticmethod
    def _functional(d, eps):
        return lambda x, w, b: persample.layer_norm(x, d, w, b, eps)


class RMSNormCase(_RowNormCase):
    """``nn.RMSNorm(D)`` (eps None: the machine epsilon); see :class:`_RowNormCase`."""

    op, plain_name, stock_class, param_names = "rms_norm", "nn.RMSNorm", torch.nn.RMSNorm, ("weight",)

    @staticmethod
    def _functional(d, eps):
        return lambda x, w: persample.rms_norm(x, d, w, eps)


CASES = {case.op: case for case in (GroupNormCase, LayerNormCase, RMSNormCase)}
"""The case class of each op."""
