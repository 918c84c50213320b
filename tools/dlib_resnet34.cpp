// dlib_resnet34: dlib's ImageNet ResNet-34 (resnet34_1000_imagenet_classifier.dnn) out of
// dlib, for python/dyve/resnet34.py, which turns it into a Caffe net.
//
// Built against Debian's libdlib-dev (19.24) by `make resnet34` into build/resnet34/:
//   g++ -O2 -std=c++14 tools/dlib_resnet34.cpp $(pkg-config --cflags --libs dlib-1)
//
//   dlib_resnet34 dump MODEL OUT_DIR
//       Deserializes MODEL into the network type of dlib's examples/dnn_imagenet_ex.cpp
//       (deserialization itself checks every layer's kind, kernel size, stride and
//       padding against that type) and writes, in OUT_DIR:
//         layers.txt   one line per computational layer, input to output:
//                        <index> <kind> key=value ...   (kinds: input con affine relu
//                        max_pool avg_pool add_prev fc; offset/count locate the layer's
//                        float32 values in params.f32)
//         params.f32   the parameters, raw little-endian float32, in layers.txt order:
//                        con:    filters [num_filters][k][nr][nc], then biases [num_filters]
//                        affine: gamma [k], then beta [k]      (CONV_MODE: per channel)
//                        fc:     dlib's matrix [num_inputs + 1][num_outputs], row-major;
//                                its last row is the bias
//         labels.txt   the label strings stored after the net, one per line, class order
//         net.txt      dlib's own printout of the net (operator<<), tags and skips included
//
//   dlib_resnet34 run MODEL IMAGES N H W OUT
//       IMAGES: raw uint8 RGB, N x H x W x 3 (H = W = 227, what input_rgb_image_sized<227>
//       accepts). Runs dlib's net without its loss layer (the fc outputs, i.e. the logits)
//       in batches and writes OUT: N x 1000 raw little-endian float32.
#include <dlib/dnn.h>

#include <cstdio>
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>
#include <vector>

using namespace dlib;

// ------------------------------------------------- the network, as dnn_imagenet_ex.cpp
template <template <int, template <typename> class, int, typename> class block, int N,
          template <typename> class BN, typename SUBNET>
using residual = add_prev1<block<N, BN, 1, tag1<SUBNET>>>;

template <template <int, template <typename> class, int, typename> class block, int N,
          template <typename> class BN, typename SUBNET>
using residual_down = add_prev2<avg_pool<2, 2, 2, 2, skip1<tag2<block<N, BN, 2, tag1<SUBNET>>>>>>;

template <int N, template <typename> class BN, int stride, typename SUBNET>
using block = BN<con<N, 3, 3, 1, 1, relu<BN<con<N, 3, 3, stride, stride, SUBNET>>>>>;

template <int N, typename SUBNET> using ares = relu<residual<block, N, affine, SUBNET>>;
template <int N, typename SUBNET> using ares_down = relu<residual_down<block, N, affine, SUBNET>>;

template <typename SUBNET> using level1 = ares<512, ares<512, ares_down<512, SUBNET>>>;
template <typename SUBNET> using level2 =
    ares<256, ares<256, ares<256, ares<256, ares<256, ares_down<256, SUBNET>>>>>>;
template <typename SUBNET> using level3 = ares<128, ares<128, ares<128, ares_down<128, SUBNET>>>>;
template <typename SUBNET> using level4 = ares<64, ares<64, ares<64, SUBNET>>>;

using anet_type = loss_multiclass_log<fc<1000, avg_pool_everything<
    level1<level2<level3<level4<
    max_pool<3, 3, 2, 2, relu<affine<con<64, 7, 7, 2, 2,
    input_rgb_image_sized<227>>>>>>>>>>>>;

static const long INPUT_SIZE = 227;

// ------------------------------------------------- dump

struct Dumper {
    std::vector<std::string> lines;  // output to input, reversed at the end
    std::vector<std::vector<float>> blobs;

