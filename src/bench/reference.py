"""PyTorch-eager reference of one benchmarked MetaPoison craft step (metapoison bench).

Written the way a PyTorch user would write it: functional networks over a list of weight
tensors, torch.autograd.grad with create_graph=True for the unrolled steps. It reads the inputs
the Rust harness wrote (safetensors, parsed here so that only torch is needed) and answers one
JSON line per command on stdin:

  load PATH   the timed inputs          -> {"loaded": true}
  check PATH  float64 agreement inputs  -> max relative errors of the meta-gradient
  step        one timed step            -> {"seconds": s}
  stats       FLOPs of one step, peak memory
  peak        measured dense matmul FLOP/s of the device
  quit
"""

import json
import resource
import struct
import sys
import time

import torch
import torch.nn.functional as F

DTYPES = {"F32": torch.float32, "F64": torch.float64, "I64": torch.int64, "U8": torch.uint8}


def read_safetensors(path, device):
    with open(path, "rb") as f:
        blob = f.read()
    (n,) = struct.unpack("<Q", blob[:8])
    header = json.loads(blob[8 : 8 + n])
    meta = header.pop("__metadata__", {})
    data = memoryview(blob)[8 + n :]
    out = {}
    for name, h in header.items():
        lo, hi = h["data_offsets"]
        t = torch.frombuffer(bytearray(data[lo:hi]), dtype=DTYPES[h["dtype"]])
        out[name] = t.reshape(h["shape"]).to(device)
    return out, json.loads(meta["bench"])


# --- networks: the weights are consumed in the order the Rust networks create them ---


