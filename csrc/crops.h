// Device kernels behind the mskd:: crop/ROI operators. The operator entry points (ops.cpp)
// validate arguments, allocate outputs and call these launchers; the launchers assume:
//   rois     (N, 4) contiguous, dtype acc_t of the input (float, or double for double inputs),
//            row n = crop s of image n / S (image-major);
//   mean/std (C,) contiguous acc_t or undefined;
//   acc      gradient accumulator (B, C, H, W) of dtype acc_t, zero-filled, any dense layout.
// Every tensor is indexed through its strides, so channels-last inputs are read in place.
#pragma once

#include <ATen/core/Tensor.h>

namespace mskd {

// Bilinear roi_align(aligned=True) forward: out (N, C, oh, ow), any float dtype and layout.
// sampling > 0: fixed sampling grid; sampling <= 0: torchvision's adaptive grid.
void align_forward_cpu(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                       const at::Tensor& out, const at::Tensor& mean, const at::Tensor& stdev);
void align_backward_cpu(const at::Tensor& grad, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                        const at::Tensor& acc, const at::Tensor& stdev);
// roi_pool (max) forward: out (N, C, oh, ow) in the input dtype, argmax int32 (flat h * W + w, -1 when empty).
void max_forward_cpu(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, const at::Tensor& out,
                     const at::Tensor& argmax);
void max_backward_cpu(const at::Tensor& grad, const at::Tensor& argmax, int64_t S, const at::Tensor& acc);

#ifdef MSKD_WITH_CUDA
void align_forward_cuda(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                        const at::Tensor& out, const at::Tensor& mean, const at::Tensor& stdev);
void align_backward_cuda(const at::Tensor& grad, const at::Tensor& rois, int64_t S, double scale, int64_t sampling,
                         const at::Tensor& acc, const at::Tensor& stdev);
void max_forward_cuda(const at::Tensor& input, const at::Tensor& rois, int64_t S, double scale,
                      const at::Tensor& out, const at::Tensor& argmax);
void max_backward_cuda(const at::Tensor& grad, const at::Tensor& argmax, int64_t S, const at::Tensor& acc);
#endif

}  // namespace mskd
