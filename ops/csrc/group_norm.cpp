// The eager fast path of persample.group_norm, in C++.
//
// Why: in eager mode, the Python autograd Function and Python kernels of
// persample::group_norm cost 10-25% over plain nn.GroupNorm on CPU, even at large
// shapes, where each big ATen kernel evicts the interpreter from the caches; and ATen's
// backward reads its inputs twice, which the per-sample rows, on channels_last, make
// three times (measured in BRIEF's shapes: 1.22x plain with the Python path). On CUDA,
// where the kernels take microseconds, the Python layers are most of the cost (measured
// on an H200: 1.40x plain).
//
// What: a private op, persample::_eager_group_norm, whose kernel is an autograd
// Function: on CPU its forward and backward are the fused kernels of group_norm_kernels.h, on
// CUDA ATen's kernels on the per-sample view, as ops/group_norm/cuda.py's fallback drives them.
// persample.group_norm calls it in plain eager mode only (ops/group_norm/eager.py);
// compile, export, torch.func transforms, dispatch modes, subclasses, reduced precision
// and every invalid call go to the public op persample::group_norm, whose Python kernels
// stay the one reference for semantics and error messages. The backward calls
// persample::group_norm_backward through the dispatcher unless nothing could observe
// the call (no grad mode, no mode, plain tensors), as ops/autograd.py does. Two more
// private ops, persample::_cpu_group_norm_forward and _cpu_group_norm_backward, lend
// the fused kernels to the public ops' CPU kernels (ops/group_norm/cpu.py), so that compiled
// graphs, torch.func and Opacus use them too.

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <vector>

#include "group_norm_kernels.h"

