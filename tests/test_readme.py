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


def python_blocks(name="README.md"):
    with open(os.path.join(ROOT, name)) as f:
        return re.findall(r"^```python\n(.*?)^```", f.read(), flags=re.S | re.M)


class TestReadme(unittest.TestCase):
    @unittest.skipUnless(
        all(importlib.util.find_spec(m) for m in ("opacus", "onnx", "onnxscript", "onnxruntime")),
        "the Opacus and ONNX blocks need opacus and the onnx extra",
    )
    def test_python_blocks_run(self):
        blocks = python_blocks()
        self.assertGreaterEqual(len(blocks), 6)
        self._run(blocks, "README.md")

    def test_docs_python_blocks_run(self):
        # Each page's blocks run in order in their own namespace (none hold any today).
        for page in sorted(os.listdir(os.path.join(ROOT, "docs"))):
            if page.endswith(".md"):
                with self.subTest(page=page):
                    self._run(python_blocks(os.path.join("docs", page)), f"docs/{page}")

    def _run(self, blocks, name):
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
                        exec(compile(block, f"{name} block {i}", "exec"), namespace)
            finally:
                os.chdir(cwd)
                del sys.modules[module.__name__]


if __name__ == "__main__":
    unittest.main()
