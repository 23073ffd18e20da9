// CUDA recurrence of the fused GRU: one persistent cooperative kernel per direction of time.
//
// Block k owns hidden units [k*U, k*U + U) for every batch row and keeps the slice of W_hh those
// units need in shared memory for the whole sequence (forward: the 3U rows W_h{r,z,n}[j, :];
// backward: the U columns W_hh[:, j]). Each step reads the previous state (B, H) through L2, does
// the GEMV slice and the gate math, then the grid synchronises: T launches of a GEMM and an
// elementwise kernel (cuDNN's standard RNN algorithm) become one launch and T grid barriers.
// The input projection and every weight gradient stay GEMMs (cuBLAS, see gru.cpp).
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <cooperative_groups.h>
#include <torch/library.h>

#include "gru.h"

namespace cg = cooperative_groups;

namespace vosgan {
namespace {

// Threads per block: rows of the batch are spread over the warps, so more warps shorten each
// step's latency chain; blocks with more units per thread hold more accumulators (registers).
template <int U>
constexpr int threads_for() {
  return U == 1 ? 1024 : (U <= 4 ? 512 : 256);
}

__device__ __forceinline__ float warp_sum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

__device__ __forceinline__ float sigmoid(float x) { return 1.0f / (1.0f + __expf(-x)); }

// gi (B, T, 3H), h0 (B, H), w_hh (3H, H), b_hh (3H) -> ws (B, T, 5H), out (B, T, H); fp32.
template <int U, int kThreads = threads_for<U>()>
__global__ void __launch_bounds__(kThreads)
    gru_forward_kernel(const float* __restrict__ gi, const float* __restrict__ h0,
                       const float* __restrict__ w_hh, const float* __restrict__ b_hh,
                       float* ws, float* out, int B, int T, int H) {
  extern __shared__ float w_s[];  // [3][U][H]: rows g*H + j0 + u of w_hh
  cg::grid_group grid = cg::this_grid();
  const int j0 = blockIdx.x * U;
  const int nu = min(U, H - j0);
  for (int i = threadIdx.x; i < 3 * U * H; i += kThreads) {
    const int g = i / (U * H), u = (i / H) % U, k = i % H;
    w_s[i] = u < nu ? w_hh[static_cast<size_t>(g * H + j0 + u) * H + k] : 0.0f;
  }
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int jl = j0 + lane;  // the unit this lane finishes (lanes < nu)
  float bhr = 0.0f, bhz = 0.0f, bhn = 0.0f;
  if (lane < nu) {
    bhr = b_hh[jl];
    bhz = b_hh[H + jl];
    bhn = b_hh[2 * H + jl];
  }
  for (int t = 0; t < T; ++t) {
    for (int b = warp; b < B; b += kWarps) {
      const size_t bt = static_cast<size_t>(b) * T + t;
      // h_{t-1} was written by other blocks before the last grid barrier: read it through L2
      // (__ldcg), never through the non-coherent read-only path.
      const float* hp = t == 0 ? h0 + static_cast<size_t>(b) * H : out + (bt - 1) * H;
      // Issue the finishing lane's operand loads first so they overlap the dot products.
      const float* gi_bt = gi + bt * 3 * H;
      float gir = 0.0f, giz = 0.0f, gin = 0.0f, hpj = 0.0f;
      if (lane < nu) {
        gir = gi_bt[jl];
        giz = gi_bt[H + jl];
        gin = gi_bt[2 * H + jl];
        hpj = __ldcg(hp + jl);
      }
      float acc[3][U];
#pragma unroll
      for (int g = 0; g < 3; ++g)
#pragma unroll
        for (int u = 0; u < U; ++u) acc[g][u] = 0.0f;
#pragma unroll 4
      for (int k = lane; k < H; k += 32) {
        const float h = __ldcg(hp + k);
#pragma unroll
        for (int g = 0; g < 3; ++g)
#pragma unroll
          for (int u = 0; u < U; ++u) acc[g][u] += w_s[(g * U + u) * H + k] * h;
      }
#pragma unroll
      for (int g = 0; g < 3; ++g)
#pragma unroll
        for (int u = 0; u < U; ++u) acc[g][u] = warp_sum(acc[g][u]);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (lane == u && u < nu) {  // lane u finishes unit j0 + u of row b
          const int j = jl;
          const float ghn = acc[2][u] + bhn;
          const float r = sigmoid(gir + acc[0][u] + bhr);
          const float z = sigmoid(giz + acc[1][u] + bhz);
          const float n = tanhf(gin + r * ghn);
          const float h = n + z * (hpj - n);
          float* ws_bt = ws + bt * 5 * H;
          ws_bt[j] = r;
          ws_bt[H + j] = z;
          ws_bt[2 * H + j] = n;
          ws_bt[3 * H + j] = ghn;
          ws_bt[4 * H + j] = h;
          out[bt * H + j] = h;
        }
      }
    }
    grid.sync();
  }
}

// grad_out (B, T, H), h0 (B, H), w_hh (3H, H), ws (B, T, 5H) -> dgi, dgh (B, T, 3H), dh0 (B, H).
// carry (B, H) holds dL/dh_t * z_t between steps; each element is owned by one thread.
template <int U, int kThreads = threads_for<U>()>
__global__ void __launch_bounds__(kThreads)
    gru_backward_kernel(const float* __restrict__ grad_out, const float* __restrict__ h0,
                        const float* __restrict__ w_hh, const float* __restrict__ ws, float* dgi,
                        float* dgh, float* carry, float* dh0, int B, int T, int H) {
  extern __shared__ float w_s[];  // [U][3H]: columns j0 + u of w_hh
  cg::grid_group grid = cg::this_grid();
  const int j0 = blockIdx.x * U;
  const int nu = min(U, H - j0);
  const int H3 = 3 * H;
  for (int i = threadIdx.x; i < U * H3; i += kThreads) {
    const int u = i / H3, k = i % H3;
    w_s[i] = u < nu ? w_hh[static_cast<size_t>(k) * H + j0 + u] : 0.0f;
  }
  __syncthreads();
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int jl = j0 + lane;  // the unit this lane finishes (lanes < nu)
  for (int t = T - 1; t >= -1; --t) {  // t = -1: only dL/dh0 from step 0
    for (int b = warp; b < B; b += kWarps) {
      // Issue the finishing lane's operand loads first so they overlap the dot products.
      const size_t bt = static_cast<size_t>(b) * T + t;
      float dh = 0.0f, r = 0.0f, z = 0.0f, n = 0.0f, ghn = 0.0f, hp = 0.0f;
      if (lane < nu) {
        if (t + 1 < T) dh = carry[static_cast<size_t>(b) * H + jl];
        if (t >= 0) {
          const float* ws_bt = ws + bt * 5 * H;
          dh += grad_out[bt * H + jl];
          r = ws_bt[jl];
          z = ws_bt[H + jl];
          n = ws_bt[2 * H + jl];
          ghn = ws_bt[3 * H + jl];
          hp = t == 0 ? h0[static_cast<size_t>(b) * H + jl] : ws_bt[-H + jl];
        }
      }
      float acc[U];
#pragma unroll
      for (int u = 0; u < U; ++u) acc[u] = 0.0f;
      if (t + 1 < T) {  // dL/dh_t through step t+1's hidden projection: dgh_{t+1} @ W_hh[:, j]
        const float* dg = dgh + (static_cast<size_t>(b) * T + t + 1) * H3;
#pragma unroll 4
        for (int k = lane; k < H3; k += 32) {
          const float g = __ldcg(dg + k);
#pragma unroll
          for (int u = 0; u < U; ++u) acc[u] += w_s[u * H3 + k] * g;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) acc[u] = warp_sum(acc[u]);
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        if (lane == u && u < nu) {
          const int j = jl;
          dh += acc[u];
          if (t < 0) {
            dh0[static_cast<size_t>(b) * H + j] = dh;
            continue;
          }
          const float dn = dh * (1.0f - z) * (1.0f - n * n);
          const float dz = dh * (hp - n) * z * (1.0f - z);
          const float dr = dn * ghn * r * (1.0f - r);
          dgi[bt * H3 + j] = dr;
          dgi[bt * H3 + H + j] = dz;
          dgi[bt * H3 + 2 * H + j] = dn;
          dgh[bt * H3 + j] = dr;
          dgh[bt * H3 + H + j] = dz;
          dgh[bt * H3 + 2 * H + j] = dn * r;
          carry[static_cast<size_t>(b) * H + j] = dh * z;
        }
      }
    }
    if (t >= 0) grid.sync();
  }
}

// Launches `kernel` cooperatively with ceil(H / U) blocks and `smem` bytes of shared memory.
void launch_cooperative(const void* kernel, int threads, int H, int U, size_t smem,
                        void** args) {
  const int device = at::cuda::current_device();
  int max_smem = 0, sms = 0, per_sm = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  TORCH_CHECK(smem <= static_cast<size_t>(max_smem),
              msg("vosgan gru (CUDA): hidden size ", H, " needs ", smem,
                  " bytes of shared memory per block, the device allows ", max_smem));
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                      static_cast<int>(smem)));
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, threads, smem));
  const int blocks = (H + U - 1) / U;
  TORCH_CHECK(blocks <= per_sm * sms, msg("vosgan gru (CUDA): ", blocks,
                                          " blocks cannot all be resident (", per_sm,
                                          " per SM x ", sms, " SMs)"));
  C10_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, blocks, threads, args, smem,
                                             at::cuda::getCurrentCUDAStream()));
}

