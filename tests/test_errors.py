"""Bad calls raise a RuntimeError naming the problem, with the same text in eager and
under FakeTensorMode (where the fake impls run the kernels' checks)."""

import contextlib
import re

import torch
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.testing._internal.common_utils import (
    TestCase,
    instantiate_parametrized_tests,
    parametrize,
    run_tests,
)

import persample
from samples import group_norm_backward_op, group_norm_op

F32, F64 = torch.float32, torch.float64


def t(*shape, dtype=F32, device="cpu"):
    return torch.randn(shape, dtype=dtype, device=device)


# name -> (args factory, the full error message). Factories build their tensors when
# called, so that under FakeTensorMode they are fake.
FORWARD = {
    "groups_do_not_divide": (
        lambda: (t(2, 6, 4), 4),
        "persample.group_norm: num_channels=6 is not divisible by num_groups=4",
    ),
    "zero_groups": (
        lambda: (t(2, 6, 4), 0),
        "persample.group_norm: num_groups must be positive, got 0",
    ),
    "negative_groups": (
        lambda: (t(2, 6, 4), -3),
        "persample.group_norm: num_groups must be positive, got -3",
    ),
    "short_weight": (
        lambda: (t(2, 6, 4), 3, t(5)),
        "persample.group_norm: weight has 5 channels but input has C=6 (input shape (2, 6, 4))",
    ),
    "long_per_sample_bias": (
        lambda: (t(2, 6, 4), 3, None, t(2, 7)),
        "persample.group_norm: bias has 7 channels but input has C=6 (input shape (2, 6, 4))",
    ),
    "3d_weight": (
        lambda: (t(2, 6, 4), 3, t(2, 6, 1)),
        "persample.group_norm: weight must be Tensor[C] (shared) or Tensor[N, C] (per-sample), "
        "got a tensor of shape (2, 6, 1)",
    ),
    "0d_weight": (
        lambda: (t(2, 6, 4), 3, t()),
        "persample.group_norm: weight must be Tensor[C] (shared) or Tensor[N, C] (per-sample), "
        "got a tensor of shape ()",
    ),
    "0d_bias": (
        lambda: (t(2, 6, 4), 3, None, t()),
        "persample.group_norm: bias must be Tensor[C] (shared) or Tensor[N, C] (per-sample), "
        "got a tensor of shape ()",
    ),
    "per_sample_weight_wrong_n": (
        lambda: (t(2, 6, 4), 3, t(3, 6)),
        "persample.group_norm: per-sample weight has N=3 rows but input has batch size N=2",
    ),
    "integer_input": (
        lambda: (torch.randint(0, 5, (2, 6, 4)), 3),
        "persample.group_norm: expected a floating-point input, got torch.int64",
    ),
    "bool_input": (
        lambda: (torch.zeros(2, 6, 4, dtype=torch.bool), 3),
        "persample.group_norm: expected a floating-point input, got torch.bool",
    ),
    "1d_input": (
        lambda: (t(6), 3),
        "persample.group_norm: expected input of shape [N, C, *] (rank >= 2), got shape (6,)",
    ),
    "0d_input": (
        lambda: (t(), 1),
        "persample.group_norm: expected input of shape [N, C, *] (rank >= 2), got shape ()",
    ),
    "negative_eps": (
        lambda: (t(2, 6, 4), 3, None, None, -1e-5),
        "persample.group_norm: eps must be >= 0, got -1e-05",
    ),
    # A meta weight with a cpu input dispatches to the fake impl, which runs the same checks.
    "weight_on_other_device": (
        lambda: (t(2, 6, 4), 3, t(6, device="meta")),
        "persample.group_norm: weight is on meta but input is on cpu",
    ),
    "float64_weight": (
        lambda: (t(2, 6, 4), 3, t(6, dtype=F64)),
        "persample.group_norm: weight has dtype torch.float64, expected torch.float32",
    ),
    "float16_bias_for_float32_input": (
        lambda: (t(2, 6, 4), 3, t(6), t(6, dtype=torch.float16)),
        "persample.group_norm: bias has dtype torch.float16, expected torch.float32",
    ),
    "float64_bias_for_bfloat16_input": (
        lambda: (t(2, 6, 4, dtype=torch.bfloat16), 3, None, t(2, 6, dtype=F64)),
        "persample.group_norm: bias has dtype torch.float64, "
        "expected torch.bfloat16 or torch.float32",
    ),
}


