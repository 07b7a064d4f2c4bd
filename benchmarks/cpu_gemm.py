"""Large CPU products: `decoder.matmul` on oneDNN's gemm (`cpu_kernels.gemm`), in bfloat16 on AMX tiles
where the CPU has them (`cpu_amx.cc`; its oneDNN column with `LLAVA_NEXT_AMX=0`), beside XLA's product
(`LLAVA_NEXT_ONEDNN=0`) and PyTorch's `@`, same inputs, same process.

    .venv/bin/python benchmarks/cpu_gemm.py [--rows 64 128 256 512 2432] [--shape 1024 4096] [--repeats 15]

Per dtype (float32, bfloat16) and row count: ms per product `[rows, in] @ [in, out]` (median of
--repeats after a warm-up), each jitted alone. Rows below `cpu_kernels.GEMM_MIN_ROWS` (bfloat16 on AMX:
`AMX_MIN_ROWS`) run XLA's product in each of our columns (matmul's choice); the oneDNN and AMX columns
then say "-" (as AMX does for float32, and where the CPU has no AMX tiles).
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from generate_vs_hf import median_seconds  # noqa: E402   (it puts the repository on the path too)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[64, 128, 256, 512, 2432])
    parser.add_argument("--shape", type=int, nargs=2, default=[1024, 4096], metavar=("IN", "OUT"))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    import jax
    import jax.numpy as jnp
    import torch
    from llava_next_jax import cpu_kernels
    from llava_next_jax.modeling import decoder

    rng = np.random.default_rng(0)
    print(f"# [rows, {args.shape[0]}] @ [{args.shape[0]}, {args.shape[1]}], ms per product; "
          f"{jax.device_count()} device(s), torch {torch.__version__} on {torch.get_num_threads()} threads")
    print("| dtype | rows | ours, AMX | ours, oneDNN | ours, XLA | PyTorch |")
    print("|---|---|---|---|---|---|")
    for dtype, torch_dtype in (("float32", torch.float32), ("bfloat16", torch.bfloat16)):
        kernel = rng.standard_normal(args.shape).astype(np.float32) * 0.03
        for rows in args.rows:
            x = rng.standard_normal((rows, args.shape[0])).astype(np.float32)
            xj, kj = jnp.asarray(x, dtype), jnp.asarray(kernel, dtype)
            times = []
            for onednn, amx in (("1", "1"), ("1", "0"), ("0", "0")):
                os.environ["LLAVA_NEXT_ONEDNN"], os.environ["LLAVA_NEXT_AMX"] = onednn, amx  # read when traced
                on = cpu_kernels.gemm_applies(rows, xj.dtype, kj)
                if amx == "1" and not (on and cpu_kernels.amx_applies(xj, kj)) or onednn == "1" and not on:
                    times.append("-")
                    continue
                fn = jax.jit(lambda a, b: decoder.matmul(a, b))
                jax.block_until_ready(fn(xj, kj))
                seconds = median_seconds(lambda: jax.block_until_ready(fn(xj, kj)), args.repeats)
                times.append(f"{seconds * 1e3:.2f}")
            xt, kt = torch.from_numpy(x).to(torch_dtype), torch.from_numpy(kernel).to(torch_dtype)
            torch_ms = median_seconds(lambda: xt @ kt, args.repeats) * 1e3
            print(f"| {dtype} | {rows} | {' | '.join(times)} | {torch_ms:.2f} |", flush=True)
    os.environ.pop("LLAVA_NEXT_ONEDNN")
    os.environ.pop("LLAVA_NEXT_AMX")


if __name__ == "__main__":
    main()
