#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "google/protobuf/text_format.h"
#include "gtest/gtest.h"

#include "caffe/blob.hpp"
#include "caffe/common.hpp"
#include "caffe/filler.hpp"
#include "caffe/layers/conv_layer.hpp"
#include "caffe/layers/dyve_conv_layer.hpp"
#include "caffe/net.hpp"
#include "caffe/util/dyve_dnnl.hpp"
#include "caffe/util/io.hpp"
#include "caffe/util/math_functions.hpp"

#include "caffe/test/test_caffe_main.hpp"

namespace caffe {

// Geometry of one test convolution (square or not, any group).
struct ConvShape {
  int num, channels, height, width, outputs;
  int kernel_h, kernel_w, stride, pad, dilation, group;
  bool bias;
};

template <typename TypeParam>
class DyveConvolutionLayerTest : public MultiDeviceTest<TypeParam> {
  typedef typename TypeParam::Dtype Dtype;

 protected:
  DyveConvolutionLayerTest()
      : bottom_(new Blob<Dtype>()), top_(new Blob<Dtype>()),
        stock_top_(new Blob<Dtype>()) {
    bottom_vec_.push_back(bottom_);
    top_vec_.push_back(top_);
    stock_top_vec_.push_back(stock_top_);
  }
  virtual ~DyveConvolutionLayerTest() {
    delete bottom_;
    delete top_;
    delete stock_top_;
  }

  LayerParameter ConvParam(const ConvShape& s) {
    LayerParameter param;
    param.set_name("dyve_conv");
    ConvolutionParameter* conv = param.mutable_convolution_param();
    conv->set_num_output(s.outputs);
    conv->set_kernel_h(s.kernel_h);
    conv->set_kernel_w(s.kernel_w);
    conv->add_stride(s.stride);
    conv->add_pad(s.pad);
    conv->add_dilation(s.dilation);
    conv->set_group(s.group);
    conv->set_bias_term(s.bias);
    conv->mutable_weight_filler()->set_type("gaussian");
    conv->mutable_bias_filler()->set_type("gaussian");
    return param;
  }

  // Fills the bottom: uniform in [low, high].
  void FillBottom(const ConvShape& s, Dtype low, Dtype high) {
    bottom_->Reshape(s.num, s.channels, s.height, s.width);
    FillerParameter filler_param;
    filler_param.set_min(low);
    filler_param.set_max(high);
    UniformFiller<Dtype> filler(filler_param);
    filler.Fill(bottom_);
  }

  // Runs the stock Convolution with the DyVE layer's blobs into stock_top_.
  void RunStock(const ConvShape& s, Layer<Dtype>* dyve, bool relu) {
    ConvolutionLayer<Dtype> stock(ConvParam(s));
    stock.SetUp(bottom_vec_, stock_top_vec_);
    for (int i = 0; i < stock.blobs().size(); ++i) {
      stock.blobs()[i]->CopyFrom(*dyve->blobs()[i]);
    }
    stock.Forward(bottom_vec_, stock_top_vec_);
    if (relu) {
      Dtype* data = stock_top_->mutable_cpu_data();
      for (int i = 0; i < stock_top_->count(); ++i) {
        data[i] = std::max(data[i], Dtype(0));
      }
    }
  }

  // Sets up and runs the DyVE layer, then expects the stock result (after a
  // ReLU when `relu`) to within 1e-5.
  void ExpectStockResult(const ConvShape& s, Layer<Dtype>* dyve, bool relu) {
    dyve->SetUp(bottom_vec_, top_vec_);
    dyve->Forward(bottom_vec_, top_vec_);
    RunStock(s, dyve, relu);
    ExpectTopsNear(1e-5);
  }

  void ExpectTopsNear(Dtype relative) {
    ASSERT_EQ(top_->shape(), stock_top_->shape());
    for (int i = 0; i < top_->count(); ++i) {
      const Dtype expected = stock_top_->cpu_data()[i];
      EXPECT_NEAR(top_->cpu_data()[i], expected,
          relative * std::max(Dtype(1), std::fabs(expected))) << "at " << i;
    }
  }

  // The input under tap (kh, kw) of group-local channel c for neuron
  // (n, o, y, x) into *value; false when the tap falls into the padding.
  bool TapInput(const ConvShape& s, int n, int o, int y, int x, int c,
      int kh, int kw, Dtype* value) {
    const int ih = y * s.stride - s.pad + kh * s.dilation;
    const int iw = x * s.stride - s.pad + kw * s.dilation;
    if (ih < 0 || ih >= s.height || iw < 0 || iw >= s.width) return false;
    const int group_channels = s.channels / s.group;
    const int g = o / (s.outputs / s.group);
    *value = bottom_->data_at(n, g * group_channels + c, ih, iw);
    return true;
  }

  static Dtype TapWeight(const ConvShape& s, const Dtype* weights, int o,
      int c, int kh, int kw) {
    const int group_channels = s.channels / s.group;
    return weights[((o * group_channels + c) * s.kernel_h + kh) * s.kernel_w +
        kw];
  }

  // Plain reference: the sum over the given group-local channels of the
  // neuron (n, o, y, x), bias not included.
  Dtype NeuronSum(const ConvShape& s, const Dtype* weights, int n, int o,
      int y, int x, const std::vector<int>& channels) {
    Dtype sum = 0;
    for (int k = 0; k < channels.size(); ++k) {
      for (int kh = 0; kh < s.kernel_h; ++kh) {
        for (int kw = 0; kw < s.kernel_w; ++kw) {
          Dtype v;
          if (!TapInput(s, n, o, y, x, channels[k], kh, kw, &v)) continue;
          sum += TapWeight(s, weights, o, channels[k], kh, kw) * v;
        }
      }
    }
    return sum;
  }

  // New weights after set-up, as CopyTrainedLayersFrom would give: the layer
  // must derive its orders from these, not from the filler's.
  static void RefillWeights(Layer<Dtype>* layer) {
    FillerParameter filler_param;
    filler_param.set_std(0.5);
    GaussianFiller<Dtype> filler(filler_param);
    filler.Fill(layer->blobs()[0].get());
  }

  // SPET's per-layer order of group g, by hand: channels by summed |W| over
  // the group's outputs, descending (ties by index).
  static std::vector<int> LayerOrder(const ConvShape& s, const Dtype* weights,
      int g) {
    const int group_channels = s.channels / s.group;
    const int group_outputs = s.outputs / s.group;
    const int taps = s.kernel_h * s.kernel_w;
    std::vector<std::pair<double, int> > significance;
    for (int c = 0; c < group_channels; ++c) {
      double total = 0;
      for (int o = g * group_outputs; o < (g + 1) * group_outputs; ++o) {
        for (int t = 0; t < taps; ++t) {
          total += std::fabs(weights[(o * group_channels + c) * taps + t]);
        }
      }
      significance.push_back(std::make_pair(-total, c));
    }
    std::sort(significance.begin(), significance.end());
    std::vector<int> order;
    for (int k = 0; k < group_channels; ++k) {
      order.push_back(significance[k].second);
    }
    return order;
  }

  // What the BOUND gate adds for neuron (n, o, y, x): per channel, its
  // positive weights' sum times the largest input under its taps (0 for a
  // tap in the padding).
  Dtype RestBound(const ConvShape& s, const Dtype* weights, int n, int o,
      int y, int x, const std::vector<int>& channels) {
    Dtype bound = 0;
    for (int k = 0; k < channels.size(); ++k) {
      const int c = channels[k];
      Dtype positive = 0, largest = 0;
      bool any_padding = false, any_inside = false;
      for (int t = 0; t < s.kernel_h * s.kernel_w; ++t) {
        const int kh = t / s.kernel_w, kw = t % s.kernel_w;
        positive += std::max(Dtype(0), TapWeight(s, weights, o, c, kh, kw));
        Dtype v;
        if (!TapInput(s, n, o, y, x, c, kh, kw, &v)) {
          any_padding = true;
          continue;
        }
        largest = any_inside ? std::max(largest, v) : v;
        any_inside = true;
      }
      if (any_padding) largest = std::max(largest, Dtype(0));
      bound += positive * largest;
    }
    return bound;
  }

  static void ExpectBalanced(const DyveEffort& e) {
    EXPECT_EQ(e.macs_dense, e.macs_executed + e.macs_skipped_spet +
        e.macs_skipped_exact + e.macs_skipped_sdss + e.macs_skipped_sfma);
  }