namespace {

using at::Tensor;
using OptTensor = std::optional<Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

auto& public_forward() {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("persample::group_norm", "")
      .typed<Tensor3(const Tensor&, int64_t, const OptTensor&, const OptTensor&, double)>();
  return op;
}

auto& public_backward() {
  static auto op = c10::Dispatcher::singleton()
      .findSchemaOrThrow("persample::group_norm_backward", "")
      .typed<Tensor3(const Tensor&, const Tensor&, const Tensor&, const Tensor&,
                     const OptTensor&, int64_t, std::array<bool, 3>, double)>();
  return op;
}

// A dense CPU or CUDA tensor that no subclass, wrapper or functorch level stands behind.
bool plain(const Tensor& t) {
  static const auto allowed = c10::DispatchKeySet({
      c10::DispatchKey::CPU, c10::DispatchKey::AutogradCPU, c10::DispatchKey::AutocastCPU,
      c10::DispatchKey::CUDA, c10::DispatchKey::AutogradCUDA, c10::DispatchKey::AutocastCUDA,
      c10::DispatchKey::ADInplaceOrView});
  // Set difference keeps backend bits, so one backend's bit is all that may be left.
  static const auto cpu_only = c10::DispatchKeySet(c10::BackendComponent::CPUBit);
  static const auto cuda_only = c10::DispatchKeySet(c10::BackendComponent::CUDABit);
  const auto rest = t.key_set() - allowed;
  return t.layout() == at::kStrided && (t.is_cpu() || t.is_cuda()) &&
         (rest.empty() || rest == cpu_only || rest == cuda_only);
}

// No mode, transform or tracer intercepts calls on this thread.
bool nothing_intercepts() {
  const auto tls = c10::impl::tls_local_dispatch_key_set();
  return (tls.included_ - c10::default_included_set).empty() &&
         c10::impl::TorchDispatchModeTLS::stack_len() == 0;
}

at::MemoryFormat cl_format(const Tensor& t) {
  return t.dim() == 4 ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::ChannelsLast3d;
}

bool channels_last(const Tensor& t) {
  return (t.dim() == 4 || t.dim() == 5) && t.is_contiguous(cl_format(t));
}

// ops/group_norm/layout.py's rule, read why there: a tensor with size-1 dims can be dense in
// several formats, and ATen's kernels pick theirs by suggest_memory_format(), which may
// disagree with ours. So the format is decided once, contiguous first, and ATen gets
// that format's canonical strides. For tensors dense in one of the two (fast_ok).
at::MemoryFormat dense_format(const Tensor& t) {
  return t.is_contiguous() ? at::MemoryFormat::Contiguous : cl_format(t);
}

// ops/layout.output_memory_format: the layout nn.GroupNorm gives its output and
// grad_input on CPU, on every device (on CUDA, where ATen computes on a contiguous copy,
// a copy back to channels_last), and which for an input dense in channels_last only by
// the strides of size-1 dims can differ from the one it is computed in (a copy then).
Tensor in_output_format(const Tensor& t, const Tensor& input) {
  const auto fmt = input.dim() >= 4 ? input.suggest_memory_format()
                                    : at::MemoryFormat::Contiguous;
  return t.is_contiguous(fmt) ? t : t.contiguous(fmt);
}

// t's values, dense in fmt, with fmt's canonical strides (a free view when t is dense).
Tensor canonical(const Tensor& t, at::MemoryFormat fmt) {
  const Tensor d = t.is_contiguous(fmt) ? t : t.contiguous(fmt);
  const auto sizes = d.sizes();
  std::vector<int64_t> strides;
  if (fmt == at::MemoryFormat::Contiguous) {
    strides.resize(sizes.size());
    int64_t s = 1;
    for (int64_t i = static_cast<int64_t>(sizes.size()) - 1; i >= 0; --i) {
      strides[i] = s;
      s *= std::max<int64_t>(sizes[i], 1);
    }
  } else if (fmt == at::MemoryFormat::ChannelsLast) {
    strides = c10::get_channels_last_strides_2d(sizes);
  } else {
    strides = c10::get_channels_last_strides_3d(sizes);
  }
  return d.strides() == c10::IntArrayRef(strides) ? d : d.as_strided(sizes, strides);
}

bool param_ok(const OptTensor& p, const Tensor& input) {
  if (!p.has_value()) return true;
  const Tensor& t = *p;
  if (!plain(t) || t.device() != input.device() || t.scalar_type() != input.scalar_type()) {
    return false;
  }
  const int64_t c = input.size(1);
  return (t.dim() == 1 && t.size(0) == c) ||
         (t.dim() == 2 && t.size(0) == input.size(0) && t.size(1) == c);
}

// The calls this file handles; the rest take the public op, which handles (or rejects)
// them all.
bool fast_ok(const Tensor& input, int64_t groups, const OptTensor& weight,
             const OptTensor& bias, double eps) {
  const auto dtype = input.scalar_type();
  return plain(input) && (dtype == at::kFloat || dtype == at::kDouble) &&
         input.dim() >= 2 && input.numel() > 0 && groups > 0 &&
         input.size(1) % groups == 0 && eps >= 0 &&
         (input.is_contiguous() || channels_last(input)) &&
         param_ok(weight, input) && param_ok(bias, input) && nothing_intercepts();
}

// aten_kernels.shared_row: the [C] row of a parameter that does not vary over N.
OptTensor shared_row(const OptTensor& p) {
  if (!p.has_value() || p->dim() == 1) return p;
  const Tensor& t = *p;
  if (t.size(0) == 1 || t.stride(0) == 0) return t.select(0, 0);
  return std::nullopt;
}

// ATen's kernels read params and statistics as dense arrays without checking strides.
OptTensor dense(const OptTensor& p) {
  return p.has_value() ? OptTensor(p->contiguous()) : p;
}

// aten_kernels._flat: the [N*C] weight of the per-sample view.
Tensor flat(const OptTensor& p, int64_t n, int64_t c, const Tensor& input) {
  if (!p.has_value()) return at::ones({n * c}, input.options());
  return p->dim() == 1 ? p->repeat({n}) : p->reshape({n * c}).contiguous();
}

// The forward op's result for a dense (contiguous or channels_last) CPU input; the
// public op's CPU kernel (ops/group_norm/cpu.py) calls it too.
Tensor3 forward_cpu(const Tensor& input_, int64_t groups, const OptTensor& weight,
                    const OptTensor& bias, double eps) {
  const auto fmt = dense_format(input_);
  const Tensor input = canonical(input_, fmt);
  const int64_t n = input.size(0), c = input.size(1), length = input.numel() / (n * c);
  const OptTensor gamma = dense(weight), beta = dense(bias);
  Tensor out = at::empty_like(input, fmt);
  Tensor mean = at::empty({n, groups}, input.options());
  Tensor rstd = at::empty({n, groups}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "persample_forward_cpu", [&] {
    const auto kernel = fmt == at::MemoryFormat::Contiguous
                            ? persample_cpu::forward_contiguous<scalar_t>
                            : persample_cpu::forward_channels_last<scalar_t>;
    kernel({input.const_data_ptr<scalar_t>(),
            gamma ? gamma->const_data_ptr<scalar_t>() : nullptr,
            beta ? beta->const_data_ptr<scalar_t>() : nullptr,
            gamma && gamma->dim() == 2 ? c : 0, beta && beta->dim() == 2 ? c : 0,
            n, length, c, groups, eps,
            out.mutable_data_ptr<scalar_t>(), mean.mutable_data_ptr<scalar_t>(),
            rstd.mutable_data_ptr<scalar_t>()});
  });
  return {out, mean, rstd};
}

Tensor3 forward_kernel(const Tensor& input_, int64_t groups, const OptTensor& weight,
                       const OptTensor& bias, double eps) {
  if (input_.is_cpu()) return forward_cpu(input_, groups, weight, bias, eps);
  // ATen's CUDA GroupNorm has no channels_last kernel; like ops/group_norm/cuda.py, this runs it on
  // a contiguous copy, and so does the backward.
  const Tensor input = canonical(input_, at::MemoryFormat::Contiguous);
  const int64_t n = input.size(0), c = input.size(1), length = input.numel() / (n * c);
  const auto w_row = shared_row(weight), b_row = shared_row(bias);
  if ((w_row || !weight) && (b_row || !bias)) {
    return at::native_group_norm(input, dense(w_row), dense(b_row), n, c, length, groups, eps);
  }
  auto [out, mean, rstd] = at::native_group_norm(
      input, weight ? OptTensor(flat(weight, n, c, input)) : weight,
      bias ? OptTensor(flat(bias, n, c, input)) : bias,
      1, n * c, length, n * groups, eps);
  return {out, mean.view({n, groups}), rstd.view({n, groups})};
}

// The backward op's result for a validated call; masked-out grads are undefined.
Tensor3 backward_kernel(const Tensor& grad_out, const Tensor& input_, const Tensor& mean,
                        const Tensor& rstd, const OptTensor& weight, int64_t groups,
                        std::array<bool, 3> mask) {
  // See the forward; grad_out takes the input's layout.
  const auto fmt = input_.is_cuda() ? at::MemoryFormat::Contiguous : dense_format(input_);
  const Tensor input = canonical(input_, fmt), dy = canonical(grad_out, fmt);
  const int64_t n = input.size(0), c = input.size(1), length = input.numel() / (n * c);
  const bool contiguous = fmt == at::MemoryFormat::Contiguous;
  // ATen's kernels on the per-sample view on CUDA (contiguous there, see the forward).
  // On CPU always the fused kernels, short rows included, for their precision when
  // |mean| >> std (measured single-threaded: 0.9x ATen's time at L = 64, 1.25x at 16).
  if (input.is_cuda()) {
    auto [gi, gw, gb] = at::native_group_norm_backward(
        dy, input, mean.contiguous(), rstd.contiguous(),
        flat(weight, n, c, input), 1, n * c, length, n * groups, mask);
    return {gi, mask[1] ? gw.view({n, c}) : Tensor(), mask[2] ? gb.view({n, c}) : Tensor()};
  }
  const Tensor mean_c = mean.contiguous(), rstd_c = rstd.contiguous();
  const OptTensor gamma = dense(weight);
  Tensor gi, gw, gb;
  if (mask[0]) gi = at::empty_like(input, fmt);
  if (mask[1]) gw = at::empty({n, c}, input.options());
  if (mask[2]) gb = at::empty({n, c}, input.options());
  AT_DISPATCH_FLOATING_TYPES(input.scalar_type(), "persample_backward", [&] {
    const auto kernel = contiguous ? persample_cpu::backward_contiguous<scalar_t>
                                   : persample_cpu::backward_channels_last<scalar_t>;
    kernel({dy.const_data_ptr<scalar_t>(), input.const_data_ptr<scalar_t>(),
            mean_c.const_data_ptr<scalar_t>(), rstd_c.const_data_ptr<scalar_t>(),
            gamma ? gamma->const_data_ptr<scalar_t>() : nullptr,
            gamma && gamma->dim() == 2 ? c : 0, n, length, c, groups,
            mask[0] ? gi.mutable_data_ptr<scalar_t>() : nullptr,
            mask[1] ? gw.mutable_data_ptr<scalar_t>() : nullptr,
            mask[2] ? gb.mutable_data_ptr<scalar_t>() : nullptr});
  });
  return {gi, gw, gb};
}

}  // namespace

