// The fused CPU kernels of persample's GroupNorm (fp32 and fp64), used by
// group_norm.cpp.
//
// Forward. ATen's channels_last CPU kernel takes the variance as E[x^2] - mean^2, which
// cancels when |mean| >> std (measured in fp32 at mean/std = 1e3: output error 0.29,
// against 8e-5 from its contiguous kernel, whose fp32 variance still costs ~2e-5
// relative in rstd at 1e4). These take each block's sums of x and x^2, shifted by a
// pivot, and merge blocks (and channels) with Chan's update, in double:
// x is read from memory once for the statistics, then once to write
// y = (x - mean) * rstd * gamma + beta, with shared or per-sample parameters. Block sums
// run on x minus a pivot (the first 64 elements' mean), so that they stay near the data's
// spread rather than its mean, where T's rounding would dominate. The mean is applied
// as T's nearest value, hi, with T's rounding error of it folded into the shift:
// (x - hi) * k + (beta - lo * k), where x - hi is exact near the mean, keeps the
// precision that a mean rounded to T would lose.
//
// Backward. One pass reads dy and x for the per-(n, c) sums, which give the per-sample
// dgamma and dbeta; grad_input follows from the same data while it is in cache: the
// memory traffic of a forward pass. ATen's kernels read both twice and sum dgamma over
// the batch. The sums are of dy * (x - mean), where ATen sums dy * x and subtracts
// mean * sum(dy), which cancels when |mean| >> std (BRIEF: 1.7e-3 relative error in
// fp32 at mean/std = 1e4), and they are measured from the group's exact mean: the sum
// of x - mean tells what the saved mean, rounded to T, is short of it.
//
// Sums run in T over blocks, which keeps the inner loops vectorisable, and add up in
// double. (Builds for AVX2/AVX-512 through GCC's target_clones measured no faster here:
// the kernels are bound by memory, not by vector width.)

#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "moments.h"  // the reductions shared with the row norms

namespace persample_cpu {

template <typename T>
struct ForwardArgs {
  const T* x;
  const T *gamma, *beta;                     // nullptr: absent
  int64_t gamma_row_stride, beta_row_stride;  // 0: one row shared by all samples
  int64_t n, length, c, groups;
  double eps;
  T *y, *mean, *rstd;
};

// One channels_last row's shifted sums, and its output. Functions with restrict
// parameters: GCC does not vectorise these loops over scratch arrays that are offsets
// into one buffer (it cannot prove them apart).
template <typename T>
inline void add_moments(const T* __restrict__ x, const T* __restrict__ pivot,
                        T* __restrict__ s1, T* __restrict__ s2, int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    const T dev = x[j] - pivot[j];
    s1[j] += dev;
    s2[j] += dev * dev;
  }
}

template <typename T>
inline void normalize_row(const T* __restrict__ x, const T* __restrict__ centre,
                          const T* __restrict__ k, const T* __restrict__ b,
                          T* __restrict__ y, int64_t c) {
  for (int64_t j = 0; j < c; ++j) y[j] = (x[j] - centre[j]) * k[j] + b[j];
}

// Stores group ig's statistics and writes its D channels' output coefficients,
// y = (x - hi) * k[j] + b[j]; returns hi, the mean as T. Its rounding error lo is folded
// into b: x - hi is exact near the mean, so the precision a mean rounded to T would lose
// when |mean| >> std is kept.
template <typename T>
inline T store_group(const ForwardArgs<T>& a, int64_t ig, double mean, double rstd,
                     const T* gamma, const T* beta, int64_t d, T* k, T* b) {
  a.mean[ig] = static_cast<T>(mean);
  a.rstd[ig] = static_cast<T>(rstd);
  const T hi = static_cast<T>(mean);
  const double lo = mean - static_cast<double>(hi);
  for (int64_t j = 0; j < d; ++j) {
    const double scale = rstd * (gamma ? static_cast<double>(gamma[j]) : 1.0);
    k[j] = static_cast<T>(scale);
    b[j] = static_cast<T>((beta ? static_cast<double>(beta[j]) : 0.0) - lo * scale);
  }
  return hi;
}

