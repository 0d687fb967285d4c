// Training-mode batch norm, optionally followed by a residual add and a ReLU, as one autograd
// function whose forward, backward and double backward are fused CPU kernels (or, for CUDA
// tensors, short chains of ATen operations: namespace `ops`).
//
// Why: MetaPoison backpropagates through the unrolled SGD steps, so every batch norm of every
// unrolled step is differentiated twice. libtorch's double backward of batch norm is a
// composite of some thirty element-wise and reduction kernels over the activations (29% of a
// CPU craft step, BENCHMARKS.md); its statistics loop is scalar; and the ReLU after it costs a
// pass of its own in each direction plus a tensor of zeros in the double backward. The maths
// needs two passes a direction per channel, which is what the kernels below do.
//
// Two autograd functions: `FusedBatchNorm` (y = relu(bn(x) + residual), the ReLU and the
// residual optional) whose backward calls `FusedBatchNormBackward`, so that a backward with
// create_graph records a node whose own backward is the fused double-backward kernel. That
// kernel is not differentiable again (third derivatives are never taken).
//
// Notation, per channel over its n = N*H*W elements: mu, r = 1/sqrt(var + eps) (biased var),
// xh = (x - mu) r, gamma g, s = g r, m = [y > 0] the ReLU's mask (1 without ReLU). The
// gradient reaching the batch norm is gz = m gO. First order:
//   gx = s (gz - mean(gz) - xh mean(gz xh)), ggamma = sum(gz xh), gbeta = sum(gz),
//   gresidual = gz.
// Double backward, given the adjoints A of gx, Gg of ggamma, Gb of gbeta and R of gresidual,
// with m_g = mean(gz), m_gx = mean(gz xh), m_a = mean(A), m_ax = mean(A xh), m_ag = mean(A gz):
//   adjoint of gO:    m (s (A - m_a - xh m_ax) + Gg xh + Gb + R)
//   adjoint of gamma: n r (m_ag - m_g m_a - m_gx m_ax)
//   adjoint of x:     r (v - mean(v) - xh mean(v xh)) - r^2 g xh (m_ag - m_g m_a - m_gx m_ax),
//                     v = (Gg - s m_ax) gz - s m_gx A
// (x reaches the objective through xh, whose Jacobian is r (I - 1/n - xh xh^T / n), and
// through the factor r of gx, whose derivative is -r^2 xh / n. The mask is piecewise constant:
// its derivative is zero almost everywhere, as libtorch's ReLU takes it.)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#include "ffi.h"

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

#define MP_INLINE inline __attribute__((always_inline))

// The NCHW kernels view their tensors as [N, C, HW] (contiguous) and work on one channel at a
// time; the channels-last ones (further down) as [N*HW, C] rows. A null pointer stands for an
// absent input (no residual, no ReLU mask, a zero adjoint).
template <typename T>
struct ForwardArgs {
  const T *x, *residual, *gamma, *beta;
  int64_t N, C, HW;
  double eps;
  bool relu;
  T *y, *mean, *invstd, *var;  // var: biased, for the running statistics
  // Channels-last only: per-chunk partial statistics and the per-channel scale and shift.
  double* partials = nullptr;
  T* coef = nullptr;
};

template <typename T>
struct BackwardArgs {
  const T *go, *x, *mask, *gamma, *mean, *invstd;
  int64_t N, C, HW;
  T *gx, *gresidual, *ggamma, *gbeta;
  double* partials = nullptr;
  T* coef = nullptr;
};

template <typename T>
struct DoubleBackwardArgs {
  const T *x, *go, *mask, *a, *ar, *mean, *invstd, *gamma, *gg_gamma, *gg_beta;
  int64_t N, C, HW;
  T *out_go, *out_x, *out_gamma;
  double* partials = nullptr;
  T* coef = nullptr;
};

// Loads and stores of V, a GCC vector of T (the channels-last kernels' lanes) or T itself.
template <typename T>
struct Lanes {
  typedef T Vector __attribute__((vector_size(64)));
};

template <typename V, typename T>
MP_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
MP_INLINE void store(T* p, const V& v) {
  std::memcpy(p, &v, sizeof(V));
}

// Lane l of v, V being a vector of T or T itself (a single channel).
template <typename T, typename V>
MP_INLINE T lane(const V& v, int64_t l) {
  if constexpr (std::is_same_v<V, T>) {
    return v;
  } else {
    return v[l];
  }
}

template <typename T, typename V>
constexpr int64_t lane_count() {
  return static_cast<int64_t>(sizeof(V) / sizeof(T));
}

// The gradient reaching the batch norm: gO where the ReLU passed its input, else zero. Loaded
// unconditionally, so the compiler selects rather than emitting a masked load.
template <typename V, bool Relu, typename T>
MP_INLINE V masked(const T* mask, const T* go, int64_t at) {
  const V g = load<V>(go + at);
  if constexpr (Relu) {
    const V zero{};
    return load<V>(mask + at) > zero ? g : zero;
  } else {
    return g;
  }
}

// The per-channel maths both layouts share, in double.

// From a channel's mean and biased variance: 1/sqrt(var + eps), and y = x scale + shift.
struct Normalisation {
  double invstd, scale, shift;
};

MP_INLINE Normalisation normalisation(double mu, double var, double eps, double gamma,
                                      double beta) {
  const double r = 1.0 / std::sqrt(var + eps);
  return {r, gamma * r, beta - mu * gamma * r};
}

// gx = s gz + c + xh_coef xh, from the sums of gz and gz xh over the channel's n elements.
struct InputGradient {
  double s, c, xh_coef;
};

MP_INLINE InputGradient input_gradient(double n, double gamma, double r, double s_g,
                                       double s_gx) {
  const double s = gamma * r;
  return {s, -s * s_g / n, -s * s_gx / n};
}

// The double backward's sums over a channel, in this order: gz, gz xh, A, A xh, A gz.
constexpr int kDoubleBackwardSums = 5;

// Adjoint of gO = m (sc A + go_xh xh + go_c + R); adjoint of x = x_gz gz + x_a A + x_c +
// x_xh xh; adjoint of gamma = gamma (formulas in the file header). S is double (one channel,
// the CPU kernels) or a [C] tensor (every channel at once, the ATen chain in `ops`).
template <typename S>
struct DoubleBackwardCoefficients {
  S sc, go_xh, go_c, x_gz, x_a, x_c, x_xh, gamma;
};

template <typename S>
MP_INLINE DoubleBackwardCoefficients<S> double_backward_coefficients(
    double n, const S& r, const S& g, const S& gg_gamma, const S& gg_beta,
    const S (&sums)[kDoubleBackwardSums]) {
  const S m_g = sums[0] / n, m_gx = sums[1] / n, m_a = sums[2] / n, m_ax = sums[3] / n,
          m_ag = sums[4] / n;
  const S sc = g * r;
  const S q = m_ag - m_g * m_a - m_gx * m_ax;
  const S go_xh = gg_gamma - sc * m_ax;
  const S go_c = gg_beta - sc * m_a;
  // v = go_xh gz - sc m_gx A; adjoint of x = r (v - mean(v) - xh mean(v xh)) - r^2 g q xh
  const S v_a = -sc * m_gx;
  const S mean_v = go_xh * m_g + v_a * m_a;
  const S mean_v_xh = go_xh * m_gx + v_a * m_ax;
  return {sc,          go_xh,  go_c, r * go_xh, r * v_a, -r * mean_v,
          -r * mean_v_xh - r * r * g * q, n * r * q};
}