// Named (not anonymous) for the autograd node's name: CppNode<persample::EagerGroupNorm>.
namespace persample {

class EagerGroupNorm : public torch::autograd::Function<EagerGroupNorm> {
 public:
  static variable_list forward(AutogradContext* ctx, const Tensor& input, int64_t groups,
                               const OptTensor& weight, const OptTensor& bias, double eps) {
    // Grad mode is off in here: nothing below autograd needs to run the autograd kernels.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    auto [out, mean, rstd] = forward_kernel(input, groups, weight, bias, eps);
    out = in_output_format(out, input);
    ctx->saved_data["groups"] = groups;
    ctx->saved_data["eps"] = eps;
    // The weight is saved; of the bias only its presence and rank matter (a shared [C]
    // parameter's gradient is the batch sum, as nn.GroupNorm gives it).
    ctx->saved_data["has_bias"] = bias.has_value();
    ctx->saved_data["sum_bias"] = bias.has_value() && bias->dim() == 1;
    ctx->save_for_backward({input, mean, rstd, weight.value_or(Tensor())});
    ctx->mark_non_differentiable({mean, rstd});
    return {out, mean, rstd};
  }

  // grads[0] only: the statistics are not differentiable.
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &mean = saved[1], &rstd = saved[2];
    const OptTensor weight = saved[3].defined() ? OptTensor(saved[3]) : std::nullopt;
    const bool has_weight = weight.has_value();
    const bool has_bias = ctx->saved_data["has_bias"].toBool();
    const int64_t groups = ctx->saved_data["groups"].toInt();
    // needs_input_grad counts only the tensor arguments that were given.
    const std::array<bool, 3> mask = {
        ctx->needs_input_grad(0), has_weight && ctx->needs_input_grad(1),
        has_bias && ctx->needs_input_grad(has_weight ? 2 : 1)};
    Tensor gi, gw, gb;
    const Tensor& grad_out = grads[0];
    // The engine has already matched grad_out's device to the output's.
    if (!at::GradMode::is_enabled() && nothing_intercepts() && plain(grad_out)) {
      at::AutoDispatchBelowADInplaceOrView below_autograd;
      std::tie(gi, gw, gb) = backward_kernel(grad_out, input, mean, rstd, weight, groups, mask);
      if (gi.defined()) gi = in_output_format(gi, input);
    } else {
      std::tie(gi, gw, gb) = public_backward().call(
          grad_out, input, mean, rstd, weight, groups, mask, ctx->saved_data["eps"].toDouble());
    }
    if (!mask[0]) gi = Tensor();
    if (!mask[1]) gw = Tensor();
    else if (weight->dim() == 1) gw = gw.sum(0);
    if (!mask[2]) gb = Tensor();
    else if (ctx->saved_data["sum_bias"].toBool()) gb = gb.sum(0);
    return {gi, Tensor(), gw, gb, Tensor()};
  }
};

}  // namespace persample

