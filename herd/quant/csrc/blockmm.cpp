// Matmuls over block-quantized weights, the way llama.cpp computes GGUF blocks on a CPU: the activations are
// quantized to int8 in blocks of 32 (one float scale each), every 32-element block of a weight row is multiplied
// with them in integers (AVX2 u8 x s8 multiply-adds), and each block's integer sum is scaled in float.
//
// Weights: `qs` holds 4-bit codes (two per byte: in each 32-element chunk, byte j carries element j in its low
// nibble and element j + 16 in its high one, as GGUF's Q4_0/Q4_1 do) or int8 codes; `scales` [N, K / group] and,
// for 4-bit, `mins` [N, K / group]: a weight is code * scale + min. A group is a multiple of 32 elements.
//
// Many tokens at once (a prompt) are computed differently: the weight is expanded to float32 (herd_dequantize)
// and multiplied with the BLAS GEMM, which on these CPUs beats integer dot products once the weights are reused
// across enough tokens.
//
// herd_decode_block (at the end) runs a whole transformer block for a decode step's generated tokens on these
// matmuls.
//
// Plain C entry points over raw pointers (called through ctypes): no torch headers, so it compiles in seconds.
#include <immintrin.h>
#include <omp.h>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int QK = 32;

// One token's activations as int8 blocks: the codes, the scale of each block, and per group of `per_group` blocks
// the sum of scale * codes (what a 4-bit weight group's min multiplies).
void quantize_acts(const float* x, int64_t K, int64_t per_group, int8_t* q, float* d, float* group_sums) {
  for (int64_t b = 0; b < K / QK; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.f;
    for (int i = 0; i < QK; ++i) amax = std::max(amax, std::fabs(xb[i]));
    const float db = amax / 127.f;
    const float id = db != 0.f ? 1.f / db : 0.f;
    int sum = 0;
    for (int i = 0; i < QK; ++i) {
      const int v = static_cast<int>(std::nearbyint(xb[i] * id));  // ties to even, as torch.round
      q[b * QK + i] = static_cast<int8_t>(v);
      sum += v;
    }
    d[b] = db;
    group_sums[b / per_group] += db * static_cast<float>(sum);
  }
}

inline float hsum(__m256 v) {
  __m128 r = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  r = _mm_add_ps(r, _mm_movehl_ps(r, r));
  r = _mm_add_ss(r, _mm_movehdup_ps(r));
  return _mm_cvtss_f32(r);
}

// sum of a[i] * b[i], eight at a time.
inline float dot(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), acc);
  float sum = hsum(acc);
  for (; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

// 32 unsigned codes (0..15) from 16 bytes of nibbles: low nibbles first, then high ones.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i both = _mm256_set_m128i(_mm_srli_epi16(t, 4), t);
  return _mm256_and_si256(both, _mm256_set1_epi8(0x0F));
}

// Eight int32 partial sums of u (unsigned bytes) times s (signed bytes).
inline __m256i dot_u8s8(__m256i u, __m256i s) {
#if defined(__AVXVNNI__)
  return _mm256_dpbusd_avx_epi32(_mm256_setzero_si256(), u, s);
#else
  // Pair sums stay below 2 * 255 * 127 < 32767 only because codes are at most 15 (4-bit) or |w| <= 127 (8-bit,
  // signs moved onto the activations), so the saturating 16-bit step never clips.
  return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
#endif
}