template <typename T, bool Relu, bool Residual>
MP_INLINE void forward_channel(const ForwardArgs<T>& p, int64_t c) {
  const int64_t N = p.N, C = p.C, HW = p.HW;
  const double count = static_cast<double>(N * HW);
  // Two vectorised passes (mean, then centred squares), each row summed in T and the rows in
  // double: libtorch's own statistics loop is scalar.
  double sum = 0;
  for (int64_t i = 0; i < N; ++i) {
    const T* xr = p.x + (i * C + c) * HW;
    T acc = 0;
    for (int64_t j = 0; j < HW; ++j) acc += xr[j];
    sum += acc;
  }
  const double mu = sum / count;
  const T mu_t = static_cast<T>(mu);
  double squares = 0;
  for (int64_t i = 0; i < N; ++i) {
    const T* xr = p.x + (i * C + c) * HW;
    T acc = 0;
    for (int64_t j = 0; j < HW; ++j) {
      const T d = xr[j] - mu_t;
      acc += d * d;
    }
    squares += acc;
  }
  const double var = squares / count;
  const Normalisation nrm = normalisation(mu, var, p.eps, static_cast<double>(p.gamma[c]),
                                          static_cast<double>(p.beta[c]));
  const T scale = static_cast<T>(nrm.scale), shift = static_cast<T>(nrm.shift);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (i * C + c) * HW;
    const T* xr = p.x + base;
    T* yr = p.y + base;
    const T* rr = Residual ? p.residual + base : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < HW; ++j) {
      T v = xr[j] * scale + shift;
      if constexpr (Residual) v += rr[j];
      if constexpr (Relu) v = v > T(0) ? v : T(0);
      yr[j] = v;
    }
  }
  p.mean[c] = mu_t;
  p.invstd[c] = static_cast<T>(nrm.invstd);
  p.var[c] = static_cast<T>(var);
}

template <typename T, bool Relu, bool Residual>
MP_INLINE void backward_channel(const BackwardArgs<T>& p, int64_t c) {
  const int64_t N = p.N, C = p.C, HW = p.HW;
  const T mu = p.mean[c], r = p.invstd[c];
  double s_g = 0, s_gx = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (i * C + c) * HW;
    const T *xr = p.x + base, *gr = p.go + base;
    const T* mr = Relu ? p.mask + base : nullptr;
    T a_g = 0, a_gx = 0;
    for (int64_t j = 0; j < HW; ++j) {
      const T gz = masked<T, Relu>(mr, gr, j);
      a_g += gz;
      a_gx += gz * ((xr[j] - mu) * r);
    }
    s_g += a_g;
    s_gx += a_gx;
  }
  const InputGradient ig = input_gradient(static_cast<double>(N * HW),
                                          static_cast<double>(p.gamma[c]),
                                          static_cast<double>(r), s_g, s_gx);
  const T t_s = static_cast<T>(ig.s), t_c = static_cast<T>(ig.c),
          t_xh = static_cast<T>(ig.xh_coef);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (i * C + c) * HW;
    const T *xr = p.x + base, *gr = p.go + base;
    const T* mr = Relu ? p.mask + base : nullptr;
    T* out = p.gx + base;
    T* res = Residual ? p.gresidual + base : nullptr;
#pragma omp simd
    for (int64_t j = 0; j < HW; ++j) {
      const T gz = masked<T, Relu>(mr, gr, j);
      out[j] = t_s * gz + t_c + t_xh * ((xr[j] - mu) * r);
      if constexpr (Residual) res[j] = gz;
    }
  }
  p.ggamma[c] = static_cast<T>(s_gx);
  p.gbeta[c] = static_cast<T>(s_g);
}

// One pass of sums and one element-wise pass over channel c (formulas in the file header).
template <typename T, bool Relu, bool HasA, bool HasR>
MP_INLINE void double_backward_channel(const DoubleBackwardArgs<T>& p, int64_t c) {
  const int64_t N = p.N, C = p.C, HW = p.HW;
  const double mu = p.mean[c], r = p.invstd[c], g = p.gamma[c];
  const double gg_gamma = p.gg_gamma ? static_cast<double>(p.gg_gamma[c]) : 0.0;
  const double gg_beta = p.gg_beta ? static_cast<double>(p.gg_beta[c]) : 0.0;
  const T mu_t = static_cast<T>(mu), r_t = static_cast<T>(r);
  double s_go = 0, s_go_xh = 0, s_a = 0, s_a_xh = 0, s_a_go = 0;
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (i * C + c) * HW;
    const T *xr = p.x + base, *gr = p.go + base;
    const T* mr = Relu ? p.mask + base : nullptr;
    const T* ar = HasA ? p.a + base : nullptr;
    T t_go = 0, t_go_xh = 0, t_a = 0, t_a_xh = 0, t_a_go = 0;
    for (int64_t j = 0; j < HW; ++j) {
      const T xh = (xr[j] - mu_t) * r_t;
      const T gz = masked<T, Relu>(mr, gr, j);
      t_go += gz;
      t_go_xh += gz * xh;
      if constexpr (HasA) {
        t_a += ar[j];
        t_a_xh += ar[j] * xh;
        t_a_go += ar[j] * gz;
      }
    }
    s_go += t_go;
    s_go_xh += t_go_xh;
    s_a += t_a;
    s_a_xh += t_a_xh;
    s_a_go += t_a_go;
  }
  const double sums[kDoubleBackwardSums] = {s_go, s_go_xh, s_a, s_a_xh, s_a_go};
  const DoubleBackwardCoefficients<double> k = double_backward_coefficients(
      static_cast<double>(N * HW), r, g, gg_gamma, gg_beta, sums);
  p.out_gamma[c] = static_cast<T>(k.gamma);
  const T t_sc = static_cast<T>(k.sc), t_go_xh = static_cast<T>(k.go_xh),
          t_go_c = static_cast<T>(k.go_c), t_rv = static_cast<T>(k.x_gz),
          t_ra = static_cast<T>(k.x_a), t_xc = static_cast<T>(k.x_c),
          t_xx = static_cast<T>(k.x_xh);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (i * C + c) * HW;
    const T *xr = p.x + base, *gr = p.go + base;
    const T* mr = Relu ? p.mask + base : nullptr;
    const T* ar = HasA ? p.a + base : nullptr;
    const T* rr = HasR ? p.ar + base : nullptr;
    T* og = p.out_go + base;
    T* ox = p.out_x + base;
#pragma omp simd
    for (int64_t j = 0; j < HW; ++j) {
      const T xh = (xr[j] - mu_t) * r_t;
      const T gz = masked<T, Relu>(mr, gr, j);
      T adj = t_go_xh * xh + t_go_c;
      T vx = t_rv * gz + t_xc + t_xx * xh;
      if constexpr (HasA) {
        adj += t_sc * ar[j];
        vx += t_ra * ar[j];
      }
      if constexpr (HasR) adj += rr[j];
      if constexpr (Relu) adj = mr[j] > T(0) ? adj : T(0);
      og[j] = adj;
      ox[j] = vx;
    }
  }
}

