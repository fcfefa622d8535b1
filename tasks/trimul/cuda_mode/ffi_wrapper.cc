// Trusted XLA FFI glue for an agent's CUDA TriMul: calls the agent's trimul_launch on XLA's stream.
// The output arrives NaN-filled and aliased to the result, so anything the kernel leaves unwritten
// is NaN, never a stale result.
#include <cuda_runtime.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

extern "C" cudaError_t trimul_launch(cudaStream_t stream, const float* x, const float* mask, const float* norm_w,
                                     const float* norm_b, const float* w_in_t, const float* out_norm_w,
                                     const float* out_norm_b, const float* w_out_t, float* out, int batch, int n,
                                     int c_dim, int h_dim);

static ffi::Error AgentTriMulImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mask,
                                  ffi::Buffer<ffi::F32> norm_w, ffi::Buffer<ffi::F32> norm_b,
                                  ffi::Buffer<ffi::F32> w_in_t, ffi::Buffer<ffi::F32> out_norm_w,
                                  ffi::Buffer<ffi::F32> out_norm_b, ffi::Buffer<ffi::F32> w_out_t,
                                  ffi::Buffer<ffi::F32> /*poisoned*/, ffi::ResultBuffer<ffi::F32> out) {
  const auto dims = x.dimensions();
  if (dims.size() != 4 || dims[1] != dims[2]) return ffi::Error::InvalidArgument("x must be [B, N, N, C]");
  const int h_dim = static_cast<int>(out_norm_w.element_count());
  const cudaError_t err = trimul_launch(stream, x.typed_data(), mask.typed_data(), norm_w.typed_data(),
                                        norm_b.typed_data(), w_in_t.typed_data(), out_norm_w.typed_data(),
                                        out_norm_b.typed_data(), w_out_t.typed_data(), out->typed_data(),
                                        static_cast<int>(dims[0]), static_cast<int>(dims[1]),
                                        static_cast<int>(dims[3]), h_dim);
  if (err != cudaSuccess) return ffi::Error::Internal(cudaGetErrorString(err));
  return ffi::Error::Success();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(AgentTriMul, AgentTriMulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
