"""python -m persample.bench --model: every DP-SGD method's update against a float64
per-example loop, the profile's GroupNorm share, skips, and a tiny timed run."""

import contextlib
import copy
import importlib.util
import io
import json
import math
import os
import sys
import tempfile
import unittest
from unittest import mock

import torch
import torch.nn.functional as F

from error_model import ULPS, assert_all_track_stock
from persample import models
from persample.bench import cli, methods, model_methods
from persample.bench import models as bench_models

HAS_OPACUS = importlib.util.find_spec("opacus") is not None
TINY = {
    "wrn16-4": (models.WideResNet, dict(depth=10, width=1, groups=4), 8),
    "unet": (models.DiffusionUNet, dict(base=8, mult=(1, 2)), 8),
}
EAGER_DP = ("opacus_stock", "opacus_persample", "opacus_ghost_stock", "opacus_ghost_persample",
            "func_stock", "func_persample")


def reference_update(w, names=None, dtype=torch.float64):
    """The noise-free DP-SGD update of ``w``'s stock model (of the parameters ``names``,
    default all), by a loop over single examples in ``dtype``: each example's own
    gradient, clipped to MAX_GRAD_NORM, summed, times LR / N."""
    model = copy.deepcopy(w.model).to(dtype)
    params = {k: v for k, v in model.named_parameters() if names is None or k in names}
    rows = []
    for i in range(w.n):
        inputs = [t[i : i + 1].to(dtype) for t in w.inputs]
        targets = [t[i : i + 1].to(dtype) if t.is_floating_point() else t[i : i + 1] for t in w.targets]
        loss = w.loss(model(*inputs), *targets, reduction="sum")
        rows.append(torch.autograd.grad(loss, list(params.values())))
    grads = {k: torch.stack([row[j] for row in rows]) for j, k in enumerate(params)}
    norms = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
    factors = (model_methods.MAX_GRAD_NORM / (norms + 1e-6)).clamp(max=1.0)
    update = {k: -model_methods.LR * torch.einsum("n,n...->...", factors, g) / w.n for k, g in grads.items()}
    return update, factors


@mock.patch.dict(model_methods.MODELS, TINY)
class TestUpdates(unittest.TestCase):
    """With the noise off, every private method must apply the same clipped update."""

    def _check(self, model, names, trained=None):
        w = model_methods.Workload(model, 5, torch.device("cpu"))
        with torch.no_grad():
            for p in w.model.parameters():  # larger gradients, so that clipping bites
                p.mul_(2.0)
        expected, factors = reference_update(w, trained)
        self.assertTrue(bool((factors < 1).any()), f"clipping must bite: {factors}")
        # Stock's float32 update by the same loop, whose error is the scale (see
        # tests/error_model.py), applied to the parameters as a step rounds it.
        initial = {k: v.detach() for k, v in w.model.named_parameters()}
        # Every update is scaled by its example's clipping factor, a function of the norm
        # of all P per-sample gradients: a float32 reduction over P terms, whose relative
        # rounding error is up to ~log2(P) ulps (pairwise sums) whichever layers made the
        # gradients. So that is each update's rounding floor. (Measured under AVX-512 and
        # AVX2: the factors of the U-Net, P = 2^15, 1.2e-6 relative off for stock and
        # 2.6e-6 through persample's layers, whose last bits differ from stock's; the
        # updates of out_norm.bias then fell 1.2x outside the 4-ulp floor.)
        clip_ulps = max(ULPS, math.log2(sum(v.numel() for v in initial.values())))
        stock = {k: (initial[k] + u) - initial[k] for k, u in reference_update(w, trained, torch.float32)[0].items()}
        for name in names:
            with self.subTest(model=model, method=name):
                if name.startswith("opacus") and not HAS_OPACUS:
                    self.skipTest("opacus is not installed (pip install 'persample[opacus]')")
                with mock.patch.object(model_methods, "NOISE_MULTIPLIER", 0.0):
                    step = model_methods.METHODS[name](w)
                    before = {k: v.clone() for k, v in step.parameters().items()}
                    step()
                after = step.parameters()
                self.assertEqual(set(after), set(w.model.state_dict()))
                for k in set(after) - set(expected):  # frozen
                    self.assertTrue(torch.equal(after[k], before[k]), k)
                assert_all_track_stock({k: after[k] - before[k] for k in expected}, stock, expected, f"{name}, ",
                                       ulps=clip_ulps)

    def test_wrn_eager_methods(self):
        self._check("wrn16-4", EAGER_DP)

    def test_unet_eager_methods(self):
        self._check("unet", EAGER_DP)

    def test_group_norm_only_methods(self):
        # call_for_per_sample_grads around the compiled model, and its torch.func peer:
        # DP fine-tuning of the GroupNorm parameters alone. aot_eager: the plumbing, not
        # inductor (torch_compile_tests/test_models.py has the models compiled).
        model = model_methods.Workload("wrn16-4", 1, torch.device("cpu")).model
        gn = model_methods.norm_parameter_names(model)
        self.assertEqual(len(gn), 2 * 9)  # WRN-10-1: 9 GroupNorm layers (no projection at width 1)
        with mock.patch.object(model_methods, "BACKEND", "aot_eager"):
            self._check("wrn16-4", ("grad_sample_norms_only", "func_stock_compiled_norms_only"), trained=gn)


