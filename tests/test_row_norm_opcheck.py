"""``torch.library.opcheck`` (schema, autograd registration, fake tensor, AOT dispatch)
on every sample of the row-norm ops (tests/row_samples.py), with and without
requires_grad, in fp32 and in bf16 with fp32 parameters; and two controls that prove
opcheck fails on a wrong fake here."""

import unittest

import torch
from torch.testing._internal.optests import OpCheckError

from row_samples import (
    BF16,
    F32,
    layer_norm_backward_op,
    layer_norm_backward_samples,
    layer_norm_op,
    layer_norm_samples,
    make_input,
    rms_norm_backward_op,
    rms_norm_backward_samples,
    rms_norm_op,
    rms_norm_samples,
)
from samples import opcheck_samples
from testcase import TestCase, run_tests


def reduced(make_samples):
    """The samples in bf16 with fp32 parameters: the fakes' fp32 statistics."""
    return lambda device, *, requires_grad: make_samples(
        device, requires_grad=requires_grad, dtype=BF16, param_dtype=F32
    )


OPS = {
    "layer_norm": (layer_norm_op, layer_norm_samples),
    "layer_norm_backward": (layer_norm_backward_op, layer_norm_backward_samples),
    "rms_norm": (rms_norm_op, rms_norm_samples),
    "rms_norm_backward": (rms_norm_backward_op, rms_norm_backward_samples),
}


class TestRowNormOpcheck(TestCase):
    def check(self, name, requires_grad, dtype=F32):
        op, make_samples = OPS[name]
        make = make_samples if dtype == F32 else reduced(make_samples)
        opcheck_samples(self, op, make, "cpu", requires_grad=requires_grad)

    def test_layer_norm(self):
        self.check("layer_norm", requires_grad=False)

    def test_layer_norm_requires_grad(self):
        self.check("layer_norm", requires_grad=True)

    def test_layer_norm_bf16(self):
        self.check("layer_norm", requires_grad=False, dtype=BF16)

    def test_layer_norm_backward(self):
        self.check("layer_norm_backward", requires_grad=False)

    def test_layer_norm_backward_requires_grad(self):
        self.check("layer_norm_backward", requires_grad=True)

    def test_layer_norm_backward_bf16(self):
        self.check("layer_norm_backward", requires_grad=False, dtype=BF16)

    def test_rms_norm(self):
        self.check("rms_norm", requires_grad=False)

    def test_rms_norm_requires_grad(self):
        self.check("rms_norm", requires_grad=True)

    def test_rms_norm_bf16(self):
        self.check("rms_norm", requires_grad=False, dtype=BF16)

    def test_rms_norm_backward(self):
        self.check("rms_norm_backward", requires_grad=False)

    def test_rms_norm_backward_requires_grad(self):
        self.check("rms_norm_backward", requires_grad=True)

    def test_rms_norm_backward_bf16(self):
        self.check("rms_norm_backward", requires_grad=False, dtype=BF16)


class TestOpcheckCanFail(TestCase):
    """The package's kernel behind fakes with one thing wrong: opcheck must refuse
    them, or the positive tests above prove nothing."""

    def test_wrong_statistics_dtype(self):
        x = torch.randn(2, 3, 4, dtype=BF16)
        with self.assertRaisesRegex(OpCheckError, "test_faketensor failed .* Dtypes torch.float32 and torch.bfloat16 are not equal"):
            torch.library.opcheck(_fake_bf16_stats, (x, [4]), test_utils="test_faketensor")

    # opcheck compares CPU strides from torch 2.13 on (pytorch/pytorch#183002; see
    # tests/test_opcheck.py).
    @unittest.skipIf(
        torch.torch_version.TorchVersion(torch.__version__) < (2, 13),
        "opcheck compares CPU tensors' strides from torch 2.13 on (pytorch/pytorch#183002)",
    )
    def test_wrong_output_strides(self):
        # The kernel's output is contiguous; this fake keeps a transposed input's strides.
        x = make_input((2, 3, 4, 5), "transposed", gen=torch.Generator().manual_seed(0))
        with self.assertRaisesRegex(OpCheckError, "test_faketensor failed .* Stride mismatch"):
            torch.library.opcheck(_fake_input_strides, (x, [4, 5]), test_utils="test_faketensor")


@torch.library.custom_op("_persample_test::layer_norm_fake_bf16_stats", mutates_args=())
def _fake_bf16_stats(input: torch.Tensor, normalized_shape: list[int]) -> list[torch.Tensor]:
    return [t.clone() for t in layer_norm_op(input, normalized_shape)]


@_fake_bf16_stats.register_fake
def _(input, normalized_shape):
    # Statistics in the input's dtype, as native_layer_norm keeps them; the op's are fp32.
    stats = (*input.shape[: input.dim() - len(normalized_shape)], *(1,) * len(normalized_shape))
    return [torch.empty_like(input, memory_format=torch.contiguous_format),
            input.new_empty(stats), input.new_empty(stats)]


@torch.library.custom_op("_persample_test::rms_norm_fake_input_strides", mutates_args=())
def _fake_input_strides(input: torch.Tensor, normalized_shape: list[int]) -> torch.Tensor:
    return rms_norm_op(input, normalized_shape)[0]


@_fake_input_strides.register_fake
def _(input, normalized_shape):
    return torch.empty_like(input)  # preserve_format: the input's strides


if __name__ == "__main__":
    run_tests()