// channels_last, sample i: L rows of C channels. Scratch: 2C doubles, 5C Ts.
template <typename T>
void forward_channels_last_sample(const ForwardArgs<T>& a, int64_t i,
                                                   double* dbuf, T* tbuf) {
  constexpr int64_t kBlock = 64;  // rows
  const int64_t c = a.c, d = c / a.groups, length = a.length;
  double *run_mean = dbuf, *run_m2 = dbuf + c;  // relative to the pivot
  T* __restrict__ pivot = tbuf;
  T* __restrict__ s1 = tbuf + c;
  T* __restrict__ s2 = tbuf + 2 * c;
  T* __restrict__ k = tbuf + 3 * c;
  T* __restrict__ b = tbuf + 4 * c;
  const T* x_i = a.x + i * length * c;
  const int64_t first = std::min(length, kBlock);
  std::fill(pivot, pivot + c, T(0));
  for (int64_t l = 0; l < first; ++l) {
    const T* __restrict__ row = x_i + l * c;
    for (int64_t j = 0; j < c; ++j) pivot[j] += row[j];
  }
  for (int64_t j = 0; j < c; ++j) pivot[j] /= static_cast<T>(first);
  std::fill(dbuf, dbuf + 2 * c, 0.0);
  for (int64_t l0 = 0; l0 < length; l0 += kBlock) {
    const int64_t l1 = std::min(length, l0 + kBlock);
    std::fill(s1, s1 + 2 * c, T(0));  // s1 and s2
    for (int64_t l = l0; l < l1; ++l) add_moments(x_i + l * c, pivot, s1, s2, c);
    for (int64_t j = 0; j < c; ++j) merge_sums(run_mean[j], run_m2[j], l0, l1 - l0, s1[j], s2[j]);
  }
  const T* gamma_i = a.gamma ? a.gamma + i * a.gamma_row_stride : nullptr;
  const T* beta_i = a.beta ? a.beta + i * a.beta_row_stride : nullptr;
  T* __restrict__ centre = s1;
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
    const int64_t j0 = g * d;
    const T hi = store_group(a, i * a.groups + g, mean, rstd, gamma_i ? gamma_i + j0 : nullptr,
                             beta_i ? beta_i + j0 : nullptr, d, k + j0, b + j0);
    std::fill(centre + j0, centre + j0 + d, hi);
  }
  for (int64_t l = 0; l < length; ++l) {
    normalize_row(x_i + l * c, centre, k, b, a.y + (i * length + l) * c, c);
  }
}

// Contiguous, group ig = (n, g): D * L consecutive elements. Scratch: 2D Ts.
template <typename T>
void forward_contiguous_group(const ForwardArgs<T>& a, int64_t ig, T* tbuf) {
  const int64_t d = a.c / a.groups, length = a.length, size = d * length;
  const int64_t i = ig / a.groups, j0 = (ig % a.groups) * d;
  const T* __restrict__ x_g = a.x + ig * size;
  double mean, m2;
  contiguous_moments(x_g, size, mean, m2);
  const double rstd = 1.0 / std::sqrt(m2 / static_cast<double>(size) + a.eps);
  T *k_row = tbuf, *b_row = tbuf + d;
  const T hi = store_group(a, ig, mean, rstd,
                           a.gamma ? a.gamma + i * a.gamma_row_stride + j0 : nullptr,
                           a.beta ? a.beta + i * a.beta_row_stride + j0 : nullptr, d, k_row, b_row);
  for (int64_t j = 0; j < d; ++j) {
    const T k = k_row[j], b = b_row[j];
    const T* __restrict__ row = x_g + j * length;
    T* __restrict__ out = a.y + ig * size + j * length;
#pragma omp simd
    for (int64_t l = 0; l < length; ++l) out[l] = (row[l] - hi) * k + b;
  }
}

template <typename T>
void forward_channels_last(const ForwardArgs<T>& a) {
  at::parallel_for(0, a.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dbuf(2 * a.c);
    std::vector<T> tbuf(5 * a.c);
    for (int64_t i = begin; i < end; ++i) forward_channels_last_sample(a, i, dbuf.data(), tbuf.data());
  });
}

