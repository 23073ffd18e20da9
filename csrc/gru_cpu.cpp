// CPU kernels of the fused GRU (vosgan::gru_forward / gru_backward on CPU tensors).
//
// Per step: one GEMM for the hidden projection (forward) or the hidden-state gradient (backward),
// then the fused gate math, parallel over the batch (forward) or the hidden units (backward) with
// at::parallel_for. Everything else is one GEMM over all B*T steps, and every buffer is allocated
// once per call, except the output of a step's GEMM when oneDNN runs it. The GEMMs run on BLAS or
// on oneDNN by size (gru_cpu_gemm.h).
//
// Layout: every per-step buffer is time-major, (T, B, .), so that one step's rows are contiguous.
// Batch-major (B, T, .) buffers put a step's B rows T*row bytes apart; at T=32 that stride is a
// multiple of 32-128 KiB, all rows of a step map to the same L1/L2 cache sets and evict each
// other between the gate loop and the step's GEMM (the fused op then grew superlinearly in T).
// So the CPU workspace ws, shape (B, T, 5H) as the schema says, holds its data in (T, B, 5H)
// order, and its last slot is h_{t-1} (the state entering the step), which makes
// ws[t][:, 4H:5H] the operand of step t's GEMM and the whole column block the h_{t-1} operand of
// the dW_hh GEMM on BLAS, with no copies.
//
// Large buffers are not fresh allocations on every call (gru_cpu_buffers.h): the temporaries are
// per-thread and reused, and ws's memory goes back to a small pool when autograd frees it.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "gru.h"
#include "gru_cpu_buffers.h"
#include "gru_cpu_gemm.h"

// The float gate loops are compiled twice, for AVX2+FMA and for the baseline ISA, and picked at
// the first call (__builtin_cpu_supports, or VOSGAN_GRU_ISA). They vectorise thanks to the
// branch-free exp below and -fno-trapping-math (CMakeLists.txt); std::exp would keep them scalar.
#if defined(__x86_64__) && defined(__GNUC__)
#define VOSGAN_X86_DISPATCH 1
#endif

