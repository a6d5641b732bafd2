"""WRN-16-4 and the diffusion U-Net of persample.models, converted with
persample.convert_group_norm, under every workflow: per-sample gradients eager and
compiled (torch.func and call_for_per_sample_grads), torch.export with a dynamic batch,
the joint forward+backward export, and Opacus make_private in hooks and ghost modes.
Small versions of both models; the ground truth is a float64 loop over single examples
through the stock (unconverted) model. Gradients run through stock convolutions and
linears, whose float32 rounding varies with the machine, so each float32 result is
compared with the same workflow through the stock model, with stock's own error against
the float64 truth as the scale (tests/error_model.py)."""

import copy
import importlib.util
import os
import tempfile
import unittest
import warnings

import torch
import torch.export.experimental  # torch.export does not import it itself
from torch.export import Dim
from torch.testing import FileCheck

import persample
from persample import models
from persample.bench import model_methods
from tests.error_model import assert_all_track_stock

HAS_OPACUS = importlib.util.find_spec("opacus") is not None
FORWARD_OP = "torch.ops.persample.group_norm.default"
BACKWARD_OP = "torch.ops.persample.group_norm_backward.default"
TOL = dict(rtol=1e-4, atol=1e-6)  # exported against eager: the same float32 kernels


def per_example_grads(model, inputs, targets, loss):
    """``{name: Tensor[N, *param.shape]}`` in float64: each example's own (summed) loss
    gradient, one stock forward and backward per example on a float64 copy."""
    ref = copy.deepcopy(model).double()
    params = dict(ref.named_parameters())
    rows = []
    for i in range(inputs[0].shape[0]):
        xs = [t[i : i + 1].double() for t in inputs]
        ys = [t[i : i + 1].double() if t.is_floating_point() else t[i : i + 1] for t in targets]
        rows.append(torch.autograd.grad(loss(ref(*xs), *ys, reduction="sum"), list(params.values())))
    return {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(params)}