// Channels-last (NHWC) kernels: the same maths on x viewed as [M, C] rows, M = N*H*W.
//
// The rows are cut into fixed chunks (`Chunks`: the sums then do not depend on the thread
// count) and the threads share out the chunks, so a layer of 16 channels keeps every core busy.
// Within a chunk the channels go a group at a time: a 64-byte vector of them (GCC's vector
// types, so each clone gets whole-register code; loops over lanes were unrolled into scalar
// code), then single channels past the last full group. A group's partial sums and
// coefficients stay in registers while it streams down the chunk's rows, each access a whole
// cache line. Each chunk's sums go to `partials` in double and are added up in chunk order.

struct Chunks {
  int64_t rows, size, count;
  explicit Chunks(int64_t rows)
      : rows(rows),
        size(std::max<int64_t>(128, (rows + 1023) / 1024)),
        count((rows + size - 1) / size) {}
  int64_t begin(int64_t k) const { return k * size; }
  int64_t end(int64_t k) const { return std::min(rows, (k + 1) * size); }
};


// Per chunk and channel: the chunk's mean and sum of squared deviations, for Chan's merge.
template <typename T, typename V>
MP_INLINE void forward_stats_group(const ForwardArgs<T>& p, const Chunks& ch, int64_t k,
                                   int64_t c0) {
  const int64_t C = p.C, b = ch.begin(k), e = ch.end(k);
  V acc{};
  for (int64_t r = b; r < e; ++r) acc += load<V>(p.x + r * C + c0);
  const T rows = static_cast<T>(e - b);
  // Deviations from the chunk's rounded mean, whose own error the first sum corrects.
  const V centre = acc / rows;
  V s1{}, s2{};
  for (int64_t r = b; r < e; ++r) {
    const V d = load<V>(p.x + r * C + c0) - centre;
    s1 += d;
    s2 += d * d;
  }
  double* mean = p.partials + (2 * k) * C;
  double* m2 = mean + C;
  for (int64_t l = 0; l < lane_count<T, V>(); ++l) {
    const double d1 = lane<T>(s1, l), n = static_cast<double>(e - b);
    mean[c0 + l] = static_cast<double>(lane<T>(centre, l)) + d1 / n;
    m2[c0 + l] = static_cast<double>(lane<T>(s2, l)) - d1 * d1 / n;
  }
}

template <typename T, typename V, bool Relu, bool Residual>
MP_INLINE void forward_apply_group(const ForwardArgs<T>& p, const Chunks& ch, int64_t k,
                                   int64_t c0) {
  const int64_t C = p.C;
  const V scale = load<V>(p.coef + c0), shift = load<V>(p.coef + C + c0), zero{};
  for (int64_t r = ch.begin(k); r < ch.end(k); ++r) {
    const int64_t at = r * C + c0;
    V v = load<V>(p.x + at) * scale + shift;
    if constexpr (Residual) v += load<V>(p.residual + at);
    if constexpr (Relu) v = v > zero ? v : zero;
    store(p.y + at, v);
  }
}

template <typename T, typename V, bool Relu>
MP_INLINE void backward_sums_group(const BackwardArgs<T>& p, const Chunks& ch, int64_t k,
                                   int64_t c0) {
  const int64_t C = p.C;
  const V mu = load<V>(p.mean + c0), r = load<V>(p.invstd + c0);
  V a_g{}, a_gx{};
  for (int64_t row = ch.begin(k); row < ch.end(k); ++row) {
    const int64_t at = row * C + c0;
    const V gz = masked<V, Relu>(p.mask, p.go, at);
    a_g += gz;
    a_gx += gz * ((load<V>(p.x + at) - mu) * r);
  }
  double* s_g = p.partials + (2 * k) * C;
  double* s_gx = s_g + C;
  for (int64_t l = 0; l < lane_count<T, V>(); ++l) {
    s_g[c0 + l] = lane<T>(a_g, l);
    s_gx[c0 + l] = lane<T>(a_gx, l);
  }
}

template <typename T, typename V, bool Relu, bool Residual>
MP_INLINE void backward_apply_group(const BackwardArgs<T>& p, const Chunks& ch, int64_t k,
                                    int64_t c0) {
  const int64_t C = p.C;
  const V mu = load<V>(p.mean + c0), r = load<V>(p.invstd + c0);
  const V t_s = load<V>(p.coef + c0), t_c = load<V>(p.coef + C + c0),
          t_xh = load<V>(p.coef + 2 * C + c0);
  for (int64_t row = ch.begin(k); row < ch.end(k); ++row) {
    const int64_t at = row * C + c0;
    const V gz = masked<V, Relu>(p.mask, p.go, at);
    store(p.gx + at, t_s * gz + t_c + t_xh * ((load<V>(p.x + at) - mu) * r));
    if constexpr (Residual) store(p.gresidual + at, gz);
  }
}

template <typename T, typename V, bool Relu, bool HasA>
MP_INLINE void double_backward_sums_group(const DoubleBackwardArgs<T>& p, const Chunks& ch,
                                          int64_t k, int64_t c0) {
  const int64_t C = p.C;
  const V mu = load<V>(p.mean + c0), r = load<V>(p.invstd + c0);
  V t_go{}, t_go_xh{}, t_a{}, t_a_xh{}, t_a_go{};
  for (int64_t row = ch.begin(k); row < ch.end(k); ++row) {
    const int64_t at = row * C + c0;
    const V xh = (load<V>(p.x + at) - mu) * r;
    const V gz = masked<V, Relu>(p.mask, p.go, at);
    t_go += gz;
    t_go_xh += gz * xh;
    if constexpr (HasA) {
      const V a = load<V>(p.a + at);
      t_a += a;
      t_a_xh += a * xh;
      t_a_go += a * gz;
    }
  }
  double* out = p.partials + (kDoubleBackwardSums * k) * C + c0;
  for (int64_t l = 0; l < lane_count<T, V>(); ++l) {
    out[l] = lane<T>(t_go, l);
    out[C + l] = lane<T>(t_go_xh, l);
    out[2 * C + l] = lane<T>(t_a, l);
    out[3 * C + l] = lane<T>(t_a_xh, l);
    out[4 * C + l] = lane<T>(t_a_go, l);
  }
}

// Rows of `coef` for the double backward's element-wise pass.
enum DoubleBackwardCoef { kSc, kGoXh, kGoC, kXGz, kXA, kXC, kXXh, kDoubleBackwardCoefs };

