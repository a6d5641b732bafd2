"""AOTInductor: a package compiled from an exported model holding persample.group_norm.

The package is compiled once for the class (tens of seconds on two cores); every test
loads that one package.
"""

import json
import os
import subprocess
import sys
import tempfile
import textwrap
import zipfile

import torch
from torch.export import Dim
from torch.testing._internal.common_utils import TestCase, run_tests

from torch_compile_tests.models import IMAGE, SmallNet

# A fresh process that loads the package; it prints what loading does before and after
# importing persample, and saves the output for the parent to compare.
LOADER = textwrap.dedent(
    """
    import sys
    import torch

    package, inputs, outputs = sys.argv[1:]
    try:
        torch._inductor.aoti_load_package(package)
    except RuntimeError as e:
        print("without persample:", e)
    import persample  # noqa: F401
    runner = torch._inductor.aoti_load_package(package)
    torch.save(runner(torch.load(inputs)), outputs)
    """
)


class TestAOTInductor(TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        torch.manual_seed(0)
        cls.tmp = tempfile.TemporaryDirectory()
        cls.model = SmallNet().eval()
        ep = torch.export.export(
            cls.model, (torch.randn(4, *IMAGE),), dynamic_shapes={"x": {0: Dim("batch", min=2)}}
        )
        cls.package = torch._inductor.aoti_compile_and_package(
            ep, package_path=os.path.join(cls.tmp.name, "small_net.pt2")
        )

    @classmethod
    def tearDownClass(cls):
        cls.tmp.cleanup()
        super().tearDownClass()

    def test_matches_eager_at_two_batch_sizes(self):
        runner = torch._inductor.aoti_load_package(self.package)
        for n in (3, 7):  # neither is the example batch size
            x = torch.randn(n, *IMAGE)
            with torch.no_grad():
                self.assertEqual(runner(x), self.model(x))

    def test_op_runs_through_the_proxy_executor(self):
        # Inductor has no lowering for the op: the package records it as an extern node
        # that the C++ runtime hands back to the dispatcher.
        with zipfile.ZipFile(self.package) as archive:
            (name,) = [n for n in archive.namelist() if n.endswith("wrapper.json")]
            nodes = json.loads(archive.read(name))["nodes"]
        self.assertEqual([node["node"]["target"] for node in nodes], ["persample::group_norm"])

    def test_fresh_process_needs_persample_imported(self):
        inputs, outputs = (os.path.join(self.tmp.name, f) for f in ("x.pt", "y.pt"))
        x = torch.randn(5, *IMAGE)
        torch.save(x, inputs)
        result = subprocess.run(
            [sys.executable, "-c", LOADER, self.package, inputs, outputs],
            capture_output=True,
            text=True,
            timeout=120,
        )
        self.assertEqual(result.returncode, 0, msg=result.stderr)
        self.assertIn(
            "without persample: Could not find schema for persample::group_norm", result.stdout
        )
        with torch.no_grad():
            self.assertEqual(torch.load(outputs), self.model(x))


if __name__ == "__main__":
    run_tests()
