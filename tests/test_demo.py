"""The DP-SGD demo's private step (python -m persample), small and fast."""

import contextlib
import copy
import importlib.util
import io
import sys
import unittest

import torch
import torch._dynamo.testing

import persample
from error_model import assert_all_track_stock
from persample.bench import demo

HAS_DEMO_DEPS = all(importlib.util.find_spec(m) for m in ("sklearn", "opacus", "tqdm"))


def batch(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g)


class TestPrivateStep(unittest.TestCase):
    def setUp(self):
        torch.manual_seed(0)
        self.model = demo.make_model()
        self.params = {k: v.detach() for k, v in self.model.named_parameters()}

    def test_per_sample_grads_match_per_example_loop(self):
        x, y = batch(5)
        got = demo.per_sample_grads(self.model, self.params, x, y)
        ref = demo.per_example_reference(self.model, self.params, x, y)
        # The same vmap(grad) through stock nn.GroupNorm, in float32: its error is the scale.
        stock = demo.per_sample_grads(persample.revert_group_norm(copy.deepcopy(self.model)), self.params, x, y)
        assert_all_track_stock(got, stock, ref)

    def test_clipped_norms_within_max_grad_norm(self):
        x, y = batch(12)
        grads = demo.per_sample_grads(self.model, self.params, x, y)
        max_norm = 0.05  # small enough that clipping bites
        clipped = demo.clip(grads, max_norm)
        norms = torch.stack([g.flatten(1).norm(dim=1) for g in clipped.values()], 1).norm(dim=1)
        raw = torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)
        self.assertTrue(bool((raw > max_norm).any()))
        self.assertTrue(bool((norms <= max_norm * (1 + 1e-5)).all()))

    def test_padding_contributes_nothing(self):
        x, y = batch(5)
        (xp, yp, mask), = demo.padded_chunks(x, y, 8)
        self.assertEqual(xp.shape[0], 8)
        self.assertEqual(mask.tolist(), [1.0] * 5 + [0.0] * 3)
        padded = demo.clipped_sum(self.model, self.params, xp, yp, mask, 1.0)
        exact = demo.clipped_sum(self.model, self.params, x, y, torch.ones(5), 1.0)
        for k in exact:
            torch.testing.assert_close(padded[k], exact[k])
        chunks = list(demo.padded_chunks(*batch(19), 8))
        self.assertEqual([int(m.sum()) for _, _, m in chunks], [8, 8, 3])
        self.assertGreaterEqual(demo.capacity(64), 64 + 6 * 8)

    def test_compiled_steps_with_poisson_sizes_compile_once(self):
        size = 16
        counter = torch._dynamo.testing.CompileCounterWithBackend("inductor")
        hyper = dict(lr=0.5, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch=10)
        step = torch.compile(lambda *a: demo.private_step(self.model, *a, **hyper),
                             fullgraph=True, backend=counter)
        params = self.params
        zeros = {k: torch.zeros_like(v) for k, v in params.items()}
        for n in (9, 12, 7):
            (xb, yb, mask), = demo.padded_chunks(*batch(n, seed=n), size)
            torch.manual_seed(n)
            new = step(params, xb, yb, mask, zeros)
            torch.manual_seed(n)
            eager = demo.private_step(self.model, params, xb, yb, mask, zeros, **hyper)
            for k in new:
                self.assertFalse(torch.equal(new[k], params[k]))
                self.assertEqual(new[k].shape, params[k].shape)
                # Inductor draws its own random numbers, so compare the noise-free part.
                self.assertLess((new[k] - eager[k]).abs().max().item(), 1.0)
            params = new
        self.assertEqual(counter.frame_count, 1)


class TestCommandLine(unittest.TestCase):
    def _error(self, *argv):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
            demo.parser().parse_args(list(argv))
        self.assertEqual(cm.exception.code, 2)
        return err.getvalue()

    def test_bad_flags_get_argparse_errors(self):
        self.assertIn("--epochs", self._error("--epochs", "0"))
        self.assertIn("--lr", self._error("--lr", "-1"))
        self.assertIn("--noise-multiplier", self._error("--noise-multiplier", "nan"))
        self.assertIn("--device", self._error("--device", "tpu"))
        self.assertIn("unrecognized", self._error("--bogus"))

    @unittest.skipUnless(HAS_DEMO_DEPS, "needs persample[demo] (scikit-learn, opacus, tqdm)")
    def test_two_short_eager_epochs_train_and_account(self):
        args = demo.parser().parse_args(["--epochs", "2", "--no-compile"])
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            result = demo.train(args)
        self.assertIn("max abs error", out.getvalue())
        self.assertGreater(result["accuracy"], 0.3)  # chance is 0.1
        self.assertTrue(0 < result["epsilon"] < float("inf"))
        self.assertEqual(result["graphs"], 0)
        # The last line on stdout sums the run up; tqdm's bars (stderr) end each epoch
        # with its test accuracy and epsilon.
        last = out.getvalue().splitlines()[-1]
        self.assertRegex(last, rf"^test accuracy {result['accuracy']:.4f} \| epsilon {result['epsilon']:.2f} "
                               r"at delta 1e-05 \| [\d.]+ steps/s \| compile time 0\.0 s \(eager\)$")
        bars = err.getvalue()
        for epoch in (1, 2):
            self.assertRegex(bars, rf"epoch {epoch}/2: 100%.*\d+/\d+ .*test acc 0\.\d{{3}}, eps \d+\.\d\d\]")

    def test_missing_tqdm_is_an_argparse_error(self):
        # None in sys.modules makes `import tqdm` fail; only this key is swapped.
        saved, sys.modules["tqdm"] = sys.modules.get("tqdm"), None
        try:
            err = io.StringIO()
            with contextlib.redirect_stderr(err), self.assertRaises(SystemExit) as cm:
                demo.main(["--epochs", "1"])
        finally:
            if saved is None:
                del sys.modules["tqdm"]
            else:
                sys.modules["tqdm"] = saved
        self.assertEqual(cm.exception.code, 2)
        self.assertRegex(err.getvalue(), r"(tqdm|sklearn|opacus) is missing: pip install 'persample\[demo\]'")


if __name__ == "__main__":
    unittest.main()