// Dot products of one weight row with T tokens' quantized activations; T is small (up to 8) so that every weight
// block, once unpacked, is used T times. Groups are walked in order (no division per block: it cost as much as the
// dot product), and two accumulators per token take alternate blocks, so that consecutive blocks' multiply-adds
// overlap. A token's sums are added in the same order whatever T is: speculative decoding checks guessed tokens
// several at a time and must get exactly the numbers of one token at a time (an int8 activation code flipped by
// a rounding difference changes the next layer visibly).
template <int BITS, int T>
void row_dot(const uint8_t* qs, const float* scales, const float* mins, int64_t K, int64_t group,
             const int8_t* const* yq, const float* const* yd, const float* const* ys, float* out) {
  const int64_t nb = K / QK, per_group = group / QK;
  __m256 acc[2][T];
  for (int t = 0; t < T; ++t) acc[0][t] = acc[1][t] = _mm256_setzero_ps();
  auto block = [&](int64_t b, float sw, __m256* into) {
    __m256i w;
    if constexpr (BITS == 4) {
      w = unpack_nibbles(qs + b * (QK / 2));
    } else {
      w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + b * QK));
    }
    const __m256i wabs = BITS == 4 ? w : _mm256_sign_epi8(w, w);
    for (int t = 0; t < T; ++t) {
      __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yq[t] + b * QK));
      if constexpr (BITS == 8) y = _mm256_sign_epi8(y, w);
      const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(wabs, y));
      into[t] = _mm256_fmadd_ps(_mm256_set1_ps(sw * yd[t][b]), p, into[t]);
    }
  };
  int64_t b = 0;
  for (int64_t g = 0; b < nb; ++g) {
    const float sw = scales[g];
    const int64_t end = b + per_group;
    for (; b + 1 < end; b += 2) block(b, sw, acc[0]), block(b + 1, sw, acc[1]);
    if (b < end) block(b, sw, acc[g % 2]), ++b;
  }
  // The mins' part is a dot product of the row's mins with the token's group sums, done apart from the blocks.
  for (int t = 0; t < T; ++t)
    out[t] = hsum(_mm256_add_ps(acc[0][t], acc[1][t])) + (BITS == 4 ? dot(mins, ys[t], K / group) : 0.f);
}

// One token against R weight rows at once (decoding): each activation block is loaded once for all R rows. Every
// row's sums are added exactly as row_dot<BITS, 1> adds them (alternate blocks, two accumulators), so a token's
// numbers stay the same however its rows are grouped.
template <int BITS, int R>
void rows_dot(const uint8_t* const* qs, const float* const* scales, const float* const* mins, int64_t K,
              int64_t group, const int8_t* yq, const float* yd, const float* ys, float* out) {
  const int64_t nb = K / QK, per_group = group / QK;
  __m256 acc[2][R];
  for (int r = 0; r < R; ++r) acc[0][r] = acc[1][r] = _mm256_setzero_ps();
  auto block = [&](int64_t b, int64_t g, int a) {
    __m256i y = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(yq + b * QK));
    const float db = yd[b];
    for (int r = 0; r < R; ++r) {
      __m256i w, yr = y;
      if constexpr (BITS == 4) {
        w = unpack_nibbles(qs[r] + b * (QK / 2));
      } else {
        w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs[r] + b * QK));
        yr = _mm256_sign_epi8(y, w);
        w = _mm256_sign_epi8(w, w);
      }
      const __m256 p = _mm256_cvtepi32_ps(dot_u8s8(w, yr));
      acc[a][r] = _mm256_fmadd_ps(_mm256_set1_ps(scales[r][g] * db), p, acc[a][r]);
    }
  };
  int64_t b = 0;
  for (int64_t g = 0; b < nb; ++g) {
    const int64_t end = b + per_group;
    for (; b + 1 < end; b += 2) block(b, g, 0), block(b + 1, g, 1);
    if (b < end) block(b, g, g % 2), ++b;
  }
  for (int r = 0; r < R; ++r)
    out[r] = hsum(_mm256_add_ps(acc[0][r], acc[1][r])) + (BITS == 4 ? dot(mins[r], ys, K / group) : 0.f);
}

