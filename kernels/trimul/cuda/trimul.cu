// TriMul (AlphaFold3 outgoing triangle multiplicative update) as two XLA FFI handlers.
//
// Three kernels on the caller's stream:
//   prologue     rows of x: LayerNorm(C), the five projections ([C, 5H] weights, pre-transposed
//                so threads read them coalesced), mask and sigmoid gates. left/right are written
//                as [B*H, N, N] (one matrix per (b, h)), the gate as [rows, H]. x is read once.
//   contraction  batched C[g] = A[g] * B[g]^T over g = (b, h), the N^3 H part:
//                SiajaxTriMul: SIMT float32, 64x64 tiles, k tiles of 16, 4x4 outputs per thread;
//                SiajaxTriMulTensorCore: bf16 operands on tensor cores (WMMA 16x16x16, float32
//                accumulation), 64x64 tiles over 4 warps (2x2 fragments each), k stages of 32.
//   epilogue     for 32 consecutive j of one (b, i): gather y[b, :, i, j] (coalesced along j),
//                LayerNorm(H), times the gate, then the [H, C] output projection. out is written once.
// Workspaces come in as extra result buffers so XLA owns all memory. The output buffer arrives as
// an input aliased to the result (filled with NaN by the caller), so a kernel that leaves any of it
// unwritten returns NaN there, never a stale result of an earlier call.

#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <cstdint>
#include <string>
#include <type_traits>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr float kEps = 1e-5f;
constexpr int kPrologueRows = 8;
constexpr int kThreads = 256;

__device__ float WarpSum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Mean and inverse std of row[0:n] with one warp; every lane gets the result.
__device__ void WarpMoments(const float* row, int n, float* mean, float* rstd) {
  const int lane = threadIdx.x & 31;
  float s = 0.f;
  for (int c = lane; c < n; c += 32) s += row[c];
  const float m = WarpSum(s) / n;
  float v = 0.f;
  for (int c = lane; c < n; c += 32) {
    const float d = row[c] - m;
    v += d * d;
  }
  *mean = m;
  *rstd = rsqrtf(WarpSum(v) / n + kEps);
}

__device__ float Sigmoid(float v) { return 1.f / (1.f + __expf(-v)); }

__device__ inline void StoreAs(float* dst, float v) { *dst = v; }
__device__ inline void StoreAs(__nv_bfloat16* dst, float v) { *dst = __float2bfloat16(v); }

template <typename Operand>
__global__ void PrologueKernel(const float* __restrict__ x, const float* __restrict__ mask,
                               const float* __restrict__ ln_w, const float* __restrict__ ln_b,
                               const float* __restrict__ w_in_t, Operand* __restrict__ left_t,
                               Operand* __restrict__ right_t, float* __restrict__ gate, int64_t rows, int n,
                               int c_dim, int h_dim) {
  extern __shared__ float xn[];  // [kPrologueRows, C]
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kPrologueRows;
  const int warp = threadIdx.x / 32;
  for (int r = warp; r < kPrologueRows; r += kThreads / 32) {
    const int64_t row = row0 + r;
    if (row >= rows) continue;
    const float* src = x + row * c_dim;
    float* dst = xn + r * c_dim;
    for (int c = threadIdx.x & 31; c < c_dim; c += 32) dst[c] = src[c];
    __syncwarp();
    float mean, rstd;
    WarpMoments(dst, c_dim, &mean, &rstd);
    for (int c = threadIdx.x & 31; c < c_dim; c += 32) dst[c] = (dst[c] - mean) * rstd * ln_w[c] + ln_b[c];
  }
  __syncthreads();
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int h = threadIdx.x; h < h_dim; h += blockDim.x) {
    float acc[5][kPrologueRows] = {};
    for (int c = 0; c < c_dim; ++c) {
      const float* w = w_in_t + static_cast<int64_t>(c) * 5 * h_dim + h;
#pragma unroll
      for (int p = 0; p < 5; ++p) {
        const float wv = w[p * h_dim];
#pragma unroll
        for (int r = 0; r < kPrologueRows; ++r) acc[p][r] += xn[r * c_dim + c] * wv;
      }
    }
#pragma unroll
    for (int r = 0; r < kPrologueRows; ++r) {
      const int64_t row = row0 + r;
      if (row >= rows) break;
      const int64_t b = row / nn, ik = row % nn;  // ik = i * N + k
      const float m = mask[row];
      const int64_t t = (b * h_dim + h) * nn + ik;
      StoreAs(left_t + t, acc[0][r] * m * Sigmoid(acc[2][r]));
      StoreAs(right_t + t, acc[1][r] * m * Sigmoid(acc[3][r]));
      gate[row * h_dim + h] = Sigmoid(acc[4][r]);
    }
  }
}

