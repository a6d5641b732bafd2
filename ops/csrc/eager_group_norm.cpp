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
// Function: the forward drives ATen's GroupNorm kernels as ops/aten_kernels.py does; the
// backward is the fused kernels below on CPU, ATen's on the per-sample view on CUDA
// (ops/cuda.py). persample.group_norm calls it in plain eager mode only (ops/eager.py);
// compile, export, torch.func transforms, dispatch modes, subclasses, reduced precision
// and every invalid call go to the public op persample::group_norm, whose Python kernels
// stay the one reference for semantics and error messages. The backward calls
// persample::group_norm_backward through the dispatcher unless nothing could observe
// the call (no grad mode, no mode, plain tensors), as ops/autograd.py does. A second
// private op, persample::_cpu_group_norm_backward, lends the fused kernels to the public
// backward op's CPU kernel (ops/cpu.py), so compiled graphs and torch.func use them too.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <c10/core/impl/TorchDispatchModeTLS.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

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

// ops/layout.py's rule, read why there: a tensor with size-1 dims can be dense in
// several formats, and ATen's kernels pick theirs by suggest_memory_format(), which may
// disagree with ours. So the format is decided once, contiguous first, and ATen gets
// that format's canonical strides. For tensors dense in one of the two (fast_ok).
at::MemoryFormat dense_format(const Tensor& t) {
  return t.is_contiguous() ? at::MemoryFormat::Contiguous : cl_format(t);
}

