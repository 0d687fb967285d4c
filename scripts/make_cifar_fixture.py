#!/usr/bin/env python3
"""Builds tests/fixtures/cifar10/test_batch.bin: the 20 real CIFAR-10 test images shipped as
PNGs in the PyPI wheel foolbox==3.3.4 (foolbox/data/cifar10_NN_LABEL.png, MIT licence), written in
the CIFAR-10 binary format (per record: 1 label byte, then 1024 R, 1024 G, 1024 B bytes).
Needs Pillow. Usage: make_cifar_fixture.py FOLDER_WITH_THE_PNGS
"""
import glob, os, sys
from PIL import Image

src = sys.argv[1]
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures", "cifar10")
os.makedirs(out, exist_ok=True)
records = []
for path in sorted(glob.glob(os.path.join(src, "cifar10_*.png"))):
    _, idx, label = os.path.basename(path)[:-4].split("_")
    img = Image.open(path).convert("RGB")
    assert img.size == (32, 32)
    r, g, b = img.split()
    records.append(bytes([int(label)]) + r.tobytes() + g.tobytes() + b.tobytes())
assert len(records) == 20
with open(os.path.join(out, "test_batch.bin"), "wb") as f:
    f.write(b"".join(records))
print("labels:", [r[0] for r in records])
print("first pixel RGB of image 0:", records[0][1], records[0][1025], records[0][2049])