constexpr int kTile = 64;
constexpr int kTileK = 16;

// y[g, i, j] = sum_k a[g, i, k] * b[g, j, k]; grid (N/64, N/64, G), 256 threads, 4x4 outputs each.
__global__ void ContractionKernel(const float* __restrict__ a, const float* __restrict__ b, float* __restrict__ y,
                                  int n) {
  __shared__ float as[kTileK][kTile + 4];
  __shared__ float bs[kTileK][kTile + 4];
  const int64_t g = blockIdx.z;
  const int i0 = blockIdx.y * kTile, j0 = blockIdx.x * kTile;
  const float* ag = a + g * n * n;
  const float* bg = b + g * n * n;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float acc[4][4] = {};
  for (int k0 = 0; k0 < n; k0 += kTileK) {
    for (int idx = threadIdx.x; idx < kTile * kTileK; idx += kThreads) {
      const int r = idx / kTileK, k = idx % kTileK;
      const bool in_k = k0 + k < n;
      as[k][r] = (i0 + r < n && in_k) ? ag[static_cast<int64_t>(i0 + r) * n + k0 + k] : 0.f;
      bs[k][r] = (j0 + r < n && in_k) ? bg[static_cast<int64_t>(j0 + r) * n + k0 + k] : 0.f;
    }
    __syncthreads();
#pragma unroll
    for (int k = 0; k < kTileK; ++k) {
      float av[4], bv[4];
#pragma unroll
      for (int q = 0; q < 4; ++q) {
        av[q] = as[k][ty * 4 + q];
        bv[q] = bs[k][tx * 4 + q];
      }
#pragma unroll
      for (int p = 0; p < 4; ++p)
#pragma unroll
        for (int q = 0; q < 4; ++q) acc[p][q] += av[p] * bv[q];
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < 4; ++p) {
    const int i = i0 + ty * 4 + p;
    if (i >= n) continue;
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const int j = j0 + tx * 4 + q;
      if (j < n) y[(g * n + i) * n + j] = acc[p][q];
    }
  }
}

constexpr int kTcTile = 64, kTcK = 32, kTcPad = 8, kTcThreads = 128;

