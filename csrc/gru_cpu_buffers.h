// Memory for the CPU GRU kernels (gru_cpu.cpp): reusable per-thread temporaries and a bounded
// pool for the workspace output, so that large buffers are not fresh pages on every call.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include "gru.h"

#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <unordered_map>
#include <vector>

namespace vosgan::cpu {

// Per-thread buffers for the temporaries (slot 0: the forward's gi chunk, at most ~512 KiB;
// slot 1: the backward's dgh and dgn, T*B*4H; slot 2: the backward's transposed h_{t-1}, T*B*H,
// on the oneDNN engine), reused across calls and grown to the largest size seen. Allocated fresh
// every call, buffers of several MiB come from mmap (glibc's threshold) whenever other
// allocations ran in between, and their first-touch page faults cost up to a fifth of the op
// (B64-T32-H256 fwd+bwd interleaved with nn.GRU: ~2000 faults and about +9 ms a call). No buffer
// outlives the call that takes it, and nothing inside a call takes the same slot twice.
constexpr int kScratchSlots = 3;

inline at::Tensor scratch(int slot, at::IntArrayRef sizes, const at::TensorOptions& options) {
  thread_local at::Tensor buffers[kScratchSlots];
  TORCH_INTERNAL_ASSERT(slot >= 0 && slot < kScratchSlots, "vosgan gru: no scratch slot ", slot);
  int64_t numel = 1;
  for (const int64_t s : sizes) {
    numel *= s;
  }
  at::Tensor& buf = buffers[slot];
  if (!buf.defined() || buf.numel() < numel || buf.scalar_type() != options.dtype()) {
    buf = at::Tensor();  // free the old one first
    buf = at::empty({numel}, options);
  }
  return buf.narrow(0, 0, numel).view(sizes);
}

// Recycles the memory of the forward's workspace output ws (5H floats per step and sequence, 10 MiB
// at B64-T32-H256). A fresh allocation that size comes from mmap and costs a page fault per 4 KiB
// on first touch, every call (about 2500 faults at that shape); with the pool, the buffer freed by
// the previous step's backward is handed to the next forward. At most kPerSize buffers of one size
// and kMaxBytes in all are kept; the rest are freed. The pool is never destroyed, since a ws may be
// freed after static destructors have run.
class WorkspacePool {
 public:
  static WorkspacePool& instance() {
    static auto* pool = new WorkspacePool();
    return *pool;
  }

  at::Tensor take(at::IntArrayRef sizes, const at::TensorOptions& options) {
    size_t bytes = options.dtype().itemsize();
    for (const int64_t s : sizes) {
      bytes *= static_cast<size_t>(s);
    }
    bytes = (bytes + kAlign - 1) / kAlign * kAlign;
    void* data = nullptr;
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto it = free_.find(bytes);
      if (it != free_.end() && !it->second.empty()) {
        data = it->second.back();
        it->second.pop_back();
        cached_ -= bytes;
      }
    }
    if (data == nullptr) {
      data = std::aligned_alloc(kAlign, bytes);
      TORCH_CHECK(data != nullptr,
                  msg("vosgan gru: out of memory allocating a ", bytes, "-byte workspace"));
    }
    return at::from_blob(
        data, sizes, [bytes](void* p) { instance().give(p, bytes); }, options);
  }

 private:
  static constexpr size_t kAlign = 64;
  static constexpr size_t kPerSize = 4;
  static constexpr size_t kMaxBytes = size_t(256) << 20;

  void give(void* data, size_t bytes) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      auto& list = free_[bytes];
      if (list.size() < kPerSize && cached_ + bytes <= kMaxBytes) {
        list.push_back(data);
        cached_ += bytes;
        return;
      }
    }
    std::free(data);
  }

  std::mutex mutex_;
  std::unordered_map<size_t, std::vector<void*>> free_;
  size_t cached_ = 0;
};

}  // namespace vosgan::cpu
