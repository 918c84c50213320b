#ifndef CAFFE_UTIL_DYVE_DNNL_HPP_
#define CAFFE_UTIL_DYVE_DNNL_HPP_

#include <string>

#include "caffe/common.hpp"

namespace caffe {

/// The shapes of one 2-D convolution forward, in Caffe's terms (dilation 1
/// is no dilation), plus whether a bias and a ReLU follow. A band
/// [band_begin, band_end) of output rows makes the kernel compute only those
/// rows of the whole output, reading only the input rows they need (band_end
/// 0: every row): one image split over threads by positions.
struct DyveConvShape {
  DyveConvShape();
  int num, channels, height, width, num_output, group;
  int kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  int dilation_h, dilation_w;
  int band_begin, band_end;
  bool bias, relu;
  /// Output rows of the whole convolution.
  int output_height() const;
  bool operator==(const DyveConvShape& other) const;
};

/**
 * @brief oneDNN's convolution forward (float, inference) as the dense kernel
 *        of DyveConvolution (docs/kernels.md of DyVE-Caffe).
 *
 * NCHW in and out, as Caffe's blobs are: the input is re-laid into the format
 * oneDNN's kernel wants and the output back, inside Forward; the weights are
 * re-laid once by SetWeights. The bias and the ReLU are fused into the
 * kernel. oneDNN picks its instruction set (AVX-512, AVX2, SSE4.1) from the
 * CPU at run time.
 *
 * Usable only where the build found oneDNN (DYVE_USE_DNNL) and the
 * environment variable DYVE_DENSE is not "caffe", which forces Caffe's
 * im2col + BLAS path; Configure also fails for shapes oneDNN has no kernel
 * for. The caller then keeps its own path.
 */
class DyveDnnlConvolution {
 public:
  DyveDnnlConvolution();
  ~DyveDnnlConvolution();

  /// Whether this build has oneDNN and DYVE_DENSE is not "caffe" (read once
  /// per process).
  static bool Available();
  /// Prepares the kernel for `shape`; returns whether it can run it. Costs a
  /// compare when the shape is the one prepared last. Forgets the weights
  /// when the shape changes.
  bool Configure(const DyveConvShape& shape);
  /// Takes the weights (num_output x channels / group x kernel_h x kernel_w,
  /// Caffe's order) and the bias (num_output values; ignored without one),
  /// re-laid for the kernel. Call after Configure and whenever they change.
  void SetWeights(const float* weights, const float* bias);
  /// Whether SetWeights was called since the last shape change.
  bool has_weights() const;
  /// top = the convolution of bottom, plus the bias, rectified if the shape
  /// says so. Both are the whole NCHW blobs, also for a band, which writes
  /// only its rows of top. The kernel is made for one OpenMP thread
  /// (Configure): more `threads` only help a kernel made for them.
  /// DyveConvolution runs one kernel per thread of its own instead
  /// (docs/kernels.md).
  void Forward(const float* bottom, float* top, int threads);
  /// oneDNN's implementation of the prepared kernel ("jit:avx2"), or "".
  std::string implementation() const;

 private:
  struct State;
  State* state_;

  DISABLE_COPY_AND_ASSIGN(DyveDnnlConvolution);
};

}  // namespace caffe

#endif  // CAFFE_UTIL_DYVE_DNNL_HPP_
