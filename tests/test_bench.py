"""python -m persample.bench: the layer suites (--op group_norm, layer_norm, rms_norm),
every method measured and written, and every method's per-sample gradients against a
float64 per-example loop; the kernel suite's CPU-side pieces."""

import contextlib
import importlib.util
import io
import json
import os
import tempfile
import unittest
import warnings
from unittest import mock

import torch

import row_samples
import samples
from error_model import check_close
from persample.bench import cases, cli, kernels, layer, methods, row_kernels

HAS_OPACUS = importlib.util.find_spec("opacus") is not None
CPU = torch.device("cpu")
GN_METHODS = methods.METHODS["group_norm"]


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
            self.assertEqual(measured | skipped, set(GN_METHODS))
            if HAS_OPACUS:
                self.assertEqual(skipped, set())
            for name in measured:
                self.assertGreater(row["ms"][name], 0)
                self.assertGreater(row["ratio_to_plain"][name], 0)
                lo, hi = row["ratio_range"][name]
                self.assertTrue(0 < lo <= row["ratio_to_plain"][name] <= hi)
        self.assertEqual(self.result["geomean_ratio_to_plain"]["plain"], 1.0)
        self.assertEqual(self.result["op"], "group_norm")
        self.assertNotIn("geomean_ratio_to_plain_by_dtype", self.result)  # fp32 only

    def test_header_names_torch_device_and_threads(self):
        first = self.stdout.splitlines()[0]
        for word in ("torch", "op group_norm", "device cpu", "threads"):
            self.assertIn(word, first)
        self.assertEqual(self.result["header"], first)

    @unittest.skipUnless(importlib.util.find_spec("matplotlib"), "matplotlib not installed")
    def test_plot_written(self):
        with open(self.png_path, "rb") as f:
            self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")


# Tiny cases of the row-norm suites: one per dtype, so that every dtype's plumbing runs.
ROW_QUICK = [((3, 4, 16), torch.float32), ((2, 5, 8), torch.bfloat16)]


@mock.patch.object(methods, "BACKEND", "eager")  # the plumbing, not the compiler
class TestRowNormSuites(unittest.TestCase):
    """--op layer_norm and --op rms_norm, end to end, at tiny shapes: the suite's
    plumbing (every method's own steps are TestPerSampleGrads'), with the methods that
    show every kind of row: measured, compiled, skipped with a reason."""

    METHODS = "persample,persample_compiled,expanded_weights,opacus_stock,func_stock"

    def _run(self, op):
        with tempfile.TemporaryDirectory() as tmp, \
                mock.patch.dict(layer.QUICK_SHAPES, {op: ROW_QUICK}), \
                contextlib.redirect_stdout(io.StringIO()) as out, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Opacus's hook warnings
            path = os.path.join(tmp, "bench.json")
            cli.main(["--op", op, "--quick", "--rounds", "2", "--methods", self.METHODS, "--json", path])
            with open(path) as f:
                return json.load(f), out.getvalue()

    def test_every_method_measured_or_reported_skipped(self):
        for op in ("layer_norm", "rms_norm"):
            with self.subTest(op=op):
                result, out = self._run(op)
                self.assertEqual(result["op"], op)
                self.assertEqual([(r["shape"], r["dtype"]) for r in result["rows"]],
                                 [([3, 4, 16], "float32"), ([2, 5, 8], "bfloat16")])
                for row in result["rows"]:
                    measured, skipped = set(row["ms"]), set(row["skipped"])
                    self.assertEqual(measured | skipped, {"plain", *self.METHODS.split(",")})
                    for name, why in row["skipped"].items():  # reasons, not failures
                        self.assertFalse(why.startswith("failed"), (name, why))
                        self.assertTrue(name.startswith("opacus") and not HAS_OPACUS
                                        or name == "expanded_weights" and op == "rms_norm", (name, why))
                    self.assertTrue(all(v > 0 for v in row["ms"].values()))
                by_dtype = result["geomean_ratio_to_plain_by_dtype"]
                self.assertEqual(set(by_dtype), {"float32", "bfloat16"})
                self.assertEqual(by_dtype["bfloat16"]["plain"], 1.0)
                self.assertIn("persample", by_dtype["float32"])
                self.assertIn("persample speed-up over:", out)
                self.assertIn(f"op {op}", out.splitlines()[0])
                self.assertIn("3,4,16 float32", out)

    def test_op_is_refused_with_another_suite(self):
        with contextlib.redirect_stderr(io.StringIO()) as err, self.assertRaises(SystemExit):
            cli.main(["--op", "rms_norm", "--model", "vit"])
        self.assertIn("--op picks the norm of the layer and kernel suites", err.getvalue())


