#ifndef CAFFE_DYVE_INNER_PRODUCT_LAYER_HPP_
#define CAFFE_DYVE_INNER_PRODUCT_LAYER_HPP_

#include <string>
#include <vector>

#include "caffe/blob.hpp"
#include "caffe/layer.hpp"
#include "caffe/layers/dyve_layer.hpp"
#include "caffe/layers/dyve_neuron_plan.hpp"
#include "caffe/layers/inner_product_layer.hpp"
#include "caffe/proto/caffe.pb.h"

namespace caffe {

/**
 * @brief An InnerProduct with DyVEDeep's neuron-level knob, SPET (approximate
 *        and exact), per docs/knobs.md of DyVE-Caffe.
 *
 * Same inner_product_param and learnable blobs as InnerProduct. With SPET
 * on, the prefix of every neuron of the batch is one GEMM over the leading
 * inputs (in significance order, or the paper's interleaved one) and only the
 * surviving neurons are finished.
 * Backward delegates to InnerProduct's gradient (masked by the ReLU) and is
 * refused while a knob is on.
 */
template <typename Dtype>
class DyveInnerProductLayer : public InnerProductLayer<Dtype>,
    public DyveLayer {
 public:
  explicit DyveInnerProductLayer(const LayerParameter& param)
      : InnerProductLayer<Dtype>(param) {}
  virtual void LayerSetUp(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual inline const char* type() const { return "DyveInnerProduct"; }

  virtual std::string SetDyveParam(const DyveParameter& param);

 protected:
  virtual void Forward_cpu(const vector<Blob<Dtype>*>& bottom,
      const vector<Blob<Dtype>*>& top);
  virtual void Backward_cpu(const vector<Blob<Dtype>*>& top,
      const vector<bool>& propagate_down, const vector<Blob<Dtype>*>& bottom);

 private:
  void RefreshWeightState();

  DyveNeuronPlan<Dtype> plan_;
  typename DyveNeuronPlan<Dtype>::Scratch scratch_;
  std::vector<Dtype> rows_;
};

}  // namespace caffe

#endif  // CAFFE_DYVE_INNER_PRODUCT_LAYER_HPP_
