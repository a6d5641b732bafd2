// The fused CPU kernels of persample's row norms, LayerNorm and RMSNorm (fp32 and fp64;
// fp16 and bf16 rows staged through fp32, see acc_t), used by row_norm.cpp. The input
// is [N, M, D]: N samples of M rows, each row of D elements normalised on its own; the
// per-sample parameter gradients are [N, D] sums over a sample's M rows.
//
// Forward. A row's statistics come from one pass of shifted sums in T over blocks,
// merged in double (moments.h, as GroupNorm's), so that the variance does not cancel
// when |mean| >> std, as E[x^2] - mean^2 would; RMSNorm's mean of x^2 sums positive
// terms and cannot cancel. A second pass over the row, still in cache, writes
// y = ((x - hi) * rstd + shift) * w + b, where hi is the mean rounded to T and shift
// folds in what hi is short of the exact mean: x - hi is exact near the mean, so no
// precision is lost to a mean rounded to T (RMSNorm: hi = shift = 0, no bias).
//
// Backward. Per row, one pass sums g * (x - mean), g and x - mean (g = dy * w); the
// last measures lo, what the saved mean, rounded to T, is short of the row's exact
// mean, and the first is centred on the exact mean with it. A second pass, over the
// row still in cache, writes grad_input = g * rstd + c2 * (x - mean) + c3 and adds
// dy * xhat and dy into the sample's parameter sums, with xhat = (x - mean - lo) * rstd:
// centred, where ATen's form, sum(dy * x) - mean * sum(dy), cancels when |mean| >> std.
// So dy and x are read from memory once, as a forward pass reads x.
//
// The per-sample sums run over M rows: a sample's rows are split into tasks of about
// kTaskElements elements, so that a few samples of many rows (N = 8, M = 512) still
// keep every thread busy. A task sums in T over blocks of kRows rows, adding them up
// in double, into its own slot of a partial buffer that a last pass reduces and
// rounds. A sample that one task covers goes without the buffer, and one that one
// block covers (M = 1, say) is summed straight into the output. The split depends on
// the shape only, never on the thread count: results are the same on every machine
// that runs the same ISA variant (below).
//
// Measured against stock (torch 2.13 CPU, 1 thread, fp32, mean/std = 1e3 and 1e4):
// the per-sample dgamma's relative error is 1.3e-7 and 8.7e-8, stock's 4.4e-5 and
// 8.1e-4; the output's 9e-8 and 1.1e-7, stock's 2.4e-5 and 4.0e-4.

#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <memory>
#include <type_traits>
#include <vector>

#include "moments.h"

