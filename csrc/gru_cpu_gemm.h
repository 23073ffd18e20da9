// The GEMM engines of the CPU GRU (gru_cpu.cpp).
//
// RepeatedGemm runs the products whose right operand is the same on every step of a call: the
// per-step hidden projection h_{t-1} @ w_hh^T (forward), the per-step hidden-state gradient
// dgh_t @ w_hh (backward) and the chunked input projection x @ w_ih^T. The backward's
// dW_hh = dgh^T @ h_{t-1} picks its engine the same way. Two engines:
// - BLAS: at::mm into a preallocated output (MKL in torch's x86 wheels).
// - oneDNN: torch's own build of it, reached through the mkldnn::_linear_pointwise op, which
//   returns a fresh (M, N) output: the one allocation per step of this path. The right operand
//   is passed as it is: packing it once per call (mkldnn::_reorder_linear_weight, about 85 us)
//   made the op 1.13-1.36x slower at five benchmark shapes on the dev box.
// On the AMD EPYC (Zen 5) dev box MKL's sgemm reaches about 105 GFLOP/s per core at these shapes
// and oneDNN about 200: h_{t-1} @ w_hh^T at B=64, H=256 takes 254 us against 132 us on one
// thread. oneDNN's fixed cost per call, about 10 us, loses at small sizes: 3.6 us against 13.5 us
// at B=8, H=64. So `auto` picks oneDNN for float32 products of at least kOneDnnMinMacs
// multiply-adds (benchmarks/RESULTS.md, twenty-first session).
//
// VOSGAN_GRU_GEMM=auto|blas|onednn chooses (read on every call; the tests check both engines
// against nn.GRU). torch.backends.mkldnn.enabled = False also selects BLAS. The oneDNN products
// are deterministic and gave the same bits at one and two threads on that box.
#pragma once

#include <ATen/Context.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/mm.h>

#include "gru.h"

#include <cstdint>
#include <cstdlib>
#include <optional>
#include <string>

namespace vosgan::cpu {

// m^T as a new row-major matrix, m (R, C) float or double -> (C, R), or written into dst (C, R),
// contiguous; m's rows may be strided (gru_cpu.cpp).
at::Tensor transposed(const at::Tensor& m);
void transpose_into(const at::Tensor& m, at::Tensor& dst);

// m (R, C) as a row-major matrix: m itself, or a copy.
inline at::Tensor row_major(const at::Tensor& m) {
  if (m.is_contiguous()) {
    return m;
  }
  return m.t().is_contiguous() ? transposed(m.t()) : m.contiguous();
}

// M * K * N from which `auto` uses oneDNN. The forward's step GEMM on the dev box, BLAS against
// oneDNN, one thread / two threads: B=16, H=128 (0.8 M) 18.7 / 13.5 us against 21.3 / 18.9;
// B=32, H=128 (1.6 M) 32.8 / 20.8 against 28.1 / 23.3; B=64, H=128 and B=16, H=256 (3.1 M)
// 1.3-1.5x faster on oneDNN.
constexpr int64_t kOneDnnMinMacs = int64_t(1) << 21;

enum class GemmEngine { kBlas, kOneDnn };

// oneDNN's linear op, looked up once, or why it cannot be used.
struct OneDnnOps {
  using Linear = at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            c10::string_view, c10::List<std::optional<at::Scalar>>,
                            std::optional<c10::string_view>);
  std::optional<c10::TypedOperatorHandle<Linear>> linear;
  std::string missing;  // empty when it is usable

  static const OneDnnOps& get() {
    static const OneDnnOps ops = [] {
      OneDnnOps found;
      auto& dispatcher = c10::Dispatcher::singleton();
      const auto linear = dispatcher.findSchema({"mkldnn::_linear_pointwise", ""});
      if (!linear || !linear->hasKernelForDispatchKey(c10::DispatchKey::CPU)) {
        found.missing = "this torch build has no CPU kernels for mkldnn::_linear_pointwise";
        return found;
      }
      try {
        found.linear = linear->typed<Linear>();
      } catch (const c10::Error& e) {  // the schema changed in this torch version
        found.missing = msg("mkldnn::_linear_pointwise has an unexpected schema: ",
                            e.what_without_backtrace());
      }
      return found;
    }();
    return ops;
  }
};

