// CPU kernels for the mskd:: crop/ROI operators (at::parallel_for over output rows or
// gradient planes; each thread writes disjoint memory, so no atomics). Inputs of any layout are
// read through their strides. Summation orders match torchvision's CPU kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../crops.h"
#include "../geometry.h"

namespace mskd {
namespace {

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// One bilinear sample: offsets of its 4 neighbours inside a channel plane and their weights.
template <typename T>
struct Sample {
  int64_t o1, o2, o3, o4;
  T w1, w2, w3, w4;
};

// Valid y taps of output row ph (at most grid_h of them).
template <typename T>
void row_taps(const AlignGeom<T>& g, int64_t ph, int64_t H, std::vector<Tap<T>>& taps) {
  taps.clear();
  for (int64_t iy = 0; iy < g.grid_h; ++iy) {
    Tap<T> t;
    if (make_tap(sample_coord(g.start_h, ph, g.bin_h, iy, g.grid_h), H, t)) taps.push_back(t);
  }
}

// x taps of every output column of one box (grid_w per column), rebuilt only when the box changes.
template <typename T>
struct ColumnTaps {
  int64_t box = -1;
  std::vector<Tap<T>> taps;
  std::vector<char> ok;

  void build(const AlignGeom<T>& g, int64_t n, int64_t OW, int64_t W) {
    if (box == n) return;
    box = n;
    taps.resize(static_cast<size_t>(OW * g.grid_w));
    ok.resize(taps.size());
    for (int64_t pw = 0; pw < OW; ++pw) {
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        const int64_t k = pw * g.grid_w + ix;
        ok[k] = make_tap(sample_coord(g.start_w, pw, g.bin_w, ix, g.grid_w), W, taps[k]);
      }
    }
  }
};

// All valid samples of bin (ph, pw), in torchvision's order (iy outer, ix inner); offsets use the
// plane strides (sh, sw).
template <typename T>
void bin_samples(const std::vector<Tap<T>>& ytaps, const ColumnTaps<T>& cols, int64_t pw, int64_t grid_w, int64_t sh,
                 int64_t sw, std::vector<Sample<T>>& out) {
  out.resize(ytaps.size() * static_cast<size_t>(grid_w));
  size_t m = 0;
  for (const Tap<T>& ty : ytaps) {
    for (int64_t k = pw * grid_w; k < (pw + 1) * grid_w; ++k) {
      if (!cols.ok[k]) continue;
      const Tap<T>& tx = cols.taps[k];
      out[m++] = {ty.lo * sh + tx.lo * sw, ty.lo * sh + tx.hi * sw, ty.hi * sh + tx.lo * sw, ty.hi * sh + tx.hi * sw,
                  ty.wlo * tx.wlo, ty.wlo * tx.whi, ty.whi * tx.wlo, ty.whi * tx.whi};
    }
  }
  out.resize(m);
}

int64_t row_grain(int64_t per_row) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, per_row)); }

// The innermost loops live in small functions: inlined into the big parallel lambdas they ran
// 2-3x slower (register spills).

// One output pixel, all channels: average of the bilinear samples, then the optional normalisation.
template <typename in_t, typename out_t, typename T>
void align_pixel(const in_t* __restrict__ img, int64_t C, int64_t sc, const Sample<T>* __restrict__ smp, int64_t ns,
                 T count, const T* mean, const T* stdev, out_t* __restrict__ op, int64_t osc) {
  for (int64_t c = 0; c < C; ++c) {
    const in_t* plane = img + c * sc;
    T v = T(0);
    for (int64_t k = 0; k < ns; ++k) {
      const Sample<T>& s = smp[k];
      v += s.w1 * static_cast<T>(plane[s.o1]) + s.w2 * static_cast<T>(plane[s.o2]) +
           s.w3 * static_cast<T>(plane[s.o3]) + s.w4 * static_cast<T>(plane[s.o4]);
    }
    if (count != T(1)) v /= count;  // v / 1 == v exactly: skip the division of the crop path
    if (mean != nullptr) v = v - mean[c];
    if (stdev != nullptr) v = v / stdev[c];
    op[c * osc] = static_cast<out_t>(v);
  }
}