  Blob<Dtype>* const bottom_;
  Blob<Dtype>* const top_;
  Blob<Dtype>* const stock_top_;
  vector<Blob<Dtype>*> bottom_vec_, top_vec_, stock_top_vec_;
};

TYPED_TEST_CASE(DyveConvolutionLayerTest, TestDtypesAndDevices);

// Shapes covering group > 1, stride, pad, dilation, batch > 1, 1x1, no bias.
static std::vector<ConvShape> TestShapes() {
  std::vector<ConvShape> shapes;
  const ConvShape list[] = {
    // num, C, H, W, O, kh, kw, stride, pad, dilation, group, bias
    {2, 3, 9, 8, 4, 3, 3, 1, 0, 1, 1, true},
    {2, 4, 11, 11, 6, 3, 3, 2, 1, 1, 2, true},
    {1, 6, 10, 9, 4, 3, 2, 1, 2, 2, 2, false},
    {3, 5, 6, 7, 7, 1, 1, 1, 0, 1, 1, true},
    {2, 8, 7, 7, 8, 5, 5, 1, 2, 1, 4, true},
  };
  for (int i = 0; i < sizeof(list) / sizeof(list[0]); ++i) {
    shapes.push_back(list[i]);
  }
  return shapes;
}

TYPED_TEST(DyveConvolutionLayerTest, TestKnobsOffEqualsConvolution) {
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<ConvShape> shapes = TestShapes();
  for (int i = 0; i < shapes.size(); ++i) {
    for (int relu = 0; relu < 2; ++relu) {
      this->FillBottom(shapes[i], -1, 1);
      LayerParameter param = this->ConvParam(shapes[i]);
      param.mutable_dyve_param()->set_relu(relu);
      DyveConvolutionLayer<Dtype> layer(param);
      this->ExpectStockResult(shapes[i], &layer, relu);
      EXPECT_EQ(layer.effort().macs_executed, layer.effort().macs_dense);
      EXPECT_EQ(layer.effort().outputs, this->top_->count());
      EXPECT_EQ(layer.effort().macs_dense,
          this->top_->count() * layer.blobs()[0]->count(1));
    }
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestKnobsOnButInertEqualsConvolution) {
  // The row-based path with knobs that cannot fire (SPET with f = 1 and a
  // threshold below any sum; SFMA with threshold 0 on random maps) must give
  // the stock result: it checks the gather, GEMM and write-back.
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<ConvShape> shapes = TestShapes();
  for (int i = 0; i < shapes.size(); ++i) {
    this->FillBottom(shapes[i], -1, 1);
    LayerParameter param = this->ConvParam(shapes[i]);
    DyveParameter* dyve = param.mutable_dyve_param();
    dyve->set_relu(true);
    dyve->mutable_spet()->set_enabled(true);
    dyve->mutable_spet()->set_fraction(1);
    dyve->mutable_spet()->set_threshold(-1e30);
    dyve->mutable_sfma()->set_enabled(true);
    DyveConvolutionLayer<Dtype> layer(param);
    this->ExpectStockResult(shapes[i], &layer, true);
    EXPECT_EQ(layer.effort().macs_executed, layer.effort().macs_dense);
    EXPECT_EQ(layer.effort().spet_zeroed, 0);
    EXPECT_EQ(layer.effort().sfma_maps, 0);
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestExactModeMatchesStockAfterReLU) {
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<ConvShape> shapes = TestShapes();
  for (int i = 0; i < shapes.size(); ++i) {
    for (int interval = 1; interval <= 16; interval *= 4) {
      this->FillBottom(shapes[i], 0, 1);  // after a ReLU: non-negative
      LayerParameter param = this->ConvParam(shapes[i]);
      param.mutable_dyve_param()->set_relu(true);
      param.mutable_dyve_param()->mutable_spet()->set_exact(true);
      param.mutable_dyve_param()->mutable_spet()->set_check_interval(interval);
      DyveConvolutionLayer<Dtype> layer(param);
      this->ExpectStockResult(shapes[i], &layer, true);
      const DyveEffort& e = layer.effort();
      if (interval == 1) {
        // Checked after every negative term, some neuron must stop early. (A
        // coarse interval may not get a check in before a small fan-in ends.)
        EXPECT_GT(e.exact_stopped, 0) << "shape " << i;
        EXPECT_GT(e.macs_skipped_exact, 0) << "shape " << i;
        EXPECT_LT(e.macs_executed, e.macs_dense);
      }
      EXPECT_GT(e.ops_exact, 0);
      this->ExpectBalanced(e);
    }
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestSpetZeroesExactlyBelowThreshold) {
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<ConvShape> shapes = TestShapes();
  for (int i = 0; i < shapes.size(); ++i) {
    const ConvShape& s = shapes[i];
    const Dtype threshold = 0.1;
    this->FillBottom(s, -1, 1);
    LayerParameter param = this->ConvParam(s);
    param.mutable_dyve_param()->set_relu(true);
    DyveSpetParameter* spet = param.mutable_dyve_param()->mutable_spet();
    spet->set_enabled(true);
    spet->set_fraction(0.5);
    spet->set_threshold(threshold);
    DyveConvolutionLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    this->RefillWeights(&layer);
    layer.Forward(this->bottom_vec_, this->top_vec_);

    const int group_channels = s.channels / s.group;
    const int group_outputs = s.outputs / s.group;
    const int prefix = (group_channels + 1) / 2;  // ceil(0.5 * C)
    const Dtype* w = layer.blobs()[0]->cpu_data();
    const int taps = s.kernel_h * s.kernel_w;
    uint64_t zeroed = 0, executed = 0, ties = 0;
    const int out_h = this->top_->height(), out_w = this->top_->width();
    for (int g = 0; g < s.group; ++g) {
      const std::vector<int> all = this->LayerOrder(s, w, g);
      const std::vector<int> head(all.begin(), all.begin() + prefix);
      for (int n = 0; n < s.num; ++n) {
        for (int o = g * group_outputs; o < (g + 1) * group_outputs; ++o) {
          const Dtype b = s.bias ? layer.blobs()[1]->cpu_data()[o] : Dtype(0);
          for (int y = 0; y < out_h; ++y) {
            for (int x = 0; x < out_w; ++x) {
              const Dtype partial = b + this->NeuronSum(s, w, n, o, y, x, head);
              const Dtype full = b + this->NeuronSum(s, w, n, o, y, x, all);
              const Dtype got = this->top_->data_at(n, o, y, x);
              executed += prefix * taps;
              if (std::fabs(partial - threshold) < 1e-5) {
                // Too close to call in float: accept either branch.
                ++ties;
                if (got != 0) executed += (group_channels - prefix) * taps;
                else ++zeroed;
                continue;
              }
              if (partial < threshold) {
                EXPECT_EQ(got, 0);
                ++zeroed;
              } else {
                EXPECT_NEAR(got, std::max(full, Dtype(0)), 1e-4);
                executed += (group_channels - prefix) * taps;
              }
            }
          }
        }
      }
    }
    const DyveEffort& e = layer.effort();
    EXPECT_GT(zeroed, 0);
    if (ties == 0) {
      EXPECT_EQ(e.spet_zeroed, zeroed) << "shape " << i;
      EXPECT_EQ(e.macs_executed, executed);
    }
    EXPECT_EQ(e.ops_spet, this->top_->count());
    this->ExpectBalanced(e);
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestSpetBoundGateByHand) {
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<ConvShape> shapes = TestShapes();
  const float scales[] = {1.f, 0.25f};
  uint64_t zeroed_at_one = 0;
  for (int i = 0; i < shapes.size(); ++i) {
    for (int si = 0; si < 2; ++si) {
      const ConvShape& s = shapes[i];
      const float scale = scales[si];
      this->FillBottom(s, 0, 1);  // after a ReLU: the bound is a bound
      LayerParameter param = this->ConvParam(s);
      param.mutable_dyve_param()->set_relu(true);
      DyveSpetParameter* spet = param.mutable_dyve_param()->mutable_spet();
      spet->set_enabled(true);
      spet->set_fraction(0.5);
      spet->set_gate(DyveSpetParameter_Gate_BOUND);
      spet->set_bound_scale(scale);
      DyveConvolutionLayer<Dtype> layer(param);
      layer.SetUp(this->bottom_vec_, this->top_vec_);
      this->RefillWeights(&layer);
      layer.Forward(this->bottom_vec_, this->top_vec_);
      if (scale == 1.f) {
        // Scale 1, threshold 0: zeroes only surely negative neurons.
        this->RunStock(s, &layer, true);
        this->ExpectTopsNear(1e-5);
      }
      const int group_channels = s.channels / s.group;
      const int group_outputs = s.outputs / s.group;
      const int prefix = (group_channels + 1) / 2;  // ceil(0.5 * C)
      const int rest = group_channels - prefix;
      const Dtype* w = layer.blobs()[0]->cpu_data();
      const int taps = s.kernel_h * s.kernel_w;
      const int out_h = this->top_->height(), out_w = this->top_->width();
      uint64_t zeroed = 0, ties = 0;
      for (int g = 0; g < s.group; ++g) {
        const std::vector<int> order = this->LayerOrder(s, w, g);
        const std::vector<int> head(order.begin(), order.begin() + prefix);
        const std::vector<int> tail(order.begin() + prefix, order.end());
        for (int n = 0; n < s.num; ++n) {
          for (int o = g * group_outputs; o < (g + 1) * group_outputs; ++o) {
            const Dtype b = s.bias ? layer.blobs()[1]->cpu_data()[o] : Dtype(0);
            for (int y = 0; y < out_h; ++y) {
              for (int x = 0; x < out_w; ++x) {
                const Dtype partial =
                    b + this->NeuronSum(s, w, n, o, y, x, head);
                const Dtype gate = partial +
                    scale * this->RestBound(s, w, n, o, y, x, tail);
                const Dtype got = this->top_->data_at(n, o, y, x);
                if (std::fabs(gate) < 1e-5) {
                  ++ties;
                  zeroed += (got == 0);
                  continue;
                }
                if (gate < 0) {
                  EXPECT_EQ(got, 0) << "shape " << i;
                  ++zeroed;
                } else {
                  const Dtype full = b + this->NeuronSum(s, w, n, o, y, x,
                      head) + this->NeuronSum(s, w, n, o, y, x, tail);
                  EXPECT_NEAR(got, std::max(full, Dtype(0)), 1e-4);
                }
              }
            }
          }
        }
      }
      const DyveEffort& e = layer.effort();
      if (ties == 0) {
        EXPECT_LE(e.spet_zeroed, zeroed);
      }
      EXPECT_GE(e.spet_zeroed + ties, zeroed);
      if (scale == 1.f) zeroed_at_one += e.spet_zeroed;
      // Per row the rest's maxima, per neuron its bound and the compare.
      const uint64_t rows = static_cast<uint64_t>(s.num) * s.group *
          out_h * out_w;
      EXPECT_EQ(e.ops_spet, rows * rest * taps +
          static_cast<uint64_t>(this->top_->count()) * (rest + 1));
      EXPECT_EQ(e.macs_skipped_spet, e.spet_zeroed * rest * taps);
      this->ExpectBalanced(e);
    }
  }
  EXPECT_GT(zeroed_at_one, 0);  // the exact gate does skip work
}

TYPED_TEST(DyveConvolutionLayerTest, TestBatchOverThreadsEqualsOneThread) {
  typedef typename TypeParam::Dtype Dtype;
  // Five images over up to three threads: outputs and counters as one thread.
  const ConvShape s = {5, 4, 9, 9, 6, 3, 3, 1, 1, 1, 2, true};
  this->FillBottom(s, 0, 1);
  Dtype* map = this->bottom_->mutable_cpu_data() + this->bottom_->offset(1, 2);
  std::fill(map, map + s.height * s.width, Dtype(0.5));  // an SFMA map
  LayerParameter param = this->ConvParam(s);
  DyveParameter* dyve = param.mutable_dyve_param();
  dyve->set_relu(true);
  dyve->mutable_spet()->set_enabled(true);
  dyve->mutable_spet()->set_gate(DyveSpetParameter_Gate_BOUND);
  dyve->mutable_spet()->set_bound_scale(0.25);
  dyve->mutable_sdss()->set_enabled(true);
  dyve->mutable_sfma()->set_enabled(true);
  const int saved_threads = BlasThreads();
  std::vector<Dtype> reference;
  std::vector<std::pair<std::string, uint64_t> > reference_effort;
  for (int threads = 1; threads <= 3; ++threads) {
    SetBlasThreads(threads);
    ASSERT_EQ(BlasThreads(), threads);  // else nothing runs in parallel
    Caffe::set_random_seed(1704);  // the same weights and bias for every run
    DyveConvolutionLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    this->RefillWeights(&layer);
    layer.Forward(this->bottom_vec_, this->top_vec_);
    const Dtype* top = this->top_->cpu_data();
    if (threads == 1) {
      reference.assign(top, top + this->top_->count());
      reference_effort = layer.effort().Items();
      continue;
    }
    for (int i = 0; i < this->top_->count(); ++i) {
      EXPECT_EQ(top[i], reference[i]) << threads << " threads, at " << i;
    }
    EXPECT_EQ(layer.effort().Items(), reference_effort) << threads;
  }
  SetBlasThreads(saved_threads);
  EXPECT_GT(reference_effort[9].second, 0);  // ops_spet: SPET did run
}

// Fewer images than threads (batch 1 on 2 threads): each image's positions
// split over the threads by rows of SDSS's grid (SPET's prefix kernel in one
// band of grid rows per thread), then the fill by rows of the output. Every
// knob, on the prefix kernel (float, one group) and on the rows (double,
// groups), must give the outputs and counters of one thread exactly.
TYPED_TEST(DyveConvolutionLayerTest, TestPositionSplitEqualsOneThread) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape list[] = {
    // num, C, H, W, O, kh, kw, stride, pad, dilation, group, bias
    {1, 32, 16, 16, 32, 5, 5, 1, 2, 1, 1, true},   // cifar10 conv2
    {2, 7, 9, 11, 5, 3, 2, 2, 1, 2, 1, false},     // stride, dilation
    {1, 6, 10, 10, 4, 3, 3, 1, 1, 1, 2, true},     // group 2: rows
  };
  const int saved_threads = BlasThreads();
  const uint64_t saved_split_macs = PositionSplitMacs();
  SetPositionSplitMacs(0);  // these shapes are far below the default
  for (int i = 0; i < sizeof(list) / sizeof(list[0]); ++i) {
    const ConvShape& s = list[i];
    for (int variant = 0; variant < 4; ++variant) {
      this->FillBottom(s, 0, 1);
      // An SFMA map in image 0 (channel 2: in the rest or the prefix,
      // whichever its weights put it in).
      Dtype* map =
          this->bottom_->mutable_cpu_data() + this->bottom_->offset(0, 2);
      std::fill(map, map + s.height * s.width, Dtype(0.5));
      LayerParameter param = this->ConvParam(s);
      DyveParameter* dyve = param.mutable_dyve_param();
      dyve->set_relu(true);
      DyveSpetParameter* spet = dyve->mutable_spet();
      spet->set_enabled(true);
      spet->set_fraction(0.5);
      spet->set_threshold(0.1);
      if (variant >= 1) {
        spet->set_gate(DyveSpetParameter_Gate_BOUND);
        spet->set_bound_scale(0.02);
        spet->set_threshold(0);
      }
      if (variant == 2 || variant == 3) {
        dyve->mutable_sdss()->set_enabled(true);
        dyve->mutable_sdss()->set_stride(variant);
        dyve->mutable_sdss()->set_threshold(0.2);
      }
      if (variant == 3) {
        dyve->mutable_sdss()->set_fill(DyveSdssParameter_Fill_MEAN);
        dyve->mutable_sfma()->set_enabled(true);
      }
      std::vector<Dtype> reference;
      std::vector<std::pair<std::string, uint64_t> > reference_effort;
      for (int threads = 1; threads <= 4; ++threads) {
        SetBlasThreads(threads);
        ASSERT_EQ(BlasThreads(), threads);
        Caffe::set_random_seed(1704);  // the same weights and bias every time
        DyveConvolutionLayer<Dtype> layer(param);
        layer.SetUp(this->bottom_vec_, this->top_vec_);
        this->RefillWeights(&layer);
        layer.Forward(this->bottom_vec_, this->top_vec_);
        const Dtype* top = this->top_->cpu_data();
        const bool kernel = sizeof(Dtype) == sizeof(float) &&
            DyveDnnlConvolution::Available() && s.group == 1;
        EXPECT_EQ(layer.prefix_path().find(" in row bands") !=
            std::string::npos, kernel && s.num < threads)
            << layer.prefix_path() << ", shape " << i << ", " << threads;
        if (threads == 1) {
          reference.assign(top, top + this->top_->count());
          reference_effort = layer.effort().Items();
          EXPECT_GT(layer.effort().spet_zeroed, 0) << "shape " << i;
          if (variant >= 2) {
            EXPECT_GT(layer.effort().sdss_filled, 0) << "shape " << i;
          }
          if (variant == 3) {
            EXPECT_GT(layer.effort().sfma_maps, 0) << "shape " << i;
          }
          continue;
        }
        // A thread's share of the grid is evaluated in shorter passes, and
        // BLAS may sum a shorter GEMM in another order: the outputs agree to
        // rounding, the counters (every decision) exactly.
        const Dtype tolerance = sizeof(Dtype) == sizeof(float) ? 1e-5 : 1e-12;
        for (int k = 0; k < this->top_->count(); ++k) {
          ASSERT_NEAR(top[k], reference[k],
              tolerance * std::max(Dtype(1), std::fabs(reference[k])))
              << "shape " << i << ", variant " << variant << ", " << threads
              << " threads, at " << k;
        }
        EXPECT_EQ(layer.effort().Items(), reference_effort) << "shape " << i
            << ", variant " << variant << ", " << threads << " threads";
      }
    }
  }
  SetBlasThreads(saved_threads);
  SetPositionSplitMacs(saved_split_macs);
}

TYPED_TEST(DyveConvolutionLayerTest, TestSdssHandMade) {
  typedef typename TypeParam::Dtype Dtype;
  // One 3x3 map through a 1x1 identity kernel: the grid (stride 2) is the
  // four corners; every other position looks at its corner neighbours.
  const ConvShape s = {1, 1, 3, 3, 1, 1, 1, 1, 0, 1, 1, false};
  this->bottom_->Reshape(1, 1, 3, 3);
  const Dtype input[] = {0, 9, 0,
                         9, 9, 9,
                         0, 9, 4};
  std::copy(input, input + 9, this->bottom_->mutable_cpu_data());
  const Dtype low_threshold[] = {0, 0, 0,
                                 0, 9, 9,
                                 0, 9, 4};
  const Dtype high_threshold[] = {0, 0, 0,
                                  0, 1, 2,
                                  0, 2, 4};
  for (int high = 0; high < 2; ++high) {
    LayerParameter param = this->ConvParam(s);
    param.mutable_dyve_param()->set_relu(true);
    DyveSdssParameter* sdss = param.mutable_dyve_param()->mutable_sdss();
    sdss->set_enabled(true);
    sdss->set_stride(2);
    sdss->set_threshold(high ? 5 : 0);
    DyveConvolutionLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    layer.blobs()[0]->mutable_cpu_data()[0] = 1;
    layer.Forward(this->bottom_vec_, this->top_vec_);
    const Dtype* expected = high ? high_threshold : low_threshold;
    for (int i = 0; i < 9; ++i) {
      EXPECT_EQ(this->top_->cpu_data()[i], expected[i]) << "position " << i;
    }
    const DyveEffort& e = layer.effort();
    // Compares: (0,1): 2, (1,0): 2, (1,1): 4, (1,2): 2, (2,1): 2 = 12; each
    // mean fill adds one op per neighbour: 2 + 2 (low), 2 + 2 + 4 + 2 + 2.
    EXPECT_EQ(e.sdss_filled, high ? 5 : 2);
    EXPECT_EQ(e.ops_sdss, high ? 12 + 12 : 12 + 4);
    EXPECT_EQ(e.macs_skipped_sdss, high ? 5 : 2);
    EXPECT_EQ(e.macs_executed, high ? 4 : 7);
    EXPECT_EQ(e.macs_dense, 9);
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestSdssZeroFillAndBigMaps) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape s = {2, 3, 12, 13, 5, 3, 3, 1, 1, 1, 1, true};
  this->FillBottom(s, -1, 1);
  LayerParameter param = this->ConvParam(s);
  param.mutable_dyve_param()->set_relu(true);
  DyveSdssParameter* sdss = param.mutable_dyve_param()->mutable_sdss();
  sdss->set_enabled(true);
  sdss->set_stride(3);
  sdss->set_threshold(0.2);
  sdss->set_fill(DyveSdssParameter_Fill_ZERO);
  DyveConvolutionLayer<Dtype> layer(param);
  layer.SetUp(this->bottom_vec_, this->top_vec_);
  layer.Forward(this->bottom_vec_, this->top_vec_);
  this->RunStock(s, &layer, true);
  // Grid positions are exact; every other one is 0 when its grid neighbours
  // are all <= T, else exact.
  uint64_t filled = 0;
  const int h = this->top_->height(), w = this->top_->width();
  for (int n = 0; n < s.num; ++n) {
    for (int o = 0; o < s.outputs; ++o) {
      for (int y = 0; y < h; ++y) {
        for (int x = 0; x < w; ++x) {
          const Dtype stock = this->stock_top_->data_at(n, o, y, x);
          const Dtype got = this->top_->data_at(n, o, y, x);
          bool insignificant = y % 3 || x % 3;
          const int y0 = y - y % 3, x0 = x - x % 3;
          for (int yy = y0; yy <= y0 + 3; yy += 3) {
            for (int xx = x0; xx <= x0 + 3; xx += 3) {
              if ((yy > y0 && (y % 3 == 0 || yy >= h)) ||
                  (xx > x0 && (x % 3 == 0 || xx >= w))) continue;
              if (this->stock_top_->data_at(n, o, yy, xx) > 0.2) {
                insignificant = false;
              }
            }
          }
          if (insignificant) {
            EXPECT_EQ(got, 0);
            ++filled;
          } else {
            EXPECT_NEAR(got, stock, 1e-5);
          }
        }
      }
    }
  }
  EXPECT_EQ(layer.effort().sdss_filled, filled);
  EXPECT_GT(filled, 0);
  EXPECT_EQ(layer.effort().macs_skipped_sdss, filled * 27);
  this->ExpectBalanced(layer.effort());
}

TYPED_TEST(DyveConvolutionLayerTest, TestSfmaConstantMap) {
  typedef typename TypeParam::Dtype Dtype;
  // Channel 1 is constant (3.0); channels 0 and 2 vary. With zero padding,
  // SFMA's border correction makes the result the exact convolution.
  const ConvShape s = {2, 3, 7, 6, 4, 3, 3, 1, 1, 1, 1, true};
  this->FillBottom(s, -1, 1);
  for (int n = 0; n < s.num; ++n) {
    Dtype* map =
        this->bottom_->mutable_cpu_data() + this->bottom_->offset(n, 1);
    std::fill(map, map + s.height * s.width, Dtype(3));
  }
  LayerParameter param = this->ConvParam(s);
  param.mutable_dyve_param()->mutable_sfma()->set_enabled(true);
  param.mutable_dyve_param()->mutable_sfma()->set_threshold(0.5);
  DyveConvolutionLayer<Dtype> layer(param);
  this->ExpectStockResult(s, &layer, false);
  // In the interior the constant map contributes mean x kernel sum.
  const Dtype* w = layer.blobs()[0]->cpu_data();
  const std::vector<int> varying = {0, 2};
  for (int o = 0; o < s.outputs; ++o) {
    Dtype kernel_sum = 0;
    for (int t = 0; t < 9; ++t) kernel_sum += w[(o * 3 + 1) * 9 + t];
    const Dtype expected = layer.blobs()[1]->cpu_data()[o] + 3 * kernel_sum +
        this->NeuronSum(s, w, 0, o, 3, 3, varying);
    EXPECT_NEAR(this->top_->data_at(0, o, 3, 3), expected, 1e-5);
  }
  const DyveEffort& e = layer.effort();
  const uint64_t outputs = this->top_->count();
  EXPECT_EQ(e.sfma_maps, 2);  // one per image
  EXPECT_EQ(e.macs_skipped_sfma, outputs * 9);
  EXPECT_EQ(e.macs_executed, outputs * 18);
  // Statistics 2 x 3 maps x (3*42 + 1); summed kernels 2 x 4 x (9 + 9);
  // per output: 1 op inside, 4 on the border (rows 0 and 6, columns 0, 5).
  const uint64_t border = 2 * 4 * (7 * 6 - 5 * 4);
  EXPECT_EQ(e.ops_sfma, 2 * 3 * 127 + 2 * 4 * 18 + (outputs - border) +
      4 * border);
  this->ExpectBalanced(e);
}

TYPED_TEST(DyveConvolutionLayerTest, TestSfmaNearlyConstantMapUsesItsMean) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape s = {1, 2, 6, 6, 3, 3, 3, 2, 1, 1, 1, true};
  this->FillBottom(s, -1, 1);
  Dtype* map = this->bottom_->mutable_cpu_data();  // channel 0 of image 0
  Dtype sum = 0;
  for (int i = 0; i < 36; ++i) {
    map[i] = 2 + 0.01 * (i % 5);
    sum += map[i];
  }
  LayerParameter param = this->ConvParam(s);
  for (int spread = 0; spread < 2; ++spread) {
    param.mutable_dyve_param()->mutable_sfma()->set_enabled(true);
    param.mutable_dyve_param()->mutable_sfma()->set_threshold(0.05);
    param.mutable_dyve_param()->mutable_sfma()->set_spread(
        spread ? DyveSfmaParameter_Spread_STD : DyveSfmaParameter_Spread_RANGE);
    DyveConvolutionLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    layer.Forward(this->bottom_vec_, this->top_vec_);
    EXPECT_EQ(layer.effort().sfma_maps, 1);
    // Reference: the stock convolution of the input with that map replaced
    // by its mean.
    Blob<Dtype> original;
    original.CopyFrom(*this->bottom_, false, true);
    std::fill(this->bottom_->mutable_cpu_data(),
        this->bottom_->mutable_cpu_data() + 36, sum / 36);
    this->RunStock(s, &layer, false);
    this->bottom_->CopyFrom(original);
    this->ExpectTopsNear(1e-5);
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestAllKnobsBalancedAndBetterThanNothing) {
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<ConvShape> shapes = TestShapes();
  for (int i = 0; i < shapes.size(); ++i) {
    for (int per_output = 0; per_output < 2; ++per_output) {
      this->FillBottom(shapes[i], 0, 1);
      LayerParameter param = this->ConvParam(shapes[i]);
      DyveParameter* dyve = param.mutable_dyve_param();
      dyve->set_relu(true);
      dyve->mutable_spet()->set_enabled(true);
      dyve->mutable_spet()->set_exact(true);
      dyve->mutable_spet()->set_fraction(0.4);
      dyve->mutable_spet()->set_ordering(per_output ?
          DyveSpetParameter_Ordering_PER_OUTPUT :
          DyveSpetParameter_Ordering_PER_LAYER);
      if (this->bottom_->height() > 1 && shapes[i].kernel_h < 5) {
        dyve->mutable_sdss()->set_enabled(true);
      }
      dyve->mutable_sfma()->set_enabled(true);
      dyve->mutable_sfma()->set_threshold(0.9);
      DyveConvolutionLayer<Dtype> layer(param);
      layer.SetUp(this->bottom_vec_, this->top_vec_);
      layer.Forward(this->bottom_vec_, this->top_vec_);
      layer.Forward(this->bottom_vec_, this->top_vec_);
      const DyveEffort& e = layer.effort();
      EXPECT_EQ(e.forward_passes, 2);
      EXPECT_EQ(e.images, 2 * shapes[i].num);
      EXPECT_LT(e.macs_executed, e.macs_dense);
      this->ExpectBalanced(e);
      layer.ResetEffort();
      EXPECT_EQ(layer.effort().macs_dense, 0);
    }
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestBackwardKnobsOffIsStockGradient) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape s = {2, 3, 6, 5, 4, 3, 3, 1, 1, 1, 1, true};
  this->FillBottom(s, -1, 1);
  LayerParameter param = this->ConvParam(s);
  DyveConvolutionLayer<Dtype> layer(param);
  layer.SetUp(this->bottom_vec_, this->top_vec_);
  layer.Forward(this->bottom_vec_, this->top_vec_);
  caffe_set(this->top_->count(), Dtype(1), this->top_->mutable_cpu_diff());
  layer.Backward(this->top_vec_, vector<bool>(1, true), this->bottom_vec_);
  Blob<Dtype> dyve_bottom_diff;
  dyve_bottom_diff.CopyFrom(*this->bottom_, true, true);
  ConvolutionLayer<Dtype> stock(param);
  stock.SetUp(this->bottom_vec_, this->stock_top_vec_);
  stock.blobs()[0]->CopyFrom(*layer.blobs()[0]);
  stock.blobs()[1]->CopyFrom(*layer.blobs()[1]);
  stock.Forward(this->bottom_vec_, this->stock_top_vec_);
  caffe_set(this->stock_top_->count(), Dtype(1),
      this->stock_top_->mutable_cpu_diff());
  stock.Backward(this->stock_top_vec_, vector<bool>(1, true),
      this->bottom_vec_);
  for (int i = 0; i < this->bottom_->count(); ++i) {
    EXPECT_NEAR(dyve_bottom_diff.cpu_diff()[i], this->bottom_->cpu_diff()[i],
        1e-5);
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestInvalidSettingsNameLayerAndField) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape s = {1, 2, 5, 5, 2, 3, 3, 1, 0, 1, 1, true};
  this->FillBottom(s, 0, 1);
  DyveConvolutionLayer<Dtype> layer(this->ConvParam(s));
  layer.SetUp(this->bottom_vec_, this->top_vec_);
  struct Case { std::string text, field; };
  const Case cases[] = {
    {"relu: true spet { enabled: true fraction: 0 }", "spet.fraction"},
    {"relu: true spet { enabled: true fraction: 1.5 }", "spet.fraction"},
    {"spet { enabled: true }", "relu"},
    {"spet { exact: true }", "relu"},
    {"relu: true sdss { enabled: true stride: 0 }", "sdss.stride"},
    {"sdss { enabled: true }", "relu"},
    {"sfma { enabled: true threshold: -1 }", "sfma.threshold"},
    {"relu: true spet { exact: true check_interval: 0 }",
     "spet.check_interval"},
    {"relu: true spet { gate: BOUND }", "spet.gate"},
    {"relu: true spet { enabled: true gate: BOUND ordering: PER_OUTPUT }",
     "spet.ordering"},
    {"relu: true spet { enabled: true gate: BOUND bound_scale: -1 }",
     "spet.bound_scale"},
    {"relu: true sdss { enabled: true range_threshold: -1 }",
     "sdss.range_threshold"},
    {"sdss { range_threshold: nan }", "sdss.range_threshold"},
    {"sfma { enabled: true kernel_threshold: -0.5 }", "sfma.kernel_threshold"},
    {"sfma { kernel_threshold: -inf }", "sfma.kernel_threshold"},
    {"sfma { enabled: true kernel_threshold: nan }", "sfma.kernel_threshold"},
    // Counts past int's range (the kernels hold them in int), inf thresholds,
    // and a grid step past the 3x3 output map.
    {"relu: true spet { exact: true check_interval: 2147483648 }",
     "spet.check_interval"},
    {"relu: true spet { exact: true check_interval: 4294967295 }",
     "spet.check_interval"},
    {"relu: true sdss { enabled: true stride: 2147483648 }", "sdss.stride"},
    {"relu: true sdss { enabled: true stride: 4294967295 }", "sdss.stride"},
    {"relu: true sdss { enabled: true stride: 4 }", "sdss.stride"},
    {"relu: true sdss { enabled: true threshold: inf }", "sdss.threshold"},
    {"sfma { enabled: true threshold: inf }", "sfma.threshold"},
  };
  for (int i = 0; i < sizeof(cases) / sizeof(cases[0]); ++i) {
    DyveParameter bad;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(
        cases[i].text, &bad));
    const std::string error = layer.SetDyveParam(bad);
    EXPECT_NE(error.find("'dyve_conv'"), std::string::npos) << error;
    EXPECT_NE(error.find(cases[i].field), std::string::npos) << error;
  }
  // SDSS on a 1x1 output map: this layer's 5x5 input and 5x5 kernel.
  ConvShape one = s;
  one.kernel_h = one.kernel_w = 5;
  DyveConvolutionLayer<Dtype> tiny(this->ConvParam(one));
  tiny.SetUp(this->bottom_vec_, this->top_vec_);
  DyveParameter sdss;
  sdss.set_relu(true);
  sdss.mutable_sdss()->set_enabled(true);
  EXPECT_NE(tiny.SetDyveParam(sdss).find("1x1"), std::string::npos);
  // A refused setting leaves the layer as it was; a good one is taken.
  EXPECT_FALSE(layer.dyve_param().has_spet());
  DyveParameter good;
  good.set_relu(true);
  good.mutable_spet()->set_exact(true);
  EXPECT_EQ(layer.SetDyveParam(good), "");
  EXPECT_TRUE(layer.dyve_param().spet().exact());
  // The paper's variants, inf included (the defaults of the new thresholds).
  const char* accepted[] = {
    "relu: true spet { enabled: true ordering: INTERLEAVED gate: BOUND }",
    "relu: true sdss { enabled: true range_threshold: inf }",
    "relu: true sdss { enabled: true range_threshold: 0 }",
    "sfma { enabled: true spread: VARIANCE kernel_threshold: inf }",
    "sfma { enabled: true kernel_threshold: 0 }",
    "relu: true sdss { enabled: true stride: 3 }",  // the map's own size
    "relu: true spet { exact: true check_interval: 2147483647 }",
  };
  for (int i = 0; i < sizeof(accepted) / sizeof(accepted[0]); ++i) {
    DyveParameter variant;
    ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(accepted[i],
        &variant));
    EXPECT_EQ(layer.SetDyveParam(variant), "") << accepted[i];
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestSetUpRefusesBadSettings) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape s = {1, 2, 5, 5, 2, 3, 3, 1, 0, 1, 1, true};
  this->FillBottom(s, 0, 1);
  LayerParameter param = this->ConvParam(s);
  param.mutable_dyve_param()->mutable_spet()->set_enabled(true);
  DyveConvolutionLayer<Dtype> layer(param);
  EXPECT_DEATH(layer.SetUp(this->bottom_vec_, this->top_vec_),
      "DyveConvolution layer 'dyve_conv': dyve_param.spet needs a rectified");
  LayerParameter negative = this->ConvParam(s);
  negative.mutable_dyve_param()->set_relu(true);
  negative.mutable_dyve_param()->mutable_spet()->set_exact(true);
  this->FillBottom(s, -1, 1);
  DyveConvolutionLayer<Dtype> exact(negative);
  exact.SetUp(this->bottom_vec_, this->top_vec_);
  EXPECT_DEATH(exact.Forward(this->bottom_vec_, this->top_vec_),
      "dyve_param.spet.exact needs non-negative inputs");
}

// A stock caffemodel (saved from a Convolution net) loads unchanged into the
// same net with DyveConvolution, and the weight-derived state follows it.
TYPED_TEST(DyveConvolutionLayerTest, TestLoadsStockCaffemodel) {
  typedef typename TypeParam::Dtype Dtype;
  const std::string net_text =
      "name: 'n' "
      "layer { name: 'data' type: 'Input' top: 'data' "
      "  input_param { shape { dim: 2 dim: 3 dim: 8 dim: 8 } } } "
      "layer { name: 'conv1' type: 'TYPE' bottom: 'data' top: 'conv1' "
      "  convolution_param { num_output: 4 kernel_size: 3 pad: 1 "
      "    weight_filler { type: 'gaussian' std: 0.5 } "
      "    bias_filler { type: 'gaussian' std: 0.1 } } DYVE } "
      "layer { name: 'relu1' type: 'ReLU' bottom: 'conv1' top: 'conv1' } ";
  std::string stock_text = net_text, dyve_text = net_text;
  stock_text.replace(stock_text.find("TYPE"), 4, "Convolution");
  stock_text.replace(stock_text.find("DYVE"), 4, "");
  dyve_text.replace(dyve_text.find("TYPE"), 4, "DyveConvolution");
  dyve_text.replace(dyve_text.find("DYVE"), 4,
      "dyve_param { relu: true spet { enabled: true threshold: 1e-3 } }");
  NetParameter stock_param, dyve_param;
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(stock_text,
      &stock_param));
  ASSERT_TRUE(google::protobuf::TextFormat::ParseFromString(dyve_text,
      &dyve_param));
  Net<Dtype> stock(stock_param);
  Net<Dtype> dyve(dyve_param);
  FillerParameter filler_param;
  UniformFiller<Dtype> filler(filler_param);
  filler.Fill(stock.blob_by_name("data").get());
  dyve.blob_by_name("data")->CopyFrom(*stock.blob_by_name("data"));
  dyve.Forward();  // orders from the set-up fillers, to be replaced
  NetParameter trained;
  stock.ToProto(&trained, false);
  std::string path;
  MakeTempFilename(&path);
  WriteProtoToBinaryFile(trained, path);
  dyve.CopyTrainedLayersFrom(path);
  stock.Forward();
  dyve.Forward();
  // SPET with f = 0.5 on 3 channels: the prefix is the 2 channels with the
  // largest |W|; recompute the expectation from the stock weights.
  const Blob<Dtype>& w = *stock.layer_by_name("conv1")->blobs()[0];
  std::vector<std::pair<double, int> > significance;
  for (int c = 0; c < 3; ++c) {
    double total = 0;
    for (int o = 0; o < 4; ++o) {
      for (int t = 0; t < 9; ++t) total += std::fabs(w.data_at(o, c, t / 3,
          t % 3));
    }
    significance.push_back(std::make_pair(-total, c));
  }
  std::sort(significance.begin(), significance.end());
  const int skipped = significance[2].second;
  Blob<Dtype>& data = *stock.blob_by_name("data");
  const Blob<Dtype>& stock_out = *stock.blob_by_name("conv1");
  const Blob<Dtype>& dyve_out = *dyve.blob_by_name("conv1");
  int compared = 0;
  for (int n = 0; n < 2; ++n) {
    for (int o = 0; o < 4; ++o) {
      for (int y = 0; y < 8; ++y) {
        for (int x = 0; x < 8; ++x) {
          Dtype partial =
              stock.layer_by_name("conv1")->blobs()[1]->cpu_data()[o];
          for (int c = 0; c < 3; ++c) {
            if (c == skipped) continue;
            for (int kh = 0; kh < 3; ++kh) {
              for (int kw = 0; kw < 3; ++kw) {
                const int ih = y - 1 + kh, iw = x - 1 + kw;
                if (ih < 0 || ih >= 8 || iw < 0 || iw >= 8) continue;
                partial += w.data_at(o, c, kh, kw) * data.data_at(n, c, ih, iw);
              }
            }
          }
          if (std::fabs(partial - 1e-3) < 1e-4) continue;
          const Dtype expected = partial < 1e-3 ? Dtype(0) :
              stock_out.data_at(n, o, y, x);
          EXPECT_NEAR(dyve_out.data_at(n, o, y, x), expected, 1e-5);
          ++compared;
        }
      }
    }
  }
  EXPECT_GT(compared, 400);
  // And with every knob off the DyVE net is the stock net.
  DyveLayer* layer =
      dynamic_cast<DyveLayer*>(dyve.layer_by_name("conv1").get());
  ASSERT_TRUE(layer != NULL);
  DyveParameter off;
  off.set_relu(true);
  EXPECT_EQ(layer->SetDyveParam(off), "");
  dyve.Forward();
  for (int i = 0; i < stock_out.count(); ++i) {
    EXPECT_NEAR(dyve_out.cpu_data()[i], stock_out.cpu_data()[i], 1e-5);
  }
}

// The paper's SPET order: odd-indexed channels first, then even ones.
static std::vector<int> InterleavedOrder(int channels) {
  std::vector<int> order;
  for (int c = 1; c < channels; c += 2) order.push_back(c);
  for (int c = 0; c < channels; c += 2) order.push_back(c);
  return order;
}

TYPED_TEST(DyveConvolutionLayerTest, TestSpetInterleavedOrderByHand) {
  typedef typename TypeParam::Dtype Dtype;
  const std::vector<int> five = InterleavedOrder(5);
  const int expected_five[] = {1, 3, 0, 2, 4};
  ASSERT_EQ(five, std::vector<int>(expected_five, expected_five + 5));
  const std::vector<ConvShape> shapes = TestShapes();
  for (int i = 0; i < shapes.size(); ++i) {
    for (int bound = 0; bound < 2; ++bound) {
      const ConvShape& s = shapes[i];
      const Dtype threshold = bound ? 0 : 0.1;
      // The BOUND gate is a bound for non-negative inputs only.
      this->FillBottom(s, bound ? 0 : -1, 1);
      LayerParameter param = this->ConvParam(s);
      param.mutable_dyve_param()->set_relu(true);
      DyveSpetParameter* spet = param.mutable_dyve_param()->mutable_spet();
      spet->set_enabled(true);
      spet->set_fraction(0.5);
      spet->set_threshold(threshold);
      spet->set_ordering(DyveSpetParameter_Ordering_INTERLEAVED);
      if (bound) {
        spet->set_gate(DyveSpetParameter_Gate_BOUND);
        spet->set_bound_scale(1);
      }
      DyveConvolutionLayer<Dtype> layer(param);
      layer.SetUp(this->bottom_vec_, this->top_vec_);
      this->RefillWeights(&layer);
      layer.Forward(this->bottom_vec_, this->top_vec_);
      if (bound) {
        // Scale 1, threshold 0: the interleaved prefix changes nothing.
        this->RunStock(s, &layer, true);
        this->ExpectTopsNear(1e-5);
      }
      const int group_channels = s.channels / s.group;
      const int group_outputs = s.outputs / s.group;
      const int prefix = (group_channels + 1) / 2;  // ceil(0.5 * C)
      const int rest = group_channels - prefix;
      const Dtype* w = layer.blobs()[0]->cpu_data();
      const int taps = s.kernel_h * s.kernel_w;
      // Odd channels first, whatever the weights.
      const std::vector<int> all = InterleavedOrder(group_channels);
      const std::vector<int> head(all.begin(), all.begin() + prefix);
      const std::vector<int> tail(all.begin() + prefix, all.end());
      uint64_t zeroed = 0, ties = 0;
      const int out_h = this->top_->height(), out_w = this->top_->width();
      for (int g = 0; g < s.group; ++g) {
        for (int n = 0; n < s.num; ++n) {
          for (int o = g * group_outputs; o < (g + 1) * group_outputs; ++o) {
            const Dtype b = s.bias ? layer.blobs()[1]->cpu_data()[o] : Dtype(0);
            for (int y = 0; y < out_h; ++y) {
              for (int x = 0; x < out_w; ++x) {
                const Dtype partial =
                    b + this->NeuronSum(s, w, n, o, y, x, head);
                const Dtype gate = partial + (bound ?
                    this->RestBound(s, w, n, o, y, x, tail) : Dtype(0));
                const Dtype full = b + this->NeuronSum(s, w, n, o, y, x, all);
                const Dtype got = this->top_->data_at(n, o, y, x);
                if (std::fabs(gate - threshold) < 1e-5) {
                  ++ties;  // too close to call in float
                  zeroed += (got == 0);
                  continue;
                }
                if (gate < threshold) {
                  EXPECT_EQ(got, 0) << "shape " << i;
                  ++zeroed;
                } else {
                  EXPECT_NEAR(got, std::max(full, Dtype(0)), 1e-4);
                }
              }
            }
          }
        }
      }
      const DyveEffort& e = layer.effort();
      if (ties == 0) {
        if (bound) {
          EXPECT_LE(e.spet_zeroed, zeroed) << "shape " << i;
        } else {
          EXPECT_EQ(e.spet_zeroed, zeroed) << "shape " << i;
        }
      }
      EXPECT_GE(e.spet_zeroed + ties, zeroed);
      if (!bound) {
        EXPECT_GT(e.spet_zeroed, 0) << "shape " << i;
      }
      const uint64_t rows = static_cast<uint64_t>(s.num) * s.group *
          out_h * out_w;
      const uint64_t neurons = this->top_->count();
      EXPECT_EQ(e.ops_spet, bound ? rows * rest * taps + neurons * (rest + 1) :
          neurons);
      EXPECT_EQ(e.macs_skipped_spet, e.spet_zeroed * rest * taps);
      EXPECT_EQ(e.macs_executed, neurons * prefix * taps +
          (neurons - e.spet_zeroed) * rest * taps);
      this->ExpectBalanced(e);
    }
  }
}

TYPED_TEST(DyveConvolutionLayerTest, TestSdssRangeThresholdHandMade) {
  typedef typename TypeParam::Dtype Dtype;
  // One 4x4 map through a 1x1 identity kernel, grid stride 2: the grid values
  // 0.1, 0.4 / 0.2, 0.25 are all <= T = 0.5, so the range test decides.
  // Every other input is 7, which a computed position shows.
  const ConvShape s = {1, 1, 4, 4, 1, 1, 1, 1, 0, 1, 1, false};
  this->bottom_->Reshape(1, 1, 4, 4);
  const Dtype input[] = {0.1, 7, 0.4,  7,
                         7,   7, 7,    7,
                         0.2, 7, 0.25, 7,
                         7,   7, 7,    7};
  std::copy(input, input + 16, this->bottom_->mutable_cpu_data());
  // range_threshold 0.2: (0,1) sees 0.1, 0.4 and (1,1) all four (range 0.3):
  // computed; the others are filled with the mean of their neighbours.
  const Dtype filled_02[] = {0.1,  7,     0.4,   0.4,
                             0.15, 7,     0.325, 0.325,
                             0.2,  0.225, 0.25,  0.25,
                             0.2,  0.225, 0.25,  0.25};
  // range_threshold 0: only positions with one neighbour (range 0).
  const Dtype filled_0[] = {0.1, 7,   0.4,  0.4,
                            7,   7,   7,    7,
                            0.2, 7,   0.25, 0.25,
                            0.2, 7,   0.25, 0.25};
  const float range_thresholds[] = {0.2f, 0.f, INFINITY};
  for (int r = 0; r < 3; ++r) {
    LayerParameter param = this->ConvParam(s);
    param.mutable_dyve_param()->set_relu(true);
    DyveSdssParameter* sdss = param.mutable_dyve_param()->mutable_sdss();
    sdss->set_enabled(true);
    sdss->set_stride(2);
    sdss->set_threshold(0.5);
    if (r < 2) sdss->set_range_threshold(range_thresholds[r]);
    EXPECT_TRUE(std::isinf(param.dyve_param().sdss().range_threshold()) ==
        (r == 2));  // the proto default is inf
    DyveConvolutionLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    layer.blobs()[0]->mutable_cpu_data()[0] = 1;
    layer.Forward(this->bottom_vec_, this->top_vec_);
    const DyveEffort& e = layer.effort();
    // 21 significance compares (all pass); a finite range threshold adds
    // 2 ops per neighbour tested (21 neighbours in all); MEAN fills add one
    // op per neighbour of a filled position.
    if (r == 0) {
      for (int i = 0; i < 16; ++i) {
        EXPECT_NEAR(this->top_->cpu_data()[i], filled_02[i], 1e-6) << i;
      }
      EXPECT_EQ(e.sdss_filled, 10);
      EXPECT_EQ(e.ops_sdss, 21 + 42 + 15);
    } else if (r == 1) {
      for (int i = 0; i < 16; ++i) {
        EXPECT_NEAR(this->top_->cpu_data()[i], filled_0[i], 1e-6) << i;
      }
      EXPECT_EQ(e.sdss_filled, 5);
      EXPECT_EQ(e.ops_sdss, 21 + 42 + 5);
    } else {
      EXPECT_EQ(e.sdss_filled, 12);  // as without the option
      EXPECT_EQ(e.ops_sdss, 21 + 21);
    }
    EXPECT_EQ(e.macs_skipped_sdss, e.sdss_filled);
    EXPECT_EQ(e.macs_executed, 16 - e.sdss_filled);
    this->ExpectBalanced(e);
  }
  // A failed significance test makes no range test: with T = 0.3 the 5
  // positions that see 0.4 stop there (7 compares), the other 7 pass (10
  // compares, 2 x 10 range ops) and are filled (10 mean ops).
  LayerParameter param = this->ConvParam(s);
  param.mutable_dyve_param()->set_relu(true);
  DyveSdssParameter* sdss = param.mutable_dyve_param()->mutable_sdss();
  sdss->set_enabled(true);
  sdss->set_threshold(0.3);
  sdss->set_range_threshold(0.2);
  DyveConvolutionLayer<Dtype> layer(param);
  layer.SetUp(this->bottom_vec_, this->top_vec_);
  layer.blobs()[0]->mutable_cpu_data()[0] = 1;
  layer.Forward(this->bottom_vec_, this->top_vec_);
  EXPECT_EQ(layer.effort().sdss_filled, 7);
  EXPECT_EQ(layer.effort().ops_sdss, 7 + 10 + 20 + 10);
}

TYPED_TEST(DyveConvolutionLayerTest, TestSfmaVarianceAndKernelThreshold) {
  typedef typename TypeParam::Dtype Dtype;
  // VARIANCE is the STD squared: one 1 in a 4x4 map of zeros has variance
  // 15/256 (0.059) and std 0.242; a map of 2s has 0.
  {
    const ConvShape s = {1, 2, 4, 4, 1, 3, 3, 1, 0, 1, 1, false};
    this->bottom_->Reshape(1, 2, 4, 4);
    Dtype* data = this->bottom_->mutable_cpu_data();
    std::fill(data, data + 16, Dtype(0));
    data[0] = 1;
    std::fill(data + 16, data + 32, Dtype(2));
    for (int spread = 0; spread < 3; ++spread) {
      LayerParameter param = this->ConvParam(s);
      DyveSfmaParameter* sfma = param.mutable_dyve_param()->mutable_sfma();
      sfma->set_enabled(true);
      sfma->set_threshold(0.1);
      sfma->set_spread(spread == 0 ? DyveSfmaParameter_Spread_RANGE :
          spread == 1 ? DyveSfmaParameter_Spread_STD :
          DyveSfmaParameter_Spread_VARIANCE);
      DyveConvolutionLayer<Dtype> layer(param);
      layer.SetUp(this->bottom_vec_, this->top_vec_);
      layer.Forward(this->bottom_vec_, this->top_vec_);
      EXPECT_EQ(layer.effort().sfma_maps, spread == 2 ? 2 : 1) << spread;
      // The statistics cost the same whatever the measure.
      const uint64_t table = spread == 2 ? 9 * 2 + 9 : 9 + 9;
      EXPECT_EQ(layer.effort().ops_sfma, 2 * (3 * 16 + 1) + table + 4);
    }
  }
  // The kernel test: two constant maps, 2 outputs. The largest sum of |w| of
  // channel 0's slices is 2 (o1), of channel 1's 2.25 (o0).
  const ConvShape s = {2, 2, 5, 5, 2, 3, 3, 1, 1, 1, 1, true};
  this->bottom_->Reshape(2, 2, 5, 5);
  for (int n = 0; n < 2; ++n) {
    Dtype* map = this->bottom_->mutable_cpu_data() + this->bottom_->offset(n);
    std::fill(map, map + 25, Dtype(0.75));
    std::fill(map + 25, map + 50, Dtype(-1.5));
  }
  std::vector<Dtype> weights(2 * 2 * 9, Dtype(0));
  weights[(0 * 2 + 0) * 9 + 0] = 0.5;   // o0, c0: 1 in all
  weights[(0 * 2 + 0) * 9 + 4] = -0.5;
  weights[(1 * 2 + 0) * 9 + 2] = -2;    // o1, c0: 2
  weights[(0 * 2 + 1) * 9 + 0] = 2.25;  // o0, c1: 2.25
  weights[(1 * 2 + 1) * 9 + 8] = 0.25;  // o1, c1: 0.25
  const float kernel_thresholds[] = {1.999f, 2.f, 2.249f, 2.25f, INFINITY};
  const int maps[] = {0, 2, 2, 4, 4};  // two images
  LayerParameter param = this->ConvParam(s);
  DyveSfmaParameter* sfma = param.mutable_dyve_param()->mutable_sfma();
  sfma->set_enabled(true);
  sfma->set_threshold(0);
  DyveConvolutionLayer<Dtype> layer(param);
  layer.SetUp(this->bottom_vec_, this->top_vec_);
  std::copy(weights.begin(), weights.end(),
      layer.blobs()[0]->mutable_cpu_data());
  for (int k = 0; k < 5; ++k) {
    // New settings on the live layer rebuild the table.
    DyveParameter dyve = layer.dyve_param();
    dyve.mutable_sfma()->set_kernel_threshold(kernel_thresholds[k]);
    ASSERT_EQ(layer.SetDyveParam(dyve), "");
    layer.ResetEffort();
    layer.Forward(this->bottom_vec_, this->top_vec_);
    this->RunStock(s, &layer, false);
    this->ExpectTopsNear(1e-5);  // constant maps: SFMA is exact
    const DyveEffort& e = layer.effort();
    EXPECT_EQ(e.sfma_maps, maps[k]) << kernel_thresholds[k];
    EXPECT_EQ(e.macs_skipped_sfma, 2 * 2 * 25 * 9 * (maps[k] / 2));
    // No per-image cost of the kernel test: statistics for every map, then
    // the table and per-neuron ops only where a map is replaced.
    const int per_image = maps[k] / 2;
    const uint64_t ops = 2 * 2 * (3 * 25 + 1) + (per_image ?
        2 * 2 * (per_image * 9 + 9) + 2 * 2 * (9 + 16 * 4) : 0);
    EXPECT_EQ(e.ops_sfma, ops) << kernel_thresholds[k];
    this->ExpectBalanced(e);
  }
  // New weights rebuild it too: channel 1's largest slice sum now 1.
  layer.blobs()[0]->mutable_cpu_data()[(0 * 2 + 1) * 9 + 0] = 1;
  DyveParameter dyve = layer.dyve_param();
  dyve.mutable_sfma()->set_kernel_threshold(2);
  ASSERT_EQ(layer.SetDyveParam(dyve), "");
  layer.Forward(this->bottom_vec_, this->top_vec_);
  layer.ResetEffort();
  layer.blobs()[0]->mutable_cpu_data()[(1 * 2 + 0) * 9 + 2] = -3;  // c0: 3
  layer.Forward(this->bottom_vec_, this->top_vec_);
  EXPECT_EQ(layer.effort().sfma_maps, 2);  // channel 1 only, in both images
}

// The knobs-off kernel (docs/kernels.md): oneDNN for float blobs where the
// build has it and DYVE_DENSE is not "caffe", Caffe's im2col + BLAS for
// double ones. On the CIFAR-10 nets' convolutions and odd shapes it equals
// the stock layer, with and without the ReLU it fuses.
TYPED_TEST(DyveConvolutionLayerTest, TestDenseKernelCifarShapes) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape list[] = {
    // num, C, H, W, O, kh, kw, stride, pad, dilation, group, bias
    {2, 3, 32, 32, 32, 5, 5, 1, 2, 1, 1, true},    // cifar10 conv1
    {3, 32, 16, 16, 32, 5, 5, 1, 2, 1, 1, true},   // conv2
    {1, 32, 8, 8, 64, 5, 5, 1, 2, 1, 1, true},     // conv3
    {2, 16, 9, 9, 8, 3, 3, 2, 1, 1, 1, false},
    {1, 6, 11, 10, 9, 3, 3, 1, 2, 2, 3, true},
  };
  const bool onednn = sizeof(Dtype) == sizeof(float) &&
      DyveDnnlConvolution::Available();
  for (int i = 0; i < sizeof(list) / sizeof(list[0]); ++i) {
    for (int relu = 0; relu < 2; ++relu) {
      this->FillBottom(list[i], -1, 1);
      LayerParameter param = this->ConvParam(list[i]);
      param.mutable_dyve_param()->set_relu(relu);
      DyveConvolutionLayer<Dtype> layer(param);
      layer.SetUp(this->bottom_vec_, this->top_vec_);
      layer.Forward(this->bottom_vec_, this->top_vec_);
      this->RunStock(list[i], &layer, relu);
      // Up to 800 products of unit-variance weights per output, summed in
      // another order: float rounding reaches 2e-5 here.
      this->ExpectTopsNear(1e-4);
      EXPECT_EQ(layer.dense_path().find("oneDNN") == 0, onednn)
          << layer.dense_path() << ", shape " << i;
      EXPECT_EQ(layer.effort().macs_executed, layer.effort().macs_dense);
    }
  }
}

