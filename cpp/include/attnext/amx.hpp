// AMX-BF16 tiles: whether the build has them, whether this process may use them, and the
// tile configuration that every AMX kernel loads for its work unit.
//
// A tile is up to 16 rows of 64 bytes; tdpbf16ps multiplies a tile of 16 x 32 bfloat16 (A, row
// major) by one of 16 x 16 bfloat16 pairs (B, k pairs interleaved: vdpbf16ps's pair layout) into
// 16 x 16 float32 (C), products exact and sums in float32. Linux hands out the tile state only
// to processes that ask for it (arch_prctl ARCH_REQ_XCOMP_PERM); the grant is the process's, so
// OpenMP threads and forked children share it. Each thread loads its own configuration and
// releases it when its unit ends (TileScope), so an idle thread carries no tile state.
#pragma once

#include <cstdint>
#include <cstring>

#include "lowp.hpp"

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif
#endif

namespace attnext {

constexpr bool kHaveAmx =
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
    true;
#else
    false;
#endif

// Asks the kernel for the tile data state once per process; false where it refuses (no AMX, a
// kernel before 5.16) or on a system without the request.
inline bool amx_permitted() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
  static const bool granted = [] {
    constexpr long kReqXcompPerm = 0x1023, kXfeatureTileData = 18;
    return syscall(SYS_arch_prctl, kReqXcompPerm, kXfeatureTileData) == 0;
  }();
  return granted;
#else
  return false;
#endif
}

// The AMX path runs: built in, granted, and not capped by set_bf16_path.
inline bool amx_active() {
  return kHaveAmx && bf16_cap().load(std::memory_order_relaxed) == Bf16Cap::none && amx_permitted();
}

// For build_info()["bf16"]: the path a bfloat16 product takes now.
inline const char* bf16_path_name() {
  if (amx_active()) return "amx_bf16";
  if (bf16_dot_active()) return bf16_cap().load() == Bf16Cap::none ? "avx512_bf16" : "avx512_bf16 (capped)";
  return kHaveBf16Dot ? "float32 fallback (forced)" : "float32 fallback";
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The 64-byte operand of ldtilecfg: palette 1, then per tile its bytes per row and rows.
struct alignas(64) TileConfig {
  std::uint8_t palette = 1, start_row = 0, reserved[14] = {};
  std::uint16_t colsb[16] = {};
  std::uint8_t rows[16] = {};

  TileConfig& set(int tile, int nrows, int bytes_per_row) {
    rows[tile] = static_cast<std::uint8_t>(nrows);
    colsb[tile] = static_cast<std::uint16_t>(bytes_per_row);
    return *this;
  }
};
static_assert(sizeof(TileConfig) == 64, "ldtilecfg reads 64 bytes");

// Every tile 16 rows x 64 bytes: the one configuration of attnext's AMX kernels (SDPA, the
// packed GEMM, the peak probe), which pad their operands to whole tiles instead of shaping
// tiles to them.
inline const TileConfig& full_tiles() {
  static const TileConfig config = [] {
    TileConfig c;
    for (int t = 0; t < 8; ++t) c.set(t, 16, 64);
    return c;
  }();
  return config;
}

// Loads a configuration for the calling thread's current unit; releases the tiles on exit.
class TileScope {
 public:
  explicit TileScope(const TileConfig& config) { _tile_loadconfig(&config); }
  ~TileScope() { _tile_release(); }
  TileScope(const TileScope&) = delete;
  TileScope& operator=(const TileScope&) = delete;
};
#endif

}  // namespace attnext