// Units per block: the smallest power of two that fits one block per SM.
int units_per_block(int H) {
  int sms = 0;
  C10_CUDA_CHECK(
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, at::cuda::current_device()));
  for (int u = 1; u < 16; u *= 2) {
    if ((H + u - 1) / u <= sms) return u;
  }
  return 16;
}

template <int U>
void forward_u(const at::Tensor& gi, const at::Tensor& h0, const at::Tensor& w_hh,
               const at::Tensor& b_hh, at::Tensor& ws, at::Tensor& out) {
  int B = gi.size(0), T = gi.size(1), H = w_hh.size(1);
  const float* gi_p = gi.data_ptr<float>();
  const float* h0_p = h0.data_ptr<float>();
  const float* w_p = w_hh.data_ptr<float>();
  const float* b_p = b_hh.data_ptr<float>();
  float* ws_p = ws.data_ptr<float>();
  float* out_p = out.data_ptr<float>();
  void* args[] = {&gi_p, &h0_p, &w_p, &b_p, &ws_p, &out_p, &B, &T, &H};
  launch_cooperative(reinterpret_cast<const void*>(&gru_forward_kernel<U>), threads_for<U>(), H, U,
                     sizeof(float) * 3 * U * H, args);
}

template <int U>
void backward_u(const at::Tensor& grad_out, const at::Tensor& h0, const at::Tensor& w_hh,
                const at::Tensor& ws, at::Tensor& dgi, at::Tensor& dgh, at::Tensor& dh0) {
  int B = grad_out.size(0), T = grad_out.size(1), H = w_hh.size(1);
  auto carry = at::empty({B, H}, dh0.options());
  const float* go_p = grad_out.data_ptr<float>();
  const float* h0_p = h0.data_ptr<float>();
  const float* w_p = w_hh.data_ptr<float>();
  const float* ws_p = ws.data_ptr<float>();
  float* dgi_p = dgi.data_ptr<float>();
  float* dgh_p = dgh.data_ptr<float>();
  float* carry_p = carry.data_ptr<float>();
  float* dh0_p = dh0.data_ptr<float>();
  void* args[] = {&go_p, &h0_p, &w_p, &ws_p, &dgi_p, &dgh_p, &carry_p, &dh0_p, &B, &T, &H};
  launch_cooperative(reinterpret_cast<const void*>(&gru_backward_kernel<U>), threads_for<U>(), H, U,
                     sizeof(float) * 3 * U * H, args);
}

