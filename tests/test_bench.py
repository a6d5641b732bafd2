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

from persample import bench, bench_kernels, methods

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
            bench.main(argv)
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
            row = bench.run_shape((2, 4, 3, 3, 2), False, 1, bench.torch.device("cpu"), list(methods.METHODS))
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
            rows = [bench.run_shape((n, 4, 3, 3, 2), False, 1, bench.torch.device("cpu"), list(methods.METHODS))
                    for n in (2, 3)]
            with contextlib.redirect_stdout(io.StringIO()) as out:
                bench.report(rows, "header")
        finally:
            methods.METHODS.clear()
            methods.METHODS.update(saved)
        self.assertEqual(rows[0]["skipped"], {"broken": "failed: RuntimeError: Expected X.is_contiguous(memory_format)"})
        self.assertIn("broken", rows[1]["ms"])
        self.assertEqual(set(bench.summary(rows)), {"plain", "persample"})
        self.assertIn("skipped broken at 2,4,3,3,2: failed: RuntimeError", out.getvalue())


class TestKernelSuite(unittest.TestCase):
    """The kernel-bound suite (persample/bench_kernels.py) needs a GPU; its pieces that
    do not are tested here."""

    @unittest.skipIf(torch.cuda.is_available(), "a CUDA device is present")
    def test_refuses_without_a_gpu(self):
        for device in ("cpu", "cuda"):
            with self.subTest(device=device), contextlib.redirect_stderr(io.StringIO()) as err:
                with self.assertRaises(SystemExit) as exit:
                    bench.main(["--kernels", "--device", device])
            self.assertEqual(exit.exception.code, 2)
            self.assertIn("--kernels measures CUDA kernels: run it with --device cuda", err.getvalue())

    def test_steps_run_and_persample_gives_per_sample_grads(self):
        case = bench_kernels.Case((3, 4, 5, 6, 2), torch.float32, True, device="cpu")
        steps = case.steps()
        self.assertEqual(set(steps), {"plain", "persample", "expanded_weights", "copy"})
        for name, step in steps.items():
            with self.subTest(name):
                step()
        grads = []
        original = bench_kernels.persample.group_norm

        def spy(x, groups, w, b):
            grads.extend((w, b))
            return original(x, groups, w, b)

        with unittest.mock.patch.object(bench_kernels.persample, "group_norm", spy):
            steps["persample"]()
        self.assertEqual([g.grad.shape for g in grads], [(3, 4), (3, 4)])

    @staticmethod
    def row(channels_last, fused, plain, ew=None, bandwidth=0.8):
        stat = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
        row = {"channels_last": channels_last, "fused": fused, "plain_over_persample": stat(plain),
               "bandwidth_fraction": stat(bandwidth)}
        if ew is not None:
            row["expanded_weights_over_persample"] = stat(ew)
        return row

    def test_summary_and_goals(self):
        rows = [self.row(False, True, 1.0, ew=2.0, bandwidth=0.9), self.row(False, False, 4.0, ew=8.0, bandwidth=0.1),
                self.row(True, True, 2.0, bandwidth=0.6), self.row(True, True, 2.0, bandwidth=0.75)]
        means = bench_kernels.summary(rows)
        self.assertAlmostEqual(means["plain_contiguous"], 2.0)  # sqrt(1 * 4)
        self.assertAlmostEqual(means["plain_channels_last"], 2.0)
        self.assertAlmostEqual(means["bandwidth_fused_min"], 0.6)  # the split case is left out
        self.assertAlmostEqual(means["expanded_weights"], 4.0)
        self.assertEqual(means["expanded_weights_cases"], 2)
        met = {text: ok for text, (_, _, ok) in bench_kernels.goals(means).items()}
        self.assertEqual(list(met.values()), [True, True, False, True])

    def test_crossover_is_where_triton_wins_from_then_on(self):
        def rows(ratios):
            return [{"numel": 10 ** i, "cpp_over_triton": {"median": r}} for i, r in enumerate(ratios)]

        self.assertEqual(bench_kernels.crossover_point(rows([0.5, 1.2, 0.9, 1.1, 1.3])), 1000)
        self.assertEqual(bench_kernels.crossover_point(rows([1.1, 1.2])), 1)
        self.assertIsNone(bench_kernels.crossover_point(rows([0.5, 0.9])))


if __name__ == "__main__":
    unittest.main()
