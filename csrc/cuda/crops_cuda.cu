// CUDA kernels for the mskd:: crop/ROI operators. One thread per output (or gradient) element:
// blockIdx.y walks the crops, the x dimension the C * oh * ow elements of one crop (32-bit, checked);
// all memory offsets are 64-bit. Forward kernels are templated on the input type only and store
// through a runtime output-dtype switch (uniform per launch) to keep compile time low. Gradients
// are accumulated with atomicAdd in float (double for double inputs). Everything runs on the
// current stream under a device guard, and every launch is checked.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <limits>

#include "../crops.h"
#include "../geometry.h"

namespace mskd {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxGridY = 65535;

struct Strides {
  int64_t n, c, h, w;
};

Strides strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

// Geometry of one launch: N crops of C x OH x OW elements; out_cl picks the element order
// (channels fastest when the output is channels-last, so writes stay coalesced).
struct Launch {
  int64_t N, S, C, OH, OW;
  bool out_cl;
};

__device__ __forceinline__ void decode(const Launch& L, int e, int64_t& c, int64_t& ph, int64_t& pw) {
  const int C = static_cast<int>(L.C), OH = static_cast<int>(L.OH), OW = static_cast<int>(L.OW);
  if (L.out_cl) {
    c = e % C;
    pw = (e / C) % OW;
    ph = e / (C * OW);
  } else {
    pw = e % OW;
    ph = (e / OW) % OH;
    c = e / (OW * OH);
  }
}

enum OutKind : int { kOutFloat = 0, kOutHalf = 1, kOutBFloat16 = 2, kOutDouble = 3 };

int out_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return kOutFloat;
    case at::kHalf: return kOutHalf;
    case at::kBFloat16: return kOutBFloat16;
    case at::kDouble: return kOutDouble;
    default: TORCH_CHECK_TYPE(false, "unsupported output dtype ", t);
  }
  return kOutFloat;
}

template <typename T>
__device__ __forceinline__ void store(void* out, int64_t off, int kind, T v) {
  switch (kind) {
    case kOutFloat: static_cast<float*>(out)[off] = static_cast<float>(v); break;
    case kOutHalf: static_cast<at::Half*>(out)[off] = static_cast<at::Half>(static_cast<float>(v)); break;
    case kOutBFloat16: static_cast<at::BFloat16*>(out)[off] = static_cast<at::BFloat16>(static_cast<float>(v)); break;
    default: static_cast<double*>(out)[off] = static_cast<double>(v); break;
  }
}

template <typename in_t, typename T>
__device__ __forceinline__ T bilinear(const in_t* __restrict__ plane, const Tap<T>& ty, const Tap<T>& tx, int64_t sh,
                                      int64_t sw) {
  const T v1 = static_cast<T>(plane[ty.lo * sh + tx.lo * sw]);
  const T v2 = static_cast<T>(plane[ty.lo * sh + tx.hi * sw]);
  const T v3 = static_cast<T>(plane[ty.hi * sh + tx.lo * sw]);
  const T v4 = static_cast<T>(plane[ty.hi * sh + tx.hi * sw]);
  return ty.wlo * tx.wlo * v1 + ty.wlo * tx.whi * v2 + ty.whi * tx.wlo * v3 + ty.whi * tx.whi * v4;
}

template <typename in_t>
__global__ void __launch_bounds__(kThreads)
    align_fwd_kernel(const in_t* __restrict__ in, Strides is, int64_t H, int64_t W, const acc_t<in_t>* __restrict__ rois,
                     acc_t<in_t> scale, int64_t sampling, Launch L, void* __restrict__ out, Strides os, int kind,
                     const acc_t<in_t>* __restrict__ mean, const acc_t<in_t>* __restrict__ stdev) {
  using T = acc_t<in_t>;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= static_cast<int>(L.C * L.OH * L.OW)) return;
  int64_t c, ph, pw;
  decode(L, e, c, ph, pw);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    const T* box = rois + 4 * n;
    const int64_t off = n * os.n + c * os.c + ph * os.h + pw * os.w;
    if (!box_ok(box)) {
      store(out, off, kind, static_cast<T>(NAN));
      continue;
    }
    const AlignGeom<T> g = align_geom(box, scale, L.OH, L.OW, sampling);
    const in_t* plane = in + (n / L.S) * is.n + c * is.c;
    T v = T(0);
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      Tap<T> ty;
      if (!make_tap(sample_coord(g.start_h, ph, g.bin_h, iy, g.grid_h), H, ty)) continue;
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        Tap<T> tx;
        if (!make_tap(sample_coord(g.start_w, pw, g.bin_w, ix, g.grid_w), W, tx)) continue;
        v += bilinear(plane, ty, tx, is.h, is.w);
      }
    }
    v /= g.count;
    if (mean != nullptr) v = v - mean[c];
    if (stdev != nullptr) v = v / stdev[c];
    store(out, off, kind, v);
  }
}

