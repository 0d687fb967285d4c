// 2x2 max pooling with stride 2 (no padding, floor mode) on contiguous NCHW CPU tensors, in all
// three directions the meta-gradient takes. Values and derivatives equal libtorch's
// max_pool2d bit for bit: the windows do not overlap, so the first derivative puts gO on each
// window's winner and zero elsewhere, and the second gathers at the winners. libtorch's CPU
// forward walks a general window with index arithmetic per element (20 times a ReLU's time over
// the same tensor, and 21% of a default craft step's operator time in bench --profile); it
// keeps int64 indices, and its backward zero-fills then scatters, with a tensor of zeros as the
// input's adjoint in the double backward. Here the winner of each window is one byte.
//
// Two autograd functions, as in fused_bn.cpp: `MaxPool2x2` whose backward calls
// `MaxPool2x2Backward`, whose own backward is the gather. That one is not differentiable again
// (third derivatives are never taken).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "ffi.h"

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

// The window is scanned in libtorch's order, a later element replacing the maximum when it is
// larger or NaN: ties keep the first, a NaN wins. k says which of the four won (0 top left, 1
// top right, 2 bottom left, 3 bottom right).
template <typename T>
inline __attribute__((always_inline)) void window_max(T a, T b, T d, T e, T& m, int64_t& k) {
  m = a;
  k = 0;
  bool later = (b > m) | (b != b);
  m = later ? b : m;
  k = later ? 1 : k;
  later = (d > m) | (d != d);
  m = later ? d : m;
  k = later ? 2 : k;
  later = (e > m) | (e != e);
  m = later ? e : m;
  k = later ? 3 : k;
}

// The shape of a pooling: input planes [H, W] (N C of them) and outputs [OH, OW].
struct Pooling {
  int64_t planes, H, W, OH, OW;

  Pooling(int64_t planes, int64_t H, int64_t W)
      : planes(planes), H(H), W(W), OH(H / 2), OW(W / 2) {}

  // f(plane) for every plane, split among libtorch's threads, about 16k inputs a task.
  template <typename F>
  void each_plane(const F& f) const {
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
    at::parallel_for(0, planes, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) f(p);
    });
  }
};

// The per-plane loops take restrict pointers and locals: a store through uint8_t* may alias
// anything, which would otherwise reload the shape at every output.

// SSE-width vectors through GCC's vector extensions (SSE2 on any x86-64): a window's four
// comparisons as lane-wise selects. The scalar version's selects compile to branches, which
// on a ReLU's output (half zeros, the rest random) mispredict: 7.1 ms against 1.0 ms for
// [126, 16, 28, 28] on one thread.
template <typename T>
struct Lanes;

template <>
struct Lanes<float> {
  typedef float V __attribute__((vector_size(16)));
  typedef int32_t Mask __attribute__((vector_size(16)));
  typedef uint8_t Bytes __attribute__((vector_size(4)));
  static constexpr int64_t n = 4;
  // The even and the odd elements of lo:hi (a window row's left and right halves).
  static V even(V lo, V hi) { return __builtin_shuffle(lo, hi, Mask{0, 2, 4, 6}); }
  static V odd(V lo, V hi) { return __builtin_shuffle(lo, hi, Mask{1, 3, 5, 7}); }
};

template <>
struct Lanes<double> {
  typedef double V __attribute__((vector_size(16)));
  typedef int64_t Mask __attribute__((vector_size(16)));
  typedef uint8_t Bytes __attribute__((vector_size(2)));
  static constexpr int64_t n = 2;
  static V even(V lo, V hi) { return __builtin_shuffle(lo, hi, Mask{0, 2}); }
  static V odd(V lo, V hi) { return __builtin_shuffle(lo, hi, Mask{1, 3}); }
};

