# Experiment behind BENCHMARKS.md "Tried on the CPU". Usage: python3 relu_second_derivative.py
# Does a ReLU whose double backward skips the zero gradient wrt its saved output speed up a
# ResNet-20 K=2 meta step? (libtorch's threshold_backward formula materialises zeros_like.)
import sys, time, torch, torch.nn.functional as F
from unrolled_step import meta_gradient
torch.set_num_threads(1); torch.manual_seed(0)
class ReluGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, g, y):
        ctx.save_for_backward(y)
        return torch.ops.aten.threshold_backward(g, y, 0)
    @staticmethod
    def backward(ctx, gg):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(gg, y, 0), None
class Relu(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = x.clamp_min(0); ctx.save_for_backward(y); return y
    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        return ReluGrad.apply(g, y)
B, K = 131, 2
def conv_w(o, i, k): return (torch.randn(o, i, k, k) * (2.0 / (o * k * k)) ** 0.5)
def init():
    ws = [conv_w(16, 3, 3), torch.ones(16), torch.zeros(16)]
    cin = 16
    for st, w in enumerate([16, 32, 64]):
        for b in range(3):
            s = 2 if st > 0 and b == 0 else 1
            ws += [conv_w(w, cin, 3), torch.ones(w), torch.zeros(w), conv_w(w, w, 3), torch.ones(w), torch.zeros(w)]
            if s != 1 or cin != w: ws += [conv_w(w, cin, 1), torch.ones(w), torch.zeros(w)]
            cin = w
    ws += [torch.randn(10, 64) * 0.1, torch.zeros(10)]
    return [w.requires_grad_() for w in ws]
def fwd(ws, x, relu):
    it = iter(ws)
    def cbr(h, s, k=3):
        w = next(it); g = next(it); b = next(it)
        return F.batch_norm(F.conv2d(h, w, None, s, k // 2), None, None, g, b, True, 0.1, 1e-5)
    h = relu(cbr(x, 1)); cin = 16
    for st, w in enumerate([16, 32, 64]):
        for bl in range(3):
            s = 2 if st > 0 and bl == 0 else 1
            o = relu(cbr(h, s)); o = cbr(o, 1)
            sc = cbr(h, s, 1) if (s != 1 or cin != w) else h
            h = relu(o + sc); cin = w
    h = h.mean((2, 3))
    return F.linear(h, next(it), next(it))
def meta(ws, xs, ys, delta, relu):
    return meta_gradient(lambda w, x: fwd(w, x, relu), ws, xs, ys, delta, K)
ws = init(); xs = [torch.randn(B, 3, 32, 32) for _ in range(K + 1)]; ys = [torch.randint(0, 10, (B - 1,)) for _ in range(K + 1)]
delta = torch.zeros(6, 3, 32, 32, requires_grad=True)
ga = meta(ws, xs, ys, delta, F.relu); gb = meta(ws, xs, ys, delta, Relu.apply)
print("agree", float((ga - gb).abs().max()), float(ga.abs().max()))
for r in range(3):
    for name, relu in [("native", F.relu), ("custom", Relu.apply)]:
        s = time.perf_counter(); meta(ws, xs, ys, delta, relu); print(name, round(time.perf_counter() - s, 3), flush=True)
