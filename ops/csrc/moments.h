// Reductions shared by persample's fused CPU kernels: GroupNorm's (group_norm_kernels.h) and
// the row norms' (row_norm_kernels.h), as ATen's norms share cpu/moments_utils.h.
//
// Why these forms (read the kernels' headers for the measurements): sums run in T over
// blocks, which keeps the inner loops vectorisable, and add up in double; moments are
// taken about a pivot near the data's mean (the first elements' mean) and blocks merge
// with Chan's update, so that the variance never cancels when |mean| >> std; backward
// sums are of dy * (x - mean), centred, never sum(dy * x) - mean * sum(dy).

#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

namespace persample_cpu {

// Chan's update of a running (mean, M2) over `seen` elements with a block's.
inline void merge(double& mean, double& m2, double seen, double added, double block_mean,
                  double block_m2) {
  const double w = added / (seen + added), delta = block_mean - mean;
  mean += delta * w;
  m2 += block_m2 + delta * delta * seen * w;
}

// A block's sums of x - pivot and (x - pivot)^2, merged into a running (mean, M2)
// relative to the pivot. The pivot is the mean of the first elements, so that the M2,
// s2 - s1^2 / n, cancels little: a pivot k std away from the mean would cost T's
// rounding times (1 + k^2).
inline void merge_sums(double& mean, double& m2, int64_t seen, int64_t added, double s1,
                       double s2) {
  const double n = static_cast<double>(added), block_mean = s1 / n;
  merge(mean, m2, static_cast<double>(seen), n, block_mean, std::max(0.0, s2 - s1 * block_mean));
}

template <typename T>
inline T block_mean(const T* __restrict__ x, int64_t n) {
  T sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < n; ++l) sum += x[l];
  return sum / static_cast<T>(n);
}

// The mean and M2 (sum of squared deviations) of `size` consecutive elements, in one
// pass: shifted sums in T over blocks, about the first 64 elements' mean, merged in
// double. Always inlined, as the loop was in GroupNorm's kernel before it moved here.
template <typename T>
__attribute__((always_inline)) inline void contiguous_moments(const T* __restrict__ x, int64_t size, double& mean,
                               double& m2) {
  constexpr int64_t kBlock = 1024;  // elements
  const T pivot = block_mean(x, std::min<int64_t>(size, 64));
  double run_mean = 0, run_m2 = 0;  // relative to the pivot
  for (int64_t l0 = 0; l0 < size; l0 += kBlock) {
    const int64_t l1 = std::min(size, l0 + kBlock);
    T s1 = 0, s2 = 0;
#pragma omp simd reduction(+ : s1, s2)
    for (int64_t l = l0; l < l1; ++l) {
      const T dev = x[l] - pivot;
      s1 += dev;
      s2 += dev * dev;
    }
    merge_sums(run_mean, run_m2, l0, l1 - l0, s1, s2);
  }
  mean = run_mean + static_cast<double>(pivot);
  m2 = run_m2;
}

// sum(g * (x - mean)), sum(g) and sum(x - mean) over one contiguous row, where g = dy,
// or dy * w with kWeighted (omp simd licenses the reassociation that vectorising a
// reduction needs).
template <typename T, bool kWeighted = false>
inline void row_sums(const T* __restrict__ dy, const T* __restrict__ x, T mean, int64_t length,
                     double& dyx, double& dy_sum, double& x_dev,
                     const T* __restrict__ w = nullptr) {
  constexpr int64_t kBlock = 1024;
  dyx = dy_sum = x_dev = 0;
  for (int64_t l0 = 0; l0 < length; l0 += kBlock) {
    const int64_t l1 = std::min(length, l0 + kBlock);
    T block_dyx = 0, block_dy = 0, block_x = 0;
#pragma omp simd reduction(+ : block_dyx, block_dy, block_x)
    for (int64_t l = l0; l < l1; ++l) {
      const T g = kWeighted ? dy[l] * w[l] : dy[l];
      const T dev = x[l] - mean;
      block_dyx += g * dev;
      block_dy += g;
      block_x += dev;
    }
    dyx += block_dyx;
    dy_sum += block_dy;
    x_dev += block_x;
  }
}

}  // namespace persample_cpu
