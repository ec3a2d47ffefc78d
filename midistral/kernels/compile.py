"""Compile every attention kernel ahead of time for real GPUs, without a GPU.

    python -m midistral.kernels.compile --arch sm_80 sm_90

For each kernel (fwd, dq, dkdv), head dim (32, 64, 128) and element size (16-bit, fp32) the launcher's
block configuration is compiled with `triton.compile` for a `GPUTarget`; the PTX is then run through the
ptxas bundled with triton (`-v`) for registers and spill bytes. Prints one line per compile and exits 1 if
any compile fails. fp16 shares bf16's configuration (same tile sizes and instruction shapes), so bf16
stands for both.
"""

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor

if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") == "1":
    raise SystemExit("midistral.kernels.compile: triton was already imported with TRITON_INTERPRET=1")
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
os.environ["TRITON_INTERPRET"] = "0"  # real code generation, not the CPU interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from midistral.kernels import attention as A  # noqa: E402

GROUP = 4  # GQA group used by the reference model (it only changes index arithmetic)
HEAD_DIMS = (32, 64, 128)
DTYPES = {"bf16": 2, "fp32": 4}
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block (A100, H100)


def _signature(kernel: str, dtype: str):
    ptr = "*" + dtype
    fn = {"fwd": A.fwd_kernel, "dq": A.dq_kernel, "dkdv": A.dkdv_kernel}[kernel]
    if kernel == "fwd":
        ptrs = {"Q": ptr, "K": ptr, "V": ptr, "O": ptr, "LSE": "*fp32"}
        scalars = {"scale_log2": "fp32", "N": "i32", "W": "i32", "Hq": "i32"}
    elif kernel == "dq":
        ptrs = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DQ": ptr}
        scalars = {"scale_log2": "fp32", "sm_scale": "fp32", "N": "i32", "W": "i32", "Hq": "i32"}
    else:
        ptrs = {"Q": ptr, "K": ptr, "V": ptr, "DO": ptr, "LSE": "*fp32", "DELTA": "*fp32", "DK": ptr, "DV": ptr}
        scalars = {"scale_log2": "fp32", "sm_scale": "fp32", "N": "i32", "W": "i32", "Hkv": "i32"}
    strides = {s: "i32" for s in ("stride_qb", "stride_qh", "stride_qn", "stride_kb", "stride_kh", "stride_kn")}
    sig = {**ptrs, **scalars, **strides}
    # pointers 16-byte aligned and strides multiples of 16 elements (true for contiguous (B,H,N,D), D >= 16)
    aligned = list(ptrs) + list(strides)
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in aligned}
    return fn, sig, attrs


def compile_one(kernel: str, head_dim: int, dtype: str, arch: int) -> dict:
    cfg = A.kernel_config(kernel, head_dim, DTYPES[dtype], interpret=False, arch=arch)
    fn, sig, attrs = _signature(kernel, dtype)
    consts = dict(GROUP=GROUP, HEAD_DIM=head_dim, BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  PRECISION="ieee" if dtype == "fp32" else "tf32", DOT_FP32=False)
    for c in consts:
        sig[c] = "constexpr"
    row = dict(kernel=kernel, D=head_dim, dtype=dtype, arch=f"sm_{arch}", **cfg)
    t = time.time()
    try:
        src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
        compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32),
                                  options={"num_warps": cfg["num_warps"], "num_stages": cfg["num_stages"]})
    except Exception as e:  # noqa: BLE001 -- report every failure, keep compiling the rest
        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return row
    ptx = compiled.asm["ptx"]
    row["smem"] = compiled.metadata.shared
    row["wgmma"] = "wgmma" in ptx
    row.update(_ptxas(ptx, arch))
    row["seconds"] = time.time() - t
    return row


def _ptxas(ptx: str, arch: int) -> dict:
    """Registers and spill bytes from ptxas -v (CUDA 12.9's ptxas for sm_80; ptxas-blackwell for sm_90a,
    since triton 3.9 emits a PTX version the older ptxas refuses for sm_90a)."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    sm = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        out = ""
        for exe in ("ptxas", "ptxas-blackwell"):
            r = subprocess.run([os.path.join(bindir, exe), f"-arch={sm}", "-v", path, "-o", os.devnull],
                               capture_output=True, text=True)
            out = r.stdout + r.stderr
            if r.returncode == 0:
                break
        else:
            return {"ptxas_error": out.strip().splitlines()[-1] if out.strip() else "ptxas failed"}
    regs = re.search(r"Used (\d+) registers", out)
    stores = re.search(r"(\d+) bytes spill stores", out)
    loads = re.search(r"(\d+) bytes spill loads", out)
    return {"regs": int(regs.group(1)) if regs else -1, "spill_stores": int(stores.group(1)) if stores else 0,
            "spill_loads": int(loads.group(1)) if loads else 0, "ptxas": exe}


def _job(args):
    return compile_one(*args)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--arch", nargs="+", default=["sm_80", "sm_90"], help="sm_80 and/or sm_90")
    ap.add_argument("--head-dims", nargs="+", type=int, default=list(HEAD_DIMS))
    ap.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    ap.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    args = ap.parse_args(argv)
    archs = []
    for a in args.arch:
        m = re.fullmatch(r"sm_(\d+)a?", a)
        if not m or int(m.group(1)) not in SMEM_LIMIT:
            print(f"--arch {a}: expected sm_80 or sm_90", file=sys.stderr)
            return 2
        archs.append(int(m.group(1)))
    jobs = [(k, d, t, a) for a in archs for k in ("fwd", "dq", "dkdv") for d in args.head_dims for t in args.dtypes]
    t0 = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as ex:
            rows = list(ex.map(_job, jobs))
    else:
        rows = [_job(j) for j in jobs]
    print(f"triton {triton.__version__}, GQA group {GROUP}; smem limit sm_80 {SMEM_LIMIT[80]} B, sm_90 {SMEM_LIMIT[90]} B")
    print("| kernel | arch | D | dtype | BLOCK_M x BLOCK_N | warps | stages | regs | spill st/ld (B) | smem (B) | wgmma |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    failed = 0
    for r in rows:
        head = f"| {r['kernel']} | {r['arch']} | {r['D']} | {r['dtype']} | {r['BLOCK_M']}x{r['BLOCK_N']} | {r['num_warps']} | {r['num_stages']} |"
        if "error" in r or "ptxas_error" in r:
            failed += 1
            print(f"{head} FAILED: {r.get('error') or r.get('ptxas_error')} |")
            continue
        over = " (OVER LIMIT)" if r["smem"] > SMEM_LIMIT[int(r["arch"][3:])] else ""
        print(f"{head} {r['regs']} | {r['spill_stores']}/{r['spill_loads']} | {r['smem']}{over} | "
              f"{'yes' if r['wgmma'] else 'no'} |")
    print(f"{len(rows)} compiles, {failed} failed, {time.time() - t0:.1f} s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
