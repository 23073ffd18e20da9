// CPU recurrence of the fused GRU: one at::addmm per step for the hidden projection, fused gate
// math parallel over the batch (at::parallel_for), every buffer allocated once per call.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>

#include "gru.h"

// The float gate loops are compiled twice, for AVX2+FMA and for the baseline ISA, and picked once
// at load time (__builtin_cpu_supports). They vectorise thanks to the branch-free exp below and
// -fno-trapping-math (CMakeLists.txt); std::exp would keep them scalar.
#if defined(__x86_64__) && defined(__GNUC__)
#define VOSGAN_X86_DISPATCH 1
#endif

namespace vosgan {
namespace {

// exp(x) for x clamped to [-87, 88]: Cody-Waite range reduction + Cephes degree-6 polynomial,
// about 2 ulp, branch-free so that the callers' loops vectorise.
inline float exp_clamped(float x) {
  x = x < -87.0f ? -87.0f : x;
  x = x > 88.0f ? 88.0f : x;
  const float k = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - k * 0.693359375f;
  r = r + k * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
  return p * std::bit_cast<float>(bits);
}

inline float sigmoid_f(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }
inline float tanh_f(float x) { return 1.0f - 2.0f / (1.0f + exp_clamped(2.0f * x)); }
inline double sigmoid_f(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_f(double x) { return std::tanh(x); }

// One batch row of one step: gate math and state update.
//   gi, gh: [r | z | n] pre-activations (3H); hp: h_{t-1} (H); ws: [r | z | n | ghn | h] (5H).
template <typename T>
inline void forward_row_impl(const T* __restrict__ gi, const T* __restrict__ gh,
                             const T* __restrict__ hp, T* __restrict__ ws, T* __restrict__ out,
                             int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid_f(gi[j] + gh[j]);
    const T z = sigmoid_f(gi[H + j] + gh[H + j]);
    const T ghn = gh[2 * H + j];
    const T n = tanh_f(gi[2 * H + j] + r * ghn);
    const T h = n + z * (hp[j] - n);
    ws[j] = r;
    ws[H + j] = z;
    ws[2 * H + j] = n;
    ws[3 * H + j] = ghn;
    ws[4 * H + j] = h;
    out[j] = h;
  }
}

using ForwardRowF32 = void (*)(const float*, const float*, const float*, float*, float*, int64_t);

void forward_row_base(const float* gi, const float* gh, const float* hp, float* ws, float* out,
                      int64_t H) {
  forward_row_impl(gi, gh, hp, ws, out, H);
}

#ifdef VOSGAN_X86_DISPATCH
__attribute__((target("avx2,fma"))) void forward_row_avx2(const float* gi, const float* gh,
                                                          const float* hp, float* ws, float* out,
                                                          int64_t H) {
  forward_row_impl(gi, gh, hp, ws, out, H);
}
#endif

bool has_avx2_fma() {
#ifdef VOSGAN_X86_DISPATCH
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
  return false;
#endif
}

const ForwardRowF32 forward_row_f32 =
#ifdef VOSGAN_X86_DISPATCH
    has_avx2_fma() ? &forward_row_avx2 :
#endif
                   &forward_row_base;

inline void forward_row(const float* gi, const float* gh, const float* hp, float* ws, float* out,
                        int64_t H) {
  forward_row_f32(gi, gh, hp, ws, out, H);
}

void forward_row(const double* gi, const double* gh, const double* hp, double* ws, double* out,
                 int64_t H) {
  forward_row_impl(gi, gh, hp, ws, out, H);
}

// One batch row of one reverse step. On entry carry holds dL/dh_t from step t+1; on exit it holds
// dh_t * z, the direct part of dL/dh_{t-1} (the caller adds dgh @ w_hh).
template <typename T>
inline void backward_row_impl(const T* __restrict__ go, T* __restrict__ carry,
                              const T* __restrict__ ws, const T* __restrict__ hp,
                              T* __restrict__ dgi, T* __restrict__ dgh, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = ws[j], z = ws[H + j], n = ws[2 * H + j], ghn = ws[3 * H + j];
    const T dh = go[j] + carry[j];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dz = dh * (hp[j] - n) * z * (T(1) - z);
    const T dr = dn * ghn * r * (T(1) - r);
    dgi[j] = dr;
    dgi[H + j] = dz;
    dgi[2 * H + j] = dn;
    dgh[j] = dr;
    dgh[H + j] = dz;
    dgh[2 * H + j] = dn * r;
    carry[j] = dh * z;
  }
}

void backward_row(const float* go, float* carry, const float* ws, const float* hp, float* dgi,
                  float* dgh, int64_t H) {
  backward_row_impl(go, carry, ws, hp, dgi, dgh, H);
}

void backward_row(const double* go, double* carry, const double* ws, const double* hp,
                  double* dgi, double* dgh, int64_t H) {
  backward_row_impl(go, carry, ws, hp, dgi, dgh, H);
}

// Batch rows per parallel task: enough elementwise work to amortise a task (~4k elements).
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / H); }

