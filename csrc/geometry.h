// Sampling geometry shared by the CPU and CUDA kernels. Every formula mirrors torchvision's
// roi_align / roi_pool kernels term by term (same operation order), so results agree to the
// last bit or ulp; see csrc/README.md for the semantics.
#pragma once

#include <cmath>
#include <cstdint>

#ifdef __CUDACC__
#define MSKD_HD __host__ __device__ __forceinline__
#else
#define MSKD_HD inline
#endif

namespace mskd {

// Accumulation type: double for double inputs, float for everything else (uint8/half/bfloat16/float).
template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };
template <typename T> using acc_t = typename Acc<T>::type;

// A box (x1, y1, x2, y2) the kernels can sample from: finite and not inverted. The op validates
// boxes before launching on CPU; on CUDA (no host sync) a failing box makes its outputs NaN.
template <typename T>
MSKD_HD bool box_ok(const T* box) {
  for (int i = 0; i < 4; ++i) {
    if (!(box[i] == box[i]) || box[i] - box[i] != T(0)) return false;  // NaN or +-inf
  }
  return box[2] >= box[0] && box[3] >= box[1];
}

// One axis of a bilinear tap: indices of the two neighbours and their weights
// (torchvision: hy/ly for y, hx/lx for x).
template <typename T>
struct Tap {
  int64_t lo, hi;
  T wlo, whi;
};

// torchvision bilinear_interpolate along one axis. Returns false when the sample lies outside
// [-1, size] (the whole sample then contributes 0). NaN coordinates also return false.
template <typename T>
MSKD_HD bool make_tap(T c, int64_t size, Tap<T>& t) {
  if (!(c >= T(-1) && c <= static_cast<T>(size))) return false;
  if (c <= T(0)) c = T(0);
  int64_t lo = static_cast<int64_t>(c);
  int64_t hi;
  if (lo >= size - 1) {
    hi = lo = size - 1;
    c = static_cast<T>(lo);
  } else {
    hi = lo + 1;
  }
  const T l = c - static_cast<T>(lo);
  t.lo = lo;
  t.hi = hi;
  t.wlo = T(1) - l;
  t.whi = l;
  return true;
}

// roi_align(aligned=True) geometry of one box.
template <typename T>
struct AlignGeom {
  T start_h, start_w, bin_h, bin_w, count;
  int64_t grid_h, grid_w;
};

// Adaptive grid size ceil(extent / bins); clamped to 1 << 16 only to keep the float -> int
// conversion defined for absurd boxes (torchvision leaves that undefined).
template <typename T>
MSKD_HD int64_t adaptive_grid(T extent, int64_t bins) {
  const T g = ceil(extent / static_cast<T>(bins));
  if (!(g > T(0))) return 0;
  return g < T(65536) ? static_cast<int64_t>(g) : int64_t(65536);
}

template <typename T>
MSKD_HD AlignGeom<T> align_geom(const T* box, T scale, int64_t out_h, int64_t out_w, int64_t sampling) {
  AlignGeom<T> g;
  const T offset = T(0.5);
  g.start_w = box[0] * scale - offset;
  g.start_h = box[1] * scale - offset;
  const T end_w = box[2] * scale - offset;
  const T end_h = box[3] * scale - offset;
  const T roi_w = end_w - g.start_w;
  const T roi_h = end_h - g.start_h;
  g.bin_h = roi_h / static_cast<T>(out_h);
  g.bin_w = roi_w / static_cast<T>(out_w);
  g.grid_h = sampling > 0 ? sampling : adaptive_grid(roi_h, out_h);
  g.grid_w = sampling > 0 ? sampling : adaptive_grid(roi_w, out_w);
  const int64_t n = g.grid_h * g.grid_w;
  g.count = static_cast<T>(n > 1 ? n : 1);
  return g;
}

// Sample coordinate i (of grid) inside bin p: start + p * bin + (i + .5) * bin / grid.
template <typename T>
MSKD_HD T sample_coord(T start, int64_t p, T bin, int64_t i, int64_t grid) {
  return start + static_cast<T>(p) * bin + static_cast<T>(static_cast<float>(i) + .5f) * bin / static_cast<T>(grid);
}

// roi_pool (max) geometry: rounded box corners on the feature map and the bin size.
template <typename T>
struct MaxGeom {
  int64_t start_h, start_w;
  T bin_h, bin_w;
};

// round() to an integer index; clamped to +-2^40 so absurd boxes stay defined behaviour.
template <typename T>
MSKD_HD int64_t round_index(T v) {
  const T r = round(v);
  const T lim = T(1099511627776.0);
  return static_cast<int64_t>(r < -lim ? -lim : (r > lim ? lim : r));
}

template <typename T>
MSKD_HD int64_t floor_index(T v) {
  const T r = floor(v);
  const T lim = T(1099511627776.0);
  return static_cast<int64_t>(r < -lim ? -lim : (r > lim ? lim : r));
}

template <typename T>
MSKD_HD int64_t ceil_index(T v) {
  const T r = ceil(v);
  const T lim = T(1099511627776.0);
  return static_cast<int64_t>(r < -lim ? -lim : (r > lim ? lim : r));
}

template <typename T>
MSKD_HD MaxGeom<T> max_geom(const T* box, T scale, int64_t out_h, int64_t out_w) {
  MaxGeom<T> g;
  g.start_w = round_index(box[0] * scale);
  g.start_h = round_index(box[1] * scale);
  const int64_t end_w = round_index(box[2] * scale);
  const int64_t end_h = round_index(box[3] * scale);
  const int64_t roi_w = end_w - g.start_w + 1 > 1 ? end_w - g.start_w + 1 : 1;
  const int64_t roi_h = end_h - g.start_h + 1 > 1 ? end_h - g.start_h + 1 : 1;
  g.bin_h = static_cast<T>(roi_h) / static_cast<T>(out_h);
  g.bin_w = static_cast<T>(roi_w) / static_cast<T>(out_w);
  return g;
}

MSKD_HD int64_t clamp_index(int64_t v, int64_t size) { return v < 0 ? 0 : (v > size ? size : v); }

// Half-open range [lo, hi) of feature rows (or columns) pooled by bin p.
template <typename T>
MSKD_HD void max_bin(int64_t start, T bin, int64_t p, int64_t size, int64_t& lo, int64_t& hi) {
  lo = clamp_index(floor_index(static_cast<T>(p) * bin) + start, size);
  hi = clamp_index(ceil_index(static_cast<T>(p + 1) * bin) + start, size);
}

}  // namespace mskd
