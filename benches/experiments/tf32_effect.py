# Experiment behind BENCHMARKS.md's GPU profile: does the benchmarked step (the PyTorch
# reference on inputs saved by `metapoison bench --save-inputs`) speed up with TF32 convolutions,
# or with bfloat16 autocast (not the same maths; only to see what bounds the step)?
# Usage: python3 tf32_effect.py INPUTS.safetensors
import os, sys, time, torch
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "src", "bench"))
import reference  # noqa: E402

dev = torch.device("cuda")
torch.backends.cudnn.benchmark = True
step = reference.Step(*reference.read_safetensors(sys.argv[1], dev), dev)
print("cudnn.allow_tf32 default:", torch.backends.cudnn.allow_tf32,
      "matmul.allow_tf32 default:", torch.backends.cuda.matmul.allow_tf32)

def timed(setup, n=5):
    setup()
    step.step(); step.step(); torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step.step(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]

def tf32(on):
    def f():
        torch.backends.cudnn.allow_tf32 = on
        torch.backends.cuda.matmul.allow_tf32 = on
    return f

for rnd in range(2):
    a = timed(tf32(True)); b = timed(tf32(False))
    print(f"round {rnd}: TF32 on {a*1e3:.1f} ms, off (IEEE fp32) {b*1e3:.1f} ms")
tf32(True)()
orig = step.step
def bf16_step():
    with torch.autocast("cuda", dtype=torch.bfloat16):
        orig()
step.step = bf16_step
print(f"bf16 autocast: {timed(lambda: None)*1e3:.1f} ms")