// The kernel's copy of the weights follows their writes (weights, bias), a
// new input shape, knobs switched on and off again, and the thread count.
TYPED_TEST(DyveConvolutionLayerTest, TestDenseKernelFollowsChanges) {
  typedef typename TypeParam::Dtype Dtype;
  ConvShape s = {2, 8, 10, 10, 16, 3, 3, 1, 1, 1, 1, true};
  this->FillBottom(s, -1, 1);
  LayerParameter param = this->ConvParam(s);
  param.mutable_dyve_param()->set_relu(true);
  DyveConvolutionLayer<Dtype> layer(param);
  this->ExpectStockResult(s, &layer, true);
  // New weights and a new bias value: new write versions.
  caffe_scal(layer.blobs()[0]->count(), Dtype(-0.5),
      layer.blobs()[0]->mutable_cpu_data());
  layer.blobs()[1]->mutable_cpu_data()[3] += Dtype(2);
  layer.Forward(this->bottom_vec_, this->top_vec_);
  this->RunStock(s, &layer, true);
  this->ExpectTopsNear(1e-5);
  // Another batch size and map size.
  s.num = 3;
  s.height = 7;
  this->FillBottom(s, -1, 1);
  layer.Forward(this->bottom_vec_, this->top_vec_);
  this->RunStock(s, &layer, true);
  this->ExpectTopsNear(1e-5);
  // Knobs on (inert: SPET with f = 1 cannot fire), weights changed while on,
  // then off again.
  DyveParameter on = param.dyve_param();
  on.mutable_spet()->set_enabled(true);
  on.mutable_spet()->set_fraction(1);
  on.mutable_spet()->set_threshold(-1e30);
  ASSERT_EQ(layer.SetDyveParam(on), "");
  layer.Forward(this->bottom_vec_, this->top_vec_);
  EXPECT_EQ(layer.dense_path(), "caffe");  // the knob path runs
  this->RunStock(s, &layer, true);
  this->ExpectTopsNear(1e-5);
  this->RefillWeights(&layer);
  ASSERT_EQ(layer.SetDyveParam(param.dyve_param()), "");
  // One kernel per thread: the second one idles at 1 thread while the
  // weights change, and must not keep the old ones.
  const int saved_threads = BlasThreads();
  const int thread_counts[] = {2, 1, 2};
  for (int k = 0; k < 3; ++k) {
    SetBlasThreads(thread_counts[k]);
    if (k == 1) this->RefillWeights(&layer);
    layer.Forward(this->bottom_vec_, this->top_vec_);
    this->RunStock(s, &layer, true);
    this->ExpectTopsNear(1e-5);
  }
  SetBlasThreads(saved_threads);
  EXPECT_EQ(layer.dense_path().find("oneDNN") == 0,
      sizeof(Dtype) == sizeof(float) && DyveDnnlConvolution::Available());
}