template <typename T, typename V, bool Relu, bool HasA, bool HasR>
MP_INLINE void double_backward_apply_group(const DoubleBackwardArgs<T>& p, const Chunks& ch,
                                           int64_t k, int64_t c0) {
  const int64_t C = p.C;
  const V mu = load<V>(p.mean + c0), r = load<V>(p.invstd + c0);
  const T* coef = p.coef + c0;
  const V sc = load<V>(coef + kSc * C), go_xh = load<V>(coef + kGoXh * C),
          go_c = load<V>(coef + kGoC * C), x_gz = load<V>(coef + kXGz * C),
          x_a = load<V>(coef + kXA * C), x_c = load<V>(coef + kXC * C),
          x_xh = load<V>(coef + kXXh * C), zero{};
  for (int64_t row = ch.begin(k); row < ch.end(k); ++row) {
    const int64_t at = row * C + c0;
    const V xh = (load<V>(p.x + at) - mu) * r;
    const V gz = masked<V, Relu>(p.mask, p.go, at);
    V adj = go_xh * xh + go_c;
    V vx = x_gz * gz + x_c + x_xh * xh;
    if constexpr (HasA) {
      const V a = load<V>(p.a + at);
      adj += sc * a;
      vx += x_a * a;
    }
    if constexpr (HasR) adj += load<V>(p.ar + at);
    if constexpr (Relu) adj = load<V>(p.mask + at) > zero ? adj : zero;
    store(p.out_go + at, adj);
    store(p.out_x + at, vx);
  }
}

// Each phase as a type whose `group<V>` the chunk loop calls for a vector of channels or one.
#define MP_PHASE(Name, Args, Call, ...)                                                  \
  template <typename T, ##__VA_ARGS__>                                                  \
  struct Name {                                                                          \
    using ArgsT = Args<T>;                                                               \
    template <typename V>                                                                \
    MP_INLINE static void group(const ArgsT& p, const Chunks& ch, int64_t k, int64_t c0) { \
      Call;                                                                              \
    }                                                                                    \
  };

MP_PHASE(ForwardStats, ForwardArgs, (forward_stats_group<T, V>(p, ch, k, c0)))
MP_PHASE(ForwardApply, ForwardArgs,
         (forward_apply_group<T, V, Relu, Residual>(p, ch, k, c0)), bool Relu, bool Residual)
MP_PHASE(BackwardSums, BackwardArgs, (backward_sums_group<T, V, Relu>(p, ch, k, c0)),
         bool Relu)
MP_PHASE(BackwardApply, BackwardArgs,
         (backward_apply_group<T, V, Relu, Residual>(p, ch, k, c0)), bool Relu, bool Residual)
MP_PHASE(DoubleBackwardSums, DoubleBackwardArgs,
         (double_backward_sums_group<T, V, Relu, HasA>(p, ch, k, c0)), bool Relu, bool HasA)
MP_PHASE(DoubleBackwardApply, DoubleBackwardArgs,
         (double_backward_apply_group<T, V, Relu, HasA, HasR>(p, ch, k, c0)), bool Relu,
         bool HasA, bool HasR)
#undef MP_PHASE

template <typename T, typename Phase>
MP_INLINE void chunk_range(const typename Phase::ArgsT& p, int64_t begin, int64_t end) {
  using V = typename Lanes<T>::Vector;
  constexpr int64_t W = lane_count<T, V>();
  const Chunks ch(p.N * p.HW);
  for (int64_t k = begin; k < end; ++k) {
    int64_t c0 = 0;
    for (; c0 + W <= p.C; c0 += W) Phase::template group<V>(p, ch, k, c0);
    for (; c0 < p.C; ++c0) Phase::template group<T>(p, ch, k, c0);
  }
}

// The phases, dispatched from runtime flags; `stage` 0 runs the sums, 1 the element-wise pass.
template <typename T>
MP_INLINE void forward_chunks(const ForwardArgs<T>& p, int stage, int64_t b, int64_t e) {
  const bool residual = p.residual != nullptr;
  if (stage == 0) chunk_range<T, ForwardStats<T>>(p, b, e);
  else if (p.relu && residual) chunk_range<T, ForwardApply<T, true, true>>(p, b, e);
  else if (p.relu) chunk_range<T, ForwardApply<T, true, false>>(p, b, e);
  else if (residual) chunk_range<T, ForwardApply<T, false, true>>(p, b, e);
  else chunk_range<T, ForwardApply<T, false, false>>(p, b, e);
}

template <typename T>
MP_INLINE void backward_chunks(const BackwardArgs<T>& p, int stage, int64_t b, int64_t e) {
  const bool relu = p.mask != nullptr, residual = p.gresidual != nullptr;
  if (stage == 0 && relu) chunk_range<T, BackwardSums<T, true>>(p, b, e);
  else if (stage == 0) chunk_range<T, BackwardSums<T, false>>(p, b, e);
  else if (relu && residual) chunk_range<T, BackwardApply<T, true, true>>(p, b, e);
  else if (relu) chunk_range<T, BackwardApply<T, true, false>>(p, b, e);
  else if (residual) chunk_range<T, BackwardApply<T, false, true>>(p, b, e);
  else chunk_range<T, BackwardApply<T, false, false>>(p, b, e);
}

template <typename T, bool Relu>
MP_INLINE void double_backward_chunks_relu(const DoubleBackwardArgs<T>& p, int stage,
                                           int64_t b, int64_t e) {
  const bool has_a = p.a != nullptr, has_r = p.ar != nullptr;
  if (stage == 0 && has_a) chunk_range<T, DoubleBackwardSums<T, Relu, true>>(p, b, e);
  else if (stage == 0) chunk_range<T, DoubleBackwardSums<T, Relu, false>>(p, b, e);
  else if (has_a && has_r) chunk_range<T, DoubleBackwardApply<T, Relu, true, true>>(p, b, e);
  else if (has_a) chunk_range<T, DoubleBackwardApply<T, Relu, true, false>>(p, b, e);
  else if (has_r) chunk_range<T, DoubleBackwardApply<T, Relu, false, true>>(p, b, e);
  else chunk_range<T, DoubleBackwardApply<T, Relu, false, false>>(p, b, e);
}

template <typename T>
MP_INLINE void double_backward_chunks(const DoubleBackwardArgs<T>& p, int stage, int64_t b,
                                      int64_t e) {
  if (p.mask != nullptr) double_backward_chunks_relu<T, true>(p, stage, b, e);
  else double_backward_chunks_relu<T, false>(p, stage, b, e);
}

// Dispatch from runtime flags to the template instantiations, all inlined into the cloned
// entry points below (a lambda or an out-of-line template would be compiled for the baseline
// instruction set only).
template <typename T, bool Relu, bool Residual>
MP_INLINE void forward_channels(const ForwardArgs<T>& p, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) forward_channel<T, Relu, Residual>(p, c);
}

template <typename T>
MP_INLINE void forward_range(const ForwardArgs<T>& p, int64_t begin, int64_t end) {
  const bool residual = p.residual != nullptr;
  if (p.relu && residual) forward_channels<T, true, true>(p, begin, end);
  else if (p.relu) forward_channels<T, true, false>(p, begin, end);
  else if (residual) forward_channels<T, false, true>(p, begin, end);
  else forward_channels<T, false, false>(p, begin, end);
}

template <typename T, bool Relu, bool Residual>
MP_INLINE void backward_channels(const BackwardArgs<T>& p, int64_t begin, int64_t end) {
  for (int64_t c = begin; c < end; ++c) backward_channel<T, Relu, Residual>(p, c);
}

