// The 16-bit reading types: bfloat16 and IEEE float16, stored as their bits. Kernels read them
// as `In` and accumulate in float (Acc); this header is the one place that knows how their
// bits turn into floats and back (the rounding rule of every bfloat16/float16 output), and
// which bfloat16 product path is active.
//
// Both types convert to float implicitly, so a kernel's generic `static_cast<Acc>(x)` reads
// them; vector loads of 16 values (load16) are here for the hot loops.
#pragma once

#include <atomic>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__AVX512F__) || defined(__F16C__)
#include <immintrin.h>
#endif

namespace attnext {

namespace lowp_detail {
inline float float_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
}
inline uint32_t bits_of(float f) {
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
}
}  // namespace lowp_detail

// bfloat16: the top 16 bits of a float32.
struct bf16 {
  uint16_t bits;
  operator float() const { return lowp_detail::float_from_bits(uint32_t(bits) << 16); }
};

// float32 -> bfloat16, THE rounding of every bfloat16 value attnext writes (outputs, packed
// operands, P before P.V): round to nearest even; NaN stays a (quiet) NaN of the same sign;
// float32 denormals become signed zero, as the AVX512_BF16 conversion (vcvtneps2bf16) does,
// so the scalar and vector forms give the same bits.
inline bf16 to_bf16(float f) {
  const uint32_t b = lowp_detail::bits_of(f);
  if ((b & 0x7f800000u) == 0x7f800000u && (b & 0x007fffffu))  // NaN
    return bf16{uint16_t((b >> 16) | 0x0040u)};
  if ((b & 0x7f800000u) == 0)  // zero or denormal
    return bf16{uint16_t((b >> 16) & 0x8000u)};
  const uint32_t rounded = b + 0x7fffu + ((b >> 16) & 1u);
  return bf16{uint16_t(rounded >> 16)};
}

// IEEE binary16.
inline float f16_to_float(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0x1f) return lowp_detail::float_from_bits(sign | 0x7f800000u | (man << 13));  // inf, NaN
  if (exp == 0) {
    if (man == 0) return lowp_detail::float_from_bits(sign);
    // denormal: value = man * 2^-24, exact in float
    const float v = float(man) * 5.9604644775390625e-08f;
    return sign ? -v : v;
  }
  return lowp_detail::float_from_bits(sign | ((exp + 112u) << 23) | (man << 13));
#endif
}

// float32 -> float16, round to nearest even (overflow to inf, NaN stays NaN), as F16C's
// vcvtps2ph with rounding mode 0 does.
inline uint16_t float_to_f16_bits(float f) {
#if defined(__F16C__)
  return _cvtss_sh(f, 0);
#else
  const uint32_t b = lowp_detail::bits_of(f);
  const uint16_t sign = uint16_t((b >> 16) & 0x8000u);
  const uint32_t abs = b & 0x7fffffffu;
  if (abs >= 0x7f800000u) return uint16_t(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u | ((abs >> 13) & 0x3ffu) : 0u));
  if (abs >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: inf
  if (abs < 0x38800000u) {                                  // below the smallest normal half
    // denormal half: value / 2^-24 rounded to nearest even, by float addition's own rounding
    const float scaled = lowp_detail::float_from_bits(abs) + 0.5f;  // 0.5 = 2^-1 puts 2^-24 at the last bit
    return uint16_t(sign | (lowp_detail::bits_of(scaled) - 0x3f000000u));
  }
  const uint32_t rounded = abs + 0xfffu + ((abs >> 13) & 1u);
  return uint16_t(sign | ((rounded - 0x38000000u) >> 13));
#endif
}

struct f16 {
  uint16_t bits;
  operator float() const { return f16_to_float(bits); }
};

inline f16 to_f16(float f) { return f16{float_to_f16_bits(f)}; }

template <typename T>
struct is_lowp : std::false_type {};
template <>
struct is_lowp<bf16> : std::true_type {};
template <>
struct is_lowp<f16> : std::true_type {};

// float -> T for every output type (float and double pass through).
template <typename T>
inline T from_float(float x) {
  if constexpr (std::is_same<T, bf16>::value)
    return to_bf16(x);
  else if constexpr (std::is_same<T, f16>::value)
    return to_f16(x);
  else
    return static_cast<T>(x);
}