    void add(const std::string& line, std::vector<float> values = {}) {
        lines.push_back(line);
        blobs.push_back(std::move(values));
    }

    static std::vector<float> values_of(const tensor& t) {
        const float* p = t.host();
        return std::vector<float>(p, p + t.size());
    }

    template <long nf, long nr, long nc, int sy, int sx, int py, int px>
    void operator()(con_<nf, nr, nc, sy, sx, py, px>& l) {
        const tensor& params = l.get_layer_params();
        const long bias = l.bias_is_disabled() ? 0 : 1;
        const long per_filter = (static_cast<long>(params.size()) - bias * l.num_filters()) /
                                l.num_filters();
        const long k = per_filter / (l.nr() * l.nc());
        std::ostringstream s;
        s << "con num_filters=" << l.num_filters() << " k=" << k << " nr=" << l.nr()
          << " nc=" << l.nc() << " stride_y=" << l.stride_y() << " stride_x=" << l.stride_x()
          << " padding_y=" << l.padding_y() << " padding_x=" << l.padding_x()
          << " bias=" << bias;
        add(s.str(), values_of(params));
    }

    void operator()(affine_& l) {
        if (l.is_disabled()) throw std::runtime_error("a disabled affine layer");
        if (l.get_mode() != CONV_MODE) throw std::runtime_error("an affine layer in FC_MODE");
        std::vector<float> v = values_of(l.get_gamma());
        std::vector<float> b = values_of(l.get_beta());
        std::ostringstream s;
        s << "affine mode=CONV k=" << v.size();
        v.insert(v.end(), b.begin(), b.end());
        add(s.str(), v);
    }

    void operator()(relu_&) { add("relu"); }

    template <long nr, long nc, int sy, int sx, int py, int px>
    void operator()(max_pool_<nr, nc, sy, sx, py, px>& l) {
        add(pool("max_pool", l.nr(), l.nc(), l.stride_y(), l.stride_x(), l.padding_y(),
                 l.padding_x()));
    }

    template <long nr, long nc, int sy, int sx, int py, int px>
    void operator()(avg_pool_<nr, nc, sy, sx, py, px>& l) {
        add(pool("avg_pool", l.nr(), l.nc(), l.stride_y(), l.stride_x(), l.padding_y(),
                 l.padding_x()));
    }

    template <template <typename> class TAG>
    void operator()(add_prev_<TAG>&) {
        add("add_prev tag=" + std::to_string(add_prev_<TAG>::id));
    }

    template <unsigned long no, fc_bias_mode bm>
    void operator()(fc_<no, bm>& l) {
        const tensor& params = l.get_layer_params();
        const long bias = bm == FC_HAS_BIAS ? 1 : 0;
        std::ostringstream s;
        s << "fc num_outputs=" << l.get_num_outputs()
          << " num_inputs=" << params.num_samples() - bias << " bias=" << bias;
        add(s.str(), values_of(params));
    }

    template <typename T>
    void operator()(T&) {
        throw std::runtime_error(std::string("unexpected layer kind ") + typeid(T).name());
    }

    static std::string pool(const char* kind, long nr, long nc, long sy, long sx, long py,
                            long px) {
        std::ostringstream s;
        s << kind << " nr=" << nr << " nc=" << nc << " stride_y=" << sy << " stride_x=" << sx
          << " padding_y=" << py << " padding_x=" << px;
        return s.str();
    }
};

static void load(const std::string& model, anet_type& net, std::vector<std::string>& labels) {
    deserialize(model) >> net >> labels;
}