class Net:
    def __init__(self, kind, classes, width=1):
        self.kind, self.classes, self.width = kind, classes, width

    def forward(self, w, buffers, x, update_stats):
        self.w, self.wi, self.b, self.bi, self.update = w, 0, buffers, 0, update_stats
        if self.kind == "convnet-bn":
            out = self.convnet(x)
        elif self.kind == "resnet20":
            out = self.resnet(x, [16, 32, 64], 3)
        elif self.kind == "resnet18":
            out = self.resnet(x, [64, 128, 256, 512], 2)
        elif self.kind == "vgg11":
            out = self.vgg(x, [64, 0, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0])
        elif self.kind == "vgg13":
            out = self.vgg(x, [64, 64, 0, 128, 128, 0, 256, 256, 0, 512, 512, 0, 512, 512, 0])
        else:
            raise ValueError(self.kind)
        assert self.wi == len(w), "weights left over"
        return out

    def take(self):
        self.wi += 1
        return self.w[self.wi - 1]

    def conv(self, x, stride=1):
        k = self.take()
        return F.conv2d(x, k, None, stride, k.shape[-1] // 2)

    def bn(self, x):
        gamma, beta = self.take(), self.take()
        mean, var = self.b[self.bi], self.b[self.bi + 1]
        self.bi += 2
        if self.update:
            return F.batch_norm(x, mean, var, gamma, beta, True, 0.1, 1e-5)
        return F.batch_norm(x, None, None, gamma, beta, True, 0.1, 1e-5)

    def linear(self, x):
        w, b = self.take(), self.take()
        return F.linear(x, w, b)

    def convnet(self, x):
        for _ in range(5):
            x = self.conv(x)
            x = x + self.take().view(1, -1, 1, 1)
            x = F.max_pool2d(F.relu(self.bn(x)), 2, 2)
        return self.linear(x.flatten(1))

    def block(self, x, out, stride):
        h = F.relu(self.bn(self.conv(x, stride)))
        h = self.bn(self.conv(h))
        if stride != 1 or x.shape[1] != out:
            x = self.bn(self.conv(x, stride))
        return F.relu(h + x)

    def resnet(self, x, widths, blocks):
        h = F.relu(self.bn(self.conv(x)))
        for stage, width in enumerate(widths):
            for b in range(blocks):
                h = self.block(h, width, 2 if stage > 0 and b == 0 else 1)
        return self.linear(h.mean((2, 3)))

    def vgg(self, x, cfg):
        for c in cfg:
            x = F.max_pool2d(x, 2, 2) if c == 0 else F.relu(self.bn(self.conv(x)))
        return self.linear(x.flatten(1))


# --- colour model (ReColor over YUV, as the authors used it) ---

YUV_MIN = [0.0, -0.43601035, -0.61497538]
YUV_MAX = [1.0, 0.43601035, 0.61497538]
RGB_TO_YUV = [
    [0.299, 0.587, 0.114],
    [-0.14714119, -0.28886916, 0.43601035],
    [0.61497538, -0.51496512, -0.10001026],
]


class Recolor:
    def __init__(self, channels, grid, dtype, device):
        self.channels, self.grid = channels, grid
        axes = [torch.linspace(YUV_MIN[c], YUV_MAX[c], grid, dtype=dtype, device=device) for c in range(3)]
        if channels == 3:
            self.identity = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1)
        else:
            self.identity = axes[0]
        self.m = torch.tensor(RGB_TO_YUV, dtype=dtype, device=device)
        self.m_inv = torch.linalg.inv(self.m)
        self.lo = torch.tensor(YUV_MIN, dtype=dtype, device=device).view(1, 3, 1)
        self.hi = torch.tensor(YUV_MAX, dtype=dtype, device=device).view(1, 3, 1)

    def apply(self, images, offsets):
        p, c, h, w = images.shape
        x = images / 255.0
        lut = self.identity.unsqueeze(0) + offsets
        if self.channels == 3:
            yuv = self.m @ x.reshape(p, 3, h * w)
            coords = ((yuv - self.lo) / (self.hi - self.lo) * 2 - 1).transpose(1, 2).reshape(p, 1, 1, h * w, 3)
            out = F.grid_sample(lut.permute(0, 4, 3, 2, 1), coords, "bilinear", "border", True)
            return (self.m_inv @ out.reshape(p, 3, h * w)).reshape(p, c, h, w) * 255.0
        xs = x.reshape(p, 1, h * w, 1) * 2 - 1
        coords = torch.cat([xs, torch.zeros_like(xs)], 3)
        out = F.grid_sample(lut.reshape(p, 1, 1, self.grid), coords, "bilinear", "border", True)
        return out.reshape(p, c, h, w) * 255.0

    def smoothness(self, offsets):
        dims = [1, 2, 3] if self.channels == 3 else [1]
        parts = []
        for d in dims:
            n = offsets.shape[d]
            diff = offsets.narrow(d, 0, n - 1) - offsets.narrow(d, 1, n - 1)
            parts.append((diff * self.grid).square().flatten())
        return torch.cat(parts).mean()

    def project(self, offsets, bound):
        chans = 3 if self.channels == 3 else 1
        out = []
        for ch in range(chans):
            o = offsets[..., ch] if self.channels == 3 else offsets
            i = self.identity[..., ch] if self.channels == 3 else self.identity
            span = YUV_MAX[ch] - YUV_MIN[ch]
            o = o.clamp(-bound * span, bound * span)
            out.append((i + o).clamp(YUV_MIN[ch], YUV_MAX[ch]) - i)
        return torch.stack(out, -1) if self.channels == 3 else out[0]


# --- the step ---


