"""Build the carried flashinfer wheel for the GPU box (no nvcc time there): a pruned flashinfer-python 0.7.2
wheel with prebuilt sm_90a fa2 modules (bf16, head_dim 64 and 128) under flashinfer/data/aot/.

Steps (CPU box with nvcc 13.0 and torch cu130 headers; ~11 min per head_dim on 2 cores):
  1. pip download --no-deps flashinfer-python==0.7.2.post1 -d full/
  2. FLASHINFER_CUDA_ARCH_LIST=9.0a FLASHINFER_WORKSPACE_BASE=$PWD/ws python build_flashinfer_modules.py 64 (then 128)
     (the build script below: it JIT-builds the batch prefill/decode modules the backend uses)
  3. python flashinfer_wheel.py full/flashinfer_python-*.whl ../.whl/flashinfer ws/.cache/flashinfer/<ver>/90a/cached_ops
Then carry the wheel (benchmarks/gpu_run.sh installs .gpuwhl/*.whl into /tmp/site).
"""
import glob
import os
import re
import sys
import zipfile

src = sys.argv[1]            # the full wheel
out_dir = sys.argv[2]        # where the pruned wheel goes
cached_ops = sys.argv[3]     # FLASHINFER_WORKSPACE_BASE/.cache/flashinfer/<ver>/90a/cached_ops
drop = re.compile(r"^flashinfer/data/csrc/[^/]+/|^flashinfer/(experimental|moe_ep|fused_moe|kda_kernels|gdn_kernels|cute_dsl|gemm)/.*(?<!\.py)$")
os.makedirs(out_dir, exist_ok=True)
dst = os.path.join(out_dir, os.path.basename(src))
zin = zipfile.ZipFile(src)
with zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as zout:
    for i in zin.infolist():
        if not drop.search(i.filename):
            zout.writestr(i, zin.read(i.filename), compress_type=zipfile.ZIP_DEFLATED, compresslevel=9)
    for so in sorted(glob.glob(os.path.join(cached_ops, "*", "*.so"))):
        name = os.path.basename(os.path.dirname(so))
        assert os.path.basename(so) == name + ".so", so
        zout.write(so, f"flashinfer/data/aot/{name}/{name}.so")
        print("aot:", name, os.path.getsize(so))
print(dst, os.path.getsize(dst))
