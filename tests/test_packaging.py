"""The wheel: ops/ and meta/ land inside the persample package, nothing generic at the top."""

import os
import subprocess
import sys
import tempfile
import unittest
import zipfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class TestWheel(unittest.TestCase):
    def test_layout(self):
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run(
                # An isolated build, as pip does for users: setuptools comes from the index.
                [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", tmp, ROOT],
                check=True, capture_output=True,
            )
            (wheel,) = [f for f in os.listdir(tmp) if f.endswith(".whl")]
            names = zipfile.ZipFile(os.path.join(tmp, wheel)).namelist()
        top = {n.split("/")[0] for n in names}
        self.assertEqual({t for t in top if not t.endswith(".dist-info")}, {"persample"})
        for module in ("__init__", "nn", "grad_sample", "opacus", "bench/__init__", "bench/demo", "__main__",
                       "ops/__init__", "ops/library", "ops/family", "ops/group_norm/cpu",
                       "ops/group_norm/cuda", "ops/row_norm/kernels", "ops/row_norm/triton_launch",
                       "ops/shared/backends", "meta/__init__", "meta/group_norm", "meta/row_norm"):
            self.assertIn(f"persample/{module}.py", names)


if __name__ == "__main__":
    unittest.main()
