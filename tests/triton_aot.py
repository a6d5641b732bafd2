"""Compile the launches that ops/group_norm/triton_launch.py really makes for an H200 (sm_90),
without a GPU, and report what the machine code does: vector or scalar global memory
access, registers, spills (stack, local memory), shared memory and warps.

The launches are captured, not rebuilt: ``JITFunction.run`` is patched to record its
arguments, and the launch functions run on CPU tensors of the benchmark shapes (empty,
never read). Each distinct launch is then specialised by triton's own binder, as a GPU
launch would be, and compiled by ``triton.compile`` for ``GPUTarget("cuda", 90, 32)``.
Register and spill counts come from the cuobjdump that triton bundles.

Run as a script (``python tests/triton_aot.py``, without ``TRITON_INTERPRET``): it
prints one JSON object per compiled kernel; tests/test_triton_compile.py checks them.
"""

import json
import os
import re
import subprocess
import sys
import tempfile

# Shapes (N, C, H, W, G): the kernel benchmark's four (persample/bench/kernels.py),
# a group larger than a chunk with too few groups to fill the GPU (the split kernels),
# and small groups batched to a program. Not here: groups wider than a chunk with few
# positions (channel blocks, e.g. 4 x 8192 x 2 x 2 with G = 1), which spill (issue 16).
SHAPES = [(128, 128, 64, 64, 32), (256, 256, 32, 32, 32), (64, 512, 32, 32, 32),
          (512, 64, 32, 32, 16), (2, 64, 128, 128, 32), (64, 256, 8, 8, 128)]

# Row norms (layer_norm, rms_norm) as [N, M, D]: transformer shapes, whose rows a program
# holds in registers, and rows wider than that (D = 4096: the swept kernels).
ROW_SHAPES = [(16, 128, 768), (8, 512, 1024), (64, 64, 384), (4, 128, 4096)]


def capture():
    """``[(kernel name, fn, args, kwargs, shape, dtype, layout)]`` of every launch."""
    import torch
    from triton.runtime.jit import JITFunction

    from persample.ops.group_norm import triton_launch

    log = []
    original = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        log.append((self, args, kwargs))

    JITFunction.run = record
    try:
        launches = []
        for shape in SHAPES:
            n, c, h, w, g = shape
            for dtype in (torch.float32, torch.bfloat16):
                for fmt in (torch.contiguous_format, torch.channels_last):
                    x = torch.empty((n, c, h, w), dtype=dtype).contiguous(memory_format=fmt)
                    weight = torch.empty((n, c), dtype=dtype)
                    stats = torch.empty((n, g), dtype=torch.float32)
                    start = len(log)
                    triton_launch.forward(x, g, weight, weight[0], 1e-5)
                    triton_launch.backward(x, x, stats, stats, weight, g, [True, True, True])
                    layout = "channels_last" if fmt == torch.channels_last else "contiguous"
                    for fn, args, kwargs in log[start:]:
                        launches.append((fn.__name__, fn, args, kwargs, shape, str(dtype)[6:], layout))
        launches += _capture_row_norms(log)
        return launches
    finally:
        JITFunction.run = original


def _capture_row_norms(log):
    """The row norms' launches (ops/row_norm/triton_launch.py), ``layout`` naming the op: a
    per-sample weight and a shared bias, every gradient."""
    import torch

    from persample.ops.row_norm import triton_launch as triton_row_norm

    launches = []
    for shape in ROW_SHAPES:
        n, _, d = shape
        for dtype in (torch.float32, torch.bfloat16):
            for rms in (False, True):
                x = torch.empty(shape, dtype=dtype)
                weight = torch.empty((n, d), dtype=dtype)
                stats = torch.empty(shape[:2], dtype=torch.float32)
                start = len(log)
                triton_row_norm.forward(x, weight, None if rms else weight[0], rms, 1e-5)
                triton_row_norm.backward(x, x, None if rms else stats, stats, weight, rms,
                                         [True, True, not rms])
                op = "rms_norm" if rms else "layer_norm"
                for fn, args, kwargs in log[start:]:
                    launches.append((fn.__name__, fn, args, kwargs, shape, str(dtype)[6:], op))
    return launches


def resources(cubin):
    """REG, STACK, SHARED and LOCAL of the kernel in ``cubin`` (bytes), by cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True,
                              check=True).stdout
    return {key.lower(): int(value) for key, value in re.findall(r"(REG|STACK|SHARED|LOCAL):(\d+)", text)}


def memory_ops(ptx):
    """Counts of global loads and stores in the PTX by vector width (1: scalar)."""
    counts = {}
    for op, width in re.findall(r"\b(ld|st)\.global(?:\.[a-z]+)*?(?:\.v(\d))?\.[a-z]\d+", ptx):
        key = f"{op}.v{width or 1}"
        counts[key] = counts.get(key, 0) + 1
    return counts


def compile_all():
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", 90, 32)
    backend = make_backend(target)
    done = {}
    for name, fn, args, kwargs, shape, dtype, layout in capture():
        binder = create_function_from_signature(fn.signature, fn.params, backend)
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound, specialization, options)
        key = (name, str(signature), str(sorted(constexprs.items(), key=str)), str(attrs),
               options.num_warps, options.num_stages)
        if key in done:
            continue
        compiled = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=target,
                                  options=options.__dict__)
        row = {"kernel": name, "op": "row_norm" if layout.endswith("_norm") else "group_norm",
               "shape": shape, "dtype": dtype, "layout": layout,
               "num_warps": options.num_warps, "num_stages": options.num_stages,
               "constexprs": {fn.arg_names[k[0]]: v for k, v in constexprs.items()
                              if len(k) == 1 and isinstance(v, (int, bool))},
               "memory": memory_ops(compiled.asm["ptx"]), **resources(compiled.asm["cubin"])}
        done[key] = row
        print(json.dumps(row), flush=True)
    return list(done.values())


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET") == "1":
        sys.exit("run without TRITON_INTERPRET: the interpreter replaces the compiler")
    compile_all()