@mock.patch.object(methods, "BACKEND", "aot_eager")  # AOTAutograd's graphs, not inductor's code
class TestPerSampleGrads(unittest.TestCase):
    """Every method's per-sample gradients against a float64 per-example loop over the
    stock layer, within the error model (twice stock's own error in the same dtype, one
    example at a time, plus 4 ulps: tests/error_model.py)."""

    def _check(self, case, ref, stock):
        torch._dynamo.reset()  # a fresh recompile budget per case, as the suite has
        for name, factory in methods.METHODS[case.op].items():
            if name == "plain":
                continue
            with self.subTest(op=case.op, dtype=str(case.x.dtype), method=name), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                try:
                    step = factory(case)
                except methods.Unavailable as why:
                    # Only what this torch or this environment lacks, with its reason.
                    ok = "no rule for RMSNorm" in str(why) or "opacus is not installed" in str(why)
                    self.assertTrue(ok, str(why))
                    continue
                step()
                grads = step()  # a second step: no state may leak between steps
                self.assertEqual(len(grads), len(case.param_names))
                for pname, g, want, stock_g in zip(case.param_names, grads, ref, stock):
                    self.assertEqual(g.shape, (case.n, *getattr(case.stock, pname).shape))
                    check_close(g, want, stock_g, f"{case.op} {name} {pname}: ")

    def test_row_norms(self):
        for op, rms in (("layer_norm", False), ("rms_norm", True)):
            for dtype in (torch.float32, torch.bfloat16):
                torch.manual_seed(0)
                case = cases.CASES[op]((3, 6, 32), dtype, CPU)
                params = (case.stock.weight, None if rms else case.stock.bias)
                args = (case.x, [32], *params, case.stock.eps, case.dy, rms)
                ref = row_samples.reference(*args)[2:]
                stock = row_samples.stock_loop(*args)[2:]
                self._check(case, ref, stock)

    def test_group_norm(self):
        torch.manual_seed(0)
        case = cases.CASES["group_norm"]((3, 6, 4, 5, 3), False, CPU)
        args = (case.x, 3, case.stock.weight, case.stock.bias, case.stock.eps, case.dy)
        self._check(case, samples.reference(*args)[2:], samples.stock_loop(*args)[2:])


class TestMissingPackage(unittest.TestCase):
    def test_missing_opacus_is_reported_as_skipped(self):
        def unavailable(case):
            raise methods.Unavailable("opacus is not installed")

        table = {"plain": GN_METHODS["plain"], "opacus_stock": unavailable}
        row = layer.run_case("group_norm", ((2, 4, 3, 3, 2), False), 1, CPU, list(table), table)
        self.assertEqual(row["skipped"], {"opacus_stock": "opacus is not installed"})
        self.assertEqual(set(row["ms"]), {"plain"})

    def test_failing_method_is_reported_and_left_out_of_the_means(self):
        def broken(case):
            def step():
                raise RuntimeError("Expected X.is_contiguous(memory_format)\nmore")

            return step if case.n == 2 else GN_METHODS["persample"](case)

        table = {"plain": GN_METHODS["plain"], "persample": GN_METHODS["persample"], "broken": broken}
        rows = [layer.run_case("group_norm", ((n, 4, 3, 3, 2), False), 1, CPU, list(table), table)
                for n in (2, 3)]
        with contextlib.redirect_stdout(io.StringIO()) as out:
            layer.report(rows, "header")
        self.assertEqual(rows[0]["skipped"], {"broken": "failed: RuntimeError: Expected X.is_contiguous(memory_format)"})
        self.assertIn("broken", rows[1]["ms"])
        self.assertEqual(set(layer.summary(rows)), {"plain", "persample"})
        self.assertIn("skipped broken at 2,4,3,3,2 NCHW: failed: RuntimeError", out.getvalue())


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

        with mock.patch.object(kernels.persample, "group_norm", spy):
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