#if defined(__AVX512F__)
// 16 consecutive values as 16 floats.
inline __m512 load16(const bf16* p) {
  return _mm512_castsi512_ps(
      _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
inline __m512 load16(const f16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
#endif

// The accumulation type of a reading type: float for the 16-bit types, the type itself for
// float and double. Masks, biases, weights and lse of a 16-bit call are of this type.
template <typename In>
struct acc_of {
  using type = In;
};
template <>
struct acc_of<bf16> {
  using type = float;
};
template <>
struct acc_of<f16> {
  using type = float;
};
template <typename In>
using acc_t = typename acc_of<In>::type;

// An accumulated value (float or double) stored as Out: from_float's rounding for the 16-bit
// types, a plain conversion otherwise (a double result stays double, never through float).
template <typename Out, typename Acc>
inline Out store_as(Acc x) {
  if constexpr (is_lowp<Out>::value)
    return from_float<Out>(static_cast<float>(x));
  else
    return static_cast<Out>(x);
}

#if defined(__AVX512F__)
// 16 floats stored as 16 bfloat16 / float16 values by exactly the scalar rules above: to_bf16's
// round to nearest even with NaN quieted and float32 denormals flushed to signed zero, in
// integer lanes; float16 by vcvtps2ph with round to nearest even, as _cvtss_sh(x, 0).
inline void store16(const float* src, bf16* dst) {
  const __m512i b = _mm512_castps_si512(_mm512_loadu_ps(src));
  const __m512i high = _mm512_srli_epi32(b, 16);
  const __m512i exp = _mm512_and_si512(b, _mm512_set1_epi32(0x7f800000));
  const __mmask16 special = _mm512_cmpeq_epi32_mask(exp, _mm512_set1_epi32(0x7f800000));
  const __mmask16 nan = special & _mm512_test_epi32_mask(b, _mm512_set1_epi32(0x007fffff));
  const __mmask16 tiny = _mm512_cmpeq_epi32_mask(exp, _mm512_setzero_si512());
  const __m512i bias = _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(high, _mm512_set1_epi32(1)));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, bias), 16);
  r = _mm512_mask_mov_epi32(r, nan, _mm512_or_si512(high, _mm512_set1_epi32(0x0040)));
  r = _mm512_mask_mov_epi32(r, tiny, _mm512_and_si512(high, _mm512_set1_epi32(0x8000)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), _mm512_cvtepi32_epi16(r));
}
inline void store16(const float* src, f16* dst) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst),
                      _mm512_cvtps_ph(_mm512_loadu_ps(src), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#endif

// dst[i] = store_as<Out>(src[i]) for n values: a kernel's row or tile of Acc results at its store,
// 16 at a time by store16 (any AVX-512 build: the same bits as the scalar rule).
template <typename Out, typename Acc>
inline void store_row(const Acc* src, std::int64_t n, Out* dst) {
  std::int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (is_lowp<Out>::value && std::is_same<Acc, float>::value)
    for (; i + 16 <= n; i += 16) store16(src + i, dst + i);
#endif
  for (; i < n; ++i) dst[i] = store_as<Out>(src[i]);
}

// Where a kernel computes a row or tile of Acc results bound for out: out itself when Out is
// Acc (no staging, no copy), else `scratch`, to be stored with store_row once complete.
template <typename Acc, typename Out>
inline Acc* staged(Out* out, Acc* scratch) {
  if constexpr (std::is_same<Out, Acc>::value)
    return out;
  else
    return scratch;
}

// dst[i] = src[i * stride] as Acc for n values: the exact widening load of a row (bf16 and
// f16 values are exactly representable in float).
template <typename Acc, typename In>
inline void load_row(const In* src, std::int64_t stride, std::int64_t n, Acc* dst) {
  if (stride == 1 && std::is_same<In, Acc>::value) {
    if (n > 0) std::memcpy(dst, src, sizeof(Acc) * static_cast<std::size_t>(n));
    return;
  }
  std::int64_t i = 0;
#if defined(__AVX512F__)
  if constexpr (is_lowp<In>::value && std::is_same<Acc, float>::value)
    if (stride == 1)
      for (; i + 16 <= n; i += 16) _mm512_storeu_ps(dst + i, load16(src + i));
#endif
  for (; i < n; ++i) dst[i] = static_cast<Acc>(src[i * stride]);
}

// --- Which bfloat16 product path runs ------------------------------------------------------

// The AVX512_BF16 dot-product instruction (vdpbf16ps) is compiled in.
constexpr bool kHaveBf16Dot =
#if defined(__AVX512BF16__)
    true;
#else
    false;
#endif

// The bfloat16 paths, best first: AMX tiles (amx.hpp), vdpbf16ps, the float32 fallback.
// _core.set_bf16_path (or ATTNEXT_BF16 when attnext is imported) caps the path a call may
// take, so that one build tests every path its CPU has: "auto" (no cap), "avx512_bf16" (no
// AMX), "fallback" (float32 math everywhere).
enum class Bf16Cap : int { none = 0, no_amx = 1, fallback = 2 };

inline std::atomic<Bf16Cap>& bf16_cap() {
  static std::atomic<Bf16Cap> cap{Bf16Cap::none};
  return cap;
}

inline bool bf16_dot_active() { return kHaveBf16Dot && bf16_cap().load(std::memory_order_relaxed) != Bf16Cap::fallback; }

}  // namespace attnext
