// Schemas and device-generic entry points of the mskd:: crop/ROI operators.
//
// This is the only TORCH_LIBRARY(mskd, ...) block in C++ (Triton ops join the namespace from
// Python with a FRAGMENT). Each entry point validates its arguments (errors name the argument and
// raise ValueError/TypeError in Python), allocates the output, optionally poisons it with NaN
// (environment variable MSKD_FAST_POISON=1, used by the tests so that an element a kernel fails to
// write cannot pass), and calls the CPU or CUDA launcher. Fake (meta) kernels and autograd
// formulas are registered from Python in mskd_fast/ops/crops.py.
//
// Box values: on CPU every box is checked (finite, x2 >= x1, y2 >= y1) and std must be non-zero.
// On CUDA those checks would need a host sync, so they run only with MSKD_FAST_STRICT=1; without
// it a crop whose box is invalid comes out as NaN (never silently wrong).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "crops.h"

namespace mskd {
namespace {

bool env_flag(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr && v[0] != '\0' && std::string(v) != "0";
}

bool is_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

void check_4d(const at::Tensor& t, const char* name, const char* layout) {
  TORCH_CHECK_VALUE(t.dim() == 4, name, " must have shape ", layout, " (4 dims), got ", t.sizes());
}

void check_same_device(const at::Tensor& t, const char* name, const at::Tensor& ref, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), name, " must be on the same device as ", ref_name, " (",
                    ref.device(), "), got ", t.device());
}

// boxes (B, S, 4) floating -> rois (B*S, 4) contiguous in `dtype`.
at::Tensor boxes_to_rois(const at::Tensor& boxes, int64_t B, const at::Tensor& ref, const char* ref_name,
                         at::ScalarType dtype) {
  TORCH_CHECK_VALUE(boxes.dim() == 3 && boxes.size(2) == 4, "boxes must have shape (B, S, 4), got ", boxes.sizes());
  TORCH_CHECK_VALUE(boxes.size(0) == B, "boxes must hold one row of boxes per image: boxes.shape[0] = ",
                    boxes.size(0), " but ", ref_name, " has batch size ", B);
  TORCH_CHECK_TYPE(is_float(boxes.scalar_type()), "boxes must be a floating tensor, got ", boxes.scalar_type());
  check_same_device(boxes, "boxes", ref, ref_name);
  return boxes.reshape({boxes.size(0) * boxes.size(1), 4}).to(dtype).contiguous();
}

bool check_values_here(const at::Tensor& t) { return !t.is_cuda() || env_flag("MSKD_FAST_STRICT"); }

// Finite, non-inverted boxes (CPU always; CUDA only in strict mode since it syncs).
void check_box_values(const at::Tensor& rois, int64_t S) {
  if (!check_values_here(rois) || rois.numel() == 0) return;
  const at::Tensor r = rois.to(at::kCPU, at::kDouble).contiguous();
  const double* p = r.data_ptr<double>();
  for (int64_t n = 0; n < r.size(0); ++n) {
    const double* b = p + 4 * n;
    for (int k = 0; k < 4; ++k) {
      TORCH_CHECK_VALUE(std::isfinite(b[k]), "boxes must be finite, boxes[", n / S, ", ", n % S, "] = (", b[0], ", ",
                        b[1], ", ", b[2], ", ", b[3], ")");
    }
    TORCH_CHECK_VALUE(b[2] >= b[0] && b[3] >= b[1], "boxes must satisfy x2 >= x1 and y2 >= y1, boxes[", n / S, ", ",
                      n % S, "] = (", b[0], ", ", b[1], ", ", b[2], ", ", b[3], ")");
  }
}

