// Training-mode batch norm whose double backward is one fused CPU kernel.
//
// Why: MetaPoison backpropagates through the unrolled SGD steps, so every batch norm of every
// unrolled step is differentiated twice. libtorch's double backward of batch norm is a
// composite of some thirty element-wise and reduction kernels over the activations; on a CPU
// it was 29% of a craft step (BENCHMARKS.md). The maths needs only five per-channel sums and one
// element-wise pass, which is what `double_backward_channel` does.
//
// Two autograd functions: `FusedBatchNorm` (forward: libtorch's native batch norm) whose
// backward calls `FusedBatchNormBackward` (forward: libtorch's native batch-norm backward), so
// that a backward with create_graph records a node whose own backward is the fused kernel. That
// kernel is not differentiable again (third derivatives are never taken).
//
// Notation, per channel over its n = N*H*W elements: mu, r = 1/sqrt(var + eps) (biased var),
// xh = (x - mu) r, gamma g. First order, given gO: gx = g r (gO - mean(gO) - xh mean(gO xh)),
// ggamma = sum(gO xh), gbeta = sum(gO). Double backward, given the adjoints A of gx, Gg of
// ggamma and Gb of gbeta, with m_g = mean(gO), m_gx = mean(gO xh), m_a = mean(A),
// m_ax = mean(A xh), m_ag = mean(A gO), s = g r:
//   adjoint of gO:    s (A - m_a - xh m_ax) + Gg xh + Gb
//   adjoint of gamma: n r (m_ag - m_g m_a - m_gx m_ax)
//   adjoint of x:     r (v - mean(v) - xh mean(v xh)) - r^2 g xh (m_ag - m_g m_a - m_gx m_ax),
//                     v = (Gg - s m_ax) gO - s m_gx A
// (x reaches the objective through xh, whose Jacobian is r (I - 1/n - xh xh^T / n), and
// through the factor r of gx, whose derivative is -r^2 xh / n.)

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstring>
#include <optional>
#include <string>

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

struct ChannelSums {
  double go = 0, go_xh = 0, a = 0, a_xh = 0, a_go = 0;
};

// One pass of sums and one element-wise pass over channel c of [N, C, HW] tensors. `a` (the
// adjoint of gx) may be null: then it is zero.
template <typename T>
inline __attribute__((always_inline)) void double_backward_channel(
    const T* x, const T* go, const T* a, int64_t N, int64_t C, int64_t HW, int64_t c, double mu,
    double r, double g, double gg_gamma, double gg_beta, T* out_go, T* out_x, double* out_gamma) {
  ChannelSums s;
  const T mu_t = static_cast<T>(mu), r_t = static_cast<T>(r);
  for (int64_t i = 0; i < N; ++i) {
    const int64_t base = (i * C + c) * HW;
    const T* xr = x + base;
    const T* gr = go + base;
    T s_go = 0, s_go_xh = 0;
    if (a != nullptr) {
      const T* ar = a + base;
      T s_a = 0, s_a_xh = 0, s_a_go = 0;
#pragma omp simd reduction(+ : s_go, s_go_xh, s_a, s_a_xh, s_a_go)
      for (int64_t j = 0; j < HW; ++j) {
        const T xh = (xr[j] - mu_t) * r_t;
        s_go += gr[j];
        s_go_xh += gr[j] * xh;
        s_a += ar[j];
        s_a_xh += ar[j] * xh;
        s_a_go += ar[j] * gr[j];
      }
      s.a += s_a;
      s.a_xh += s_a_xh;
      s.a_go += s_a_go;
    } else {
#pragma omp simd reduction(+ : s_go, s_go_xh)
      for (int64_t j = 0; j < HW; ++j) {
        const T xh = (xr[j] - mu_t) * r_t;
        s_go += gr[j];
        s_go_xh += gr[j] * xh;
      }
    }
    s.go += s_go;
    s.go_xh += s_go_xh;
  }
  const double n = static_cast<double>(N * HW);
  const double m_g = s.go / n, m_gx = s.go_xh / n, m_a = s.a / n, m_ax = s.a_xh / n,
               m_ag = s.a_go / n;
  const double sc = g * r;
  const double q = m_ag - m_g * m_a - m_gx * m_ax;
  *out_gamma = n * r * q;
  // adjoint of gO = sc A + xh (Gg - sc m_ax) + (Gb - sc m_a)
  const double go_xh_coef = gg_gamma - sc * m_ax;
  const double go_const = gg_beta - sc * m_a;
  // v = go_xh_coef gO - sc m_gx A; adjoint of x = r v + x_const + x_xh_coef xh
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
    const T* xr = x + base;
    const T* gr = go + base;
    T* og = out_go + base;
    T* ox = out_x + base;
    if (a != nullptr) {
      const T* ar = a + base;
#pragma omp simd
      for (int64_t j = 0; j < HW; ++j) {
        const T xh = (xr[j] - mu_t) * r_t;
        og[j] = t_sc * ar[j] + t_go_xh * xh + t_go_c;
        ox[j] = t_rv * gr[j] + t_ra * ar[j] + t_xc + t_xx * xh;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < HW; ++j) {
        const T xh = (xr[j] - mu_t) * r_t;
        og[j] = t_go_xh * xh + t_go_c;
        ox[j] = t_rv * gr[j] + t_xc + t_xx * xh;
      }
    }
  }
}

