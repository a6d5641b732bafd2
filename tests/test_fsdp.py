"""call_for_per_sample_grads under FSDP2 (fully_shard) and DDP, Opacus's hooks mode
(GradSampleModule) under torch DDP and Opacus's own DPDDP, and Opacus's ghost clipping
under its FSDP2 wrapper (grad_sample_mode="ghost_fsdp"), with 2 processes over gloo on
CPU: each rank's per-sample results equal a single-process float64 loop over that rank's
examples (tests/convert_models.py's Net: every kind of group norm). The same for the
other norms (call_for_per_sample_grads under FSDP2 and DDP, ghost clipping under the
FSDP2 wrapper) on tests/test_row_norm_modules.py's NormNet: LayerNorm, RMSNorm and
InstanceNorm2d, each of which the wrapper must make its own fully_shard unit.

One spawn runs them all, since starting the processes is most of the cost.
"""

import importlib.util
import os
import subprocess
import sys
import tempfile
import unittest
import warnings
from unittest import mock

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

WORLD, PER_RANK = 2, 3


def _rank_batch(rank):
    from convert_models import batch

    x, y = batch(WORLD * PER_RANK)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[mine], y[mine]


def _rank_rows(rank):
    from test_row_norm_modules import norm_batch

    x, y = norm_batch(WORLD * PER_RANK)
    mine = slice(rank * PER_RANK, (rank + 1) * PER_RANK)
    return x[mine], y[mine]


def _grad_samples(model, wrapped, x, y):
    import persample
    from convert_models import NORM_PARAMS

    F.cross_entropy(persample.call_for_per_sample_grads(wrapped)(x), y, reduction="sum").backward()
    params = dict(model.named_parameters())
    return {k: params[k].grad_sample for k in NORM_PARAMS}


def _fsdp(x, y):
    from torch.distributed.fsdp import fully_shard

    import persample
    from convert_models import make_net

    model = persample.convert_group_norm(make_net())
    for m in model.modules():  # each group norm its own unit, as Opacus's wrapper does
        if isinstance(m, persample.nn.GroupNorm) or hasattr(m, "_persample_original"):
            fully_shard(m)
    fully_shard(model)
    return _grad_samples(model, model, x, y)


def _ddp(x, y):
    import persample
    from convert_models import make_net

    model = persample.convert_group_norm(make_net())
    return _grad_samples(model, torch.nn.parallel.DistributedDataParallel(model), x, y)