// Optional per-channel mean/std (C,) -> contiguous `dtype`, or an undefined tensor.
at::Tensor channel_vector(const std::optional<at::Tensor>& v, const char* name, int64_t C, const at::Tensor& ref,
                          const char* ref_name, at::ScalarType dtype) {
  if (!v.has_value() || !v->defined()) return at::Tensor();
  TORCH_CHECK_TYPE(is_float(v->scalar_type()), name, " must be a floating tensor, got ", v->scalar_type());
  TORCH_CHECK_VALUE(v->dim() == 1 && v->size(0) == C, name, " must have one value per channel, shape (", C,
                    ",), got ", v->sizes());
  check_same_device(*v, name, ref, ref_name);
  at::Tensor out = v->to(dtype).contiguous();
  if (std::string(name) == "std" && check_values_here(out)) {
    TORCH_CHECK_VALUE(!out.eq(0).any().item<bool>(), "std must be non-zero, got ", out.to(at::kCPU));
  }
  return out;
}

void maybe_poison(const at::Tensor& out) {
  if (env_flag("MSKD_FAST_POISON") && out.numel() > 0) {
    if (at::isFloatingType(out.scalar_type())) {
      out.fill_(std::numeric_limits<double>::quiet_NaN());
    } else {
      out.fill_(-2);
    }
  }
}

