// Per-thread scratch memory that survives between calls.
//
// A kernel's temporary buffers (packed GEMM operands, projections) are megabytes. Allocated
// and freed on every call, glibc hands such blocks back to the OS (munmap, or trimming the
// heap top) and the next call faults every page in again, each one zeroed by the kernel: on
// the 2-core test VM that was a quarter of an additive attention call (9.3 ms -> 7.0 ms with
// the pages kept). A Scratch<T, Tag> reuses one buffer per thread and tag instead, growing it
// when a call needs more; buffers above kScratchKeepBytes (16 MB) are released after use, so a
// rare huge call does not pin its memory (and for such calls the page faults are a small part
// of the work anyway). What stays: at most 16 MB per tag and thread, in practice the packed
// weights of the largest projection (3 MB for 1536 x 512 float32) and the additive kernels'
// projections. The contents are not initialised.
#pragma once

#include <cstddef>
#include <vector>

#include <Eigen/Core>

namespace attnext {

constexpr std::size_t kScratchKeepBytes = std::size_t(16) << 20;

// Tag: a type naming the use, so that two buffers used at once never share storage. A second
// Scratch of the same tag on the same thread while the first is alive (re-entry) gets a
// private buffer of its own.
template <typename T, typename Tag>
class Scratch {
 public:
  explicit Scratch(std::size_t n) {
    Slot& slot = this_thread_slot();
    if (slot.busy) {
      own_.resize(n);
      data_ = own_.data();
      return;
    }
    if (slot.buffer.size() < n) {
      slot.buffer = Buffer();  // release first: never hold the old and the new block at once
      slot.buffer.resize(n);
    }
    slot.busy = true;  // only once nothing can throw: the destructor will clear it
    slot_ = &slot;
    data_ = slot.buffer.data();
  }
  ~Scratch() {
    if (!slot_) return;
    if (slot_->buffer.size() * sizeof(T) > kScratchKeepBytes) slot_->buffer = Buffer();
    slot_->busy = false;
  }
  Scratch(const Scratch&) = delete;
  Scratch& operator=(const Scratch&) = delete;

  T* data() const { return data_; }

 private:
  using Buffer = std::vector<T, Eigen::aligned_allocator<T>>;
  struct Slot {
    Buffer buffer;
    bool busy = false;
  };
  static Slot& this_thread_slot() {
    thread_local Slot slot;
    return slot;
  }

  Slot* slot_ = nullptr;
  Buffer own_;
  T* data_ = nullptr;
};

}  // namespace attnext