void forward_recurrence_cuda(const at::Tensor& gi, const at::Tensor& h0, const at::Tensor& w_hh,
                             const at::Tensor& b_hh, at::Tensor& ws, at::Tensor& out) {
  switch (units_per_block(w_hh.size(1))) {
    case 1: return forward_u<1>(gi, h0, w_hh, b_hh, ws, out);
    case 2: return forward_u<2>(gi, h0, w_hh, b_hh, ws, out);
    case 4: return forward_u<4>(gi, h0, w_hh, b_hh, ws, out);
    case 8: return forward_u<8>(gi, h0, w_hh, b_hh, ws, out);
    default: return forward_u<16>(gi, h0, w_hh, b_hh, ws, out);
  }
}

void backward_recurrence_cuda(const at::Tensor& grad_out, const at::Tensor& h0,
                              const at::Tensor& w_hh, const at::Tensor& ws, at::Tensor& dgi,
                              at::Tensor& dgh, at::Tensor& dh0) {
  switch (units_per_block(w_hh.size(1))) {
    case 1: return backward_u<1>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
    case 2: return backward_u<2>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
    case 4: return backward_u<4>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
    case 8: return backward_u<8>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
    default: return backward_u<16>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
  }
}

void check_cuda_dtype(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() != at::kDouble,
              "vosgan gru (CUDA): x is float64; the CUDA kernel supports float32, float16 and "
              "bfloat16 (float64 runs on CPU)");
}

std::tuple<at::Tensor, at::Tensor> gru_forward_cuda(const at::Tensor& x, const at::Tensor& h0,
                                                    const at::Tensor& w_ih,
                                                    const at::Tensor& w_hh,
                                                    const at::Tensor& b_ih,
                                                    const at::Tensor& b_hh) {
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return gru_forward_driver(x, h0, w_ih, w_hh, b_ih, b_hh, &forward_recurrence_cuda);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cuda(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                  const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  check_cuda_dtype(x);
  const c10::cuda::CUDAGuard guard(x.device());
  return gru_backward_driver(grad_out, x, h0, w_ih, w_hh, ws, &backward_recurrence_cuda);
}

}  // namespace
}  // namespace vosgan

TORCH_LIBRARY_IMPL(vosgan, CUDA, m) {
  m.impl("gru_forward", &vosgan::gru_forward_cuda);
  m.impl("gru_backward", &vosgan::gru_backward_cuda);
}