at::MemoryFormat format_of(bool channels_last) {
  return channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// Output layout of roi_pool: channels-last when the features are (and are not also plain contiguous).
bool prefers_channels_last(const at::Tensor& t) {
  return t.dim() == 4 && !t.is_contiguous() && t.is_contiguous(at::MemoryFormat::ChannelsLast);
}

void check_positive_size(int64_t v, const char* name) {
  TORCH_CHECK_VALUE(v >= 1, name, " must be >= 1, got ", v);
}

void check_spatial(const at::Tensor& t, const char* name) {
  TORCH_CHECK_VALUE(t.size(1) >= 1 && t.size(2) >= 1 && t.size(3) >= 1, name,
                    " must have at least one channel, row and column, got ", t.sizes());
}

// Gradients are accumulated in acc_dtype; a gradient whose precision class differs is converted.
at::Tensor grad_for(const at::Tensor& grad, at::ScalarType acc) {
  const bool gd = grad.scalar_type() == at::kDouble, ad = acc == at::kDouble;
  return gd == ad ? grad : grad.to(acc);
}

// ------------------------------------------------------------------------------------------ ops

at::Tensor crop_resize(const at::Tensor& images, const at::Tensor& boxes, int64_t out_h, int64_t out_w,
                       at::ScalarType out_dtype, bool channels_last, const std::optional<at::Tensor>& mean,
                       const std::optional<at::Tensor>& stdev) {
  check_4d(images, "images", "(B, C, H, W)");
  const auto in_t = images.scalar_type();
  TORCH_CHECK_TYPE(is_float(in_t) || in_t == at::kByte,
                   "images must be uint8, float16, bfloat16, float32 or float64, got ", in_t);
  TORCH_CHECK_TYPE(is_float(out_dtype), "out_dtype must be a floating dtype, got ", out_dtype);
  check_positive_size(out_h, "out_h");
  check_positive_size(out_w, "out_w");
  check_spatial(images, "images");
  const auto acc = acc_dtype(in_t);
  const int64_t B = images.size(0), C = images.size(1);
  const at::Tensor rois = boxes_to_rois(boxes, B, images, "images", acc);
  const int64_t S = boxes.size(1);
  const at::Tensor m = channel_vector(mean, "mean", C, images, "images", acc);
  const at::Tensor sd = channel_vector(stdev, "std", C, images, "images", acc);
  check_box_values(rois, S);
  at::Tensor out = at::empty({B * S, C, out_h, out_w}, images.options().dtype(out_dtype),
                             format_of(channels_last));
  if (out.numel() == 0) return out;
  maybe_poison(out);
#ifdef MSKD_WITH_CUDA
  if (images.is_cuda()) {
    align_forward_cuda(images, rois, S, 1.0, 1, out, m, sd);
    return out;
  }
#endif
  align_forward_cpu(images, rois, S, 1.0, 1, out, m, sd);
  return out;
}

at::Tensor crop_resize_backward(const at::Tensor& grad, const at::Tensor& boxes, int64_t B, int64_t C, int64_t H,
                                int64_t W, at::ScalarType dtype, bool channels_last,
                                const std::optional<at::Tensor>& stdev) {
  TORCH_CHECK_TYPE(is_float(dtype), "crop_resize_backward: dtype must be floating (the images' dtype), got ", dtype);
  TORCH_CHECK_TYPE(is_float(grad.scalar_type()), "grad must be a floating tensor, got ", grad.scalar_type());
  check_4d(grad, "grad", "(B*S, C, out_h, out_w)");
  const auto acc = acc_dtype(dtype);
  const at::Tensor rois = boxes_to_rois(boxes, B, grad, "grad", acc);
  const int64_t S = boxes.size(1);
  TORCH_CHECK_VALUE(grad.size(0) == B * S && grad.size(1) == C, "grad must have shape (", B * S, ", ", C,
                    ", out_h, out_w), got ", grad.sizes());
  const at::Tensor sd = channel_vector(stdev, "std", C, grad, "grad", acc);
  at::Tensor accum = at::empty({B, C, H, W}, grad.options().dtype(acc), format_of(channels_last)).zero_();
  if (grad.numel() > 0 && accum.numel() > 0) {
    const at::Tensor g = grad_for(grad, acc);
#ifdef MSKD_WITH_CUDA
    if (grad.is_cuda()) {
      align_backward_cuda(g, rois, S, 1.0, 1, accum, sd);
    } else
#endif
    {
      align_backward_cpu(g, rois, S, 1.0, 1, accum, sd);
    }
  }
  return accum.scalar_type() == dtype ? accum : accum.to(dtype);
}

std::tuple<at::Tensor, at::Tensor> roi_pool(const at::Tensor& features, const at::Tensor& boxes,
                                            double spatial_scale, int64_t out_h, int64_t out_w,
                                            c10::string_view mode) {
  check_4d(features, "features", "(B, D, h, w)");
  TORCH_CHECK_TYPE(is_float(features.scalar_type()), "features must be float16, bfloat16, float32 or float64, got ",
                   features.scalar_type());
  TORCH_CHECK_VALUE(mode == "max" || mode == "avg", "mode must be 'max' or 'avg', got '", std::string(mode), "'");
  TORCH_CHECK_VALUE(std::isfinite(spatial_scale) && spatial_scale > 0, "spatial_scale must be finite and > 0, got ",
                    spatial_scale);
  check_positive_size(out_h, "output_size[0]");
  check_positive_size(out_w, "output_size[1]");
  check_spatial(features, "features");
  const auto acc = acc_dtype(features.scalar_type());
  const int64_t B = features.size(0), D = features.size(1);
  const at::Tensor rois = boxes_to_rois(boxes, B, features, "features", acc);
  const int64_t S = boxes.size(1);
  check_box_values(rois, S);
  const auto fmt = format_of(prefers_channels_last(features));
  at::Tensor out = at::empty({B * S, D, out_h, out_w}, features.options(), fmt);
  const bool is_max = mode == "max";
  at::Tensor argmax = is_max ? at::empty({B * S, D, out_h, out_w}, features.options().dtype(at::kInt), fmt)
                             : at::empty({0}, features.options().dtype(at::kInt));
  if (out.numel() == 0) return {out, argmax};
  maybe_poison(out);
  maybe_poison(argmax);
#ifdef MSKD_WITH_CUDA
  if (features.is_cuda()) {
    if (is_max) {
      max_forward_cuda(features, rois, S, spatial_scale, out, argmax);
    } else {
      align_forward_cuda(features, rois, S, spatial_scale, 0, out, at::Tensor(), at::Tensor());
    }
    return {out, argmax};
  }
#endif
  if (is_max) {
    max_forward_cpu(features, rois, S, spatial_scale, out, argmax);
  } else {
    align_forward_cpu(features, rois, S, spatial_scale, 0, out, at::Tensor(), at::Tensor());
  }
  return {out, argmax};
}

at::Tensor roi_pool_backward(const at::Tensor& grad, const at::Tensor& boxes, const at::Tensor& argmax,
                             double spatial_scale, int64_t B, int64_t D, int64_t H, int64_t W, c10::string_view mode,
                             bool channels_last) {
  TORCH_CHECK_TYPE(is_float(grad.scalar_type()), "grad must be a floating tensor, got ", grad.scalar_type());
  check_4d(grad, "grad", "(B*S, D, oh, ow)");
  TORCH_CHECK_VALUE(mode == "max" || mode == "avg", "mode must be 'max' or 'avg', got '", std::string(mode), "'");
  const auto acc = acc_dtype(grad.scalar_type());
  const at::Tensor rois = boxes_to_rois(boxes, B, grad, "grad", acc);
  const int64_t S = boxes.size(1);
  TORCH_CHECK_VALUE(grad.size(0) == B * S && grad.size(1) == D, "grad must have shape (", B * S, ", ", D,
                    ", oh, ow), got ", grad.sizes());
  const bool is_max = mode == "max";
  if (is_max) {
    TORCH_CHECK_VALUE(argmax.sizes() == grad.sizes() && argmax.scalar_type() == at::kInt,
                      "argmax must be int32 with the shape of grad ", grad.sizes(), ", got ", argmax.scalar_type(),
                      " ", argmax.sizes());
    check_same_device(argmax, "argmax", grad, "grad");
  }
  at::Tensor accum = at::empty({B, D, H, W}, grad.options().dtype(acc), format_of(channels_last)).zero_();
  if (grad.numel() > 0 && accum.numel() > 0) {
#ifdef MSKD_WITH_CUDA
    if (grad.is_cuda()) {
      if (is_max) {
        max_backward_cuda(grad, argmax, S, accum);
      } else {
        align_backward_cuda(grad, rois, S, spatial_scale, 0, accum, at::Tensor());
      }
    } else
#endif
    {
      if (is_max) {
        max_backward_cpu(grad, argmax, S, accum);
      } else {
        align_backward_cpu(grad, rois, S, spatial_scale, 0, accum, at::Tensor());
      }
    }
  }
  return accum.scalar_type() == grad.scalar_type() ? accum : accum.to(grad.scalar_type());
}

}  // namespace