template <typename T>
MP_INLINE void backward_range(const BackwardArgs<T>& p, int64_t begin, int64_t end) {
  const bool relu = p.mask != nullptr, residual = p.gresidual != nullptr;
  if (relu && residual) backward_channels<T, true, true>(p, begin, end);
  else if (relu) backward_channels<T, true, false>(p, begin, end);
  else if (residual) backward_channels<T, false, true>(p, begin, end);
  else backward_channels<T, false, false>(p, begin, end);
}

template <typename T, bool Relu, bool HasA, bool HasR>
MP_INLINE void double_backward_channels(const DoubleBackwardArgs<T>& p, int64_t begin,
                                        int64_t end) {
  for (int64_t c = begin; c < end; ++c) double_backward_channel<T, Relu, HasA, HasR>(p, c);
}

template <typename T, bool Relu>
MP_INLINE void double_backward_range_relu(const DoubleBackwardArgs<T>& p, int64_t begin,
                                          int64_t end) {
  const bool has_a = p.a != nullptr, has_r = p.ar != nullptr;
  if (has_a && has_r) double_backward_channels<T, Relu, true, true>(p, begin, end);
  else if (has_a) double_backward_channels<T, Relu, true, false>(p, begin, end);
  else if (has_r) double_backward_channels<T, Relu, false, true>(p, begin, end);
  else double_backward_channels<T, Relu, false, false>(p, begin, end);
}

template <typename T>
MP_INLINE void double_backward_range(const DoubleBackwardArgs<T>& p, int64_t begin,
                                     int64_t end) {
  if (p.mask != nullptr) double_backward_range_relu<T, true>(p, begin, end);
  else double_backward_range_relu<T, false>(p, begin, end);
}

// The entry points a thread of at::parallel_for calls for its range of channels. On x86-64
// each is compiled for AVX-512, AVX2 and the baseline, and the loader picks the best the CPU
// has.
#if defined(__x86_64__) && defined(__GNUC__)
#define MP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MP_CPU_CLONES
#endif

// Float32 and float64 entry points name_f32 and name_f64 over `range` (NCHW: a range of
// channels) or, STAGED, `range` with a stage (channels-last: a range of row chunks).
#define MP_ENTRY_POINTS(name, Args, range)                                                  \
  MP_CPU_CLONES void name##_f32(const Args<float>& p, int64_t b, int64_t e) {              \
    range(p, b, e);                                                                         \
  }                                                                                         \
  MP_CPU_CLONES void name##_f64(const Args<double>& p, int64_t b, int64_t e) {             \
    range(p, b, e);                                                                         \
  }
#define MP_STAGED_ENTRY_POINTS(name, Args, range)                                           \
  MP_CPU_CLONES void name##_f32(const Args<float>& p, int stage, int64_t b, int64_t e) {   \
    range(p, stage, b, e);                                                                  \
  }                                                                                         \
  MP_CPU_CLONES void name##_f64(const Args<double>& p, int stage, int64_t b, int64_t e) {  \
    range(p, stage, b, e);                                                                  \
  }

MP_ENTRY_POINTS(forward, ForwardArgs, forward_range)
MP_ENTRY_POINTS(backward, BackwardArgs, backward_range)
MP_ENTRY_POINTS(double_backward, DoubleBackwardArgs, double_backward_range)
MP_STAGED_ENTRY_POINTS(forward_chunks, ForwardArgs, forward_chunks)
MP_STAGED_ENTRY_POINTS(backward_chunks, BackwardArgs, backward_chunks)
MP_STAGED_ENTRY_POINTS(double_backward_chunks, DoubleBackwardArgs, double_backward_chunks)
#undef MP_ENTRY_POINTS
#undef MP_STAGED_ENTRY_POINTS

// Runs a kernel's cloned entry point over the channels, split among libtorch's threads.
template <typename Args>
void run(const Args& p, void (*entry)(const Args&, int64_t, int64_t)) {
  at::parallel_for(0, p.C, 1, [&](int64_t b, int64_t e) { entry(p, b, e); });
}

// Runs one stage of a channels-last kernel over the row chunks, split among the threads.
template <typename Args>
void run_stage(const Args& p, int stage, void (*entry)(const Args&, int, int64_t, int64_t)) {
  const Chunks ch(p.N * p.HW);
  at::parallel_for(0, ch.count, 1, [&](int64_t b, int64_t e) { entry(p, stage, b, e); });
}

void run_stage(const ForwardArgs<float>& p, int stage) { run_stage(p, stage, forward_chunks_f32); }
void run_stage(const ForwardArgs<double>& p, int stage) {
  run_stage(p, stage, forward_chunks_f64);
}
void run_stage(const BackwardArgs<float>& p, int stage) {
  run_stage(p, stage, backward_chunks_f32);
}
void run_stage(const BackwardArgs<double>& p, int stage) {
  run_stage(p, stage, backward_chunks_f64);
}
void run_stage(const DoubleBackwardArgs<float>& p, int stage) {
  run_stage(p, stage, double_backward_chunks_f32);
}
void run_stage(const DoubleBackwardArgs<double>& p, int stage) {
  run_stage(p, stage, double_backward_chunks_f64);
}

void run(const ForwardArgs<float>& p) { run(p, forward_f32); }
void run(const ForwardArgs<double>& p) { run(p, forward_f64); }
void run(const BackwardArgs<float>& p) { run(p, backward_f32); }
void run(const BackwardArgs<double>& p) { run(p, backward_f64); }
void run(const DoubleBackwardArgs<float>& p) { run(p, double_backward_f32); }
void run(const DoubleBackwardArgs<double>& p) { run(p, double_backward_f64); }

// The channels-last directions: the sums stage, `finish` for each channel on its per-chunk
// sums (in chunk order; it writes the channel's results and element-wise coefficients), then
// the element-wise stage. Stage 0 leaves sum j of chunk k and channel c at
// partials[(sums k + j) C + c].
template <typename Args, typename Finish>
void run_channels_last(Args p, int sums, int coefs, Finish finish) {
  using T = std::remove_pointer_t<decltype(p.coef)>;
  const Chunks ch(p.N * p.HW);
  std::vector<double> partials(sums * ch.count * p.C);
  std::vector<T> coef(coefs * p.C);
  p.partials = partials.data();
  p.coef = coef.data();
  run_stage(p, 0);
  for (int64_t c = 0; c < p.C; ++c) finish(p, ch, c);
  run_stage(p, 1);
}

template <typename T>
void run_channels_last(const ForwardArgs<T>& args) {
  run_channels_last(args, 2, 2, [](const ForwardArgs<T>& p, const Chunks& ch, int64_t c) {
    const int64_t C = p.C;
    const double n = static_cast<double>(ch.rows);
    // Chan's merge of the chunks' means and sums of squared deviations.
    double mean = 0;
    for (int64_t k = 0; k < ch.count; ++k)
      mean += p.partials[2 * k * C + c] * static_cast<double>(ch.end(k) - ch.begin(k));
    mean /= n;
    double m2 = 0;
    for (int64_t k = 0; k < ch.count; ++k) {
      const double d = p.partials[2 * k * C + c] - mean;
      m2 += p.partials[(2 * k + 1) * C + c] +
            static_cast<double>(ch.end(k) - ch.begin(k)) * d * d;
    }
    const double var = m2 / n;
    const Normalisation nrm = normalisation(mean, var, p.eps, static_cast<double>(p.gamma[c]),
                                            static_cast<double>(p.beta[c]));
    p.coef[c] = static_cast<T>(nrm.scale);
    p.coef[C + c] = static_cast<T>(nrm.shift);
    p.mean[c] = static_cast<T>(mean);
    p.invstd[c] = static_cast<T>(nrm.invstd);
    p.var[c] = static_cast<T>(var);
  });
}

