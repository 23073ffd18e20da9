// Autograd for vosgan::gru_forward, registered in C++ (the Autograd dispatch key), and its
// autocast kernels (AutocastCPU / AutocastCUDA; see the end of this file).
//
// The op's backward is its own op, vosgan::gru_backward, so the graph holds one node per
// sequence. Registered here rather than with torch.library.register_autograd from Python: the
// Python wrapper's per-call work (pytree flattening, a Python backward, a second Python autograd
// dispatch for gru_backward) cost 0.5-2 ms per forward+backward on the 2-core CPU box, up to a
// fifth of the whole op at B=64, T=16, H=128. Fake (shape) implementations stay in Python
// (vosgan/ops/gru.py), so torch.compile traces both ops as before.
//
// Double backward is not supported: gru_backward's own Autograd kernel records a node whose
// backward raises, so `create_graph=True` works and a second differentiation fails loudly
// instead of returning wrong (zero) gradients.
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/autograd.h>
#include <torch/library.h>

#include <tuple>
#include <utility>

namespace vosgan {
namespace {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

std::tuple<at::Tensor, at::Tensor> call_forward(const at::Tensor& x, const at::Tensor& h0,
                                                const at::Tensor& w_ih, const at::Tensor& w_hh,
                                                const at::Tensor& b_ih, const at::Tensor& b_hh) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vosgan::gru_forward", "")
                       .typed<std::tuple<at::Tensor, at::Tensor>(
                           const at::Tensor&, const at::Tensor&, const at::Tensor&,
                           const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(x, h0, w_ih, w_hh, b_ih, b_hh);
}

using Grads = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

Grads call_backward(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                    const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("vosgan::gru_backward", "")
                       .typed<Grads(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                    const at::Tensor&, const at::Tensor&, const at::Tensor&)>();
  return op.call(grad_out, x, h0, w_ih, w_hh, ws);
}

variable_list as_list(Grads grads) {
  return std::apply([](auto&&... g) { return variable_list{std::move(g)...}; }, std::move(grads));
}

class GruForward : public torch::autograd::Function<GruForward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& h0,
                               const at::Tensor& w_ih, const at::Tensor& w_hh,
                               const at::Tensor& b_ih, const at::Tensor& b_hh) {
    at::AutoDispatchBelowADInplaceOrView guard;
    auto [out, ws] = call_forward(x, h0, w_ih, w_hh, b_ih, b_hh);
    ctx->mark_non_differentiable({ws});
    // ws takes no gradient: without this autograd would fill a (B, T, 5H) zero tensor for it
    // on every backward.
    ctx->set_materialize_grads(false);
    ctx->save_for_backward({x, h0, w_ih, w_hh, ws});
    return {out, ws};
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    const auto saved = ctx->get_saved_variables();
    const auto& x = saved[0];
    const auto& w_hh = saved[3];
    at::Tensor grad_out = grads[0];
    if (!grad_out.defined()) {  // only ws's (absent) gradient reached this node
      grad_out = at::zeros({x.size(0), x.size(1), w_hh.size(1)}, x.options());
    }
    return as_list(call_backward(grad_out.contiguous(), x, saved[1], saved[2], w_hh, saved[4]));
  }
};

class GruBackward : public torch::autograd::Function<GruBackward> {
 public:
  static variable_list forward(AutogradContext* ctx, const at::Tensor& grad_out,
                               const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih,
                               const at::Tensor& w_hh, const at::Tensor& ws) {
    at::AutoDispatchBelowADInplaceOrView guard;
    return as_list(call_backward(grad_out, x, h0, w_ih, w_hh, ws));
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    TORCH_CHECK(false,
                "vosgan gru: double backward through the fused GRU is not supported (VOS-GAN's "
                "R1 penalty differentiates D only); use impl='reference' for higher-order "
                "gradients");
    return {};
  }
};

std::tuple<at::Tensor, at::Tensor> gru_forward_autograd(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh) {
  auto outs = GruForward::apply(x, h0, w_ih, w_hh, b_ih, b_hh);
  return {outs[0], outs[1]};
}

Grads gru_backward_autograd(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  auto g = GruBackward::apply(grad_out, x, h0, w_ih, w_hh, ws);
  return {g[0], g[1], g[2], g[3], g[4], g[5]};
}

// Autocast: the GRU runs in float32 (its accumulation type) whatever autocast's low precision
// is, i.e. on autocast's fp32 list. float16/bfloat16 arguments are cast up (autograd records the
// casts, so gradients reach them in their own dtype) and autocast is excluded below this point:
// left on, it would cast the drivers' internal GEMMs (at::addmm, at::mm) down to bfloat16 and
// hand the float32 recurrence a bfloat16 input projection.
at::Tensor up(const at::Tensor& t) {
  const auto s = t.scalar_type();
  return s == at::kHalf || s == at::kBFloat16 ? t.to(at::kFloat) : t;
}

std::tuple<at::Tensor, at::Tensor> gru_forward_autocast(
    const at::Tensor& x, const at::Tensor& h0, const at::Tensor& w_ih, const at::Tensor& w_hh,
    const at::Tensor& b_ih, const at::Tensor& b_hh) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return call_forward(up(x), up(h0), up(w_ih), up(w_hh), up(b_ih), up(b_hh));
}

Grads gru_backward_autocast(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& h0,
                            const at::Tensor& w_ih, const at::Tensor& w_hh, const at::Tensor& ws) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  return call_backward(up(grad_out), up(x), up(h0), up(w_ih), up(w_hh), ws);
}

}  // namespace
}  // namespace vosgan

TORCH_LIBRARY_IMPL(vosgan, Autograd, m) {
  m.impl("gru_forward", &vosgan::gru_forward_autograd);
  m.impl("gru_backward", &vosgan::gru_backward_autograd);
}

TORCH_LIBRARY_IMPL(vosgan, AutocastCPU, m) {
  m.impl("gru_forward", &vosgan::gru_forward_autocast);
  m.impl("gru_backward", &vosgan::gru_backward_autocast);
}

TORCH_LIBRARY_IMPL(vosgan, AutocastCUDA, m) {
  m.impl("gru_forward", &vosgan::gru_forward_autocast);
  m.impl("gru_backward", &vosgan::gru_backward_autocast);
}