namespace persample_cpu {

constexpr int64_t kTaskElements = 32768;  // per backward task, about
constexpr int64_t kMinParallelElements = 16384;  // per thread, at least

// Runs f(std::true_type) or f(std::false_type): a run-time flag as a template argument.
template <typename F>
inline void with_flag(bool flag, F&& f) {
  if (flag) {
    f(std::true_type{});
  } else {
    f(std::false_type{});
  }
}

// The type a row is computed in: fp16 and bf16 rows are staged through fp32 buffers,
// rounded once on the way out, so that results equal the fp32 kernels' on fp32 copies
// without the copies' memory traffic.
template <typename S>
using acc_t = std::conditional_t<std::is_same_v<S, double>, double, float>;

using u16_alias = uint16_t __attribute__((may_alias));
using u32_alias = uint32_t __attribute__((may_alias));

inline void to_acc(const c10::BFloat16* __restrict__ in, float* __restrict__ out, int64_t d) {
  const auto* bits = reinterpret_cast<const u16_alias*>(in);
  auto* o = reinterpret_cast<u32_alias*>(out);
#pragma omp simd
  for (int64_t l = 0; l < d; ++l) o[l] = static_cast<uint32_t>(bits[l]) << 16;
}

// c10::detail::round_to_nearest_even, in integer operations that vectorise.
inline void from_acc(const float* __restrict__ in, c10::BFloat16* __restrict__ out, int64_t d) {
  const auto* u = reinterpret_cast<const u32_alias*>(in);
  auto* o = reinterpret_cast<u16_alias*>(out);
#pragma omp simd
  for (int64_t l = 0; l < d; ++l) {
    const uint32_t v = u[l];
    const uint32_t rounded = (v + ((v >> 16) & 1) + UINT32_C(0x7FFF)) >> 16;
    o[l] = static_cast<uint16_t>((v & UINT32_C(0x7FFFFFFF)) > UINT32_C(0x7F800000) ? 0x7FC0 : rounded);
  }
}

inline void to_acc(const c10::Half* __restrict__ in, float* __restrict__ out, int64_t d) {
  for (int64_t l = 0; l < d; ++l) out[l] = static_cast<float>(in[l]);
}

inline void from_acc(const float* __restrict__ in, c10::Half* __restrict__ out, int64_t d) {
  for (int64_t l = 0; l < d; ++l) out[l] = static_cast<c10::Half>(in[l]);
}

// A row in T: itself, or staged into buf.
template <typename S, typename T>
inline const T* row_in(const S* row, T* buf, int64_t d) {
  if constexpr (std::is_same_v<S, T>) {
    return row;
  } else {
    to_acc(row, buf, d);
    return buf;
  }
}

// Where a row's output is computed: the output itself, or buf (then row_out).
template <typename S, typename T>
inline T* row_target(S* row, T* buf) {
  if constexpr (std::is_same_v<S, T>) {
    return row;
  } else {
    return buf;
  }
}

template <typename S, typename T>
inline void row_out(const T* buf, S* row, int64_t d) {
  if constexpr (!std::is_same_v<S, T>) from_acc(buf, row, d);
}

template <typename S>
struct RowForwardArgs {
  using T = acc_t<S>;
  const S* x;
  const T *gamma, *beta;              // nullptr: absent
  int64_t gamma_stride, beta_stride;  // from one sample's row to the next; 0: shared
  int64_t n, m, d;                    // samples, rows per sample, row length
  bool rms;
  double eps;
  S* y;
  T *mean, *rstd;  // [N * M] statistics; no mean for RMSNorm
};

template <typename T>
inline double sum_squares(const T* __restrict__ x, int64_t d) {
  constexpr int64_t kBlock = 1024;
  double sum = 0;
  for (int64_t l0 = 0; l0 < d; l0 += kBlock) {
    const int64_t l1 = std::min(d, l0 + kBlock);
    T block = 0;
#pragma omp simd reduction(+ : block)
    for (int64_t l = l0; l < l1; ++l) block += x[l] * x[l];
    sum += block;
  }
  return sum;
}

template <typename T, bool kW, bool kB>
inline void write_row(const T* __restrict__ x, const T* __restrict__ w, const T* __restrict__ b,
                      T hi, T rstd, T shift, T* __restrict__ y, int64_t d) {
#pragma omp simd
  for (int64_t l = 0; l < d; ++l) {
    T v = (x[l] - hi) * rstd + shift;
    if constexpr (kW) v *= w[l];
    if constexpr (kB) v += b[l];
    y[l] = v;
  }
}

// Scratch: 2D Ts for fp16/bf16.
template <typename S, bool kW, bool kB>
void forward_rows(const RowForwardArgs<S>& a, int64_t r0, int64_t r1, acc_t<S>* buf) {
  using T = acc_t<S>;
  const int64_t d = a.d;
  for (int64_t r = r0; r < r1; ++r) {
    const int64_t i = r / a.m;
    const T* x = row_in(a.x + r * d, buf, d);
    T* y = row_target(a.y + r * d, buf + d);
    double mean = 0, var;
    if (a.rms) {
      var = sum_squares(x, d) / static_cast<double>(d);
    } else {
      double m2;
      contiguous_moments(x, d, mean, m2);
      var = m2 / static_cast<double>(d);
    }
    const double rstd = 1.0 / std::sqrt(var + a.eps);
    const T hi = static_cast<T>(mean);
    const double lo = mean - static_cast<double>(hi);
    if (!a.rms) a.mean[r] = hi;
    a.rstd[r] = static_cast<T>(rstd);
    write_row<T, kW, kB>(x, kW ? a.gamma + i * a.gamma_stride : nullptr,
                         kB ? a.beta + i * a.beta_stride : nullptr, hi, static_cast<T>(rstd),
                         static_cast<T>(-lo * rstd), y, d);
    row_out(y, a.y + r * d, d);
  }
}

// Rows [r0, r1), in the variant for the parameters given.
template <typename S>
void forward_chunk(const RowForwardArgs<S>& a, int64_t r0, int64_t r1, acc_t<S>* buf) {
  with_flag(a.gamma != nullptr, [&](auto w) {
    with_flag(a.beta != nullptr, [&](auto b) {
      forward_rows<S, decltype(w)::value, decltype(b)::value>(a, r0, r1, buf);
    });
  });
}

template <typename S>
struct RowBackwardArgs {
  using T = acc_t<S>;
  const S *dy, *x;
  const T *mean, *rstd;  // no mean for RMSNorm
  const T* gamma;        // nullptr: no weight
  int64_t gamma_stride;  // from one sample's row to the next; 0: shared
  int64_t n, m, d;
  bool rms;
  S* grad_input;                // nullptr where not wanted, as the two below
  T *grad_weight, *grad_bias;