template <typename T>
void forward_recurrence_cpu_t(const at::Tensor& gi, const at::Tensor& h0, const at::Tensor& w_hh,
                              const at::Tensor& b_hh, at::Tensor& ws, at::Tensor& out) {
  const int64_t B = gi.size(0), T_ = gi.size(1), H = w_hh.size(1);
  auto gh = at::empty({B, 3 * H}, gi.options());
  const auto w_hh_t = w_hh.t();
  const T* gi_p = gi.data_ptr<T>();
  const T* gh_p = gh.data_ptr<T>();
  T* ws_p = ws.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  for (int64_t t = 0; t < T_; ++t) {
    // h_{t-1}: h0, or a strided (B, H) view of the previous step's output (lda = T*H).
    const at::Tensor hp = t == 0 ? h0 : out.select(1, t - 1);
    at::addmm_out(gh, b_hh, hp, w_hh_t);
    const T* hp_p = hp.data_ptr<T>();
    const int64_t hp_stride = hp.stride(0);
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t bt = b * T_ + t;
        forward_row(gi_p + bt * 3 * H, gh_p + b * 3 * H, hp_p + b * hp_stride, ws_p + bt * 5 * H,
                    out_p + bt * H, H);
      }
    });
  }
}

template <typename T>
void backward_recurrence_cpu_t(const at::Tensor& grad_out, const at::Tensor& h0,
                               const at::Tensor& w_hh, const at::Tensor& ws, at::Tensor& dgi,
                               at::Tensor& dgh, at::Tensor& dh0) {
  const int64_t B = grad_out.size(0), T_ = grad_out.size(1), H = w_hh.size(1);
  at::Tensor& carry = dh0;  // dL/dh of the current step; ends as dL/dh0
  carry.zero_();
  const T* go_p = grad_out.data_ptr<T>();
  const T* ws_p = ws.data_ptr<T>();
  const T* h0_p = h0.data_ptr<T>();
  T* carry_p = carry.data_ptr<T>();
  T* dgi_p = dgi.data_ptr<T>();
  T* dgh_p = dgh.data_ptr<T>();
  for (int64_t t = T_ - 1; t >= 0; --t) {
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t bt = b * T_ + t;
        const T* hp = t == 0 ? h0_p + b * H : ws_p + (bt - 1) * 5 * H + 4 * H;
        backward_row(go_p + bt * H, carry_p + b * H, ws_p + bt * 5 * H, hp, dgi_p + bt * 3 * H,
                     dgh_p + bt * 3 * H, H);
      }
    });
    carry.addmm_(dgh.select(1, t), w_hh);  // += dgh_t (B, 3H) @ w_hh (3H, H)
  }
}

void forward_recurrence_cpu(const at::Tensor& gi, const at::Tensor& h0, const at::Tensor& w_hh,
                            const at::Tensor& b_hh, at::Tensor& ws, at::Tensor& out) {
  if (gi.scalar_type() == at::kDouble) {
    forward_recurrence_cpu_t<double>(gi, h0, w_hh, b_hh, ws, out);
  } else {
    forward_recurrence_cpu_t<float>(gi, h0, w_hh, b_hh, ws, out);
  }
}

void backward_recurrence_cpu(const at::Tensor& grad_out, const at::Tensor& h0,
                             const at::Tensor& w_hh, const at::Tensor& ws, at::Tensor& dgi,
                             at::Tensor& dgh, at::Tensor& dh0) {
  if (ws.scalar_type() == at::kDouble) {
    backward_recurrence_cpu_t<double>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
  } else {
    backward_recurrence_cpu_t<float>(grad_out, h0, w_hh, ws, dgi, dgh, dh0);
  }
}

std::tuple<at::Tensor, at::Tensor> gru_forward_cpu(const at::Tensor& x, const at::Tensor& h0,
                                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                   const at::Tensor& b_ih, const at::Tensor& b_hh) {
  return gru_forward_driver(x, h0, w_ih, w_hh, b_ih, b_hh, &forward_recurrence_cpu);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                 const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  return gru_backward_driver(grad_out, x, h0, w_ih, w_hh, ws, &backward_recurrence_cpu);
}

}  // namespace
}  // namespace vosgan

TORCH_LIBRARY_IMPL(vosgan, CPU, m) {
  m.impl("gru_forward", &vosgan::gru_forward_cpu);
  m.impl("gru_backward", &vosgan::gru_backward_cpu);
}