template <typename T>
void forward_contiguous(const ForwardArgs<T>& a) {
  at::parallel_for(0, a.n * a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<T> tbuf(2 * (a.c / a.groups));
    for (int64_t ig = begin; ig < end; ++ig) forward_contiguous_group(a, ig, tbuf.data());
  });
}

// The arguments of both backward kernels: dense arrays in the input's layout.
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

// One (n, g) group, from its D channels' sums dyx[j] = sum dy * (x - mean) and
// dy_sum[j] = sum dy, and lo = mean(x - mean), what the saved mean is short of the
// group's: the per-sample dgamma and dbeta (where asked for), and the grad_input
// coefficients, dx = c1[j] * dy + c2 * (x - mean) + c3. ATen's form,
// c2 * x + c3 - c2 * mean, would cancel when |mean| >> std, as the sums would.
template <typename T>
inline void finish_group(const double* dyx, const double* dy_sum, double lo, const T* gamma,
                         int64_t d, double rstd, double inv_count, T* grad_weight,
                         T* grad_bias, T* c1, T& c2, T& c3) {
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
  // A group of one element: its output is beta whatever x is, so dx = 0, exactly. The
  // general c1 * dy + c3 cancels only to T's rounding of rstd * gamma * dy, which is
  // large here (rstd = 1/sqrt(eps), 316 at eps = 1e-5): fp32 grad_input was up to 6e-5
  // off, worse than stock ATen's error in a quarter of random cases (issue 19).
  if (inv_count == 1.0) {
    std::fill(c1, c1 + d, T(0));
    c2 = c3 = T(0);
  }
}

// One channels_last row of the backward's sums, and of grad_input.
template <typename T>
inline void add_row(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ m,
                    T* __restrict__ dyx, T* __restrict__ dy_sum, T* __restrict__ x_dev,
                    int64_t c) {
  for (int64_t j = 0; j < c; ++j) {
    const T dev = x[j] - m[j];
    dyx[j] += dy[j] * dev;
    dy_sum[j] += dy[j];
    x_dev[j] += dev;
  }
}

template <typename T>
inline void grad_row(const T* __restrict__ dy, const T* __restrict__ x, const T* __restrict__ m,
                     const T* __restrict__ k1, const T* __restrict__ k2,
                     const T* __restrict__ k3, T* __restrict__ dx, int64_t c) {
  for (int64_t j = 0; j < c; ++j) dx[j] = k1[j] * dy[j] + k2[j] * (x[j] - m[j]) + k3[j];
}

// channels_last, sample i. Scratch: 3C doubles, 7C Ts.
template <typename T>
void backward_channels_last_sample(const BackwardArgs<T>& a, int64_t i,
                                                    double* dbuf, T* tbuf) {
  constexpr int64_t kBlock = 64;  // rows
  const int64_t c = a.c, d = a.d(), length = a.length;
  const double inv_count = a.inv_count();
  double *dyx = dbuf, *dy_sum = dbuf + c, *x_dev = dbuf + 2 * c;
  T* __restrict__ m = tbuf;
  T* __restrict__ bdyx = tbuf + c;
  T* __restrict__ bdy = tbuf + 2 * c;
  T* __restrict__ bx = tbuf + 3 * c;
  T* __restrict__ k1 = tbuf + 4 * c;
  T* __restrict__ k2 = tbuf + 5 * c;
  T* __restrict__ k3 = tbuf + 6 * c;
  const T* dy_i = a.dy + i * length * c;
  const T* x_i = a.x + i * length * c;
  for (int64_t j = 0; j < c; ++j) m[j] = a.mean[i * a.groups + j / d];
  std::fill(dbuf, dbuf + 3 * c, 0.0);
  for (int64_t l0 = 0; l0 < length; l0 += kBlock) {
    const int64_t l1 = std::min(length, l0 + kBlock);
    std::fill(bdyx, bdyx + 3 * c, T(0));  // bdyx, bdy and bx
    for (int64_t l = l0; l < l1; ++l) add_row(dy_i + l * c, x_i + l * c, m, bdyx, bdy, bx, c);
    for (int64_t j = 0; j < c; ++j) {
      dyx[j] += bdyx[j];
      dy_sum[j] += bdy[j];
      x_dev[j] += bx[j];
    }
  }
  const T* gamma_i = a.gamma ? a.gamma + i * a.gamma_row_stride : nullptr;
  for (int64_t g = 0; g < a.groups; ++g) {
    const int64_t j0 = g * d;
    double lo = 0;
    for (int64_t j = j0; j < j0 + d; ++j) lo += x_dev[j];
    T c2, c3;
    finish_group(dyx + j0, dy_sum + j0, lo * inv_count, gamma_i ? gamma_i + j0 : nullptr, d,
                 static_cast<double>(a.rstd[i * a.groups + g]), inv_count,
                 a.grad_weight ? a.grad_weight + i * c + j0 : nullptr,
                 a.grad_bias ? a.grad_bias + i * c + j0 : nullptr, k1 + j0, c2, c3);
    std::fill(k2 + j0, k2 + j0 + d, c2);
    std::fill(k3 + j0, k3 + j0 + d, c3);
  }
  if (!a.grad_input) return;
  for (int64_t l = 0; l < length; ++l) {
    grad_row(dy_i + l * c, x_i + l * c, m, k1, k2, k3, a.grad_input + (i * length + l) * c, c);
  }
}

