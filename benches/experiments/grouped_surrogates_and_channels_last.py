# Experiment behind BENCHMARKS.md "Tried on the CPU": the M surrogates of a ConvNetBN meta step
# batched as grouped convolutions vs one after another, and channels-last vs NCHW. Synthetic inputs.
# Usage: python3 grouped_surrogates_and_channels_last.py [DEVICE [M]]  (default: cpu 4)
import sys, time, torch, torch.nn.functional as F
DEV = torch.device(sys.argv[1] if len(sys.argv) > 1 else "cpu")
torch.set_num_threads(2)
torch.manual_seed(0)
if DEV.type == "cuda":
    torch.backends.cudnn.benchmark = True
    torch.set_default_device(DEV)
M, B, K = (int(sys.argv[2]) if len(sys.argv) > 2 else 4), 126, 2
widths = [16, 32, 32, 64, 64]
def init(M):
    ws = []
    cin = 1
    for c in widths:
        ws += [torch.randn(M * c, cin, 3, 3) * 0.1, torch.zeros(M * c), torch.ones(M * c), torch.zeros(M * c)]
        cin = c
    ws += [torch.randn(M, 10, 64) * 0.1, torch.zeros(M, 10)]
    return [w.requires_grad_() for w in ws]
def fwd(ws, x, M):  # x [B, M*1, 32, 32]
    h = x
    for i in range(5):
        w, b, g, be = ws[4 * i: 4 * i + 4]
        h = F.conv2d(h, w, None, 1, 1, 1, M) + b.view(1, -1, 1, 1)
        h = F.batch_norm(h, None, None, g, be, True, 0.1, 1e-5)
        h = F.max_pool2d(F.relu(h), 2, 2)
    h = h.view(h.shape[0], M, 64)
    return torch.einsum("bmf,mof->bmo", h, ws[20]) + ws[21]  # [B, M, 10]
def meta(ws, xs, ys, delta, M):
    w = ws
    total = 0
    for i in range(K + 1):
        x = xs[i]
        if i == 0:
            x = x + F.pad(delta, (0, 0, 0, 0, 0, 0, 0, B - delta.shape[0]))
        z = fwd(w, x, M)
        if i > 0:
            total = total + z[-1, :, 1].sum()
        if i < K:
            ce = sum(F.cross_entropy(z[:-1, m], ys[i][:, m]) for m in range(M))
            gs = torch.autograd.grad(ce, w, create_graph=True)
            w = [a - 0.1 * g for a, g in zip(w, gs)]
    return torch.autograd.grad(total, delta)[0]
xs = [torch.randn(B, M, 32, 32) for _ in range(K + 1)]
ys = [torch.randint(0, 10, (B - 1, M)) for _ in range(K + 1)]
delta = torch.zeros(5, M, 32, 32, requires_grad=True)
def sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()
def timed(f, n=3):
    f(); sync(); ts = []
    for _ in range(n):
        t = time.perf_counter(); f(); sync(); ts.append(time.perf_counter() - t)
    return sorted(ts)[n // 2]
wsM = init(M)
tb = timed(lambda: meta(wsM, xs, ys, delta, M))
ws1 = [init(1) for _ in range(M)]
def seq():
    for m in range(M):
        meta(ws1[m], [x[:, m:m+1] for x in xs], [y[:, m:m+1] for y in ys], delta[:, m:m+1].detach().requires_grad_(), 1)
ts = timed(seq)
print(f"{DEV} batched M={M}: {tb:.3f}s  sequential: {ts:.3f}s  speedup {ts/tb:.2f}")
cl = torch.channels_last
ws1c = [[w.detach().to(memory_format=cl).requires_grad_() if w.dim() == 4 else w for w in ws] for ws in ws1]
def seq_cl():
    for m in range(M):
        meta(ws1c[m], [x[:, m:m+1].contiguous(memory_format=cl) for x in xs], [y[:, m:m+1] for y in ys], delta[:, m:m+1].detach().requires_grad_(), 1)
tc = timed(seq_cl)
print(f"sequential channels-last: {tc:.3f}s  vs {ts:.3f}s")