class TestProfileShare(unittest.TestCase):
    def test_norm_share_counts_norms_only(self):
        x = torch.randn(8, 16, 32, 32)
        only_norm = bench_models.norm_share(lambda: F.group_norm(x, 4), torch.device("cpu"))
        no_norm = bench_models.norm_share(lambda: torch.relu(x), torch.device("cpu"))
        # Counted, within the step; how much of the wall time it is depends on the
        # machine's load (profiler overhead), so no timing threshold here.
        self.assertGreater(only_norm, 0.0)
        self.assertLessEqual(only_norm, 1.0)
        self.assertEqual(no_norm, 0.0)


class TestCommandLine(unittest.TestCase):
    def _main(self, *argv):
        # The plumbing, not the compiler: the floor runs eagerly here.
        eager_floor = {"nonprivate_compiled": model_methods.METHODS["nonprivate_eager"]}
        with mock.patch.dict(model_methods.MODELS, TINY), \
                mock.patch.dict(model_methods.METHODS, eager_floor), \
                contextlib.redirect_stdout(io.StringIO()) as out, contextlib.redirect_stderr(io.StringIO()):
            result = cli.main(list(argv))
        return result, out.getvalue()

    def test_tiny_run_reports_every_requested_method(self):
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "models.json")
            result, out = self._main("--model", "unet", "--rounds", "2", "--batch-size", "3",
                                     "--methods", "func_stock,func_persample", "--json", path)
            with open(path) as f:
                written = json.load(f)
        self.assertEqual(written["ms"], result["ms"])
        self.assertTrue(written["header"].startswith("torch "))
        measured = {"nonprivate_compiled", "func_stock", "func_persample"}
        self.assertEqual(set(result["ms"]), measured)
        self.assertEqual(result["ratio_to_nonprivate"]["nonprivate_compiled"], 1.0)
        for name in measured:
            self.assertGreater(result["ms"][name], 0)
            self.assertIn(name, out)
            self.assertTrue(0 < result["norm_share"][name] <= 1, result["norm_share"])
        self.assertEqual(set(result["persample_over_stock"]), {"func_persample"})
        med, lo, hi = result["persample_over_stock"]["func_persample"]
        self.assertTrue(0 < lo <= med <= hi, (lo, med, hi))
        self.assertIn("func_persample / func_stock", out)
        self.assertIn("grad_sample_norms_only", result["skipped"])  # opt-in, with its reason
        self.assertIn("norm parameters only", out)
        self.assertEqual(result["peak_mb"], {})  # CUDA only

    def test_missing_opacus_is_unavailable_with_its_reason(self):
        # None in sys.modules makes `import opacus` fail. Only this key is swapped:
        # mock.patch.dict(sys.modules) would also drop modules imported meanwhile.
        with mock.patch.dict(model_methods.MODELS, TINY):
            w = model_methods.Workload("wrn16-4", 2, torch.device("cpu"))
        saved = sys.modules.get("opacus")
        sys.modules["opacus"] = None
        try:
            for name in ("opacus_stock", "opacus_ghost_persample"):
                with self.assertRaisesRegex(methods.Unavailable, r"opacus is not installed \(pip install"):
                    model_methods.METHODS[name](w)
        finally:
            if saved is None:
                del sys.modules["opacus"]
            else:
                sys.modules["opacus"] = saved

    def test_unknown_method_is_refused(self):
        with self.assertRaisesRegex(SystemExit, "unknown methods for --model: bogus"):
            self._main("--model", "unet", "--methods", "bogus")


if __name__ == "__main__":
    unittest.main()
