// 2-d convolution without bias as an autograd function whose second derivative runs on the
// backend's own backward kernels.
//
// Why: libtorch's double backward of a convolution (_convolution_double_backward) computes the
// weight's term as a convolution of the batch-transposed tensors ggI^T and gO^T: both
// transposes are first copied to contiguous memory, and that convolution has the output map as
// its kernel, a shape the backends run slowly. MetaPoison differentiates every convolution of
// every unrolled step twice, so this is on the hot path. The same term is the weight gradient
// of a convolution whose input is ggI and whose output gradient is gO, which
// at::convolution_backward computes with the backend's backward-weights kernel (oneDNN,
// cuDNN), reading the tensors in place.
//
// With gI = conv_input_grad(gO, W) and gW = conv_weight_grad(X, gO), each bilinear, and the
// adjoints ggI of gI and ggW of gW:
//   adjoint of gO = conv(ggI, W) + conv(X, ggW)
//   adjoint of W  = conv_weight_grad(ggI, gO)
//   adjoint of X  = conv_input_grad(gO, ggW)
// The double-backward node is not differentiable again (third derivatives are never taken).

#include <ATen/ATen.h>
#include <torch/csrc/autograd/custom_function.h>

#include <array>
#include <vector>

#include "ffi.h"

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

namespace {

struct ConvShape {
  std::vector<int64_t> stride, padding, dilation;
  int64_t groups;

  void save(AutogradContext* ctx) const {
    ctx->saved_data["stride"] = stride;
    ctx->saved_data["padding"] = padding;
    ctx->saved_data["dilation"] = dilation;
    ctx->saved_data["groups"] = groups;
  }

  static ConvShape load(AutogradContext* ctx) {
    return {ctx->saved_data["stride"].toIntVector(), ctx->saved_data["padding"].toIntVector(),
            ctx->saved_data["dilation"].toIntVector(), ctx->saved_data["groups"].toInt()};
  }

  Tensor conv(const Tensor& x, const Tensor& w) const {
    return at::convolution(x, w, std::nullopt, stride, padding, dilation, false, {0, 0}, groups);
  }

  // Gradients wrt the input and the weight of conv(x, w) given gO, those `input` and `weight`
  // ask for (the others undefined).
  std::tuple<Tensor, Tensor, Tensor> grads(const Tensor& go, const Tensor& x, const Tensor& w,
                                           bool input, bool weight) const {
    return at::convolution_backward(go, x, w, std::nullopt, stride, padding, dilation, false,
                                    {0, 0}, groups, {input, weight, false});
  }
};

struct Conv2dBackward : public torch::autograd::Function<Conv2dBackward> {
  // Returns gI, gW or both, as asked (autograd takes no undefined outputs).
  static variable_list forward(AutogradContext* ctx, const Tensor& go, const Tensor& x,
                               const Tensor& w, const ConvShape& shape, bool want_input,
                               bool want_weight) {
    ctx->save_for_backward({go, x, w});
    ctx->set_materialize_grads(false);
    shape.save(ctx);
    ctx->saved_data["want_input"] = want_input;
    auto g = shape.grads(go, x, w, want_input, want_weight);
    variable_list out;
    if (want_input) out.push_back(std::get<0>(g));
    if (want_weight) out.push_back(std::get<1>(g));
    return out;
  }

  static variable_list backward(AutogradContext* ctx, variable_list adjoints) {
    auto saved = ctx->get_saved_variables();
    const Tensor &go = saved[0], &x = saved[1], &w = saved[2];
    const ConvShape shape = ConvShape::load(ctx);
    // The adjoints of the outputs forward returned, in its order.
    const bool has_input = ctx->saved_data["want_input"].toBool();
    const Tensor gg_input = has_input ? adjoints[0] : Tensor();
    const Tensor gg_weight = adjoints.size() > (has_input ? 1u : 0u) ? adjoints.back() : Tensor();
    Tensor out_go, out_x, out_w;
    const bool need_go = ctx->needs_input_grad(0), need_x = ctx->needs_input_grad(1),
               need_w = ctx->needs_input_grad(2);
    if (gg_input.defined()) {
      if (need_go) out_go = shape.conv(gg_input, w);
      if (need_w) out_w = std::get<1>(shape.grads(go, gg_input, w, false, true));
    }
    if (gg_weight.defined()) {
      if (need_go) {
        Tensor term = shape.conv(x, gg_weight);
        out_go = out_go.defined() ? out_go.add_(term) : term;
      }
      if (need_x) out_x = std::get<0>(shape.grads(go, x, gg_weight, true, false));
    }
    return {out_go, out_x, out_w, Tensor(), Tensor(), Tensor()};
  }
};

struct Conv2d : public torch::autograd::Function<Conv2d> {
  static variable_list forward(AutogradContext* ctx, const Tensor& x, const Tensor& w,
                               const ConvShape& shape) {
    ctx->save_for_backward({x, w});
    shape.save(ctx);
    return {shape.conv(x, w)};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_out) {
    auto saved = ctx->get_saved_variables();
    const bool want_input = ctx->needs_input_grad(0), want_weight = ctx->needs_input_grad(1);
    if (!want_input && !want_weight) return {Tensor(), Tensor(), Tensor()};
    auto grads = Conv2dBackward::apply(grad_out[0], saved[0], saved[1], ConvShape::load(ctx),
                                       want_input, want_weight);
    return {want_input ? grads[0] : Tensor(), want_weight ? grads.back() : Tensor(), Tensor()};
  }
};

}  // namespace

extern "C" {

// conv2d(x, w) with square stride and zero padding, dilation 1, `groups` groups, no bias. On
// success writes the output to *out and returns null; on failure returns an error message to
// free with mp_free_error.
char* mp_conv2d(const Tensor* x, const Tensor* w, int64_t stride, int64_t padding,
                int64_t groups, Tensor** out) {
  try {
    TORCH_CHECK(x->dim() == 4 && w->dim() == 4, "input and weight must be 4-d, got ",
                x->dim(), "-d and ", w->dim(), "-d");
    ConvShape shape{{stride, stride}, {padding, padding}, {1, 1}, groups};
    auto y = Conv2d::apply(*x, *w, shape);
    *out = new Tensor(y[0]);
    return nullptr;
  } catch (const std::exception& e) {
    return mp_error_copy(e.what());
  }
}
}
