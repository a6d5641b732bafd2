"""vmap over both ops equals a loop, and folds the vmapped dim into N (one kernel call)."""

import collections
import itertools

import torch
import torch.nn.functional as F
from torch.testing._internal.common_utils import TestCase, run_tests
from torch.utils._python_dispatch import TorchDispatchMode

import persample
from samples import MASKS, group_norm_backward_op, group_norm_op

F64 = torch.float64
B, N, C, L, G = 3, 2, 4, 5, 2


def t(*shape):
    return torch.randn(shape, dtype=F64)


def loop(fn, args, in_dims):
    """``fn`` applied to each vmapped item in turn, outputs stacked along dim 0."""
    size = next(a.shape[d] for a, d in zip(args, in_dims) if d is not None)
    outs = [
        fn(*(a if d is None else a.select(d, i) for a, d in zip(args, in_dims)))
        for i in range(size)
    ]
    if isinstance(outs[0], torch.Tensor):
        return torch.stack(outs)
    return tuple(torch.stack(o) for o in zip(*outs))


class CountPersampleCalls(TorchDispatchMode):
    """Counts the persample ops and ATen GroupNorm kernels called at the top level."""

    def __init__(self):
        super().__init__()
        self.counts = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func.overloadpacket)
        if name.startswith("persample.") or "group_norm" in name:
            self.counts[name] += 1
        return func(*args, **(kwargs or {}))


# (input, weight, bias, in_dims) with B vmapped items, each an [N, C, L] call.
FORWARD_CASES = {
    "input_only": (t(B, N, C, L), None, None, (0, None, None)),
    "shared_params": (t(B, N, C, L), t(C), t(C), (0, None, None)),
    "batched_weight": (t(B, N, C, L), t(B, C), t(C), (0, 0, None)),
    "batched_per_sample_params": (t(B, N, C, L), t(B, N, C), t(B, C), (0, 0, 0)),
    "unbatched_input": (t(N, C, L), t(B, C), t(N, C), (None, 0, None)),
    "nonzero_in_dims": (t(N, C, B, L), t(C, B), t(N, B, C), (2, 1, 1)),
}


def op_outputs(x, w, b):
    return group_norm_op(x, G, w, b, 1e-5)


def functional_output(x, w, b):
    return persample.group_norm(x, G, w, b)


class TestVmapGroupNorm(TestCase):
    def test_matches_loop(self):
        for name, (x, w, b, in_dims) in FORWARD_CASES.items():
            for fn in (op_outputs, functional_output):
                with self.subTest(case=name, fn=fn.__name__):
                    args = (x, w, b)
                    self.assertEqual(torch.vmap(fn, in_dims)(*args), loop(fn, args, in_dims))

    def test_nested_vmap(self):
        x, w, b = t(B, B + 1, N, C, L), t(B, C), t(B + 1, N, C)
        inner = torch.vmap(functional_output, (0, None, 0))
        expected = torch.stack(
            [loop(functional_output, (x[i], w[i], b), (0, None, 0)) for i in range(B)]
        )
        with CountPersampleCalls() as mode:
            out = torch.vmap(inner, (0, 0, None))(x, w, b)
        self.assertEqual(out, expected)
        self.assertEqual(mode.counts, {"persample.group_norm": 1})

    def test_input_batched_only_at_the_outer_level(self):
        # At the inner level the op sees no batched tensor and passes the call outward.
        x, s = t(B, N, C, L), t(B + 1)
        inner = torch.vmap(lambda x, s: functional_output(x, None, None) * s, (None, 0))
        expected = torch.stack(
            [torch.stack([F.group_norm(x[i], G) * s[j] for j in range(B + 1)]) for i in range(B)]
        )
        with CountPersampleCalls() as mode:
            out = torch.vmap(inner, (0, None))(x, s)
        self.assertEqual(out, expected)
        self.assertEqual(mode.counts, {"persample.group_norm": 1})

    def test_one_kernel_call(self):
        x, w, b, in_dims = FORWARD_CASES["batched_per_sample_params"]
        with CountPersampleCalls() as mode:
            torch.vmap(functional_output, in_dims)(x, w, b)
        self.assertEqual(mode.counts, {"persample.group_norm": 1})

    def test_autograd_through_vmap(self):
        x, w, b, in_dims = FORWARD_CASES["batched_per_sample_params"]
        args = [a.clone().requires_grad_() for a in (x, w, b)]
        grad_out = t(B, N, C, L)
        got = torch.autograd.grad(torch.vmap(functional_output, in_dims)(*args), args, grad_out)
        expected = torch.autograd.grad(loop(functional_output, args, in_dims), args, grad_out)
        self.assertEqual(got, expected)


