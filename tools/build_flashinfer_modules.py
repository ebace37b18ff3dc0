"""JIT-build the bf16 fa2 batch-prefill modules of flashinfer for one head_dim (argv[1]); see flashinfer_wheel.py."""
import sys
import time

import torch
from flashinfer.jit.attention.modules import (
    _gen_batch_prefill_independent_paged_module,
    _gen_batch_prefill_primary_module,
)

hd = int(sys.argv[1])
args = (torch.bfloat16, torch.bfloat16, torch.bfloat16, torch.int32, hd, hd, 0, False, False, False)
for name, spec in [("prefill", _gen_batch_prefill_primary_module("fa2", *args)),
                   ("prefill_paged", _gen_batch_prefill_independent_paged_module("fa2", *args))]:
    t = time.time()
    spec.build(verbose=False)
    print(name, spec.name, f"{time.time()-t:.0f}s", spec.get_library_path(), spec.get_library_path().stat().st_size, flush=True)