template <typename T>
inline __attribute__((always_inline)) void double_backward_channels(
    const T* x, const T* go, const T* a, const T* mean, const T* invstd, const T* gamma,
    const T* gg_gamma, const T* gg_beta, int64_t N, int64_t C, int64_t HW, T* out_go, T* out_x,
    T* out_gamma) {
  at::parallel_for(0, C, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double dg = 0;
      double_backward_channel<T>(x, go, a, N, C, HW, c, mean[c], invstd[c], gamma[c],
                                 gg_gamma ? gg_gamma[c] : 0.0, gg_beta ? gg_beta[c] : 0.0,
                                 out_go, out_x, &dg);
      out_gamma[c] = static_cast<T>(dg);
    }
  });
}

// On x86-64, compiled for AVX-512, AVX2 and the baseline; the loader picks the best the CPU has.
#if defined(__x86_64__) && defined(__GNUC__)
#define MP_CPU_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MP_CPU_CLONES
#endif

MP_CPU_CLONES void double_backward_f32(
    const float* x, const float* go, const float* a, const float* mean, const float* invstd,
    const float* gamma, const float* gg_gamma, const float* gg_beta, int64_t N, int64_t C,
    int64_t HW, float* out_go, float* out_x, float* out_gamma) {
  double_backward_channels<float>(x, go, a, mean, invstd, gamma, gg_gamma, gg_beta, N, C, HW,
                                  out_go, out_x, out_gamma);
}

MP_CPU_CLONES void double_backward_f64(
    const double* x, const double* go, const double* a, const double* mean,
    const double* invstd, const double* gamma, const double* gg_gamma, const double* gg_beta,
    int64_t N, int64_t C, int64_t HW, double* out_go, double* out_x, double* out_gamma) {
  double_backward_channels<double>(x, go, a, mean, invstd, gamma, gg_gamma, gg_beta, N, C, HW,
                                   out_go, out_x, out_gamma);
}

// Calls one of the kernels above on contiguous tensors of its dtype (a, gg_gamma and gg_beta
// may be undefined: zero).
template <typename T, typename Kernel>
void launch(Kernel kernel, const Tensor& x, const Tensor& go, const Tensor& a, const Tensor& mean,
            const Tensor& invstd, const Tensor& gamma, const Tensor& gg_gamma,
            const Tensor& gg_beta, Tensor& out_go, Tensor& out_x, Tensor& out_gamma) {
  auto ptr = [](const Tensor& t) { return t.defined() ? t.data_ptr<T>() : nullptr; };
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t HW = C > 0 && N > 0 ? x.numel() / (N * C) : 0;
  kernel(ptr(x), ptr(go), ptr(a), ptr(mean), ptr(invstd), ptr(gamma), ptr(gg_gamma),
         ptr(gg_beta), N, C, HW, out_go.data_ptr<T>(), out_x.data_ptr<T>(),
         out_gamma.data_ptr<T>());
}

// `t` contiguous in `like`'s dtype, or undefined when `t` is.
Tensor contiguous_like(const Tensor& t, const Tensor& like) {
  if (!t.defined()) return t;
  return t.to(like.scalar_type()).contiguous();
}