class TestVmapGroupNormBackward(TestCase):
    def test_all_batched_combinations_match_loop(self):
        # Every subset of (grad_out, input, mean, rstd, weight) batched.
        combos = [c for c in itertools.product((False, True), repeat=5) if any(c)]
        for i, batched in enumerate(combos):
            mask = MASKS[i % len(MASKS)]
            w_shape = (N, C) if i % 2 else (C,)
            shapes = ((N, C, L), (N, C, L), (N, G), (N, G), w_shape)
            args = [t(*((B,) + s if bat else s)) for s, bat in zip(shapes, batched)]
            in_dims = tuple(0 if bat else None for bat in batched) + (None, None)
            with self.subTest(batched=batched, mask=mask, weight=w_shape):
                got = torch.vmap(group_norm_backward_op, in_dims)(*args, G, mask)
                expected = loop(lambda *a: group_norm_backward_op(*a, G, mask), args, in_dims[:5])
                # A masked-out output is each item's (0,) placeholder, so [B, 0] here.
                self.assertEqual(got, expected)

    def test_without_weight_and_one_kernel_call(self):
        go, x, mean, rstd = t(B, N, C, L), t(B, N, C, L), t(N, G), t(B, N, G)
        args, in_dims = (go, x, mean, rstd), (0, 0, None, 0)

        def fn(go, x, m, r):
            return group_norm_backward_op(go, x, m, r, None, G, [True, True, True])

        with CountPersampleCalls() as mode:
            got = torch.vmap(fn, in_dims)(*args)
        self.assertEqual(mode.counts, {"persample.group_norm_backward": 1})
        self.assertEqual(got, loop(fn, args, in_dims))


class TestVmapGrad(TestCase):
    """The torch.func recipe for per-sample gradients, with x one sample at a time."""

    def reference(self, x, w, b):
        grads = []
        for i in range(x.shape[0]):
            wi, bi = w.detach().clone().requires_grad_(), b.detach().clone().requires_grad_()
            y = F.group_norm(x[i : i + 1], G, wi, bi)
            grads.append(torch.autograd.grad(y.square().sum(), (wi, bi)))
        return {
            "weight": torch.stack([g[0] for g in grads]),
            "bias": torch.stack([g[1] for g in grads]),
        }

    def check(self, loss, x, params):
        per_sample = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0))
        with CountPersampleCalls() as mode:
            got = per_sample(params, x)
        self.assertEqual(got, self.reference(x, params["weight"], params["bias"]))
        # The whole batch in one forward and one backward kernel call.
        self.assertEqual(
            mode.counts, {"persample.group_norm": 1, "persample.group_norm_backward": 1}
        )

    def test_functional(self):
        def loss(params, x):
            return (
                persample.group_norm(x.unsqueeze(0), G, params["weight"], params["bias"])
                .square()
                .sum()
            )

        self.check(loss, t(B, C, 3, L), {"weight": t(C), "bias": t(C)})

    def test_module_functional_call(self):
        m = persample.nn.GroupNorm(G, C).to(F64)
        params = {k: torch.randn_like(v) for k, v in m.named_parameters()}

        def loss(params, x):
            return torch.func.functional_call(m, params, (x.unsqueeze(0),)).square().sum()

        self.check(loss, t(B, C, 3, L), params)


if __name__ == "__main__":
    run_tests()