// The same contraction on tensor cores: bf16 A, B tiles in shared memory, WMMA 16x16x16 with float32
// accumulators; warp w owns the 32x32 sub-tile (w / 2, w % 2). Edge tiles are zero-padded on load and
// stored through shared memory with bounds checks, so any N works.
__global__ void ContractionTensorCoreKernel(const __nv_bfloat16* __restrict__ a, const __nv_bfloat16* __restrict__ b,
                                            float* __restrict__ y, int n) {
  using namespace nvcuda;
  __shared__ __align__(32) __nv_bfloat16 as[kTcTile][kTcK + kTcPad];
  __shared__ __align__(32) __nv_bfloat16 bs[kTcTile][kTcK + kTcPad];
  __shared__ __align__(32) float cs[kTcTile][kTcTile + 4];
  const int64_t g = blockIdx.z;
  const int i0 = blockIdx.y * kTcTile, j0 = blockIdx.x * kTcTile;
  const __nv_bfloat16* ag = a + g * n * n;
  const __nv_bfloat16* bg = b + g * n * n;
  const int warp = threadIdx.x / 32, wi = (warp / 2) * 32, wj = (warp % 2) * 32;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int q = 0; q < 2; ++q) wmma::fill_fragment(acc[p][q], 0.f);
  const __nv_bfloat16 zero = __float2bfloat16(0.f);
  for (int k0 = 0; k0 < n; k0 += kTcK) {
    for (int idx = threadIdx.x; idx < kTcTile * kTcK; idx += kTcThreads) {
      const int r = idx / kTcK, k = idx % kTcK;  // consecutive threads read consecutive k
      const bool in_k = k0 + k < n;
      as[r][k] = (i0 + r < n && in_k) ? ag[static_cast<int64_t>(i0 + r) * n + k0 + k] : zero;
      bs[r][k] = (j0 + r < n && in_k) ? bg[static_cast<int64_t>(j0 + r) * n + k0 + k] : zero;
    }
    __syncthreads();
#pragma unroll
    for (int kk = 0; kk < kTcK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> fa[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> fb[2];
#pragma unroll
      for (int p = 0; p < 2; ++p) wmma::load_matrix_sync(fa[p], &as[wi + 16 * p][kk], kTcK + kTcPad);
#pragma unroll
      for (int q = 0; q < 2; ++q) wmma::load_matrix_sync(fb[q], &bs[wj + 16 * q][kk], kTcK + kTcPad);  // B = R^T
#pragma unroll
      for (int p = 0; p < 2; ++p)
#pragma unroll
        for (int q = 0; q < 2; ++q) wmma::mma_sync(acc[p][q], fa[p], fb[q], acc[p][q]);
    }
    __syncthreads();
  }
#pragma unroll
  for (int p = 0; p < 2; ++p)
#pragma unroll
    for (int q = 0; q < 2; ++q)
      wmma::store_matrix_sync(&cs[wi + 16 * p][wj + 16 * q], acc[p][q], kTcTile + 4, wmma::mem_row_major);
  __syncthreads();
  for (int idx = threadIdx.x; idx < kTcTile * kTcTile; idx += kTcThreads) {
    const int r = idx / kTcTile, c = idx % kTcTile;  // coalesced along j
    if (i0 + r < n && j0 + c < n) y[(g * n + i0 + r) * n + j0 + c] = cs[r][c];
  }
}

constexpr int kEpilogueRows = 32;

// grid (ceil(N/32), N, B): rows (b, i, j0..j0+31).
__global__ void EpilogueKernel(const float* __restrict__ y, const float* __restrict__ gate,
                               const float* __restrict__ ln_w, const float* __restrict__ ln_b,
                               const float* __restrict__ w_out_t, float* __restrict__ out, int n, int c_dim,
                               int h_dim) {
  extern __shared__ float tile[];  // [32, H]
  const int64_t b = blockIdx.z, i = blockIdx.y;
  const int j0 = blockIdx.x * kEpilogueRows;
  const int64_t nn = static_cast<int64_t>(n) * n;
  for (int idx = threadIdx.x; idx < kEpilogueRows * h_dim; idx += blockDim.x) {
    const int h = idx / kEpilogueRows, r = idx % kEpilogueRows;  // consecutive threads -> consecutive j
    const int j = j0 + r;
    tile[r * h_dim + h] = j < n ? y[((b * h_dim + h) * n + i) * n + j] : 0.f;
  }
  __syncthreads();
  const int warp = threadIdx.x / 32;
  for (int r = warp; r < kEpilogueRows; r += blockDim.x / 32) {
    const int j = j0 + r;
    if (j >= n) continue;
    float* row = tile + r * h_dim;
    float mean, rstd;
    WarpMoments(row, h_dim, &mean, &rstd);
    const int64_t out_row = b * nn + i * n + j;
    for (int h = threadIdx.x & 31; h < h_dim; h += 32)
      row[h] = ((row[h] - mean) * rstd * ln_w[h] + ln_b[h]) * gate[out_row * h_dim + h];
  }
  __syncthreads();
  for (int c = threadIdx.x; c < c_dim; c += blockDim.x) {
    float acc[kEpilogueRows] = {};
    for (int h = 0; h < h_dim; ++h) {
      const float w = w_out_t[static_cast<int64_t>(h) * c_dim + c];
#pragma unroll
      for (int r = 0; r < kEpilogueRows; ++r) acc[r] += tile[r * h_dim + h] * w;
    }
#pragma unroll
    for (int r = 0; r < kEpilogueRows; ++r) {
      const int j = j0 + r;
      if (j < n) out[(b * nn + i * n + j) * c_dim + c] = acc[r];
    }
  }
}

