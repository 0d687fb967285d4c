# The K-step unrolled meta-gradient the CPU experiments time (imported by onednn_bf16.py and
# relu_second_derivative.py): K plain SGD steps on xs[0..K-1] with the graph kept, delta added
# to the first rows of batch 0, the target (each batch's last row) pushed toward class 1 after
# every step, differentiated into delta.
import torch
import torch.nn.functional as F


def meta_gradient(forward, ws, xs, ys, delta, k, lr=0.1):
    w, total = ws, 0
    for i in range(k + 1):
        x = xs[i]
        if i == 0:
            x = x + F.pad(delta, (0, 0, 0, 0, 0, 0, 0, x.shape[0] - delta.shape[0]))
        z = forward(w, x)
        if i > 0:
            total = total + z[-1, 1]
        if i < k:
            g = torch.autograd.grad(F.cross_entropy(z[:-1], ys[i]), w, create_graph=True)
            w = [a - lr * b for a, b in zip(w, g)]
    return torch.autograd.grad(total, delta)[0]
