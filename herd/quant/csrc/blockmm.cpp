// Matmuls over block-quantized weights, the way llama.cpp computes GGUF blocks on a CPU: the activations are
// quantized to int8 in blocks of 32 (one float scale each), every 32-element block of a weight row is multiplied
// with them in integers (u8 x s8 multiply-adds: VNNI where the CPU has it, else AVX2), and each block's integer sum
// is scaled in float.
//
// Weights: `qs` holds 4-bit codes (two per byte: in each 32-element chunk, byte j carries element j in its low
// nibble and element j + 16 in its high one, as GGUF's Q4_0/Q4_1 do) or int8 codes; `scales` [N, K / group] and,
// where the format has them (Q4_1, Q4_K, Q5_1, Q5_K), `mins` [N, K / group]: a weight is code * scale + min. A group
// is a multiple of 32 elements, or 16 for int8 codes without mins (GGUF's Q6_K, whose scales cover 16 weights: each
// half block's integer sum is then scaled on its own).
//
// Every output is computed by one arithmetic: for each block b in order, sum = fma(float(I_b), scale_g * d_b, sum),
// where I_b is the exact integer dot product of the block's codes with the token's int8 codes and d_b the token's
// block scale; after each group, sum = fma(min_g, s_g, sum), s_g being the token's sum of d_b * codes over the
// group. The integer paths read the weight as panels of 16 rows repacked so that one instruction serves eight rows
// (see Panel); a layer packs its panels once and keeps them, since even one token computes faster from them than
// from the rows as stored. A token's numbers never depend on how many tokens share its call: a guessed token
// checked beside others, a sequence in a batch of any size all compute exactly as alone.
//
// Prompt tokens, where the CPU has VNNI, take two levels of int8 codes (without it float activations, which are
// faster there: see blocks.py): each block's rounding error is quantized again at 1/254 of the block's scale, and
// I_b becomes 254 * (the first level's sum) + the second's, still an exact integer, scaled by the finer scale. A
// prompt then computes as with float activations (KL divergence from them ~1e-7 on the default model, against
// ~3e-3 with one level: enough to change the answer to a question the model is unsure of), at about half the
// integer speed, still about 1.7x float32's. A prompt computes the same however it is chunked (a prefix-cache hit
// computes only its last tokens).
//
// Weight-only layers (float activations) multiply the stored weights exactly: the widened codes for a few tokens,
// the weight expanded to float32 (herd_dequantize) and the BLAS GEMM for more.
//
// herd_decode_blocks (at the end) runs transformer blocks for an engine forward's generated tokens, or its prompt
// tokens, on these matmuls.
//
// Plain C entry points over raw pointers (called through ctypes): no torch headers, so it compiles in seconds.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AMX_INT8__) && defined(__AMX_TILE__) && defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define HERD_AMX 1  // the tile unit's int8 products (see panel_tokens_amx)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace {

constexpr int QK = 32;

// One token's activations as int8 blocks: the codes, the scale of each block, and per group of `per_group` blocks
// the sum of scale * codes (what a 4-bit weight group's min multiplies); `sums`, where given, gets each block's sum
// of codes. With `q2` (prompts: see the top of the file) each block's rounding error is quantized again, at
// 1/254 of the block's scale: the block then stands for (254 * q + q2) * d, and `d` holds that finer scale.
void quantize_acts(const float* x, int64_t K, int64_t per_group, int8_t* q, float* d, float* group_sums,
                   int32_t* sums = nullptr, int8_t* q2 = nullptr) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);  // undoes the packs' lane interleaving
  auto codes = [&](const __m256* v, float scale, int8_t* to) {  // round(v / scale) into `to`; their sum
    const __m256 inverse = _mm256_set1_ps(scale != 0.f ? 1.f / scale : 0.f);
    __m256i c[4];
    for (int i = 0; i < 4; ++i)  // to nearest, ties to even, as torch.round
      c[i] = _mm256_cvtps_epi32(
          _mm256_round_ps(_mm256_mul_ps(v[i], inverse), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i packed = _mm256_packs_epi16(_mm256_packs_epi32(c[0], c[1]), _mm256_packs_epi32(c[2], c[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(to), _mm256_permutevar8x32_epi32(packed, order));
    const __m256i s8 = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s8), _mm256_extracti128_si256(s8, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    return _mm_cvtsi128_si32(_mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1)));
  };
  for (int64_t b = 0; b < K / QK; ++b) {
    __m256 v[4];
    for (int i = 0; i < 4; ++i) v[i] = _mm256_loadu_ps(x + b * QK + 8 * i);
    const __m256 m8 = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                    _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
    __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(m8), _mm256_extractf128_ps(m8, 1));
    m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
    const float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
    const float db = amax / 127.f;
    const int sum = codes(v, db, q + b * QK);
    group_sums[b / per_group] += db * static_cast<float>(sum);
    if (!q2) {
      d[b] = db;
      if (sums) sums[b] = sum;
      continue;
    }
    // What rounding left, within half a step of db either way: 127 finer steps of db / 254 cover it.
    const int8_t* c = q + b * QK;
    __m256 r[4];
    for (int i = 0; i < 4; ++i) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * i));
      const __m256 back = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(bytes));
      r[i] = _mm256_sub_ps(v[i], _mm256_mul_ps(back, _mm256_set1_ps(db)));
    }
    const float fine = db / 254.f;
    const int sum2 = codes(r, fine, q2 + b * QK);
    group_sums[b / per_group] += fine * static_cast<float>(sum2);
    d[b] = fine;
    if (sums) sums[b] = 254 * sum + sum2;
  }
}

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// The paged cache holds keys and values as float32 or, on the kernel's path, float16 (stored as uint16_t): half the
// bytes to read, and a long context's keys and values outweigh the model's weights in a batch's decode step. Eight
// lanes of a row, or one value, as float32.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float load1(float v) { return v; }
inline float load1(uint16_t v) { return _cvtsh_ss(v); }

// sum of a[i] * b[i], eight at a time.
template <typename B>
inline float dot(const float* a, const B* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), load8(b + i), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * load1(b[i]);
  return sum;
}

// Asks for the weight bytes a little ahead of those being multiplied. A decode step reads every weight once, from
// memory, and the hardware prefetchers of the CPUs measured here fell behind that stream: asking ahead made one
// token's matmul over the tied output layer (49152 x 576, 8-bit) up to 2x faster, and a sequence's decode on the
// default model 3-13% faster (README). Two kilobytes ahead (eight 4-bit blocks of a panel) rather than 512 bytes made
// a decode step of 16 sequences 7% faster and one sequence's 6-11% (Intel Xeon, medians of 10-12 rounds alternating
// in one process; 4 and 8 KB measured alike): a busy step spends long enough on a block that 512 bytes came too late.
constexpr int64_t AHEAD = 2048;
inline void prefetch_ahead(const uint8_t* p, int64_t bytes) {
  for (int64_t off = 0; off < bytes; off += 64)
    _mm_prefetch(reinterpret_cast<const char*>(p + AHEAD + off), _MM_HINT_T0);
}

// 32 unsigned codes (0..15) from 16 bytes of nibbles: low nibbles first, then high ones.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// acc plus eight int32 partial sums of u (unsigned bytes) times s (signed bytes), four adjacent pairs each.
inline __m256i dpbusd(__m256i acc, __m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(acc, u, s);
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
  return _mm256_dpbusd_epi32(acc, u, s);
#else
  // Pair sums stay below 2 * 255 * 127 < 32767 only because codes are at most 15 (4-bit) or |w| <= 127 (8-bit,
  // signs moved onto the activations), so the saturating 16-bit step never clips.
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1)));
#endif
}

// The integer paths take the weight PANEL rows at a time, repacked into lane order: for each block, four bytes (a
// quad of adjacent elements) of each of the panel's rows side by side, so that one multiply-add of a vector of
// weights with a token's quad broadcast to every lane adds four products to each of eight rows' sums. 4-bit rows
// need no reordering within a block: byte j already holds elements j (low nibble) and j + 16 (high one), so a
// repacked vector holds two quads. 8-bit codes are signed: with VNNI they are offset to unsigned (w + 128) and
// 128 times the token's block sum taken off again; without it the weights' signs move onto the activations.

constexpr int PANEL = 16;  // weight rows per tile: two vectors of eight int32 lanes
#if defined(__AVXVNNI__) || (defined(__AVX512VNNI__) && defined(__AVX512VL__))
constexpr bool kVnni = true;
#else
constexpr bool kVnni = false;
#endif
// Tokens per tile, as many as the vector registers hold sums for: with two levels (a token's integer sums twice
// over) 4-bit codes computed 10% faster four tokens at a time than two, while 8-bit ones (their offsets take
// registers too) spilled at four and ran 7% slower.
#if defined(__AVX512VL__)
constexpr int TILE_TOKENS = 4;  // 32 vector registers hold a 16 x 4 tile's integer and float sums
constexpr int TILE2 = 4, TILE2_BYTES = 2;
#else
constexpr int TILE_TOKENS = 2;  // 16 registers
constexpr int TILE2 = 1, TILE2_BYTES = 1;
#endif

// One panel in memory: codes [blocks][bytes of a block per row / 4][PANEL][4], then scales [groups][PANEL] and,
// where the weight has them, mins [groups][PANEL], as float32, or as float16 where every one of them is a float16
// value (GGUF's Q4_0, Q4_1, Q5_0, Q5_1 and Q8_0 store them so): a token's step reads every weight once, and four
// bytes fewer per 32 weights (a scale and a min) is a sixth less to read for 4-bit codes with mins. A layer packs its
// panels once (herd_pack) and keeps them, after a header saying which, as the weight's only copy: the paths that read
// rows (float activations, dequantizing) unpack a panel at a time (unpack_panel). A weight without panels is packed
// panel by panel (float32) as it is multiplied.
struct Panel {
  const uint8_t* codes;
  const void* scales;
  const void* mins;  // null: no mins
  bool half;
};

// Eight scales or mins from element i on, as float32.
inline __m256 eight(const void* values, bool half, int64_t i) {
  if (half) return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(
                                   static_cast<const uint16_t*>(values) + i)));
  return _mm256_loadu_ps(static_cast<const float*>(values) + i);
}

struct PackedHeader {  // what a packed weight starts with
  int64_t half;  // scales and mins held as float16
  int64_t mins;  // the weight has mins
};
constexpr int64_t HEADER = 64;  // keeps the panels after it aligned as they were

int64_t panel_code_bytes(int64_t K, int64_t bits) { return K / QK * (bits == 4 ? QK / 2 : QK) * PANEL; }

int64_t panel_bytes(int64_t K, int64_t bits, int64_t group, bool mins, bool half) {
  return panel_code_bytes(K, bits) + (K / group) * PANEL * (half ? 2 : 4) * (mins ? 2 : 1);
}

Panel panel_at(const uint8_t* at, int64_t K, int64_t bits, int64_t group, bool mins, bool half) {
  const uint8_t* scales = at + panel_code_bytes(K, bits);
  return {at, scales, mins ? scales + (K / group) * PANEL * (half ? 2 : 4) : nullptr, half};
}

// A packed weight's header, and the bytes of each of its panels.
struct Packing {
  bool half, mins;
  int64_t bytes;
};

Packing packing(const uint8_t* packed, int64_t K, int64_t bits, int64_t group) {
  const auto* header = reinterpret_cast<const PackedHeader*>(packed);
  const bool half = header->half != 0, mins = header->mins != 0;
  return {half, mins, panel_bytes(K, bits, group, mins, half)};
}