// ops/layout.output_memory_format: the layout nn.GroupNorm gives its output and
// grad_input, which for an input dense in channels_last only by the strides of size-1
// dims can differ from the one it is computed in (a copy then).
Tensor in_output_format(const Tensor& t, const Tensor& input) {
  const auto fmt = input.is_cpu() && input.dim() >= 4 ? input.suggest_memory_format()
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

// The CPU forward kernels. ATen's channels_last CPU kernel takes the variance as
// E[x^2] - mean^2, which cancels when |mean| >> std (measured in fp32 at mean/std = 1e3:
// output error 0.29, against 8e-5 from its contiguous kernel, whose fp32 variance
// still costs ~2e-5 relative in rstd at 1e4). These take each block's mean and squared
// deviations while the block is in cache and merge blocks (and channels) with Chan's
// update, in double: x is read from memory once for the statistics, then once to write
// y = (x - mean) * rstd * gamma + beta, with shared or per-sample parameters. Block
// sums run on x minus a pivot (the first row or element), so that they stay near the
// data's spread rather than its mean, where T's rounding would dominate. The mean is
// applied as T's nearest value plus T's rounding error of it (x - hi is exact near the
// mean), which keeps the precision a mean rounded to T would lose.
template <typename T>
struct ForwardArgs {
  const T* x;
  const T *gamma, *beta;                     // nullptr: absent
  int64_t gamma_row_stride, beta_row_stride;  // 0: one row shared by all samples
  int64_t n, length, c, groups;
  double eps;
  T *y, *mean, *rstd;
};

template <typename T>
void forward_channels_last_kernel(const ForwardArgs<T>& a) {
  const int64_t c = a.c, d = c / a.groups, length = a.length;
  constexpr int64_t kBlock = 64;  // rows
  at::parallel_for(0, a.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> run_mean(c), run_m2(c);
    std::vector<T> block_sum(c), block_mean(c), block_sq(c), centre(c), centre_lo(c), scale(c),
        shift(c);
    for (int64_t i = begin; i < end; ++i) {
      const T* x_i = a.x + i * length * c;
      const T* __restrict__ pivot = x_i;  // the first row
      std::fill(run_mean.begin(), run_mean.end(), 0.0);
      std::fill(run_m2.begin(), run_m2.end(), 0.0);
      T* __restrict__ bs = block_sum.data();
      T* __restrict__ bm = block_mean.data();
      T* __restrict__ bq = block_sq.data();
      for (int64_t l0 = 0; l0 < length; l0 += kBlock) {
        const int64_t l1 = std::min(length, l0 + kBlock);
        const T rows = static_cast<T>(l1 - l0);
        std::fill(block_sum.begin(), block_sum.end(), T(0));
        std::fill(block_sq.begin(), block_sq.end(), T(0));
        for (int64_t l = l0; l < l1; ++l) {
          const T* __restrict__ row = x_i + l * c;
          for (int64_t j = 0; j < c; ++j) bs[j] += row[j] - pivot[j];
        }
        for (int64_t j = 0; j < c; ++j) bm[j] = bs[j] / rows;
        for (int64_t l = l0; l < l1; ++l) {
          const T* __restrict__ row = x_i + l * c;
          for (int64_t j = 0; j < c; ++j) {
            const T dev = (row[j] - pivot[j]) - bm[j];
            bq[j] += dev * dev;
          }
        }
        const double seen = static_cast<double>(l0), added = static_cast<double>(l1 - l0);
        const double w = added / (seen + added);
        for (int64_t j = 0; j < c; ++j) {
          // run_mean is relative to the pivot too, until the groups below.
          const double delta = static_cast<double>(bm[j]) - run_mean[j];
          run_mean[j] += delta * w;
          run_m2[j] += static_cast<double>(bq[j]) + delta * delta * seen * w;
        }
      }
      const T* gamma_i = a.gamma ? a.gamma + i * a.gamma_row_stride : nullptr;
      const T* beta_i = a.beta ? a.beta + i * a.beta_row_stride : nullptr;
      for (int64_t g = 0; g < a.groups; ++g) {
        // Every channel has `length` elements: the group's mean is the channels' mean.
        double mean = 0, m2 = 0;
        for (int64_t j = g * d; j < (g + 1) * d; ++j) {
          run_mean[j] += static_cast<double>(pivot[j]);
          mean += run_mean[j];
        }
        mean /= static_cast<double>(d);
        for (int64_t j = g * d; j < (g + 1) * d; ++j) {
          const double dev = run_mean[j] - mean;
          m2 += run_m2[j] + static_cast<double>(length) * dev * dev;
        }
        const double rstd = 1.0 / std::sqrt(m2 / static_cast<double>(d * length) + a.eps);
        a.mean[i * a.groups + g] = static_cast<T>(mean);
        a.rstd[i * a.groups + g] = static_cast<T>(rstd);
        const T mean_hi = static_cast<T>(mean);
        const T mean_lo = static_cast<T>(mean - static_cast<double>(mean_hi));
        for (int64_t j = g * d; j < (g + 1) * d; ++j) {
          centre[j] = mean_hi;
          centre_lo[j] = mean_lo;
          scale[j] = static_cast<T>(rstd * (gamma_i ? static_cast<double>(gamma_i[j]) : 1.0));
          shift[j] = beta_i ? beta_i[j] : T(0);
        }
      }
      const T* __restrict__ m = centre.data();
      const T* __restrict__ m_lo = centre_lo.data();
      const T* __restrict__ k = scale.data();
      const T* __restrict__ b = shift.data();
      for (int64_t l = 0; l < length; ++l) {
        const T* __restrict__ row = x_i + l * c;
        T* __restrict__ out = a.y + (i * length + l) * c;
        for (int64_t j = 0; j < c; ++j) out[j] = ((row[j] - m[j]) - m_lo[j]) * k[j] + b[j];
      }
    }
  });
}

