"""python -m persample.bench --quick --json: every method, measured and written."""

import contextlib
import importlib.util
import io
import json
import os
import tempfile
import unittest

from persample import bench, methods

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


if __name__ == "__main__":
    unittest.main()