// The same with float activations (weight-only: exactly the stored weights times x): each block's codes are
// widened to float32; xsum[t][g] is the sum of token t's group g, which a 4-bit group's min multiplies.
template <int BITS, int T>
void row_dot_float(const uint8_t* qs, const float* scales, const float* mins, int64_t K, int64_t group,
                   const float* const* x, const float* const* xsum, float* out) {
  const int64_t nb = K / QK, per_group = group / QK;
  __m256 acc[T];
  for (int t = 0; t < T; ++t) acc[t] = _mm256_setzero_ps();
  alignas(32) uint8_t codes[QK];
  int64_t b = 0;
  for (int64_t g = 0; b < nb; ++g) {
    const __m256 sw = _mm256_set1_ps(scales[g]);
    for (const int64_t end = b + per_group; b < end; ++b) {
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
      for (int t = 0; t < T; ++t) {
        const float* xb = x[t] + b * QK;
        // Two independent products per block, so the adds of one block do not wait on each other.
        const __m256 lo = _mm256_fmadd_ps(w[1], _mm256_loadu_ps(xb + 8), _mm256_mul_ps(w[0], _mm256_loadu_ps(xb)));
        const __m256 hi = _mm256_fmadd_ps(w[3], _mm256_loadu_ps(xb + 24), _mm256_mul_ps(w[2], _mm256_loadu_ps(xb + 16)));
        acc[t] = _mm256_fmadd_ps(sw, _mm256_add_ps(lo, hi), acc[t]);
      }
    }
  }
  for (int t = 0; t < T; ++t) out[t] = hsum(acc[t]) + (BITS == 4 ? dot(mins, xsum[t], K / group) : 0.f);
}

// Rows [r0, r1) of the weight, expanded to float32 into `w` [r1 - r0, K], eight values per instruction: a prompt's
// matmul expands every weight it uses, so this loop bounds how fast a prompt is read.
void dequantize_rows(const uint8_t* qs, const float* scales, const float* mins, int64_t bits, int64_t K,
                     int64_t group, int64_t r0, int64_t r1, float* w) {
  const int64_t ng = K / group, row_bytes = bits == 4 ? K / 2 : K, per_group = group / QK;
  for (int64_t r = r0; r < r1; ++r) {
    const uint8_t* q = qs + r * row_bytes;
    float* o = w + (r - r0) * K;
    for (int64_t c = 0; c < K / QK; ++c) {
      const int64_t g = r * ng + c / per_group;
      const __m256 s = _mm256_set1_ps(scales[g]);
      const __m256 m = _mm256_set1_ps(bits == 4 ? mins[g] : 0.f);
      alignas(32) uint8_t codes[QK];
      if (bits == 4) {
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes), unpack_nibbles(q + c * (QK / 2)));
      } else {
        _mm256_store_si256(reinterpret_cast<__m256i*>(codes), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + c * QK)));
      }
      for (int j = 0; j < 4; ++j) {
        const __m128i bytes = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(codes + 8 * j));
        const __m256i wide = bits == 4 ? _mm256_cvtepu8_epi32(bytes) : _mm256_cvtepi8_epi32(bytes);
        _mm256_storeu_ps(o + c * QK + 8 * j, _mm256_fmadd_ps(_mm256_cvtepi32_ps(wide), s, m));
      }
    }
  }
}

}  // namespace

extern "C" {

// out [N, K] float32.
void herd_dequantize(const uint8_t* qs, const float* scales, const float* mins, int64_t N, int64_t K, int64_t bits,
                     int64_t group, float* out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
  for (int64_t r0 = 0; r0 < N; r0 += 64)
    dequantize_rows(qs, scales, mins, bits, K, group, r0, std::min(N, r0 + 64), out + r0 * K);
}

}  // extern "C"

namespace {

// A few tokens' activations prepared for one weight's matmul: int8 codes and block scales (the integer path), and
// per token and weight group what a 4-bit group's min multiplies: the sum of the activations (of scale * codes on
// the int8 path).
struct Acts {
  const float* x;
  int64_t M, K, group;
  int integer;
  std::vector<int8_t> q;
  std::vector<float> d, g;