template <typename T>
void run_channels_last(const BackwardArgs<T>& args) {
  run_channels_last(args, 2, 3, [](const BackwardArgs<T>& p, const Chunks& ch, int64_t c) {
    const int64_t C = p.C;
    double s_g = 0, s_gx = 0;
    for (int64_t k = 0; k < ch.count; ++k) {
      s_g += p.partials[2 * k * C + c];
      s_gx += p.partials[(2 * k + 1) * C + c];
    }
    const InputGradient ig = input_gradient(static_cast<double>(ch.rows),
                                            static_cast<double>(p.gamma[c]),
                                            static_cast<double>(p.invstd[c]), s_g, s_gx);
    p.coef[c] = static_cast<T>(ig.s);
    p.coef[C + c] = static_cast<T>(ig.c);
    p.coef[2 * C + c] = static_cast<T>(ig.xh_coef);
    p.ggamma[c] = static_cast<T>(s_gx);
    p.gbeta[c] = static_cast<T>(s_g);
  });
}

template <typename T>
void run_channels_last(const DoubleBackwardArgs<T>& args) {
  run_channels_last(args, kDoubleBackwardSums, kDoubleBackwardCoefs,
                    [](const DoubleBackwardArgs<T>& p, const Chunks& ch, int64_t c) {
    const int64_t C = p.C;
    double sums[kDoubleBackwardSums] = {};
    for (int64_t k = 0; k < ch.count; ++k)
      for (int j = 0; j < kDoubleBackwardSums; ++j)
        sums[j] += p.partials[(kDoubleBackwardSums * k + j) * C + c];
    const double gg_gamma = p.gg_gamma ? static_cast<double>(p.gg_gamma[c]) : 0.0;
    const double gg_beta = p.gg_beta ? static_cast<double>(p.gg_beta[c]) : 0.0;
    const DoubleBackwardCoefficients<double> q = double_backward_coefficients(
        static_cast<double>(ch.rows), static_cast<double>(p.invstd[c]),
        static_cast<double>(p.gamma[c]), gg_gamma, gg_beta, sums);
    p.out_gamma[c] = static_cast<T>(q.gamma);
    const double row[kDoubleBackwardCoefs] = {q.sc, q.go_xh, q.go_c, q.x_gz,
                                              q.x_a, q.x_c, q.x_xh};
    for (int j = 0; j < kDoubleBackwardCoefs; ++j) p.coef[j * C + c] = static_cast<T>(row[j]);
  });
}

// Either layout's kernels for the args' tensors.
template <typename Args>
void run(const Args& p, bool channels_last) {
  if (channels_last) run_channels_last(p);
  else run(p);
}