// Whether pack_panel offsets 8-bit codes to unsigned (see panel_halves for the other 8-bit codes).
inline bool offset_codes(int64_t bits, int64_t group) { return bits == 8 && kVnni && group >= QK; }

// Rows [r0, r0 + PANEL) of the weight into `to` (panel_bytes of them); rows past N are zero.
void pack_panel(const uint8_t* qs, const float* sc, const float* mn, int64_t r0, int64_t N, int64_t K, int64_t bits,
                int64_t group, bool half, uint8_t* to) {
  const int64_t block_bytes = bits == 4 ? QK / 2 : QK, row_bytes = K / QK * block_bytes, ng = K / group;
  const int64_t rows = std::min<int64_t>(PANEL, N - r0), quads = block_bytes / 4;
  const bool offset = offset_codes(bits, group);
  uint8_t* codes = to;
  uint8_t* scales = to + panel_code_bytes(K, bits);
  uint8_t* mins = scales + ng * PANEL * (half ? 2 : 4);
  if (rows < PANEL) std::fill(codes, to + panel_bytes(K, bits, group, mn != nullptr, half), uint8_t{0});
  auto put = [half](uint8_t* values, int64_t i, float v) {
    if (half) {
      reinterpret_cast<uint16_t*>(values)[i] = _cvtss_sh(v, _MM_FROUND_TO_NEAREST_INT);
    } else {
      reinterpret_cast<float*>(values)[i] = v;
    }
  };
  if (rows == PANEL) {  // a full panel: eight rows' 16-byte chunks at a time, transposed as 4x4 quads
    const __m256i flip = _mm256_set1_epi8(offset ? static_cast<char>(0x80) : 0);
    __m256i* out = reinterpret_cast<__m256i*>(codes);
    for (int64_t h = 0; h < 2; ++h)
      for (int64_t b = 0; b < K / QK; ++b)
        for (int64_t c = 0; c < block_bytes / 16; ++c) {
          // a[i]: rows i (low half) and i + 4 (high half) of this eight, chunk c of block b.
          const uint8_t* from = qs + (r0 + 8 * h) * row_bytes + b * block_bytes + 16 * c;
          __m256i a[4];
          for (int i = 0; i < 4; ++i)
            a[i] = _mm256_loadu2_m128i(reinterpret_cast<const __m128i*>(from + (i + 4) * row_bytes),
                                       reinterpret_cast<const __m128i*>(from + i * row_bytes));
          const __m256i t0 = _mm256_unpacklo_epi32(a[0], a[1]), t1 = _mm256_unpackhi_epi32(a[0], a[1]);
          const __m256i t2 = _mm256_unpacklo_epi32(a[2], a[3]), t3 = _mm256_unpackhi_epi32(a[2], a[3]);
          const __m256i quad[4] = {_mm256_unpacklo_epi64(t0, t2), _mm256_unpackhi_epi64(t0, t2),
                                   _mm256_unpacklo_epi64(t1, t3), _mm256_unpackhi_epi64(t1, t3)};
          for (int j = 0; j < 4; ++j)  // lane i: row i's quad 4c + j
            _mm256_storeu_si256(out + ((b * quads + 4 * c + j) * 2 + h), _mm256_xor_si256(flip, quad[j]));
        }
  }
  for (int64_t r = 0; r < rows; ++r) {
    const uint8_t* row = qs + (r0 + r) * row_bytes;
    if (rows < PANEL) {  // the last, partial panel: row by row
      for (int64_t b = 0; b < K / QK; ++b)
        for (int64_t j = 0; j < quads; ++j)
          for (int i = 0; i < 4; ++i) {
            const uint8_t c = row[b * block_bytes + 4 * j + i];
            codes[((b * quads + j) * PANEL + r) * 4 + i] = offset ? c ^ 0x80 : c;
          }
    }
    for (int64_t g = 0; g < ng; ++g) {
      put(scales, g * PANEL + r, sc[(r0 + r) * ng + g]);
      if (mn) put(mins, g * PANEL + r, mn[(r0 + r) * ng + g]);
    }
  }
}

// pack_panel undone for row r of the panel at `at`: its codes, float32 scales and mins (mn null: none) as stored.
void unpack_row(const uint8_t* at, int64_t r, int64_t K, int64_t bits, int64_t group, bool half, uint8_t* q,
                float* sc, float* mn) {
  const int64_t quads = (bits == 4 ? QK / 2 : QK) / 4;
  const uint32_t flip = offset_codes(bits, group) ? 0x80808080u : 0u;
  for (int64_t j = 0; j < K / QK * quads; ++j) {  // the row's quad j: four bytes at (j, r) in the panel
    uint32_t quad;
    std::memcpy(&quad, at + (j * PANEL + r) * 4, 4);
    quad ^= flip;
    std::memcpy(q + 4 * j, &quad, 4);
  }
  const Panel p = panel_at(at, K, bits, group, mn != nullptr, half);
  auto value = [half](const void* values, int64_t i) {
    return half ? load1(static_cast<const uint16_t*>(values)[i]) : static_cast<const float*>(values)[i];
  };
  for (int64_t g = 0; g < K / group; ++g) {
    sc[g] = value(p.scales, g * PANEL + r);
    if (mn) mn[g] = value(p.mins, g * PANEL + r);
  }
}

// The rows [r0, r0 + PANEL) below N of the panel at `at` into q, sc and mn, row r0 first.
void unpack_panel(const uint8_t* at, int64_t r0, int64_t N, int64_t K, int64_t bits, int64_t group, bool half,
                  uint8_t* q, float* sc, float* mn) {
  const int64_t row_bytes = bits == 4 ? K / 2 : K, ng = K / group;
  for (int64_t r = 0; r < std::min<int64_t>(PANEL, N - r0); ++r)
    unpack_row(at, r, K, bits, group, half, q + r * row_bytes, sc + r * ng, mn ? mn + r * ng : nullptr);
}

// One panel's rows as stored, for the paths that read rows where a layer keeps only its panels.
struct Unpacked {
  std::vector<uint8_t> q;
  std::vector<float> sc, mn;

  void of(const uint8_t* packed, int64_t r0, int64_t N, int64_t K, int64_t bits, int64_t group) {
    const Packing pk = packing(packed, K, bits, group);
    q.resize(PANEL * (bits == 4 ? K / 2 : K));
    sc.resize(PANEL * (K / group));
    mn.resize(pk.mins ? PANEL * (K / group) : 0);
    unpack_panel(packed + HEADER + r0 / PANEL * pk.bytes, r0, N, K, bits, group, pk.half, q.data(), sc.data(),
                 mins());
  }
  float* mins() { return mn.empty() ? nullptr : mn.data(); }
};

// Two vectors of a 4-bit panel (rows 0-7, then 8-15, four bytes each) as codes: low nibbles (elements 4j..4j+3 of
// the block) and high ones (elements 4j+16..4j+19).
struct Nibbles {
  __m256i lo0, hi0, lo1, hi1;
};

inline Nibbles nibbles(const uint8_t* pc) {
  const __m256i low = _mm256_set1_epi8(0x0F);
  const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc));
  const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc + 32));
  return {_mm256_and_si256(v0, low), _mm256_and_si256(_mm256_srli_epi16(v0, 4), low), _mm256_and_si256(v1, low),
          _mm256_and_si256(_mm256_srli_epi16(v1, 4), low)};
}

// Two levels' integer sums of a block as one: 254 * the first level's + the second's, still exact in int32.
inline __m256i two_levels(__m256i first, __m256i second) {
  return _mm256_add_epi32(_mm256_mullo_epi32(first, _mm256_set1_epi32(254)), second);
}

// acc + float(sum) * (scale * d): how every integer path adds a block's (or half block's) exact sum for eight rows,
// given their scales and the token's block scale d.
inline __m256 add_scaled(__m256 acc, __m256i sum, __m256 scale, __m256 d) {
  return _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(scale, d), acc);
}

// panel_tile for int8 codes with a scale per 16 weights: the two halves of a block are summed and scaled apart, each
// sum = fma(float(I_half), scale_half * d_b, sum). Their codes are packed as they are (not offset to unsigned), and
// their signs moved onto the activations, with or without VNNI, so no block sum of the activations is needed.
template <int T, int LEVELS>
void panel_halves(const Panel& p, int64_t K, const int8_t* const* aq, const int8_t* const* aq2,
                  const float* const* ad, float* const* out) {
  const int8_t* const* levels[2] = {aq, aq2};
  __m256 acc[2][T];
  for (int t = 0; t < T; ++t) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
  const uint8_t* pc = p.codes;
  for (int64_t b = 0; b < K / QK; ++b) {
    prefetch_ahead(pc, QK * PANEL);
    for (int64_t g = 2 * b; g < 2 * b + 2; ++g) {
      const __m256 s0 = eight(p.scales, p.half, g * PANEL), s1 = eight(p.scales, p.half, g * PANEL + 8);
      __m256i ia[LEVELS][2][T];
      for (int l = 0; l < LEVELS; ++l)
        for (int t = 0; t < T; ++t) ia[l][0][t] = ia[l][1][t] = _mm256_setzero_si256();
      for (int64_t at = (g - 2 * b) * 16; at < (g - 2 * b + 1) * 16; at += 4, pc += 2 * 32) {
        const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc));
        const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc + 32));
        for (int l = 0; l < LEVELS; ++l)
          for (int t = 0; t < T; ++t) {
            const __m256i a = _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(levels[l][t] + b * QK + at));
            ia[l][0][t] = dpbusd(ia[l][0][t], _mm256_sign_epi8(v0, v0), _mm256_sign_epi8(a, v0));
            ia[l][1][t] = dpbusd(ia[l][1][t], _mm256_sign_epi8(v1, v1), _mm256_sign_epi8(a, v1));
          }
      }
      for (int t = 0; t < T; ++t) {
        __m256i i0 = ia[0][0][t], i1 = ia[0][1][t];
        if constexpr (LEVELS == 2) i0 = two_levels(i0, ia[1][0][t]), i1 = two_levels(i1, ia[1][1][t]);
        const __m256 d = _mm256_set1_ps(ad[t][b]);
        acc[0][t] = add_scaled(acc[0][t], i0, s0, d);
        acc[1][t] = add_scaled(acc[1][t], i1, s1, d);
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(out[t], acc[0][t]), _mm256_storeu_ps(out[t] + 8, acc[1][t]);
}