template <typename grad_t>
__global__ void __launch_bounds__(kThreads)
    align_bwd_kernel(const grad_t* __restrict__ grad, Strides gs, const acc_t<grad_t>* __restrict__ rois,
                     acc_t<grad_t> scale, int64_t sampling, Launch L, acc_t<grad_t>* __restrict__ acc, Strides as,
                     int64_t H, int64_t W, const acc_t<grad_t>* __restrict__ stdev) {
  using T = acc_t<grad_t>;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= static_cast<int>(L.C * L.OH * L.OW)) return;
  int64_t c, ph, pw;
  decode(L, e, c, ph, pw);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    const T* box = rois + 4 * n;
    if (!box_ok(box)) continue;
    const AlignGeom<T> g = align_geom(box, scale, L.OH, L.OW, sampling);
    T gv = static_cast<T>(grad[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w]);
    if (stdev != nullptr) gv = gv / stdev[c];
    T* plane = acc + (n / L.S) * as.n + c * as.c;
    for (int64_t iy = 0; iy < g.grid_h; ++iy) {
      Tap<T> ty;
      if (!make_tap(sample_coord(g.start_h, ph, g.bin_h, iy, g.grid_h), H, ty)) continue;
      for (int64_t ix = 0; ix < g.grid_w; ++ix) {
        Tap<T> tx;
        if (!make_tap(sample_coord(g.start_w, pw, g.bin_w, ix, g.grid_w), W, tx)) continue;
        atomicAdd(plane + ty.lo * as.h + tx.lo * as.w, gv * (ty.wlo * tx.wlo) / g.count);
        atomicAdd(plane + ty.lo * as.h + tx.hi * as.w, gv * (ty.wlo * tx.whi) / g.count);
        atomicAdd(plane + ty.hi * as.h + tx.lo * as.w, gv * (ty.whi * tx.wlo) / g.count);
        atomicAdd(plane + ty.hi * as.h + tx.hi * as.w, gv * (ty.whi * tx.whi) / g.count);
      }
    }
  }
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
    max_fwd_kernel(const scalar_t* __restrict__ in, Strides is, int64_t H, int64_t W,
                   const acc_t<scalar_t>* __restrict__ rois, acc_t<scalar_t> scale, Launch L,
                   scalar_t* __restrict__ out, Strides os, int32_t* __restrict__ argmax, Strides xs) {
  using T = acc_t<scalar_t>;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= static_cast<int>(L.C * L.OH * L.OW)) return;
  int64_t c, ph, pw;
  decode(L, e, c, ph, pw);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    const T* box = rois + 4 * n;
    const int64_t off = n * os.n + c * os.c + ph * os.h + pw * os.w;
    const int64_t xoff = n * xs.n + c * xs.c + ph * xs.h + pw * xs.w;
    if (!box_ok(box)) {
      out[off] = static_cast<scalar_t>(NAN);
      argmax[xoff] = -1;
      continue;
    }
    const MaxGeom<T> g = max_geom(box, scale, L.OH, L.OW);
    int64_t h0, h1, w0, w1;
    max_bin(g.start_h, g.bin_h, ph, H, h0, h1);
    max_bin(g.start_w, g.bin_w, pw, W, w0, w1);
    const bool empty = h1 <= h0 || w1 <= w0;
    const scalar_t* plane = in + (n / L.S) * is.n + c * is.c;
    T best = empty ? T(0) : static_cast<T>(-3.402823466e+38f);  // torchvision's -FLT_MAX
    int32_t idx = -1;
    for (int64_t h = h0; h < h1; ++h) {
      for (int64_t w = w0; w < w1; ++w) {
        const T v = static_cast<T>(plane[h * is.h + w * is.w]);
        if (v > best) {
          best = v;
          idx = static_cast<int32_t>(h * W + w);
        }
      }
    }
    out[off] = static_cast<scalar_t>(best);
    argmax[xoff] = idx;
  }
}

