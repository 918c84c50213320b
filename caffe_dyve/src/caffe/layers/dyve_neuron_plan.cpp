#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "caffe/common.hpp"
#include "caffe/layers/dyve_neuron_plan.hpp"
#include "caffe/util/dyve_math.hpp"

namespace caffe {

namespace {

// Channels sorted by significance, descending; ties keep index order.
std::vector<int> OrderBySignificance(const std::vector<double>& significance) {
  std::vector<int> order(significance.size());
  for (int c = 0; c < order.size(); ++c) order[c] = c;
  std::stable_sort(order.begin(), order.end(), [&](int a, int b) {
    return significance[a] > significance[b];
  });
  return order;
}

// The paper's order (INTERLEAVED): odd-indexed channels, then even ones.
std::vector<int> InterleavedOrder(int channels) {
  std::vector<int> order;
  for (int c = 1; c < channels; c += 2) order.push_back(c);
  for (int c = 0; c < channels; c += 2) order.push_back(c);
  return order;
}

// The number of prefix channels: ceil(f * C) with a tolerance so that a float
// f such as 0.3f gives the same count as the decimal 0.3; at least one.
int PrefixChannels(float fraction, int channels) {
  const int count = static_cast<int>(std::ceil(
      static_cast<double>(fraction) * channels - 1e-6));
  return std::max(1, std::min(channels, count));
}

}  // namespace

template <typename Dtype>
void DyveNeuronPlan<Dtype>::ComputeOrders(const DyveParameter& param,
    const Dtype* weights, int num_output, int channels, int taps) {
  param_ = param;
  num_output_ = num_output;
  channels_ = channels;
  taps_ = taps;
  const bool spet = param.spet().enabled();
  const bool per_output =
      param.spet().ordering() == DyveSpetParameter_Ordering_PER_OUTPUT;
  std::vector<double> layer_significance(channels, 0.0);
  output_order_.assign(spet && per_output ? num_output : 0, std::vector<int>());
  for (int o = 0; o < num_output; ++o) {
    std::vector<double> significance(channels, 0.0);
    for (int c = 0; c < channels; ++c) {
      const Dtype* w = weights + (o * channels + c) * taps;
      for (int t = 0; t < taps; ++t) significance[c] += std::fabs(w[t]);
      layer_significance[c] += significance[c];
    }
    if (spet && per_output) {
      output_order_[o] = OrderBySignificance(significance);
    }
  }
  if (spet && param.spet().ordering() ==
      DyveSpetParameter_Ordering_INTERLEAVED) {
    layer_order_ = InterleavedOrder(channels);
  } else if (spet && !per_output) {
    layer_order_ = OrderBySignificance(layer_significance);
  } else {
    layer_order_.resize(channels);
    for (int c = 0; c < channels; ++c) layer_order_[c] = c;
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::CopyOrders(const DyveNeuronPlan& other) {
  param_ = other.param_;
  num_output_ = other.num_output_;
  channels_ = other.channels_;
  taps_ = other.taps_;
  layer_order_ = other.layer_order_;
  output_order_ = other.output_order_;
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::Build(const DyveParameter& param,
    const Dtype* weights, const std::vector<bool>& constant) {
  param_ = param;
  const bool spet = param.spet().enabled();
  const bool per_output = spet &&
      param.spet().ordering() == DyveSpetParameter_Ordering_PER_OUTPUT;
  const int prefix_channels =
      PrefixChannels(param.spet().fraction(), channels_);
  // Row layout: the live channels in layer order (natural order unless SPET
  // orders the layer), so the PER_LAYER prefix is the leading part of a row.
  row_channels_.clear();
  std::vector<int> row_position(channels_, -1);
  int live_prefix_channels = 0;
  for (int k = 0; k < channels_; ++k) {
    const int c = layer_order_[k];
    if (!constant.empty() && constant[c]) continue;
    row_position[c] = row_channels_.size();
    row_channels_.push_back(c);
    if (k < prefix_channels) ++live_prefix_channels;
  }
  row_length_ = row_channels_.size() * taps_;
  prefix_length_ = (spet && !per_output) ? live_prefix_channels * taps_ : 0;
  row_weights_.resize(num_output_ * row_length_);
  for (int o = 0; o < num_output_; ++o) {
    for (int k = 0; k < row_channels_.size(); ++k) {
      const Dtype* w = weights + (o * channels_ + row_channels_[k]) * taps_;
      std::copy(w, w + taps_, &row_weights_[o * row_length_ + k * taps_]);
    }
  }
  bound_ = spet && !per_output &&
      param.spet().gate() == DyveSpetParameter_Gate_BOUND;
  rest_channels_ = bound_ ? row_channels_.size() - live_prefix_channels : 0;
  rest_positive_.assign(num_output_ * rest_channels_, Dtype(0));
  for (int o = 0; o < num_output_; ++o) {
    for (int j = 0; j < rest_channels_; ++j) {
      const Dtype* w = &row_weights_[o * row_length_ + prefix_length_ +
          j * taps_];
      Dtype positive = 0;
      for (int t = 0; t < taps_; ++t) positive += std::max(w[t], Dtype(0));
      rest_positive_[o * rest_channels_ + j] = positive;
    }
  }
  prefix_index_.assign(per_output ? num_output_ : 0, std::vector<int>());
  rest_index_.assign(per_output ? num_output_ : 0, std::vector<int>());
  prefix_weight_.assign(prefix_index_.size(), std::vector<Dtype>());
  rest_weight_.assign(rest_index_.size(), std::vector<Dtype>());
  for (int o = 0; o < prefix_index_.size(); ++o) {
    for (int k = 0; k < channels_; ++k) {
      const int position = row_position[output_order_[o][k]];
      if (position < 0) continue;
      const bool prefix = k < prefix_channels;
      std::vector<int>& index = prefix ? prefix_index_[o] : rest_index_[o];
      std::vector<Dtype>& w = prefix ? prefix_weight_[o] : rest_weight_[o];
      for (int t = 0; t < taps_; ++t) {
        index.push_back(position * taps_ + t);
        w.push_back(row_weights_[o * row_length_ + position * taps_ + t]);
      }
    }
  }
  const bool exact = param.spet().exact();
  positive_index_.assign(exact ? num_output_ : 0, std::vector<int>());
  negative_index_.assign(exact ? num_output_ : 0, std::vector<int>());
  positive_weight_.assign(exact ? num_output_ : 0, std::vector<Dtype>());
  negative_weight_.assign(exact ? num_output_ : 0, std::vector<Dtype>());
  for (int o = 0; o < positive_index_.size(); ++o) {
    std::vector<int> rest;
    if (per_output) {
      rest = rest_index_[o];
    } else {
      for (int j = prefix_length_; j < row_length_; ++j) rest.push_back(j);
    }
    std::vector<std::pair<Dtype, int> > negative;
    for (int i = 0; i < rest.size(); ++i) {
      const Dtype w = row_weights_[o * row_length_ + rest[i]];
      if (w >= 0) {
        positive_index_[o].push_back(rest[i]);
        positive_weight_[o].push_back(w);
      } else {
        negative.push_back(std::make_pair(w, rest[i]));
      }
    }
    // Most negative weight first, so the sum falls below 0 as early as
    // possible.
    std::stable_sort(negative.begin(), negative.end(),
        [](const std::pair<Dtype, int>& a, const std::pair<Dtype, int>& b) {
          return a.first < b.first;
        });
    for (int i = 0; i < negative.size(); ++i) {
      negative_weight_[o].push_back(negative[i].first);
      negative_index_[o].push_back(negative[i].second);
    }
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::EvaluateRows(const Dtype* rows, int num_rows,
    Dtype* z, Scratch* scratch, DyveEffort* effort) const {
  const bool spet = param_.spet().enabled();
  const bool exact = param_.spet().exact();
  const bool per_output =
      param_.spet().ordering() == DyveSpetParameter_Ordering_PER_OUTPUT;
  if (!spet && !exact) {
    if (row_length_ > 0) {
      GemmRowsByWeights(num_rows, num_output_, row_length_, rows, row_length_,
          row_weights_.data(), row_length_, z);
    }
    effort->macs_executed +=
        static_cast<uint64_t>(num_rows) * num_output_ * row_length_;
    Rectify(num_rows * num_output_, z);
    return;
  }
  if (spet && !per_output) {
    // The prefix of every neuron as one GEMM; only survivors go on.
    if (prefix_length_ > 0) {
      GemmRowsByWeights(num_rows, num_output_, prefix_length_, rows,
          row_length_, row_weights_.data(), row_length_, z);
    }
    effort->macs_executed +=
        static_cast<uint64_t>(num_rows) * num_output_ * prefix_length_;
    if (exact) {
      const Dtype* bounds = RowBounds(rows + prefix_length_, row_length_,
          num_rows, scratch, effort);
      for (int r = 0; r < num_rows; ++r) {
        for (int o = 0; o < num_output_; ++o) {
          Dtype* value = z + r * num_output_ + o;
          *value = Finish(rows + r * row_length_, o, *value,
              bounds ? bounds[r * num_output_ + o] : Dtype(0), effort);
        }
      }
      return;
    }
    FinishRows(rows + prefix_length_, row_length_, num_rows, z, scratch,
        effort);
    return;
  }
  for (int r = 0; r < num_rows; ++r) {
    for (int o = 0; o < num_output_; ++o) {
      Dtype* value = z + r * num_output_ + o;
      *value = EvaluateNeuron(rows + r * row_length_, NULL, o, *value, effort);
    }
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::EvaluateRest(const Dtype* rest_rows,
    int num_rows, Dtype* z, Scratch* scratch, DyveEffort* effort) const {
  CHECK(splits_prefix()) << "EvaluateRest needs SPET's prefix split";
  effort->macs_executed +=
      static_cast<uint64_t>(num_rows) * num_output_ * prefix_length_;
  FinishRows(rest_rows, row_length_ - prefix_length_, num_rows, z, scratch,
      effort);
}

template <typename Dtype>
const Dtype* DyveNeuronPlan<Dtype>::RowBounds(const Dtype* rest, int stride,
    int num_rows, Scratch* scratch, DyveEffort* effort) const {
  if (!bound_) return NULL;
  // The rows' rest maxima, then every neuron's bound as one small GEMM (rest
  // channels instead of rest taps per neuron).
  std::vector<Dtype>& bounds = scratch->bounds;
  bounds.assign(num_rows * num_output_, Dtype(0));
  if (rest_channels_ > 0) {
    std::vector<Dtype>& maxima = scratch->maxima;
    maxima.resize(num_rows * rest_channels_);
    for (int r = 0; r < num_rows; ++r) {
      RestMaxima(rest + r * stride, &maxima[r * rest_channels_], effort);
    }
    GemmRowsByWeights(num_rows, num_output_, rest_channels_, maxima.data(),
        rest_channels_, rest_positive_.data(), rest_channels_,
        bounds.data());
    effort->ops_spet +=
        static_cast<uint64_t>(num_rows) * num_output_ * rest_channels_;
  }
  return bounds.data();
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::FinishRows(const Dtype* rest, int stride,
    int num_rows, Dtype* z, Scratch* scratch, DyveEffort* effort) const {
  const Dtype* bounds = RowBounds(rest, stride, num_rows, scratch, effort);
  // Gate every neuron of a row, then finish its survivors four at a time.
  const int rest_length = row_length_ - prefix_length_;
  std::vector<int>& survivors = scratch->survivors;
  std::vector<Dtype>& sums = scratch->sums;
  survivors.resize(num_output_);
  sums.resize(num_output_);
  for (int r = 0; r < num_rows; ++r) {
    Dtype* zr = z + r * num_output_;
    const int count = Gate(num_output_,
        bounds ? bounds + r * num_output_ : NULL, rest_length, zr,
        survivors.data(), effort);
    effort->macs_executed += static_cast<uint64_t>(count) * rest_length;
    DotOutputs(rest + r * stride, prefix_length_, rest_length,
        survivors.data(), count, sums.data());
    for (int j = 0; j < count; ++j) zr[survivors[j]] += sums[j];
    Rectify(num_output_, zr);
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::PrefixWeights(std::vector<Dtype>* weights) const {
  weights->resize(num_output_ * prefix_length_);
  for (int o = 0; o < num_output_; ++o) {
    const Dtype* w = &row_weights_[o * row_length_];
    std::copy(w, w + prefix_length_, &(*weights)[o * prefix_length_]);
  }
}

template <typename Dtype>
int DyveNeuronPlan<Dtype>::Gate(int n, const Dtype* bounds, int rest_length,
    Dtype* z, int* survivors, DyveEffort* effort) const {
  const Dtype threshold = param_.spet().threshold();
  const Dtype scale = param_.spet().bound_scale();
  // Branch-free: about half the neurons are zeroed, in no pattern a branch
  // predictor could follow.
  int count = 0;
  if (bounds != NULL) {
    for (int i = 0; i < n; ++i) {
      survivors[count] = i;
      count += !(z[i] + scale * bounds[i] < threshold);
    }
    for (int i = 0; i < n; ++i) {
      z[i] = (z[i] + scale * bounds[i] < threshold) ? Dtype(0) : z[i];
    }
  } else {
    for (int i = 0; i < n; ++i) {
      survivors[count] = i;
      count += !(z[i] < threshold);
    }
    for (int i = 0; i < n; ++i) {
      z[i] = (z[i] < threshold) ? Dtype(0) : z[i];
    }
  }
  const uint64_t zeroed = n - count;
  effort->ops_spet += n;
  effort->spet_zeroed += zeroed;
  effort->macs_skipped_spet += zeroed * rest_length;
  return count;
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::Rectify(int n, Dtype* z) const {
  if (param_.relu()) ReluInPlace(n, z);
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::DotOutputs(const Dtype* x, int offset, int n,
    const int* outputs, int count, Dtype* sums) const {
  if (n <= 0) {
    std::fill(sums, sums + count, Dtype(0));
    return;
  }
  int k = 0;
  for (; k + 4 <= count; k += 4) {
    const Dtype* w[4];
    for (int j = 0; j < 4; ++j) {
      w[j] = &row_weights_[outputs[k + j] * row_length_ + offset];
    }
    Dot4(n, x, w, sums + k);
  }
  for (; k < count; ++k) {
    sums[k] = Dot(n, x, &row_weights_[outputs[k] * row_length_ + offset]);
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::EvaluateSelected(const Dtype* row,
    const Dtype* maxima, const int* outputs, int count, Dtype* z,
    Scratch* scratch, DyveEffort* effort) const {
  if (param_.spet().exact() || !prefix_index_.empty()) {
    // Sign-ordered or per-output orders: one neuron at a time.
    for (int i = 0; i < count; ++i) {
      z[i] = EvaluateNeuron(row, maxima, outputs[i], z[i], effort);
    }
    return;
  }
  std::vector<Dtype>& sums = scratch->sums;
  sums.resize(std::max<size_t>(sums.size(), count));
  const bool spet = param_.spet().enabled();
  const int prefix = spet ? prefix_length_ : 0;
  // Dense part: the prefix under SPET, else the whole row.
  const int head = spet ? prefix : row_length_;
  DotOutputs(row, 0, head, outputs, count, sums.data());
  for (int i = 0; i < count; ++i) z[i] += sums[i];
  effort->macs_executed += static_cast<uint64_t>(count) * head;
  if (spet) {
    const int rest_length = row_length_ - prefix;
    const Dtype* bounds = NULL;
    if (bound_) {
      scratch->bounds.resize(count);
      for (int i = 0; i < count; ++i) {
        scratch->bounds[i] = RestBound(maxima, outputs[i], effort);
      }
      bounds = scratch->bounds.data();
    }
    std::vector<int>& survivors = scratch->survivors;
    std::vector<int>& kept = scratch->kept;
    survivors.resize(count);
    kept.resize(count);
    const int live = Gate(count, bounds, rest_length, z, survivors.data(),
        effort);
    for (int j = 0; j < live; ++j) kept[j] = outputs[survivors[j]];
    DotOutputs(row + prefix, prefix, rest_length, kept.data(), live,
        sums.data());
    for (int j = 0; j < live; ++j) z[survivors[j]] += sums[j];
    effort->macs_executed += static_cast<uint64_t>(live) * rest_length;
  }
  Rectify(count, z);
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::RowMaxima(const Dtype* row, Dtype* maxima,
    DyveEffort* effort) const {
  RestMaxima(row + prefix_length_, maxima, effort);
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::RestMaxima(const Dtype* rest, Dtype* maxima,
    DyveEffort* effort) const {
  for (int j = 0; j < rest_channels_; ++j) {
    maxima[j] = MaxOf(taps_, rest + j * taps_);
  }
  effort->ops_spet += static_cast<uint64_t>(rest_channels_) * taps_;
}

template <typename Dtype>
Dtype DyveNeuronPlan<Dtype>::EvaluateNeuron(const Dtype* row,
    const Dtype* maxima, int o, Dtype z, DyveEffort* effort) const {
  if (param_.spet().enabled()) {
    if (prefix_index_.empty()) {
      if (prefix_length_ > 0) {
        z += Dot(prefix_length_, row, &row_weights_[o * row_length_]);
      }
      effort->macs_executed += prefix_length_;
    } else {
      const std::vector<Dtype>& w = prefix_weight_[o];
      z += GatherDot<Dtype>(w.size(), w.data(), prefix_index_[o].data(), row);
      effort->macs_executed += w.size();
    }
  }
  return Finish(row, o, z, RestBound(maxima, o, effort), effort);
}

template <typename Dtype>
Dtype DyveNeuronPlan<Dtype>::RestBound(const Dtype* maxima, int o,
    DyveEffort* effort) const {
  if (!bound_ || rest_channels_ == 0) return Dtype(0);
  const Dtype* positive = &rest_positive_[o * rest_channels_];
  Dtype bound = 0;
  for (int j = 0; j < rest_channels_; ++j) bound += positive[j] * maxima[j];
  effort->ops_spet += rest_channels_;
  return bound;
}

template <typename Dtype>
Dtype DyveNeuronPlan<Dtype>::Finish(const Dtype* row, int o, Dtype z,
    Dtype bound, DyveEffort* effort) const {
  const Dtype* w = &row_weights_[o * row_length_];
  if (param_.spet().enabled()) {
    const int prefix =
        prefix_index_.empty() ? prefix_length_ : prefix_index_[o].size();
    int survivor;
    if (Gate(1, bound_ ? &bound : NULL, row_length_ - prefix, &z, &survivor,
             effort) == 0) {
      return Dtype(0);
    }
  }
  if (param_.spet().exact()) {
    const std::vector<int>& positive = positive_index_[o];
    z += GatherDot<Dtype>(positive.size(), positive_weight_[o].data(),
        positive.data(), row);
    effort->macs_executed += positive.size();
    const std::vector<int>& negative = negative_index_[o];
    const Dtype* negative_w = negative_weight_[o].data();
    const int count = negative.size();
    const int interval = param_.spet().check_interval();
    for (int start = 0; start < count; start += interval) {
      // Inputs are >= 0 and these weights < 0: z can only fall from here.
      effort->ops_exact += 1;
      if (z < 0) {
        effort->exact_stopped += 1;
        effort->macs_skipped_exact += count - start;
        return Dtype(0);
      }
      const int end = std::min(count, start + interval);
      z += GatherDot<Dtype>(end - start, negative_w + start,
          negative.data() + start, row);
      effort->macs_executed += end - start;
    }
  } else if (!rest_index_.empty()) {
    const std::vector<Dtype>& rest_w = rest_weight_[o];
    z += GatherDot<Dtype>(rest_w.size(), rest_w.data(), rest_index_[o].data(),
        row);
    effort->macs_executed += rest_w.size();
  } else {
    const int start = param_.spet().enabled() ? prefix_length_ : 0;
    if (row_length_ > start) {
      z += Dot(row_length_ - start, row + start, w + start);
    }
    effort->macs_executed += row_length_ - start;
  }
  Rectify(1, &z);
  return z;
}

INSTANTIATE_CLASS(DyveNeuronPlan);


}  // namespace caffe
