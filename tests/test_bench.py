"""python -m persample.bench --quick --json: every method, measured and written."""

import contextlib
import importlib.util
import io
import json
import os
import tempfile
import unittest
import unittest.mock

import torch

from persample.bench import cli, kernels, layer, methods

HAS_OPACUS = importlib.util.find_spec("opacus") is not None


class TestBench(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        cls.tmp = tempfile.TemporaryDirectory()
        cls.json_path = os.path.join(cls.tmp.name, "bench.json")
        cls.png_path = os.path.join(cls.tmp.name, "bench.png")
        argv = ["--quick", "--json", cls.json_path]
        if importlib.util.find_spec("matplotlib"):
            argv += ["--plot", cls.png_path]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            cli.main(argv)
        cls.stdout = out.getvalue()
        with open(cls.json_path) as f:
            cls.result = json.load(f)

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()

    def test_every_method_measured_or_reported_skipped(self):
        for row in self.result["rows"]:
            measured, skipped = set(row["ms"]), set(row["skipped"])
            self.assertEqual(measured | skipped, set(methods.METHODS))
            if HAS_OPACUS:
                self.assertEqual(skipped, set())
            for name in measured:
                self.assertGreater(row["ms"][name], 0)
                self.assertGreater(row["ratio_to_plain"][name], 0)
        self.assertEqual(self.result["geomean_ratio_to_plain"]["plain"], 1.0)

    def test_header_names_torch_device_and_threads(self):
        first = self.stdout.splitlines()[0]
        for word in ("torch", "device cpu", "threads"):
            self.assertIn(word, first)
        self.assertEqual(self.result["header"], first)

    @unittest.skipUnless(importlib.util.find_spec("matplotlib"), "matplotlib not installed")
    def test_plot_written(self):
        with open(self.png_path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


class TestMissingPackage(unittest.TestCase):
    def test_missing_opacus_is_reported_as_skipped(self):
        def unavailable(case):
            raise methods.Unavailable("opacus is not installed")

        saved = dict(methods.METHODS)
        methods.METHODS.clear()
        methods.METHODS.update(plain=saved["plain"], opacus_stock=unavailable)
        try:
            row = layer.run_shape((2, 4, 3, 3, 2), False, 1, torch.device("cpu"), list(methods.METHODS))
        finally:
            methods.METHODS.clear()
            methods.METHODS.update(saved)
        self.assertEqual(row["skipped"], {"opacus_stock": "opacus is not installed"})
        self.assertEqual(set(row["ms"]), {"plain"})

    def test_failing_method_is_reported_and_left_out_of_the_means(self):
        def broken(case):
            def step():
                raise RuntimeError("Expected X.is_contiguous(memory_format)\nmore")

            return step if case.n == 2 else methods.METHODS["persample"](case)

        saved = dict(methods.METHODS)
        methods.METHODS.clear()
        methods.METHODS.update(plain=saved["plain"], persample=saved["persample"], broken=broken)
        try:
            rows = [layer.run_shape((n, 4, 3, 3, 2), False, 1, torch.device("cpu"), list(methods.METHODS))
                    for n in (2, 3)]
            with contextlib.redirect_stdout(io.StringIO()) as out:
                layer.report(rows, "header")
        finally:
            methods.METHODS.clear()
            methods.METHODS.update(saved)
        self.assertEqual(rows[0]["skipped"], {"broken": "failed: RuntimeError: Expected X.is_contiguous(memory_format)"})
        self.assertIn("broken", rows[1]["ms"])
        self.assertEqual(set(layer.summary(rows)), {"plain", "persample"})
        self.assertIn("skipped broken at 2,4,3,3,2: failed: RuntimeError", out.getvalue())


class TestKernelSuite(unittest.TestCase):
    """The kernel-bound suite (persample/bench/kernels.py) needs a GPU; its pieces that
    do not are tested here."""

    @unittest.skipIf(torch.cuda.is_available(), "a CUDA device is present")
    def test_refuses_without_a_gpu(self):
        for device in ("cpu", "cuda"):
            with self.subTest(device=device), contextlib.redirect_stderr(io.StringIO()) as err:
                with self.assertRaises(SystemExit) as exit:
                    cli.main(["--kernels", "--device", device])
            self.assertEqual(exit.exception.code, 2)
            self.assertIn("--kernels measures CUDA kernels: run it with --device cuda", err.getvalue())

    def test_steps_run_and_persample_gives_per_sample_grads(self):
        case = kernels.Case((3, 4, 5, 6, 2), torch.float32, True, device="cpu")
        steps = case.autograd_steps()
        self.assertEqual(set(steps), {"plain", "persample", "expanded_weights"})
        for name, step in steps.items():
            with self.subTest(name):
                step()
        grads = []
        original = kernels.persample.group_norm

        def spy(x, groups, w, b):
            grads.extend((w, b))
            return original(x, groups, w, b)

        with unittest.mock.patch.object(kernels.persample, "group_norm", spy):
            steps["persample"]()
        self.assertEqual([g.grad.shape for g in grads], [(3, 4), (3, 4)])

    @unittest.skipIf(importlib.util.find_spec("triton") is None, "triton is not installed")
    @unittest.skipIf(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                     "no GPU and no triton interpreter")
    def test_kernel_steps_run(self):
        """The kernel-only steps (in triton's interpreter without a GPU)."""
        case = kernels.Case((3, 4, 5, 6, 2), torch.float32, True,
                                  device="cuda" if torch.cuda.is_available() else "cpu")
        steps = case.kernel_steps()
        self.assertEqual(set(steps), {"persample", "aten", "copy"})
        for name, step in steps.items():
            with self.subTest(name):
                step()

    @staticmethod
    def row(channels_last, on_chip, plain, ew=None, bandwidth=0.8, aten=3.0):
        stat = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
        row = {"channels_last": channels_last, "on_chip": on_chip, "plain_over_persample": stat(plain),
               "bandwidth_fraction": stat(bandwidth), "aten_over_persample_kernels": stat(aten)}
        if ew is not None:
            row["expanded_weights_over_persample"] = stat(ew)
        return row

    def test_summary_and_goals(self):
        rows = [self.row(False, True, 1.0, ew=2.0, bandwidth=0.9), self.row(False, False, 4.0, ew=8.0, bandwidth=0.1),
                self.row(True, True, 2.0, bandwidth=0.6, aten=2.0), self.row(True, True, 2.0, bandwidth=0.75, aten=8.0)]
        means = kernels.summary(rows)
        self.assertAlmostEqual(means["plain_contiguous"], 2.0)  # sqrt(1 * 4)
        self.assertAlmostEqual(means["plain_channels_last"], 2.0)
        self.assertAlmostEqual(means["aten_kernels_channels_last"], 4.0)  # sqrt(2 * 8)
        self.assertAlmostEqual(means["bandwidth_on_chip_min"], 0.6)  # the swept case is left out
        self.assertAlmostEqual(means["expanded_weights"], 4.0)
        self.assertEqual(means["expanded_weights_cases"], 2)
        met = {text: ok for text, (_, _, ok) in kernels.goals(means).items()}
        self.assertEqual(list(met.values()), [True, True, False, True])


class TestGpuCheck(unittest.TestCase):
    """The GPU check's plan coverage, which a short lease cannot afford to find wrong."""

    @unittest.skipIf(importlib.util.find_spec("triton") is None, "triton is not installed")
    def test_forced_knobs_reach_every_kind_of_plan(self):
        from unittest import mock

        from persample.bench import gpu_check
        from persample.ops.group_norm import triton_launch

        kinds = set()
        for kind, knobs in gpu_check.FORCED.items():
            with mock.patch.multiple(triton_launch, **knobs) if knobs else contextlib.nullcontext():
                for n, c, h, w, g in gpu_check.SHAPES:
                    for cl in (False, True):
                        plan = triton_launch.Plan(n, c, h * w, g, cl, 4)
                        kinds.add((kind, "single" if plan.single else "split" if plan.splits > 1
                                   else "channel_blocks" if plan.c_blocks > 1 else "swept"))
        for kind in gpu_check.FORCED:
            with self.subTest(kind=kind):
                self.assertIn((kind, "single" if kind == "default" else kind), kinds)

    def test_tune_jobs_cover_every_config_and_case(self):
        from persample.bench import tune

        jobs = tune.jobs(tune.CONFIGS, [(2, 4, 3, 3, 2)], (torch.float32, torch.bfloat16))
        self.assertEqual(len(jobs), len(tune.CONFIGS) * 4)
        self.assertEqual({(j[2], j[3]) for j in jobs},
                         {("float32", False), ("float32", True), ("bfloat16", False), ("bfloat16", True)})


if __name__ == "__main__":
    unittest.main()