namespace {

Tensor3 eager_group_norm_stats(const Tensor& input, int64_t groups, const OptTensor& weight,
                               const OptTensor& bias, double eps) {
  if (!fast_ok(input, groups, weight, bias, eps)) {
    return public_forward().call(input, groups, weight, bias, eps);
  }
  auto outs = persample::EagerGroupNorm::apply(input, groups, weight, bias, eps);
  return {outs[0], outs[1], outs[2]};
}

Tensor eager_group_norm(const Tensor& input, int64_t groups, const OptTensor& weight,
                        const OptTensor& bias, double eps) {
  return std::get<0>(eager_group_norm_stats(input, groups, weight, bias, eps));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persample, m) {
  m.def("_eager_group_norm(Tensor input, int num_groups, Tensor? weight=None, "
        "Tensor? bias=None, float eps=1e-05) -> Tensor");
  // The same with the statistics, for a layer whose forward hooks want them
  // (persample.nn.GroupNorm under Opacus's hooks).
  m.def("_eager_group_norm_stats(Tensor input, int num_groups, Tensor? weight=None, "
        "Tensor? bias=None, float eps=1e-05) -> (Tensor, Tensor, Tensor)");
  // The backward kernel alone, for the public backward op's CPU kernel (ops/group_norm/cpu.py),
  // which checks that the call is one it handles. Masked-out outputs are None.
  m.def("_cpu_group_norm_backward(Tensor grad_out, Tensor input, Tensor mean, Tensor rstd, "
        "Tensor? weight, int num_groups, bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
  // The CPU forward kernels alone, for the public forward op's CPU kernel, likewise.
  m.def("_cpu_group_norm_forward(Tensor input, int num_groups, Tensor? weight, "
        "Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(persample, CPU, m) {
  m.impl("_cpu_group_norm_backward", backward_kernel);
  m.impl("_cpu_group_norm_forward", forward_cpu);
}

// CompositeImplicitAutograd: the kernel is its own autograd (the Function above), and it
// also serves calls that reach no autograd key, such as inference-mode tensors.
TORCH_LIBRARY_IMPL(persample, CompositeImplicitAutograd, m) {
  m.impl("_eager_group_norm", eager_group_norm);
  m.impl("_eager_group_norm_stats", eager_group_norm_stats);
}
