// Per-thread scratch memory that survives between calls, and the one rule that bounds it.
//
// A kernel's temporary buffers (packed GEMM operands, projections, SDPA tiles) are megabytes.
// Allocated and freed on every call, glibc hands such blocks back to the OS (munmap, or
// trimming the heap top) and the next call faults every page in again, each one zeroed by the
// OS: a measurable part of a small call. So buffers are kept per thread and reused, growing
// when a call needs more.
//
// The scratch rule: a buffer above kScratchKeepBytes (16 MB) is released as soon as the work
// that used it ends, so a rare huge call does not pin its memory (for such calls the page
// faults are a small part of the work anyway). What stays: at most 16 MB per buffer and thread.
// Two ways to follow it, both below, and every kernel uses one of them:
//   - Scratch<T, Tag>: a buffer borrowed for a scope (the rule applied by its destructor);
//   - a kernel's own thread_local workspace struct, with a ScratchRelease guard naming its
//     buffers for the scope of one unit of work (the rule applied by the guard's destructor).
// The contents are not initialised.
#pragma once

#include <cstddef>
#include <tuple>
#include <vector>

#include <Eigen/Core>

namespace attnext {

constexpr std::size_t kScratchKeepBytes = std::size_t(16) << 20;

// The scratch rule for one std::vector-like buffer: frees it when its storage exceeds
// kScratchKeepBytes (swap with an empty one: clear() or shrink_to_fit() may keep the block).
template <typename Vec>
void release_if_large(Vec& buffer) {
  if (buffer.capacity() * sizeof(typename Vec::value_type) > kScratchKeepBytes) Vec().swap(buffer);
}

// RAII form of release_if_large for the buffers of a kernel's thread_local workspace, so the
// rule holds on every exit from the unit of work (exceptions included):
//   thread_local Workspace<T> w;
//   const ScratchRelease release(w.qt, w.st, w.ot);   // w's large buffers go when the unit ends
template <typename... Vecs>
class ScratchRelease {
 public:
  explicit ScratchRelease(Vecs&... buffers) : buffers_(buffers...) {}
  ~ScratchRelease() {
    std::apply([](auto&... b) { (release_if_large(b), ...); }, buffers_);
  }
  ScratchRelease(const ScratchRelease&) = delete;
  ScratchRelease& operator=(const ScratchRelease&) = delete;

 private:
  std::tuple<Vecs&...> buffers_;
};

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
      Buffer().swap(slot.buffer);  // release first: never hold the old and the new block at once
      slot.buffer.resize(n);
    }
    slot.busy = true;  // only once nothing can throw: the destructor will clear it
    slot_ = &slot;
    data_ = slot.buffer.data();
  }
  ~Scratch() {
    if (!slot_) return;
    release_if_large(slot_->buffer);
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
