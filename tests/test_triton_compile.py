"""The Triton kernels compile for the H200 (sm_90) as the launch code really launches
them, without a GPU, and the machine code is what the occupancy plan assumes.

tests/test_triton.py runs the kernels in triton's interpreter, which executes their
Python and so misses what only the compiler decides: vector width, registers, spills.
tests/triton_aot.py captures the launches that ops/group_norm/triton_launch.py makes at the
benchmark shapes (fp32 and bf16, contiguous and channels_last, the tile and split
plans) and those that ops/row_norm/triton_launch.py makes at transformer shapes (layer_norm
and rms_norm, rows held in registers and swept), and compiles each, in a fresh process
without ``TRITON_INTERPRET`` (under it, triton decorates functions for the interpreter,
not the compiler). This test asserts, for every compiled kernel:

- no local memory and no stack frame (nothing spilled);
- registers for at least two programs per SM (64K registers an SM);
- 16- or 8-byte global loads in every kernel that streams a tensor (all but the
  merge kernels, which read a few statistics), in both layouts.

scripts/test.sh runs it under each tested torch, torch 2.11's triton 3.6 (the GPU
image's) included.
"""

import importlib.util
import json
import os
import subprocess
import sys
import unittest

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
REGISTERS_PER_SM = 65536
MERGES = {"forward_merge", "backward_merge"}
ROW_KERNELS = {"forward_rows", "backward_rows", "forward_swept", "backward_swept", "param_merge"}


@unittest.skipIf(importlib.util.find_spec("triton") is None, "triton is not installed (pip install triton)")
@unittest.skipIf(torch.cuda.is_available(), "on a GPU, tests/test_triton.py compiles and runs them")
class TestCompiledForSm90(unittest.TestCase):
    @classmethod
    def setUpClass(cls):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        # Elsewhere than the checkout, whose persample/ (without ops/) -P keeps off the path.
        result = subprocess.run([sys.executable, "-P", os.path.join(HERE, "triton_aot.py")], env=env,
                                capture_output=True, text=True, cwd=os.path.dirname(HERE) + "/..")
        if result.returncode:
            raise AssertionError(f"tests/triton_aot.py failed:\n{result.stderr[-4000:]}")
        cls.rows = [json.loads(line) for line in result.stdout.splitlines()]

    def label(self, row):
        return f"{row['kernel']} {row['shape']} {row['dtype']} {row['layout']} {row['constexprs']}"

    def test_every_plan_kind_compiled(self):
        kernels = {row["kernel"] for row in self.rows if row["op"] == "group_norm"}
        self.assertEqual(kernels, {"forward_tile", "backward_tile", "forward_partial", "forward_merge",
                                   "forward_normalize", "backward_partial", "backward_merge",
                                   "backward_grad_input"})
        plans = {(row["constexprs"].get("SINGLE"), row["constexprs"].get("C_BLOCKS", 1) > 1)
                 for row in self.rows if row["kernel"] == "backward_tile"}
        self.assertIn((True, False), plans)  # a block held in registers
        self.assertIn((False, False), plans)  # a block swept

    def test_every_row_norm_kernel_compiled(self):
        rows = [row for row in self.rows if row["op"] == "row_norm"]
        self.assertEqual({row["kernel"] for row in rows}, ROW_KERNELS)
        for kernel in ("forward_rows", "backward_rows"):  # both dtypes, both ops
            self.assertEqual({(row["dtype"], row["layout"]) for row in rows if row["kernel"] == kernel},
                             {(dt, op) for dt in ("float32", "bfloat16") for op in ("layer_norm", "rms_norm")})

    def test_nothing_spills(self):
        for row in self.rows:
            with self.subTest(self.label(row)):
                self.assertEqual((row["local"], row["stack"]), (0, 0))

    def test_two_programs_fit_an_sm(self):
        for row in self.rows:
            with self.subTest(self.label(row)):
                self.assertLessEqual(2 * row["reg"] * row["num_warps"] * 32, REGISTERS_PER_SM)

    def test_streaming_kernels_load_vectors(self):
        for row in self.rows:
            if row["kernel"] in MERGES:
                continue
            with self.subTest(self.label(row)):
                wide = row["memory"].get("ld.v4", 0) + row["memory"].get("ld.v2", 0)
                self.assertGreater(wide, 0, row["memory"])


if __name__ == "__main__":
    unittest.main()
