# Experiment behind BENCHMARKS.md "Tried on the CPU": batch norm written out in primitive ops vs
# F.batch_norm, on the default step's inputs (metapoison bench --save-inputs /tmp/bench/in.safetensors).
# Run from the repository root with .venv/bin/python.
import sys, time, torch, torch.nn.functional as F
sys.path.insert(0, "src/bench")
import reference as R
torch.set_num_threads(2)
dev = torch.device("cpu")
def manual_bn(self, x):
    gamma, beta = self.take(), self.take()
    mean, var = self.b[self.bi], self.b[self.bi + 1]
    self.bi += 2
    if self.update:
        return F.batch_norm(x, mean, var, gamma, beta, True, 0.1, 1e-5)
    m = x.mean((0, 2, 3), keepdim=True)
    v = (x - m).square().mean((0, 2, 3), keepdim=True)
    return (x - m) * torch.rsqrt(v + 1e-5) * gamma.view(1, -1, 1, 1) + beta.view(1, -1, 1, 1)
def timeit(step, n=3):
    step.step()
    ts = []
    for _ in range(n):
        t = time.perf_counter(); step.step(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]
s1 = R.Step(*R.read_safetensors("/tmp/bench/in.safetensors", dev), dev)
base = timeit(s1)
orig = R.Net.bn
R.Net.bn = manual_bn
s2 = R.Step(*R.read_safetensors("/tmp/bench/in.safetensors", dev), dev)
man = timeit(s2)
R.Net.bn = orig
s3 = R.Step(*R.read_safetensors("/tmp/bench/in.safetensors", dev), dev)
base2 = timeit(s3)
print(f"native bn {base:.3f}s / {base2:.3f}s, manual bn {man:.3f}s")
# same maths? compare gradients on float32 inputs
t, m = R.read_safetensors("/tmp/bench/in.safetensors", dev)
a = R.Step(t, m, dev); l1, g1, o1 = a.meta_gradient(0)
R.Net.bn = manual_bn
t, m = R.read_safetensors("/tmp/bench/in.safetensors", dev)
b = R.Step(t, m, dev); l2, g2, o2 = b.meta_gradient(0)
print("rel diff", ((g1 - g2).abs().max() / g1.abs().max()).item(), l1.item(), l2.item())