  // Rows per task, and tasks per sample.
  int64_t chunk() const {
    return std::clamp<int64_t>((kTaskElements + d - 1) / d, 1, std::max<int64_t>(m, 1));
  }
  int64_t tasks_per_sample() const { return (m + chunk() - 1) / chunk(); }
};

// A row's second pass: grad_input, and its terms of the parameter sums.
template <typename T, bool kW, bool kGI, bool kGW, bool kGB>
inline void backward_row(const T* __restrict__ dy, const T* __restrict__ x,
                         const T* __restrict__ w, T mean, T lo, T rstd, T c2, T c3,
                         T* __restrict__ dx, T* __restrict__ gw, T* __restrict__ gb,
                         int64_t d) {
#pragma omp simd
  for (int64_t l = 0; l < d; ++l) {
    const T dev = x[l] - mean;
    if constexpr (kGI) dx[l] = (kW ? dy[l] * w[l] : dy[l]) * rstd + c2 * dev + c3;
    if constexpr (kGW) gw[l] += dy[l] * ((dev - lo) * rstd);
    if constexpr (kGB) gb[l] += dy[l];
  }
}

// Row r: from its sums, grad_input's coefficients (dx = g * rstd + c2 * (x - mean) + c3
// is rstd * (g - mean(g) - xhat * mean(g * xhat)) with xhat centred on the exact mean),
// then the second pass.
// Scratch: 3D Ts for fp16/bf16.
template <typename S, bool kW, bool kGI, bool kGW, bool kGB>
inline void backward_one_row(const RowBackwardArgs<S>& a, int64_t r, const acc_t<S>* w,
                             acc_t<S>* gw, acc_t<S>* gb, acc_t<S>* buf) {
  using T = acc_t<S>;
  const int64_t d = a.d;
  const T* dy = row_in(a.dy + r * d, buf, d);
  const T* x = row_in(a.x + r * d, buf + d, d);
  const T rstd = a.rstd[r];
  const T mean = a.rms ? T(0) : a.mean[r];
  T lo = 0, c2 = 0, c3 = 0;
  if (kGI || !a.rms) {  // RMSNorm's parameter sums need no row sums
    double s_gx, s_g, s_dev;
    row_sums<T, kW>(dy, x, mean, d, s_gx, s_g, s_dev, w);
    const double rs = static_cast<double>(rstd), inv_d = 1.0 / static_cast<double>(d);
    const double lo_d = a.rms ? 0.0 : s_dev * inv_d;
    const double b = -(s_gx - lo_d * s_g) * rs * rs * rs * inv_d;
    lo = static_cast<T>(lo_d);
    c2 = static_cast<T>(b);
    c3 = a.rms ? T(0) : static_cast<T>(-s_g * rs * inv_d - b * lo_d);
  }
  T* dx = kGI ? row_target(a.grad_input + r * d, buf + 2 * d) : nullptr;
  backward_row<T, kW, kGI, kGW, kGB>(dy, x, w, mean, lo, rstd, c2, c3, dx, gw, gb, d);
  if constexpr (kGI) {
    // A LayerNorm row of one element: its output is beta whatever x is, so dx = 0,
    // exactly, where the formula cancels only to T's rounding of g * rstd (large:
    // rstd = 1/sqrt(eps); group_norm_kernels.h's finish_group, issue 19).
    if (!a.rms && d == 1) dx[0] = T(0);
    row_out(dx, a.grad_input + r * d, d);
  }
}

// Task t: rows [k * chunk, (k + 1) * chunk) of sample t / K, k = t % K.
// Scratch: 2D Ts (5D for fp16/bf16), 2D doubles.
template <typename S, bool kW, bool kGI, bool kGW, bool kGB>
void backward_task(const RowBackwardArgs<S>& a, int64_t t, double* partial, acc_t<S>* tbuf,
                   double* dbuf) {
  using T = acc_t<S>;
  // Rows summed in T before they are added up in double (fp64: all of them).
  constexpr int64_t kRows = std::is_same_v<T, double> ? INT64_MAX : 16;
  constexpr bool kParams = kGW || kGB;
  const int64_t d = a.d, chunk = a.chunk(), tasks = a.tasks_per_sample();
  const int64_t i = t / tasks, k = t % tasks;
  const int64_t r0 = i * a.m + k * chunk, r1 = i * a.m + std::min(a.m, (k + 1) * chunk);
  const T* w = kW ? a.gamma + i * a.gamma_stride : nullptr;
  // Sums straight into the output when one block covers the sample; else blocks add
  // into double: the task's slot of the partial buffer, or dbuf (rounded at the end).
  const bool direct = tasks == 1 && r1 - r0 <= kRows;
  T* bw = direct && kGW ? a.grad_weight + i * d : tbuf;
  T* bb = direct && kGB ? a.grad_bias + i * d : tbuf + d;
  double* acc = tasks > 1 ? partial + t * 2 * d : dbuf;  // [weight | bias]
  if (kParams && !direct) std::fill(acc, acc + 2 * d, 0.0);
  for (int64_t b0 = r0; b0 < r1;) {
    const int64_t b1 = r1 - b0 <= kRows ? r1 : b0 + kRows;
    if constexpr (kGW) std::fill(bw, bw + d, T(0));
    if constexpr (kGB) std::fill(bb, bb + d, T(0));
    for (int64_t r = b0; r < b1; ++r) {
      backward_one_row<S, kW, kGI, kGW, kGB>(a, r, w, bw, bb, tbuf + 2 * d);
    }
    if (kParams && !direct) {
      for (int64_t j = 0; j < d; ++j) {
        if constexpr (kGW) acc[j] += static_cast<double>(bw[j]);
        if constexpr (kGB) acc[d + j] += static_cast<double>(bb[j]);
      }
    }
    b0 = b1;
  }
  if (kParams && !direct && tasks == 1) {
    for (int64_t j = 0; j < d; ++j) {
      if constexpr (kGW) a.grad_weight[i * d + j] = static_cast<T>(acc[j]);
      if constexpr (kGB) a.grad_bias[i * d + j] = static_cast<T>(acc[d + j]);
    }
  }
}

// The samples split over several tasks: their tasks' double sums, added and rounded.
template <typename S>
void reduce_partials(const RowBackwardArgs<S>& a, const double* partial) {
  using T = acc_t<S>;
  const int64_t d = a.d, tasks = a.tasks_per_sample();
  at::parallel_for(0, a.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> sum(2 * d);
    for (int64_t i = begin; i < end; ++i) {
      std::fill(sum.begin(), sum.end(), 0.0);
      for (int64_t k = 0; k < tasks; ++k) {
        const double* slot = partial + (i * tasks + k) * 2 * d;
        for (int64_t j = 0; j < 2 * d; ++j) sum[j] += slot[j];
      }
      for (int64_t j = 0; j < d; ++j) {
        if (a.grad_weight) a.grad_weight[i * d + j] = static_cast<T>(sum[j]);
        if (a.grad_bias) a.grad_bias[i * d + j] = static_cast<T>(sum[d + j]);
      }
    }
  });
}

