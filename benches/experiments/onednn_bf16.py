# Experiment behind BENCHMARKS.md "Tried on the CPU": oneDNN computing float32 convolutions and
# matmuls in bfloat16 ("ieee" vs "bf16" fp32 precision) on a K = 2 meta batch of a 5-layer
# conv + batch-norm net shaped like ConvNetBN. Synthetic inputs. Usage: python3 onednn_bf16.py
import sys, time, torch, torch.nn.functional as F
from unrolled_step import meta_gradient
torch.set_num_threads(2); torch.manual_seed(0)
B, K = 126, 2
widths = [16, 32, 32, 64, 64]
def init():
    ws=[]; cin=1
    for c in widths:
        ws += [torch.randn(c, cin, 3, 3)*0.1, torch.zeros(c), torch.ones(c), torch.zeros(c)]; cin=c
    ws += [torch.randn(10, 64)*0.1, torch.zeros(10)]
    return [w.requires_grad_() for w in ws]
def fwd(ws, x):
    h=x
    for i in range(5):
        w,b,g,be = ws[4*i:4*i+4]
        h = F.conv2d(h, w, b, 1, 1)
        h = F.batch_norm(h, None, None, g, be, True, 0.1, 1e-5)
        h = F.relu(h)
        if i < 4: h = F.max_pool2d(h, 2, 2) if i in (1,3) else h
    h = F.adaptive_avg_pool2d(h, 1).flatten(1)
    return F.linear(h, ws[20], ws[21])
def meta(ws, xs, ys, delta):
    return meta_gradient(fwd, ws, xs, ys, delta, K)
ws=init(); xs=[torch.randn(B,1,28,28) for _ in range(K+1)]; ys=[torch.randint(0,10,(B-1,)) for _ in range(K+1)]
delta=torch.zeros(9,1,28,28,requires_grad=True)
def t(mode):
    torch.backends.mkldnn.conv.fp32_precision = mode
    torch.backends.mkldnn.matmul.fp32_precision = mode
    meta(ws,xs,ys,delta)
    ts=[]
    for _ in range(4):
        s=time.perf_counter(); g=meta(ws,xs,ys,delta); ts.append(time.perf_counter()-s)
    return sorted(ts)[1], g
for r in range(2):
    for mode in ["ieee","bf16"] + (["tf32"] if len(sys.argv)>1 else []):
        s,g = t(mode); print(mode, round(s,3), float(g.abs().sum()), flush=True)