class Step:
    def __init__(self, tensors, meta, device):
        spec = meta["spec"]
        self.spec, self.device = spec, device
        self.net = Net(meta["net"], spec["classes"])
        dtype = torch.float64 if spec["double"] else torch.float32
        self.mean = torch.tensor(meta["norm_mean"], dtype=dtype, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(meta["norm_std"], dtype=dtype, device=device).view(1, -1, 1, 1)
        self.side = meta["norm_side"]
        self.recolor = Recolor(spec["channels"], spec["grid"], dtype, device)
        M, K = spec["ensemble"], spec["unroll_steps"]

        def seq(prefix, m):
            out, i = [], 0
            while f"{prefix}.{m}.{i}" in tensors:
                out.append(tensors[f"{prefix}.{m}.{i}"])
                i += 1
            return out

        # Channels-last as a PyTorch user asks for it: model.to(memory_format=...) on the conv
        # weights, input.contiguous(memory_format=...) on the input.
        self.channels_last = spec.get("reference_channels_last", False)
        layout = lambda w: w.contiguous(memory_format=torch.channels_last) if self.channels_last and w.dim() == 4 else w
        self.weights = [[layout(w).requires_grad_(True) for w in seq("w", m)] for m in range(M)]
        self.buffers = [seq("b", m) for m in range(M)]
        self.batches = [[(tensors[f"x.{m}.{j}"], tensors[f"y.{m}.{j}"]) for j in range(K + 1)] for m in range(M)]
        self.slots = [tensors[f"slots.{m}"] for m in range(M)]
        self.positions = torch.arange(spec["poisons_in_batch"], device=device)
        self.base = tensors["base"]
        self.delta = tensors["delta"].clone().requires_grad_(True)
        self.offsets = tensors["offsets"].clone().requires_grad_(True)
        self.targets = tensors["targets"]
        self.adv = tensors["target_adv"]
        self.adam_m = [torch.zeros_like(self.delta), torch.zeros_like(self.offsets)]
        self.adam_v = [torch.zeros_like(self.delta), torch.zeros_like(self.offsets)]
        self.adam_t = 0
        self.tensors = tensors

    def normalise(self, x):
        h = x.shape[-1]
        if h < self.side:
            top = (self.side - h) // 2
            x = F.pad(x, (top, self.side - h - top, top, self.side - h - top))
        x = (x / 255.0 - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    def logits(self, w, buffers, x, update_stats=False):
        return self.net.forward(w, buffers, self.normalise(x), update_stats)

    def poisons(self, slots):
        recolored = self.recolor.apply(self.base[slots], self.offsets[slots]).clamp(0, 255)
        return recolored + self.delta[slots]

    def cw(self, z):
        z_adv = z.gather(1, self.adv.unsqueeze(1)).squeeze(1)
        best_other = z.scatter(1, self.adv.unsqueeze(1), float("-inf")).amax(1)
        return (best_other - z_adv).clamp_min(-100).mean()

    def meta_gradient(self, m):
        K, lr = self.spec["unroll_steps"], self.spec["inner_lr"]
        batches, buffers = self.batches[m], self.buffers[m]
        first = batches[0][0].index_copy(0, self.positions, self.poisons(self.slots[m]))
        w, total, nt = self.weights[m], 0.0, self.targets.shape[0]
        for i in range(K + 1):
            x, y = (first, batches[0][1]) if i == 0 else batches[i]
            b = x.shape[0]
            z = self.logits(w, buffers, torch.cat([x, self.targets]))
            if i > 0:
                total = total + self.cw(z[b : b + nt])
            if i < K:
                ce = F.cross_entropy(z[:b], y)
                grads = torch.autograd.grad(ce, w, create_graph=True)
                w = [wi - lr * gi for wi, gi in zip(w, grads)]
        adv = total / K
        objective = adv + self.recolor.smoothness(self.offsets)
        g_delta, g_offsets = torch.autograd.grad(objective, [self.delta, self.offsets])
        return adv.detach(), g_delta, g_offsets

    def clean_step(self, m):
        x, y = self.batches[m][0]
        w = self.weights[m]
        ce = F.cross_entropy(self.logits(w, self.buffers[m], x, update_stats=True), y)
        grads = torch.autograd.grad(ce, w)
        with torch.no_grad():
            for wi, gi in zip(w, grads):
                wi.sub_(self.spec["inner_lr"] * gi)

    def step(self):
        g_delta, g_offsets = torch.zeros_like(self.delta), torch.zeros_like(self.offsets)
        for m in range(self.spec["ensemble"]):
            _, gd, go = self.meta_gradient(m)
            g_delta += gd
            g_offsets += go
            self.clean_step(m)
        M = float(self.spec["ensemble"])
        with torch.no_grad():
            self.adam([g_delta / M, g_offsets / M], self.spec["outer_lr"])
            self.project()

    def adam(self, grads, lr, b1=0.9, b2=0.999, eps=1e-8):
        self.adam_t += 1
        bc1, bc2 = 1 - b1**self.adam_t, 1 - b2**self.adam_t
        for i, (p, g) in enumerate(zip([self.delta, self.offsets], grads)):
            self.adam_m[i] = self.adam_m[i] * b1 + g * (1 - b1)
            self.adam_v[i] = self.adam_v[i] * b2 + g.square() * (1 - b2)
            p.sub_((self.adam_m[i] / bc1) / ((self.adam_v[i] / bc2).sqrt() + eps) * lr)

    def project(self):
        self.offsets.copy_(self.recolor.project(self.offsets, self.spec["color_eps"]))
        eps = self.spec["eps"]
        d = self.delta.clamp(-eps, eps)
        recolored = self.recolor.apply(self.base, self.offsets).clamp(0, 255)
        self.delta.copy_((recolored + d).clamp(0, 255) - recolored)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def rel_error(a, b):
    scale = torch.maximum(a.abs().max(), b.abs().max()).clamp_min(1e-30)
    return ((a - b).abs().max() / scale).item()


def peak_flops(device):
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    out = {}
    for tf32 in ([True, False] if device.type == "cuda" else [False]):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a @ b
        sync(device)
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        sync(device)
        out["tf32" if tf32 else "fp32"] = 2 * n**3 * reps / (time.perf_counter() - t)
    torch.backends.cuda.matmul.allow_tf32 = False
    return out


def main():
    device = torch.device(sys.argv[1])
    torch.set_num_threads(int(sys.argv[2]))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(json.dumps({"torch": torch.__version__, "device": name}), flush=True)
    step = None
    for line in sys.stdin:
        cmd, _, arg = line.strip().partition(" ")
        try:
            if cmd == "quit":
                break
            if cmd == "load":
                step = Step(*read_safetensors(arg, device), device)
                answer = {"loaded": True}
            elif cmd == "check":
                tensors, meta = read_safetensors(arg, device)
                s = Step(tensors, meta, device)
                loss, gd, go = s.meta_gradient(0)
                for m in range(1, s.spec["ensemble"]):  # the sum over surrogates
                    l, d, o = s.meta_gradient(m)
                    loss, gd, go = loss + l, gd + d, go + o
                answer = {
                    "loss": loss.item(),
                    "loss_expected": tensors["expected_loss"].item(),
                    "max_rel_error_delta": rel_error(gd, tensors["expected_g_delta"]),
                    "max_rel_error_grid": rel_error(go, tensors["expected_g_offsets"]),
                }
            elif cmd == "step":
                sync(device)
                t = time.perf_counter()
                step.step()
                sync(device)
                answer = {"seconds": time.perf_counter() - t}
            elif cmd == "stats":
                from torch.utils.flop_counter import FlopCounterMode

                counter = FlopCounterMode(display=False)
                with counter:
                    step.step()
                sync(device)
                answer = {"flops_per_step": counter.get_total_flops()}
                if device.type == "cuda":
                    answer["peak_allocated_bytes"] = torch.cuda.max_memory_allocated(device)
                    answer["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(device)
                answer["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            elif cmd == "peak":
                answer = peak_flops(device)
            else:
                answer = {"error": f"unknown command {cmd!r}"}
        except Exception as e:  # report, keep the protocol alive
            answer = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