// Contiguous, group ig = (n, g): D rows of L elements, summed and then written while
// they are still in cache. Scratch: 3D doubles, D Ts.
template <typename T>
void backward_contiguous_group(const BackwardArgs<T>& a, int64_t ig,
                                                double* dbuf, T* c1) {
  const int64_t length = a.length, d = a.d();
  const int64_t i = ig / a.groups, j0 = (ig % a.groups) * d;
  double *dyx = dbuf, *dy_sum = dbuf + d, *x_dev = dbuf + 2 * d;
  const T* dy_g = a.dy + (i * a.c + j0) * length;
  const T* x_g = a.x + (i * a.c + j0) * length;
  const T mean = a.mean[ig];
  double lo = 0;
  for (int64_t j = 0; j < d; ++j) {
    row_sums(dy_g + j * length, x_g + j * length, mean, length, dyx[j], dy_sum[j], x_dev[j]);
    lo += x_dev[j];
  }
  T c2, c3;
  finish_group(dyx, dy_sum, lo * a.inv_count(),
               a.gamma ? a.gamma + i * a.gamma_row_stride + j0 : nullptr, d,
               static_cast<double>(a.rstd[ig]), a.inv_count(),
               a.grad_weight ? a.grad_weight + i * a.c + j0 : nullptr,
               a.grad_bias ? a.grad_bias + i * a.c + j0 : nullptr, c1, c2, c3);
  if (!a.grad_input) return;
  for (int64_t j = 0; j < d; ++j) {
    const T* __restrict__ dy_row = dy_g + j * length;
    const T* __restrict__ x_row = x_g + j * length;
    T* __restrict__ dx_row = a.grad_input + (i * a.c + j0 + j) * length;
    const T k1 = c1[j];
#pragma omp simd
    for (int64_t l = 0; l < length; ++l) dx_row[l] = k1 * dy_row[l] + c2 * (x_row[l] - mean) + c3;
  }
}

template <typename T>
void backward_channels_last(const BackwardArgs<T>& a) {
  at::parallel_for(0, a.n, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dbuf(3 * a.c);
    std::vector<T> tbuf(7 * a.c);
    for (int64_t i = begin; i < end; ++i) backward_channels_last_sample(a, i, dbuf.data(), tbuf.data());
  });
}

template <typename T>
void backward_contiguous(const BackwardArgs<T>& a) {
  at::parallel_for(0, a.n * a.groups, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> dbuf(3 * a.d());
    std::vector<T> c1(a.d());
    for (int64_t ig = begin; ig < end; ++ig) backward_contiguous_group(a, ig, dbuf.data(), c1.data());
  });
}

}  // namespace persample_cpu
