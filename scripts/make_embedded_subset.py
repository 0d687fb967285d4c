#!/usr/bin/env python3
"""Builds assets/fashion-mnist-subset/ from the Debian package dataset-fashion-mnist.

Takes, for each class, the first PER_CLASS_TRAIN training and PER_CLASS_TEST test images in the
official order, keeps them in that order (so classes stay interleaved as in the original files),
and writes gzipped IDX files plus the original indices, one per line. Standard library only.
Run again to reproduce the committed files byte for byte (gzip mtime fixed at 0).
"""
import gzip, os, struct, sys

SRC = "/usr/share/datasets/fashion-mnist"
PER_CLASS_TRAIN, PER_CLASS_TEST = 1000, 200
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "assets", "fashion-mnist-subset")

def read_idx(path):
    data = gzip.open(path).read()
    magic, = struct.unpack(">I", data[:4])
    ndim = magic & 0xFF
    dims = struct.unpack(">" + "I" * ndim, data[4:4 + 4 * ndim])
    return dims, data[4 + 4 * ndim:]

def write_gz(path, payload):
    with open(path, "wb") as raw:
        with gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, compresslevel=9) as f:
            f.write(payload)

def subset(prefix, per_class, out_prefix):
    (n, h, w), pixels = read_idx(f"{SRC}/{prefix}-images-idx3-ubyte.gz")
    (n2,), labels = read_idx(f"{SRC}/{prefix}-labels-idx1-ubyte.gz")
    assert n == n2
    taken, counts = [], [0] * 10
    for i, y in enumerate(labels):
        if counts[y] < per_class:
            counts[y] += 1
            taken.append(i)
    assert all(c == per_class for c in counts), counts
    size = h * w
    imgs = b"".join(pixels[i * size:(i + 1) * size] for i in taken)
    labs = bytes(labels[i] for i in taken)
    write_gz(f"{OUT}/{out_prefix}-images-idx3-ubyte.gz", struct.pack(">IIII", 0x803, len(taken), h, w) + imgs)
    write_gz(f"{OUT}/{out_prefix}-labels-idx1-ubyte.gz", struct.pack(">II", 0x801, len(taken)) + labs)
    with open(f"{OUT}/{out_prefix}-indices.txt", "w") as f:
        f.write("\n".join(map(str, taken)) + "\n")
    print(f"{out_prefix}: {len(taken)} images, original indices {taken[0]}..{taken[-1]}")

if __name__ == "__main__":
    if not os.path.isdir(SRC):
        sys.exit(f"{SRC} missing: apt-get install dataset-fashion-mnist")
    os.makedirs(OUT, exist_ok=True)
    subset("train", PER_CLASS_TRAIN, "train")
    subset("t10k", PER_CLASS_TEST, "test")