TORCH_LIBRARY(mskd, m) {
  m.def(
      "crop_resize(Tensor images, Tensor boxes, SymInt out_h, SymInt out_w, ScalarType out_dtype, "
      "bool channels_last, Tensor? mean, Tensor? std) -> Tensor");
  m.def(
      "crop_resize_backward(Tensor grad, Tensor boxes, SymInt B, SymInt C, SymInt H, SymInt W, ScalarType dtype, "
      "bool channels_last, Tensor? std) -> Tensor");
  m.def(
      "roi_pool(Tensor features, Tensor boxes, float spatial_scale, SymInt out_h, SymInt out_w, str mode) "
      "-> (Tensor, Tensor)");
  m.def(
      "roi_pool_backward(Tensor grad, Tensor boxes, Tensor argmax, float spatial_scale, SymInt B, SymInt D, "
      "SymInt H, SymInt W, str mode, bool channels_last) -> Tensor");
}

TORCH_LIBRARY_IMPL(mskd, CPU, m) {
  m.impl("crop_resize", &crop_resize);
  m.impl("crop_resize_backward", &crop_resize_backward);
  m.impl("roi_pool", &roi_pool);
  m.impl("roi_pool_backward", &roi_pool_backward);
}

#ifdef MSKD_WITH_CUDA
TORCH_LIBRARY_IMPL(mskd, CUDA, m) {
  m.impl("crop_resize", &crop_resize);
  m.impl("crop_resize_backward", &crop_resize_backward);
  m.impl("roi_pool", &roi_pool);
  m.impl("roi_pool_backward", &roi_pool_backward);
}
#endif

}  // namespace mskd
