#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "gtest/gtest.h"

#include "caffe/blob.hpp"
#include "caffe/common.hpp"
#include "caffe/filler.hpp"
#include "caffe/layers/dyve_inner_product_layer.hpp"
#include "caffe/layers/inner_product_layer.hpp"

#include "caffe/test/test_caffe_main.hpp"

namespace caffe {

template <typename TypeParam>
class DyveInnerProductLayerTest : public MultiDeviceTest<TypeParam> {
  typedef typename TypeParam::Dtype Dtype;

 protected:
  DyveInnerProductLayerTest()
      : bottom_(new Blob<Dtype>(3, 4, 5, 2)), top_(new Blob<Dtype>()),
        stock_top_(new Blob<Dtype>()) {
    bottom_vec_.push_back(bottom_);
    top_vec_.push_back(top_);
    stock_top_vec_.push_back(stock_top_);
  }
  virtual ~DyveInnerProductLayerTest() {
    delete bottom_;
    delete top_;
    delete stock_top_;
  }

  LayerParameter IpParam(int outputs, bool bias, bool transpose) {
    LayerParameter param;
    param.set_name("dyve_fc");
    InnerProductParameter* ip = param.mutable_inner_product_param();
    ip->set_num_output(outputs);
    ip->set_bias_term(bias);
    ip->set_transpose(transpose);
    ip->mutable_weight_filler()->set_type("gaussian");
    ip->mutable_bias_filler()->set_type("gaussian");
    return param;
  }

  void FillBottom(Dtype low, Dtype high) {
    FillerParameter filler_param;
    filler_param.set_min(low);
    filler_param.set_max(high);
    UniformFiller<Dtype> filler(filler_param);
    filler.Fill(bottom_);
  }

  void ExpectMatchesStock(Layer<Dtype>* dyve, bool bias, bool transpose,
      bool relu) {
    InnerProductLayer<Dtype> stock(IpParam(top_->shape(1), bias, transpose));
    stock.SetUp(bottom_vec_, stock_top_vec_);
    for (int i = 0; i < stock.blobs().size(); ++i) {
      stock.blobs()[i]->CopyFrom(*dyve->blobs()[i]);
    }
    stock.Forward(bottom_vec_, stock_top_vec_);
    ASSERT_EQ(top_->shape(), stock_top_->shape());
    for (int i = 0; i < top_->count(); ++i) {
      Dtype expected = stock_top_->cpu_data()[i];
      if (relu) expected = std::max(expected, Dtype(0));
      EXPECT_NEAR(top_->cpu_data()[i], expected,
          1e-5 * std::max(Dtype(1), std::fabs(expected)));
    }
  }

  // The hand-made case: inputs {1, 1, 5, 1}, two outputs with weights
  // {1, 0, 0, 2} and {-3, 1, 1, 1}, no bias, ReLU on. Runs it with the given
  // SPET settings into top_ and returns the layer's counters.
  DyveEffort RunHandMade(const DyveSpetParameter& spet) {
    bottom_->Reshape(1, 4, 1, 1);
    const Dtype input[] = {1, 1, 5, 1};
    std::copy(input, input + 4, bottom_->mutable_cpu_data());
    const Dtype weights[] = {1, 0, 0, 2,
                             -3, 1, 1, 1};
    LayerParameter param = IpParam(2, false, false);
    param.mutable_dyve_param()->set_relu(true);
    *param.mutable_dyve_param()->mutable_spet() = spet;
    DyveInnerProductLayer<Dtype> layer(param);
    layer.SetUp(bottom_vec_, top_vec_);
    std::copy(weights, weights + 8, layer.blobs()[0]->mutable_cpu_data());
    layer.Forward(bottom_vec_, top_vec_);
    return layer.effort();
  }

