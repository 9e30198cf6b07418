"""A step skipped on the GPU stays skipped for parameters on the CPU (parallel.cpu_offload). Skipped without a GPU
(benchmarks/gpu_check.sh runs it there).

The verdict is made on the GPU, behind the step's queued work; the fused AdamW on the CPU must read it only once it
is there. The GPU is kept busy (torch.cuda._sleep) before the verdict is written, so a read that does not wait for
it reads the pinned buffer before the copy lands.
"""

import pytest
import torch

from qwen2_dist.train.trainer import found_inf_on

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_a_verdict_made_on_the_gpu_skips_the_cpu_update():
    weight = torch.nn.Parameter(torch.ones(1024))
    optimizer = torch.optim.AdamW([weight], lr=0.1, fused=True)
    weight.grad = torch.ones_like(weight)
    optimizer.step()  # the moments exist: a skipped step must leave them too
    before = weight.detach().clone(), optimizer.state[weight]["exp_avg"].clone()
    weight.grad = torch.ones_like(weight)
    skip = torch.zeros((), device="cuda")
    torch.cuda._sleep(200_000_000)  # about 0.1 s of GPU time queued ahead of the verdict
    skip.fill_(1.0)
    optimizer.found_inf = found_inf_on(skip, weight.device)
    optimizer.step()
    assert torch.equal(weight.detach(), before[0]) and torch.equal(optimizer.state[weight]["exp_avg"], before[1])