// Contiguous: per (n, g), D * L consecutive elements.
template <typename T>
void forward_contiguous_kernel(const ForwardArgs<T>& a) {
  const int64_t d = a.c / a.groups, length = a.length, size = d * length;
  constexpr int64_t kBlock = 1024;  // elements
  at::parallel_for(0, a.n * a.groups, 1, [&](int64_t begin, int64_t end) {
    for (int64_t ig = begin; ig < end; ++ig) {
      const int64_t i = ig / a.groups, j0 = (ig % a.groups) * d;
      const T* __restrict__ x_g = a.x + ig * size;
      const T pivot = x_g[0];
      double run_mean = 0, run_m2 = 0;  // relative to the pivot
      for (int64_t l0 = 0; l0 < size; l0 += kBlock) {
        const int64_t l1 = std::min(size, l0 + kBlock);
        T block_sum = 0, block_sq = 0;
#pragma omp simd reduction(+ : block_sum)
        for (int64_t l = l0; l < l1; ++l) block_sum += x_g[l] - pivot;
        const T block_mean = block_sum / static_cast<T>(l1 - l0);
#pragma omp simd reduction(+ : block_sq)
        for (int64_t l = l0; l < l1; ++l) {
          const T dev = (x_g[l] - pivot) - block_mean;
          block_sq += dev * dev;
        }
        const double seen = static_cast<double>(l0), added = static_cast<double>(l1 - l0);
        const double w = added / (seen + added);
        const double delta = static_cast<double>(block_mean) - run_mean;
        run_mean += delta * w;
        run_m2 += static_cast<double>(block_sq) + delta * delta * seen * w;
      }
      const double mean = run_mean + static_cast<double>(pivot);
      const double rstd = 1.0 / std::sqrt(run_m2 / static_cast<double>(size) + a.eps);
      a.mean[ig] = static_cast<T>(mean);
      a.rstd[ig] = static_cast<T>(rstd);
      const T mean_hi = static_cast<T>(mean);
      const T mean_lo = static_cast<T>(mean - static_cast<double>(mean_hi));
      const T* gamma = a.gamma ? a.gamma + i * a.gamma_row_stride + j0 : nullptr;
      const T* beta = a.beta ? a.beta + i * a.beta_row_stride + j0 : nullptr;
      for (int64_t j = 0; j < d; ++j) {
        const T k = static_cast<T>(rstd * (gamma ? static_cast<double>(gamma[j]) : 1.0));
        const T b = beta ? beta[j] : T(0);
        const T* __restrict__ row = x_g + j * length;
        T* __restrict__ out = a.y + ig * size + j * length;
#pragma omp simd
        for (int64_t l = 0; l < length; ++l) out[l] = ((row[l] - mean_hi) - mean_lo) * k + b;
      }
    }
  });
}

// The forward op's result for a dense (contiguous or channels_last) CPU input; the
// public op's CPU kernel (ops/cpu.py) calls it too.
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
    const auto kernel = fmt == at::MemoryFormat::Contiguous ? forward_contiguous_kernel<scalar_t>
                                                             : forward_channels_last_kernel<scalar_t>;
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
  // ATen's CUDA GroupNorm has no channels_last kernel; like ops/cuda.py, this runs it on
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

// The fused backward kernels below read dy and x once for their per-(n, c) sums, which
// give the per-sample dgamma and dbeta, then write grad_input from the same data: the
// memory traffic of a forward pass. ATen's kernels read both twice and sum dgamma over
// the batch, so ops/aten_kernels.py needs extra passes on channels_last.
//
// They sum dy * (x - mean) where ATen sums dy * x and subtracts mean * sum(dy): the same
// quantity, without ATen's cancellation when |mean| >> std (BRIEF: 1.7e-3 relative
// error in fp32 at mean/std = 1e4). Sums run in T over blocks, which keeps the inner
// loops vectorisable, and add up in double.

// One (n, g) group, from its D channels' sums dyx[j] = sum dy * (x - mean) and
// dy_sum[j] = sum dy, and lo = mean(x - mean), what the saved mean, rounded to T, is
// short of the group's mean: the per-sample dgamma and dbeta (where asked for), and
// the grad_input coefficients, dx = c1[j] * dy + c2 * (x - mean) + c3. Measuring from
// the exact mean (mean + lo) keeps the saved mean's rounding out of the results; ATen's
// form, c2 * x + c3 - c2 * mean, would also cancel when |mean| >> std.
template <typename T>
void finish_group(const double* dyx, const double* dy_sum, double lo, const T* gamma,
                  int64_t d, double rstd, double inv_count, T* grad_weight, T* grad_bias,
                  T* c1, T& c2, T& c3) {
  double gamma_dyx = 0, gamma_dy = 0;
  for (int64_t j = 0; j < d; ++j) {
    const double gam = gamma ? static_cast<double>(gamma[j]) : 1.0;
    const double centred = dyx[j] - lo * dy_sum[j];
    if (grad_weight) grad_weight[j] = static_cast<T>(centred * rstd);
    if (grad_bias) grad_bias[j] = static_cast<T>(dy_sum[j]);
    gamma_dyx += gam * centred;
    gamma_dy += gam * dy_sum[j];
    c1[j] = static_cast<T>(rstd * gam);
  }
  const double b = -gamma_dyx * rstd * rstd * rstd * inv_count;
  c2 = static_cast<T>(b);
  c3 = static_cast<T>(-gamma_dy * rstd * inv_count - b * lo);
}

