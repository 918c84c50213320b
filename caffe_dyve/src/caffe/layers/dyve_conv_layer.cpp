#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <thread>  // NOLINT(build/c++11)
#include <vector>

#include "caffe/layers/dyve_conv_layer.hpp"
#include "caffe/util/dyve_math.hpp"

namespace caffe {

// Out-of-line definitions: std::min takes its arguments by reference, which
// needs the constants' storage in C++11 (an optimised build inlines it away,
// the sanitizer build does not).
template <typename Dtype>
const int DyveConvolutionLayer<Dtype>::kRowsPerPass;
template <typename Dtype>
const int DyveConvolutionLayer<Dtype>::kSlack;

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::LayerSetUp(
    const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  ConvolutionLayer<Dtype>::LayerSetUp(bottom, top);
  SetUpDyveParam(this->layer_param_, type(), true);
}

template <typename Dtype>
std::string DyveConvolutionLayer<Dtype>::CheckShapes(
    const DyveParameter& param) const {
  const std::string where =
      std::string(type()) + " layer '" + this->layer_param_.name() + "': ";
  if (DyveKnobsOn(param) && this->num_spatial_axes_ != 2) {
    return where + "dyve_param knobs need 2 spatial axes (got " +
        std::to_string(this->num_spatial_axes_) + ")";
  }
  if (param.sdss().enabled() && this->output_shape_.size() == 2 &&
      this->output_shape_[0] * this->output_shape_[1] == 1) {
    return where + "dyve_param.sdss needs an output map larger than 1x1 "
        "(this layer's output is 1x1, nothing can be sampled)";
  }
  // A grid step past both sides of the map samples its first position only:
  // the same as a step equal to the map, so a larger one is a typo, not a knob.
  if (param.sdss().enabled() && this->output_shape_.size() == 2 &&
      param.sdss().stride() > static_cast<uint32_t>(std::max(
          this->output_shape_[0], this->output_shape_[1]))) {
    return where + "dyve_param.sdss.stride " +
        std::to_string(param.sdss().stride()) + " is larger than the " +
        std::to_string(this->output_shape_[0]) + "x" +
        std::to_string(this->output_shape_[1]) + " output map";
  }
  return "";
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::Reshape(const vector<Blob<Dtype>*>& bottom,
    const vector<Blob<Dtype>*>& top) {
  ConvolutionLayer<Dtype>::Reshape(bottom, top);
  const std::string error = CheckShapes(dyve_param_);
  CHECK(error.empty()) << error;
  if (this->num_spatial_axes_ == 2) {
    const int width = this->conv_input_shape_.cpu_data()[2] +
        2 * this->pad_.cpu_data()[1];  // of the zero-padded copy
    const int* kernel = this->kernel_shape_.cpu_data();
    const int* dilation = this->dilation_.cpu_data();
    tap_offset_.clear();
    for (int kh = 0; kh < kernel[0]; ++kh) {
      for (int kw = 0; kw < kernel[1]; ++kw) {
        tap_offset_.push_back(kh * dilation[0] * width + kw * dilation[1]);
      }
    }
    // SFMA: per output position, the rectangle of taps inside the input as
    // four indices into a (kernel_h + 1) x (kernel_w + 1) summed-area table.
    const int height = this->conv_input_shape_.cpu_data()[1];
    const int input_width = this->conv_input_shape_.cpu_data()[2];
    const int* stride = this->stride_.cpu_data();
    const int* pad = this->pad_.cpu_data();
    const int out_width = this->output_shape_[1];
    const int positions = this->output_shape_[0] * out_width;
    const int cols = kernel[1] + 1;
    sfma_rect_.assign(positions * 5, 0);
    for (int p = 0; p < positions; ++p) {
      const int top = (p / out_width) * stride[0] - pad[0];
      const int left = (p % out_width) * stride[1] - pad[1];
      // Tap rows kh with 0 <= top + kh * dilation < height, likewise columns.
      const int kh0 = std::max(0, (-top + dilation[0] - 1) / dilation[0]);
      const int kh1 = std::min(kernel[0],
          std::max(0, (height - top + dilation[0] - 1) / dilation[0]));
      const int kw0 = std::max(0, (-left + dilation[1] - 1) / dilation[1]);
      const int kw1 = std::min(kernel[1],
          std::max(0, (input_width - left + dilation[1] - 1) / dilation[1]));
      int* rect = &sfma_rect_[p * 5];
      if (kh0 == 0 && kh1 == kernel[0] && kw0 == 0 && kw1 == kernel[1]) {
        rect[0] = kInterior;
        rect[1] = kernel[0] * cols + kernel[1];
      } else if (kh0 >= kh1 || kw0 >= kw1) {
        rect[0] = kOutside;
      } else {
        rect[0] = kBorder;
        rect[1] = kh1 * cols + kw1;
        rect[2] = kh0 * cols + kw1;
        rect[3] = kh1 * cols + kw0;
        rect[4] = kh0 * cols + kw0;
      }
    }
  }
  ConfigureDense();
}

namespace {

// oneDNN's kernel takes float blobs; double ones keep Caffe's path.
bool DenseConfigure(DyveDnnlConvolution* dense, const DyveConvShape& shape,
    float) {
  return dense->Configure(shape);
}
bool DenseConfigure(DyveDnnlConvolution*, const DyveConvShape&, double) {
  return false;
}
void DenseSetWeights(DyveDnnlConvolution* dense, const float* weights,
    const float* bias) {
  dense->SetWeights(weights, bias);
}
void DenseSetWeights(DyveDnnlConvolution*, const double*, const double*) {}
void DenseForward(DyveDnnlConvolution* dense, const float* bottom, float* top,
    int threads) {
  dense->Forward(bottom, top, threads);
}
void DenseForward(DyveDnnlConvolution*, const double*, double*, int) {}

}  // namespace

template <typename Dtype>
DyveConvShape DyveConvolutionLayer<Dtype>::KernelShape() const {
  const int* input = this->conv_input_shape_.cpu_data();  // C, H, W
  const int* kernel = this->kernel_shape_.cpu_data();
  const int* stride = this->stride_.cpu_data();
  const int* pad = this->pad_.cpu_data();
  const int* dilation = this->dilation_.cpu_data();
  DyveConvShape shape;
  shape.num = this->num_;
  shape.channels = input[0];
  shape.height = input[1];
  shape.width = input[2];
  shape.num_output = this->num_output_;
  shape.group = this->group_;
  shape.kernel_h = kernel[0];
  shape.kernel_w = kernel[1];
  shape.stride_h = stride[0];
  shape.stride_w = stride[1];
  shape.pad_h = pad[0];
  shape.pad_w = pad[1];
  shape.dilation_h = dilation[0];
  shape.dilation_w = dilation[1];
  shape.bias = this->bias_term_;
  shape.relu = dyve_param_.relu();
  return shape;
}

template <typename Dtype>
uint64_t DyveConvolutionLayer<Dtype>::ImageMacs() const {
  return static_cast<uint64_t>(this->top_dim_) * this->blobs_[0]->count(1);
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::ConfigureDense() {
  if (DyveKnobsOn(dyve_param_) || this->num_spatial_axes_ != 2 ||
      !DyveDnnlConvolution::Available()) {
    dense_ready_ = false;
    return;
  }
  DyveConvShape shape = KernelShape();
  // Images [t * num / threads, (t + 1) * num / threads) go to kernel t; with
  // fewer images than threads, output rows [t * rows / threads, ...) of every
  // image do (batch 1 on 2 threads). A band that sees only padding (oneDNN
  // cannot run it) sends the batch back to the images split.
  const int blas_threads = BlasThreads();
  const int out_h = this->output_shape_[0];
  const bool split = this->num_ < blas_threads &&
      ImageMacs() >= PositionSplitMacs();
  const int bands = split ? std::min(blas_threads, out_h) : 1;
  const bool was_ready = dense_ready_, was_bands = dense_bands_;
  const int was_threads = dense_threads_;
  dense_ready_ = false;
  for (int attempt = 0; attempt < 2 && !dense_ready_; ++attempt) {
    dense_bands_ = attempt == 0 && bands > 1;
    const int threads = dense_bands_ ? bands :
        std::max(1, std::min(this->num_, blas_threads));
    while (dense_.size() < threads) {
      dense_.push_back(shared_ptr<DyveDnnlConvolution>(
          new DyveDnnlConvolution()));
      dense_weights_version_.push_back(0);  // none held
      dense_bias_version_.push_back(0);
    }
    dense_threads_ = threads;
    dense_ready_ = true;
    for (int t = 0; t < threads && dense_ready_; ++t) {
      if (dense_bands_) {
        shape.band_begin = t * out_h / threads;
        shape.band_end = (t + 1) * out_h / threads;
      } else {
        shape.band_begin = shape.band_end = 0;
        shape.num = (t + 1) * this->num_ / threads - t * this->num_ / threads;
      }
      dense_ready_ = DenseConfigure(dense_[t].get(), shape, Dtype(0));
    }
    if (!dense_bands_) break;  // the images split: no other attempt
  }
  if (dense_ready_ != was_ready || (dense_ready_ &&
      (dense_bands_ != was_bands || dense_threads_ != was_threads))) {
    LOG(INFO) << type() << " layer '" << this->layer_param_.name()
              << "': knobs-off path "
              << dense_path();
  }
}

template <typename Dtype>
std::string DyveConvolutionLayer<Dtype>::dense_path() const {
  if (!dense_ready_) return "caffe";
  std::ostringstream path;
  path << "oneDNN " << dense_[0]->implementation();
  if (dense_bands_) path << " in " << dense_threads_ << " row bands";
  return path.str();
}

template <typename Dtype>
std::string DyveConvolutionLayer<Dtype>::prefix_path() const {
  if (!prefix_ready_) return "rows";
  std::ostringstream path;
  path << "oneDNN " << works_[0].prefix_kernel->implementation();
  if (prefix_bands_) path << " in row bands";
  return path.str();
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::ConfigurePrefix(int threads, bool bands) {
  const bool was_ready = prefix_ready_, was_bands = prefix_bands_;
  prefix_ready_ = false;
  prefix_bands_ = bands;
  const DyveNeuronPlan<Dtype>& plan = plans_[0];
  const int taps = this->blobs_[0]->count(2);
  if (this->group_ == 1 && this->num_spatial_axes_ == 2 &&
      DyveDnnlConvolution::Available() && plan.splits_prefix() &&
      plan.prefix_length() > 0) {
    // One image, the prefix channels; SDSS's grid (every sample-th row and
    // column of the output) is the convolution at a stride of stride * sample.
    const int sample =
        dyve_param_.sdss().enabled() ? dyve_param_.sdss().stride() : 1;
    DyveConvShape shape = KernelShape();
    shape.num = 1;
    shape.channels = plan.prefix_length() / taps;
    shape.stride_h *= sample;
    shape.stride_w *= sample;
    shape.relu = false;  // the gate reads the signed prefix sums
    const int grid_rows = shape.output_height();
    const uint64_t bias_version =
        this->bias_term_ ? this->blobs_[1]->data()->version() : 0;
    bool weights_taken = false;
    prefix_ready_ = true;
    for (int t = 0; t < threads && prefix_ready_; ++t) {
      ImageWork& work = works_[t];
      if (!work.prefix_kernel) {
        work.prefix_kernel.reset(new DyveDnnlConvolution());
      }
      DyveDnnlConvolution* prefix_kernel = work.prefix_kernel.get();
      if (bands) {
        SplitRows(grid_rows, t, threads, &shape.band_begin, &shape.band_end);
      }
      // A band in the padding alone cannot run: the rows take the prefix.
      prefix_ready_ = DenseConfigure(prefix_kernel, shape, Dtype(0));
      if (prefix_ready_ && (!prefix_kernel->has_weights() ||
          work.prefix_generation != prefix_generation_ ||
          work.prefix_bias_version != bias_version)) {
        if (!weights_taken) plan.PrefixWeights(&prefix_weights_);
        weights_taken = true;
        DenseSetWeights(prefix_kernel, prefix_weights_.data(),
            this->bias_term_ ? this->blobs_[1]->cpu_data() : NULL);
        work.prefix_generation = prefix_generation_;
        work.prefix_bias_version = bias_version;
      }
    }
  }
  if (prefix_ready_ != was_ready || (prefix_ready_ && bands != was_bands)) {
    LOG(INFO) << type() << " layer '" << this->layer_param_.name()
              << "': SPET prefix path " << prefix_path();
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::SplitRows(int rows, int t, int split,
    int* begin, int* end) {
  *begin = t * rows / split;
  *end = (t + 1) * rows / split;
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::PreparePrefix(const Dtype* group_input,
    const DyveNeuronPlan<Dtype>& plan, ImageWork* work) const {
  const int map_size =
      this->conv_input_shape_.cpu_data()[1] *
      this->conv_input_shape_.cpu_data()[2];
  const int prefix_channels = plan.prefix_length() / this->blobs_[0]->count(2);
  const std::vector<int>& row_channels = plan.row_channels();
  // The prefix channels in row order, as the kernel's weights are; in
  // natural order they are the input itself.
  bool natural = true;
  for (int k = 0; k < prefix_channels; ++k) natural &= row_channels[k] == k;
  work->prefix_source = group_input;
  if (!natural) {
    work->prefix_input.resize(prefix_channels * map_size);
    for (int k = 0; k < prefix_channels; ++k) {
      const Dtype* map = group_input + row_channels[k] * map_size;
      std::copy(map, map + map_size, &work->prefix_input[k * map_size]);
    }
    work->prefix_source = work->prefix_input.data();
  }
  const int sample =
      dyve_param_.sdss().enabled() ? dyve_param_.sdss().stride() : 1;
  const int grid_h = (this->output_shape_[0] + sample - 1) / sample;
  const int grid_w = (this->output_shape_[1] + sample - 1) / sample;
  work->prefix_sums.resize(this->num_output_ * grid_h * grid_w);
}

template <typename Dtype>
bool DyveConvolutionLayer<Dtype>::ForwardDense(
    const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  if (!dense_ready_) return false;
  const uint64_t weights_version = this->blobs_[0]->data()->version();
  const uint64_t bias_version =
      this->bias_term_ ? this->blobs_[1]->data()->version() : 0;
  for (int t = 0; t < dense_threads_; ++t) {
    // A kernel prepared anew (another shape) holds no weights; one left
    // unused for a while may hold old ones.
    if (!dense_[t]->has_weights() ||
        weights_version != dense_weights_version_[t] ||
        bias_version != dense_bias_version_[t]) {
      DenseSetWeights(dense_[t].get(), this->blobs_[0]->cpu_data(),
          this->bias_term_ ? this->blobs_[1]->cpu_data() : NULL);
      dense_weights_version_[t] = weights_version;
      dense_bias_version_[t] = bias_version;
    }
  }
  const int threads = dense_threads_;
  for (int i = 0; i < bottom.size(); ++i) {
    const Dtype* bottom_data = bottom[i]->cpu_data();
    Dtype* top_data = top[i]->mutable_cpu_data();
    std::vector<std::thread> pool;
    for (int t = threads - 1; t >= 0; --t) {
      // A band kernel takes the whole blobs and writes its rows of them.
      const int begin = dense_bands_ ? 0 : t * this->num_ / threads;
      const Dtype* in = bottom_data + begin * this->bottom_dim_;
      Dtype* out = top_data + begin * this->top_dim_;
      DyveDnnlConvolution* dense = dense_[t].get();
      if (t == 0) {
        DenseForward(dense, in, out, 1);
      } else {
        pool.push_back(std::thread([dense, in, out]() {
          DenseForward(dense, in, out, 1);
        }));
      }
    }
    for (int t = 0; t < pool.size(); ++t) pool[t].join();
  }
  return true;
}

template <typename Dtype>
std::string DyveConvolutionLayer<Dtype>::SetDyveParam(
    const DyveParameter& param) {
  std::string error = ValidateDyveParameter(param, type(),
      this->layer_param_.name(), true);
  if (error.empty()) error = CheckShapes(param);
  return ApplyDyveParam(param, error, &this->layer_param_);
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::RefreshWeightState() {
  if (!WeightStateStale(this->blobs_[0]->data()->version())) return;
  const int groups = this->group_;
  const int group_outputs = this->num_output_ / groups;
  const int group_channels = this->channels_ / groups;
  const int taps = this->blobs_[0]->count(2);
  const Dtype* weights = this->blobs_[0]->cpu_data();
  plans_.resize(groups);
  for (int g = 0; g < groups; ++g) {
    const Dtype* group_weights =
        weights + g * group_outputs * group_channels * taps;
    plans_[g].ComputeOrders(dyve_param_, group_weights, group_outputs,
        group_channels, taps);
    plans_[g].Build(dyve_param_, group_weights, std::vector<bool>());
  }
  // SFMA's kernel test: per input channel, the largest sum of |w| of its
  // kernel slices over the outputs of its group.
  sfma_kernel_ok_.clear();
  const double kernel_threshold = dyve_param_.sfma().kernel_threshold();
  if (dyve_param_.sfma().enabled() && std::isfinite(kernel_threshold)) {
    sfma_kernel_ok_.assign(this->channels_, true);
    for (int g = 0; g < groups; ++g) {
      for (int c = 0; c < group_channels; ++c) {
        double largest = 0;
        for (int o = g * group_outputs; o < (g + 1) * group_outputs; ++o) {
          const Dtype* w = weights + (o * group_channels + c) * taps;
          double sum = 0;
          for (int t = 0; t < taps; ++t) sum += std::fabs(w[t]);
          largest = std::max(largest, sum);
        }
        sfma_kernel_ok_[g * group_channels + c] = largest <= kernel_threshold;
      }
    }
  }
  ++prefix_generation_;  // the prefix kernels' weights are stale
  WeightStateRebuilt(this->blobs_[0]->data()->version());
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::PadInput(const Dtype* group_input,
    int group_channels, const std::vector<int>& channels,
    ImageWork* work) const {
  const int height = this->conv_input_shape_.cpu_data()[1];
  const int width = this->conv_input_shape_.cpu_data()[2];
  const int* pad = this->pad_.cpu_data();
  const int padded_height = height + 2 * pad[0];
  const int padded_width = width + 2 * pad[1];
  work->padded.assign(group_channels * padded_height * padded_width + kSlack,
      Dtype(0));
  for (int k = 0; k < channels.size(); ++k) {
    const int c = channels[k];
    for (int h = 0; h < height; ++h) {
      const Dtype* src = group_input + (c * height + h) * width;
      std::copy(src, src + width, &work->padded[(c * padded_height + h +
          pad[0]) * padded_width + pad[1]]);
    }
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::SetRowChannels(
    const std::vector<int>& row_channels, ImageWork* work) const {
  const int* pad = this->pad_.cpu_data();
  const int padded_height = this->conv_input_shape_.cpu_data()[1] +
      2 * pad[0];
  const int padded_width = this->conv_input_shape_.cpu_data()[2] +
      2 * pad[1];
  // Where each channel of a row starts, once per image and group.
  work->channel_offset.resize(row_channels.size());
  for (int k = 0; k < row_channels.size(); ++k) {
    work->channel_offset[k] = row_channels[k] * padded_height * padded_width;
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::GatherRow(int p, Dtype* row,
    const ImageWork* work) const {
  const int* kernel = this->kernel_shape_.cpu_data();
  const int* stride = this->stride_.cpu_data();
  const int* pad = this->pad_.cpu_data();
  const int* dilation = this->dilation_.cpu_data();
  const int padded_width = this->conv_input_shape_.cpu_data()[2] + 2 * pad[1];
  const int y = p / this->output_shape_[1], x = p % this->output_shape_[1];
  const Dtype* corner =
      work->padded.data() + y * stride[0] * padded_width + x * stride[1];
  const std::vector<int>& channel_offset = work->channel_offset;
  const int channels = channel_offset.size();
  const int taps = kernel[0] * kernel[1];
  if (dilation[1] == 1) {
    // Each kernel row is a contiguous run of the padded map.
    GatherRuns(corner, channel_offset.data(), channels, kernel[0],
        dilation[0] * padded_width, kernel[1], row);
    return;
  }
  const int* offset = tap_offset_.data();
  for (int k = 0; k < channels; ++k) {
    const Dtype* base = corner + channel_offset[k];
    for (int t = 0; t < taps; ++t) row[t] = base[offset[t]];
    row += taps;
  }
}

namespace {

// Runs body(t) for t in [0, threads), body(0) on the calling thread.
template <typename Body>
void RunOnThreads(int threads, const Body& body) {
  std::vector<std::thread> pool;
  for (int t = 1; t < threads; ++t) pool.push_back(std::thread(body, t));
  body(0);
  for (int t = 0; t < pool.size(); ++t) pool[t].join();
}

}  // namespace

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::ForwardImage(const Dtype* input,
    Dtype* output, ImageWork* works, int split) const {
  const int map_size =
      this->conv_input_shape_.cpu_data()[1] *
      this->conv_input_shape_.cpu_data()[2];
  const int out_height = this->output_shape_[0];
  const int positions = out_height * this->output_shape_[1];
  const int group_outputs = this->num_output_ / this->group_;
  const int group_channels = this->channels_ / this->group_;
  const uint64_t fan_in = this->blobs_[0]->count(1);
  const int taps = this->blobs_[0]->count(2);
  const Dtype* bias = this->bias_term_ ? this->blobs_[1]->cpu_data() : NULL;
  const bool sdss = dyve_param_.sdss().enabled();
  const int sample = sdss ? dyve_param_.sdss().stride() : 1;
  const int grid_rows = (out_height + sample - 1) / sample;
  ImageWork* work = works;  // the image's state, and thread 0's scratch
  DyveEffort& effort = work->effort;
  effort.images += 1;
  effort.outputs += static_cast<uint64_t>(this->num_output_) * positions;
  effort.macs_dense +=
      static_cast<uint64_t>(this->num_output_) * positions * fan_in;

  FindConstantMaps(input, work);
  for (int g = 0; g < this->group_; ++g) {
    const DyveNeuronPlan<Dtype>& plan = BuildSfmaTable(g, work);
    work->bias = bias ? bias + g * group_outputs : NULL;
    const Dtype* group_input = input + g * group_channels * map_size;
    const std::vector<int>& row_channels = plan.row_channels();
    // The prepared prefix kernel holds the prefix of plans_[0]; the plan of an
    // image with constant maps (SFMA) has the same prefix as long as they
    // all lie in the rest. Else this image takes the rows.
    work->prefix_dense = prefix_ready_;
    if (prefix_ready_ && work->constant_count > 0) {
      const std::vector<int>& full_row = plans_[g].row_channels();
      for (int k = 0; k < plans_[g].prefix_length() / taps; ++k) {
        work->prefix_dense &= !work->group_constant[full_row[k]];
      }
    }
    if (work->prefix_dense) {
      PreparePrefix(group_input, plan, work);
      // Rows hold the rest only; SDSS's fill needs whole rows later.
      work->rest_channels.assign(
          row_channels.begin() + plan.prefix_length() / taps,
          row_channels.end());
      PadInput(group_input, group_channels, sdss ?
          row_channels : work->rest_channels, work);
      SetRowChannels(work->rest_channels, work);
    } else {
      PadInput(group_input, group_channels, row_channels, work);
      SetRowChannels(row_channels, work);
    }
    ListGridPositions(work);
    Dtype* group_output = output + g * group_outputs * positions;
    // Thread t: its band of grid rows, prefix sums (its kernel's band) and
    // rows; then, once every grid value is in, its band of the fill.
    RunOnThreads(split, [&](int t) {
      int begin, end;
      SplitRows(grid_rows, t, split, &begin, &end);
      if (work->prefix_dense) {
        DenseForward(works[t].prefix_kernel.get(), work->prefix_source,
            work->prefix_sums.data(), 1);
      }
      EvaluateGridPositions(plan, group_output, *work, begin, end, &works[t]);
    });
    if (sdss) {
      if (work->prefix_dense) SetRowChannels(row_channels, work);
      RunOnThreads(split, [&](int t) {
        int begin, end;
        SplitRows(out_height, t, split, &begin, &end);
        FillSdssPositions(plan, group_output, *work, begin, end, &works[t]);
      });
    }
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::FindConstantMaps(const Dtype* input,
    ImageWork* work) const {
  const int channels = this->channels_;
  work->constant.assign(channels, false);
  work->mean.assign(channels, Dtype(0));
  if (!dyve_param_.sfma().enabled()) return;
  const int map_size =
      this->conv_input_shape_.cpu_data()[1] *
      this->conv_input_shape_.cpu_data()[2];
  const DyveSfmaParameter_Spread measure = dyve_param_.sfma().spread();
  const bool use_range = measure == DyveSfmaParameter_Spread_RANGE;
  const bool kernel_test = !sfma_kernel_ok_.empty();
  DyveEffort& effort = work->effort;
  for (int c = 0; c < channels; ++c) {
    const Dtype* map = input + c * map_size;
    double sum = 0, low = map[0], high = map[0];
    for (int i = 0; i < map_size; ++i) {
      sum += map[i];
      low = std::min<double>(low, map[i]);
      high = std::max<double>(high, map[i]);
    }
    const double mu = sum / map_size;
    double spread = high - low;
    if (!use_range) {
      double squares = 0;
      for (int i = 0; i < map_size; ++i) {
        squares += (map[i] - mu) * (map[i] - mu);
      }
      spread = squares / map_size;  // VARIANCE
      if (measure == DyveSfmaParameter_Spread_STD) spread = std::sqrt(spread);
    }
    effort.ops_sfma += 3 * map_size + 1;
    work->mean[c] = mu;
    work->constant[c] = spread <= dyve_param_.sfma().threshold() &&
        (!kernel_test || sfma_kernel_ok_[c]);
    effort.sfma_maps += work->constant[c];
  }
}

template <typename Dtype>
const DyveNeuronPlan<Dtype>& DyveConvolutionLayer<Dtype>::BuildSfmaTable(
    int g, ImageWork* work) const {
  const int* kernel = this->kernel_shape_.cpu_data();
  const int taps = kernel[0] * kernel[1];
  const int group_outputs = this->num_output_ / this->group_;
  const int group_channels = this->channels_ / this->group_;
  const Dtype* group_weights = this->blobs_[0]->cpu_data() +
      g * group_outputs * group_channels * taps;
  const std::vector<bool>& constant = work->constant;
  std::vector<bool>& group_constant = work->group_constant;
  group_constant.assign(constant.begin() + g * group_channels,
      constant.begin() + (g + 1) * group_channels);
  const int constant_count =
      std::count(group_constant.begin(), group_constant.end(), true);
  work->constant_count = constant_count;
  work->sfma_skipped = constant_count * taps;
  work->table_size = (kernel[0] + 1) * (kernel[1] + 1);
  if (constant_count == 0) return plans_[g];
  // This image's live channels differ: a plan without the constant maps,
  // built in a kept object from the layer's orders (its buffers are reused).
  work->reduced_plan.CopyOrders(plans_[g]);
  work->reduced_plan.Build(dyve_param_, group_weights, group_constant);
  std::vector<int>& constant_channels = work->constant_channels;
  constant_channels.clear();
  for (int c = 0; c < group_channels; ++c) {
    if (group_constant[c]) constant_channels.push_back(c);
  }
  // Summed kernel of the constant maps and its summed-area table, so the
  // taps that fall into the zero padding are left out exactly.
  const Dtype* mean = &work->mean[g * group_channels];
  work->sfma_table.assign(group_outputs * work->table_size, 0);
  for (int o = 0; o < group_outputs; ++o) {
    Dtype* table = &work->sfma_table[o * work->table_size];
    for (int kh = 0; kh < kernel[0]; ++kh) {
      for (int kw = 0; kw < kernel[1]; ++kw) {
        Dtype summed = 0;
        for (int k = 0; k < constant_channels.size(); ++k) {
          const int c = constant_channels[k];
          summed += mean[c] * group_weights[
              ((o * group_channels + c) * kernel[0] + kh) * kernel[1] + kw];
        }
        table[(kh + 1) * (kernel[1] + 1) + kw + 1] = summed
            + table[kh * (kernel[1] + 1) + kw + 1]
            + table[(kh + 1) * (kernel[1] + 1) + kw]
            - table[kh * (kernel[1] + 1) + kw];
      }
    }
  }
  work->effort.ops_sfma += static_cast<uint64_t>(group_outputs) *
      (constant_count * taps + taps);
  return work->reduced_plan;
}

template <typename Dtype>
inline Dtype DyveConvolutionLayer<Dtype>::InitialValue(int o, int p,
    const ImageWork& image, ImageWork* work) const {
  const Dtype bias = image.bias ? image.bias[o] : Dtype(0);
  return bias + SfmaTerm(o, p, image, work);
}

template <typename Dtype>
inline Dtype DyveConvolutionLayer<Dtype>::SfmaTerm(int o, int p,
    const ImageWork& image, ImageWork* work) const {
  if (image.constant_count == 0) return Dtype(0);
  work->effort.macs_skipped_sfma += image.sfma_skipped;
  const Dtype* table = &image.sfma_table[o * image.table_size];
  const int* rect = &sfma_rect_[p * 5];
  if (rect[0] == kInterior) {
    work->effort.ops_sfma += 1;
    return table[rect[1]];
  }
  work->effort.ops_sfma += 4;
  if (rect[0] == kOutside) return Dtype(0);
  return table[rect[1]] - table[rect[2]] - table[rect[3]] + table[rect[4]];
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::ListGridPositions(ImageWork* work) const {
  const int out_width = this->output_shape_[1];
  const int positions = this->output_shape_[0] * out_width;
  const bool sdss = dyve_param_.sdss().enabled();
  const int sample = dyve_param_.sdss().stride();
  std::vector<int>& grid = work->grid;
  grid.clear();
  for (int p = 0; p < positions; ++p) {
    const int y = p / out_width, x = p % out_width;
    if (!sdss || (y % sample == 0 && x % sample == 0)) grid.push_back(p);
  }
  work->grid_width = sdss ? (out_width + sample - 1) / sample : out_width;
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::EvaluateGridPositions(
    const DyveNeuronPlan<Dtype>& plan, Dtype* group_output,
    const ImageWork& image, int row_begin, int row_end,
    ImageWork* work) const {
  const int positions = this->output_shape_[0] * this->output_shape_[1];
  const int group_outputs = this->num_output_ / this->group_;
  const std::vector<int>& grid = image.grid;
  const int first = row_begin * image.grid_width;
  const int last = row_end * image.grid_width;
  // In passes of a few rows, so that gathered rows are still in cache when
  // the GEMM and the survivors read them.
  // With the prefix from oneDNN, rows hold the rest taps only.
  const bool prefix_dense = image.prefix_dense;
  const int row_length = prefix_dense ?
      plan.row_length() - plan.prefix_length() : plan.row_length();
  const int pass_rows = std::min<int>(std::max(1, last - first),
                                      kRowsPerPass);
  std::vector<Dtype>& rows = work->rows;
  std::vector<Dtype>& z = work->z;
  rows.resize(std::max(1, pass_rows * row_length) + kSlack);
  z.resize(pass_rows * group_outputs);
  for (int start = first; start < last; start += pass_rows) {
    const int count = std::min<int>(pass_rows, last - start);
    for (int r = 0; r < count; ++r) {
      GatherRow(grid[start + r], &rows[r * row_length], &image);
    }
    if (prefix_dense) {
      // Bias and prefix sums, transposed to one row of outputs per position,
      // plus SFMA's term of the constant maps (all in the rest).
      const Dtype* sums = image.prefix_sums.data() + start;
      for (int r = 0; r < count; ++r) {
        for (int o = 0; o < group_outputs; ++o) {
          z[r * group_outputs + o] = sums[o * grid.size() + r];
        }
      }
      if (image.constant_count > 0) {
        for (int r = 0; r < count; ++r) {
          for (int o = 0; o < group_outputs; ++o) {
            z[r * group_outputs + o] +=
                SfmaTerm(o, grid[start + r], image, work);
          }
        }
      }
      plan.EvaluateRest(rows.data(), count, z.data(), &work->scratch,
          &work->effort);
    } else {
      for (int r = 0; r < count; ++r) {
        for (int o = 0; o < group_outputs; ++o) {
          z[r * group_outputs + o] =
              InitialValue(o, grid[start + r], image, work);
        }
      }
      plan.EvaluateRows(rows.data(), count, z.data(), &work->scratch,
          &work->effort);
    }
    for (int r = 0; r < count; ++r) {
      for (int o = 0; o < group_outputs; ++o) {
        group_output[o * positions + grid[start + r]] =
            z[r * group_outputs + o];
      }
    }
  }
}

namespace {

// SDSS's tests of position p over a group's outputs (maps of `positions`
// values). Branch-free over the outputs (which neurons are significant follows
// no pattern): every neighbour is read, the compares are counted up to the
// first significant one, as the sequential test would make them. With
// kRangeTest, an output whose neighbours are all insignificant is filled only
// if also their max - min is <= range_threshold (each such test counted in
// *range_tests). Writes each output's fill at p (overwritten when the neuron
// is computed) and the outputs to compute to `computed`; returns how many.
template <typename Dtype, bool kRangeTest>
int TestSdssPosition(Dtype* group_output, int positions, int p,
    const int* offset, int neighbours, int group_outputs, Dtype threshold,
    Dtype range_threshold, bool fill_mean, int* computed, uint64_t* compares,
    uint64_t* range_tests) {
  int count = 0;
  uint64_t made_total = 0, tested = 0;
  for (int o = 0; o < group_outputs; ++o) {
    const Dtype* map = group_output + o * positions;
    Dtype sum = 0, low = map[offset[0]], high = low;
    int made = 0, still_quiet = 1;
    for (int k = 0; k < neighbours; ++k) {
      const Dtype value = map[offset[k]];
      made += still_quiet;
      still_quiet &= !(value > threshold);
      sum += value;
      if (kRangeTest) {
        low = std::min(low, value);
        high = std::max(high, value);
      }
    }
    made_total += made;
    int fill = still_quiet;
    if (kRangeTest) {
      tested += still_quiet;
      fill &= (high - low <= range_threshold);
    }
    group_output[o * positions + p] = fill_mean ? sum / neighbours : Dtype(0);
    computed[count] = o;
    count += !fill;
  }
  *compares += made_total;
  *range_tests += tested;
  return count;
}

}  // namespace

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::FillSdssPositions(
    const DyveNeuronPlan<Dtype>& plan, Dtype* group_output,
    const ImageWork& image, int row_begin, int row_end,
    ImageWork* work) const {
  const int out_height = this->output_shape_[0];
  const int out_width = this->output_shape_[1];
  const int positions = out_height * out_width;
  const int group_outputs = this->num_output_ / this->group_;
  const uint64_t fan_in = this->blobs_[0]->count(1);
  const int sample = dyve_param_.sdss().stride();
  const Dtype threshold = dyve_param_.sdss().threshold();
  const Dtype range_threshold = dyve_param_.sdss().range_threshold();
  const bool range_test = std::isfinite(range_threshold);  // inf: none
  const bool fill_mean =
      dyve_param_.sdss().fill() == DyveSdssParameter_Fill_MEAN;
  DyveEffort& effort = work->effort;
  std::vector<Dtype>& row = work->row;
  std::vector<Dtype>& maxima = work->maxima;
  std::vector<int>& computed = work->computed;
  std::vector<Dtype>& values = work->values;
  row.resize(std::max(1, plan.row_length()) + kSlack);
  maxima.resize(std::max(1, plan.rest_channels()));
  computed.resize(group_outputs);
  for (int p = row_begin * out_width; p < row_end * out_width; ++p) {
    const int y = p / out_width, x = p % out_width;
    if (y % sample == 0 && x % sample == 0) continue;
    const int y0 = y - y % sample, x0 = x - x % sample;
    int ys[2] = {y0, y0 + sample}, xs[2] = {x0, x0 + sample};
    const int ny = (y % sample != 0 && ys[1] < out_height) ? 2 : 1;
    const int nx = (x % sample != 0 && xs[1] < out_width) ? 2 : 1;
    const int neighbours = ny * nx;
    int offset[4];
    for (int i = 0; i < ny; ++i) {
      for (int j = 0; j < nx; ++j) {
        offset[i * nx + j] = ys[i] * out_width + xs[j];
      }
    }
    uint64_t compares = 0, range_tests = 0;
    const int count = range_test ?
        TestSdssPosition<Dtype, true>(group_output, positions, p, offset,
            neighbours, group_outputs, threshold, range_threshold, fill_mean,
            computed.data(), &compares, &range_tests) :
        TestSdssPosition<Dtype, false>(group_output, positions, p, offset,
            neighbours, group_outputs, threshold, range_threshold, fill_mean,
            computed.data(), &compares, &range_tests);
    const int filled = group_outputs - count;
    // The range test: max and min over the neighbours, the subtraction and
    // the compare.
    effort.ops_sdss += compares + range_tests * 2 * neighbours;
    effort.sdss_filled += filled;
    effort.macs_skipped_sdss += static_cast<uint64_t>(filled) * fan_in;
    if (fill_mean) {
      effort.ops_sdss += static_cast<uint64_t>(filled) * neighbours;
    }
    if (count == 0) continue;
    values.resize(count);
    for (int i = 0; i < count; ++i) {
      values[i] = InitialValue(computed[i], p, image, work);
    }
    // The significant neurons of this position, on one gathered row.
    GatherRow(p, row.data(), &image);
    if (plan.uses_bound()) {
      plan.RowMaxima(row.data(), maxima.data(), &effort);
    }
    plan.EvaluateSelected(row.data(), maxima.data(), computed.data(),
        count, values.data(), &work->scratch, &effort);
    for (int i = 0; i < count; ++i) {
      group_output[computed[i] * positions + p] = values[i];
    }
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::Forward_cpu(
    const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  effort_.forward_passes += 1;
  if (!DyveKnobsOn(dyve_param_)) {
    // oneDNN (its ReLU fused) where it is ready, else Caffe's path.
    const bool fused = ForwardDense(bottom, top);
    if (!fused) ConvolutionLayer<Dtype>::Forward_cpu(bottom, top);
    const uint64_t fan_in = this->blobs_[0]->count(1);
    for (int i = 0; i < top.size(); ++i) {
      if (dyve_param_.relu() && !fused) {
        ReluInPlace(top[i]->count(), top[i]->mutable_cpu_data());
      }
      effort_.images += this->num_;
      effort_.outputs += top[i]->count();
      effort_.macs_dense += top[i]->count() * fan_in;
      effort_.macs_executed += top[i]->count() * fan_in;
    }
    return;
  }
  RefreshWeightState();
  for (int i = 0; i < bottom.size(); ++i) {
    const Dtype* bottom_data = bottom[i]->cpu_data();
    if (dyve_param_.spet().exact()) {
      CheckExactModeInput(bottom_data, bottom[i]->count(), type(),
          this->layer_param_, i);
    }
    Dtype* top_data = top[i]->mutable_cpu_data();
    // The images of a batch split over as many threads as BLAS may use; BLAS
    // runs single-threaded inside them (docs/performance.md). With fewer
    // images than threads, each image's positions split instead, by rows of
    // SDSS's grid (every row without SDSS).
    const int blas_threads = BlasThreads();
    const int sample =
        dyve_param_.sdss().enabled() ? dyve_param_.sdss().stride() : 1;
    const int grid_rows = (this->output_shape_[0] + sample - 1) / sample;
    const bool by_positions = this->num_ < blas_threads && grid_rows > 1 &&
        ImageMacs() >= PositionSplitMacs();
    const int threads = by_positions ? std::min(blas_threads, grid_rows) :
        std::max(1, std::min(this->num_, blas_threads));
    works_.resize(std::max<size_t>(works_.size(), threads));
    ConfigurePrefix(threads, by_positions);
    if (threads == 1) {
      ForwardImages(bottom_data, top_data, 0, this->num_, &works_[0]);
    } else if (by_positions) {
      SetBlasThreads(1);
      for (int n = 0; n < this->num_; ++n) {
        ForwardImage(bottom_data + n * this->bottom_dim_,
            top_data + n * this->top_dim_, &works_[0], threads);
      }
      SetBlasThreads(blas_threads);
    } else {
      SetBlasThreads(1);
      std::vector<std::thread> pool;
      for (int t = 1; t < threads; ++t) {
        pool.push_back(std::thread(&DyveConvolutionLayer::ForwardImages, this,
            bottom_data, top_data, t * this->num_ / threads,
            (t + 1) * this->num_ / threads, &works_[t]));
      }
      ForwardImages(bottom_data, top_data, 0, this->num_ / threads,
          &works_[0]);
      for (int t = 0; t < pool.size(); ++t) pool[t].join();
      SetBlasThreads(blas_threads);
    }
    for (int t = 0; t < threads; ++t) {
      effort_.Add(works_[t].effort);
      works_[t].effort.Reset();
    }
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::ForwardImages(const Dtype* bottom,
    Dtype* top, int begin, int end, ImageWork* work) const {
  for (int n = begin; n < end; ++n) {
    ForwardImage(bottom + n * this->bottom_dim_, top + n * this->top_dim_,
        work, 1);
  }
}

template <typename Dtype>
void DyveConvolutionLayer<Dtype>::Backward_cpu(
    const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
    const vector<Blob<Dtype>*>& bottom) {
  bool needed = this->param_propagate_down(0) ||
      (this->bias_term_ && this->param_propagate_down(1));
  for (int i = 0; i < propagate_down.size(); ++i) {
    needed = needed || propagate_down[i];
  }
  if (!needed) return;
  CheckBackwardAllowed(type(), this->layer_param_.name());
  if (dyve_param_.relu()) {
    for (int i = 0; i < top.size(); ++i) {
      MaskReluDiff(top[i]->count(), top[i]->cpu_data(),
          top[i]->mutable_cpu_diff());
    }
  }
  ConvolutionLayer<Dtype>::Backward_cpu(top, propagate_down, bottom);
}

INSTANTIATE_CLASS(DyveConvolutionLayer);
REGISTER_LAYER_CLASS(DyveConvolution);

}  // namespace caffe