// out[t][0..PANEL) for T tokens against one packed panel; LEVELS 2: the activations' second level (aq2) too.
template <int BITS, int T, int LEVELS>
void panel_tile(const Panel& p, int64_t K, int64_t group, const int8_t* const* aq, const int8_t* const* aq2,
                const float* const* ad, const float* const* ag, const int32_t* const* asum, float* const* out) {
  if constexpr (BITS == 8) {
    if (group < QK) return panel_halves<T, LEVELS>(p, K, aq, aq2, ad, out);
  }
  const int64_t nb = K / QK, per_group = group / QK, block_bytes = (BITS == 4 ? QK / 2 : QK) * PANEL;
  __m256 acc[2][T];
  for (int t = 0; t < T; ++t) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
  int64_t b = 0;
  for (int64_t g = 0; b < nb; ++g) {
    const __m256 s0 = eight(p.scales, p.half, g * PANEL), s1 = eight(p.scales, p.half, g * PANEL + 8);
    for (const int64_t end = b + per_group; b < end; ++b) {
      // ia[l][h][t]: the block's products of rows 8h..8h+7 with token t's codes of level l; both levels in one
      // pass over the weights.
      __m256i ia[LEVELS][2][T];
      for (int l = 0; l < LEVELS; ++l)
        for (int t = 0; t < T; ++t) ia[l][0][t] = ia[l][1][t] = _mm256_setzero_si256();
      const int8_t* const* levels[2] = {aq, aq2};
      auto quad = [&](int l, int t, int64_t at) {  // token t's four codes from element `at` of the block, in every lane
        return _mm256_set1_epi32(*reinterpret_cast<const int32_t*>(levels[l][t] + b * QK + at));
      };
      const uint8_t* pc = p.codes + b * block_bytes;
      prefetch_ahead(pc, block_bytes);
      if constexpr (BITS == 4 && kVnni) {
        for (int j = 0; j < 4; ++j, pc += 2 * 32) {
          const auto [lo0, hi0, lo1, hi1] = nibbles(pc);
          for (int l = 0; l < LEVELS; ++l)
            for (int t = 0; t < T; ++t) {
              const __m256i alo = quad(l, t, 4 * j), ahi = quad(l, t, 4 * j + 16);
              ia[l][0][t] = dpbusd(dpbusd(ia[l][0][t], lo0, alo), hi0, ahi);
              ia[l][1][t] = dpbusd(dpbusd(ia[l][1][t], lo1, alo), hi1, ahi);
            }
        }
      } else if constexpr (BITS == 4) {
        // Without VNNI a block's byte products are summed in 16 bits and widened once: a pair of products is at most
        // 2 * 15 * 127 = 3810 and a block adds eight pairs per lane (30480 < 32767), so nothing saturates, and the
        // integer sums are those VNNI computes, with a quarter fewer instructions than widening every pair.
        __m256i pairs[LEVELS][2][T];
        for (int l = 0; l < LEVELS; ++l)
          for (int t = 0; t < T; ++t) pairs[l][0][t] = pairs[l][1][t] = _mm256_setzero_si256();
        for (int j = 0; j < 4; ++j, pc += 2 * 32) {
          const auto [lo0, hi0, lo1, hi1] = nibbles(pc);
          for (int l = 0; l < LEVELS; ++l)
            for (int t = 0; t < T; ++t) {
              const __m256i alo = quad(l, t, 4 * j), ahi = quad(l, t, 4 * j + 16);
              pairs[l][0][t] = _mm256_add_epi16(pairs[l][0][t], _mm256_add_epi16(_mm256_maddubs_epi16(lo0, alo),
                                                                                 _mm256_maddubs_epi16(hi0, ahi)));
              pairs[l][1][t] = _mm256_add_epi16(pairs[l][1][t], _mm256_add_epi16(_mm256_maddubs_epi16(lo1, alo),
                                                                                 _mm256_maddubs_epi16(hi1, ahi)));
            }
        }
        const __m256i ones = _mm256_set1_epi16(1);
        for (int l = 0; l < LEVELS; ++l)
          for (int h = 0; h < 2; ++h)
            for (int t = 0; t < T; ++t) ia[l][h][t] = _mm256_madd_epi16(pairs[l][h][t], ones);
      } else {
        for (int j = 0; j < 8; ++j, pc += 2 * 32) {
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(pc + 32));
          for (int l = 0; l < LEVELS; ++l)
            for (int t = 0; t < T; ++t) {
              const __m256i a = quad(l, t, 4 * j);
              if constexpr (kVnni) {
                ia[l][0][t] = dpbusd(ia[l][0][t], v0, a);
                ia[l][1][t] = dpbusd(ia[l][1][t], v1, a);
              } else {
                ia[l][0][t] = dpbusd(ia[l][0][t], _mm256_sign_epi8(v0, v0), _mm256_sign_epi8(a, v0));
                ia[l][1][t] = dpbusd(ia[l][1][t], _mm256_sign_epi8(v1, v1), _mm256_sign_epi8(a, v1));
              }
            }
        }
      }
      for (int t = 0; t < T; ++t) {
        __m256i i0 = ia[0][0][t], i1 = ia[0][1][t];
        if constexpr (LEVELS == 2) i0 = two_levels(i0, ia[1][0][t]), i1 = two_levels(i1, ia[1][1][t]);
        if constexpr (BITS == 8 && kVnni) {
          const __m256i offset = _mm256_set1_epi32(128 * asum[t][b]);
          i0 = _mm256_sub_epi32(i0, offset), i1 = _mm256_sub_epi32(i1, offset);
        }
        const __m256 d = _mm256_set1_ps(ad[t][b]);
        acc[0][t] = add_scaled(acc[0][t], i0, s0, d);
        acc[1][t] = add_scaled(acc[1][t], i1, s1, d);
      }
    }
    if (p.mins) {
      const __m256 m0 = eight(p.mins, p.half, g * PANEL), m1 = eight(p.mins, p.half, g * PANEL + 8);
      for (int t = 0; t < T; ++t) {
        const __m256 gs = _mm256_set1_ps(ag[t][g]);
        acc[0][t] = _mm256_fmadd_ps(m0, gs, acc[0][t]), acc[1][t] = _mm256_fmadd_ps(m1, gs, acc[1][t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) _mm256_storeu_ps(out[t], acc[0][t]), _mm256_storeu_ps(out[t] + 8, acc[1][t]);
}

// The same with float activations (weight-only: exactly the stored weights times x): each block's codes are
// widened to float32; xsum[t][g] is the sum of token t's group g, which a group's min multiplies.
template <int BITS, int T>
void row_dot_float(const uint8_t* qs, const float* scales, const float* mins, int64_t K, int64_t group,
                   const float* const* x, const float* const* xsum, float* out) {
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  alignas(32) uint8_t codes[QK];
  for (int64_t b = 0; b < K / QK; ++b) {
    const uint8_t* c = qs + b * QK;
    if constexpr (BITS == 4) {
      _mm256_store_si256(reinterpret_cast<__m256i*>(codes), unpack_nibbles(qs + b * (QK / 2)));
      c = codes;
    }
    __m256 w[4];
    for (int j = 0; j < 4; ++j) {
      const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + 8 * j));
      w[j] = _mm256_cvtepi32_ps(BITS == 4 ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes));
    }
    // a scale per half block (int8 codes with groups of 16), else one for the block's group
    const __m256 sa = _mm256_set1_ps(scales[group < QK ? 2 * b : b / (group / QK)]);
    const __m256 sb = _mm256_set1_ps(scales[group < QK ? 2 * b + 1 : b / (group / QK)]);
    for (int t = 0; t < T; ++t) {
      const float* xb = x[t] + b * QK;
      // Two independent products per block, so the adds of one block do not wait on each other.
      const __m256 lo = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), _mm256_mul_ps(w[0], _mm256_loadu_ps(xb)));
      const __m256 hi = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), _mm256_mul_ps(w[2], _mm256_loadu_ps(xb + 16)));
      acc[t] = group < QK ? _mm256_fmadd_ps(sb, hi, _mm256_fmadd_ps(sa, lo, acc[t]))
                          : _mm256_fmadd_ps(sa, _mm256_add_ps(lo, hi), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = hsum(acc[t]) + (mins ? dot(mins, xsum[t], K / group) : 0.f);
}

// The first n rows of the weight, expanded to float32 into `w` [n, K], eight values per instruction: a prompt's
// matmul expands every weight it uses, so this loop bounds how fast a prompt is read.
void dequantize_rows(const uint8_t* qs, const float* scales, const float* mins, int64_t bits, int64_t K,
                     int64_t group, int64_t n, float* w) {
  const int64_t ng = K / group, row_bytes = bits == 4 ? K / 2 : K;
  for (int64_t r = 0; r < n; ++r) {
    const uint8_t* q = qs + r * row_bytes;
    float* o = w + r * K;
    for (int64_t c = 0; c < K / QK; ++c) {
      const int64_t g = r * ng + (group < QK ? 2 * c : c / (group / QK));  // groups of 16: the block's first
      const __m256 m = _mm256_set1_ps(mins ? mins[g] : 0.f);
      alignas(32) uint8_t codes[QK];
      if (bits == 4) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes), unpack_nibbles(q + c * (QK / 2)));
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes),
                           _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * QK)));
      }
      for (int j = 0; j < 4; ++j) {
        const __m256 s = _mm256_set1_ps(scales[group < QK ? g + j / 2 : g]);
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * j));
        const __m256i wide = bits == 4 ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes);
        _mm256_storeu_ps(o + c * QK + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), s, m));
      }
    }
  }
}

}  // namespace

extern "C" {

// out [N, K] float32, from the rows as stored or, where `packed` is given, from the weight's panels.
void herd_dequantize(const uint8_t* qs, const float* scales, const float* mins, const uint8_t* packed, int64_t N,
                     int64_t K, int64_t bits, int64_t group, float* out, int threads) {
  const int64_t ng = K / group, row_bytes = bits == 4 ? K / 2 : K;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r0 = 0; r0 < N; r0 += PANEL) {
    const int64_t n = std::min<int64_t>(PANEL, N - r0);
    if (packed) {
      thread_local Unpacked rows;
      rows.of(packed, r0, N, K, bits, group);
      dequantize_rows(rows.q.data(), rows.sc.data(), rows.mins(), bits, K, group, n, out + r0 * K);
    } else {
      dequantize_rows(qs + r0 * row_bytes, scales + r0 * ng, mins ? mins + r0 * ng : nullptr, bits, K, group, n,
                      out + r0 * K);
    }
  }
}

// Rows index[0..count) of a weight, from its panels, as float32 into out [count, K]: a tied embedding table's
// lookups, where the output layer keeps only its panels.
void herd_dequantize_packed_rows(const uint8_t* packed, const int64_t* index, int64_t count, int64_t K, int64_t bits,
                                 int64_t group, float* out) {
  const Packing pk = packing(packed, K, bits, group);
  std::vector<uint8_t> q(bits == 4 ? K / 2 : K);
  std::vector<float> sc(K / group), mn(pk.mins ? K / group : 0);
  for (int64_t i = 0; i < count; ++i) {
    unpack_row(packed + HEADER + index[i] / PANEL * pk.bytes, index[i] % PANEL, K, bits, group, pk.half, q.data(),
               sc.data(), pk.mins ? mn.data() : nullptr);
    dequantize_rows(q.data(), sc.data(), pk.mins ? mn.data() : nullptr, bits, K, group, 1, out + i * K);
  }
}

// The rows as stored (codes, float32 scales and mins: mn null where the weight has none) from a weight's panels.
void herd_unpack(const uint8_t* packed, int64_t N, int64_t K, int64_t bits, int64_t group, uint8_t* q, float* sc,
                 float* mn, int threads) {
  const Packing pk = packing(packed, K, bits, group);
  const int64_t ng = K / group, row_bytes = bits == 4 ? K / 2 : K;
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r0 = 0; r0 < N; r0 += PANEL)
    unpack_panel(packed + HEADER + r0 / PANEL * pk.bytes, r0, N, K, bits, group, pk.half, q + r0 * row_bytes,
                 sc + r0 * ng, pk.mins ? mn + r0 * ng : nullptr);
}

}  // extern "C"

