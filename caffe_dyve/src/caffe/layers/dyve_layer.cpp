#include <algorithm>
#include <cmath>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

#include "caffe/common.hpp"
#include "caffe/layers/dyve_layer.hpp"
#include "caffe/util/dyve_math.hpp"
#include "caffe/util/mkl_alternate.hpp"

namespace caffe {

// Every counter of DyveEffort in its fixed order (Items, hence pycaffe and
// the CLI); Reset and Add follow the same list.
#define DYVE_EFFORT_FIELDS(X) \
  X(forward_passes) X(images) X(outputs) X(macs_dense) X(macs_executed) \
  X(macs_skipped_spet) X(macs_skipped_exact) X(macs_skipped_sdss) \
  X(macs_skipped_sfma) X(ops_spet) X(ops_exact) X(ops_sdss) X(ops_sfma) \
  X(spet_zeroed) X(exact_stopped) X(sdss_filled) X(sfma_maps)

void DyveEffort::Reset() {
#define DYVE_ZERO(name) name = 0;
  DYVE_EFFORT_FIELDS(DYVE_ZERO)
#undef DYVE_ZERO
}

void DyveEffort::Add(const DyveEffort& other) {
#define DYVE_ADD(name) name += other.name;
  DYVE_EFFORT_FIELDS(DYVE_ADD)
#undef DYVE_ADD
}

std::vector<std::pair<std::string, uint64_t> > DyveEffort::Items() const {
  std::vector<std::pair<std::string, uint64_t> > items;
#define DYVE_ITEM(name) \
  items.push_back(std::make_pair(std::string(#name), name));
  DYVE_EFFORT_FIELDS(DYVE_ITEM)
#undef DYVE_ITEM
  return items;
}

std::string DyveEffort::Summary() const {
  std::ostringstream out;
  const double dense = macs_dense > 0 ? static_cast<double>(macs_dense) : 1.0;
  const uint64_t overhead = ops_spet + ops_exact + ops_sdss + ops_sfma;
  out << "images " << images << ", MACs executed " << macs_executed << " of "
      << macs_dense << " (" << 100.0 * macs_executed / dense << "%); skipped:"
      << " spet " << 100.0 * macs_skipped_spet / dense << "%,"
      << " exact " << 100.0 * macs_skipped_exact / dense << "%,"
      << " sdss " << 100.0 * macs_skipped_sdss / dense << "%,"
      << " sfma " << 100.0 * macs_skipped_sfma / dense << "%;"
      << " overhead ops " << overhead << "; neurons zeroed by spet "
      << spet_zeroed << ", stopped by exact " << exact_stopped
      << ", filled by sdss " << sdss_filled << "; maps replaced by sfma "
      << sfma_maps;
  return out.str();
}

int BlasThreads() {
#ifdef OPENBLAS_VERSION
  return openblas_get_num_threads();
#else
  return 1;
#endif
}

void SetBlasThreads(int threads) {
#ifdef OPENBLAS_VERSION
  openblas_set_num_threads(threads);
#endif
}

bool DyveKnobsOn(const DyveParameter& param) {
  return param.spet().enabled() || param.spet().exact() ||
      param.sdss().enabled() || param.sfma().enabled();
}

std::string ValidateDyveParameter(const DyveParameter& param,
    const std::string& layer_type, const std::string& layer_name,
    bool is_convolution) {
  std::ostringstream error;
  const std::string where = layer_type + " layer '" + layer_name + "': ";
  const DyveSpetParameter& spet = param.spet();
  if (!(spet.fraction() > 0 && spet.fraction() <= 1)) {
    error << where << "dyve_param.spet.fraction must be in (0, 1], got "
          << spet.fraction();
  } else if (spet.check_interval() < 1) {
    error << where << "dyve_param.spet.check_interval must be >= 1";
  } else if ((spet.enabled() || spet.exact()) && !param.relu()) {
    error << where << "dyve_param.spet needs a rectified output: SPET and "
          << "exact mode predict ReLU saturation, so set dyve_param.relu: true";
  } else if (!std::isfinite(spet.threshold())) {
    error << where << "dyve_param.spet.threshold must be finite";
  } else if (!(spet.bound_scale() >= 0) || !std::isfinite(spet.bound_scale())) {
    error << where << "dyve_param.spet.bound_scale must be finite and >= 0, "
          << "got " << spet.bound_scale();
  } else if (spet.gate() == DyveSpetParameter_Gate_BOUND && !spet.enabled()) {
    error << where << "dyve_param.spet.gate BOUND gates approximate SPET, so "
          << "it needs dyve_param.spet.enabled: true";
  } else if (spet.gate() == DyveSpetParameter_Gate_BOUND &&
             spet.ordering() != DyveSpetParameter_Ordering_PER_LAYER) {
    error << where << "dyve_param.spet.gate BOUND needs "
          << "dyve_param.spet.ordering PER_LAYER";
  } else if (spet.gate() == DyveSpetParameter_Gate_BOUND && !is_convolution) {
    error << where << "dyve_param.spet.gate BOUND applies to convolutions only "
          << "(an inner product's bound would cost as much as its rest)";
  } else if (!is_convolution && param.sdss().enabled()) {
    error << where << "dyve_param.sdss applies to convolutions only";
  } else if (!is_convolution && param.sfma().enabled()) {
    error << where << "dyve_param.sfma applies to convolutions only";
  } else if (param.sdss().stride() < 1) {
    error << where << "dyve_param.sdss.stride must be >= 1, got "
          << param.sdss().stride();
  } else if (!(param.sdss().threshold() >= 0)) {
    error << where << "dyve_param.sdss.threshold must be >= 0, got "
          << param.sdss().threshold();
  } else if (param.sdss().enabled() && !param.relu()) {
    error << where << "dyve_param.sdss needs a rectified output (its "
          << "significance test reads post-ReLU values), so set "
          << "dyve_param.relu: true";
  } else if (!(param.sfma().threshold() >= 0)) {
    error << where << "dyve_param.sfma.threshold must be >= 0, got "
          << param.sfma().threshold();
  }
  return error.str();
}

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

}  // namespace

// The number of prefix channels: ceil(f * C) with a tolerance so that a float
// f such as 0.3f gives the same count as the decimal 0.3; at least one.
static int PrefixChannels(float fraction, int channels) {
  const int count = static_cast<int>(std::ceil(
      static_cast<double>(fraction) * channels - 1e-6));
  return std::max(1, std::min(channels, count));
}

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
    if (spet && per_output) output_order_[o] = OrderBySignificance(significance);
  }
  if (spet && !per_output) {
    layer_order_ = OrderBySignificance(layer_significance);
  } else {
    layer_order_.resize(channels);
    for (int c = 0; c < channels; ++c) layer_order_[c] = c;
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::Build(const DyveParameter& param,
    const Dtype* weights, const std::vector<bool>& constant) {
  param_ = param;
  const bool spet = param.spet().enabled();
  const bool per_output = spet &&
      param.spet().ordering() == DyveSpetParameter_Ordering_PER_OUTPUT;
  const int prefix_channels = PrefixChannels(param.spet().fraction(), channels_);
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
    // Most negative weight first, so the sum falls below 0 as early as possible.
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
    Dtype* z, DyveEffort* effort) const {
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
    if (param_.relu()) {
      for (int i = 0; i < num_rows * num_output_; ++i) {
        z[i] = std::max(z[i], Dtype(0));
      }
    }
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
    // Scratch per thread: a layer may evaluate several images at once.
    static thread_local std::vector<Dtype> maxima, bounds, sums;
    static thread_local std::vector<int> survivors;
    // BOUND gate: the rows' rest maxima, then every neuron's bound as one
    // small GEMM (rest channels instead of rest taps per neuron).
    bounds.assign(bound_ ? num_rows * num_output_ : 0, Dtype(0));
    if (bound_ && rest_channels_ > 0) {
      maxima.resize(num_rows * rest_channels_);
      for (int r = 0; r < num_rows; ++r) {
        RowMaxima(rows + r * row_length_, &maxima[r * rest_channels_],
            effort);
      }
      GemmRowsByWeights(num_rows, num_output_, rest_channels_, maxima.data(),
          rest_channels_, rest_positive_.data(), rest_channels_,
          bounds.data());
      effort->ops_spet +=
          static_cast<uint64_t>(num_rows) * num_output_ * rest_channels_;
    }
    if (exact) {
      for (int r = 0; r < num_rows; ++r) {
        for (int o = 0; o < num_output_; ++o) {
          Dtype* value = z + r * num_output_ + o;
          *value = Finish(rows + r * row_length_, o, *value,
              bound_ ? bounds[r * num_output_ + o] : Dtype(0), effort);
        }
      }
      return;
    }
    // Gate every neuron of a row, then finish its survivors four at a time.
    const Dtype threshold = param_.spet().threshold();
    const Dtype scale = param_.spet().bound_scale();
    const int rest_length = row_length_ - prefix_length_;
    survivors.resize(num_output_);
    sums.resize(num_output_);
    for (int r = 0; r < num_rows; ++r) {
      Dtype* zr = z + r * num_output_;
      // Branch-free: about half the neurons are zeroed, in no pattern a
      // branch predictor could follow.
      int count = 0;
      if (bound_) {
        const Dtype* br = &bounds[r * num_output_];
        for (int o = 0; o < num_output_; ++o) {
          survivors[count] = o;
          count += !(zr[o] + scale * br[o] < threshold);
        }
        for (int o = 0; o < num_output_; ++o) {
          zr[o] = (zr[o] + scale * br[o] < threshold) ? Dtype(0) : zr[o];
        }
      } else {
        for (int o = 0; o < num_output_; ++o) {
          survivors[count] = o;
          count += !(zr[o] < threshold);
        }
        for (int o = 0; o < num_output_; ++o) {
          zr[o] = (zr[o] < threshold) ? Dtype(0) : zr[o];
        }
      }
      const uint64_t zeroed = num_output_ - count;
      effort->ops_spet += num_output_;
      effort->spet_zeroed += zeroed;
      effort->macs_skipped_spet += zeroed * rest_length;
      effort->macs_executed += static_cast<uint64_t>(count) * rest_length;
      DotOutputs(rows + r * row_length_ + prefix_length_, prefix_length_,
          rest_length, survivors.data(), count, sums.data());
      for (int j = 0; j < count; ++j) zr[survivors[j]] += sums[j];
      if (param_.relu()) {  // the zeroed ones are 0 already
        for (int o = 0; o < num_output_; ++o) {
          zr[o] = std::max(zr[o], Dtype(0));
        }
      }
    }
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
    DyveEffort* effort) const {
  if (param_.spet().exact() || !prefix_index_.empty()) {
    // Sign-ordered or per-output orders: one neuron at a time.
    for (int i = 0; i < count; ++i) {
      z[i] = EvaluateNeuron(row, maxima, outputs[i], z[i], effort);
    }
    return;
  }
  static thread_local std::vector<Dtype> sums;  // scratch per thread
  static thread_local std::vector<int> survivors, kept;
  sums.resize(std::max<size_t>(sums.size(), count));
  const bool spet = param_.spet().enabled();
  const int prefix = spet ? prefix_length_ : 0;
  // Dense part: the prefix under SPET, else the whole row.
  const int head = spet ? prefix : row_length_;
  DotOutputs(row, 0, head, outputs, count, sums.data());
  for (int i = 0; i < count; ++i) z[i] += sums[i];
  effort->macs_executed += static_cast<uint64_t>(count) * head;
  survivors.clear();
  if (spet) {
    const Dtype threshold = param_.spet().threshold();
    const Dtype scale = param_.spet().bound_scale();
    const int rest_length = row_length_ - prefix;
    kept.clear();
    for (int i = 0; i < count; ++i) {
      const Dtype gate = bound_ ?
          z[i] + scale * RestBound(maxima, outputs[i], effort) : z[i];
      effort->ops_spet += 1;
      if (gate < threshold) {
        z[i] = 0;
        effort->spet_zeroed += 1;
        effort->macs_skipped_spet += rest_length;
      } else {
        survivors.push_back(i);
        kept.push_back(outputs[i]);
      }
    }
    DotOutputs(row + prefix, prefix, rest_length, kept.data(), kept.size(),
        sums.data());
    for (int j = 0; j < kept.size(); ++j) z[survivors[j]] += sums[j];
    effort->macs_executed += static_cast<uint64_t>(kept.size()) * rest_length;
  } else {
    for (int i = 0; i < count; ++i) survivors.push_back(i);
  }
  if (param_.relu()) {
    for (int j = 0; j < survivors.size(); ++j) {
      z[survivors[j]] = std::max(z[survivors[j]], Dtype(0));
    }
  }
}

template <typename Dtype>
void DyveNeuronPlan<Dtype>::RowMaxima(const Dtype* row, Dtype* maxima,
    DyveEffort* effort) const {
  const Dtype* rest = row + prefix_length_;
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
    effort->ops_spet += 1;
    const Dtype gate = bound_ ? z + Dtype(param_.spet().bound_scale()) * bound
                              : z;
    if (gate < param_.spet().threshold()) {
      effort->spet_zeroed += 1;
      effort->macs_skipped_spet += row_length_ - prefix;
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
  return param_.relu() ? std::max(z, Dtype(0)) : z;
}

INSTANTIATE_CLASS(DyveNeuronPlan);

}  // namespace caffe