class TestRowKernelSuite(unittest.TestCase):
    """The row norms' kernel-bound suite (persample/bench/row_kernels.py): its steps on
    CPU (the kernel steps in triton's interpreter), and its summary."""

    def test_steps_give_per_sample_grads(self):
        for op, peers in (("layer_norm", {"plain", "persample", "expanded_weights"}),
                          ("rms_norm", {"plain", "persample"})):
            with self.subTest(op):
                case = row_kernels.Case(op, (3, 4, 8), torch.float32, device="cpu")
                steps = case.autograd_steps()
                self.assertEqual(set(steps), peers)
                for step in steps.values():
                    step()
                leaves = []
                fn = getattr(row_kernels.persample, op)

                def spy(x, d, *args):
                    leaves.extend(a for a in args if isinstance(a, torch.Tensor))
                    return fn(x, d, *args)

                with mock.patch.object(row_kernels.persample, op, spy):
                    steps["persample"]()
                self.assertEqual([p.grad.shape for p in leaves], [(3, 8)] * (2 if op == "layer_norm" else 1))

    @unittest.skipIf(importlib.util.find_spec("triton") is None, "triton is not installed")
    @unittest.skipIf(os.environ.get("TRITON_INTERPRET") != "1" and not torch.cuda.is_available(),
                     "no GPU and no triton interpreter")
    def test_kernel_steps_run(self):
        """ATen's RMSNorm backward has no CPU kernel: on CPU only layer_norm's ATen step runs."""
        device = "cuda" if torch.cuda.is_available() else "cpu"
        for op in ("layer_norm", "rms_norm"):
            steps = row_kernels.Case(op, (2, 3, 8), torch.float32, device=device).kernel_steps()
            self.assertEqual(set(steps), {"persample", "aten", "copy"})
            for name, step in steps.items():
                if name == "aten" and op == "rms_norm" and device == "cpu":
                    continue
                with self.subTest(op=op, step=name):
                    step()

    def test_summary(self):
        stat = lambda v: {"median": v, "min": v, "max": v}  # noqa: E731
        rows = [{"aten_over_persample_kernels": stat(a), "bandwidth_fraction": stat(0.5),
                 "plain_over_persample": stat(p), "expanded_weights_over_persample": stat(4.0)}
                for a, p in ((2.0, 1.0), (0.5, 4.0))]
        means = row_kernels.summary(rows)
        self.assertAlmostEqual(means["aten_kernels"], 1.0)
        self.assertAlmostEqual(means["aten_kernels_min"], 0.5)
        self.assertAlmostEqual(means["plain_steps"], 2.0)
        self.assertAlmostEqual(means["expanded_weights"], 4.0)

    def test_tune_and_check_refused_with_a_row_op(self):
        args = type("Args", (), {"device": "cuda", "op": "layer_norm", "tune": True, "check": False})()
        parser = mock.Mock(error=mock.Mock(side_effect=SystemExit(2)))
        with mock.patch.object(torch.cuda, "is_available", return_value=True), \
                mock.patch.object(kernels.cuda, "triton_launch", return_value=object()), \
                self.assertRaises(SystemExit):
            kernels.main(args, parser)
        self.assertIn("--tune and --check are GroupNorm's", parser.error.call_args[0][0])


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