static int dump(const std::string& model, const std::string& out_dir) {
    anet_type net;
    std::vector<std::string> labels;
    load(model, net, labels);

    Dumper d;
    visit_computational_layers(net, [&d](auto& l) { d(l); });
    std::reverse(d.lines.begin(), d.lines.end());
    std::reverse(d.blobs.begin(), d.blobs.end());

    const auto& in = net.input_layer();
    char buf[256];
    std::snprintf(buf, sizeof buf,
                  "input_rgb_image_sized nr=%ld nc=%ld avg_red=%.9g avg_green=%.9g "
                  "avg_blue=%.9g scale=256",
                  INPUT_SIZE, INPUT_SIZE, in.get_avg_red(), in.get_avg_green(),
                  in.get_avg_blue());

    std::ofstream txt(out_dir + "/layers.txt");
    std::ofstream bin(out_dir + "/params.f32", std::ios::binary);
    txt << "0 " << buf << " offset=0 count=0\n";
    long offset = 0;
    for (size_t i = 0; i < d.lines.size(); ++i) {
        const auto& v = d.blobs[i];
        txt << i + 1 << " " << d.lines[i] << " offset=" << offset << " count=" << v.size()
            << "\n";
        bin.write(reinterpret_cast<const char*>(v.data()), v.size() * sizeof(float));
        offset += static_cast<long>(v.size());
    }
    std::ofstream lab(out_dir + "/labels.txt");
    for (const auto& s : labels) lab << s << "\n";
    std::ofstream printed(out_dir + "/net.txt");
    printed << net << "\n";
    if (!txt || !bin || !lab || !printed) {
        std::cerr << "dlib_resnet34: cannot write into " << out_dir << "\n";
        return 1;
    }
    std::cout << "dlib_resnet34: " << d.lines.size() << " layers, " << offset
              << " parameters, " << labels.size() << " labels -> " << out_dir << "\n";
    return 0;
}

// ------------------------------------------------- run

static int run(const std::string& model, const std::string& images, long n, long h, long w,
               const std::string& out) {
    if (h != INPUT_SIZE || w != INPUT_SIZE) {
        std::cerr << "dlib_resnet34: images must be " << INPUT_SIZE << "x" << INPUT_SIZE << "\n";
        return 2;
    }
    anet_type net;
    std::vector<std::string> labels;
    load(model, net, labels);
    std::ifstream in(images, std::ios::binary);
    std::ofstream o(out, std::ios::binary);
    const long batch = 16;
    std::vector<unsigned char> buf(h * w * 3);
    resizable_tensor x;
    for (long start = 0; start < n; start += batch) {
        std::vector<matrix<rgb_pixel>> imgs;
        for (long i = start; i < std::min(n, start + batch); ++i) {
            in.read(reinterpret_cast<char*>(buf.data()), buf.size());
            if (!in) {
                std::cerr << "dlib_resnet34: " << images << " is shorter than " << n
                          << " images\n";
                return 2;
            }
            matrix<rgb_pixel> img(h, w);
            for (long r = 0; r < h; ++r)
                for (long c = 0; c < w; ++c) {
                    const unsigned char* p = &buf[(r * w + c) * 3];
                    img(r, c) = rgb_pixel(p[0], p[1], p[2]);
                }
            imgs.push_back(std::move(img));
        }
        net.to_tensor(imgs.begin(), imgs.end(), x);
        const tensor& logits = net.subnet().forward(x);
        o.write(reinterpret_cast<const char*>(logits.host()), logits.size() * sizeof(float));
    }
    if (!o) {
        std::cerr << "dlib_resnet34: cannot write " << out << "\n";
        return 1;
    }
    return 0;
}

int main(int argc, char** argv) try {
    const std::string cmd = argc > 1 ? argv[1] : "";
    if (cmd == "dump" && argc == 4) return dump(argv[2], argv[3]);
    if (cmd == "run" && argc == 8)
        return run(argv[2], argv[3], std::stol(argv[4]), std::stol(argv[5]),
                   std::stol(argv[6]), argv[7]);
    std::cerr << "usage: dlib_resnet34 dump MODEL OUT_DIR\n"
                 "       dlib_resnet34 run MODEL IMAGES N H W OUT\n";
    return 2;
} catch (std::exception& e) {
    std::cerr << "dlib_resnet34: error: " << e.what() << "\n";
    return 1;
}