namespace {

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// Tokens per 512-bit tile (panel_tile_wide), measured on the default model's layers (AMD Zen 4, two threads): eight
// generated tokens at a time made 16 tokens' matmuls 8-20% faster than the 256-bit tiles; prompt tokens, whose two
// levels take a third register per token, ran fastest four at a time (10-25% faster than the 256-bit tiles; six or
// eight at a time were no faster than those).
constexpr bool kWide = true;
constexpr int WIDE_TOKENS = 8, WIDE2_TOKENS = 4;
#else
constexpr bool kWide = false;
constexpr int WIDE_TOKENS = 1, WIDE2_TOKENS = 1;
#endif

// AMX (Intel's tile matrix unit, Sapphire Rapids on): one instruction multiplies 16 tokens' int8 codes of a block
// with the block's codes of a panel's 16 rows, where VNNI takes 16 per token. Its integer sums are the same exact
// ones, scaled in the same order, so it computes the same numbers bit for bit. What it leaves to the vector units,
// scaling every block's 16 x 16 sums (64 operations where the CPU does one 512-bit operation a cycle), takes about
// twice as long as its own part (18-20 against 8.5 ns, measured apart), so it gains less than that suggests: a
// 512-token prompt of the default model 1.25-1.30x faster, a layer's matmul of 16 generated tokens 0-20%.
// It takes calls of AMX_TOKENS tokens or more (a tile computes 16 tokens' rows however few are wanted: below that,
// the vector units were faster), once Linux lets the process use the tile registers. herd_use_amx turns it off
// and on (to compare, and to measure).
constexpr int64_t AMX_TOKENS = 10, AMX_ROWS = 16;

bool amx_permitted() {
#if defined(HERD_AMX)
  static const bool permitted = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0;
  return permitted;
#else
  return false;
#endif
}

bool amx_on = amx_permitted();  // false in a build without AMX

// FP8 weights (herd/quant/fp8.py): e4m3 codes, one float32 scale per row, activations rounded to e4m3 per token.
// Both are widened exactly to float32, where every product of two e4m3 values is exact, and summed in float32: the
// arithmetic of an FP8 tensor core with a float32 accumulator, as fp8.py emulates it with PyTorch.

// 16 e4m3 codes as the bit patterns of float16 values 2^-8 times theirs: e4m3's sign, exponent and mantissa bits
// moved to float16's places (float16's exponent bias is 8 more than e4m3's), which F16C widens exactly, e4m3's
// subnormals included (they become float16 subnormals). e4m3fn's NaN (0x7f, 0xff) is never stored: the quantizer
// clamps to 448.
inline __m256i e4m3_as_half(const uint8_t* p) {
  const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_or_si256(_mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x80)), 8),
                         _mm256_slli_epi16(_mm256_and_si256(b, _mm256_set1_epi16(0x7f)), 7));
}

inline __m256 half_lo(__m256i h) { return _mm256_cvtph_ps(_mm256_castsi256_si128(h)); }
inline __m256 half_hi(__m256i h) { return _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1)); }

constexpr float E4M3_AS_HALF = 256.f;  // what undoes e4m3_as_half's 2^-8, exactly

// out[t] = 2^-8 * sum over k of x[t][k] * w[k] for T tokens against one row of K (a multiple of 16) e4m3 codes.
// Two sums per token (the first eight and the last eight codes of every sixteen), so that one token's multiply-adds
// do not each wait for the one before.
template <int T>
void fp8_row(const uint8_t* w, int64_t K, const float* const* x, float* out) {
  __m256 lo_sum[T], hi_sum[T];
  for (int t = 0; t < T; ++t) lo_sum[t] = hi_sum[t] = _mm256_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    if ((k & 63) == 0) prefetch_ahead(w + k, 1);
    const __m256i h = e4m3_as_half(w + k);
    const __m256 lo = half_lo(h), hi = half_hi(h);
    for (int t = 0; t < T; ++t) {
      lo_sum[t] = _mm256_fmadd_ps(lo, _mm256_loadu_ps(x[t] + k), lo_sum[t]);
      hi_sum[t] = _mm256_fmadd_ps(hi, _mm256_loadu_ps(x[t] + k + 8), hi_sum[t]);
    }
  }
  for (int t = 0; t < T; ++t) out[t] = hsum(_mm256_add_ps(lo_sum[t], hi_sum[t]));
}

constexpr int64_t FP8_TOKENS = 4;  // per pass over a row: their two sums fill eight of the 16 vector registers

// One token's activations x [K] rounded to e4m3 as fp8.py's to_fp8 does: scale = max|x| / 448 (at least 1e-12),
// each x / scale rounded to the nearest e4m3 value (ties to even), kept as float32 in `q`. Returns the scale.
float e4m3_activations(const float* x, int64_t K, float* q) {
  __m256 largest = _mm256_setzero_ps();
  const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  for (int64_t k = 0; k < K; k += 8)
    largest = _mm256_max_ps(largest, _mm256_and_ps(_mm256_loadu_ps(x + k), magnitude));
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(largest), _mm256_extractf128_ps(largest, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  m = _mm_max_ss(m, _mm_movehdup_ps(m));
  const float scale = std::max(_mm_cvtss_f32(m) / 448.f, 1e-12f);
  const __m256 s = _mm256_set1_ps(scale), smallest_normal = _mm256_set1_ps(1.f / 64);
  const __m256i low = _mm256_set1_epi32(0x7ffff), one = _mm256_set1_epi32(1), keep = _mm256_set1_epi32(~0xfffff);
  for (int64_t k = 0; k < K; k += 8) {
    const __m256 v = _mm256_div_ps(_mm256_loadu_ps(x + k), s);
    const __m256 a = _mm256_min_ps(_mm256_and_ps(v, magnitude), _mm256_set1_ps(448.f));
    // normal e4m3 (|v| >= 2^-6): float32's mantissa rounded to its top 3 bits, ties to even
    const __m256i bits = _mm256_castps_si256(a);
    const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 20), one);
    const __m256 normal = _mm256_castsi256_ps(
        _mm256_and_si256(_mm256_add_epi32(bits, _mm256_add_epi32(low, odd)), keep));
    // subnormal e4m3: a multiple of 2^-9, ties to even
    const __m256 sub = _mm256_mul_ps(_mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(512.f)),
                                                     _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC),
                                     _mm256_set1_ps(1.f / 512));
    const __m256 r = _mm256_blendv_ps(normal, sub, _mm256_cmp_ps(a, smallest_normal, _CMP_LT_OQ));
    _mm256_storeu_ps(q + k, _mm256_or_ps(r, _mm256_andnot_ps(magnitude, v)));  // the sign back
  }
  return scale;
}

// Row r of out [M, N] = ((xq @ W.T) * x_scales[m]) * scales[r] for M tokens' e4m3 activations xq [M, K] (as
// float32) and W's e4m3 codes [N, K]: a token's numbers do not depend on how many share the row.
void fp8_row_tokens(const float* xq, const float* x_scales, int64_t M, const uint8_t* codes, const float* scales,
                    int64_t r, int64_t N, int64_t K, float* out) {
  const uint8_t* w = codes + r * K;
  for (int64_t t0 = 0; t0 < M; t0 += FP8_TOKENS) {
    const int64_t T = std::min(FP8_TOKENS, M - t0);
    const float* px[FP8_TOKENS];
    float sums[FP8_TOKENS];
    for (int64_t t = 0; t < T; ++t) px[t] = xq + (t0 + t) * K;
    switch (T) {
      case 1: fp8_row<1>(w, K, px, sums); break;
      case 2: fp8_row<2>(w, K, px, sums); break;
      case 3: fp8_row<3>(w, K, px, sums); break;
      default: fp8_row<4>(w, K, px, sums);
    }
    for (int64_t t = 0; t < T; ++t) out[(t0 + t) * N + r] = sums[t] * E4M3_AS_HALF * x_scales[t0 + t] * scales[r];
  }
}

// Tokens' activations prepared for one weight's matmul: on the integer paths (levels 1 or 2) int8 codes (and their
// second level), block scales and block sums of codes; and per token and weight group what a group's min
// multiplies: the sum of the activations (of scale * codes on the integer paths).
struct Acts {
  const float* x;
  int64_t M, K, group;
  int levels;  // 0: float activations; E4M3: rounded to e4m3 per token for FP8 weights (in `e4m3`, scales in `d`)
  bool tiles = false;  // AMX computes these tokens (panel_tokens_amx), reading q and q2 in tiles of 16 rows
  std::vector<int8_t> q, q2;
  // Where 512-bit tiles run: the codes again, a tile's tokens side by side in each block ([tile][block][token][level]
  // [QK]), so that a tile reads all its tokens' codes through one pointer at fixed offsets. With a pointer per token
  // and level the tile's loop ran out of general registers and reloaded them from the stack for every product: the
  // default model's 512-token prompt took 595 ms against 543, 16 sequences' 100-token prompts and 48 tokens each
  // 1.97 s against 1.90 (medians of 10 rounds, the two kernels alternating in one process, Intel Xeon).
  std::vector<int8_t> tiled;
  std::vector<float> d, g, e4m3;
  std::vector<int32_t> s;
  static constexpr int E4M3 = -1;

  // Buffers for m tokens (one thread), then `token(t)` for each token (any thread: tokens are independent).
  void size(const float* xf, int64_t m, int64_t k, int64_t grp, int lv) {
    x = xf, M = m, K = k, group = grp, levels = lv;
    // Decided once here, for the buffers' sizes and the matmul alike, whatever herd_use_amx does meanwhile.
    tiles = amx_on && levels > 0 && group >= QK && M >= AMX_TOKENS;
    if (levels == E4M3) {
      e4m3.resize(M * K), d.resize(M);
      return;
    }
    const int64_t rows = tiles ? (M + AMX_ROWS - 1) / AMX_ROWS * AMX_ROWS : M;  // a tile reads whole tiles of rows
    q.resize(levels ? rows * K : 0);
    q2.resize(levels == 2 ? rows * K : 0);
    d.resize(levels ? M * (K / QK) : 0);
    s.resize(levels ? M * (K / QK) : 0);
    g.resize(M * (K / sums_group()));
    tiled.resize(kWide && levels ? (M + tile_tokens() - 1) / tile_tokens() * tile_tokens() * K * levels : 0);
  }

  void token(int64_t t) {
    if (levels == E4M3) {
      d[t] = e4m3_activations(x + t * K, K, e4m3.data() + t * K);
      return;
    }
    const int64_t nb = K / QK, ng = K / sums_group();
    std::fill_n(g.data() + t * ng, ng, 0.f);
    if (levels) {
      quantize_acts(x + t * K, K, sums_group() / QK, q.data() + t * K, d.data() + t * nb, g.data() + t * ng,
                    s.data() + t * nb, levels == 2 ? q2.data() + t * K : nullptr);
      if (kWide && !tiles) interleave(t);
    } else {
      for (int64_t j = 0; j < ng; ++j)
        for (int64_t i = j * sums_group(); i < (j + 1) * sums_group(); ++i) g[t * ng + j] += x[t * K + i];
    }
  }

  // Tokens side by side in a tile of `tiled`: fewer than a tile's worth are packed as tightly (one token's codes
  // read one block after another, as in `q`).
  int64_t tile_tokens() const { return std::clamp<int64_t>(M, 1, levels == 2 ? WIDE2_TOKENS : WIDE_TOKENS); }

  void interleave(int64_t t) {
    const int64_t T = tile_tokens(), nb = K / QK;
    int8_t* tile = tiled.data() + t / T * T * K * levels;
    for (int64_t b = 0; b < nb; ++b)
      for (int l = 0; l < levels; ++l)
        std::copy_n((l ? q2 : q).data() + t * K + b * QK, QK, tile + ((b * T + t % T) * levels + l) * QK);
  }

  // The groups that `g` sums over: the weight's, or whole blocks where its groups are halves (they have no mins).
  int64_t sums_group() const { return std::max<int64_t>(group, QK); }