// window_max for the Lanes<T>::n windows side by side whose rows start at r0 and r1 (2 n
// inputs each); writes their maxima to y and winners to win.
template <typename T>
inline __attribute__((always_inline)) void windows_max(const T* r0, const T* r1, T* y,
                                                       uint8_t* win) {
  using L = Lanes<T>;
  typename L::V lo, hi;
  std::memcpy(&lo, r0, sizeof lo);
  std::memcpy(&hi, r0 + L::n, sizeof hi);
  const typename L::V a = L::even(lo, hi), b = L::odd(lo, hi);
  std::memcpy(&lo, r1, sizeof lo);
  std::memcpy(&hi, r1 + L::n, sizeof hi);
  const typename L::V d = L::even(lo, hi), e = L::odd(lo, hi);
  typename L::Mask later = (b > a) | (b != b);
  typename L::V m = later ? b : a;
  typename L::Mask k = later & 1;
  later = (d > m) | (d != d);
  m = later ? d : m;
  k = later ? 2 : k;
  later = (e > m) | (e != e);
  m = later ? e : m;
  k = later ? 3 : k;
  std::memcpy(y, &m, sizeof m);
  const typename L::Bytes k8 = __builtin_convertvector(k, typename L::Bytes);
  std::memcpy(win, &k8, sizeof k8);
}

// Forward: each window's maximum and winner, row by row of outputs, n at a time. A row's last
// partial vector is redone over its last n outputs (rewriting some with the same values);
// rows shorter than n (ConvNetBN's 3 and 1) take the scalar path.
template <typename T>
void pool_plane(const T* __restrict__ x, T* __restrict__ y, uint8_t* __restrict__ win,
                int64_t OH, int64_t OW, int64_t W) {
  constexpr int64_t n = Lanes<T>::n;
  for (int64_t oh = 0; oh < OH; ++oh) {
    const T* r0 = x + 2 * oh * W;
    const T* r1 = r0 + W;
    T* yr = y + oh * OW;
    uint8_t* wr = win + oh * OW;
    if (OW < n) {
      for (int64_t ow = 0; ow < OW; ++ow) {
        T m;
        int64_t k;
        window_max(r0[2 * ow], r0[2 * ow + 1], r1[2 * ow], r1[2 * ow + 1], m, k);
        yr[ow] = m;
        wr[ow] = static_cast<uint8_t>(k);
      }
      continue;
    }
    int64_t ow = 0;
    for (; ow + n <= OW; ow += n) windows_max(r0 + 2 * ow, r1 + 2 * ow, yr + ow, wr + ow);
    if (ow < OW) {
      ow = OW - n;
      windows_max(r0 + 2 * ow, r1 + 2 * ow, yr + ow, wr + ow);
    }
  }
}

// First derivative: gO on each window's winner and zero everywhere else (the rest of each
// window, and the row and column an odd size drops): the plane cleared, then one store an
// output. (Four selected stores an output were twice as slow.)
template <typename T>
void unpool_plane(const T* __restrict__ g, const uint8_t* __restrict__ win, T* __restrict__ gx,
                  int64_t OH, int64_t OW, int64_t H, int64_t W) {
  std::memset(gx, 0, static_cast<size_t>(H * W) * sizeof(T));
  for (int64_t oh = 0; oh < OH; ++oh) {
    for (int64_t ow = 0; ow < OW; ++ow) {
      const uint8_t k = win[oh * OW + ow];
      gx[(2 * oh + (k >> 1)) * W + 2 * ow + (k & 1)] = g[oh * OW + ow];
    }
  }
}

// Second derivative: the adjoint of gx read at each window's winner.
template <typename T>
void gather_plane(const T* __restrict__ ggx, const uint8_t* __restrict__ win,
                  T* __restrict__ ggo, int64_t OH, int64_t OW, int64_t W) {
  for (int64_t oh = 0; oh < OH; ++oh) {
    for (int64_t ow = 0; ow < OW; ++ow) {
      const uint8_t k = win[oh * OW + ow];
      ggo[oh * OW + ow] = ggx[(2 * oh + (k >> 1)) * W + 2 * ow + (k & 1)];
    }
  }
}

template <typename T>
void pool(const Pooling& s, const T* x, T* y, uint8_t* win) {
  const int64_t n = s.OH * s.OW, in = s.H * s.W;
  s.each_plane([&](int64_t plane) {
    pool_plane(x + plane * in, y + plane * n, win + plane * n, s.OH, s.OW, s.W);
  });
}