  void prepare(const float* xf, int64_t m, int64_t k, int64_t grp, int integ) {
    x = xf, M = m, K = k, group = grp, integer = integ;
    const int64_t nb = K / QK, ng = K / group, per_group = group / QK;
    q.resize(integer ? M * K : 0);
    d.resize(integer ? M * nb : 0);
    g.assign(M * ng, 0.f);
    for (int64_t t = 0; t < M; ++t) {
      if (integer) {
        quantize_acts(x + t * K, K, per_group, q.data() + t * K, d.data() + t * nb, g.data() + t * ng);
      } else {
        for (int64_t j = 0; j < ng; ++j)
          for (int64_t i = j * group; i < (j + 1) * group; ++i) g[t * ng + j] += x[t * K + i];
      }
    }
  }
};

// out [M, N] = acts [M, K] @ W.T, its rows shared among the threads of the enclosing OpenMP team (every thread
// calls it; outside a parallel region one thread does all rows). nowait: no barrier at the end.
void matmul_team(const Acts& a, const uint8_t* q, const float* sc, const float* mn, int64_t N, int64_t bits,
                 float* o, bool nowait = false) {
  const int64_t M = a.M, K = a.K, group = a.group, nb = K / QK, ng = K / group;
  const int integer = a.integer;
  const int64_t row_bytes = bits == 4 ? K / 2 : K;
  const int64_t chunk = 16;
  auto body = [&](int64_t r0) {
    const int64_t r1 = std::min(N, r0 + chunk);
    if (M == 1 && integer) {  // decoding one token: four rows per pass over its activations
      constexpr int R = 4;
      for (int64_t r = r0; r < r1; r += R) {
        const int n = static_cast<int>(std::min<int64_t>(R, r1 - r));
        const uint8_t* pq[R];
        const float *ps[R], *pm[R];
        for (int i = 0; i < R; ++i) {
          const int64_t row = r + std::min(i, n - 1);
          pq[i] = q + row * row_bytes, ps[i] = sc + row * ng, pm[i] = mn ? mn + row * ng : nullptr;
        }
        float res[R];
        if (bits == 4) {
          rows_dot<4, R>(pq, ps, pm, K, group, a.q.data(), a.d.data(), a.g.data(), res);
        } else {
          rows_dot<8, R>(pq, ps, pm, K, group, a.q.data(), a.d.data(), a.g.data(), res);
        }
        for (int i = 0; i < n; ++i) o[r + i] = res[i];
      }
      return;
    }
    for (int64_t t0 = 0; t0 < M; t0 += 8) {
      const int T = static_cast<int>(std::min<int64_t>(8, M - t0));
      const int8_t* pq[8];
      const float *pd[8], *ps[8], *px[8];
      for (int t = 0; t < T; ++t) {
        pq[t] = integer ? a.q.data() + (t0 + t) * K : nullptr;
        pd[t] = integer ? a.d.data() + (t0 + t) * nb : nullptr, ps[t] = a.g.data() + (t0 + t) * ng;
        px[t] = a.x + (t0 + t) * K;
      }
      float res[8];
      for (int64_t r = r0; r < r1; ++r) {
        const uint8_t* qr = q + r * row_bytes;
        const float* sr = sc + r * ng;
        const float* mr = mn ? mn + r * ng : nullptr;
#define HERD_ROW(B, TT) \
  (integer ? row_dot<B, TT>(qr, sr, mr, K, group, pq, pd, ps, res) : row_dot_float<B, TT>(qr, sr, mr, K, group, px, ps, res))
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
  if (nowait) {
#pragma omp for schedule(static) nowait
    for (int64_t r0 = 0; r0 < N; r0 += chunk) body(r0);
  } else {
#pragma omp for schedule(static)
    for (int64_t r0 = 0; r0 < N; r0 += chunk) body(r0);
  }
}

}  // namespace

extern "C" {

// out [M, N] = x [M, K] @ W.T for a few tokens. integer: activations quantized to int8 blocks and integer dot
// products; else float activations times the widened codes.
void herd_matmul_rows(const float* xf, const uint8_t* q, const float* sc, const float* mn, int64_t M, int64_t N,
                      int64_t K, int64_t bits, int64_t group, int integer, float* o, int threads) {
  Acts acts;
  acts.prepare(xf, M, K, group, integer);
#pragma omp parallel num_threads(threads)
  matmul_team(acts, q, sc, mn, N, bits, o);
}

}  // extern "C"


// ---------------------------------------------------------------------------------------------------------------
// One transformer block for the generated tokens of a step (one or more per sequence, sequences end to end), whose
// keys and values live in blocks of the engine's paged cache: the same arithmetic as the PyTorch block over the
// quantized layers (RMSNorm, rotary embeddings on adjacent pairs, grouped-query attention, SwiGLU), without a
// PyTorch call per operation. Each token is computed on its own (its norm, its matmul sums, its attention over its
// sequence's keys up to itself), so a token's numbers do not depend on what else shares the call: a batch of
// sequences decodes exactly as each would alone.

namespace {

struct Sequences {  // the sequences of a step and where their keys live in the paged cache
  int64_t count, block_size;
  const int64_t* tokens;        // [count] tokens of each in this step
  const int64_t* cached;        // [count] tokens of each already in the cache
  const int64_t* table_offset;  // [count] where each one's blocks start in `table`
  const int64_t* table;         // block ids, each sequence's in order
};

struct QWeight {  // one quantized linear layer, as BlockWeight holds it
  const uint8_t* codes;
  const float* scales;
  const float* mins;
  int64_t n, k, bits, group, integer;
};

void rms_norm(const float* x, const float* weight, int64_t T, int64_t dim, float eps, float* out) {
  for (int64_t t = 0; t < T; ++t) {
    const float* xt = x + t * dim;
    float sum = 0.f;
    for (int64_t i = 0; i < dim; ++i) sum += xt[i] * xt[i];
    const float r = 1.f / std::sqrt(sum / static_cast<float>(dim) + eps);
    for (int64_t i = 0; i < dim; ++i) out[t * dim + i] = xt[i] * r * weight[i];
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

}  // namespace

extern "C" {

// x [T, dim] (the residual stream, updated in place); w: wq, wk, wv, wo, w1, w2, w3; cos_sin [T, head_dim / 2, 2];
// k_cache, v_cache [kv_heads, slots, head_dim] of this layer; these tokens' keys and values are written there.
void herd_decode_block(float* x, int64_t T, int64_t dim, const float* attn_norm, const float* ffn_norm, float eps,
                       const QWeight* w, const float* cos_sin, float* k_cache, float* v_cache, int64_t slots,
                       const Sequences* seqs, int64_t heads, int64_t kv_heads, int64_t head_dim, int threads) {
  const int64_t qd = heads * head_dim, kd = kv_heads * head_dim, hidden = w[4].n, group = heads / kv_heads;
  const float scale = 1.f / std::sqrt(static_cast<float>(head_dim));
  // Token t: which sequence, and its position there (the tokens of the sequences lie end to end).
  std::vector<int64_t> seq_of(T), pos_of(T);
  for (int64_t s = 0, t = 0; s < seqs->count; ++s)
    for (int64_t i = 0; i < seqs->tokens[s]; ++i, ++t) seq_of[t] = s, pos_of[t] = seqs->cached[s] + i;
  // Where each sequence's keys are, position by position (element offsets into a head's slots), worked out once
  // for all heads.
  std::vector<std::vector<int64_t>> where(seqs->count);
  for (int64_t s = 0; s < seqs->count; ++s) {
    where[s].resize(seqs->cached[s] + seqs->tokens[s]);
    for (int64_t pos = 0; pos < static_cast<int64_t>(where[s].size()); ++pos)
      where[s][pos] = (seqs->table[seqs->table_offset[s] + pos / seqs->block_size] * seqs->block_size +
                       pos % seqs->block_size) * head_dim;
  }
  std::vector<float> xn(T * dim), q(T * qd), k(T * kd), v(T * kd), att(T * qd), o(T * dim), gate(T * hidden),
      up(T * hidden);
  Acts a[3];
  auto prepare = [&](Acts& acts, const float* in, const QWeight& weight) {
    acts.prepare(in, T, weight.k, weight.group, static_cast<int>(weight.integer));
  };
  // Layers that read the same input (wq, wk, wv; w1, w3) share its quantized form when they group it alike.
  auto alike = [](const QWeight& u, const QWeight& v) { return u.group == v.group && u.integer == v.integer; };
  auto rows = [&](const Acts& acts, const QWeight& weight, float* out, bool nowait = false) {
    matmul_team(acts, weight.codes, weight.scales, weight.mins, weight.n, weight.bits, out, nowait);
  };
  // One team of threads for the whole block: the matmuls share out rows, the small steps run on one thread, and
  // the threads meet at barriers instead of being started and stopped for every matmul.
#pragma omp parallel num_threads(threads)
  {
#pragma omp single
    {
      rms_norm(x, attn_norm, T, dim, eps, xn.data());
      prepare(a[0], xn.data(), w[0]);
      for (int i = 1; i < 3; ++i)
        if (!alike(w[i], w[0])) prepare(a[i], xn.data(), w[i]);
    }
    rows(a[0], w[0], q.data(), true);
    rows(alike(w[1], w[0]) ? a[0] : a[1], w[1], k.data(), true);
    rows(alike(w[2], w[0]) ? a[0] : a[2], w[2], v.data());
#pragma omp single
    for (int64_t t = 0; t < T; ++t) {
      rope(q.data() + t * qd, heads, head_dim, cos_sin + t * head_dim);
      rope(k.data() + t * kd, kv_heads, head_dim, cos_sin + t * head_dim);
      const int64_t at = where[seq_of[t]][pos_of[t]];
      for (int64_t h = 0; h < kv_heads; ++h) {
        std::copy_n(k.data() + t * kd + h * head_dim, head_dim, k_cache + h * slots * head_dim + at);
        std::copy_n(v.data() + t * kd + h * head_dim, head_dim, v_cache + h * slots * head_dim + at);
      }
    }
#pragma omp for schedule(static) collapse(2)
    for (int64_t t = 0; t < T; ++t) {
      for (int64_t h = 0; h < heads; ++h) {
        const int64_t n = pos_of[t] + 1, s = seq_of[t];  // the keys token t sees: every earlier one and its own
        const float* qh = q.data() + t * qd + h * head_dim;
        const float* kh = k_cache + (h / group) * slots * head_dim;
        const float* vh = v_cache + (h / group) * slots * head_dim;
        const int64_t* at = where[s].data();
        std::vector<float> p(n);
        float top = -INFINITY;
        for (int64_t j = 0; j < n; ++j) top = std::max(top, p[j] = dot(qh, kh + at[j], head_dim) * scale);
        float total = 0.f;
        for (int64_t j = 0; j < n; ++j) total += p[j] = std::exp(p[j] - top);
        float* out = att.data() + t * qd + h * head_dim;
        std::fill_n(out, head_dim, 0.f);
        for (int64_t j = 0; j < n; ++j) {
          const float pj = p[j] / total;
          const float* vj = vh + at[j];
          for (int64_t d = 0; d < head_dim; ++d) out[d] += pj * vj[d];
        }
      }
    }
#pragma omp single
    prepare(a[0], att.data(), w[3]);
    rows(a[0], w[3], o.data());
#pragma omp single
    {
      for (int64_t i = 0; i < T * dim; ++i) x[i] += o[i];
      rms_norm(x, ffn_norm, T, dim, eps, xn.data());
      prepare(a[0], xn.data(), w[4]);
      if (!alike(w[6], w[4])) prepare(a[1], xn.data(), w[6]);
    }
    rows(a[0], w[4], gate.data(), true);
    rows(alike(w[6], w[4]) ? a[0] : a[1], w[6], up.data());
#pragma omp single
    {
      for (int64_t i = 0; i < T * hidden; ++i) gate[i] = gate[i] / (1.f + std::exp(-gate[i])) * up[i];
      prepare(a[2], gate.data(), w[5]);
    }
    rows(a[2], w[5], o.data());
  }
  for (int64_t i = 0; i < T * dim; ++i) x[i] += o[i];
}

}  // extern "C"