namespace vosgan {
namespace {

// Inlined by force: gcc's inliner may leave a plain inline function out of the AVX2 clone below
// (its target differs), and then the clone calls a scalar, FMA-less exp in its loop. It did so
// when this file last changed: 3 calls in forward_row_avx2, and rounding that changed training.
#define VOSGAN_ALWAYS_INLINE __attribute__((always_inline)) inline

// exp(x) for x clamped to [-87, 88]: Cody-Waite range reduction + Cephes degree-6 polynomial,
// about 2 ulp, branch-free so that the callers' loops vectorise.
VOSGAN_ALWAYS_INLINE float exp_clamped(float x) {
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

VOSGAN_ALWAYS_INLINE float sigmoid_f(float x) { return 1.0f / (1.0f + exp_clamped(-x)); }
VOSGAN_ALWAYS_INLINE float tanh_f(float x) { return 1.0f - 2.0f / (1.0f + exp_clamped(2.0f * x)); }
inline double sigmoid_f(double x) { return 1.0 / (1.0 + std::exp(-x)); }
inline double tanh_f(double x) { return std::tanh(x); }

// One batch row of one forward step: gate math and state update. Biases are added here (the
// GEMMs run without them): bias = [b_ir + b_hr | b_iz + b_hz | b_in] (3H), bhn = b_hn (H).
//   gi, gh: [r | z | n] pre-activations (3H) without biases; hp: h_{t-1} (H), the row's ws[4H:];
//   ws: this row's workspace, slots [r | z | n | W_hn h + b_hn] written; out: h_t (H);
//   next: the next step's ws[4H:] slot of this row (h_t again), absent at the last step.
template <typename T, bool kNext>
inline void forward_row_impl(const T* __restrict__ gi, const T* __restrict__ gh,
                             const T* __restrict__ bias, const T* __restrict__ bhn,
                             const T* __restrict__ hp, T* __restrict__ ws, T* __restrict__ out,
                             T* __restrict__ next, int64_t H) {
  for (int64_t j = 0; j < H; ++j) {
    const T r = sigmoid_f(gi[j] + gh[j] + bias[j]);
    const T z = sigmoid_f(gi[H + j] + gh[H + j] + bias[H + j]);
    const T ghn = gh[2 * H + j] + bhn[j];
    const T n = tanh_f(gi[2 * H + j] + bias[2 * H + j] + r * ghn);
    const T h = n + z * (hp[j] - n);
    ws[j] = r;
    ws[H + j] = z;
    ws[2 * H + j] = n;
    ws[3 * H + j] = ghn;
    out[j] = h;
    if constexpr (kNext) {
      next[j] = h;
    }
  }
}

template <typename T>
inline void forward_row_any(const T* gi, const T* gh, const T* bias, const T* bhn, T* ws, T* out,
                            T* next, int64_t H) {
  if (next != nullptr) {
    forward_row_impl<T, true>(gi, gh, bias, bhn, ws + 4 * H, ws, out, next, H);
  } else {
    forward_row_impl<T, false>(gi, gh, bias, bhn, ws + 4 * H, ws, out, next, H);
  }
}

// Units [j0, j1) of one batch row of one reverse step. On entry carry holds dL/dh_t from step
// t+1; on exit it holds dh_t * z, the direct part of dL/dh_{t-1} (the caller adds dgh @ w_hh).
//   ws: [r | z | n | ghn | h_{t-1}] (5H); dgh: [dr | dz | dn * r] (3H); dgn: dn (H), so that
//   dgi = (dgh[0:2H], dgn); s_r, s_z, s_nr, s_n (H each) accumulate dr, dz, dn * r, dn over the
//   batch rows of this step. All pointers are offset to unit j0 by the caller; the four
//   sums are separate restrict arguments because gcc does not vectorise s[H + j] += ... .
template <typename T>
inline void backward_row_impl(const T* __restrict__ go, T* __restrict__ carry,
                              const T* __restrict__ ws, T* __restrict__ dgh,
                              T* __restrict__ dgn, T* __restrict__ s_r, T* __restrict__ s_z,
                              T* __restrict__ s_nr, T* __restrict__ s_n, int64_t H,
                              int64_t units) {
  for (int64_t j = 0; j < units; ++j) {
    const T r = ws[j], z = ws[H + j], n = ws[2 * H + j], ghn = ws[3 * H + j];
    const T hp = ws[4 * H + j];
    const T dh = go[j] + carry[j];
    const T dn = dh * (T(1) - z) * (T(1) - n * n);
    const T dz = dh * (hp - n) * z * (T(1) - z);
    const T dr = dn * ghn * r * (T(1) - r);
    const T dnr = dn * r;
    dgh[j] = dr;
    dgh[H + j] = dz;
    dgh[2 * H + j] = dnr;
    dgn[j] = dn;
    carry[j] = dh * z;
    s_r[j] += dr;
    s_z[j] += dz;
    s_nr[j] += dnr;
    s_n[j] += dn;
  }
}

template <typename T>
inline void backward_row_any(const T* go, T* carry, const T* ws, T* dgh, T* dgn, T* db, int64_t H,
                             int64_t j0, int64_t j1) {
  backward_row_impl(go + j0, carry + j0, ws + j0, dgh + j0, dgn + j0, db + j0, db + H + j0,
                    db + 2 * H + j0, db + 3 * H + j0, H, j1 - j0);
}

using ForwardRowF32 = void (*)(const float*, const float*, const float*, const float*, float*,
                               float*, float*, int64_t);
using BackwardRowF32 = void (*)(const float*, float*, const float*, float*, float*, float*,
                                int64_t, int64_t, int64_t);

void forward_row_base(const float* gi, const float* gh, const float* bias, const float* bhn,
                      float* ws, float* out, float* next, int64_t H) {
  forward_row_any(gi, gh, bias, bhn, ws, out, next, H);
}

void backward_row_base(const float* go, float* carry, const float* ws, float* dgh, float* dgn,
                       float* db, int64_t H, int64_t j0, int64_t j1) {
  backward_row_any(go, carry, ws, dgh, dgn, db, H, j0, j1);
}

#ifdef VOSGAN_X86_DISPATCH
// No AVX-512 clone: on the Intel Xeon dev box (AVX-512) one with 512-bit vectors ran the gate
// loops no faster (they wait on memory; benchmarks/RESULTS.md, thirteenth session).
__attribute__((target("avx2,fma"))) void forward_row_avx2(const float* gi, const float* gh,
                                                          const float* bias, const float* bhn,
                                                          float* ws, float* out, float* next,
                                                          int64_t H) {
  forward_row_any(gi, gh, bias, bhn, ws, out, next, H);
}

__attribute__((target("avx2,fma"))) void backward_row_avx2(const float* go, float* carry,
                                                           const float* ws, float* dgh,
                                                           float* dgn, float* db, int64_t H,
                                                           int64_t j0, int64_t j1) {
  backward_row_any(go, carry, ws, dgh, dgn, db, H, j0, j1);
}
#endif

struct RowKernels {
  const char* isa;
  ForwardRowF32 forward;
  BackwardRowF32 backward;
};

// The widest clone this CPU runs, or the one VOSGAN_GRU_ISA names (avx2 or base: the tests run
// the portable clone on an AVX2 CPU this way). Picked once, at the first call.
const RowKernels& row_kernels() {
  static const RowKernels picked = [] {
    std::vector<RowKernels> usable;  // widest first
#ifdef VOSGAN_X86_DISPATCH
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      usable.push_back({"avx2", &forward_row_avx2, &backward_row_avx2});
    }
#endif
    usable.push_back({"base", &forward_row_base, &backward_row_base});
    const char* wanted = std::getenv("VOSGAN_GRU_ISA");
    if (wanted == nullptr || *wanted == '\0') {
      return usable.front();
    }
    std::string names;
    for (const auto& k : usable) {
      if (std::strcmp(k.isa, wanted) == 0) {
        return k;
      }
      names += names.empty() ? k.isa : std::string(", ") + k.isa;
    }
    TORCH_CHECK(false, msg("VOSGAN_GRU_ISA=", std::string(wanted),
                           " is not a gate-loop clone this CPU runs; choose one of: ", names));
  }();
  return picked;
}

inline void forward_row(const float* gi, const float* gh, const float* bias, const float* bhn,
                        float* ws, float* out, float* next, int64_t H) {
  row_kernels().forward(gi, gh, bias, bhn, ws, out, next, H);
}

void forward_row(const double* gi, const double* gh, const double* bias, const double* bhn,
                 double* ws, double* out, double* next, int64_t H) {
  forward_row_any(gi, gh, bias, bhn, ws, out, next, H);
}

inline void backward_row(const float* go, float* carry, const float* ws, float* dgh, float* dgn,
                         float* db, int64_t H, int64_t j0, int64_t j1) {
  row_kernels().backward(go, carry, ws, dgh, dgn, db, H, j0, j1);
}

void backward_row(const double* go, double* carry, const double* ws, double* dgh, double* dgn,
                  double* db, int64_t H, int64_t j0, int64_t j1) {
  backward_row_any(go, carry, ws, dgh, dgn, db, H, j0, j1);
}

// Batch rows per parallel task of a forward step: ~4k elements amortise a task.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 4096 / H); }

// Units per parallel task of the reverse steps: a multiple of the vector width.
constexpr int64_t kUnitBlock = 16;

// Steps per input-projection GEMM: about 512 KiB of gi, so that it is still in cache when the
// gate loops of those steps read it.
int64_t input_chunk(int64_t T, int64_t B, int64_t H) {
  return std::max<int64_t>(1, std::min<int64_t>(T, (int64_t(1) << 17) / (B * 3 * H)));
}

// dst (C, R) = src (R, C)^T; src rows ld elements apart, dst row-major; copied in square tiles
// over columns [k0, k1) * kTile.
constexpr int64_t kTile = 32;

template <typename T>
void transpose_tiles(const T* src, int64_t ld, T* dst, int64_t R, int64_t C, int64_t k0,
                     int64_t k1) {
  for (int64_t c0 = k0 * kTile; c0 < std::min(C, k1 * kTile); c0 += kTile) {
    const int64_t c1 = std::min(C, c0 + kTile);
    for (int64_t r0 = 0; r0 < R; r0 += kTile) {
      const int64_t r1 = std::min(R, r0 + kTile);
      for (int64_t c = c0; c < c1; ++c) {
        for (int64_t r = r0; r < r1; ++r) {
          dst[c * R + r] = src[r * ld + c];
        }
      }
    }
  }
}

}  // namespace

// Declared in gru_cpu_gemm.h. Tensor::contiguous() on m.t() walks the source with a stride of C
// elements, and ran 5x slower than a plain copy of the same (768, 256) matrix on the Intel dev
// box (0.30 against 0.06 ms); tiles keep both sides in L1.
void cpu::transpose_into(const at::Tensor& m, at::Tensor& dst) {
  const auto src = m.stride(1) == 1 ? m : m.contiguous();
  const int64_t R = src.size(0), C = src.size(1), ld = src.stride(0);
  TORCH_INTERNAL_ASSERT(dst.is_contiguous() && dst.size(0) == C && dst.size(1) == R);
  const int64_t tiles = (C + kTile - 1) / kTile;
  const int64_t grain = std::max<int64_t>(1, 16384 / (kTile * std::max<int64_t>(R, 1)));
  at::parallel_for(0, tiles, grain, [&](int64_t k0, int64_t k1) {
    if (src.scalar_type() == at::kDouble) {
      transpose_tiles(src.data_ptr<double>(), ld, dst.data_ptr<double>(), R, C, k0, k1);
    } else {
      transpose_tiles(src.data_ptr<float>(), ld, dst.data_ptr<float>(), R, C, k0, k1);
    }
  });
}

at::Tensor cpu::transposed(const at::Tensor& m) {
  auto dst = at::empty({m.size(1), m.size(0)}, m.options());
  transpose_into(m, dst);
  return dst;
}

namespace {

using cpu::transposed;

// Forward recurrence, all steps. x_tm (T*B, I): the inputs, time-major; w_ih (3H, I); h0 (B, H);
// w_hh (3H, H); bias, bhn as in forward_row_impl; ws: (T, B, 5H) memory; out (B, T, H).
// The input projection x W_ih^T (no bias) runs as one GEMM per chunk of steps (input_chunk).
template <typename T>
void forward_recurrence(const at::Tensor& x_tm, const at::Tensor& w_ih, const at::Tensor& h0,
                        const at::Tensor& w_hh, const T* bias, const T* bhn, at::Tensor& ws,
                        at::Tensor& out) {
  const int64_t B = out.size(0), T_ = out.size(1), H = out.size(2);
  const auto ws_tm = ws.view({T_, B, 5 * H});
  ws_tm.select(0, 0).narrow(1, 4 * H, H).copy_(h0);
  const int64_t chunk = input_chunk(T_, B, H);
  auto gi = cpu::scratch(0, {chunk * B, 3 * H}, ws.options());
  auto gh = at::empty({B, 3 * H}, ws.options());
  // On the BLAS engine, the weights become (K, 3H) row-major copies once per call: MKL runs the
  // per-step h_{t-1} @ w_hh^T faster from these (NN) than from w_hh.t() views (NT); the GEMM
  // alone, one core of the Intel dev box: 1.2x at B=64, H=256, 1.9x at B=16, H=256
  // (benchmarks/RESULTS.md). The oneDNN engine reads w_hh as it is.
  const cpu::RepeatedGemm input_gemm(w_ih.t(), chunk * B);
  const cpu::RepeatedGemm step_gemm(w_hh.t(), B);
  at::Tensor gi_chunk;  // gi's rows, or the oneDNN engine's own output, held while read
  T* ws_p = ws.data_ptr<T>();
  T* out_p = out.data_ptr<T>();
  for (int64_t t = 0; t < T_; ++t) {
    if (t % chunk == 0) {
      const int64_t rows = std::min(chunk, T_ - t) * B;
      auto gi_rows = gi.narrow(0, 0, rows);
      gi_chunk = input_gemm.mm(x_tm.narrow(0, t * B, rows), gi_rows);
    }
    const T* gi_p = gi_chunk.data_ptr<T>();
    // h_{t-1} (B, H; row stride 5H, inside ws) @ w_hh^T.
    const auto gh_t = step_gemm.mm(ws_tm.select(0, t).narrow(1, 4 * H, H), gh);
    const T* gh_p = gh_t.data_ptr<T>();
    const bool last = t + 1 == T_;
    at::parallel_for(0, B, row_grain(H), [&](int64_t b0, int64_t b1) {
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t tb = t * B + b;
        T* next = last ? nullptr : ws_p + (tb + B) * 5 * H + 4 * H;
        forward_row(gi_p + ((t % chunk) * B + b) * 3 * H, gh_p + b * 3 * H, bias, bhn,
                    ws_p + tb * 5 * H, out_p + (b * T_ + t) * H, next, H);
      }
    });
  }
}

// Reverse recurrence, all steps, parallel over the hidden units (every task owns its slice of
// carry and of the bias-gradient sums, so the sums do not depend on the thread count).
//   go (B, T, H); ws: (T, B, 5H) memory. Writes dgh (T*B, 3H) = [dr | dz | dn*r] and
//   dgn (T*B, H) = dn, row t * B + b for step t of sequence b; dh0 (B, H); and db (4H): the sums
//   of [dgh | dgn] over all rows (per step in T, then in double). dgh and dgn are separate so
//   that a step's dgh rows are contiguous: oneDNN ran the step's GEMM 1.3-1.6x slower from rows
//   4H apart (B=64, H=128 and 256, the dev box).
template <typename T>
void backward_recurrence(const at::Tensor& go, const at::Tensor& w_hh, const at::Tensor& ws,
                         at::Tensor& dgh, at::Tensor& dgn, at::Tensor& dh0,
                         std::vector<double>& db) {
  const int64_t B = go.size(0), T_ = go.size(1), H = go.size(2);
  const cpu::RepeatedGemm step_gemm(w_hh, B);
  at::Tensor& carry = dh0;  // dL/dh of the current step; ends as dL/dh0
  carry.zero_();
  db.assign(4 * H, 0.0);
  std::vector<T> db_step(4 * H);
  const T* go_p = go.data_ptr<T>();
  const T* ws_p = ws.data_ptr<T>();
  T* carry_p = carry.data_ptr<T>();
  T* dgh_p = dgh.data_ptr<T>();
  T* dgn_p = dgn.data_ptr<T>();
  T* dbs_p = db_step.data();
  double* db_p = db.data();
  const int64_t blocks = (H + kUnitBlock - 1) / kUnitBlock;
  const int64_t grain = std::max<int64_t>(1, 4096 / (B * kUnitBlock));
  for (int64_t t = T_ - 1; t >= 0; --t) {
    at::parallel_for(0, blocks, grain, [&](int64_t k0, int64_t k1) {
      const int64_t j0 = k0 * kUnitBlock, j1 = std::min(H, k1 * kUnitBlock);
      for (int64_t q = 0; q < 4; ++q) {
        std::fill(dbs_p + q * H + j0, dbs_p + q * H + j1, T(0));
      }
      for (int64_t b = 0; b < B; ++b) {
        const int64_t tb = t * B + b;
        backward_row(go_p + (b * T_ + t) * H, carry_p + b * H, ws_p + tb * 5 * H,
                     dgh_p + tb * 3 * H, dgn_p + tb * H, dbs_p, H, j0, j1);
      }
      for (int64_t q = 0; q < 4; ++q) {
        for (int64_t j = q * H + j0; j < q * H + j1; ++j) {
          db_p[j] += static_cast<double>(dbs_p[j]);
        }
      }
    });
    // carry += dgh_t (B, 3H) @ w_hh (3H, H).
    step_gemm.addmm_(carry, dgh.narrow(0, t * B, B));
  }
}

at::ScalarType acc_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> gru_forward_cpu(const at::Tensor& x, const at::Tensor& h0,
                                                   const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                   const at::Tensor& b_ih, const at::Tensor& b_hh) {
  const auto [B, T, I, H] = check_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh);
  const auto acc = acc_type(x.scalar_type());
  const auto x_tm = x.to(acc).transpose(0, 1).contiguous().view({T * B, I});
  const auto b_iha = b_ih.to(acc), b_hha = b_hh.to(acc);
  auto bias = at::empty({4 * H}, x_tm.options());  // [b_ir + b_hr | b_iz + b_hz | b_in | b_hn]
  bias.narrow(0, 0, 2 * H).copy_(b_iha.narrow(0, 0, 2 * H)).add_(b_hha.narrow(0, 0, 2 * H));
  bias.narrow(0, 2 * H, H).copy_(b_iha.narrow(0, 2 * H, H));
  bias.narrow(0, 3 * H, H).copy_(b_hha.narrow(0, 2 * H, H));
  auto ws = cpu::WorkspacePool::instance().take({B, T, 5 * H}, x_tm.options());
  auto out = at::empty({B, T, H}, x_tm.options());
  const auto h0a = h0.to(acc), w_iha = w_ih.to(acc), w_hha = w_hh.to(acc);
  if (acc == at::kDouble) {
    const double* bp = bias.data_ptr<double>();
    forward_recurrence<double>(x_tm, w_iha, h0a, w_hha, bp, bp + 3 * H, ws, out);
  } else {
    const float* bp = bias.data_ptr<float>();
    forward_recurrence<float>(x_tm, w_iha, h0a, w_hha, bp, bp + 3 * H, ws, out);
  }
  return {out.to(x.scalar_type()), ws};
}