// The arguments of both fused kernels: dense arrays in the input's layout.
template <typename T>
struct BackwardArgs {
  const T *dy, *x, *mean, *rstd;
  const T* gamma;            // nullptr: no weight
  int64_t gamma_row_stride;  // 0: one row shared by all samples
  int64_t n, length, c, groups;
  T *grad_input, *grad_weight, *grad_bias;  // nullptr where not wanted

  int64_t d() const { return c / groups; }
  double inv_count() const { return 1.0 / static_cast<double>(d() * length); }
};

// channels_last: per sample, L rows of C channels.
template <typename T>
void backward_channels_last_kernel(const BackwardArgs<T>& a) {
  const int64_t c = a.c, d = a.d();  // locals: loop bounds the vectoriser can trust
  const double inv_count = a.inv_count();
  constexpr int64_t kBlock = 64;  // rows
  at::parallel_for(0, a.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dyx(c), dy_sum(c), x_dev(c);
    std::vector<T> mean_c(c), block_dyx(c), block_dy(c), block_x(c), c1(c), c2(c), c3(c);
    for (int64_t i = begin; i < end; ++i) {
      const T* dy_i = a.dy + i * a.length * c;
      const T* x_i = a.x + i * a.length * c;
      for (int64_t j = 0; j < c; ++j) mean_c[j] = a.mean[i * a.groups + j / d];
      std::fill(dyx.begin(), dyx.end(), 0.0);
      std::fill(dy_sum.begin(), dy_sum.end(), 0.0);
      std::fill(x_dev.begin(), x_dev.end(), 0.0);
      const T* __restrict__ m = mean_c.data();
      T* __restrict__ bdyx = block_dyx.data();
      T* __restrict__ bdy = block_dy.data();
      T* __restrict__ bx = block_x.data();
      for (int64_t l0 = 0; l0 < a.length; l0 += kBlock) {
        std::fill(block_dyx.begin(), block_dyx.end(), T(0));
        std::fill(block_dy.begin(), block_dy.end(), T(0));
        std::fill(block_x.begin(), block_x.end(), T(0));
        for (int64_t l = l0; l < std::min(a.length, l0 + kBlock); ++l) {
          const T* __restrict__ dy_row = dy_i + l * c;
          const T* __restrict__ x_row = x_i + l * c;
          for (int64_t j = 0; j < c; ++j) {
            const T dev = x_row[j] - m[j];
            bdyx[j] += dy_row[j] * dev;
            bdy[j] += dy_row[j];
            bx[j] += dev;
          }
        }
        for (int64_t j = 0; j < c; ++j) {
          dyx[j] += bdyx[j];
          dy_sum[j] += bdy[j];
          x_dev[j] += bx[j];
        }
      }
      const T* gamma_i = a.gamma ? a.gamma + i * a.gamma_row_stride : nullptr;
      for (int64_t g = 0; g < a.groups; ++g) {
        const int64_t j0 = g * d;
        T group_c2, group_c3;
        double lo = 0;
        for (int64_t j = j0; j < j0 + d; ++j) lo += x_dev[j];
        finish_group(dyx.data() + j0, dy_sum.data() + j0, lo * inv_count,
                     gamma_i ? gamma_i + j0 : nullptr, d,
                     a.rstd[i * a.groups + g], inv_count,
                     a.grad_weight ? a.grad_weight + i * c + j0 : nullptr,
                     a.grad_bias ? a.grad_bias + i * c + j0 : nullptr, c1.data() + j0, group_c2,
                     group_c3);
        std::fill(c2.begin() + j0, c2.begin() + j0 + d, group_c2);
        std::fill(c3.begin() + j0, c3.begin() + j0 + d, group_c3);
      }
      if (!a.grad_input) continue;
      const T* __restrict__ k1 = c1.data();
      const T* __restrict__ k2 = c2.data();
      const T* __restrict__ k3 = c3.data();
      for (int64_t l = 0; l < a.length; ++l) {
        const T* __restrict__ dy_row = dy_i + l * c;
        const T* __restrict__ x_row = x_i + l * c;
        T* __restrict__ dx_row = a.grad_input + (i * a.length + l) * c;
        for (int64_t j = 0; j < c; ++j) {
          dx_row[j] = k1[j] * dy_row[j] + k2[j] * (x_row[j] - m[j]) + k3[j];
        }
      }
    }
  });
}