// Tasks [t0, t1), in the variant for the weight and gradients asked for.
template <typename S>
void backward_chunk(const RowBackwardArgs<S>& a, int64_t t0, int64_t t1, double* partial,
                    acc_t<S>* tbuf, double* dbuf) {
  with_flag(a.gamma != nullptr, [&](auto w) {
    with_flag(a.grad_input != nullptr, [&](auto gi) {
      with_flag(a.grad_weight != nullptr, [&](auto gw) {
        with_flag(a.grad_bias != nullptr, [&](auto gb) {
          for (int64_t t = t0; t < t1; ++t) {
            backward_task<S, decltype(w)::value, decltype(gi)::value, decltype(gw)::value,
                          decltype(gb)::value>(a, t, partial, tbuf, dbuf);
          }
        });
      });
    });
  });
}

// The chunks compiled for each vector width that ATen dispatches to (its
// ATEN_CPU_CAPABILITY), picked at run time; the rest of the library is built for the
// baseline ISA (SSE2). These kernels do some 20 operations an element in cache: at
// SSE2's width they took 1.4x (forward) and 1.65x (backward) stock ATen's time at
// 8x512x1024 fp32, at AVX-512's 0.7x and 1.0x (1 thread; GroupNorm's kernels, which
// do fewer, are bound by memory).
// flatten inlines the kernels into each variant, so that they vectorise for its
// target; no out-of-line copy is built for it, so no other code can run its
// instructions on a CPU without them. Results differ between variants as vectorised
// sums do, in the last bits.
enum class Isa { kDefault, kAvx2, kAvx512 };