// dW_hh = dgh^T @ h_{t-1}, (3H, H), from dgh (T*B, 3H) and hprev (T*B, H; rows 5H apart).
at::Tensor hidden_weight_grad(const at::Tensor& dgh, const at::Tensor& hprev) {
  const int64_t TB = dgh.size(0), H3 = dgh.size(1), H = hprev.size(1);
  if (cpu::pick_engine(H3, TB, H, dgh.scalar_type()) == cpu::GemmEngine::kOneDnn) {
    // As dW_hh^T = h_{t-1}^T @ dgh: oneDNN wants the left operand with the summed dimension,
    // T*B, contiguous (from a transposed view it took 4.1 s at B64-T32-H256), and takes dgh as
    // a (3H, T*B) weight view as it is. Transposing h_{t-1} rather than dgh (3x larger) made
    // the op's fwd+bwd 2-8% faster (benchmarks/RESULTS.md).
    auto hprev_t = cpu::scratch(2, {H, TB}, dgh.options());
    cpu::transpose_into(hprev, hprev_t);
    return transposed(cpu::onednn_linear(hprev_t, dgh.t()));
  }
  // As (H, 3H), turned back by transposed(): MKL runs this shape faster than (3H, K) @ (K, H)
  // with a transposed left operand.
  return transposed(at::mm(hprev.t(), dgh));
}

