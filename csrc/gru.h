// Fused single-layer GRU over a whole sequence: shared declarations for the CPU and CUDA parts.
//
// Layout (PyTorch nn.GRU, gate order r, z, n; batch first):
//   x (B, T, I), h0 (B, H), w_ih (3H, I), w_hh (3H, H), b_ih (3H), b_hh (3H)
//   out (B, T, H) in x's dtype
//   ws  (B, T, 5H) in the accumulation dtype: per step [r, z, n, W_hn h + b_hn, h],
//       everything backward needs, so backward never recomputes the forward. It is private to
//       each device's forward/backward pair: h is h_t on CUDA (gru_backward_driver) and h_{t-1}
//       on CPU (gru_cpu.cpp: its columns are then the h_{t-1} operand of the dW_hh GEMM as is).
// Accumulation dtype: float64 for float64 inputs, float32 for float32/float16/bfloat16.
#pragma once

#include <ATen/core/Tensor.h>

#include <string>
#include <tuple>
#include <type_traits>

namespace vosgan {

// Error messages, built without iostreams: msg("w_hh must be (3H, H), got ", w_hh.sizes()) is
// one std::string, which TORCH_CHECK passes through untouched (c10::str of several arguments
// would format them with an ostringstream inside this module). On the lent H200 machine's build
// of this module (torch 2.11.0+cu130, 2026-11-26), formatting a number into a stream here
// segfaulted in std::ostream::_M_insert<long>, which the debugger placed inside this module
// rather than in libstdc++ (cuda-gdb backtrace in csrc/README.md); std::to_string touches no
// locale.
inline std::string msg_piece(const char* s) { return s; }
inline std::string msg_piece(const std::string& s) { return s; }
inline std::string msg_piece(at::ScalarType t) { return c10::toString(t); }
inline std::string msg_piece(const c10::Device& d) { return d.str(); }
inline std::string msg_piece(at::IntArrayRef v) {
  std::string s = "[";
  for (size_t i = 0; i < v.size(); ++i) {
    s += (i ? ", " : "") + std::to_string(v[i]);
  }
  return s + "]";
}
template <class T, std::enable_if_t<std::is_integral_v<T>, int> = 0>
std::string msg_piece(T v) {
  return std::to_string(v);
}
template <class... Args>
std::string msg(const Args&... args) {
  std::string s;
  ((s += msg_piece(args)), ...);
  return s;
}

// Recurrent part of the forward pass, all steps in one call.
//   gi (B, T, 3H): x W_ih^T + b_ih for every step (one GEMM, done by the caller)
//   h0 (B, H), w_hh (3H, H), b_hh (3H): accumulation dtype, contiguous
//   writes ws (B, T, 5H) and out_acc (B, T, H), both preallocated, accumulation dtype.
using ForwardRecurrence = void (*)(const at::Tensor& gi, const at::Tensor& h0,
                                   const at::Tensor& w_hh, const at::Tensor& b_hh,
                                   at::Tensor& ws, at::Tensor& out_acc);

// Recurrent part of the backward pass (reverse time), all steps in one call.
//   grad_out (B, T, H), h0 (B, H), w_hh (3H, H), ws (B, T, 5H): accumulation dtype, contiguous
//   writes dgi (B, T, 3H) (gradient of the input-side gate pre-activations, biases included),
//   dgh (B, T, 3H) (same for the hidden side) and dh0 (B, H), all preallocated.
using BackwardRecurrence = void (*)(const at::Tensor& grad_out, const at::Tensor& h0,
                                    const at::Tensor& w_hh, const at::Tensor& ws,
                                    at::Tensor& dgi, at::Tensor& dgh, at::Tensor& dh0);

// Validates the forward arguments (names the bad argument) and returns (B, T, I, H).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_forward_args(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh);

// Validates the backward arguments (names the bad argument) and returns (B, T, I, H).
std::tuple<int64_t, int64_t, int64_t, int64_t> check_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws);

// Device-independent driver: input projection GEMM, the recurrence, dtype conversions.
std::tuple<at::Tensor, at::Tensor> gru_forward_driver(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, ForwardRecurrence recurrence);

// Device-independent driver: the recurrence, then every weight/input gradient as one GEMM.
// Returns (grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh) in the inputs' dtype.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_driver(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws,
                    BackwardRecurrence recurrence);

// The instruction set of the CPU gate loops in use: "avx2" or "base" (gru_cpu.cpp).
// Throws when VOSGAN_GRU_ISA names one this CPU cannot run.
std::string gru_cpu_isa();

// How the CPU GRU runs its GEMMs: oneDNN from a size up, or BLAS (gru_cpu_gemm.h).
std::string gru_cpu_gemm();

}  // namespace vosgan
