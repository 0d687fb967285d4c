#!/usr/bin/env python3
"""Builds tests/fixtures/cifar10-py/ from tests/fixtures/cifar10/test_batch.bin (20 real CIFAR-10
test images): the same images as the python version of CIFAR-10 stores them.

- test_batch: all 20 images as the official cifar-10-batches-py files are written, by Python 2's
  cPickle at protocol 2 with numpy 1.x: Python 2 strings (SHORT_BINSTRING / BINSTRING, hence
  `pickle.load(f, encoding="bytes")`), the array as numpy.core.multiarray._reconstruct plus a
  BUILD state, labels and file names as lists appended in one batch. Python 2 is not available
  here, so the opcodes are written out below; the script then checks that Python 3's pickle
  reads the file back to the same array and labels.
- py3-proto2, py3-proto4, py3-proto5: the first 3 images re-pickled by this Python with numpy
  (protocol 2 spells bytes as _codecs.encode, 4 uses BINBYTES and STACK_GLOBAL, 5 numpy's
  _frombuffer with an in-band buffer); proto2 has str keys, the others bytes keys.

Needs numpy. Usage: .venv/bin/python scripts/make_cifar_py_fixture.py
"""
import os
import pickle
import struct

import numpy as np

root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests", "fixtures")
raw = open(os.path.join(root, "cifar10", "test_batch.bin"), "rb").read()
records = [raw[i : i + 3073] for i in range(0, len(raw), 3073)]
labels = [r[0] for r in records]
data = b"".join(r[1:] for r in records)
names = [b"fixture_%02d.png" % i for i in range(len(records))]
out = os.path.join(root, "cifar10-py")
os.makedirs(out, exist_ok=True)


class Py2Pickler:
    """Writes protocol-2 opcodes the way cPickle does, memoising each object with BINPUT."""

    def __init__(self):
        self.b = bytearray(b"\x80\x02")
        self.memo = 0

    def put(self):
        self.memo += 1
        self.b += b"q" + bytes([self.memo]) if self.memo < 256 else b"r" + struct.pack("<I", self.memo)

    def int(self, v):
        if 0 <= v < 256:
            self.b += b"K" + bytes([v])
        elif 0 <= v < 65536:
            self.b += b"M" + struct.pack("<H", v)
        else:
            self.b += b"J" + struct.pack("<i", v)

    def str(self, s):
        self.b += (b"U" + bytes([len(s)]) if len(s) < 256 else b"T" + struct.pack("<i", len(s))) + s
        self.put()

    def glob(self, module, name):
        self.b += b"c" + module + b"\n" + name + b"\n"
        self.put()


p = Py2Pickler()
p.b += b"}"
p.put()
p.b += b"("
# 'data': _reconstruct(ndarray, (0,), 'b') then BUILD (1, (N, 3072), dtype('uint8'), False, bytes)
p.str(b"data")
p.glob(b"numpy.core.multiarray", b"_reconstruct")
p.glob(b"numpy", b"ndarray")
p.int(0)
p.b += b"\x85"
p.put()
p.str(b"b")
p.b += b"\x87"
p.put()
p.b += b"R"
p.put()
p.b += b"("
p.int(1)
p.int(len(records))
p.int(3072)
p.b += b"\x86"
p.put()
p.glob(b"numpy", b"dtype")
p.str(b"u1")
p.int(0)
p.int(1)
p.b += b"\x87"
p.put()
p.b += b"R"
p.put()
p.b += b"("
p.int(3)
p.str(b"|")
p.b += b"NNN"
p.int(-1)
p.int(-1)
p.int(0)
p.b += b"t"
p.put()
p.b += b"b"
p.b += b"\x89"
p.str(data)
p.b += b"t"
p.put()
p.b += b"b"
# 'labels': a list, 'batch_label': a string, 'filenames': a list of strings
p.str(b"labels")
p.b += b"]"
p.put()
p.b += b"("
for y in labels:
    p.int(y)
p.b += b"e"
p.str(b"batch_label")
p.str(b"testing batch 1 of 1")
p.str(b"filenames")
p.b += b"]"
p.put()
p.b += b"("
for n in names:
    p.str(n)
p.b += b"e"
p.b += b"u."
with open(os.path.join(out, "test_batch"), "wb") as f:
    f.write(p.b)

back = pickle.loads(bytes(p.b), encoding="bytes")
assert back[b"labels"] == labels
assert back[b"data"].dtype == np.uint8 and back[b"data"].shape == (len(records), 3072)
assert back[b"data"].tobytes() == data
assert back[b"filenames"] == names

array = np.frombuffer(data, dtype=np.uint8).reshape(-1, 3072)[:3].copy()
for protocol, key in [(2, str), (4, bytes), (5, bytes)]:
    k = (lambda s: s) if key is str else (lambda s: s.encode())
    obj = {k("batch_label"): k("part"), k("labels"): labels[:3], k("data"): array}
    blob = pickle.dumps(obj, protocol=protocol)
    assert pickle.loads(blob)[k("data")].tobytes() == data[: 3 * 3072]
    with open(os.path.join(out, "py3-proto%d" % protocol), "wb") as f:
        f.write(blob)
print("labels:", labels)
print("wrote", sorted(os.listdir(out)))