// The CPU backward: the reverse recurrence, then every weight and input gradient as one or two
// GEMMs over all B*T steps, reading dgh, dgi and h_{t-1} in place (views of the scratch buffer
// and of ws), except dW_hh on oneDNN, which reads a transposed copy of h_{t-1}.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                 const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  const auto [B, T, I, H] = check_backward_args(grad_out, x, h0, w_ih, w_hh, ws);
  const auto acc = ws.scalar_type();
  const auto dt = x.scalar_type();
  // Row tb = t * B + b of every (T*B, .) matrix below is step t of sequence b.
  const auto g = cpu::scratch(1, {T * B * 4 * H}, ws.options());
  auto dgh = g.narrow(0, 0, T * B * 3 * H).view({T * B, 3 * H});
  auto dgi_n = g.narrow(0, T * B * 3 * H, T * B * H).view({T * B, H});
  auto dh0 = at::empty({B, H}, ws.options());
  std::vector<double> db;
  const auto go = grad_out.to(acc);
  const auto w_hha = w_hh.to(acc);
  if (acc == at::kDouble) {
    backward_recurrence<double>(go, w_hha, ws, dgh, dgi_n, dh0, db);
  } else {
    backward_recurrence<float>(go, w_hha, ws, dgh, dgi_n, dh0, db);
  }
  const auto dgi_rz = dgh.narrow(1, 0, 2 * H);  // dgi's r and z columns are dgh's
  const auto hprev = ws.view({T * B, 5 * H}).narrow(1, 4 * H, H);  // h_{t-1}, row stride 5H
  const auto x_tm = x.to(acc).transpose(0, 1).contiguous().view({T * B, I});
  const auto w_iha = w_ih.to(acc);

  auto dx_tm = at::mm(dgi_rz, w_iha.narrow(0, 0, 2 * H));
  dx_tm.addmm_(dgi_n, w_iha.narrow(0, 2 * H, H));
  // dW_ih is computed transposed, (I, 3H), and turned back by transposed(): MKL runs this shape
  // faster than (3H, K) @ (K, I) with a transposed left operand.
  auto dw_ih_t = at::empty({I, 3 * H}, ws.options());
  auto dw_ih_rz = dw_ih_t.narrow(1, 0, 2 * H);
  auto dw_ih_n = dw_ih_t.narrow(1, 2 * H, H);
  at::mm_out(dw_ih_rz, x_tm.t(), dgi_rz);
  at::mm_out(dw_ih_n, x_tm.t(), dgi_n);

  // Bias gradients: db = [sum dr | sum dz | sum dn*r | sum dn] -> b_hh: [0:3H], b_ih: r, z, n.
  auto db_all = at::empty({4 * H}, ws.options().dtype(at::kDouble));
  std::copy(db.begin(), db.end(), db_all.data_ptr<double>());
  auto db_ih = at::empty({3 * H}, db_all.options());
  db_ih.narrow(0, 0, 2 * H).copy_(db_all.narrow(0, 0, 2 * H));
  db_ih.narrow(0, 2 * H, H).copy_(db_all.narrow(0, 3 * H, H));
  return {dx_tm.view({T, B, I}).transpose(0, 1).contiguous().to(dt),
          dh0.to(dt),
          transposed(dw_ih_t).to(dt),
          hidden_weight_grad(dgh, hprev).to(dt),
          db_ih.to(dt),
          db_all.narrow(0, 0, 3 * H).to(dt)};
}

}  // namespace

std::string gru_cpu_isa() { return row_kernels().isa; }

std::string gru_cpu_gemm() { return cpu::gemm_engine_summary(); }

}  // namespace vosgan

TORCH_LIBRARY_IMPL(vosgan, CPU, m) {
  m.impl("gru_forward", &vosgan::gru_forward_cpu);
  m.impl("gru_backward", &vosgan::gru_backward_cpu);
}