// sum(dy * (x - mean)), sum(dy) and sum(x - mean) over one contiguous row (omp simd
// licenses the reassociation that vectorising a reduction needs).
template <typename T>
void row_sums(const T* __restrict__ dy, const T* __restrict__ x, T mean, int64_t length,
              double& dyx, double& dy_sum, double& x_dev) {
  constexpr int64_t kBlock = 1024;
  dyx = dy_sum = x_dev = 0;
  for (int64_t l0 = 0; l0 < length; l0 += kBlock) {
    const int64_t l1 = std::min(length, l0 + kBlock);
    T block_dyx = 0, block_dy = 0, block_x = 0;
#pragma omp simd reduction(+ : block_dyx, block_dy, block_x)
    for (int64_t l = l0; l < l1; ++l) {
      const T dev = x[l] - mean;
      block_dyx += dy[l] * dev;
      block_dy += dy[l];
      block_x += dev;
    }
    dyx += block_dyx;
    dy_sum += block_dy;
    x_dev += block_x;
  }
}

// Contiguous: per (n, g), D rows of L elements, summed and then written while they are
// still in cache.
template <typename T>
void backward_contiguous_kernel(const BackwardArgs<T>& a) {
  const int64_t length = a.length, d = a.d();  // locals: see above
  const double inv_count = a.inv_count();
  at::parallel_for(0, a.n * a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dyx(d), dy_sum(d), x_dev(d);
    std::vector<T> c1(d);
    for (int64_t ig = begin; ig < end; ++ig) {
      const int64_t i = ig / a.groups, j0 = (ig % a.groups) * d;
      const T* dy_g = a.dy + (i * a.c + j0) * length;
      const T* x_g = a.x + (i * a.c + j0) * length;
      double lo = 0;
      for (int64_t j = 0; j < d; ++j) {
        row_sums(dy_g + j * length, x_g + j * length, a.mean[ig], length, dyx[j], dy_sum[j],
                 x_dev[j]);
        lo += x_dev[j];
      }
      T c2, c3;
      finish_group(dyx.data(), dy_sum.data(), lo * inv_count,
                   a.gamma ? a.gamma + i * a.gamma_row_stride + j0 : nullptr, d,
                   a.rstd[ig], inv_count, a.grad_weight ? a.grad_weight + i * a.c + j0 : nullptr,
                   a.grad_bias ? a.grad_bias + i * a.c + j0 : nullptr, c1.data(), c2, c3);
      if (!a.grad_input) continue;
      for (int64_t j = 0; j < d; ++j) {
        const T* __restrict__ dy_row = dy_g + j * length;
        const T* __restrict__ x_row = x_g + j * length;
        T* __restrict__ dx_row = a.grad_input + (i * a.c + j0 + j) * length;
        const T k1 = c1[j], mean = a.mean[ig];
        for (int64_t l = 0; l < length; ++l) {
          dx_row[l] = k1 * dy_row[l] + c2 * (x_row[l] - mean) + c3;
        }
      }
    }
  });
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
    const auto kernel = contiguous ? backward_contiguous_kernel<scalar_t>
                                   : backward_channels_last_kernel<scalar_t>;
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
    return {out};
  }

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

Tensor eager_group_norm(const Tensor& input, int64_t groups, const OptTensor& weight,
                        const OptTensor& bias, double eps) {
  if (!fast_ok(input, groups, weight, bias, eps)) {
    return std::get<0>(public_forward().call(input, groups, weight, bias, eps));
  }
  return persample::EagerGroupNorm::apply(input, groups, weight, bias, eps)[0];
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(persample, m) {
  m.def("_eager_group_norm(Tensor input, int num_groups, Tensor? weight=None, "
        "Tensor? bias=None, float eps=1e-05) -> Tensor");
  // The backward kernel alone, for the public backward op's CPU kernel (ops/cpu.py),
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
}
