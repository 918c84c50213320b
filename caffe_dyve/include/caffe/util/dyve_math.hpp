#ifndef CAFFE_UTIL_DYVE_MATH_HPP_
#define CAFFE_UTIL_DYVE_MATH_HPP_

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include <algorithm>

#include "glog/logging.h"

#include "caffe/util/mkl_alternate.hpp"

namespace caffe {

// The kernels of the DyVE layers (docs/performance.md has what each was
// worth). The SIMD ones are compiled for their instruction set alone (a
// target attribute, in dyve_math.cpp) and chosen at run time from the CPU's
// features by the dispatchers below, never from the build machine's flags;
// without the feature the portable code runs.

/// c (rows x outputs, row-major) += a (rows x length, stride lda) times the
/// transpose of w (outputs x length, stride ldw).
inline void GemmRowsByWeights(int rows, int outputs, int length,
    const float* a, int lda, const float* w, int ldw, float* c) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, outputs, length,
      1.f, a, lda, w, ldw, 1.f, c, outputs);
}
inline void GemmRowsByWeights(int rows, int outputs, int length,
    const double* a, int lda, const double* w, int ldw, double* c) {
  cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, outputs, length,
      1., a, lda, w, ldw, 1., c, outputs);
}

inline float Dot(int n, const float* x, const float* y) {
  return cblas_sdot(n, x, 1, y, 1);
}
inline double Dot(int n, const double* x, const double* y) {
  return cblas_ddot(n, x, 1, y, 1);
}

/// Whether the dispatchers below may run a SIMD kernel: the CPU has its
/// instruction set and the environment variable DYVE_SIMD is not "portable",
/// which forces the portable code (so tests cover both paths on any CPU).
/// Read once per process.
bool DyveUseAvx();
bool DyveUseAvx2();
bool DyveUseAvx2Fma();

#if defined(__x86_64__)
// The SIMD versions, for the dispatchers below only: they run only where the
// CPU has the instruction set named in their suffix.
void Dot4Avx2(int n, const float* x, const float* const* w, float* out);
float MaxAvx2(int n, const float* x);
void GatherRunsAvx(const float* corner, const int* channel_offset,
    int channels, int kernel_rows, int row_step, int width, float* row);
#endif

/// out[k] = the dot product of the n values x with w[k], k = 0..3: the row is
/// loaded once for four outputs, so the survivors of a row run closer to GEMM
/// speed than one BLAS dot call each.
inline void Dot4(int n, const float* x, const float* const* w, float* out) {
#if defined(__x86_64__)
  if (DyveUseAvx2Fma()) {
    Dot4Avx2(n, x, w, out);
    return;
  }
#endif
  for (int k = 0; k < 4; ++k) out[k] = Dot(n, x, w[k]);
}
inline void Dot4(int n, const double* x, const double* const* w,
    double* out) {
  for (int k = 0; k < 4; ++k) out[k] = Dot(n, x, w[k]);
}

/// The largest of the n >= 1 values x.
inline float MaxOf(int n, const float* x) {
#if defined(__x86_64__)
  if (DyveUseAvx2()) return MaxAvx2(n, x);
#endif
  return *std::max_element(x, x + n);
}
inline double MaxOf(int n, const double* x) {
  return *std::max_element(x, x + n);
}

/// sum_i w[i] * row[index[i]]: four independent sums, so the gathers are not
/// serialised on one chain of dependent adds.
template <typename Dtype>
inline Dtype GatherDot(int n, const Dtype* w, const int* index,
    const Dtype* row) {
  Dtype s0 = 0, s1 = 0, s2 = 0, s3 = 0;
  int i = 0;
  for (; i + 4 <= n; i += 4) {
    s0 += w[i] * row[index[i]];
    s1 += w[i + 1] * row[index[i + 1]];
    s2 += w[i + 2] * row[index[i + 2]];
    s3 += w[i + 3] * row[index[i + 3]];
  }
  for (; i < n; ++i) s0 += w[i] * row[index[i]];
  return (s0 + s1) + (s2 + s3);
}

/// Copies a run of n values 4 at a time: it may read and write up to 3 values
/// past the run (callers leave that slack; the next run overwrites them).
/// Kernel rows are short (3, 5, 7, 11), where a memcpy call costs more.
inline void CopyRun(const float* src, float* dst, int n) {
#if defined(__SSE2__)
  for (int i = 0; i < n; i += 4) _mm_storeu_ps(dst + i, _mm_loadu_ps(src + i));
#else
  for (int i = 0; i < n; ++i) dst[i] = src[i];
#endif
}
inline void CopyRun(const double* src, double* dst, int n) {
  for (int i = 0; i < n; ++i) dst[i] = src[i];
}

/// Copies channels x kernel_rows runs of `width` values each, one after the
/// other, into row: run kh of channel k starts at
/// corner + channel_offset[k] + kh * row_step. The runs are CopyRun's.
template <typename Dtype>
inline void GatherRunsPortable(const Dtype* corner, const int* channel_offset,
    int channels, int kernel_rows, int row_step, int width, Dtype* row) {
  for (int k = 0; k < channels; ++k) {
    const Dtype* src = corner + channel_offset[k];
    for (int kh = 0; kh < kernel_rows; ++kh, src += row_step) {
      CopyRun(src, row, width);
      row += width;
    }
  }
}

/// GatherRunsPortable, 8 values at a time with AVX where the CPU has it: may
/// read and write up to 7 values past a run.
inline void GatherRuns(const float* corner, const int* channel_offset,
    int channels, int kernel_rows, int row_step, int width, float* row) {
#if defined(__x86_64__)
  if (DyveUseAvx()) {
    GatherRunsAvx(corner, channel_offset, channels, kernel_rows, row_step,
        width, row);
    return;
  }
#endif
  GatherRunsPortable(corner, channel_offset, channels, kernel_rows, row_step,
      width, row);
}
inline void GatherRuns(const double* corner, const int* channel_offset,
    int channels, int kernel_rows, int row_step, int width, double* row) {
  GatherRunsPortable(corner, channel_offset, channels, kernel_rows, row_step,
      width, row);
}

/// x[i] = max(x[i], 0).
template <typename Dtype>
inline void ReluInPlace(int n, Dtype* x) {
  for (int i = 0; i < n; ++i) x[i] = std::max(x[i], Dtype(0));
}

/// The ReLU's gradient mask: diff[i] = 0 where the output data[i] is not > 0.
template <typename Dtype>
inline void MaskReluDiff(int n, const Dtype* data, Dtype* diff) {
  for (int i = 0; i < n; ++i) {
    if (!(data[i] > 0)) diff[i] = 0;
  }
}

}  // namespace caffe

#endif  // CAFFE_UTIL_DYVE_MATH_HPP_