ffi::Error CheckLaunch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return ffi::Error::Internal(std::string(what) + ": " + cudaGetErrorString(err));
  return ffi::Error::Success();
}

template <typename Operand>
ffi::Error Launch(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mask, ffi::Buffer<ffi::F32> ln_w,
                  ffi::Buffer<ffi::F32> ln_b, ffi::Buffer<ffi::F32> w_in_t, ffi::Buffer<ffi::F32> out_ln_w,
                  ffi::Buffer<ffi::F32> out_ln_b, ffi::Buffer<ffi::F32> w_out_t, float* out, Operand* left_t,
                  Operand* right_t, float* gate, float* y) {
  const auto dims = x.dimensions();
  if (dims.size() != 4 || dims[1] != dims[2]) return ffi::Error::InvalidArgument("x must be [B, N, N, C]");
  const int64_t bsz = dims[0];
  const int n = static_cast<int>(dims[1]), c_dim = static_cast<int>(dims[3]);
  const int h_dim = static_cast<int>(out_ln_w.element_count());
  if (w_in_t.element_count() != static_cast<size_t>(c_dim) * 5 * h_dim)
    return ffi::Error::InvalidArgument("w_in_t must be [C, 5H]");
  if (h_dim > 1024) return ffi::Error::InvalidArgument("hidden dim above 1024 is not supported");
  const int64_t rows = bsz * n * n;

  const size_t prologue_smem = sizeof(float) * kPrologueRows * c_dim;
  if (prologue_smem > 48 * 1024) {
    cudaFuncSetAttribute(PrologueKernel<Operand>, cudaFuncAttributeMaxDynamicSharedMemorySize, prologue_smem);
  }
  PrologueKernel<Operand><<<(rows + kPrologueRows - 1) / kPrologueRows, kThreads, prologue_smem, stream>>>(
      x.typed_data(), mask.typed_data(), ln_w.typed_data(), ln_b.typed_data(), w_in_t.typed_data(), left_t,
      right_t, gate, rows, n, c_dim, h_dim);
  if (auto err = CheckLaunch("trimul prologue"); err.failure()) return err;

  if constexpr (std::is_same_v<Operand, float>) {
    const dim3 tiles((n + kTile - 1) / kTile, (n + kTile - 1) / kTile, bsz * h_dim);
    ContractionKernel<<<tiles, kThreads, 0, stream>>>(left_t, right_t, y, n);
  } else {
    const dim3 tiles((n + kTcTile - 1) / kTcTile, (n + kTcTile - 1) / kTcTile, bsz * h_dim);
    ContractionTensorCoreKernel<<<tiles, kTcThreads, 0, stream>>>(left_t, right_t, y, n);
  }
  if (auto err = CheckLaunch("trimul contraction"); err.failure()) return err;

  const size_t epilogue_smem = sizeof(float) * kEpilogueRows * h_dim;
  if (epilogue_smem > 48 * 1024) {
    cudaFuncSetAttribute(EpilogueKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, epilogue_smem);
  }
  const dim3 rows_grid((n + kEpilogueRows - 1) / kEpilogueRows, n, bsz);
  EpilogueKernel<<<rows_grid, kThreads, epilogue_smem, stream>>>(y, gate, out_ln_w.typed_data(),
                                                                 out_ln_b.typed_data(), w_out_t.typed_data(), out,
                                                                 n, c_dim, h_dim);
  return CheckLaunch("trimul epilogue");
}

