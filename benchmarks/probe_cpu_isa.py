"""Which kernels OpenVINO's CPU plugin and PyTorch pick, to check that an ISA limit set in the environment is honoured.

Compiles a small graph (a MatMul with fp32 weights and one with INT4 asymmetric group-64 weights in the decompression
pattern NNCF writes: u4 codes -> f16 -> minus zero point -> times f16 scale -> reshape -> f32 -> MatMul) and prints the
`primitiveType` of every node of the runtime model (e.g. `brgemm_avx512` or `jit_avx2`), plus PyTorch's
`torch.backends.cpu.get_cpu_capability()`. Run it twice, e.g. with `ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2`
and without, and compare. `--ov-config KEY=VALUE` adds compile properties. Writes JSON (with the CPU) to `--output`.
"""

from __future__ import annotations

import argparse
import os

import numpy as np


def _graph(tokens: int, hidden: int, group: int):
    import openvino as ov
    import openvino.opset13 as ops

    rng = np.random.default_rng(0)
    x = ops.parameter([-1, tokens, hidden], ov.Type.f32, name="x")
    w = ops.constant(rng.standard_normal((hidden, hidden), dtype=np.float32))
    fp32 = ops.matmul(x, w, False, True)
    groups = hidden // group
    codes = ops.constant(ov.Tensor(ov.Type.u4, ov.Shape([hidden, groups, group])))
    zero = ops.constant(ov.Tensor(ov.Type.u4, ov.Shape([hidden, groups, 1])))
    scale = ops.constant(rng.random((hidden, groups, 1), dtype=np.float32).astype(np.float16))
    weight = ops.multiply(ops.subtract(ops.convert(codes, "f16"), ops.convert(zero, "f16")), scale)
    weight = ops.convert(ops.reshape(weight, [hidden, hidden], False), "f32")
    int4 = ops.matmul(fp32, weight, False, True)
    return ov.Model([ops.result(int4)], [x], "probe")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--ov-config", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--output")
    args = parser.parse_args()
    import openvino as ov
    import torch

    config = dict(item.split("=", 1) for item in args.ov_config)
    core = ov.Core()
    compiled = core.compile_model(_graph(args.tokens, args.hidden, 64), "CPU", config)
    compiled([np.ones((2, args.tokens, args.hidden), np.float32)])
    kernels = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        info = op.get_rt_info()
        layer = info["layerType"].astype(str) if "layerType" in info else op.get_type_name()
        primitive = info["primitiveType"].astype(str) if "primitiveType" in info else "-"
        if layer not in ("Parameter", "Result", "Const", "Constant"):
            kernels[op.get_friendly_name()] = f"{layer}: {primitive}"
    result = {
        "env": {k: os.environ.get(k) for k in ("ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ATEN_CPU_CAPABILITY")},
        "ov_config": config,
        "openvino_kernels": kernels,
        "inference_precision": str(compiled.get_property("INFERENCE_PRECISION_HINT")),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
    }
    for name, kernel in kernels.items():
        print(f"{name:<40}{kernel}")
    precision, capability = result["inference_precision"], result["torch_cpu_capability"]
    print(f"inference precision: {precision}; torch CPU capability: {capability}")
    if args.output:
        from common import write_result

        write_result(args.output, {"benchmark": "probe_cpu_isa", **result})


if __name__ == "__main__":
    main()