  void prepare(const float* xf, int64_t m, int64_t k, int64_t grp, int lv, int threads) {
    size(xf, m, k, grp, lv);
#pragma omp parallel for num_threads(threads) schedule(static) if (M >= 16)
    for (int64_t t = 0; t < M; ++t) token(t);
  }
};

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
// A block's exact integer sum for the 16 rows, as float32: the first level's sums, with LEVELS 2 254 x them plus
// the second's; 8-bit codes (offset to unsigned) less 128 x the token's block sum `asum`. A 4-bit block's two levels
// are added in float32: below 2^24 (|first| <= 32 x 15 x 127) that is exact, and vpmulld's two micro-ops on the
// one 512-bit port had cost a sixth of a prompt block's scaling on the tile path.
template <int BITS, int LEVELS>
inline __m512 block_sum(__m512i first, __m512i second, int32_t asum) {
  if constexpr (LEVELS == 2 && BITS == 4)
    return _mm512_fmadd_ps(_mm512_cvtepi32_ps(first), _mm512_set1_ps(254.f), _mm512_cvtepi32_ps(second));
  if constexpr (LEVELS == 2) first = _mm512_add_epi32(_mm512_mullo_epi32(first, _mm512_set1_epi32(254)), second);
  if constexpr (BITS == 8) first = _mm512_sub_epi32(first, _mm512_set1_epi32(128 * asum));
  return _mm512_cvtepi32_ps(first);
}

// panel_tile with 512-bit vectors, where the CPU has VNNI for them: one register holds a sum for each of the panel's
// 16 rows, so each weight vector is loaded and unpacked once for twice the tokens, with half the instructions per
// product. The same arithmetic lane by lane as panel_tile, so the same numbers bit for bit. `tile`: the tile's codes
// in Acts::tiled, `side` tokens side by side.

inline __m512 sixteen(const void* values, bool half, int64_t i) {
  if (half) return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(
                                   static_cast<const uint16_t*>(values) + i)));
  return _mm512_loadu_ps(static_cast<const float*>(values) + i);
}

template <int BITS, int T, int LEVELS>
void panel_tile_wide(const Panel& p, int64_t K, int64_t group, const int8_t* tile, int64_t side, const float* const* ad,
                     const float* const* ag, const int32_t* const* asum, float* const* out) {
  const int64_t nb = K / QK, per_group = group / QK, block_bytes = (BITS == 4 ? QK / 2 : QK) * PANEL;
  const __m512i low = _mm512_set1_epi8(0x0F);
  __m512 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm512_setzero_ps();
  int64_t b = 0;
  for (int64_t g = 0; b < nb; ++g) {
    const __m512 s = sixteen(p.scales, p.half, g * PANEL);
    for (const int64_t end = b + per_group; b < end; ++b) {
      __m512i ia[LEVELS][T];
      for (int l = 0; l < LEVELS; ++l)
        for (int t = 0; t < T; ++t) ia[l][t] = _mm512_setzero_si512();
      const int8_t* codes = tile + b * side * LEVELS * QK;
      auto quad = [&](int l, int t, int64_t at) {
        return _mm512_set1_epi32(*reinterpret_cast<const int32_t*>(codes + (t * LEVELS + l) * QK + at));
      };
      const uint8_t* pc = p.codes + b * block_bytes;
      prefetch_ahead(pc, block_bytes);
      for (int j = 0; j < (BITS == 4 ? 4 : 8); ++j, pc += 64) {
        const __m512i v = _mm512_loadu_si512(pc);
        if constexpr (BITS == 4) {
          const __m512i lo = _mm512_and_si512(v, low), hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low);
          for (int l = 0; l < LEVELS; ++l)
            for (int t = 0; t < T; ++t)
              ia[l][t] = _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(ia[l][t], lo, quad(l, t, 4 * j)), hi,
                                             quad(l, t, 4 * j + 16));
        } else {
          for (int l = 0; l < LEVELS; ++l)
            for (int t = 0; t < T; ++t) ia[l][t] = _mm512_dpbusd_epi32(ia[l][t], v, quad(l, t, 4 * j));
        }
      }
      for (int t = 0; t < T; ++t) {
        const __m512 f = block_sum<BITS, LEVELS>(ia[0][t], ia[LEVELS - 1][t], BITS == 8 ? asum[t][b] : 0);
        acc[t] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(ad[t][b])), acc[t]);
      }
    }
    if (p.mins) {
      const __m512 m = sixteen(p.mins, p.half, g * PANEL);
      for (int t = 0; t < T; ++t) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(ag[t][g]), acc[t]);
    }
  }
  for (int t = 0; t < T; ++t) _mm512_storeu_ps(out[t], acc[t]);
}

// panel_tile_wide for n tokens (at most WIDE_TOKENS).
template <int BITS, int LEVELS, int T = LEVELS == 1 ? WIDE_TOKENS : WIDE2_TOKENS, typename... Args>
void wide_tile(int n, Args... args) {
  if constexpr (T > 1)
    if (n < T) return wide_tile<BITS, LEVELS, T - 1>(n, args...);
  panel_tile_wide<BITS, T, LEVELS>(args...);
}
#else
template <int BITS, int LEVELS, typename... Args>
void wide_tile(int, Args...) {}
#endif

#if defined(HERD_AMX)
// The tiles, two sets so that one block's products are under way while the one before is scaled (a block's products
// take tens of cycles to come out: one set left the unit idle half the time): C (integer sums, 16 tokens x 16 rows)
// 0 and 1 for the first level, 2 and 3 for the second; A (the tokens' codes of a block) 4 and 5 for the two levels;
// B (the panel's codes of a block, in the panel's own order: eight rows of four-byte quads for the 16 rows side by
// side, which is how the unit reads its second operand) 6 and 7.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {64, 64, 64, 64, QK, QK, 64, 64};
  uint8_t rows[16] = {16, 16, 16, 16, 16, 16, QK / 4, QK / 4};
};

// The tile configuration for this thread's share of one matmul (matmul_team), and released after it: between the
// two, only this file's code runs on the thread.
inline void amx_begin() {
  static const TileConfig config;
  _tile_loadconfig(&config);
}
inline void amx_end() { _tile_release(); }

// A block's products into tile set `set`: B (`from`: the panel's codes of the block as bytes), A the tokens' codes
// (q, q2: rows K apart). The tile instructions take their tiles' numbers as literals, hence the macro.
#define HERD_TILE_PRODUCTS(C, C2, B)          \
  _tile_loadd(B, from, 64);                   \
  _tile_zero(C);                              \
  _tile_loadd(4, q, K);                       \
  _tile_dpbsud(C, 4, B);                      \
  if constexpr (LEVELS == 2) {                \
    _tile_zero(C2);                           \
    _tile_loadd(5, q2, K);                    \
    _tile_dpbsud(C2, 5, B);                   \
  }
template <int LEVELS>
inline void amx_products(int set, const uint8_t* from, const int8_t* q, const int8_t* q2, int64_t K) {
  if (set) {
    HERD_TILE_PRODUCTS(1, 3, 7)
  } else {
    HERD_TILE_PRODUCTS(0, 2, 6)
  }
}
#undef HERD_TILE_PRODUCTS

// Tile set `set`'s integer sums into sums[level].
template <int LEVELS>
inline void amx_sums(int set, int32_t (*sums)[AMX_ROWS * PANEL]) {
  if (set) {
    _tile_stored(1, sums[0], 64);
    if constexpr (LEVELS == 2) _tile_stored(3, sums[1], 64);
  } else {
    _tile_stored(0, sums[0], 64);
    if constexpr (LEVELS == 2) _tile_stored(2, sums[1], 64);
  }
}

// out [M, PANEL] (rows `stride` apart) for a's tokens against one panel, 16 tokens at a time: panel_tile_wide's
// arithmetic, its integer sums from the tile unit.
template <int BITS, int LEVELS>
void panel_tokens_amx(const Panel& p, const Acts& a, float* out, int64_t stride) {
  const int64_t K = a.K, nb = K / QK, per_group = a.group / QK, ng = K / a.sums_group();
  const int64_t block_bytes = (BITS == 4 ? QK / 2 : QK) * PANEL;
  alignas(64) int32_t sums[2][LEVELS][AMX_ROWS * PANEL];
  // A 4-bit panel's codes as bytes, unpacked once for all the tokens: vector j of a block holds its quads j (low
  // nibbles) and j + 4 (high ones) of the 16 rows. A tile loaded from bytes that vector stores have only just
  // written waits for them, which unpacking block by block made every block do.
  struct alignas(64) Line {  // what the aligned vector stores below need
    uint8_t bytes[64];
  };
  thread_local std::vector<Line> lines;
  if (BITS == 4 && static_cast<int64_t>(lines.size()) < nb * 8) lines.resize(nb * 8);
  uint8_t* bytes = lines.data()->bytes;
  if constexpr (BITS == 4) {
    const __m512i low = _mm512_set1_epi8(0x0F);
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* pc = p.codes + b * block_bytes;
      prefetch_ahead(pc, block_bytes);
      uint8_t* to = bytes + b * QK * PANEL;
      for (int j = 0; j < 4; ++j) {
        const __m512i v = _mm512_loadu_si512(pc + 64 * j);
        _mm512_store_si512(to + 64 * j, _mm512_and_si512(v, low));
        _mm512_store_si512(to + 64 * (j + 4), _mm512_and_si512(_mm512_srli_epi16(v, 4), low));
      }
    }
  }
  for (int64_t t0 = 0; t0 < a.M; t0 += AMX_ROWS) {
    const int64_t T = std::min(AMX_ROWS, a.M - t0);
    const float *ad[AMX_ROWS], *ag[AMX_ROWS];
    const int32_t* as[AMX_ROWS];
    for (int64_t t = 0; t < AMX_ROWS; ++t) {  // a tile's rows past M compute from row t0's numbers, unread
      const int64_t row = t0 + (t < T ? t : 0);
      ad[t] = a.d.data() + row * nb, ag[t] = a.g.data() + row * ng, as[t] = a.s.data() + row * nb;
    }
    const int8_t* q = a.q.data() + t0 * K;
    const int8_t* q2 = LEVELS == 2 ? a.q2.data() + t0 * K : nullptr;
    auto products = [&](int64_t b) {
      const uint8_t* from = BITS == 4 ? bytes + b * QK * PANEL : p.codes + b * block_bytes;
      if constexpr (BITS == 8) prefetch_ahead(from, block_bytes);
      amx_products<LEVELS>(b & 1, from, q + b * QK, q2 ? q2 + b * QK : nullptr, K);
    };
    __m512 acc[AMX_ROWS];
    for (auto& v : acc) v = _mm512_setzero_ps();
    auto scale = [&](int64_t b) {  // block b's sums, stored an iteration ago, into acc
      const int64_t g = b / per_group;
      const __m512 s = sixteen(p.scales, p.half, g * PANEL);
      const int32_t* first = sums[b & 1][0];
#pragma GCC unroll 16  // the sums stay in registers only when every index is a constant
      for (int t = 0; t < AMX_ROWS; ++t) {
        const __m512 f = block_sum<BITS, LEVELS>(_mm512_load_si512(first + t * PANEL),
                                                 _mm512_load_si512(sums[b & 1][LEVELS - 1] + t * PANEL),
                                                 BITS == 8 ? as[t][b] : 0);
        acc[t] = _mm512_fmadd_ps(f, _mm512_mul_ps(s, _mm512_set1_ps(ad[t][b])), acc[t]);
      }
      if (p.mins && (b + 1) % per_group == 0) {
        const __m512 m = sixteen(p.mins, p.half, g * PANEL);
#pragma GCC unroll 16
        for (int t = 0; t < AMX_ROWS; ++t) acc[t] = _mm512_fmadd_ps(m, _mm512_set1_ps(ag[t][g]), acc[t]);
      }
    };
    // Three blocks in flight: b + 1's products under way, b's sums being stored, b - 1's scaled (vector loads of
    // what a tile store has just written wait for it to reach the cache).
    products(0);
    for (int64_t b = 0; b < nb; ++b) {
      if (b + 1 < nb) products(b + 1);
      amx_sums<LEVELS>(b & 1, sums[b & 1]);
      if (b) scale(b - 1);
    }
    scale(nb - 1);
    for (int64_t t = 0; t < T; ++t) _mm512_storeu_ps(out + (t0 + t) * stride, acc[t]);
  }
}
#else
inline void amx_begin() {}
inline void amx_end() {}
template <int BITS, int LEVELS>
void panel_tokens_amx(const Panel&, const Acts&, float*, int64_t) {}
#endif