// Fewer images than threads (batch 1 on 2 threads): the knobs-off oneDNN path
// splits every image's output rows into one band per thread, each band
// reading only its input rows with the padding it sees. Bands at the borders,
// strides, dilation, groups, and a band lying in the padding alone (oneDNN
// cannot take it: the batch goes to one kernel) must all equal the stock layer.
TYPED_TEST(DyveConvolutionLayerTest, TestDenseKernelRowBands) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape list[] = {
    // num, C, H, W, O, kh, kw, stride, pad, dilation, group, bias
    {1, 3, 9, 8, 4, 3, 3, 1, 1, 1, 1, true},
    {1, 16, 9, 9, 8, 3, 3, 2, 1, 1, 1, false},     // stride 2, last row unread
    {2, 6, 11, 10, 9, 3, 3, 1, 2, 2, 3, true},     // 2 images, 3+ threads
    {1, 5, 6, 7, 7, 1, 1, 1, 0, 1, 1, true},       // 1x1
    {1, 4, 5, 6, 3, 5, 3, 1, 2, 1, 1, true},       // 5 rows, up to 4 bands
    {1, 2, 3, 3, 4, 3, 3, 1, 4, 1, 1, true},       // first band all padding
  };
  const bool onednn = sizeof(Dtype) == sizeof(float) &&
      DyveDnnlConvolution::Available();
  const int saved_threads = BlasThreads();
  const uint64_t saved_split_macs = PositionSplitMacs();
  SetPositionSplitMacs(0);  // these shapes are far below the default
  for (int i = 0; i < sizeof(list) / sizeof(list[0]); ++i) {
    for (int threads = 2; threads <= 4; ++threads) {
      SetBlasThreads(threads);
      ASSERT_EQ(BlasThreads(), threads);
      for (int relu = 0; relu < 2; ++relu) {
        this->FillBottom(list[i], -1, 1);
        LayerParameter param = this->ConvParam(list[i]);
        param.mutable_dyve_param()->set_relu(relu);
        DyveConvolutionLayer<Dtype> layer(param);
        layer.SetUp(this->bottom_vec_, this->top_vec_);
        layer.Forward(this->bottom_vec_, this->top_vec_);
        this->RunStock(list[i], &layer, relu);
        this->ExpectTopsNear(1e-4);
        const std::string path = layer.dense_path();
        const bool padding_band = i == 5 && threads == 4;
        const bool banded = onednn && list[i].num < threads && !padding_band;
        EXPECT_EQ(path.find("oneDNN") == 0, onednn) << path << ", shape " << i;
        EXPECT_EQ(path.find(" row bands") != std::string::npos, banded)
            << path << ", shape " << i << ", " << threads << " threads";
        EXPECT_EQ(layer.effort().macs_executed, layer.effort().macs_dense);
        EXPECT_EQ(layer.effort().outputs, this->top_->count());
      }
    }
  }
  // The split starts at PositionSplitMacs multiply-accumulates per image.
  const ConvShape& s = list[0];
  const uint64_t image_macs = static_cast<uint64_t>(s.outputs) * 9 * 8 *
      s.channels * s.kernel_h * s.kernel_w;  // 9 x 8 positions
  SetBlasThreads(2);
  for (int above = 0; above < 2; ++above) {
    SetPositionSplitMacs(image_macs + above);
    this->FillBottom(s, -1, 1);
    DyveConvolutionLayer<Dtype> layer(this->ConvParam(s));
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    layer.Forward(this->bottom_vec_, this->top_vec_);
    EXPECT_EQ(layer.dense_path().find(" row bands") != std::string::npos,
        onednn && !above) << layer.dense_path();
  }
  SetBlasThreads(saved_threads);
  SetPositionSplitMacs(saved_split_macs);
}

