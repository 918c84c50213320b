#include "caffe/util/dyve_math.hpp"

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdlib>
#include <string>

namespace caffe {

namespace {

bool PortableForced() {
  const char* simd = std::getenv("DYVE_SIMD");
  return simd != NULL && std::string(simd) == "portable";
}

}  // namespace

#if defined(__x86_64__)
bool DyveUseAvx() {
  static const bool use = !PortableForced() && __builtin_cpu_supports("avx");
  return use;
}
bool DyveUseAvx2() {
  static const bool use = !PortableForced() && __builtin_cpu_supports("avx2");
  return use;
}
bool DyveUseAvx2Fma() {
  static const bool use = !PortableForced() && __builtin_cpu_supports("avx2") &&
      __builtin_cpu_supports("fma");
  return use;
}
#else
bool DyveUseAvx() { return false; }
bool DyveUseAvx2() { return false; }
bool DyveUseAvx2Fma() { return false; }
#endif

#if defined(__x86_64__)

__attribute__((target("avx2,fma")))
void Dot4Avx2(int n, const float* x, const float* const* w, float* out) {
  // Two sums per output: eight independent FMA chains hide the FMA latency.
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  __m256 a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
  __m256 b0 = _mm256_setzero_ps(), b1 = _mm256_setzero_ps();
  __m256 b2 = _mm256_setzero_ps(), b3 = _mm256_setzero_ps();
  int i = 0;
  for (; i + 16 <= n; i += 16) {
    const __m256 u = _mm256_loadu_ps(x + i), v = _mm256_loadu_ps(x + i + 8);
    a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[0] + i), a0);
    a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[1] + i), a1);
    a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[2] + i), a2);
    a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[3] + i), a3);
    b0 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w[0] + i + 8), b0);
    b1 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w[1] + i + 8), b1);
    b2 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w[2] + i + 8), b2);
    b3 = _mm256_fmadd_ps(v, _mm256_loadu_ps(w[3] + i + 8), b3);
  }
  for (; i + 8 <= n; i += 8) {
    const __m256 u = _mm256_loadu_ps(x + i);
    a0 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[0] + i), a0);
    a1 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[1] + i), a1);
    a2 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[2] + i), a2);
    a3 = _mm256_fmadd_ps(u, _mm256_loadu_ps(w[3] + i), a3);
  }
  a0 = _mm256_add_ps(a0, b0);
  a1 = _mm256_add_ps(a1, b1);
  a2 = _mm256_add_ps(a2, b2);
  a3 = _mm256_add_ps(a3, b3);
  // Horizontal sums of the four at once: lanes (0 1 2 3) hold outputs 0..3.
  const __m256 h = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1),
      _mm256_hadd_ps(a2, a3));
  __m128 sums = _mm_add_ps(_mm256_castps256_ps128(h),
      _mm256_extractf128_ps(h, 1));
  _mm_storeu_ps(out, sums);
  for (; i < n; ++i) {
    for (int k = 0; k < 4; ++k) out[k] += x[i] * w[k][i];
  }
}

__attribute__((target("avx2")))
float MaxAvx2(int n, const float* x) {
  float best = x[0];
  int i = 0;
  if (n >= 8) {
    __m256 m = _mm256_loadu_ps(x);
    for (i = 8; i + 8 <= n; i += 8) {
      m = _mm256_max_ps(m, _mm256_loadu_ps(x + i));
    }
    float lanes[8];
    _mm256_storeu_ps(lanes, m);
    best = *std::max_element(lanes, lanes + 8);
  }
  for (; i < n; ++i) best = std::max(best, x[i]);
  return best;
}

// A std::copy of a 5-value kernel row compiled to a memmove call per row,
// which had cost as much as the rest of the gather.
__attribute__((target("avx")))
void GatherRunsAvx(const float* corner, const int* channel_offset,
    int channels, int kernel_rows, int row_step, int width, float* row) {
  for (int k = 0; k < channels; ++k) {
    const float* src = corner + channel_offset[k];
    for (int kh = 0; kh < kernel_rows; ++kh, src += row_step) {
      for (int i = 0; i < width; i += 8) {
        _mm256_storeu_ps(row + i, _mm256_loadu_ps(src + i));
      }
      row += width;
    }
  }
}

#endif  // defined(__x86_64__)

}  // namespace caffe