// out [M, PANEL] (rows `stride` apart) for all of a's tokens against one packed panel.
template <int BITS, int LEVELS>
void panel_tokens(const Panel& p, const Acts& a, float* out, int64_t stride) {
  if (a.tiles) return panel_tokens_amx<BITS, LEVELS>(p, a, out, stride);
  const bool wide = kWide && (BITS == 4 || a.group >= QK);  // int8 codes in halves of a block: panel_halves
  constexpr int NARROW = LEVELS == 1 ? TILE_TOKENS : BITS == 4 ? TILE2 : TILE2_BYTES;
  constexpr int MOST = std::max(WIDE_TOKENS, NARROW);
  const int tile = wide ? (LEVELS == 1 ? WIDE_TOKENS : WIDE2_TOKENS) : NARROW;
  const int64_t K = a.K, nb = K / QK, ng = K / a.sums_group();
  for (int64_t t0 = 0; t0 < a.M; t0 += tile) {
    const int T = static_cast<int>(std::min<int64_t>(tile, a.M - t0));
    const int8_t *aq[MOST], *aq2[MOST];
    const float *ad[MOST], *ag[MOST];
    const int32_t* as[MOST];
    float* o[MOST];
    for (int t = 0; t < T; ++t) {
      const int64_t row = t0 + t;
      aq[t] = a.q.data() + row * K, aq2[t] = LEVELS == 2 ? a.q2.data() + row * K : nullptr;
      ad[t] = a.d.data() + row * nb, ag[t] = a.g.data() + row * ng, as[t] = a.s.data() + row * nb;
      o[t] = out + row * stride;
    }
    if (wide) {
      const int8_t* codes = a.tiled.data() + t0 * K * LEVELS;
      wide_tile<BITS, LEVELS>(T, p, K, a.group, codes, a.tile_tokens(), ad, ag, as, o);
      continue;
    }
    switch (T) {
      case 1: panel_tile<BITS, 1, LEVELS>(p, K, a.group, aq, aq2, ad, ag, as, o); break;
      case 2: panel_tile<BITS, std::min(2, NARROW), LEVELS>(p, K, a.group, aq, aq2, ad, ag, as, o); break;
      case 3: panel_tile<BITS, std::min(3, NARROW), LEVELS>(p, K, a.group, aq, aq2, ad, ag, as, o); break;
      default: panel_tile<BITS, NARROW, LEVELS>(p, K, a.group, aq, aq2, ad, ag, as, o);
    }
  }
}

// Rows [r0, r1) (at most 16) of out [M, N] on the integer path; `packed`: the weight's panels, or null.
template <int BITS>
void integer_rows(const Acts& a, const uint8_t* q, const float* sc, const float* mn, const uint8_t* packed, int64_t N,
                  int64_t r0, int64_t r1, float* o) {
  const int64_t K = a.K;
  const Packing pk = packed ? packing(packed, K, BITS, a.group)
                            : Packing{false, mn != nullptr, panel_bytes(K, BITS, a.group, mn != nullptr, false)};
  const int64_t bytes = pk.bytes;
  thread_local std::vector<uint8_t> own;
  thread_local std::vector<float> tile;  // the last panel's rows, where fewer than PANEL are wanted
  if (!packed) {
    own.resize(bytes);
    pack_panel(q, sc, mn, r0, N, K, BITS, a.group, false, own.data());
  }
  const uint8_t* at = packed ? packed + HEADER + r0 / PANEL * bytes : own.data();
  const Panel panel = panel_at(at, K, BITS, a.group, pk.mins, pk.half);
  // A panel's scales and mins lie after its codes, off the stream that prefetch_ahead follows: ask for this panel's
  // (if the last one did not) and the next one's, which comes next. In a batch's 8-bit output layer a sixth of the
  // samples had waited on loading a scale; asking ahead made that layer's matmul of 16 tokens about 3% faster
  // (median of 80, alternating).
  const uint8_t* scales = static_cast<const uint8_t*>(panel.scales);
  const int64_t scale_bytes = at + bytes - scales;
  for (int64_t off = 0; off < scale_bytes; off += 64) {
    _mm_prefetch(reinterpret_cast<const char*>(scales + off), _MM_HINT_T0);
    if (packed && r1 < N) _mm_prefetch(reinterpret_cast<const char*>(scales + bytes + off), _MM_HINT_T0);
  }
  const bool whole = r1 - r0 == PANEL;
  if (!whole) tile.resize(a.M * PANEL);
  float* out = whole ? o + r0 : tile.data();
  const int64_t stride = whole ? N : PANEL;
  if (a.levels == 2) {
    panel_tokens<BITS, 2>(panel, a, out, stride);
  } else {
    panel_tokens<BITS, 1>(panel, a, out, stride);
  }
  if (!whole)
    for (int64_t t = 0; t < a.M; ++t) std::copy_n(tile.data() + t * PANEL, r1 - r0, o + t * N + r0);
}

// out [M, N] = acts [M, K] @ W.T, its rows shared among the threads of the enclosing OpenMP team (every thread
// calls it; outside a parallel region one thread does all rows). nowait: no barrier at the end.
void matmul_team(const Acts& a, const uint8_t* q, const float* sc, const float* mn, const uint8_t* packed, int64_t N,
                 int64_t bits, float* o, bool nowait = false) {
  const int64_t M = a.M, K = a.K, group = a.group, ng = K / group, row_bytes = bits == 4 ? K / 2 : K;
  auto body = [&](int64_t r0) {
    const int64_t r1 = std::min(N, r0 + PANEL);
    if (a.levels == Acts::E4M3) {  // FP8: e4m3 codes q, a scale per row sc
      for (int64_t r = r0; r < r1; ++r) fp8_row_tokens(a.e4m3.data(), a.d.data(), M, q, sc, r, N, K, o);
      return;
    }
    if (a.levels) {
      if (bits == 4) {
        integer_rows<4>(a, q, sc, mn, packed, N, r0, r1, o);
      } else {
        integer_rows<8>(a, q, sc, mn, packed, N, r0, r1, o);
      }
      return;
    }
    // The panel's rows as stored (rows r0.. of qs, ss, ms).
    const uint8_t* qs = q ? q + r0 * row_bytes : nullptr;
    const float* ss = sc ? sc + r0 * ng : nullptr;
    const float* ms = mn ? mn + r0 * ng : nullptr;
    if (packed) {
      thread_local Unpacked rows;
      rows.of(packed, r0, N, K, bits, group);
      qs = rows.q.data(), ss = rows.sc.data(), ms = rows.mins();
    }
    for (int64_t t0 = 0; t0 < M; t0 += 8) {
      const int T = static_cast<int>(std::min<int64_t>(8, M - t0));
      const float *ps[8], *px[8];
      for (int t = 0; t < T; ++t) ps[t] = a.g.data() + (t0 + t) * (K / a.sums_group()), px[t] = a.x + (t0 + t) * K;
      float res[8];
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* qr = qs + (r - r0) * row_bytes;
        const float* sr = ss + (r - r0) * ng;
        const float* mr = ms ? ms + (r - r0) * ng : nullptr;
#define HERD_ROW(B, TT) row_dot_float<B, TT>(qr, sr, mr, K, group, px, ps, res)
#define HERD_TOKENS(B) \
  switch (T) {                                                                                                    \
    case 1: HERD_ROW(B, 1); break; case 2: HERD_ROW(B, 2); break; case 3: HERD_ROW(B, 3); break;                  \
    case 4: HERD_ROW(B, 4); break; case 5: HERD_ROW(B, 5); break; case 6: HERD_ROW(B, 6); break;                  \
    case 7: HERD_ROW(B, 7); break; default: HERD_ROW(B, 8);                                                       \
  }
        if (bits == 4) {
          HERD_TOKENS(4)
        } else {
          HERD_TOKENS(8)
        }
#undef HERD_TOKENS
#undef HERD_ROW
        for (int t = 0; t < T; ++t) o[(t0 + t) * N + r] = res[t];
      }
    }
  };
  if (a.tiles) amx_begin();
  if (nowait) {
#pragma omp for schedule(static) nowait
    for (int64_t r0 = 0; r0 < N; r0 += PANEL) body(r0);
  } else {
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < N; r0 += PANEL) body(r0);
  }
  if (a.tiles) amx_end();
}

}  // namespace

extern "C" {

// Whether this build multiplies bytes with VNNI: without it the integer paths take three instructions where VNNI
// takes one, and two levels of int8 lose to the float32 GEMM.
int herd_has_vnni() { return kVnni; }

// Turns the AMX path on or off (where the CPU and the system allow it); whether it is on now.
int herd_use_amx(int on) {
  amx_on = on != 0 && amx_permitted();
  return amx_on;
}

// out [M, N] = x [M, K] @ W.T. levels 1: activations quantized to int8 blocks and integer dot products (generated
// tokens); 2: with the second level (prompt tokens); 0: float activations times the widened codes (meant for a few
// tokens: more take the expanded weight and BLAS); -1 (Acts::E4M3): FP8 weights, q their e4m3 codes and sc a scale
// per row, each token's activations rounded to e4m3 with a scale of its own (e4m3_activations), every product exact
// and summed in float32, then ((sum * x_scale) * sc[n]). packed: the weight's panels (herd_pack), or null; where
// given, q, sc and mn are not read and may be null.
void herd_matmul_rows(const float* xf, const uint8_t* q, const float* sc, const float* mn, const uint8_t* packed,
                      int64_t M, int64_t N, int64_t K, int64_t bits, int64_t group, int levels, float* o,
                      int threads) {
  // The caller's buffers, kept from call to call (a prompt's are megabytes, and fresh pages cost a first touch);
  // the team reads them through this reference, since each thread naming a thread_local would get its own.
  thread_local Acts kept;
  Acts& acts = kept;
  acts.prepare(xf, M, K, group, levels, threads);
#pragma omp parallel num_threads(threads)
  matmul_team(acts, q, sc, mn, packed, N, bits, o);
  // A huge prompt's buffers are not kept.
  const size_t kept_bytes = acts.q.capacity() + acts.q2.capacity() + acts.tiled.capacity() + 4 * acts.e4m3.capacity();
  if (kept_bytes > (64 << 20)) acts = Acts();
}

// The bytes of a weight's panels and their header (see Panel); half: its scales and mins are all float16 values.
int64_t herd_packed_bytes(int64_t N, int64_t K, int64_t bits, int64_t group, int mins, int half) {
  return HEADER + (N + PANEL - 1) / PANEL * panel_bytes(K, bits, group, mins != 0, half != 0);
}

void herd_pack(const uint8_t* q, const float* sc, const float* mn, int64_t N, int64_t K, int64_t bits, int64_t group,
               int half, uint8_t* out, int threads) {
  std::fill_n(out, HEADER, uint8_t{0});
  reinterpret_cast<PackedHeader*>(out)->half = half;
  reinterpret_cast<PackedHeader*>(out)->mins = mn != nullptr;
  const int64_t bytes = panel_bytes(K, bits, group, mn != nullptr, half != 0);
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r0 = 0; r0 < N; r0 += PANEL)
    pack_panel(q, sc, mn, r0, N, K, bits, group, half != 0, out + HEADER + r0 / PANEL * bytes);
}

}  // extern "C"