def backward_args(
    grad_out=(2, 6, 4), mean=(2, 3), rstd=(2, 3), mean_dtype=F32, weight=None, groups=3
):
    """A backward call on a [2, 6, 4] float32 input, with one thing changed."""
    x = t(2, 6, 4)
    g = grad_out() if callable(grad_out) else t(*grad_out)
    return g, x, t(*mean, dtype=mean_dtype), t(*rstd), weight, groups, [True, True, True]


BACKWARD = {
    "grad_out_shape": (
        lambda: backward_args(grad_out=(2, 6, 5)),
        "persample.group_norm_backward: grad_out shape (2, 6, 5) "
        "does not match input shape (2, 6, 4)",
    ),
    "grad_out_dtype": (
        lambda: backward_args(grad_out=lambda: t(2, 6, 4, dtype=F64)),
        "persample.group_norm_backward: grad_out (torch.float64, cpu) "
        "must match input (torch.float32, cpu)",
    ),
    "mean_shape": (
        lambda: backward_args(mean=(2, 2)),
        "persample.group_norm_backward: mean must have shape [N, num_groups]=[2, 3], got (2, 2)",
    ),
    "rstd_shape": (
        lambda: backward_args(rstd=(3, 3)),
        "persample.group_norm_backward: rstd must have shape [N, num_groups]=[2, 3], got (3, 3)",
    ),
    "mean_dtype": (
        lambda: backward_args(mean_dtype=F64),
        "persample.group_norm_backward: mean must be torch.float32 on cpu, "
        "got torch.float64 on cpu",
    ),
    "weight_length": (
        lambda: backward_args(weight=t(2, 5)),
        "persample.group_norm: weight has 5 channels but input has C=6 (input shape (2, 6, 4))",
    ),
    "groups_do_not_divide": (
        lambda: backward_args(mean=(2, 4), rstd=(2, 4), groups=4),
        "persample.group_norm: num_channels=6 is not divisible by num_groups=4",
    ),
}


def fake_or_eager(fake):
    return FakeTensorMode() if fake else contextlib.nullcontext()


@instantiate_parametrized_tests
class TestErrors(TestCase):
    def check_raises(self, op, make_args, message, fake):
        with fake_or_eager(fake):
            args = make_args()
            self.assertEqual(any(isinstance(a, FakeTensor) for a in args), fake)
            with self.assertRaisesRegex(RuntimeError, "^" + re.escape(message) + "$"):
                op(*args)

    @parametrize("fake", (False, True), name_fn=lambda fake: "fake" if fake else "eager")
    @parametrize("case", tuple(FORWARD))
    def test_group_norm(self, case, fake):
        self.check_raises(group_norm_op, *FORWARD[case], fake)

    @parametrize("fake", (False, True), name_fn=lambda fake: "fake" if fake else "eager")
    @parametrize("case", tuple(BACKWARD))
    def test_group_norm_backward(self, case, fake):
        self.check_raises(group_norm_backward_op, *BACKWARD[case], fake)

    def test_autograd_and_module_paths_raise_the_same(self):
        # Inputs that require grad go through the Autograd kernel first.
        x = t(2, 4, 5).requires_grad_()
        message = (
            "persample.group_norm: weight has 6 channels but input has C=4 (input shape (2, 4, 5))"
        )
        calls = (
            lambda: persample.group_norm(x, 2, t(6).requires_grad_()),
            lambda: persample.nn.GroupNorm(2, 6)(x),
        )
        for call in calls:
            with self.assertRaisesRegex(RuntimeError, "^" + re.escape(message) + "$"):
                call()


if __name__ == "__main__":
    run_tests()