template <typename in_t, typename out_t>
void align_forward_impl(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                        const at::Tensor& out, const at::Tensor& mean, const at::Tensor& stdev) {
  using T = acc_t<in_t>;
  const int64_t N = out.size(0), C = out.size(1), OH = out.size(2), OW = out.size(3);
  const int64_t H = input.size(2), W = input.size(3);
  const Strides is = strides_of(input), os = strides_of(out);
  const in_t* in = input.data_ptr<in_t>();
  const T* r = rois.data_ptr<T>();
  out_t* o = out.data_ptr<out_t>();
  const T* mp = mean.defined() ? mean.data_ptr<T>() : nullptr;
  const T* sp = stdev.defined() ? stdev.data_ptr<T>() : nullptr;
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, N * OH, row_grain(OW * C), [&](int64_t begin, int64_t end) {
    std::vector<Tap<T>> ytaps;
    ColumnTaps<T> cols;
    std::vector<Sample<T>> samples;
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / OH, ph = row % OH;
      const T* box = r + 4 * n;
      const in_t* img = in + (n / S) * is.n;
      out_t* orow = o + n * os.n + ph * os.h;
      if (!box_ok(box)) {
        for (int64_t pw = 0; pw < OW; ++pw)
          for (int64_t c = 0; c < C; ++c) orow[pw * os.w + c * os.c] = static_cast<out_t>(NAN);
        continue;
      }
      const AlignGeom<T> g = align_geom(box, sc, OH, OW, sampling);
      row_taps(g, ph, H, ytaps);
      cols.build(g, n, OW, W);
      for (int64_t pw = 0; pw < OW; ++pw) {
        bin_samples(ytaps, cols, pw, g.grid_w, is.h, is.w, samples);
        align_pixel(img, C, is.c, samples.data(), static_cast<int64_t>(samples.size()), g.count, mp, sp,
                    orow + pw * os.w, os.c);
      }
    }
  });
}

// Iterates the (image, channel-range) pieces of a parallel_for chunk over B * C planes.
template <typename F>
void for_plane_ranges(int64_t C, int64_t begin, int64_t end, const F& f) {
  int64_t i = begin;
  while (i < end) {
    const int64_t b = i / C, c0 = i % C, c1 = std::min(C, c0 + (end - i));
    f(b, c0, c1);
    i += c1 - c0;
  }
}

// Scatter one output pixel's gradient (channels c0..c1) into the accumulator planes.
template <typename grad_t, typename T>
void align_scatter(const grad_t* __restrict__ g, int64_t gsc, T* __restrict__ acc, int64_t asc, int64_t c0, int64_t c1,
                   const Sample<T>* __restrict__ smp, int64_t ns, T count, const T* stdev) {
  for (int64_t c = c0; c < c1; ++c) {
    T gv = static_cast<T>(g[c * gsc]);
    if (stdev != nullptr) gv = gv / stdev[c];
    T* plane = acc + c * asc;
    for (int64_t k = 0; k < ns; ++k) {
      const Sample<T>& s = smp[k];
      plane[s.o1] += gv * s.w1 / count;
      plane[s.o2] += gv * s.w2 / count;
      plane[s.o3] += gv * s.w3 / count;
      plane[s.o4] += gv * s.w4 / count;
    }
  }
}