def _ghost_fsdp(x, y):
    """Per-sample gradient norms of every parameter from Opacus's ghost clipping under
    its FSDP2 wrapper, and which persample layers the wrapper sharded as their own unit."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
        GradSampleModuleFastGradientClippingFSDP,
    )
    from opacus.utils.fsdp_utils import FSDP2Wrapper
    from torch.distributed.fsdp import FSDPModule

    import persample
    import persample.opacus  # noqa: F401  (registers the sampler the wrapper looks up)
    from convert_models import make_net

    model = FSDP2Wrapper(persample.convert_group_norm(make_net()))
    units = {k: isinstance(m, FSDPModule) for k, m in model.named_modules() if isinstance(m, persample.nn.GroupNorm)}
    gsm = GradSampleModuleFastGradientClippingFSDP(model, loss_reduction="sum", max_grad_norm=1e9)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    return {"norms": gsm.get_norm_sample().detach().clone(), "units": units}


def _opacus_hooks(x, y, wrapper):
    """Opacus's hooks mode (GradSampleModule) over a model wrapped in ``wrapper`` (torch
    DDP or Opacus's DPDDP): the GroupNorm parameters' ``grad_sample``, and the layers on
    which persample's registered sampler ran, against those that are persample's."""
    from opacus import GradSampleModule

    import persample
    import persample.opacus  # noqa: F401  (registers the sampler)
    from convert_models import NORM_PARAMS, make_net

    model = persample.convert_group_norm(make_net())
    names = {m: k for k, m in model.named_modules()}
    ran = []
    samplers = GradSampleModule.GRAD_SAMPLERS
    registered = samplers.get(persample.nn.GroupNorm)
    if registered is not None:  # a spy on the registered sampler, removed below

        def spy(layer, activations, backprops):
            ran.append(names[layer])
            return registered(layer, activations, backprops)

        samplers[persample.nn.GroupNorm] = spy
    try:
        gsm = GradSampleModule(wrapper(model), loss_reduction="sum")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            F.cross_entropy(gsm(x), y, reduction="sum").backward()
    finally:
        if registered is not None:
            samplers[persample.nn.GroupNorm] = registered
    params = dict(model.named_parameters())
    return {
        "grad_samples": {k: params[k].grad_sample for k in NORM_PARAMS},
        "ran": sorted(ran),
        "persample": sorted(k for m, k in names.items() if isinstance(m, persample.nn.GroupNorm)),
    }


def _hooks_ddp(x, y):
    return _opacus_hooks(x, y, torch.nn.parallel.DistributedDataParallel)


def _hooks_dpddp(x, y):
    from opacus.distributed import DifferentiallyPrivateDistributedDataParallel

    return _opacus_hooks(x, y, DifferentiallyPrivateDistributedDataParallel)


def _row_net():
    import persample
    from test_row_norm_modules import make_norm_net, norm_param_names

    model = persample.convert_norms(make_norm_net())
    return model, norm_param_names(model)


def _row_grad_samples(model, names, wrapped, x, y):
    import persample

    F.cross_entropy(persample.call_for_per_sample_grads(wrapped)(x), y, reduction="sum").backward()
    params = dict(model.named_parameters())
    return {k: params[k].grad_sample for k in names}


def _rows_fsdp(x, y):
    from torch.distributed.fsdp import fully_shard

    import persample

    model, names = _row_net()
    for m in model.modules():
        if isinstance(m, persample.nn.PerSampleNorm):
            fully_shard(m)
    fully_shard(model)
    return _row_grad_samples(model, names, model, x, y)


def _rows_ddp(x, y):
    model, names = _row_net()
    return _row_grad_samples(model, names, torch.nn.parallel.DistributedDataParallel(model), x, y)


def _rows_ghost_fsdp(x, y):
    """Ghost clipping's per-sample norms on NormNet under the FSDP2 wrapper, which of its
    persample layers the wrapper made their own unit, on which persample's sampler ran,
    and how often a row-norm sampler recomputed statistics its layer had stashed."""
    from opacus.grad_sample.grad_sample_module_fast_gradient_clipping_fsdp import (
        GradSampleModuleFastGradientClippingFSDP,
    )
    from opacus.utils.fsdp_utils import FSDP2Wrapper
    from torch.distributed.fsdp import FSDPModule

    import persample
    import persample.opacus as po
    from test_opacus_norms import spy_on_samplers

    model = FSDP2Wrapper(_row_net()[0])
    layers = {m: k for k, m in model.named_modules() if isinstance(m, persample.nn.PerSampleNorm)}
    gsm = GradSampleModuleFastGradientClippingFSDP(model, loss_reduction="sum", max_grad_norm=1e9)
    classes = {persample.nn.LayerNorm, persample.nn.RMSNorm, persample.nn.InstanceNorm2d}
    with warnings.catch_warnings(), spy_on_samplers(classes, layers) as ran, \
         mock.patch.object(po, "row_stats", wraps=po.row_stats) as recompute:
        warnings.simplefilter("ignore")
        F.cross_entropy(gsm(x), y, reduction="sum").backward()
    return {"norms": gsm.get_norm_sample().detach().clone(), "ran": sorted(ran),
            "units": {k: isinstance(m, FSDPModule) for m, k in layers.items()}, "recomputed": recompute.call_count}


OPACUS_CASES = ("hooks_ddp", "hooks_dpddp", "ghost_fsdp", "rows_ghost_fsdp")


def _worker(rank, store, out):
    sys.path.insert(0, os.path.dirname(__file__))
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # gloo on loopback
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        net, rows = _rank_batch(rank), _rank_rows(rank)
        results = {}
        cases = (("fsdp", _fsdp, net), ("ddp", _ddp, net), ("ghost_fsdp", _ghost_fsdp, net),
                 ("hooks_ddp", _hooks_ddp, net), ("hooks_dpddp", _hooks_dpddp, net),
                 ("rows_fsdp", _rows_fsdp, rows), ("rows_ddp", _rows_ddp, rows),
                 ("rows_ghost_fsdp", _rows_ghost_fsdp, rows))
        for name, run, batch in cases:
            if name in OPACUS_CASES and not importlib.util.find_spec("opacus"):
                continue
            try:
                results[name] = run(*batch)
            except Exception as e:  # reported by the parent, per case
                results[name] = f"{type(e).__name__}: {e}"
        torch.save(results, os.path.join(out, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@unittest.skipUnless(dist.is_available() and dist.is_gloo_available(), "needs torch.distributed with gloo")
class TestDistributed(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        with tempfile.TemporaryDirectory() as tmp:
            mp.spawn(_worker, args=(os.path.join(tmp, "rendezvous"), tmp), nprocs=WORLD, join=True)
            cls.results = [torch.load(os.path.join(tmp, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]

    def _results(self, name):
        for rank, res in enumerate(self.results):
            if name not in res:
                self.skipTest("opacus is not installed")
            if isinstance(res[name], str):
                self.fail(f"{name} on rank {rank}: {res[name]}")
            yield rank, res[name]

    def _check_grad_samples(self, name, results=None):
        from convert_models import float64_per_example_grads, func_per_example_grads, make_net
        from error_model import assert_all_track_stock

        for rank, got in results or self._results(name):
            x, y = _rank_batch(rank)
            stock = func_per_example_grads(make_net(), x, y)
            ref = float64_per_example_grads(make_net(), x, y)
            assert_all_track_stock(got, {k: stock[k] for k in got}, {k: ref[k] for k in got}, f"{name} rank {rank} ")

    def test_fsdp2(self):
        self._check_grad_samples("fsdp")

    def test_ddp(self):
        self._check_grad_samples("ddp")

    def _check_opacus_hooks(self, name):
        """Every GroupNorm parameter's grad_sample (persample's layers by persample's
        sampler, which must have run on each of them once; routed modules by Opacus's
        torch.func fallback) against the float64 loop over the rank's examples."""
        results = list(self._results(name))
        for rank, got in results:
            self.assertTrue(got["persample"], "no persample.nn.GroupNorm in the converted Net")
            self.assertEqual(got["ran"], got["persample"], f"{name} rank {rank}: layers persample's sampler ran on")
        self._check_grad_samples(name, [(rank, got["grad_samples"]) for rank, got in results])

    def test_opacus_hooks_ddp(self):
        self._check_opacus_hooks("hooks_ddp")

    def test_opacus_hooks_dpddp(self):
        self._check_opacus_hooks("hooks_dpddp")

    def test_opacus_ghost_fsdp(self):
        from convert_models import float64_per_example_grads, func_per_example_grads, make_net
        from error_model import assert_tracks_stock

        def norms(grads):
            return torch.stack([g.flatten(1).norm(dim=1) for g in grads.values()], 1).norm(dim=1)

        for rank, got in self._results("ghost_fsdp"):
            self.assertTrue(got["units"] and all(got["units"].values()), got["units"])
            x, y = _rank_batch(rank)
            stock, ref = norms(func_per_example_grads(make_net(), x, y)), norms(float64_per_example_grads(make_net(), x, y))
            assert_tracks_stock(got["norms"], stock, ref, f"ghost_fsdp per-sample norms, rank {rank}")

    def _row_references(self, rank, names=None):
        from test_row_norm_modules import make_norm_net, per_example_grads

        x, y = _rank_rows(rank)
        return (per_example_grads(make_norm_net(), x, y, torch.float32, names),
                per_example_grads(make_norm_net(), x, y, names=names))

    def _check_row_grad_samples(self, name):
        from error_model import assert_all_track_stock

        for rank, got in self._results(name):
            self.assertEqual(sorted(k.split(".")[0] for k in got), ["inorm", "inorm", "ln", "ln", "ln2", "rms"])
            assert_all_track_stock(got, *self._row_references(rank, list(got)), f"{name} rank {rank} ")

    def test_row_norms_fsdp2(self):
        self._check_row_grad_samples("rows_fsdp")

    def test_row_norms_ddp(self):
        self._check_row_grad_samples("rows_ddp")

    def test_row_norms_opacus_ghost_fsdp(self):
        """FSDP2Wrapper shards every persample norm layer as its own unit (it looks
        their types up in the ghost-clipping registries, where persample.opacus
        registers them); persample's sampler runs on each, reusing the stashed
        statistics; the per-sample norms equal the float64 loop's."""
        from error_model import assert_tracks_stock
        from test_opacus_norms import sample_norms
        from test_row_norm_modules import NORM_LAYERS

        for rank, got in self._results("rows_ghost_fsdp"):
            self.assertEqual(got["units"], dict.fromkeys(NORM_LAYERS, True), f"rank {rank}")
            self.assertEqual(got["ran"], sorted(NORM_LAYERS), f"rank {rank}")
            self.assertEqual(got["recomputed"], 0, f"rank {rank}")
            stock, ref = self._row_references(rank)
            assert_tracks_stock(got["norms"], sample_norms(stock), sample_norms(ref),
                                f"rows_ghost_fsdp per-sample norms, rank {rank}")


@unittest.skipUnless(dist.is_available() and dist.is_gloo_available(), "needs torch.distributed with gloo")
class TestTorchrunExample(unittest.TestCase):
    def test_dp_sgd_ddp(self):
        """docs/examples/dp_sgd_ddp.py under torchrun: it asserts that the ranks stay in sync."""
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"))
        run = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             os.path.join(root, "docs", "examples", "dp_sgd_ddp.py")],
            capture_output=True, text=True, timeout=120, env=env,
        )
        self.assertEqual(run.returncode, 0, run.stderr[-3000:])
        self.assertEqual(run.stdout.count("models in sync"), 2, run.stdout)


if __name__ == "__main__":
    unittest.main()
