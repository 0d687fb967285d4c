// 2x2 max pooling with stride 2 (no padding, floor mode) on contiguous NCHW CPU tensors: the
// values and int64 indices libtorch's max_pool2d_with_indices returns, bit for bit, from a loop
// written for this one window. libtorch's CPU kernel walks a general window with per-element
// index arithmetic: it takes 20 times a ReLU's time over the same tensor, and was 21% of a
// default craft step's operator time (bench --profile). Backward is libtorch's own
// max_pool2d_with_indices_backward, recorded by autograd, so the first and second derivatives
// are libtorch's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cmath>
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

// One plane [H, W] into [OH, OW]. `corner[p]` is output p's top-left input within the plane
// (2 oh W + 2 ow): one flat loop over the plane's outputs, whatever the row length
// (ConvNetBN's rows are 14, 7 and 3 outputs long). About twice as fast as libtorch's kernel
// on one thread and on two; explicit 64-byte vectors with the inputs gathered lane by lane were
// no faster.
template <typename T>
inline __attribute__((always_inline)) void pool_plane(const T* __restrict__ x,
                                                      T* __restrict__ y,
                                                      int64_t* __restrict__ idx, int64_t W,
                                                      int64_t outputs,
                                                      const int64_t* __restrict__ corner) {
  for (int64_t p = 0; p < outputs; ++p) {
    const int64_t o = corner[p];
    T m;
    int64_t k;
    window_max(x[o], x[o + 1], x[o + W], x[o + W + 1], m, k);
    y[p] = m;
    idx[p] = o + (k & 1) + (k >> 1) * W;
  }
}

// The entry points, one plane each. On x86-64 each is compiled for AVX-512, AVX2 and the
// baseline, and the loader picks the best the CPU has.
#if defined(__x86_64__) && defined(__GNUC__)
#define MP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MP_CPU_CLONES
#endif

MP_CPU_CLONES void pool_plane_f32(const float* x, float* y, int64_t* idx, int64_t W,
                                  int64_t outputs, const int64_t* corner) {
  pool_plane(x, y, idx, W, outputs, corner);
}

MP_CPU_CLONES void pool_plane_f64(const double* x, double* y, int64_t* idx, int64_t W,
                                  int64_t outputs, const int64_t* corner) {
  pool_plane(x, y, idx, W, outputs, corner);
}

void pool_plane_any(const float* x, float* y, int64_t* idx, int64_t W, int64_t outputs,
                    const int64_t* corner) {
  pool_plane_f32(x, y, idx, W, outputs, corner);
}

void pool_plane_any(const double* x, double* y, int64_t* idx, int64_t W, int64_t outputs,
                    const int64_t* corner) {
  pool_plane_f64(x, y, idx, W, outputs, corner);
}

struct MaxPool2x2 : public torch::autograd::Function<MaxPool2x2> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x) {
    // Named in profiles (bench --profile) beside libtorch's operators.
    RECORD_FUNCTION("metapoison::max_pool_2x2", std::vector<c10::IValue>({x}));
    TORCH_CHECK(x.dim() == 4, "input must be 4-d, got ", x.dim(), "-d");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "input must be float32 or float64, got ", x.scalar_type());
    TORCH_CHECK(x.device().is_cpu(), "the kernel runs on the CPU, got a tensor on ", x.device());
    const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
    TORCH_CHECK(H >= 2 && W >= 2, "input must be at least 2x2, got ", H, "x", W);
    const int64_t OH = H / 2, OW = W / 2;
    const Tensor xc = x.contiguous();
    Tensor y = at::empty({N, C, OH, OW}, x.options());
    Tensor idx = at::empty({N, C, OH, OW}, x.options().dtype(at::kLong));
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "max pool 2x2", [&] {
      const scalar_t* xp = xc.data_ptr<scalar_t>();
      scalar_t* yp = y.data_ptr<scalar_t>();
      int64_t* ip = idx.data_ptr<int64_t>();
      std::vector<int64_t> corner(static_cast<size_t>(OH * OW));
      for (int64_t oh = 0; oh < OH; ++oh) {
        for (int64_t ow = 0; ow < OW; ++ow) corner[oh * OW + ow] = 2 * oh * W + 2 * ow;
      }
      // A grain of about 16k input elements a task.
      const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(1, H * W));
      at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
        for (int64_t p = begin; p < end; ++p) {
          pool_plane_any(xp + p * H * W, yp + p * OH * OW, ip + p * OH * OW, W, OH * OW,
                         corner.data());
        }
      });
    });
    ctx->save_for_backward({x, idx});
    ctx->mark_non_differentiable({idx});
    return {y, idx};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    auto saved = ctx->get_saved_variables();
    // libtorch's own backward, differentiable again (its derivative gathers at the indices).
    Tensor gx = at::max_pool2d_with_indices_backward(grads[0], saved[0], {2, 2}, {2, 2}, {0, 0},
                                                     {1, 1}, false, saved[1]);
    return {gx};
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