template <typename grad_t>
void align_backward_impl(const at::Tensor& grad, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                         const at::Tensor& acc, const at::Tensor& stdev) {
  using T = acc_t<grad_t>;
  const int64_t C = grad.size(1), OH = grad.size(2), OW = grad.size(3);
  const int64_t B = acc.size(0), H = acc.size(2), W = acc.size(3);
  const Strides gs = strides_of(grad), as = strides_of(acc);
  const grad_t* gp = grad.data_ptr<grad_t>();
  const T* r = rois.data_ptr<T>();
  T* ap = acc.data_ptr<T>();
  const T* sp = stdev.defined() ? stdev.data_ptr<T>() : nullptr;
  const T sc = static_cast<T>(scale);
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    std::vector<Tap<T>> ytaps;
    ColumnTaps<T> cols;
    std::vector<Sample<T>> samples;
    for_plane_ranges(C, begin, end, [&](int64_t b, int64_t c0, int64_t c1) {
      for (int64_t n = b * S; n < (b + 1) * S; ++n) {
        const T* box = r + 4 * n;
        if (!box_ok(box)) continue;
        const AlignGeom<T> g = align_geom(box, sc, OH, OW, sampling);
        cols.build(g, n, OW, W);
        for (int64_t ph = 0; ph < OH; ++ph) {
          row_taps(g, ph, H, ytaps);
          if (ytaps.empty()) continue;
          for (int64_t pw = 0; pw < OW; ++pw) {
            bin_samples(ytaps, cols, pw, g.grid_w, as.h, as.w, samples);
            align_scatter(gp + n * gs.n + ph * gs.h + pw * gs.w, gs.c, ap + b * as.n, as.c, c0, c1, samples.data(),
                          static_cast<int64_t>(samples.size()), g.count, sp);
          }
        }
      }
    });
  });
}

// Max over the cells [h0, h1) x [w0, w1) of every channel (torchvision's order and tie rule).
template <typename scalar_t, typename T>
void max_cells(const scalar_t* __restrict__ img, int64_t C, int64_t sc, int64_t sh, int64_t sw, int64_t h0, int64_t h1,
               int64_t w0, int64_t w1, int64_t W, T init, scalar_t* __restrict__ out, int64_t osc,
               int32_t* __restrict__ am, int64_t asc) {
  for (int64_t c = 0; c < C; ++c) {
    const scalar_t* plane = img + c * sc;
    T best = init;
    int32_t idx = -1;
    for (int64_t h = h0; h < h1; ++h) {
      const scalar_t* row = plane + h * sh;
      const int32_t base = static_cast<int32_t>(h * W);
      for (int64_t w = w0; w < w1; ++w) {
        const T v = static_cast<T>(row[w * sw]);
        if (v > best) {
          best = v;
          idx = base + static_cast<int32_t>(w);
        }
      }
    }
    out[c * osc] = static_cast<scalar_t>(best);
    am[c * asc] = idx;
  }
}

template <typename scalar_t>
void max_forward_impl(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, const at::Tensor& out,
                      const at::Tensor& argmax) {
  using T = acc_t<scalar_t>;
  const int64_t N = out.size(0), C = out.size(1), OH = out.size(2), OW = out.size(3);
  const int64_t H = input.size(2), W = input.size(3);
  const Strides is = strides_of(input), os = strides_of(out), xs = strides_of(argmax);
  const scalar_t* in = input.data_ptr<scalar_t>();
  const T* r = rois.data_ptr<T>();
  scalar_t* o = out.data_ptr<scalar_t>();
  int32_t* am = argmax.data_ptr<int32_t>();
  const T sc = static_cast<T>(scale);
  const T lowest = static_cast<T>(-std::numeric_limits<float>::max());  // torchvision's -FLT_MAX
  at::parallel_for(0, N * OH, row_grain(OW * C), [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t n = row / OH, ph = row % OH;
      const T* box = r + 4 * n;
      if (!box_ok(box)) {
        for (int64_t pw = 0; pw < OW; ++pw)
          for (int64_t c = 0; c < C; ++c) {
            o[n * os.n + c * os.c + ph * os.h + pw * os.w] = static_cast<scalar_t>(NAN);
            am[n * xs.n + c * xs.c + ph * xs.h + pw * xs.w] = -1;
          }
        continue;
      }
      const MaxGeom<T> g = max_geom(box, sc, OH, OW);
      int64_t h0, h1;
      max_bin(g.start_h, g.bin_h, ph, H, h0, h1);
      for (int64_t pw = 0; pw < OW; ++pw) {
        int64_t w0, w1;
        max_bin(g.start_w, g.bin_w, pw, W, w0, w1);
        const T init = (h1 <= h0 || w1 <= w0) ? T(0) : lowest;
        max_cells(in + (n / S) * is.n, C, is.c, is.h, is.w, h0, h1, w0, w1, W, init,
                  o + n * os.n + ph * os.h + pw * os.w, os.c, am + n * xs.n + ph * xs.h + pw * xs.w, xs.c);
      }
    }
  });
}

