"""``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT dispatch)
on sample inputs of both persample ops."""

import unittest

import torch
from torch.testing._internal.common_utils import TestCase, run_tests
from torch.testing._internal.optests import OpCheckError

from samples import (
    CL,
    backward_sample_inputs,
    group_norm_op,
    group_norm_backward_op,
    make_input,
    opcheck_samples,
    sample_inputs,
)


class TestGroupNormOpcheck(TestCase):
    def test_opcheck_cpu(self):
        opcheck_samples(self, group_norm_op, sample_inputs, "cpu", requires_grad=False)

    def test_opcheck_requires_grad_cpu(self):
        opcheck_samples(self, group_norm_op, sample_inputs, "cpu", requires_grad=True)

    # opcheck compares CPU strides from torch 2.13 on (pytorch/pytorch#183002, seen on
    # 2.13.0 and 2.14.1); torch 2.11.0 compares them on CUDA only (2.12 is untested), so
    # there the fakes' CPU strides rest on tests/test_properties.py's check_fakes.
    @unittest.skipIf(
        torch.torch_version.TorchVersion(torch.__version__) < (2, 13),
        "opcheck compares CPU tensors' strides from torch 2.13 on (pytorch/pytorch#183002)",
    )
    def test_opcheck_catches_wrong_fake_strides(self):
        # The package kernel behind a fake that forgets channels_last: opcheck on a
        # channels_last sample must fail, or the positive tests above prove nothing.
        x = make_input((2, 4, 3, 5), CL)
        with self.assertRaisesRegex(OpCheckError, "test_faketensor failed .* Stride mismatch"):
            torch.library.opcheck(_bad_fake_op, (x, 2), test_utils="test_faketensor")


class TestGroupNormBackwardOpcheck(TestCase):
    def test_opcheck_cpu(self):
        opcheck_samples(
            self, group_norm_backward_op, backward_sample_inputs, "cpu", requires_grad=False
        )

    def test_opcheck_requires_grad_cpu(self):
        opcheck_samples(
            self, group_norm_backward_op, backward_sample_inputs, "cpu", requires_grad=True
        )


@torch.library.custom_op("_persample_test::group_norm_bad_fake", mutates_args=())
def _bad_fake_op(input: torch.Tensor, num_groups: int) -> torch.Tensor:
    return group_norm_op(input, num_groups)[0]


@_bad_fake_op.register_fake
def _(input, num_groups):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


if __name__ == "__main__":
    run_tests()