#define PERSAMPLE_ROW_NORM_VARIANT(NAME, ATTRIBUTES)                                         \
  template <typename S>                                                                  \
  ATTRIBUTES void forward_chunk_##NAME(const RowForwardArgs<S>& a, int64_t r0, int64_t r1, \
                                       acc_t<S>* buf) {                                  \
    forward_chunk(a, r0, r1, buf);                                                       \
  }                                                                                      \
  template <typename S>                                                                  \
  ATTRIBUTES void backward_chunk_##NAME(const RowBackwardArgs<S>& a, int64_t t0,         \
                                        int64_t t1, double* partial, acc_t<S>* tbuf,     \
                                        double* dbuf) {                                  \
    backward_chunk(a, t0, t1, partial, tbuf, dbuf);                                      \
  }

PERSAMPLE_ROW_NORM_VARIANT(default, __attribute__((flatten)))
#if defined(__GNUC__) && defined(__x86_64__)
#define PERSAMPLE_HAS_ISA_VARIANTS 1
PERSAMPLE_ROW_NORM_VARIANT(avx2, __attribute__((flatten, target("avx2,fma"))))
#define PERSAMPLE_AVX512 "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,prefer-vector-width=512"
PERSAMPLE_ROW_NORM_VARIANT(avx512, __attribute__((flatten, target(PERSAMPLE_AVX512))))
#undef PERSAMPLE_AVX512
#endif
#undef PERSAMPLE_ROW_NORM_VARIANT

template <typename S>
void row_norm_forward(const RowForwardArgs<S>& a, Isa isa) {
  auto chunk = forward_chunk_default<S>;
#ifdef PERSAMPLE_HAS_ISA_VARIANTS
  if (isa == Isa::kAvx512) chunk = forward_chunk_avx512<S>;
  if (isa == Isa::kAvx2) chunk = forward_chunk_avx2<S>;
#endif
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / a.d);
  at::parallel_for(0, a.n * a.m, grain, [&](int64_t begin, int64_t end) {
    std::vector<acc_t<S>> buf(std::is_same_v<S, acc_t<S>> ? 0 : 2 * a.d);
    chunk(a, begin, end, buf.data());
  });
}

// For a call with N * M > 0.
template <typename S>
void row_norm_backward(const RowBackwardArgs<S>& a, Isa isa) {
  using T = acc_t<S>;
  auto chunk = backward_chunk_default<S>;
#ifdef PERSAMPLE_HAS_ISA_VARIANTS
  if (isa == Isa::kAvx512) chunk = backward_chunk_avx512<S>;
  if (isa == Isa::kAvx2) chunk = backward_chunk_avx2<S>;
#endif
  const int64_t d = a.d, tasks = a.n * a.tasks_per_sample();
  const bool params = a.grad_weight || a.grad_bias;
  std::unique_ptr<double[]> partial;
  if (params && a.tasks_per_sample() > 1) partial.reset(new double[tasks * 2 * d]);
  const int64_t task_elements = std::min(a.m, a.chunk()) * d;
  const int64_t grain = std::max<int64_t>(1, kMinParallelElements / task_elements);
  at::parallel_for(0, tasks, grain, [&](int64_t begin, int64_t end) {
    std::vector<T> tbuf((std::is_same_v<S, T> ? 2 : 5) * d);
    std::vector<double> dbuf(2 * d);
    chunk(a, begin, end, partial.get(), tbuf.data(), dbuf.data());
  });
  if (partial) reduce_partials(a, partial.get());
}

}  // namespace persample_cpu