class ModelCase:
    """The workflows, for one model; subclasses say which (``make``, ``data``)."""

    def setUp(self):
        torch._dynamo.reset()
        torch.manual_seed(0)
        self.stock = self.make()
        with torch.no_grad():  # GroupNorm starts at weight 1, bias 0, which hides mix-ups
            for m in self.stock.modules():
                if isinstance(m, torch.nn.GroupNorm):
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_()
        self.model = persample.convert_group_norm(copy.deepcopy(self.stock))
        self.n_norms = sum(isinstance(m, persample.nn.GroupNorm) for m in self.model.modules())
        self.assertGreater(self.n_norms, 5)
        self.inputs, self.targets = self.data(5)
        self.ref = per_example_grads(self.stock, self.inputs, self.targets, self.loss)

    def _func_grads(self, backend=None, model=None):
        model = model or self.model
        params = {k: v.detach() for k, v in model.named_parameters()}
        k = len(self.inputs)

        def example_loss(p, *example):
            xs, ys = [e[None] for e in example[:k]], [e[None] for e in example[k:]]
            return self.loss(torch.func.functional_call(model, p, tuple(xs)), *ys, reduction="sum")

        fn = torch.func.vmap(torch.func.grad(example_loss), in_dims=(None,) + (0,) * (k + len(self.targets)))
        if backend:
            fn = torch.compile(fn, fullgraph=True, backend=backend)
        return fn(params, *self.inputs, *self.targets)

    def _grad_samples(self, model):
        self.model.zero_grad(set_to_none=True)
        wrapped = persample.call_for_per_sample_grads(model)
        self.loss(wrapped(*self.inputs), *self.targets, reduction="sum").backward()
        return {k: p.grad_sample for k, p in self.model.named_parameters() if hasattr(p, "grad_sample")}

    def _stock_grads(self):
        """Per-sample gradients in float32 by the same torch.func workflow through the
        stock model: what persample's are compared with, once per test."""
        if not hasattr(self, "_stock"):
            self._stock = self._func_grads(model=self.stock)
        return self._stock

    def _check_grads(self, got, every_parameter):
        names = set(self.ref) if every_parameter else {k for k in self.ref if _is_norm_param(self.model, k)}
        self.assertEqual(set(got), names)
        stock = self._stock_grads()
        assert_all_track_stock(got, {k: stock[k] for k in names}, {k: self.ref[k] for k in names})

    def test_torch_func_eager(self):
        self._check_grads(self._func_grads(), every_parameter=True)

    def test_torch_func_compiled(self):
        # aot_eager runs dynamo and AOTAutograd, where the persample ops' fake impls,
        # autograd and lowering meet these models, without inductor's C++ compile of every
        # kernel (a minute or more per graph on 2 cores; tests/test_compile.py and others
        # cover inductor on a small model). Compiled, the layers lower to ATen's GroupNorm
        # (persample.ops.functional.use_aten).
        self._check_grads(self._func_grads("aot_eager"), every_parameter=True)

    def test_grad_sample_eager_and_compiled(self):
        # A compiled model runs the persample ops themselves, forward and backward
        # (aot_eager: see test_torch_func_compiled).
        self._check_grads(self._grad_samples(self.model), every_parameter=False)
        compiled = torch.compile(self.model, fullgraph=True, backend="aot_eager")
        self._check_grads(self._grad_samples(compiled), every_parameter=False)

    def test_export_dynamic_batch_saved_and_loaded(self):
        model = self.model.eval()
        batch = Dim("batch", min=2)
        ep = torch.export.export(model, self.inputs, dynamic_shapes=tuple({0: batch} for _ in self.inputs))
        FileCheck().check_count(FORWARD_OP, self.n_norms, exactly=True).run(ep.graph_module.code)
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "model.pt2")
            torch.export.save(ep, path)
            loaded = torch.export.load(path)
        for n in (3, 7):  # neither is the example batch size
            inputs, _ = self.data(n)
            with torch.no_grad():
                torch.testing.assert_close(loaded.module()(*inputs), model(*inputs), **TOL)

    def test_joint_export_holds_the_backward_op(self):
        loss_module = _LossModule(self.model.train(), self.loss)
        joint = torch.export.experimental._export_forward_backward(
            torch.export.export(loss_module, (*self.inputs, *self.targets))
        )
        code = joint.graph_module.code
        FileCheck().check_count(FORWARD_OP, self.n_norms, exactly=True).run(code)
        FileCheck().check_count(BACKWARD_OP, self.n_norms, exactly=True).run(code)

    @unittest.skipUnless(HAS_OPACUS, "opacus is not installed (pip install 'persample[opacus]')")
    def test_opacus_make_private_hooks_and_ghost(self):
        for mode in ("hooks", "ghost"):
            with self.subTest(mode=mode):
                self._opacus_step(mode)

    def _opacus_step(self, mode):
        from opacus import PrivacyEngine
        from torch.utils.data import DataLoader, TensorDataset

        import persample.opacus  # noqa: F401  (the persample GroupNorm sampler)

        model = copy.deepcopy(self.model).train()
        before = {k: v.detach().clone() for k, v in model.named_parameters()}
        loader = DataLoader(TensorDataset(*self.inputs, *self.targets), batch_size=len(self.inputs[0]))
        optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
        extra = {}
        if mode == "ghost":
            extra = dict(criterion=model_methods.LossCriterion(self.loss), grad_sample_mode="ghost")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # secure RNG, full backward hooks
            private = PrivacyEngine().make_private(
                module=model, optimizer=optimizer, data_loader=loader, noise_multiplier=0.0,
                max_grad_norm=1.0, poisson_sampling=False, **extra,
            )
            module, optimizer = private[0], private[1]
            criterion = private[2] if mode == "ghost" else model_methods.LossCriterion(self.loss)
            (batch,) = list(private[-1])
            k = len(self.inputs)
            optimizer.zero_grad()
            criterion(module(*batch[:k]), *batch[k:]).backward()
            optimizer.step()
        # Noise off: the update is minus the mean of the clipped per-example gradients.
        want, factors = _clipped_update(self.ref)
        self.assertTrue(bool((factors < 1).any()), "clipping must bite")
        # Stock's float32 update, rounded as a step rounds it: applied to the parameters.
        stock = {k: (before[k] + u) - before[k] for k, u in _clipped_update(self._stock_grads())[0].items()}
        got = {name: p.detach() - before[name] for name, p in model.named_parameters()}
        assert_all_track_stock(got, stock, want, f"{mode}, ")


def _clipped_update(grads):
    """SGD's update at lr 1 from per-example gradients clipped to norm 1, in their dtype,
    and the clipping factors."""
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    factors = (1.0 / (norms + 1e-6)).clamp(max=1.0)
    return {k: -torch.einsum("n,n...->...", factors, g) / len(factors) for k, g in grads.items()}, factors


def _is_norm_param(model, name):
    return isinstance(model.get_submodule(name.rpartition(".")[0]), torch.nn.GroupNorm)


class _LossModule(torch.nn.Module):
    """Model plus loss: the joint export needs a module that returns a scalar loss."""

    def __init__(self, model, loss):
        super().__init__()
        self.model, self.loss = model, loss

    def forward(self, *batch):
        k = len(batch) - 1  # one target in both workloads here
        return self.loss(self.model(*batch[:k]), batch[k])


class TestWideResNet(ModelCase, unittest.TestCase):
    def make(self):
        # WRN-10-1: one block per stage, 16/32/64 channels; 16 groups at full size.
        return models.WideResNet(depth=10, width=1, groups=4)

    def data(self, n):
        g = torch.Generator().manual_seed(n)
        return (models.synthetic_images(n, 8, generator=g),), (models.synthetic_labels(n, generator=g),)

    @staticmethod
    def loss(logits, y, reduction="mean"):
        return torch.nn.functional.cross_entropy(logits, y, reduction=reduction)


class TestDiffusionUNet(ModelCase, unittest.TestCase):
    def make(self):
        return models.DiffusionUNet(base=8, mult=(1, 2))

    def data(self, n):
        g = torch.Generator().manual_seed(n)
        x0 = models.synthetic_images(n, 8, generator=g).clamp(-1, 1)
        x_t, t, noise = models.noisy_batch(x0, generator=g)
        return (x_t, t), (noise,)

    loss = staticmethod(models.noise_prediction_loss)


if __name__ == "__main__":
    unittest.main()