  Blob<Dtype>* const bottom_;
  Blob<Dtype>* const top_;
  Blob<Dtype>* const stock_top_;
  vector<Blob<Dtype>*> bottom_vec_, top_vec_, stock_top_vec_;
};

TYPED_TEST_CASE(DyveInnerProductLayerTest, TestDtypesAndDevices);

TYPED_TEST(DyveInnerProductLayerTest, TestKnobsOffEqualsInnerProduct) {
  typedef typename TypeParam::Dtype Dtype;
  for (int variant = 0; variant < 8; ++variant) {
    const bool bias = variant & 1, transpose = variant & 2, relu = variant & 4;
    this->FillBottom(-1, 1);
    LayerParameter param = this->IpParam(7, bias, transpose);
    param.mutable_dyve_param()->set_relu(relu);
    DyveInnerProductLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    layer.Forward(this->bottom_vec_, this->top_vec_);
    this->ExpectMatchesStock(&layer, bias, transpose, relu);
    EXPECT_EQ(layer.effort().macs_dense, 3 * 7 * 40);
    EXPECT_EQ(layer.effort().macs_executed, 3 * 7 * 40);
  }
}

TYPED_TEST(DyveInnerProductLayerTest, TestExactModeMatchesStockAfterReLU) {
  typedef typename TypeParam::Dtype Dtype;
  for (int variant = 0; variant < 4; ++variant) {
    const bool bias = variant & 1, transpose = variant & 2;
    this->FillBottom(0, 1);
    LayerParameter param = this->IpParam(16, bias, transpose);
    param.mutable_dyve_param()->set_relu(true);
    param.mutable_dyve_param()->mutable_spet()->set_exact(true);
    param.mutable_dyve_param()->mutable_spet()->set_check_interval(4);
    DyveInnerProductLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    layer.Forward(this->bottom_vec_, this->top_vec_);
    this->ExpectMatchesStock(&layer, bias, transpose, true);
    const DyveEffort& e = layer.effort();
    EXPECT_GT(e.exact_stopped, 0);
    EXPECT_GT(e.macs_skipped_exact, 0);
    EXPECT_EQ(e.macs_dense, e.macs_executed + e.macs_skipped_exact);
  }
}

// Four inputs, two outputs, f = 0.5: by summed |W| the inputs rank
// 0 (4), 3 (3), 1 (1), 2 (1), so the prefix is inputs {0, 3}.
TYPED_TEST(DyveInnerProductLayerTest, TestSpetHandMade) {
  for (int low = 0; low < 2; ++low) {
    DyveSpetParameter spet;
    spet.set_enabled(true);
    spet.set_threshold(low ? -2.5 : 0);
    const DyveEffort e = this->RunHandMade(spet);
    // Neuron 0: prefix 1 + 2 = 3, then + 0 + 0. Neuron 1: prefix -3 + 1 = -2:
    // under T = 0 it is zeroed although its full sum is 4.
    EXPECT_EQ(this->top_->cpu_data()[0], 3);
    EXPECT_EQ(this->top_->cpu_data()[1], low ? 4 : 0);
    EXPECT_EQ(e.spet_zeroed, low ? 0 : 1);
    EXPECT_EQ(e.macs_executed, low ? 8 : 6);
    EXPECT_EQ(e.macs_skipped_spet, low ? 0 : 2);
    EXPECT_EQ(e.ops_spet, 2);
  }
}

TYPED_TEST(DyveInnerProductLayerTest, TestSpetPerOutputOrder) {
  // Per output, neuron 1's own order is 0 (3), then 1, 2, 3 (1 each): its
  // prefix {0, 1} sums -3 + 1 = -2 < 0, so it is zeroed; neuron 0's prefix
  // {3, 0} sums 3 and it goes on.
  DyveSpetParameter spet;
  spet.set_enabled(true);
  spet.set_ordering(DyveSpetParameter_Ordering_PER_OUTPUT);
  const DyveEffort e = this->RunHandMade(spet);
  EXPECT_EQ(this->top_->cpu_data()[0], 3);
  EXPECT_EQ(this->top_->cpu_data()[1], 0);
  EXPECT_EQ(e.macs_executed, 6);
}

TYPED_TEST(DyveInnerProductLayerTest, TestRefusesConvolutionKnobs) {
  typedef typename TypeParam::Dtype Dtype;
  this->FillBottom(0, 1);
  DyveInnerProductLayer<Dtype> layer(this->IpParam(3, true, false));
  layer.SetUp(this->bottom_vec_, this->top_vec_);
  DyveParameter sdss;
  sdss.set_relu(true);
  sdss.mutable_sdss()->set_enabled(true);
  EXPECT_NE(layer.SetDyveParam(sdss).find("'dyve_fc': dyve_param.sdss"),
      std::string::npos);
  DyveParameter sfma;
  sfma.mutable_sfma()->set_enabled(true);
  EXPECT_NE(layer.SetDyveParam(sfma).find("dyve_param.sfma"),
      std::string::npos);
  DyveParameter no_relu;
  no_relu.mutable_spet()->set_enabled(true);
  EXPECT_NE(layer.SetDyveParam(no_relu).find("dyve_param.relu: true"),
      std::string::npos);
  DyveParameter bound;
  bound.set_relu(true);
  bound.mutable_spet()->set_enabled(true);
  bound.mutable_spet()->set_gate(DyveSpetParameter_Gate_BOUND);
  EXPECT_NE(layer.SetDyveParam(bound).find("'dyve_fc': dyve_param.spet.gate"),
      std::string::npos);
}

// Five inputs, f = 0.5 -> P = 3: the paper's order puts inputs {1, 3, 0}
// first whatever the weights (by summed |W| the prefix would be {2, 1, 3}).
TYPED_TEST(DyveInnerProductLayerTest, TestSpetInterleavedHandMade) {
  typedef typename TypeParam::Dtype Dtype;
  this->bottom_->Reshape(1, 5, 1, 1);
  std::fill(this->bottom_->mutable_cpu_data(),
      this->bottom_->mutable_cpu_data() + 5, Dtype(1));
  const Dtype weights[] = {1, -2, 5, -2, 0,
                           1, 1, -1, 1, 0};
  for (int interleaved = 0; interleaved < 2; ++interleaved) {
    LayerParameter param = this->IpParam(2, false, false);
    param.mutable_dyve_param()->set_relu(true);
    DyveSpetParameter* spet = param.mutable_dyve_param()->mutable_spet();
    spet->set_enabled(true);
    if (interleaved) {
      spet->set_ordering(DyveSpetParameter_Ordering_INTERLEAVED);
    }
    DyveInnerProductLayer<Dtype> layer(param);
    layer.SetUp(this->bottom_vec_, this->top_vec_);
    std::copy(weights, weights + 10, layer.blobs()[0]->mutable_cpu_data());
    layer.Forward(this->bottom_vec_, this->top_vec_);
    // Interleaved: neuron 0's prefix 1 - 2 - 2 = -3 < 0 is zeroed (its full
    // sum is 2); neuron 1's prefix is 3, then -1. Per layer both prefixes
    // (5 - 2 - 2, -1 + 1 + 1) are 1: both go on to 2.
    EXPECT_EQ(this->top_->cpu_data()[0], interleaved ? 0 : 2);
    EXPECT_EQ(this->top_->cpu_data()[1], 2);
    const DyveEffort& e = layer.effort();
    EXPECT_EQ(e.spet_zeroed, interleaved ? 1 : 0);
    EXPECT_EQ(e.macs_executed, interleaved ? 8 : 10);
    EXPECT_EQ(e.macs_skipped_spet, interleaved ? 2 : 0);
    EXPECT_EQ(e.ops_spet, 2);
  }
}

}  // namespace caffe
