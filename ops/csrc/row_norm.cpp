// The fused CPU kernels of persample's row norms (row_norm_kernels.h, read why there),
// lent to the CPU kernels of persample::layer_norm and persample::rms_norm as two
// private ops, which ops/row_norm/cpu.py's forward_kernel / backward_kernel pick.
// The callers have validated the call and
// flattened it to [N, M, D]: these check only what would make the kernels read out of
// bounds. fp16 and bf16 inputs compute in fp32: their statistics, parameter gradients
// (and parameters, which may come in either dtype) are fp32, their output and
// grad_input are rounded once to the input's dtype.

#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <array>
#include <string>
#include <tuple>
#include <utility>

#include "row_norm_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;

void check_input(const Tensor& input, const char* op) {
  TORCH_CHECK(input.dim() == 3, op, ": expected input of shape [N, M, D], got ",
              input.sizes());
  TORCH_CHECK(input.is_cpu() && input.layout() == at::kStrided, op,
              ": expected a dense CPU input");
  TORCH_CHECK(at::isFloatingType(input.scalar_type()), op,
              ": expected a floating-point input, got ", input.scalar_type());
  TORCH_CHECK(input.size(2) > 0, op, ": rows must have at least one element");
}

// ATen's CPU dispatch level (ATEN_CPU_CAPABILITY where set), which the kernels follow.
persample_cpu::Isa isa() {
  static const auto level = [] {
    const std::string capability = at::get_cpu_capability();
    return capability == "AVX512" ? persample_cpu::Isa::kAvx512
           : capability == "AVX2" ? persample_cpu::Isa::kAvx2
                                  : persample_cpu::Isa::kDefault;
  }();
  return level;
}

// The dtype the kernels compute in, of the statistics, parameters and their gradients:
// fp16 and bf16 compute in fp32 (row_norm_kernels.h's acc_t).
at::ScalarType acc_type(const Tensor& input) {
  const auto dtype = input.scalar_type();
  return dtype == at::kHalf || dtype == at::kBFloat16 ? at::kFloat : dtype;
}

// A [D] or [N, D] parameter as dense rows of the compute dtype and the stride from one
// sample's row to the next (0 for [D], and for [N, D] expanded from it).
std::pair<OptTensor, int64_t> param_rows(const OptTensor& p, const Tensor& input,
                                         const char* op, const char* name) {
  if (!p.has_value()) return {p, 0};
  const int64_t n = input.size(0), d = input.size(2);
  const auto acc = acc_type(input);
  TORCH_CHECK((p->scalar_type() == input.scalar_type() || p->scalar_type() == acc) &&
                  p->is_cpu(),
              op, ": ", name, " must be a CPU tensor of the input's dtype",
              acc != input.scalar_type() ? " or float32" : "");
  TORCH_CHECK((p->dim() == 1 && p->size(0) == d) ||
                  (p->dim() == 2 && p->size(0) == n && p->size(1) == d),
              op, ": ", name, " must be [D] or [N, D] for input ", input.sizes(), ", got ",
              p->sizes());
  Tensor t = p->scalar_type() == acc ? *p : p->to(acc);  // to(): fp16/bf16 to fp32
  if (d > 1 && t.stride(-1) != 1) t = t.contiguous();
  return {t, t.dim() == 2 ? t.stride(0) : 0};
}

template <typename T>
const T* data_or_null(const OptTensor& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

Tensor3 row_norm_forward(const Tensor& input_, const OptTensor& weight, const OptTensor& bias,
                         bool rms, double eps) {
  constexpr const char* op = "persample::_cpu_row_norm_forward";
  check_input(input_, op);
  TORCH_CHECK(!rms || !bias.has_value(), op, ": RMSNorm takes no bias");
  const Tensor input = input_.contiguous();
  const int64_t n = input.size(0), m = input.size(1), d = input.size(2);
  // Not structured bindings: C++17 lambdas cannot capture them.
  OptTensor gamma, beta;
  int64_t gamma_stride, beta_stride;
  std::tie(gamma, gamma_stride) = param_rows(weight, input, op, "weight");
  std::tie(beta, beta_stride) = param_rows(bias, input, op, "bias");
  const auto stats = input.options().dtype(acc_type(input));
  Tensor y = at::empty({n, m, d}, input.options());
  Tensor mean = rms ? at::empty({0}, stats) : at::empty({n, m}, stats);
  Tensor rstd = at::empty({n, m}, stats);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "persample_row_norm_forward", [&] {
    using acc_t = persample_cpu::acc_t<scalar_t>;
    persample_cpu::row_norm_forward<scalar_t>(
        {input.const_data_ptr<scalar_t>(), data_or_null<acc_t>(gamma),
         data_or_null<acc_t>(beta), gamma_stride, beta_stride, n, m, d, rms, eps,
         y.mutable_data_ptr<scalar_t>(), rms ? nullptr : mean.mutable_data_ptr<acc_t>(),
         rstd.mutable_data_ptr<acc_t>()}, isa());
  });
  return {y, mean, rstd};
}