template <typename T>
void unpool(const Pooling& s, const T* g, const uint8_t* win, T* gx) {
  const int64_t n = s.OH * s.OW, in = s.H * s.W;
  s.each_plane([&](int64_t plane) {
    unpool_plane(g + plane * n, win + plane * n, gx + plane * in, s.OH, s.OW, s.H, s.W);
  });
}

template <typename T>
void gather(const Pooling& s, const T* ggx, const uint8_t* win, T* ggo) {
  const int64_t n = s.OH * s.OW, in = s.H * s.W;
  s.each_plane([&](int64_t plane) {
    gather_plane(ggx + plane * in, win + plane * n, ggo + plane * n, s.OH, s.OW, s.W);
  });
}

Pooling pooling_of(const Tensor& x) {
  return Pooling(x.size(0) * x.size(1), x.size(2), x.size(3));
}

struct MaxPool2x2Backward : public torch::autograd::Function<MaxPool2x2Backward> {
  // gx [N, C, H, W] from gO and the winners.
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& win,
                               int64_t H, int64_t W) {
    RECORD_FUNCTION("metapoison::max_pool_2x2_backward", std::vector<c10::IValue>({grad_out}));
    ctx->saved_data["win"] = win;
    ctx->saved_data["H"] = H;
    ctx->saved_data["W"] = W;
    const Tensor g = grad_out.contiguous();
    const Pooling s(g.size(0) * g.size(1), H, W);
    Tensor gx = at::empty({g.size(0), g.size(1), H, W}, g.options());
    AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "max pool 2x2 backward", [&] {
      unpool(s, g.data_ptr<scalar_t>(), win.data_ptr<uint8_t>(), gx.data_ptr<scalar_t>());
    });
    return {gx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list adjoints) {
    const Tensor win = ctx->saved_data["win"].toTensor();
    const Tensor ggx = adjoints[0].contiguous();
    const Pooling s = pooling_of(ggx);
    Tensor ggo = at::empty(win.sizes(), ggx.options());
    AT_DISPATCH_FLOATING_TYPES(ggx.scalar_type(), "max pool 2x2 double backward", [&] {
      gather(s, ggx.data_ptr<scalar_t>(), win.data_ptr<uint8_t>(), ggo.data_ptr<scalar_t>());
    });
    return {ggo, Tensor(), Tensor(), Tensor()};
  }
};

struct MaxPool2x2 : public torch::autograd::Function<MaxPool2x2> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x) {
    // Named in profiles (bench --profile) beside libtorch's operators.
    RECORD_FUNCTION("metapoison::max_pool_2x2", std::vector<c10::IValue>({x}));
    TORCH_CHECK(x.dim() == 4, "input must be 4-d, got ", x.dim(), "-d");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "input must be float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(x.device().is_cpu(), "the kernel runs on the CPU, got a tensor on ", x.device());
    TORCH_CHECK(x.size(2) >= 2 && x.size(3) >= 2, "input must be at least 2x2, got ",
                x.size(2), "x", x.size(3));
    const Tensor xc = x.contiguous();
    const Pooling s = pooling_of(xc);
    Tensor y = at::empty({x.size(0), x.size(1), s.OH, s.OW}, x.options());
    Tensor win = at::empty(y.sizes(), x.options().dtype(at::kByte));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max pool 2x2", [&] {
      pool(s, xc.data_ptr<scalar_t>(), y.data_ptr<scalar_t>(), win.data_ptr<uint8_t>());
    });
    ctx->saved_data["win"] = win;
    ctx->saved_data["H"] = s.H;
    ctx->saved_data["W"] = s.W;
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto gx = MaxPool2x2Backward::apply(grads[0], ctx->saved_data["win"].toTensor(),
                                        ctx->saved_data["H"].toInt(),
                                        ctx->saved_data["W"].toInt());
    return {gx[0]};
  }
};

}  // namespace

extern "C" {

// max_pool2d(x, 2, 2) of a 4-d float32/float64 CPU tensor; writes the pooled values to *out.
char* mp_max_pool_2x2(const Tensor* x, Tensor** out) {
  try {
    auto y = MaxPool2x2::apply(*x);
    *out = new Tensor(y[0]);
    return nullptr;
  } catch (const std::exception& e) {
    return mp_error_copy(e.what());
  }
}
}