// ---------------------------------------------------------------------------------------------------------------
// One transformer block for the generated tokens of a step (one or more per sequence, sequences end to end), or for
// its prompt tokens, whose keys and values live in blocks of the engine's paged cache: the same arithmetic as the
// PyTorch block over the quantized layers (RMSNorm, rotary embeddings on adjacent pairs, grouped-query attention,
// SwiGLU), without a PyTorch call per operation. Each token is computed on its own (its norm, its matmul sums, its
// attention over its sequence's keys up to itself), so a token's numbers do not depend on what else shares the
// call: a batch of sequences decodes exactly as each would alone, and a prompt computes alike however chunked.

namespace {

struct Sequences {  // the sequences of a step and where their keys live in the paged cache
  int64_t count;
  const int64_t* tokens;       // [count] tokens of each in this step
  const int64_t* cached;       // [count] tokens of each already in the cache
  const int64_t* slot_offset;  // [count] where each one's key slots start in `slots`
  const int64_t* slots;        // each sequence's key slot, position by position (its cached and new tokens)
};

struct QWeight {  // one quantized linear layer: its rows as stored (null where it keeps only panels), its panels
  const uint8_t* codes;
  const float* scales;
  const float* mins;
  const uint8_t* packed;
  int64_t n, k, bits, group, integer;
  int64_t fp8;  // codes are e4m3 (FP8 weights: a scale per row, activations rounded to e4m3 per token)
};

// One token's row x [dim] normalised into out. The sum of squares runs in eight lanes (a serial sum over the row was
// 3% of a prompt's time).
void rms_norm(const float* x, const float* weight, int64_t dim, float eps, float* out) {
  __m256 lanes = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= dim; i += 8) lanes = _mm256_fmadd_ps(_mm256_loadu_ps(x + i), _mm256_loadu_ps(x + i), lanes);
  float sum = hsum(lanes);
  for (; i < dim; ++i) sum += x[i] * x[i];
  const float r = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
  for (i = 0; i < dim; ++i) out[i] = x[i] * r * weight[i];
}

// e^x for eight lanes of x <= 0 (scores less their maximum), within about 2 ulp: x = n ln2 + r with |r| <= ln2 / 2,
// e^r by Cephes' polynomial, 2^n put into the exponent; 0 below -87.3, where e^x leaves a float's normal range.
inline __m256 exp8(__m256 x) {
  const __m256 low = _mm256_set1_ps(-87.3f);
  const __m256 inside = _mm256_cmp_ps(x, low, _CMP_GE_OQ);
  x = _mm256_max_ps(x, low);
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  for (const float c : {1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f})
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(c));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.f)));
  const __m256i two_n = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_and_ps(_mm256_mul_ps(y, _mm256_castsi256_ps(two_n)), inside);
}

// gate[i] = silu(gate[i]) * up[i] (SwiGLU), eight lanes at a time: silu(g) = g * sigmoid(g), the sigmoid from
// e = e^-|g| (exp8's range) as 1 / (1 + e) for g >= 0, e / (1 + e) below. (The C library's expf, element by
// element, took 7% of a prompt's time.)
void swiglu(float* gate, const float* up, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = exp8(_mm256_or_ps(g, sign));  // e^-|g|
    const __m256 top = _mm256_blendv_ps(one, e, _mm256_cmp_ps(g, _mm256_setzero_ps(), _CMP_LT_OQ));
    const __m256 sigmoid = _mm256_div_ps(top, _mm256_add_ps(one, e));
    _mm256_storeu_ps(gate + i, _mm256_mul_ps(_mm256_mul_ps(g, sigmoid), _mm256_loadu_ps(up + i)));
  }
  for (; i < n; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
}

// Scores of H query heads (rows of q, head_dim apart) against keys j, j+1, j+2, j+3 (their rows k[0..3]), times
// scale, into scores[h]: each an eight-lane dot product reduced as ((l0 + l1) + (l2 + l3)) + ((l4 + l5) + (l6 + l7)),
// one reduction for the four. Each key's lanes are loaded (and widened from float16) once for the H heads; a
// head's scores are the same whatever H is.
template <int H, typename KV>
inline void score4(const float* q, const KV* const* k, int64_t head_dim, __m128 scale, __m128* scores) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int r = 0; r < 4; ++r) acc[h][r] = _mm256_setzero_ps();
  for (int64_t i = 0; i < head_dim; i += 8) {
    const __m256 kv[4] = {load8(k[0] + i), load8(k[1] + i), load8(k[2] + i), load8(k[3] + i)};
    for (int h = 0; h < H; ++h) {
      const __m256 qv = _mm256_loadu_ps(q + h * head_dim + i);
      for (int r = 0; r < 4; ++r) acc[h][r] = _mm256_fmadd_ps(qv, kv[r], acc[h][r]);
    }
  }
  for (int h = 0; h < H; ++h) {
    const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(acc[h][0], acc[h][1]), _mm256_hadd_ps(acc[h][2], acc[h][3]));
    scores[h] = _mm_mul_ps(_mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1)), scale);
  }
}

// Query heads scored together against a four of keys, as many as the vector registers hold sums for.
#if defined(__AVX512VL__)
constexpr int SCORE_HEADS = 4;
#else
constexpr int SCORE_HEADS = 2;
#endif

// Asks for a key's or value's row ahead of its use. A sequence's keys lie in blocks of a few slots scattered over
// the cache, and a batch's decode step reads every one of them once, from memory: asking for them a few keys ahead
// made the attention of 16 sequences at 300-700 tokens of context (float16, 30 layers) 1.6-2x faster.
constexpr int64_t KEYS_AHEAD = 32;
template <typename KV>
inline void prefetch_row(const KV* row, int64_t head_dim) {
  for (int64_t b = 0; b < head_dim * static_cast<int64_t>(sizeof(KV)); b += 64)
    _mm_prefetch(reinterpret_cast<const char*>(row) + b, _MM_HINT_T0);
}

// p[0..n) = e^(p - max p) over n scores (p padded to a multiple of 8), returning their sum: lane by lane in key
// order, then the lanes in a fixed order.
inline float softmax_numerators(float* p, int64_t n) {
  const int64_t padded = (n + 7) / 8 * 8;
  std::fill(p + n, p + padded, -INFINITY);
  __m256 top = _mm256_set1_ps(-INFINITY);
  for (int64_t j = 0; j < padded; j += 8) top = _mm256_max_ps(top, _mm256_loadu_ps(p + j));
  __m128 t4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
  t4 = _mm_max_ps(t4, _mm_movehl_ps(t4, t4));
  const __m256 m = _mm256_set1_ps(std::max(_mm_cvtss_f32(t4), _mm_cvtss_f32(_mm_movehdup_ps(t4))));
  __m256 total = _mm256_setzero_ps();
  for (int64_t j = 0; j < padded; j += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(p + j), m));
    _mm256_storeu_ps(p + j, e);
    total = _mm256_add_ps(total, e);
  }
  return hsum(total);
}

// out_h = sum over j of p_h[j] v_j for H heads at once (p_h = p + h * stride), 32 dimensions from c: each value row
// read once for the H heads.
template <int H, typename KV>
void weigh_values(const float* p, int64_t stride, const KV* vh, const int64_t* at, int64_t n, int64_t head_dim,
                  int64_t c, float* out) {
  __m256 acc[H][4];
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const KV* vj = vh + at[j] * head_dim + c;
    const __m256 v[4] = {load8(vj), load8(vj + 8), load8(vj + 16), load8(vj + 24)};
    for (int h = 0; h < H; ++h) {
      const __m256 ph = _mm256_broadcast_ss(p + h * stride + j);
      for (int i = 0; i < 4; ++i) acc[h][i] = _mm256_fmadd_ps(ph, v[i], acc[h][i]);
    }
  }
  for (int h = 0; h < H; ++h)
    for (int i = 0; i < 4; ++i) _mm256_storeu_ps(out + h * head_dim + c + 8 * i, acc[h][i]);
}

// G query heads that share one key-value head (q, out [G, head_dim]), of one token, over its n keys and values (at:
// their slots; p: room for G rows of n rounded up to 8): out_h = softmax(q_h . k * scale) v. A head's numbers are the
// same whatever G is: every score, sum and output lane is computed in one fixed order; the heads only share reads.
template <typename KV>
void attend(const float* q, int64_t G, const KV* kh, const KV* vh, const int64_t* at, int64_t n,
            int64_t head_dim, float scale, float* p, float* out) {
  const int64_t stride = (n + 7) / 8 * 8;
  thread_local std::vector<float> inverse;
  inverse.resize(G);
  if (head_dim % 32 == 0) {
    const __m128 s = _mm_set1_ps(scale);
    for (int64_t j = 0; j < n; j += 4) {
      // the last keys repeated to fill a four: each score is computed alike wherever its key falls
      const KV* k[4];
      for (int r = 0; r < 4; ++r) {
        k[r] = kh + at[std::min(j + r, n - 1)] * head_dim;
        prefetch_row(kh + at[std::min(j + KEYS_AHEAD + r, n - 1)] * head_dim, head_dim);
        prefetch_row(vh + at[std::min(j + r, n - 1)] * head_dim, head_dim);  // weighed once every score is known
      }
      for (int64_t h0 = 0; h0 < G; h0 += SCORE_HEADS) {
        __m128 scores[SCORE_HEADS];
        const float* qh = q + h0 * head_dim;
        switch (std::min<int64_t>(SCORE_HEADS, G - h0)) {
          case 1: score4<1>(qh, k, head_dim, s, scores); break;
          case 2: score4<2>(qh, k, head_dim, s, scores); break;
          case 3: score4<std::min(3, SCORE_HEADS)>(qh, k, head_dim, s, scores); break;
          default: score4<SCORE_HEADS>(qh, k, head_dim, s, scores);
        }
        for (int64_t h = h0; h < std::min(G, h0 + SCORE_HEADS); ++h) {
          if (j + 4 <= n) {
            _mm_storeu_ps(p + h * stride + j, scores[h - h0]);
          } else {
            alignas(16) float four[4];
            _mm_store_ps(four, scores[h - h0]);
            std::copy_n(four, n - j, p + h * stride + j);
          }
        }
      }
    }
    for (int64_t h = 0; h < G; ++h) inverse[h] = 1.f / softmax_numerators(p + h * stride, n);
    for (int64_t c = 0; c < head_dim; c += 32) {
      int64_t h = 0;
      for (; h + 3 <= G; h += 3) weigh_values<3>(p + h * stride, stride, vh, at, n, head_dim, c, out + h * head_dim);
      if (G - h == 2) weigh_values<2>(p + h * stride, stride, vh, at, n, head_dim, c, out + h * head_dim);
      if (G - h == 1) weigh_values<1>(p + h * stride, stride, vh, at, n, head_dim, c, out + h * head_dim);
    }
    for (int64_t h = 0; h < G; ++h)
      for (int64_t d = 0; d < head_dim; ++d) out[h * head_dim + d] *= inverse[h];
    return;
  }
  for (int64_t h = 0; h < G; ++h) {  // head sizes that are no multiple of 32 (tiny test models): plain loops
    float* ph = p + h * stride;
    for (int64_t j = 0; j < n; ++j) ph[j] = dot(q + h * head_dim, kh + at[j] * head_dim, head_dim) * scale;
    const float inv = 1.f / softmax_numerators(ph, n);
    float* oh = out + h * head_dim;
    std::fill_n(oh, head_dim, 0.f);
    for (int64_t j = 0; j < n; ++j)
      for (int64_t d = 0; d < head_dim; ++d) oh[d] += ph[j] * load1(vh[at[j] * head_dim + d]);
    for (int64_t d = 0; d < head_dim; ++d) oh[d] *= inv;
  }
}

