// Training-mode batch norm, optionally followed by a residual add and a ReLU, as one autograd
// function whose forward, backward and double backward are fused CPU kernels.
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

#include <cmath>
#include <cstring>
#include <optional>
#include <string>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

#define MP_INLINE inline __attribute__((always_inline))

// Every kernel views its tensors as [N, C, HW] (contiguous) and works on one channel at a time;
// a null pointer stands for an absent input (no residual, no ReLU mask, a zero adjoint).
template <typename T>
struct ForwardArgs {
  const T *x, *residual, *gamma, *beta;
  int64_t N, C, HW;
  double eps;
  bool relu;
  T *y, *mean, *invstd, *var;  // var: biased, for the running statistics
};

template <typename T>
struct BackwardArgs {
  const T *go, *x, *mask, *gamma, *mean, *invstd;
  int64_t N, C, HW;
  T *gx, *gresidual, *ggamma, *gbeta;
};

template <typename T>
struct DoubleBackwardArgs {
  const T *x, *go, *mask, *a, *ar, *mean, *invstd, *gamma, *gg_gamma, *gg_beta;
  int64_t N, C, HW;
  T *out_go, *out_x, *out_gamma;
};

// The gradient reaching the batch norm: gO where the ReLU passed its input, else zero.
template <typename T, bool Relu>
MP_INLINE T masked(const T* mask, const T* go, int64_t j) {
  if constexpr (Relu) {
    // Loaded unconditionally, so the compiler selects rather than emitting a masked load.
    const T g = go[j];
    return mask[j] > T(0) ? g : T(0);
  } else {
    return go[j];
  }
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
  const double r = 1.0 / std::sqrt(var + p.eps);
  const double g = static_cast<double>(p.gamma[c]);
  const T scale = static_cast<T>(g * r);
  const T shift = static_cast<T>(static_cast<double>(p.beta[c]) - mu * g * r);
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
  p.invstd[c] = static_cast<T>(r);
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
  const double n = static_cast<double>(N * HW);
  const double s = static_cast<double>(p.gamma[c]) * static_cast<double>(r);
  // gx = s gz - s m_g - s m_gx xh
  const T t_s = static_cast<T>(s), t_c = static_cast<T>(-s * s_g / n),
          t_xh = static_cast<T>(-s * s_gx / n);
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
  const double n = static_cast<double>(N * HW);
  const double m_g = s_go / n, m_gx = s_go_xh / n, m_a = s_a / n, m_ax = s_a_xh / n,
               m_ag = s_a_go / n;
  const double sc = g * r;
  const double q = m_ag - m_g * m_a - m_gx * m_ax;
  p.out_gamma[c] = static_cast<T>(n * r * q);
  // adjoint of gz = sc A + xh (Gg - sc m_ax) + (Gb - sc m_a) + R; of gO: that times the mask
  const double go_xh_coef = gg_gamma - sc * m_ax;
  const double go_const = gg_beta - sc * m_a;
  // v = go_xh_coef gz - sc m_gx A; adjoint of x = r v + x_const + x_xh_coef xh
  const double v_a_coef = -sc * m_gx;
  const double mean_v = go_xh_coef * m_g + v_a_coef * m_a;
  const double mean_v_xh = go_xh_coef * m_gx + v_a_coef * m_ax;
  const double x_const = -r * mean_v;
  const double x_xh_coef = -r * mean_v_xh - r * r * g * q;
  const T t_sc = static_cast<T>(sc), t_go_xh = static_cast<T>(go_xh_coef),
          t_go_c = static_cast<T>(go_const), t_rv = static_cast<T>(r * go_xh_coef),
          t_ra = static_cast<T>(r * v_a_coef), t_xc = static_cast<T>(x_const),
          t_xx = static_cast<T>(x_xh_coef);
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

MP_CPU_CLONES void forward_f32(const ForwardArgs<float>& p, int64_t b, int64_t e) {
  forward_range(p, b, e);
}
MP_CPU_CLONES void forward_f64(const ForwardArgs<double>& p, int64_t b, int64_t e) {
  forward_range(p, b, e);
}
MP_CPU_CLONES void backward_f32(const BackwardArgs<float>& p, int64_t b, int64_t e) {
  backward_range(p, b, e);
}
MP_CPU_CLONES void backward_f64(const BackwardArgs<double>& p, int64_t b, int64_t e) {
  backward_range(p, b, e);
}
MP_CPU_CLONES void double_backward_f32(const DoubleBackwardArgs<float>& p, int64_t b,
                                       int64_t e) {
  double_backward_range(p, b, e);
}
MP_CPU_CLONES void double_backward_f64(const DoubleBackwardArgs<double>& p, int64_t b,
                                       int64_t e) {
  double_backward_range(p, b, e);
}

// Runs a kernel's cloned entry point over the channels, split among libtorch's threads.
template <typename Args>
void run(const Args& p, void (*entry)(const Args&, int64_t, int64_t)) {
  at::parallel_for(0, p.C, 1, [&](int64_t b, int64_t e) { entry(p, b, e); });
}

void run(const ForwardArgs<float>& p) { run(p, forward_f32); }
void run(const ForwardArgs<double>& p) { run(p, forward_f64); }
void run(const BackwardArgs<float>& p) { run(p, backward_f32); }
void run(const BackwardArgs<double>& p) { run(p, backward_f64); }
void run(const DoubleBackwardArgs<float>& p) { run(p, double_backward_f32); }
void run(const DoubleBackwardArgs<double>& p) { run(p, double_backward_f64); }

// `t` contiguous in `like`'s dtype, or undefined when `t` is.
Tensor contiguous_like(const Tensor& t, const Tensor& like) {
  if (!t.defined()) return t;
  return t.to(like.scalar_type()).contiguous();
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

// What the backward node keeps besides its tensor inputs: the ReLU's output (its mask; detached,
// undefined without ReLU), the batch statistics and whether the residual's gradient is wanted.
struct Statistics {
  Tensor mask, mean, invstd;
  bool residual;
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
    const Tensor go = grad_out.contiguous();
    const Tensor mask = contiguous_like(stats.mask, x);
    const Tensor g = contiguous_like(gamma, x);
    const int64_t C = x.size(1);
    Tensor gx = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor gresidual = stats.residual ? at::empty_like(x, at::MemoryFormat::Contiguous) : Tensor();
    Tensor ggamma = at::empty({C}, x.options());
    Tensor gbeta = at::empty({C}, x.options());
    AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "fused batch norm backward", [&] {
      BackwardArgs<scalar_t> p{go.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(),
                               data_or_null<scalar_t>(mask), g.data_ptr<scalar_t>(),
                               stats.mean.data_ptr<scalar_t>(), stats.invstd.data_ptr<scalar_t>(),
                               0, 0, 0, gx.data_ptr<scalar_t>(), mutable_or_null<scalar_t>(gresidual),
                               ggamma.data_ptr<scalar_t>(), gbeta.data_ptr<scalar_t>()};
      view_dims(x, p.N, p.C, p.HW);
      run(p);
    });
    if (stats.residual) return {gx, ggamma, gbeta, gresidual};
    return {gx, ggamma, gbeta};
  }

  static variable_list backward(AutogradContext* ctx, variable_list adjoints) {
    auto saved = ctx->get_saved_variables();
    const Tensor go = saved[0].contiguous();
    const Tensor x = saved[1];  // contiguous: the forward saved its contiguous input
    const Tensor gamma = contiguous_like(saved[2], x);
    const Tensor mask = contiguous_like(ctx->saved_data["mask"].toTensor(), x);
    const Tensor mean = ctx->saved_data["mean"].toTensor();
    const Tensor invstd = ctx->saved_data["invstd"].toTensor();
    const Tensor a = contiguous_like(adjoints[0], x);
    const Tensor gg_gamma = contiguous_like(adjoints[1], x);
    const Tensor gg_beta = contiguous_like(adjoints[2], x);
    const Tensor ar = adjoints.size() > 3 ? contiguous_like(adjoints[3], x) : Tensor();
    Tensor out_go = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor out_x = at::empty_like(x, at::MemoryFormat::Contiguous);
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
      run(p);
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
                               double eps, bool relu) {
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
    const Tensor xc = x.contiguous();
    const Tensor rc = residual ? residual->contiguous() : Tensor();
    Tensor y = at::empty_like(xc, at::MemoryFormat::Contiguous);
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
      run(p);
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
    if (relu) {
      ctx->save_for_backward({xc, gamma, y});
    } else {
      ctx->save_for_backward({xc, gamma});
    }
    ctx->saved_data["mean"] = mean;
    ctx->saved_data["invstd"] = invstd;
    ctx->saved_data["residual"] = residual.has_value();
    return {y};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const bool residual = ctx->saved_data["residual"].toBool();
    // The mask's derivative is zero: the ReLU's output goes in detached, so the recorded
    // backward node has no edge to it.
    Statistics stats{saved.size() > 2 ? saved[2].detach() : Tensor(),
                     ctx->saved_data["mean"].toTensor(), ctx->saved_data["invstd"].toTensor(),
                     residual};
    auto grads = FusedBatchNormBackward::apply(grad_out[0], saved[0], saved[1], stats);
    return {grads[0], grads[1], grads[2], residual ? grads[3] : Tensor(),
            Tensor(),  Tensor(),  Tensor(),  Tensor(),
            Tensor()};
  }
};