// Route one output pixel's gradient (channels c0..c1) to the argmax cells. `dense`: the planes are
// dense in (h, w), so cell h * W + w sits at offset idx * sw (no division).
template <typename grad_t, typename T>
void max_scatter(const grad_t* __restrict__ g, int64_t gsc, const int32_t* __restrict__ am, int64_t xsc,
                 T* __restrict__ acc, int64_t asc, int64_t c0, int64_t c1, int64_t H, int64_t W, int64_t sh,
                 int64_t sw) {
  const bool dense = sh == W * sw;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t idx = am[c * xsc];
    if (idx < 0 || idx >= H * W) continue;
    const int64_t off = dense ? idx * sw : (idx / W) * sh + (idx % W) * sw;
    acc[c * asc + off] += static_cast<T>(g[c * gsc]);
  }
}

template <typename grad_t>
void max_backward_impl(const at::Tensor& grad, const at::Tensor& argmax, int64_t S, const at::Tensor& acc) {
  using T = acc_t<grad_t>;
  const int64_t C = grad.size(1), OH = grad.size(2), OW = grad.size(3);
  const int64_t B = acc.size(0), H = acc.size(2), W = acc.size(3);
  const Strides gs = strides_of(grad), xs = strides_of(argmax), as = strides_of(acc);
  const grad_t* gp = grad.data_ptr<grad_t>();
  const int32_t* am = argmax.data_ptr<int32_t>();
  T* ap = acc.data_ptr<T>();
  at::parallel_for(0, B * C, 1, [&](int64_t begin, int64_t end) {
    for_plane_ranges(C, begin, end, [&](int64_t b, int64_t c0, int64_t c1) {
      for (int64_t n = b * S; n < (b + 1) * S; ++n) {
        for (int64_t ph = 0; ph < OH; ++ph) {
          for (int64_t pw = 0; pw < OW; ++pw) {
            max_scatter(gp + n * gs.n + ph * gs.h + pw * gs.w, gs.c, am + n * xs.n + ph * xs.h + pw * xs.w, xs.c,
                        ap + b * as.n, as.c, c0, c1, H, W, as.h, as.w);
          }
        }
      }
    });
  });
}

}  // namespace

void align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                       const at::Tensor& out, const at::Tensor& mean, const at::Tensor& stdev) {
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, input.scalar_type(), "mskd_align_fwd_cpu", [&] {
    using in_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "mskd_align_fwd_cpu_out", [&] {
      align_forward_impl<in_t, scalar_t>(input, rois, S, scale, sampling, out, mean, stdev);
    });
  });
}

void align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                        const at::Tensor& acc, const at::Tensor& stdev) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mskd_align_bwd_cpu", [&] {
    align_backward_impl<scalar_t>(grad, rois, S, scale, sampling, acc, stdev);
  });
}

void max_forward_cpu(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, const at::Tensor& out,
                     const at::Tensor& argmax) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mskd_max_fwd_cpu", [&] {
    max_forward_impl<scalar_t>(input, rois, S, scale, out, argmax);
  });
}

void max_backward_cpu(const at::Tensor& grad, const at::Tensor& argmax, int64_t S, const at::Tensor& acc) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mskd_max_bwd_cpu", [&] {
    max_backward_impl<scalar_t>(grad, argmax, S, acc);
  });
}

}  // namespace mskd