// The layout the kernels run x in: channels-last where x is a 4-d NHWC tensor (not also
// contiguous, as when C or H*W is 1: the layouts then coincide), else contiguous NCHW. All
// activation-shaped tensors of a call are brought to x's layout.
at::MemoryFormat layout_for(const Tensor& x) {
  const bool nhwc =
      x.dim() == 4 && !x.is_contiguous() && x.is_contiguous(at::MemoryFormat::ChannelsLast);
  return nhwc ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

bool channels_last(const Tensor& x) {
  return layout_for(x) == at::MemoryFormat::ChannelsLast;
}

// `t`, shaped as x, in x's dtype and layout, or undefined when `t` is.
Tensor activation_like(const Tensor& t, const Tensor& x) {
  if (!t.defined()) return t;
  return t.to(x.scalar_type()).contiguous(layout_for(x));
}

// A per-channel `t` contiguous in x's dtype, or undefined when `t` is.
Tensor channel_vector_like(const Tensor& t, const Tensor& x) {
  if (!t.defined()) return t;
  return t.to(x.scalar_type()).contiguous();
}

template <typename T>
const T* data_or_null(const Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

template <typename T>
T* mutable_or_null(Tensor& t) {
  return t.defined() ? t.data_ptr<T>() : nullptr;
}

// N, C and HW of the [N, C, HW] view of x.
void view_dims(const Tensor& x, int64_t& N, int64_t& C, int64_t& HW) {
  N = x.size(0);
  C = x.size(1);
  HW = N > 0 && C > 0 ? x.numel() / (N * C) : 0;
}

// The same three directions as ATen operations, for tensors the CPU kernels above do not serve
// (CUDA) and, on request, for CPU tensors (tests; bench). Each direction is a few of libtorch's
// own kernels: the reductions ride on native_batch_norm_backward, whose one pass gives a
// channel's sum(dy) and sum(dy xh), and each output is a short chain of broadcast
// multiply-adds. libtorch's double backward of batch norm is some thirty kernels, and the ReLU
// after it adds its own in each direction.
namespace ops {

// A [C] vector viewed to broadcast over x's channel dimension.
Tensor per_channel(const Tensor& v, const Tensor& x) {
  std::vector<int64_t> shape(static_cast<size_t>(x.dim()), 1);
  shape[1] = x.size(1);
  return v.view(shape);
}

// (sum(dy (input - mean) invstd), sum(dy)) per channel, in one pass over dy and input. `ones`
// is a [C] weight of ones: with it the weight gradient is that first sum on every backend,
// whatever each does without a weight.
std::pair<Tensor, Tensor> channel_sums(const Tensor& dy, const Tensor& input, const Tensor& mean,
                                       const Tensor& invstd, const Tensor& ones) {
  auto grads = at::native_batch_norm_backward(dy, input, ones, std::nullopt, std::nullopt, mean,
                                              invstd, /*train=*/true, /*eps=*/0.0,
                                              {false, true, true});
  return {std::get<1>(grads), std::get<2>(grads)};
}

// The gradient reaching the batch norm: gO where the ReLU passed its input (mask undefined:
// no ReLU), else zero.
Tensor masked(const Tensor& go, const Tensor& mask) {
  return mask.defined() ? at::threshold_backward(go, mask, 0) : go;
}

struct Forward {
  Tensor y, mean, invstd;
};

Forward forward(const Tensor& x, const Tensor& gamma, const Tensor& beta, const Tensor& residual,
                const std::optional<Tensor>& running_mean,
                const std::optional<Tensor>& running_var, double momentum, double eps,
                bool relu) {
  // native_batch_norm moves the running statistics as the CPU path does (unbiased variance).
  auto [y, mean, invstd] =
      at::native_batch_norm(x, gamma, beta, running_mean, running_var, true, momentum, eps);
  if (residual.defined()) y.add_(residual);
  if (relu) y.relu_();
  return {y, mean, invstd};
}

// gx, ggamma, gbeta and gz (the residual's gradient).
std::tuple<Tensor, Tensor, Tensor, Tensor> backward(const Tensor& go, const Tensor& x,
                                                    const Tensor& mask, const Tensor& gamma,
                                                    const Tensor& mean, const Tensor& invstd) {
  const Tensor gz = masked(go, mask);
  auto [gx, ggamma, gbeta] = at::native_batch_norm_backward(
      gz, x, gamma, std::nullopt, std::nullopt, mean, invstd, true, 0.0, {true, true, true});
  return {gx, ggamma, gbeta, gz};
}

// Adjoints of gO, x and gamma, with the CPU kernels' coefficients (double_backward_coefficients)
// on [C] tensors; undefined a, gg_gamma, gg_beta or ar are zero.
std::tuple<Tensor, Tensor, Tensor> double_backward(const Tensor& x, const Tensor& go,
                                                   const Tensor& mask, const Tensor& a,
                                                   const Tensor& ar, const Tensor& mean,
                                                   const Tensor& invstd, const Tensor& gamma,
                                                   const Tensor& gg_gamma, const Tensor& gg_beta) {
  const int64_t C = x.size(1);
  const double n = static_cast<double>(C > 0 ? x.numel() / C : 0);
  const Tensor zeros = at::zeros({C}, x.options()), ones = at::ones({C}, x.options());
  const Tensor gz = masked(go, mask);
  auto [s_gx, s_g] = channel_sums(gz, x, mean, invstd, ones);
  Tensor s_ax = zeros, s_a = zeros, s_ag = zeros;
  if (a.defined()) {
    std::tie(s_ax, s_a) = channel_sums(a, x, mean, invstd, ones);
    // sum(A gz): gz standing in for the input, with mean 0 and invstd 1.
    s_ag = channel_sums(a, gz, zeros, ones, ones).first;
  }
  const Tensor sums[kDoubleBackwardSums] = {s_g, s_gx, s_a, s_ax, s_ag};
  const DoubleBackwardCoefficients<Tensor> k = double_backward_coefficients(
      n, invstd, gamma, gg_gamma.defined() ? gg_gamma : zeros,
      gg_beta.defined() ? gg_beta : zeros, sums);
  // xh = (x - mean) r, so a term c xh is (c r) x - (c r) mean: one multiply-add on x.
  const Tensor go_x = k.go_xh * invstd, x_x = k.x_xh * invstd;
  const Tensor go_0 = k.go_c - go_x * mean, x_0 = k.x_c - x_x * mean;
  // adjoint of gO = m (sc A + go_xh xh + go_c + R)
  Tensor out_go = at::addcmul(per_channel(go_0, x), per_channel(go_x, x), x);
  if (a.defined()) out_go.addcmul_(per_channel(k.sc, x), a);
  if (ar.defined()) out_go.add_(ar);
  if (mask.defined()) out_go = at::threshold_backward(out_go, mask, 0);
  // adjoint of x = x_gz gz + x_a A + x_c + x_xh xh
  Tensor out_x = at::addcmul(per_channel(x_0, x), per_channel(x_x, x), x);
  out_x.addcmul_(per_channel(k.x_gz, x), gz);
  if (a.defined()) out_x.addcmul_(per_channel(k.x_a, x), a);
  return {out_go, out_x, k.gamma};
}

}  // namespace ops

// What the backward node keeps besides its tensor inputs: the ReLU's output (its mask; detached,
// undefined without ReLU), the batch statistics, whether the residual's gradient is wanted and
// whether the op runs as ATen operations (`ops`) rather than the CPU kernels.
struct Statistics {
  Tensor mask, mean, invstd;
  bool residual, ops;
};

struct FusedBatchNormBackward : public torch::autograd::Function<FusedBatchNormBackward> {
  // Returns gx, ggamma, gbeta and, with a residual, gresidual.
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& x,
                               const Tensor& gamma, const Statistics& stats) {
    ctx->save_for_backward({grad_out, x, gamma});
    // An adjoint nobody asked for stays undefined: the kernel treats it as zero without
    // reading a tensor of zeros.
    ctx->set_materialize_grads(false);
    ctx->saved_data["mask"] = stats.mask;
    ctx->saved_data["mean"] = stats.mean;
    ctx->saved_data["invstd"] = stats.invstd;
    ctx->saved_data["ops"] = stats.ops;
    if (stats.ops) {
      auto [gx, ggamma, gbeta, gz] =
          ops::backward(grad_out, x, stats.mask, gamma, stats.mean, stats.invstd);
      if (stats.residual) return {gx, ggamma, gbeta, gz};
      return {gx, ggamma, gbeta};
    }
    const Tensor go = activation_like(grad_out, x);
    const Tensor mask = activation_like(stats.mask, x);
    const Tensor g = channel_vector_like(gamma, x);
    const int64_t C = x.size(1);
    Tensor gx = at::empty_like(x, layout_for(x));
    Tensor gresidual = stats.residual ? at::empty_like(x, layout_for(x)) : Tensor();
    Tensor ggamma = at::empty({C}, x.options());
    Tensor gbeta = at::empty({C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused batch norm backward", [&] {
      BackwardArgs<scalar_t> p{go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                               data_or_null<scalar_t>(mask), g.data_ptr<scalar_t>(),
                               stats.mean.data_ptr<scalar_t>(), stats.invstd.data_ptr<scalar_t>(),
                               0, 0, 0, gx.data_ptr<scalar_t>(), mutable_or_null<scalar_t>(gresidual),
                               ggamma.data_ptr<scalar_t>(), gbeta.data_ptr<scalar_t>()};
      view_dims(x, p.N, p.C, p.HW);
      run(p, channels_last(x));
    });
    if (stats.residual) return {gx, ggamma, gbeta, gresidual};
    return {gx, ggamma, gbeta};
  }

  static variable_list backward(AutogradContext* ctx, variable_list adjoints) {
    auto saved = ctx->get_saved_variables();
    const Tensor x = saved[1];  // in its kernels' layout: the forward saved what it ran on
    if (ctx->saved_data["ops"].toBool()) {
      auto [out_go, out_x, out_gamma] = ops::double_backward(
          x, saved[0], ctx->saved_data["mask"].toTensor(),
          adjoints[0], adjoints.size() > 3 ? adjoints[3] : Tensor(),
          ctx->saved_data["mean"].toTensor(), ctx->saved_data["invstd"].toTensor(), saved[2],
          adjoints[1], adjoints[2]);
      return {out_go, out_x, out_gamma, Tensor()};
    }
    const Tensor go = activation_like(saved[0], x);
    const Tensor gamma = channel_vector_like(saved[2], x);
    const Tensor mask = activation_like(ctx->saved_data["mask"].toTensor(), x);
    const Tensor mean = ctx->saved_data["mean"].toTensor();
    const Tensor invstd = ctx->saved_data["invstd"].toTensor();
    const Tensor a = activation_like(adjoints[0], x);
    const Tensor gg_gamma = channel_vector_like(adjoints[1], x);
    const Tensor gg_beta = channel_vector_like(adjoints[2], x);
    const Tensor ar = adjoints.size() > 3 ? activation_like(adjoints[3], x) : Tensor();
    Tensor out_go = at::empty_like(x, layout_for(x));
    Tensor out_x = at::empty_like(x, layout_for(x));
    Tensor out_gamma = at::empty({x.size(1)}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused batch norm double backward", [&] {
      DoubleBackwardArgs<scalar_t> p{
          x.data_ptr<scalar_t>(),        go.data_ptr<scalar_t>(),
          data_or_null<scalar_t>(mask),  data_or_null<scalar_t>(a),
          data_or_null<scalar_t>(ar),    mean.data_ptr<scalar_t>(),
          invstd.data_ptr<scalar_t>(),   gamma.data_ptr<scalar_t>(),
          data_or_null<scalar_t>(gg_gamma), data_or_null<scalar_t>(gg_beta),
          0, 0, 0, out_go.data_ptr<scalar_t>(), out_x.data_ptr<scalar_t>(),
          out_gamma.data_ptr<scalar_t>()};
      view_dims(x, p.N, p.C, p.HW);
      run(p, channels_last(x));
    });
    return {out_go, out_x, out_gamma, Tensor()};
  }
};