struct FusedBatchNormBackward : public torch::autograd::Function<FusedBatchNormBackward> {
  static variable_list forward(AutogradContext* ctx, const Tensor& grad_out, const Tensor& x,
                               const Tensor& gamma, const Tensor& save_mean,
                               const Tensor& save_invstd, double eps) {
    ctx->save_for_backward({grad_out, x, gamma});
    // An adjoint nobody asked for stays undefined: the kernel treats it as zero without
    // reading a tensor of zeros.
    ctx->set_materialize_grads(false);
    ctx->saved_data["mean"] = save_mean;
    ctx->saved_data["invstd"] = save_invstd;
    auto grads = at::native_batch_norm_backward(grad_out, x, gamma, {}, {}, save_mean,
                                                save_invstd, true, eps, {true, true, true});
    return {std::get<0>(grads), std::get<1>(grads), std::get<2>(grads)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list adjoints) {
    auto saved = ctx->get_saved_variables();
    const Tensor go = saved[0].contiguous();
    const Tensor x = saved[1].contiguous();
    const Tensor gamma = contiguous_like(saved[2], x);
    const Tensor mean = contiguous_like(ctx->saved_data["mean"].toTensor(), x);
    const Tensor invstd = contiguous_like(ctx->saved_data["invstd"].toTensor(), x);
    const Tensor a = contiguous_like(adjoints[0], x);
    const Tensor gg_gamma = contiguous_like(adjoints[1], x);
    const Tensor gg_beta = contiguous_like(adjoints[2], x);
    const int64_t C = x.size(1);
    Tensor out_go = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor out_x = at::empty_like(x, at::MemoryFormat::Contiguous);
    Tensor out_gamma = at::empty({C}, x.options());
    if (x.scalar_type() == at::kFloat) {
      launch<float>(double_backward_f32, x, go, a, mean, invstd, gamma, gg_gamma, gg_beta,
                    out_go, out_x, out_gamma);
    } else {
      TORCH_CHECK(x.scalar_type() == at::kDouble, "fused batch norm: float32 or float64 only");
      launch<double>(double_backward_f64, x, go, a, mean, invstd, gamma, gg_gamma, gg_beta,
                     out_go, out_x, out_gamma);
    }
    return {out_go, out_x, out_gamma, Tensor(), Tensor(), Tensor()};
  }
};

struct FusedBatchNorm : public torch::autograd::Function<FusedBatchNorm> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& gamma,
                               const Tensor& beta, const std::optional<Tensor>& running_mean,
                               const std::optional<Tensor>& running_var, double momentum,
                               double eps) {
    // libtorch's CPU kernel does not check these, and the fused kernel indexes by channel.
    TORCH_CHECK(x.dim() >= 2, "input must be at least 2-d, got ", x.dim(), "-d");
    const int64_t channels = x.size(1);
    auto check = [&](const Tensor& t, const char* name) {
      TORCH_CHECK(t.dim() == 1 && t.numel() == channels, name, " must be [", channels,
                  "] for an input of ", channels, " channels, got ", t.sizes());
    };
    check(gamma, "gamma");
    check(beta, "beta");
    if (running_mean) check(*running_mean, "running_mean");
    if (running_var) check(*running_var, "running_var");
    auto out = at::native_batch_norm(x, gamma, beta, running_mean, running_var, true, momentum,
                                     eps);
    ctx->save_for_backward({x, gamma});
    ctx->saved_data["mean"] = std::get<1>(out);
    ctx->saved_data["invstd"] = std::get<2>(out);
    ctx->saved_data["eps"] = eps;
    return {std::get<0>(out)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    auto grads = FusedBatchNormBackward::apply(
        grad_out[0], saved[0], saved[1], ctx->saved_data["mean"].toTensor(),
        ctx->saved_data["invstd"].toTensor(), ctx->saved_data["eps"].toDouble());
    return {grads[0], grads[1], grads[2], Tensor(), Tensor(), Tensor(), Tensor()};
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

// Training-mode batch norm of x [N, C, ...] with affine gamma, beta [C]; running_mean and
// running_var may be null (no running statistics). On success writes the output to *out and
// returns null; on failure returns an error message to free with mp_free_error.
char* mp_fused_batch_norm(const Tensor* x, const Tensor* gamma, const Tensor* beta,
                          const Tensor* running_mean, const Tensor* running_var, double momentum,
                          double eps, Tensor** out) {
  try {
    // Optional, not undefined tensors: autograd records the metadata of every tensor input.
    std::optional<Tensor> mean, var;
    if (running_mean != nullptr) mean = *running_mean;
    if (running_var != nullptr) var = *running_var;
    auto y = FusedBatchNorm::apply(*x, *gamma, *beta, mean, var, momentum, eps);
    *out = new Tensor(y[0]);
    return nullptr;
  } catch (const std::exception& e) {
    return error_copy(e.what());
  }
}

void mp_free_error(char* message) { std::free(message); }
}