// The engine for an (M, K) @ (K, N) product of `dtype`, from VOSGAN_GRU_GEMM (auto when unset):
// blas, always BLAS; onednn, oneDNN for every float32 product (an error where it cannot run);
// auto, oneDNN for float32 products of at least kOneDnnMinMacs where it can run. float64 (the
// gradcheck tests) always runs on BLAS: oneDNN has no float64 kernels.
inline GemmEngine pick_engine(int64_t M, int64_t K, int64_t N, at::ScalarType dtype) {
  const char* env = std::getenv("VOSGAN_GRU_GEMM");
  const std::string wanted = env == nullptr || *env == '\0' ? "auto" : env;
  TORCH_CHECK(wanted == "auto" || wanted == "blas" || wanted == "onednn",
              msg("VOSGAN_GRU_GEMM=", wanted, " is not an engine; choose auto, blas or onednn"));
  if (wanted == "blas" || dtype != at::kFloat) {
    return GemmEngine::kBlas;
  }
  const std::string& missing = OneDnnOps::get().missing;
  const bool enabled = at::globalContext().userEnabledMkldnn();
  if (wanted == "onednn") {
    TORCH_CHECK(missing.empty() && enabled,
                msg("VOSGAN_GRU_GEMM=onednn, but oneDNN cannot run here: ",
                    missing.empty() ? std::string("torch.backends.mkldnn.enabled is False")
                                    : missing));
    return GemmEngine::kOneDnn;
  }
  if (M * K * N < kOneDnnMinMacs || !enabled) {
    return GemmEngine::kBlas;
  }
  if (!missing.empty()) {
    TORCH_WARN_ONCE("vosgan gru: the CPU GRU's large GEMMs run on BLAS, because ", missing);
    return GemmEngine::kBlas;
  }
  return GemmEngine::kOneDnn;
}

// What `auto` does on this build, for vosgan.backend.
inline std::string gemm_engine_summary() {
  const auto& ops = OneDnnOps::get();
  if (!ops.missing.empty()) {
    return "BLAS GEMMs (oneDNN unavailable: " + ops.missing + ")";
  }
  return msg("oneDNN for float32 GEMMs of >= ", kOneDnnMinMacs, " multiply-adds, BLAS below");
}

// x (M, K) @ w (N, K)^T on oneDNN; x's rows may be strided, and w may be in either stride order.
inline at::Tensor onednn_linear(const at::Tensor& x, const at::Tensor& w) {
  return (*OneDnnOps::get().linear)
      .call(x, w, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// x (M, K) @ rhs (K, N) for many x with the same rhs and row count M (the last of a series may
// have fewer rows). Rows of x may be strided (a column block of a wider matrix).
class RepeatedGemm {
 public:
  // rhs_kn: (K, N), any strides; M: the rows of x.
  RepeatedGemm(const at::Tensor& rhs_kn, int64_t M)
      : engine_(pick_engine(M, rhs_kn.size(0), rhs_kn.size(1), rhs_kn.scalar_type())),
        // oneDNN takes the right operand as a linear layer's (N, K) weight, in either stride
        // order.
        rhs_(engine_ == GemmEngine::kBlas ? row_major(rhs_kn) : rhs_kn.t()) {}

  // x @ rhs: written into out (M, N) by BLAS, or a new tensor from oneDNN; returns the result.
  at::Tensor mm(const at::Tensor& x, at::Tensor& out) const {
    if (engine_ == GemmEngine::kOneDnn) {
      return onednn_linear(x, rhs_);
    }
    at::mm_out(out, x, rhs_);
    return out;
  }

  // acc (M, N) += x @ rhs.
  void addmm_(at::Tensor& acc, const at::Tensor& x) const {
    if (engine_ == GemmEngine::kOneDnn) {
      acc.add_(onednn_linear(x, rhs_));
    } else {
      acc.addmm_(x, rhs_);
    }
  }

 private:
  GemmEngine engine_;
  at::Tensor rhs_;  // BLAS: a row-major (K, N) matrix; oneDNN: an (N, K) view
};

}  // namespace vosgan::cpu