// SPET's prefix on oneDNN (docs/kernels.md): for float blobs with one group
// and SPET's per-layer or interleaved order, the prefix sums come from a
// convolution over the prefix channels (at SDSS's grid stride with SDSS on),
// and only the rest is gathered into rows. Outputs and counters must be those
// of the rows path, which double blobs take: the same layer in double on the
// same data is the reference. SFMA's constant maps in the rest keep the
// kernel; one in the prefix sends its image to the rows.
TYPED_TEST(DyveConvolutionLayerTest, TestSpetPrefixKernelEqualsRows) {
  typedef typename TypeParam::Dtype Dtype;
  const ConvShape list[] = {
    // num, C, H, W, O, kh, kw, stride, pad, dilation, group, bias
    {2, 32, 16, 16, 32, 5, 5, 1, 2, 1, 1, true},   // cifar10 conv2
    {2, 7, 9, 11, 5, 3, 2, 2, 1, 2, 1, false},     // stride, dilation
    {1, 6, 10, 10, 4, 3, 3, 1, 1, 1, 2, true},     // group 2: rows
  };
  for (int i = 0; i < sizeof(list) / sizeof(list[0]); ++i) {
    const ConvShape& s = list[i];
    for (int variant = 0; variant < 5; ++variant) {
      this->FillBottom(s, 0, 1);
      LayerParameter param = this->ConvParam(s);
      DyveParameter* dyve = param.mutable_dyve_param();
      dyve->set_relu(true);
      DyveSpetParameter* spet = dyve->mutable_spet();
      spet->set_enabled(true);
      spet->set_fraction(0.5);
      spet->set_threshold(0.1);
      if (variant >= 1) {
        spet->set_gate(DyveSpetParameter_Gate_BOUND);
        // Loose enough to zero neurons of 16 rest channels of 5x5 taps.
        spet->set_bound_scale(0.02);
        spet->set_threshold(0);
      }
      if (variant == 2) {
        dyve->mutable_sdss()->set_enabled(true);
        dyve->mutable_sdss()->set_stride(2);
        dyve->mutable_sdss()->set_threshold(0.2);
      }
      if (variant == 3) spet->set_ordering(DyveSpetParameter_Ordering_INTERLEAVED);
      if (variant == 4) {
        dyve->mutable_sfma()->set_enabled(true);
        dyve->mutable_sfma()->set_threshold(1e-6);
      }
      DyveConvolutionLayer<Dtype> layer(param);
      layer.SetUp(this->bottom_vec_, this->top_vec_);
      const int group_channels = s.channels / s.group;
      const int taps = s.kernel_h * s.kernel_w;
      if (variant == 4) {
        // Channel 0 (every image) least significant, so in the rest, and
        // channel 1 of image 0 most significant: constant maps both.
        Dtype* w = layer.blobs()[0]->mutable_cpu_data();
        for (int o = 0; o < s.outputs; ++o) {
          for (int t = 0; t < taps; ++t) {
            w[(o * group_channels + 0) * taps + t] *= Dtype(0.01);
            w[(o * group_channels + 1) * taps + t] *= Dtype(100);
          }
        }
        const int map = s.height * s.width;
        Dtype* x = this->bottom_->mutable_cpu_data();
        for (int n = 0; n < s.num; ++n) {
          std::fill(x + (n * s.channels + 0) * map,
              x + (n * s.channels + 1) * map, Dtype(0.5));
        }
        std::fill(x + map, x + 2 * map, Dtype(0.25));
      }
      layer.Forward(this->bottom_vec_, this->top_vec_);
      const bool prefix_on_kernel = sizeof(Dtype) == sizeof(float) &&
          DyveDnnlConvolution::Available() && s.group == 1;
      EXPECT_EQ(layer.prefix_path().find("oneDNN") == 0, prefix_on_kernel)
          << layer.prefix_path() << ", shape " << i << ", variant " << variant;
      // The reference: the same layer and data in double.
      Blob<double> bottom64, top64;
      bottom64.Reshape(this->bottom_->shape());
      for (int k = 0; k < bottom64.count(); ++k) {
        bottom64.mutable_cpu_data()[k] = this->bottom_->cpu_data()[k];
      }
      vector<Blob<double>*> bottom64_vec(1, &bottom64), top64_vec(1, &top64);
      DyveConvolutionLayer<double> reference(param);
      reference.SetUp(bottom64_vec, top64_vec);
      for (int b = 0; b < layer.blobs().size(); ++b) {
        for (int k = 0; k < layer.blobs()[b]->count(); ++k) {
          reference.blobs()[b]->mutable_cpu_data()[k] =
              layer.blobs()[b]->cpu_data()[k];
        }
      }
      reference.Forward(bottom64_vec, top64_vec);
      EXPECT_EQ(reference.prefix_path(), "rows");
      ASSERT_EQ(top64.count(), this->top_->count());
      for (int k = 0; k < top64.count(); ++k) {
        const double expected = top64.cpu_data()[k];
        EXPECT_NEAR(this->top_->cpu_data()[k], expected,
            1e-4 * std::max(1.0, std::fabs(expected)))
            << "at " << k << ", shape " << i << ", variant " << variant;
      }
      EXPECT_EQ(layer.effort().Items(), reference.effort().Items())
          << "shape " << i << ", variant " << variant;
      EXPECT_GT(layer.effort().spet_zeroed, 0) << "shape " << i;
      if (variant == 4) {
        EXPECT_EQ(layer.effort().sfma_maps, s.num + 1);
      }
    }
  }
}

}  // namespace caffe