// Token t of a step: which sequence, and its position there (the sequences' tokens lie end to end).
struct Positions {
  std::vector<int64_t> seq, pos;

  Positions(const Sequences* seqs, int64_t T) : seq(T), pos(T) {
    for (int64_t s = 0, t = 0; s < seqs->count; ++s)
      for (int64_t i = 0; i < seqs->tokens[s]; ++i, ++t) seq[t] = s, pos[t] = seqs->cached[s] + i;
  }
};

// Every token's attention over its own sequence's keys up to itself (q, out [T, heads, head_dim]), shared among the
// threads of the enclosing team in turns of one token's heads that read the same key-value head (or of single heads,
// when there are too few turns to keep the threads busy), since a prompt's later tokens see more keys. Each token
// is computed alone, so its result does not depend on what else shares the call or how its prompt was chunked.
template <typename KV>
void attend_tokens(const float* q, int64_t T, const Positions& at, const Sequences* seqs, const KV* k_cache,
                   const KV* v_cache, int64_t slots, int64_t heads, int64_t kv_heads, int64_t head_dim,
                   float* out) {
  const int64_t group = heads / kv_heads;
  const int64_t per_turn = T * kv_heads >= 4 * omp_get_num_threads() ? group : 1, turns = heads / per_turn;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
#pragma omp for schedule(static, 1) collapse(2)
  for (int64_t t = 0; t < T; ++t) {
    for (int64_t turn = 0; turn < turns; ++turn) {
      const int64_t n = at.pos[t] + 1, h = turn * per_turn;  // token t sees every earlier key and its own
      thread_local std::vector<float> scores;
      scores.resize(per_turn * ((n + 7) / 8 * 8));
      const int64_t row = (t * heads + h) * head_dim, kv = (h / group) * slots * head_dim;
      attend(q + row, per_turn, k_cache + kv, v_cache + kv, seqs->slots + seqs->slot_offset[at.seq[t]], n, head_dim,
             scale, scores.data(), out + row);
    }
  }
}

// Rotate adjacent pairs of every head of token t by (cos, sin) of its position.
void rope(float* x, int64_t heads, int64_t head_dim, const float* cos_sin) {
  for (int64_t h = 0; h < heads; ++h) {
    float* p = x + h * head_dim;
    for (int64_t i = 0; i < head_dim / 2; ++i) {
      const float a = p[2 * i], b = p[2 * i + 1], c = cos_sin[2 * i], s = cos_sin[2 * i + 1];
      p[2 * i] = a * c - b * s;
      p[2 * i + 1] = a * s + b * c;
    }
  }
}

// attend_tokens over a cache held as float16 (half) or float32.
void attend_cache(const float* q, int64_t T, const Positions& at, const Sequences* seqs, const void* k_cache,
                  const void* v_cache, bool half, int64_t slots, int64_t heads, int64_t kv_heads, int64_t head_dim,
                  float* out) {
  if (half) {
    attend_tokens(q, T, at, seqs, static_cast<const uint16_t*>(k_cache), static_cast<const uint16_t*>(v_cache), slots,
                  heads, kv_heads, head_dim, out);
  } else {
    attend_tokens(q, T, at, seqs, static_cast<const float*>(k_cache), static_cast<const float*>(v_cache), slots,
                  heads, kv_heads, head_dim, out);
  }
}

// n values into a cache at element `at`, as float16 where it holds them so (rounded to nearest even, as PyTorch
// converts them).
inline void store_row(void* cache, bool half, int64_t at, const float* from, int64_t n) {
  if (!half) {
    std::copy_n(from, n, static_cast<float*>(cache) + at);
    return;
  }
  uint16_t* to = static_cast<uint16_t*>(cache) + at;
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    _mm_storeu_si128(reinterpret_cast<__m128i*>(to + i),
                     _mm256_cvtps_ph(_mm256_loadu_ps(from + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  for (; i < n; ++i) to[i] = _cvtss_sh(from[i], _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}

// A block's intermediate values, kept from call to call: a prompt chunk's are megabytes, and fresh pages cost a
// first touch in every layer.
struct Scratch {
  std::vector<float> buffers[8];
  Acts acts[3];

  float* get(int i, int64_t n) {
    if (static_cast<int64_t>(buffers[i].size()) < n) buffers[i].resize(n);
    return buffers[i].data();
  }
};

// One block. x [T, dim] (the residual stream, updated in place); w: wq, wk, wv, wo, w1, w2, w3; cos_sin
// [T, head_dim / 2, 2]; k_cache, v_cache [kv_heads, slots, head_dim] of this layer (float16 where half, else
// float32); these tokens' keys and values are written there. prompt: the tokens are a prompt's, and the integer
// layers take two levels of int8 codes (see the top of the file); else generated tokens, one level.
void decode_block(float* x, int64_t T, int64_t dim, const float* attn_norm, const float* ffn_norm, float eps,
                  const QWeight* w, const float* cos_sin, void* k_cache, void* v_cache, bool half, int64_t slots,
                  const Sequences* seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, bool prompt,
                  int threads) {
  const int64_t qd = heads * head_dim, kd = kv_heads * head_dim, hidden = w[4].n;
  const Positions at(seqs, T);
  thread_local Scratch scratch;
  float *xn = scratch.get(0, T * dim), *q = scratch.get(1, T * qd), *k = scratch.get(2, T * kd),
        *v = scratch.get(3, T * kd), *att = scratch.get(4, T * qd), *o = scratch.get(5, T * dim),
        *gate = scratch.get(6, T * hidden), *up = scratch.get(7, T * hidden);
  Acts* a = scratch.acts;
  // Layers that read the same input (wq, wk, wv; w1, w3) share its quantized form when they group it alike.
  auto alike = [](const QWeight& u, const QWeight& v) {
    return u.group == v.group && u.integer == v.integer && u.fp8 == v.fp8;
  };
  auto size = [&](Acts& acts, const float* in, const QWeight& weight) {
    acts.size(in, T, weight.k, weight.group, weight.fp8 ? Acts::E4M3 : weight.integer ? (prompt ? 2 : 1) : 0);
  };
  size(a[0], xn, w[0]);
  for (int i = 1; i < 3; ++i)
    if (!alike(w[i], w[0])) size(a[i], xn, w[i]);
  auto rows = [&](const Acts& acts, const QWeight& weight, float* out, bool nowait = false) {
    matmul_team(acts, weight.codes, weight.scales, weight.mins, weight.packed, weight.n, weight.bits, out, nowait);
  };
  // One team of threads for the whole block: the matmuls share out rows, the steps between them share tokens
  // (each token's arithmetic is its own, so this changes nothing in its numbers), and the threads meet at
  // barriers instead of being started and stopped for every matmul.
#pragma omp parallel num_threads(threads)
  {
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      rms_norm(x + t * dim, attn_norm, dim, eps, xn + t * dim);
      a[0].token(t);
      for (int i = 1; i < 3; ++i)
        if (!alike(w[i], w[0])) a[i].token(t);
    }
    rows(a[0], w[0], q, true);
    rows(alike(w[1], w[0]) ? a[0] : a[1], w[1], k, true);
    rows(alike(w[2], w[0]) ? a[0] : a[2], w[2], v);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      rope(q + t * qd, heads, head_dim, cos_sin + t * head_dim);
      rope(k + t * kd, kv_heads, head_dim, cos_sin + t * head_dim);
      const int64_t slot = seqs->slots[seqs->slot_offset[at.seq[t]] + at.pos[t]] * head_dim;
      for (int64_t h = 0; h < kv_heads; ++h) {
        store_row(k_cache, half, h * slots * head_dim + slot, k + t * kd + h * head_dim, head_dim);
        store_row(v_cache, half, h * slots * head_dim + slot, v + t * kd + h * head_dim, head_dim);
      }
    }
    attend_cache(q, T, at, seqs, k_cache, v_cache, half, slots, heads, kv_heads, head_dim, att);
#pragma omp single
    size(a[0], att, w[3]);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) a[0].token(t);
    rows(a[0], w[3], o);
#pragma omp single
    {
      size(a[0], xn, w[4]);
      if (!alike(w[6], w[4])) size(a[1], xn, w[6]);
      size(a[2], gate, w[5]);
    }
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t i = t * dim; i < (t + 1) * dim; ++i) x[i] += o[i];
      rms_norm(x + t * dim, ffn_norm, dim, eps, xn + t * dim);
      a[0].token(t);
      if (!alike(w[6], w[4])) a[1].token(t);
    }
    rows(a[0], w[4], gate, true);
    rows(alike(w[6], w[4]) ? a[0] : a[1], w[6], up);
#pragma omp for schedule(static)
    for (int64_t t = 0; t < T; ++t) {
      swiglu(gate + t * hidden, up + t * hidden, hidden);
      a[2].token(t);
    }
    rows(a[2], w[5], o);
  }
  for (int64_t i = 0; i < T * dim; ++i) x[i] += o[i];
}

}  // namespace

extern "C" {

// Attention of a step's tokens (q, out [T, heads, head_dim]) over their sequences' keys and values already in the
// cache (k_cache, v_cache [kv_heads, slots, head_dim], float16 where half, else float32): what the fused block
// computes, for any forward (prompts too), so that a token attends alike whichever path and chunk it came in.
void herd_attention(const float* q, int64_t T, const Sequences* seqs, const void* k_cache, const void* v_cache,
                    int half, int64_t slots, int64_t heads, int64_t kv_heads, int64_t head_dim, float* out,
                    int threads) {
  const Positions at(seqs, T);
#pragma omp parallel num_threads(threads)
  attend_cache(q, T, at, seqs, k_cache, v_cache, half != 0, slots, heads, kv_heads, head_dim, out);
}

// A stretch of `layers` blocks in one call, each as decode_block computes it: layer l reads its norms from
// attn_norms[l] and ffn_norms[l], its seven weights from w + 7 l, its keys and values from k_caches[l] and
// v_caches[l] (float16 where half, else float32). A decode step then makes one call from Python instead of one per
// layer.
void herd_decode_blocks(float* x, int64_t T, int64_t dim, int64_t layers, const float* const* attn_norms,
                        const float* const* ffn_norms, float eps, const QWeight* w, const float* cos_sin,
                        void* const* k_caches, void* const* v_caches, int half, int64_t slots,
                        const Sequences* seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, int prompt,
                        int threads) {
  for (int64_t l = 0; l < layers; ++l)
    decode_block(x, T, dim, attn_norms[l], ffn_norms[l], eps, w + 7 * l, cos_sin, k_caches[l], v_caches[l],
                 half != 0, slots, seqs, heads, kv_heads, head_dim, prompt != 0, threads);
}

}  // extern "C"


extern "C" {

// out [N, K] = the e4m3 codes [N, K] (K a multiple of 16) as float32, exactly, times scales[n] (null: none).
void herd_fp8_dequantize(const uint8_t* codes, const float* scales, int64_t N, int64_t K, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r = 0; r < N; ++r) {
    const __m256 s = _mm256_set1_ps(scales ? scales[r] * E4M3_AS_HALF : E4M3_AS_HALF);
    for (int64_t k = 0; k < K; k += 16) {
      const __m256i h = e4m3_as_half(codes + r * K + k);
      _mm256_storeu_ps(out + r * K + k, _mm256_mul_ps(half_lo(h), s));
      _mm256_storeu_ps(out + r * K + k + 8, _mm256_mul_ps(half_hi(h), s));
    }
  }
}

}  // extern "C"