ffi::Error TriMulImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mask,
                      ffi::Buffer<ffi::F32> ln_w, ffi::Buffer<ffi::F32> ln_b, ffi::Buffer<ffi::F32> w_in_t,
                      ffi::Buffer<ffi::F32> out_ln_w, ffi::Buffer<ffi::F32> out_ln_b, ffi::Buffer<ffi::F32> w_out_t,
                      ffi::Buffer<ffi::F32> /*out_poisoned: aliased to out*/, ffi::ResultBuffer<ffi::F32> out,
                      ffi::ResultBuffer<ffi::F32> left_t, ffi::ResultBuffer<ffi::F32> right_t,
                      ffi::ResultBuffer<ffi::F32> gate, ffi::ResultBuffer<ffi::F32> y) {
  return Launch<float>(stream, x, mask, ln_w, ln_b, w_in_t, out_ln_w, out_ln_b, w_out_t, out->typed_data(),
                       left_t->typed_data(), right_t->typed_data(), gate->typed_data(), y->typed_data());
}

ffi::Error TriMulTensorCoreImpl(cudaStream_t stream, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> mask,
                                ffi::Buffer<ffi::F32> ln_w, ffi::Buffer<ffi::F32> ln_b, ffi::Buffer<ffi::F32> w_in_t,
                                ffi::Buffer<ffi::F32> out_ln_w, ffi::Buffer<ffi::F32> out_ln_b,
                                ffi::Buffer<ffi::F32> w_out_t, ffi::Buffer<ffi::F32> /*out_poisoned*/,
                                ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::BF16> left_t,
                                ffi::ResultBuffer<ffi::BF16> right_t, ffi::ResultBuffer<ffi::F32> gate,
                                ffi::ResultBuffer<ffi::F32> y) {
  return Launch<__nv_bfloat16>(stream, x, mask, ln_w, ln_b, w_in_t, out_ln_w, out_ln_b, w_out_t, out->typed_data(),
                               reinterpret_cast<__nv_bfloat16*>(left_t->typed_data()),
                               reinterpret_cast<__nv_bfloat16*>(right_t->typed_data()), gate->typed_data(),
                               y->typed_data());
}

}  // namespace

#define SIAJAX_TRIMUL_BINDING(OPERAND)                                                      \
  ffi::Ffi::Bind()                                                                           \
      .Ctx<ffi::PlatformStream<cudaStream_t>>()                                              \
      .Arg<ffi::Buffer<ffi::F32>>() /* x [B, N, N, C] */                                     \
      .Arg<ffi::Buffer<ffi::F32>>() /* mask [B, N, N] */                                     \
      .Arg<ffi::Buffer<ffi::F32>>() /* norm.weight [C] */                                    \
      .Arg<ffi::Buffer<ffi::F32>>() /* norm.bias [C] */                                      \
      .Arg<ffi::Buffer<ffi::F32>>() /* projections, transposed [C, 5H] */                    \
      .Arg<ffi::Buffer<ffi::F32>>() /* to_out_norm.weight [H] */                             \
      .Arg<ffi::Buffer<ffi::F32>>() /* to_out_norm.bias [H] */                               \
      .Arg<ffi::Buffer<ffi::F32>>() /* to_out.weight, transposed [H, C] */                   \
      .Arg<ffi::Buffer<ffi::F32>>() /* out, NaN-filled, aliased to the first result */       \
      .Ret<ffi::Buffer<ffi::F32>>() /* out [B, N, N, C] */                                   \
      .Ret<ffi::Buffer<OPERAND>>()  /* workspace: left [B*H, N, N] */                        \
      .Ret<ffi::Buffer<OPERAND>>()  /* workspace: right [B*H, N, N] */                       \
      .Ret<ffi::Buffer<ffi::F32>>() /* workspace: gate [B*N*N, H] */                         \
      .Ret<ffi::Buffer<ffi::F32>>() /* workspace: y [B*H, N, N] */

XLA_FFI_DEFINE_HANDLER_SYMBOL(SiajaxTriMul, TriMulImpl, SIAJAX_TRIMUL_BINDING(ffi::F32));
XLA_FFI_DEFINE_HANDLER_SYMBOL(SiajaxTriMulTensorCore, TriMulTensorCoreImpl, SIAJAX_TRIMUL_BINDING(ffi::BF16));
