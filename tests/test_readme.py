"""The README's python blocks run as written, in order, in one namespace."""

import importlib.util
import os
import re
import sys
import tempfile
import types
import unittest
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    with open(os.path.join(ROOT, "README.md")) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


class TestReadme(unittest.TestCase):
    @unittest.skipUnless(importlib.util.find_spec("opacus"), "the Opacus block needs opacus")
    def test_python_blocks_run(self):
        blocks = python_blocks()
        self.assertGreaterEqual(len(blocks), 6)
        # A registered module: dynamo looks functions' globals up by module name.
        module = types.ModuleType("readme_blocks")
        sys.modules[module.__name__] = module
        namespace = module.__dict__
        cwd = os.getcwd()
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            os.chdir(tmp)
            try:
                for i, block in enumerate(blocks):
                    with self.subTest(block=i, first_line=block.splitlines()[0]):
                        exec(compile(block, f"README.md block {i}", "exec"), namespace)
            finally:
                os.chdir(cwd)
                del sys.modules[module.__name__]


if __name__ == "__main__":
    unittest.main()