struct FusedBatchNorm : public torch::autograd::Function<FusedBatchNorm> {
  // y = relu(bn(x) + residual), the ReLU and the residual optional.
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& gamma,
                               const Tensor& beta, const std::optional<Tensor>& residual,
                               const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, double momentum,
                               double eps, bool relu, bool as_ops) {
    // libtorch's CPU kernel does not check these, and the kernels index by channel.
    TORCH_CHECK(x.dim() >= 2, "input must be at least 2-d, got ", x.dim(), "-d");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble,
                "input must be float32 or float64, got ", x.scalar_type());
    const int64_t channels = x.size(1);
    auto check = [&](const Tensor& t, const char* name) {
      TORCH_CHECK(t.dim() == 1 && t.numel() == channels, name, " must be [", channels,
                  "] for an input of ", channels, " channels, got ", t.sizes());
      TORCH_CHECK(t.scalar_type() == x.scalar_type(), name, " must be ", x.scalar_type(),
                  " as the input is, got ", t.scalar_type());
    };
    check(gamma, "gamma");
    check(beta, "beta");
    if (running_mean) check(*running_mean, "running_mean");
    if (running_var) check(*running_var, "running_var");
    if (residual) {
      TORCH_CHECK(residual->sizes() == x.sizes(), "residual must be ", x.sizes(),
                  " as the input is, got ", residual->sizes());
      TORCH_CHECK(residual->scalar_type() == x.scalar_type(), "residual must be ",
                  x.scalar_type(), " as the input is, got ", residual->scalar_type());
    }
    if (as_ops) {
      const int64_t count = channels > 0 ? x.numel() / channels : 0;
      TORCH_CHECK(!(running_mean || running_var) || count > 1,
                  "running statistics need more than 1 value per channel, got ", count);
      auto f = ops::forward(x, gamma, beta, residual ? *residual : Tensor(), running_mean,
                            running_var, momentum, eps, relu);
      save(ctx, x, gamma, relu ? f.y : Tensor(), f.mean, f.invstd, residual.has_value(), true);
      return {f.y};
    }
    TORCH_CHECK(x.device().is_cpu(), "the fused kernels run on the CPU, got a tensor on ",
                x.device());
    const Tensor xc = x.contiguous(layout_for(x));
    const Tensor rc = residual ? activation_like(*residual, xc) : Tensor();
    Tensor y = at::empty_like(xc, layout_for(xc));
    Tensor mean = at::empty({channels}, x.options());
    Tensor invstd = at::empty({channels}, x.options());
    Tensor var = at::empty({channels}, x.options());
    const Tensor gc = gamma.contiguous(), bc = beta.contiguous();
    int64_t count = 0;
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused batch norm", [&] {
      ForwardArgs<scalar_t> p{xc.data_ptr<scalar_t>(), data_or_null<scalar_t>(rc),
                              gc.data_ptr<scalar_t>(), bc.data_ptr<scalar_t>(), 0, 0, 0, eps, relu,
                              y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                              invstd.data_ptr<scalar_t>(), var.data_ptr<scalar_t>()};
      view_dims(xc, p.N, p.C, p.HW);
      count = p.N * p.HW;
      run(p, channels_last(xc));
    });
    if (running_mean || running_var) {
      TORCH_CHECK(count > 1, "running statistics need more than 1 value per channel, got ",
                  count);
      if (running_mean) running_mean->mul_(1 - momentum).add_(mean, momentum);
      if (running_var) {
        const double unbiased = static_cast<double>(count) / static_cast<double>(count - 1);
        running_var->mul_(1 - momentum).add_(var, momentum * unbiased);
      }
    }
    save(ctx, xc, gamma, relu ? y : Tensor(), mean, invstd, residual.has_value(), false);
    return {y};
  }

  // y is the ReLU's output (undefined without ReLU): its mask.
  static void save(AutogradContext* ctx, const Tensor& x, const Tensor& gamma, const Tensor& y,
                   const Tensor& mean, const Tensor& invstd, bool residual, bool as_ops) {
    if (y.defined()) {
      ctx->save_for_backward({x, gamma, y});
    } else {
      ctx->save_for_backward({x, gamma});
    }
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["invstd"] = invstd;
    ctx->saved_data["residual"] = residual;
    ctx->saved_data["ops"] = as_ops;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const bool residual = ctx->saved_data["residual"].toBool();
    // The mask's derivative is zero: the ReLU's output goes in detached, so the recorded
    // backward node has no edge to it.
    Statistics stats{saved.size() > 2 ? saved[2].detach() : Tensor(),
                     ctx->saved_data["mean"].toTensor(), ctx->saved_data["invstd"].toTensor(),
                     residual, ctx->saved_data["ops"].toBool()};
    auto grads = FusedBatchNormBackward::apply(grad_out[0], saved[0], saved[1], stats);
    return {grads[0], grads[1], grads[2], residual ? grads[3] : Tensor(),
            Tensor(),  Tensor(),  Tensor(),  Tensor(),
            Tensor(),  Tensor()};
  }
};

}  // namespace

extern "C" {

// Training-mode batch norm of x [N, C, ...] with affine gamma, beta [C], plus `residual` (same
// shape as x) when not null, then a ReLU when `relu` is non-zero; running_mean and running_var
// may be null (no running statistics). `as_ops` non-zero runs the op as ATen operations (any
// device), zero as the fused CPU kernels. On success writes the output to *out and returns
// null; on failure returns an error message to free with mp_free_error.
char* mp_fused_batch_norm(const Tensor* x, const Tensor* gamma, const Tensor* beta,
                          const Tensor* residual, const Tensor* running_mean,
                          const Tensor* running_var, double momentum, double eps, int relu,
                          int as_ops, Tensor** out) {
  try {
    // Optional, not undefined tensors: autograd records the metadata of every tensor input.
    std::optional<Tensor> res, mean, var;
    if (residual != nullptr) res = *residual;
    if (running_mean != nullptr) mean = *running_mean;
    if (running_var != nullptr) var = *running_var;
    auto y = FusedBatchNorm::apply(*x, *gamma, *beta, res, mean, var, momentum, eps, relu != 0,
                                   as_ops != 0);
    *out = new Tensor(y[0]);
    return nullptr;
  } catch (const std::exception& e) {
    return mp_error_copy(e.what());
  }
}

void mp_free_error(char* message) { std::free(message); }
}