Tensor3 row_norm_backward(const Tensor& grad_out, const Tensor& input_, const Tensor& mean,
                          const Tensor& rstd, const OptTensor& weight, bool rms,
                          std::array<bool, 3> mask) {
  constexpr const char* op = "persample::_cpu_row_norm_backward";
  check_input(input_, op);
  TORCH_CHECK(grad_out.sizes() == input_.sizes() &&
                  grad_out.scalar_type() == input_.scalar_type() && grad_out.is_cpu(),
              op, ": grad_out must match the input's shape and dtype");
  const int64_t n = input_.size(0), m = input_.size(1), d = input_.size(2);
  for (const Tensor* s : {&rstd, &mean}) {
    if (s == &mean && rms) continue;  // unread
    TORCH_CHECK(s->numel() == n * m && s->scalar_type() == acc_type(input_) && s->is_cpu(),
                op, ": the statistics must be N * M values of the forward's dtype");
  }
  const Tensor input = input_.contiguous(), dy = grad_out.contiguous();
  const Tensor rstd_c = rstd.contiguous(), mean_c = rms ? rstd_c : mean.contiguous();
  OptTensor gamma;
  int64_t gamma_stride;
  std::tie(gamma, gamma_stride) = param_rows(weight, input, op, "weight");
  mask[2] = mask[2] && !rms;
  const auto opts = input.options(), acc = opts.dtype(acc_type(input));
  Tensor gi = mask[0] ? at::empty({n, m, d}, opts) : at::empty({0}, opts);
  Tensor gw = mask[1] ? at::empty({n, d}, acc) : at::empty({0}, acc);
  Tensor gb = mask[2] ? at::empty({n, d}, acc) : at::empty({0}, acc);
  if (n * m == 0) {  // sums over no rows
    gw.zero_();
    gb.zero_();
    return {gi, gw, gb};
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(),
                                  "persample_row_norm_backward", [&] {
    using acc_t = persample_cpu::acc_t<scalar_t>;
    persample_cpu::row_norm_backward<scalar_t>(
        {dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
         rms ? nullptr : mean_c.const_data_ptr<acc_t>(), rstd_c.const_data_ptr<acc_t>(),
         data_or_null<acc_t>(gamma), gamma_stride, n, m, d, rms,
         mask[0] ? gi.mutable_data_ptr<scalar_t>() : nullptr,
         mask[1] ? gw.mutable_data_ptr<acc_t>() : nullptr,
         mask[2] ? gb.mutable_data_ptr<acc_t>() : nullptr}, isa());
  });
  return {gi, gw, gb};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persample, m) {
  // [N, M, D] input, each row normalised on its own; weight and bias [D] or [N, D].
  // Returns (y, mean, rstd), mean [N, M] (empty for rms), rstd [N, M].
  m.def("_cpu_row_norm_forward(Tensor input, Tensor? weight, Tensor? bias, bool rms, "
        "float eps) -> (Tensor, Tensor, Tensor)");
  // Returns (grad_input, grad_weight [N, D], grad_bias [N, D]), the parameter gradients
  // per sample, summed over its M rows; a masked-out output is empty.
  m.def("_cpu_row_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, "
        "Tensor? weight, bool rms, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(persample, CPU, m) {
  m.impl("_cpu_row_norm_forward", row_norm_forward);
  m.impl("_cpu_row_norm_backward", row_norm_backward);
}
