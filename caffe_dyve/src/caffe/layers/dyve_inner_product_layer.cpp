#include <algorithm>
#include <string>
#include <vector>

#include "caffe/layers/dyve_inner_product_layer.hpp"
#include "caffe/util/dyve_math.hpp"

namespace caffe {

template <typename Dtype>
void DyveInnerProductLayer<Dtype>::LayerSetUp(
    const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  InnerProductLayer<Dtype>::LayerSetUp(bottom, top);
  SetUpDyveParam(this->layer_param_, type(), false);
}

template <typename Dtype>
std::string DyveInnerProductLayer<Dtype>::SetDyveParam(
    const DyveParameter& param) {
  const std::string error = ValidateDyveParameter(param, type(),
      this->layer_param_.name(), false);
  return ApplyDyveParam(param, error, &this->layer_param_);
}

template <typename Dtype>
void DyveInnerProductLayer<Dtype>::RefreshWeightState() {
  if (!WeightStateStale(this->blobs_[0]->data()->version())) return;
  const Dtype* weights = this->blobs_[0]->cpu_data();
  std::vector<Dtype> transposed;
  if (this->transpose_) {
    // Stored K x N: the plan wants one row of K weights per output.
    transposed.resize(this->K_ * this->N_);
    for (int k = 0; k < this->K_; ++k) {
      for (int n = 0; n < this->N_; ++n) {
        transposed[n * this->K_ + k] = weights[k * this->N_ + n];
      }
    }
    weights = transposed.data();
  }
  plan_.ComputeOrders(dyve_param_, weights, this->N_, this->K_, 1);
  plan_.Build(dyve_param_, weights, std::vector<bool>());
  WeightStateRebuilt(this->blobs_[0]->data()->version());
}

template <typename Dtype>
void DyveInnerProductLayer<Dtype>::Forward_cpu(
    const vector<Blob<Dtype>*>& bottom, const vector<Blob<Dtype>*>& top) {
  const int batch = this->M_, inputs = this->K_, outputs = this->N_;
  const uint64_t neurons = static_cast<uint64_t>(batch) * outputs;
  effort_.forward_passes += 1;
  effort_.images += batch;
  effort_.outputs += neurons;
  effort_.macs_dense += neurons * inputs;
  if (!DyveKnobsOn(dyve_param_)) {
    InnerProductLayer<Dtype>::Forward_cpu(bottom, top);
    if (dyve_param_.relu()) {
      ReluInPlace(top[0]->count(), top[0]->mutable_cpu_data());
    }
    effort_.macs_executed += neurons * inputs;
    return;
  }
  RefreshWeightState();
  const Dtype* bottom_data = bottom[0]->cpu_data();
  if (dyve_param_.spet().exact()) {
    CheckExactModeInput(bottom_data, bottom[0]->count(), type(),
        this->layer_param_, 0);
  }
  // Rows are the inputs in the plan's order, so the SPET prefix is leading.
  const std::vector<int>& order = plan_.row_channels();
  rows_.resize(batch * inputs);
  for (int m = 0; m < batch; ++m) {
    for (int k = 0; k < inputs; ++k) {
      rows_[m * inputs + k] = bottom_data[m * inputs + order[k]];
    }
  }
  Dtype* top_data = top[0]->mutable_cpu_data();
  for (int m = 0; m < batch; ++m) {
    for (int n = 0; n < outputs; ++n) {
      top_data[m * outputs + n] =
          this->bias_term_ ? this->blobs_[1]->cpu_data()[n] : Dtype(0);
    }
  }
  plan_.EvaluateRows(rows_.data(), batch, top_data, &scratch_, &effort_);
}

template <typename Dtype>
void DyveInnerProductLayer<Dtype>::Backward_cpu(
    const vector<Blob<Dtype>*>& top, const vector<bool>& propagate_down,
    const vector<Blob<Dtype>*>& bottom) {
  const bool needed = propagate_down[0] || this->param_propagate_down(0) ||
      (this->bias_term_ && this->param_propagate_down(1));
  if (!needed) return;
  CheckBackwardAllowed(type(), this->layer_param_.name());
  if (dyve_param_.relu()) {
    MaskReluDiff(top[0]->count(), top[0]->cpu_data(),
        top[0]->mutable_cpu_diff());
  }
  InnerProductLayer<Dtype>::Backward_cpu(top, propagate_down, bottom);
}

INSTANTIATE_CLASS(DyveInnerProductLayer);
REGISTER_LAYER_CLASS(DyveInnerProduct);

}  // namespace caffe
