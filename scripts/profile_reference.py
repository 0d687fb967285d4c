"""Profiles one benchmarked craft step (the PyTorch reference, which runs the same libtorch
kernels as metapoison) and prints where the time goes, by operator.

  metapoison bench --no-reference --reps 1 --save-inputs /tmp/in.safetensors [shape flags]
  .venv/bin/python scripts/profile_reference.py /tmp/in.safetensors [cpu|cuda] [threads]
"""

import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src", "bench"))
import reference  # noqa: E402


def main():
    path = sys.argv[1]
    device = torch.device(sys.argv[2] if len(sys.argv) > 2 else "cpu")
    torch.set_num_threads(int(sys.argv[3]) if len(sys.argv) > 3 else 2)
    step = reference.Step(*reference.read_safetensors(path, device), device)
    step.step()  # warm-up
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        step.step()
        reference.sync(device)
    key = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=key, row_limit=18, max_name_column_width=40))


if __name__ == "__main__":
    main()