char* error_copy(const char* what) {
  size_t n = std::strlen(what) + 1;
  char* copy = static_cast<char*>(std::malloc(n));
  if (copy != nullptr) std::memcpy(copy, what, n);
  return copy;
}

}  // namespace

extern "C" {

// Training-mode batch norm of x [N, C, ...] with affine gamma, beta [C], plus `residual` (same
// shape as x) when not null, then a ReLU when `relu` is non-zero; running_mean and running_var
// may be null (no running statistics). On success writes the output to *out and returns null;
// on failure returns an error message to free with mp_free_error.
char* mp_fused_batch_norm(const Tensor* x, const Tensor* gamma, const Tensor* beta,
                          const Tensor* residual, const Tensor* running_mean,
                          const Tensor* running_var, double momentum, double eps, int relu,
                          Tensor** out) {
  try {
    // Optional, not undefined tensors: autograd records the metadata of every tensor input.
    std::optional<Tensor> res, mean, var;
    if (residual != nullptr) res = *residual;
    if (running_mean != nullptr) mean = *running_mean;
    if (running_var != nullptr) var = *running_var;
    auto y = FusedBatchNorm::apply(*x, *gamma, *beta, res, mean, var, momentum, eps, relu != 0);
    *out = new Tensor(y[0]);
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  }
}

void mp_free_error(char* message) { std::free(message); }
}