template <typename grad_t>
__global__ void __launch_bounds__(kThreads)
    max_bwd_kernel(const grad_t* __restrict__ grad, Strides gs, const int32_t* __restrict__ argmax, Strides xs, Launch L,
                   acc_t<grad_t>* __restrict__ acc, Strides as, int64_t H, int64_t W) {
  using T = acc_t<grad_t>;
  const int e = blockIdx.x * blockDim.x + threadIdx.x;
  if (e >= static_cast<int>(L.C * L.OH * L.OW)) return;
  int64_t c, ph, pw;
  decode(L, e, c, ph, pw);
  for (int64_t n = blockIdx.y; n < L.N; n += gridDim.y) {
    const int64_t idx = argmax[n * xs.n + c * xs.c + ph * xs.h + pw * xs.w];
    if (idx < 0 || idx >= H * W) continue;
    const int64_t cell = as.h == W * as.w ? idx * as.w : (idx / W) * as.h + (idx % W) * as.w;
    atomicAdd(acc + (n / L.S) * as.n + c * as.c + cell, static_cast<T>(grad[n * gs.n + c * gs.c + ph * gs.h + pw * gs.w]));
  }
}

// Grid for a launch over L (per-crop element count must fit in 32 bits).
dim3 grid_for(const Launch& L) {
  const int64_t per = L.C * L.OH * L.OW;
  TORCH_CHECK_VALUE(per <= std::numeric_limits<int32_t>::max() - kThreads,
                    "crop/ROI output too large: C * out_h * out_w = ", per, " exceeds 2^31");
  return dim3(static_cast<unsigned>((per + kThreads - 1) / kThreads),
              static_cast<unsigned>(std::min<int64_t>(L.N, kMaxGridY)));
}

Launch launch_of(const at::Tensor& t, int64_t S, bool out_cl) {
  return {t.size(0), S, t.size(1), t.size(2), t.size(3), out_cl};
}

// Element order of a launch: channels fastest when the tensor being written/read is channels-last.
bool channels_fastest(const at::Tensor& t) { return t.stride(1) == 1 && t.size(1) > 1; }

}  // namespace

void align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                        const at::Tensor& out, const at::Tensor& mean, const at::Tensor& stdev) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Launch L = launch_of(out, S, channels_fastest(out));
  const dim3 grid = grid_for(L);
  const int kind = out_kind(out.scalar_type());
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kHalf, at::kBFloat16, at::kByte, input.scalar_type(), "mskd_align_fwd_cuda", [&] {
    using T = acc_t<scalar_t>;
    align_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        input.data_ptr<scalar_t>(), strides_of(input), input.size(2), input.size(3), rois.data_ptr<T>(),
        static_cast<T>(scale), sampling, L, out.data_ptr(), strides_of(out), kind,
        mean.defined() ? mean.data_ptr<T>() : nullptr, stdev.defined() ? stdev.data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                         const at::Tensor& acc, const at::Tensor& stdev) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const Launch L = launch_of(grad, S, channels_fastest(grad));
  const dim3 grid = grid_for(L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mskd_align_bwd_cuda", [&] {
    using T = acc_t<scalar_t>;
    align_bwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        grad.data_ptr<scalar_t>(), strides_of(grad), rois.data_ptr<T>(), static_cast<T>(scale), sampling, L,
        acc.data_ptr<T>(), strides_of(acc), acc.size(2), acc.size(3), stdev.defined() ? stdev.data_ptr<T>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void max_forward_cuda(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, const at::Tensor& out,
                      const at::Tensor& argmax) {
  const c10::cuda::CUDAGuard guard(input.device());
  const Launch L = launch_of(out, S, channels_fastest(out));
  const dim3 grid = grid_for(L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, input.scalar_type(), "mskd_max_fwd_cuda", [&] {
    using T = acc_t<scalar_t>;
    max_fwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        input.data_ptr<scalar_t>(), strides_of(input), input.size(2), input.size(3), rois.data_ptr<T>(),
        static_cast<T>(scale), L, out.data_ptr<scalar_t>(), strides_of(out), argmax.data_ptr<int32_t>(),
        strides_of(argmax));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void max_backward_cuda(const at::Tensor& grad, const at::Tensor& argmax, int64_t S, const at::Tensor& acc) {
  const c10::cuda::CUDAGuard guard(grad.device());
  const Launch L = launch_of(grad, S, channels_fastest(grad));
  const dim3 grid = grid_for(L);
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mskd_max_bwd_cuda", [&] {
    using T = acc_t<scalar_t>;
    max_bwd_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(grad.data_ptr<scalar_t>(), strides_of(grad),
                                                            argmax.data_ptr<int32_t>(), strides_of(argmax), L,
                                                            acc.data_ptr<T>(), strides_of(acc), acc.size(2),
                                                            acc.size(3));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace mskd
