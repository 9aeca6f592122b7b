import torch
from kestrel.kernels.rmsnorm import rms_norm
from kestrel.kernels.silu_and_mul import silu_and_mul
from kestrel.kernels import pdl
x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16); w = torch.ones(4096, device="cuda", dtype=torch.bfloat16)
print("pdl options", pdl.options(x.device))
g = torch.cuda.CUDAGraph()
y = rms_norm(x, w, 1e-5); z = silu_and_mul(torch.cat([y, y], 1)); torch.cuda.synchronize()
with torch.cuda.graph(g):
    y = rms_norm(x, w, 1e-5); z = silu_and_mul(torch.cat([y, y], 1))
g.replay(); torch.cuda.synchronize()
ref = torch.nn.functional.rms_norm(x.float(), (4096,), eps=1e-5)
print("pdl smoke ok", (y.float() - ref).abs().max().item())
