// vosgan::gru_forward / vosgan::gru_backward: schemas, argument checks, device-independent
// drivers, and the Python module (pybind11 is used for the module object only).
//
// The drivers do the parts that are plain GEMMs (input projection of every step at once; all
// weight, bias and input gradients at once) and hand the sequential part to a per-device
// recurrence (gru_cpu.cpp, gru_cuda.cu). Low-precision inputs run in float32 end to end.
#include "gru.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

namespace vosgan {
namespace {

at::ScalarType acc_type(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

void check_tensor(const at::Tensor& t, const char* name, const at::Tensor& x,
                  std::initializer_list<int64_t> shape) {
  TORCH_CHECK(t.device() == x.device(),
              msg("vosgan gru: ", name, " is on ", t.device(), " but x is on ", x.device()));
  TORCH_CHECK(t.scalar_type() == x.scalar_type(),
              msg("vosgan gru: ", name, " has dtype ", t.scalar_type(), " but x has dtype ",
                  x.scalar_type(), "; cast all arguments to one dtype"));
  TORCH_CHECK(t.sizes() == at::IntArrayRef(shape),
              msg("vosgan gru: ", name, " must have shape ", at::IntArrayRef(shape), ", got ",
                  t.sizes()));
  TORCH_CHECK(t.is_contiguous(), msg("vosgan gru: ", name, " must be contiguous"));
}

// x (B, T, I) contiguous, of a supported dtype; w_hh (3H, H); B, T, I, H > 0. Both ops.
std::tuple<int64_t, int64_t, int64_t, int64_t> check_x_and_w_hh(const at::Tensor& x,
                                                               const at::Tensor& w_hh) {
  TORCH_CHECK(x.dim() == 3, msg("vosgan gru: x must be (B, T, I), got shape ", x.sizes()));
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16 || dt == at::kDouble,
              msg("vosgan gru: x has dtype ", dt, "; supported: float32, float16, bfloat16, "
                  "float64"));
  TORCH_CHECK(x.is_contiguous(), "vosgan gru: x must be contiguous");
  TORCH_CHECK(w_hh.dim() == 2 && w_hh.size(0) == 3 * w_hh.size(1) && w_hh.size(1) > 0,
              msg("vosgan gru: w_hh must be (3H, H), got shape ", w_hh.sizes()));
  const int64_t B = x.size(0), T = x.size(1), I = x.size(2), H = w_hh.size(1);
  TORCH_CHECK(B > 0 && T > 0 && I > 0,
              msg("vosgan gru: x must have B, T, I > 0, got ", x.sizes()));
  return {B, T, I, H};
}

}  // namespace

std::tuple<int64_t, int64_t, int64_t, int64_t> check_forward_args(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh) {
  const auto [B, T, I, H] = check_x_and_w_hh(x, w_hh);
  check_tensor(h0, "h0", x, {B, H});
  check_tensor(w_ih, "w_ih", x, {3 * H, I});
  check_tensor(w_hh, "w_hh", x, {3 * H, H});
  check_tensor(b_ih, "b_ih", x, {3 * H});
  check_tensor(b_hh, "b_hh", x, {3 * H});
  return {B, T, I, H};
}

std::tuple<at::Tensor, at::Tensor> gru_forward_driver(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh, ForwardRecurrence recurrence) {
  const auto [B, T, I, H] = check_forward_args(x, h0, w_ih, w_hh, b_ih, b_hh);
  const auto acc = acc_type(x.scalar_type());
  const auto xa = x.to(acc);
  // Input projection of every step at once: (B*T, I) @ (I, 3H) + b_ih.
  const auto gi = at::addmm(b_ih.to(acc), xa.view({B * T, I}), w_ih.to(acc).t());
  auto ws = at::empty({B, T, 5 * H}, xa.options());
  auto out = at::empty({B, T, H}, xa.options());
  recurrence(gi.view({B, T, 3 * H}), h0.to(acc), w_hh.to(acc), b_hh.to(acc), ws, out);
  return {out.to(x.scalar_type()), ws};
}

std::tuple<int64_t, int64_t, int64_t, int64_t> check_backward_args(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  const auto [B, T, I, H] = check_x_and_w_hh(x, w_hh);
  check_tensor(grad_out, "grad_out", x, {B, T, H});
  check_tensor(h0, "h0", x, {B, H});
  check_tensor(w_ih, "w_ih", x, {3 * H, I});
  check_tensor(w_hh, "w_hh", x, {3 * H, H});
  const auto acc = acc_type(x.scalar_type());
  TORCH_CHECK(ws.scalar_type() == acc && ws.device() == x.device() && ws.is_contiguous() &&
                  ws.sizes() == at::IntArrayRef({B, T, 5 * H}),
              msg("vosgan gru_backward: ws must be the contiguous (B, T, 5H) ", acc,
                  " workspace returned by gru_forward, got ", ws.scalar_type(), " ", ws.sizes()));
  return {B, T, I, H};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
gru_backward_driver(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws,
                    BackwardRecurrence recurrence) {
  const auto [B, T, I, H] = check_backward_args(grad_out, x, h0, w_ih, w_hh, ws);
  const auto acc = acc_type(x.scalar_type());
  const auto xa = x.to(acc);
  const auto h0a = h0.to(acc);
  const auto w_iha = w_ih.to(acc);
  auto dgi = at::empty({B, T, 3 * H}, ws.options());
  auto dgh = at::empty({B, T, 3 * H}, ws.options());
  auto dh0 = at::empty({B, H}, ws.options());
  recurrence(grad_out.to(acc), h0a, w_hh.to(acc), ws, dgi, dgh, dh0);

  // Every remaining gradient is one GEMM or one reduction over all B*T steps.
  const auto dgi2 = dgi.view({B * T, 3 * H});
  const auto dgh2 = dgh.view({B * T, 3 * H});
  auto hprev = at::empty({B, T, H}, ws.options());  // h_{t-1} for every step
  hprev.select(1, 0).copy_(h0a);
  if (T > 1) {
    hprev.narrow(1, 1, T - 1).copy_(ws.narrow(2, 4 * H, H).narrow(1, 0, T - 1));
  }
  const auto dt = x.scalar_type();
  return {at::mm(dgi2, w_iha).view({B, T, I}).to(dt),
          dh0.to(dt),
          at::mm(dgi2.t(), xa.view({B * T, I})).to(dt),
          at::mm(dgh2.t(), hprev.view({B * T, H})).to(dt),
          dgi2.sum(0).to(dt),
          dgh2.sum(0).to(dt)};
}

}  // namespace vosgan

TORCH_LIBRARY(vosgan, m) {
  // Fake (meta) implementations are registered from Python in this module; autograd in
  // gru_autograd.cpp.
  m.set_python_module("vosgan.ops.gru");
  m.def(
      "gru_forward(Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor b_ih, Tensor b_hh)"
      " -> (Tensor out, Tensor ws)");
  m.def(
      "gru_backward(Tensor grad_out, Tensor x, Tensor h0, Tensor w_ih, Tensor w_hh, Tensor ws)"
      " -> (Tensor grad_x, Tensor grad_h0, Tensor grad_w_ih, Tensor grad_w_hh,"
      " Tensor grad_b_ih, Tensor grad_b_hh)");
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "vosgan native ops; importing registers torch.ops.vosgan.*";
#ifdef VOSGAN_WITH_CUDA
  m.attr("cuda_compiled") = true;
#else
  m.attr("cuda_compiled") = false;
#endif
  m.def("gru_cpu_isa", &vosgan::gru_cpu_isa,
        "Instruction set of the CPU GRU gate loops: avx2 or base (VOSGAN_GRU_ISA=base "
        "selects the portable one).");
  m.def("gru_cpu_gemm", &vosgan::gru_cpu_gemm,
        "Which engine runs the CPU GRU's GEMMs: oneDNN from a size up, or BLAS "
        "(VOSGAN_GRU_GEMM=auto|blas|onednn chooses).");
}
