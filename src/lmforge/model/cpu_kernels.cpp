// lmforge's float32 CPU inference kernels (lmforge/model/packed.py builds and loads them):
//   packed_linear     y = x @ W.T + b with W stored as panels of 32 output rows (float32, or int8 with row scales)
//   decode_attention  one new query per sequence against a KV cache, reading only its filled slots
//   rms_norm, add_rms_norm, gated, rope_   a decode step's small ops, each one pass instead of 4-12 torch ops
//   decode_layer      a pre-norm layer's whole one-token step: the kernels above in one call
//                     (eager torch runs RMSNorm as pow, mean, add, rsqrt, mul, mul and casts: ~12 dispatches of a
//                     few microseconds each over 576 floats; a decode step has 60 of them)
//
// packed_linear layout: panels[p][k][j] = W[32 p + j][k] (rows past N are zero). One panel is (K, 32) floats, contiguous,
// so the kernel streams it once from memory while it stays in L1/L2 for every 8-row block of x.
// The inner step loads 32 weights (two 16-float vectors) and multiplies them with up to 8 rows of x:
// 16 independent accumulators, no horizontal sums, every weight read once per 8 rows.
// GCC/Clang vector extensions (no intrinsics): the compiler picks AVX-512, AVX2 or NEON from -march=native.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int64_t kPanel = 32;  // output rows per panel
constexpr int kRows = 8;            // rows of x per block: 8 x 2 accumulators fit the 32 AVX-512 (or 16 AVX2 x 2) registers

typedef float vec16 __attribute__((vector_size(64)));

at::Tensor pack(const at::Tensor& weight) {
  TORCH_CHECK(weight.dim() == 2 && (weight.scalar_type() == at::kFloat || weight.scalar_type() == at::kChar) &&
                  weight.device().is_cpu(),
              "lmforge.pack: expected a 2-D float32 or int8 CPU weight, got ", weight.sizes(), " ",
              weight.scalar_type());
  const int64_t N = weight.size(0), K = weight.size(1), panels = (N + kPanel - 1) / kPanel;
  auto padded = at::zeros({panels * kPanel, K}, weight.options());
  padded.narrow(0, 0, N).copy_(weight);
  return padded.view({panels, kPanel, K}).transpose(1, 2).contiguous();
}

// ---- int8 panels: the same layout with int8 weights and one float scale per output row ------------------------------
// y = scale[j] * sum_k q[j][k] x[k] + bias[j] (lmforge's weight-only int8, model/quantize.py): each loaded group of
// 32 int8 weights (32 bytes, a quarter of float32's) widens to two float vectors in registers, so the same loops run
// on a quarter of the memory traffic; activations and sums stay float32.

// 32 weights of a panel row as two float vectors. GCC scalarises __builtin_convertvector from int8 (16 byte-to-int
// moves and converts), so the sign-extending loads are written with the instructions themselves where the target
// has them.
inline void load32(const float* w, vec16& lo, vec16& hi) {
  std::memcpy(&lo, w, sizeof(vec16));
  std::memcpy(&hi, w + 16, sizeof(vec16));
}

inline void load32(const int8_t* w, vec16& lo, vec16& hi) {
#if defined(__AVX512F__)
  const __m512 a = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w))));
  const __m512 b =
      _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + 16))));
  std::memcpy(&lo, &a, sizeof(vec16));
  std::memcpy(&hi, &b, sizeof(vec16));
#elif defined(__AVX2__)
  __m256 q[4];
  for (int i = 0; i < 4; i++) {
    q[i] = _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(w + 8 * i))));
  }
  std::memcpy(&lo, q, sizeof(vec16));
  std::memcpy(&hi, q + 2, sizeof(vec16));
#else
  float f[32];
  for (int i = 0; i < 32; i++) f[i] = static_cast<float>(w[i]);
  std::memcpy(&lo, f, sizeof(vec16));
  std::memcpy(&hi, f + 16, sizeof(vec16));
#endif
}

// One output row block's 32 sums into y: times the row scales (int8 panels) and plus the bias, where given.
inline void store32(const vec16& lo, const vec16& hi, const float* scale, const float* bias, float* y, int64_t width) {
  float out[kPanel];
  std::memcpy(out, &lo, sizeof(vec16));
  std::memcpy(out + 16, &hi, sizeof(vec16));
  for (int64_t j = 0; j < width; j++) {
    const float v = scale ? out[j] * scale[j] : out[j];
    y[j] = bias ? v + bias[j] : v;
  }
}

// M rows of x (2..8) against one panel of W (float or int8).
template <int M, typename W>
void block(const float* __restrict x, int64_t K, const W* __restrict panel, const float* __restrict scale,
           const float* __restrict bias, float* __restrict y, int64_t N, int64_t width) {
  // 4 KB ahead: the hardware prefetcher alone leaves the loads waiting when 8 rows of FMAs sit between them
  // (measured on the AVX-512 Xeon VM: 8 rows 43 -> 30 ms for 700 MB of weights). One row goes through row_gemv,
  // without: on the AMD EPYC VM it streams faster so (the prefetches take load slots the hardware prefetcher does
  // not need; docs/benchmarks.md), though the Xeon had measured them a little faster at one row.
  constexpr int64_t ahead = 4096 / (kPanel * sizeof(W));
  vec16 acc[M][2];
  for (int m = 0; m < M; m++) acc[m][0] = acc[m][1] = vec16{};
  for (int64_t k = 0; k < K; k++) {
    __builtin_prefetch(panel + (k + ahead) * kPanel, 0, 3);
    if (sizeof(W) == 4) __builtin_prefetch(panel + (k + ahead) * kPanel + 16, 0, 3);  // a float row: 2 lines
    vec16 w0, w1;
    load32(panel + k * kPanel, w0, w1);
#pragma GCC unroll 8
    for (int m = 0; m < M; m++) {
      const float xv = x[m * K + k];
      acc[m][0] += xv * w0;
      acc[m][1] += xv * w1;
    }
  }
  for (int m = 0; m < M; m++) store32(acc[m][0], acc[m][1], scale, bias, y + m * N, width);
}

// One row of x (a single stream's decode step): two k steps per iteration into four accumulators, no software
// prefetch: it reads float32 weights at the rate a plain sum over them does (docs/benchmarks.md).
template <typename W>
void row_gemv(const float* __restrict x, int64_t K, const W* __restrict panel, const float* __restrict scale,
              const float* __restrict bias, float* __restrict y, int64_t width) {
  vec16 a0{}, a1{}, b0{}, b1{};
  int64_t k = 0;
  for (; k + 2 <= K; k += 2) {
    vec16 w0, w1, w2, w3;
    load32(panel + k * kPanel, w0, w1);
    load32(panel + (k + 1) * kPanel, w2, w3);
    a0 += x[k] * w0;
    a1 += x[k] * w1;
    b0 += x[k + 1] * w2;
    b1 += x[k + 1] * w3;
  }
  for (; k < K; k++) {
    vec16 w0, w1;
    load32(panel + k * kPanel, w0, w1);
    a0 += x[k] * w0;
    a1 += x[k] * w1;
  }
  store32(a0 + b0, a1 + b1, scale, bias, y, width);
}

template <typename W>
void rows_block(int64_t rows, const float* x, int64_t K, const W* panel, const float* scale, const float* bias,
                float* y, int64_t N, int64_t width) {
  switch (rows) {
    case 1: row_gemv(x, K, panel, scale, bias, y, width); break;
    case 2: block<2>(x, K, panel, scale, bias, y, N, width); break;
    case 3: block<3>(x, K, panel, scale, bias, y, N, width); break;
    case 4: block<4>(x, K, panel, scale, bias, y, N, width); break;
    case 5: block<5>(x, K, panel, scale, bias, y, N, width); break;
    case 6: block<6>(x, K, panel, scale, bias, y, N, width); break;
    case 7: block<7>(x, K, panel, scale, bias, y, N, width); break;
    default: block<kRows>(x, K, panel, scale, bias, y, N, width); break;
  }
}

// Every panel of W through its rows of x, threads splitting the panels (output columns): each thread streams its
// own part of the weight once.
template <typename W>
void linear_panels(const float* x, int64_t M, int64_t K, const W* panels, int64_t n_panels, const float* scale,
                   const float* bias, float* y, int64_t N) {
  at::parallel_for(0, n_panels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; p++) {
      const int64_t n0 = p * kPanel, width = std::min(kPanel, N - n0);
      for (int64_t m0 = 0; m0 < M; m0 += kRows) {
        rows_block(std::min<int64_t>(kRows, M - m0), x + m0 * K, K, panels + p * K * kPanel,
                   scale ? scale + n0 : nullptr, bias ? bias + n0 : nullptr, y + m0 * N + n0, N, width);
      }
    }
  });
}

// x (..., K) of any leading shape (flattened to rows here: Python-side reshapes are a dispatch each, and a decode
// step makes ~120 of these calls), y (..., N).
// int8 panels (pack of an int8 matrix) take `scales` (N,) float32, one per output row.
at::Tensor packed_linear(const at::Tensor& input, const at::Tensor& panels, const std::optional<at::Tensor>& bias,
                         int64_t out_features, const std::optional<at::Tensor>& scales) {
  TORCH_CHECK(input.dim() >= 1 && input.scalar_type() == at::kFloat && input.device().is_cpu(),
              "lmforge.packed_linear: x must be a float32 CPU tensor, got ", input.sizes(), " ", input.scalar_type());
  const at::Tensor x = input.contiguous();  // read as (M, K) rows: no reshape op (each is a dispatch)
  TORCH_CHECK(panels.dim() == 3 && panels.size(1) == x.size(-1) && panels.size(2) == kPanel && panels.is_contiguous(),
              "lmforge.packed_linear: panels ", panels.sizes(), " do not fit x ", x.sizes());
  TORCH_CHECK(out_features <= panels.size(0) * kPanel && out_features > (panels.size(0) - 1) * kPanel,
              "lmforge.packed_linear: out_features ", out_features, " does not match ", panels.size(0), " panels");
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK(bias->numel() == out_features && bias->scalar_type() == at::kFloat && bias->is_contiguous(),
                "lmforge.packed_linear: bias must be float32 with ", out_features, " values");
  }
  const int64_t K = x.size(-1), M = K ? x.numel() / K : 0, N = out_features;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = N;
  auto y = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  const float* bp = has_bias ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  if (panels.scalar_type() == at::kChar) {
    TORCH_CHECK(scales.has_value() && scales->defined() && scales->numel() == N &&
                    scales->scalar_type() == at::kFloat && scales->is_contiguous(),
                "lmforge.packed_linear: int8 panels need float32 scales, one for each of the ", N, " outputs");
    linear_panels(xp, M, K, panels.data_ptr<int8_t>(), panels.size(0), scales->data_ptr<float>(), bp, yp, N);
  } else {
    TORCH_CHECK(panels.scalar_type() == at::kFloat, "lmforge.packed_linear: panels must be float32 or int8, got ",
                panels.scalar_type());
    linear_panels(xp, M, K, panels.data_ptr<float>(), panels.size(0), nullptr, bp, yp, N);
  }
  return y;
}

typedef int32_t ivec16 __attribute__((vector_size(64)));

// e^x for x <= 0 (softmax after subtracting the maximum), 16 at a time: 2^(x log2 e) with the integer part n
// put into the exponent bits and 2^f, |f| <= 1/2, from a degree-6 Taylor polynomial. Relative error (measured
// against double exp): < 7e-7 for x in [-10, 0], 4e-6 near -87, from rounding x log2 e to float; those weights
// are < 5e-5 of the largest. x below -88 (and -inf, a masked key) gives exactly 0. Scalar std::exp was half
// the kernel's time.
inline vec16 exp_nonpositive(vec16 x) {
  vec16 t = x * 1.4426950408889634f;
  t = t < -127.f ? vec16{} - 127.f : t;
  const ivec16 n = __builtin_convertvector(t - 0.5f, ivec16);  // round to nearest (t <= 0; truncation -> 0)
  const vec16 u = (t - __builtin_convertvector(n, vec16)) * 0.6931471805599453f;
  vec16 e = vec16{} + 1.f / 720.f;
  e = e * u + 1.f / 120.f;
  e = e * u + 1.f / 24.f;
  e = e * u + 1.f / 6.f;
  e = e * u + 0.5f;
  e = e * u + 1.f;
  e = e * u + 1.f;
  const ivec16 bits = (n + 127) << 23;  // n = -127 gives 0.0
  vec16 scale;
  std::memcpy(&scale, &bits, sizeof(vec16));
  return e * scale;
}

typedef float vec8 __attribute__((vector_size(32)));
typedef float vec4 __attribute__((vector_size(16)));

inline vec16 load16(const float* p) {
  vec16 v;
  std::memcpy(&v, p, sizeof(vec16));
  return v;
}

// Horizontal sum by halving (512 -> 256 -> 128 bits) in registers: through memory it stalled on store forwarding.
inline float sum16(vec16 v) {
  const vec8 a = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                 __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const vec4 b = __builtin_shufflevector(a, a, 0, 1, 2, 3) + __builtin_shufflevector(a, a, 4, 5, 6, 7);
  return (b[0] + b[1]) + (b[2] + b[3]);
}

// Gemma 2's attention soft-capping, c * tanh(score / c) before the softmax; c = 0: the score as it is.
inline float capped(float score, float softcap) {
  return softcap > 0.f ? softcap * std::tanh(score / softcap) : score;
}

// One (sequence, kv head) over a run of n keys: G query heads (already scaled), keys and values in rows of
// D = 16 V floats. Writes each head's unnormalised sum of e^(score - top) x value to out, and top and the sum of
// the weights to tops / totals (the caller divides, after merging runs of one cache split across threads).
// p holds G x n scores (padded to a multiple of 16); every key and value row is loaded once for the whole group.
template <int V>
void attend_group(const float* q, int64_t q_head_stride, const float* k, const float* v, const bool* mask,
                  int64_t mask_col, int64_t n, int64_t G, float softcap, float* p, int64_t p_row, float* out,
                  float* tops, float* totals) {
  constexpr float kMasked = -std::numeric_limits<float>::infinity();
  for (int64_t s = 0; s < n; s++) {
    vec16 kv[V];
    for (int i = 0; i < V; i++) kv[i] = load16(k + s * 16 * V + 16 * i);
    const bool allowed = mask == nullptr || mask[s * mask_col];
    for (int64_t g = 0; g < G; g++) {
      vec16 acc{};
      for (int i = 0; i < V; i++) acc += load16(q + g * q_head_stride + 16 * i) * kv[i];
      p[g * p_row + s] = allowed ? capped(sum16(acc), softcap) : kMasked;
    }
  }
  // softmax numerators in place, each head's row of p
  for (int64_t g = 0; g < G; g++) {
    float* pg = p + g * p_row;
    std::fill(pg + n, pg + p_row, kMasked);  // the padding lanes: exp gives 0
    vec16 top16 = load16(pg);
    for (int64_t s = 16; s < p_row; s += 16) {
      const vec16 x = load16(pg + s);
      top16 = x > top16 ? x : top16;
    }
    float top = top16[0];
    for (int i = 1; i < 16; i++) top = std::max(top, top16[i]);
    vec16 total{};
    for (int64_t s = 0; s < p_row; s += 16) {
      const vec16 x = top == kMasked ? vec16{} : exp_nonpositive(load16(pg + s) - top);  // all masked: zeros
      total += x;
      std::memcpy(pg + s, &x, sizeof(vec16));
    }
    tops[g] = top;
    totals[g] = sum16(total);
  }
  // weighted sum of values, in blocks of keys whose values stay in L1 while every head of the group uses them;
  // two accumulator sets (even and odd keys) so consecutive FMAs do not wait on each other
  constexpr int64_t kBlock = 32;
  std::fill(out, out + G * 16 * V, 0.f);
  for (int64_t s0 = 0; s0 < n; s0 += kBlock) {
    const int64_t s1 = std::min(n, s0 + kBlock);
    for (int64_t g = 0; g < G; g++) {
      const float* pg = p + g * p_row;
      float* o = out + g * 16 * V;
      vec16 acc[2][V];
      for (int i = 0; i < V; i++) {
        acc[0][i] = load16(o + 16 * i);
        acc[1][i] = vec16{};
      }
      int64_t s = s0;
      for (; s + 1 < s1; s += 2) {
        for (int i = 0; i < V; i++) {
          acc[0][i] += pg[s] * load16(v + s * 16 * V + 16 * i);
          acc[1][i] += pg[s + 1] * load16(v + (s + 1) * 16 * V + 16 * i);
        }
      }
      if (s < s1) {
        for (int i = 0; i < V; i++) acc[0][i] += pg[s] * load16(v + s * 16 * V + 16 * i);
      }
      for (int i = 0; i < V; i++) {
        const vec16 r = acc[0][i] + acc[1][i];
        std::memcpy(o + 16 * i, &r, sizeof(vec16));
      }
    }
  }
}

// The same for any head size, in plain loops (test configs use small odd ones).
void attend_group_any(const float* q, int64_t q_head_stride, const float* k, const float* v, const bool* mask,
                      int64_t mask_col, int64_t n, int64_t G, int64_t D, float softcap, float* p, float* out,
                      float* tops, float* totals) {
  for (int64_t g = 0; g < G; g++) {
    float* pg = p + g * n;
    for (int64_t s = 0; s < n; s++) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; d++) dot += q[g * q_head_stride + d] * k[s * D + d];
      pg[s] = mask == nullptr || mask[s * mask_col] ? capped(dot, softcap) : -std::numeric_limits<float>::infinity();
    }
    const float top = *std::max_element(pg, pg + n);
    float* o = out + g * D;
    std::fill(o, o + D, 0.f);
    tops[g] = top;
    totals[g] = 0.f;
    if (top == -std::numeric_limits<float>::infinity()) continue;
    for (int64_t s = 0; s < n; s++) totals[g] += (pg[s] = std::exp(pg[s] - top));
    for (int64_t s = 0; s < n; s++)
      for (int64_t d = 0; d < D; d++) o[d] += pg[s] * v[s * D + d];
  }
}

// Attention of one query per (sequence, head) over the first n slots of a KV cache (scores soft-capped when
// softcap > 0): q (B, H, 1, D),
// k and v (B, Hkv, S, D) with H a multiple of Hkv (grouped-query), mask (B, >= n) bool (true = attend) or none,
// n = length when given (a static cache's fill count, a tensor so a compiled step does not specialise on it),
// else S. SDPA has to read a static cache's every slot under a mask; this reads the n filled ones, and one
// (sequence, kv head) unit serves its whole group of query heads while its keys are in L1.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                            const std::optional<at::Tensor>& mask, const std::optional<at::Tensor>& length,
                            double scale, double softcap) {
  TORCH_CHECK(q.dim() == 4 && q.size(2) == 1 && q.scalar_type() == at::kFloat && q.device().is_cpu() && q.stride(3) == 1,
              "lmforge.decode_attention: q must be a float32 CPU (B, H, 1, D) tensor with D contiguous, got ",
              q.sizes(), " ", q.scalar_type());
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3);
  for (const at::Tensor* t : {&k, &v}) {
    TORCH_CHECK(t->dim() == 4 && t->size(0) == B && t->size(3) == D && t->scalar_type() == at::kFloat &&
                t->stride(3) == 1 && t->stride(2) == D && t->size(1) > 0 && H % t->size(1) == 0 &&
                t->sizes() == k.sizes(),
                "lmforge.decode_attention: k and v must be float32 (B, Hkv, S, D) with (S, D) contiguous and H a "
                "multiple of Hkv; q ", q.sizes(), ", k ", k.sizes(), ", v ", v.sizes());
  }
  const int64_t Hkv = k.size(1), G = H / Hkv, S = k.size(2);
  const int64_t n = length.has_value() && length->defined() ? length->item<int64_t>() : S;
  TORCH_CHECK(n > 0 && n <= S, "lmforge.decode_attention: ", n, " filled slots in a cache of ", S);
  const bool* mp = nullptr;
  int64_t mask_row = 0, mask_col = 0;
  if (mask.has_value() && mask->defined()) {
    TORCH_CHECK(mask->dim() == 2 && mask->size(0) == B && mask->size(1) >= n && mask->scalar_type() == at::kBool,
                "lmforge.decode_attention: mask must be bool (B, >= ", n, "), got ", mask->sizes(), " ",
                mask->scalar_type());
    mp = mask->data_ptr<bool>();
    mask_row = mask->stride(0);
    mask_col = mask->stride(1);
  }
  // (sequence, kv head) units; with fewer than two per thread, a long cache's keys are split into chunks
  // that threads take separately and merge afterwards (as flash-decoding does), so no thread idles
  const int64_t units = B * Hkv, threads = at::get_num_threads();
  const int64_t chunks =
      units >= 2 * threads ? 1 : std::max<int64_t>(1, std::min(n / 256, (2 * threads + units - 1) / units));
  const int64_t chunk = (n + chunks - 1) / chunks;
  // per chunk and head: the sum of weighted values, the top score, the total weight
  auto parts = at::empty({units * chunks, G, D + 2}, q.options());
  const float* qp = q.data_ptr<float>();
  const float* kp = k.data_ptr<float>();
  const float* vp = v.data_ptr<float>();
  float* pp = parts.data_ptr<float>();
  const float sc = static_cast<float>(scale), cap = static_cast<float>(softcap);
  at::parallel_for(0, units * chunks, 1, [&](int64_t begin, int64_t end) {
    const int64_t p_row = (chunk + 15) / 16 * 16;
    std::vector<float> p(G * p_row), qu(G * D), out(G * D), tops(G), totals(G);
    for (int64_t task = begin; task < end; task++) {
      const int64_t unit = task / chunks, s0 = task % chunks * chunk, len = std::min(chunk, n - s0);
      const int64_t b = unit / Hkv, hk = unit % Hkv;
      float* part = pp + task * G * (D + 2);
      if (len <= 0) {  // n not a multiple of the chunk: an empty last chunk weighs nothing
        for (int64_t g = 0; g < G; g++) part[g * (D + 2) + D] = -std::numeric_limits<float>::infinity();
        continue;
      }
      for (int64_t g = 0; g < G; g++) {  // the group's queries, scaled, side by side
        const float* qh = qp + b * q.stride(0) + (hk * G + g) * q.stride(1);
        for (int64_t d = 0; d < D; d++) qu[g * D + d] = qh[d] * sc;
      }
      const float* ku = kp + b * k.stride(0) + hk * k.stride(1) + s0 * D;
      const float* vu = vp + b * v.stride(0) + hk * v.stride(1) + s0 * D;
      const bool* mu = mp ? mp + b * mask_row + s0 * mask_col : nullptr;
      const float* qb = qu.data();
      float *pb = p.data(), *ob = out.data(), *tb = tops.data(), *wb = totals.data();
      switch (D) {
        case 32: attend_group<2>(qb, D, ku, vu, mu, mask_col, len, G, cap, pb, p_row, ob, tb, wb); break;
        case 64: attend_group<4>(qb, D, ku, vu, mu, mask_col, len, G, cap, pb, p_row, ob, tb, wb); break;
        case 128: attend_group<8>(qb, D, ku, vu, mu, mask_col, len, G, cap, pb, p_row, ob, tb, wb); break;
        case 256: attend_group<16>(qb, D, ku, vu, mu, mask_col, len, G, cap, pb, p_row, ob, tb, wb); break;
        default: attend_group_any(qb, D, ku, vu, mu, mask_col, len, G, D, cap, pb, ob, tb, wb); break;
      }
      for (int64_t g = 0; g < G; g++) {
        std::copy(out.data() + g * D, out.data() + (g + 1) * D, part + g * (D + 2));
        part[g * (D + 2) + D] = tops[g];
        part[g * (D + 2) + D + 1] = totals[g];
      }
    }
  });
  // merge each head's chunks: rescale every chunk to the largest top, then divide by the total weight
  auto out = at::zeros({B, H, 1, D}, q.options());
  float* op = out.data_ptr<float>();
  for (int64_t unit = 0; unit < units; unit++) {
    for (int64_t g = 0; g < G; g++) {
      float top = -std::numeric_limits<float>::infinity(), total = 0.f;
      for (int64_t c = 0; c < chunks; c++) top = std::max(top, pp[((unit * chunks + c) * G + g) * (D + 2) + D]);
      if (top == -std::numeric_limits<float>::infinity()) continue;  // every key masked: zeros, not NaN
      float* o = op + (unit * G + g) * D;  // (b, hk * G + g) = unit * G + g
      for (int64_t c = 0; c < chunks; c++) {
        const float* part = pp + ((unit * chunks + c) * G + g) * (D + 2);
        if (part[D] == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp(part[D] - top);
        total += w * part[D + 1];
        for (int64_t d = 0; d < D; d++) o[d] += w * part[d];
      }
      for (int64_t d = 0; d < D; d++) o[d] /= total;
    }
  }
  return out;
}

// ---- the small ops of a decode step ----------------------------------------------------------------------------
// Each works on float32 rows of the last dim and splits rows across threads only when there are many (prefill):
// one decode row is a few hundred floats, which a thread handoff would cost more than.

constexpr int64_t kRowsPerTask = 16;

// y = x / sqrt(mean(x^2) + eps) * (w + offset), as torch computes RMSNorm in float32: the normed value is rounded
// before the scale multiplies it (Llama's order; offset is Gemma's 1 + w).
inline void rms_row(const float* x, const float* w, float offset, float eps, int64_t D, float* y) {
  vec16 acc{};
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) {
    const vec16 v = load16(x + d);
    acc += v * v;
  }
  float total = sum16(acc);
  for (; d < D; d++) total += x[d] * x[d];
  const float r = 1.f / std::sqrt(total / static_cast<float>(D) + eps);
  for (d = 0; d < D; d++) {
    const float normed = x[d] * r;
    y[d] = normed * (w[d] + offset);
  }
}

void check_rows(const at::Tensor& x, const at::Tensor& weight, const char* op) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.device().is_cpu() && x.dim() >= 1,
              "lmforge.", op, ": x must be a float32 CPU tensor, got ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(-1) && weight.scalar_type() == at::kFloat &&
                  weight.is_contiguous(),
              "lmforge.", op, ": weight must be float32 (", x.size(-1), "), got ", weight.sizes());
}

at::Tensor rms_norm(const at::Tensor& input, const at::Tensor& weight, double eps, double offset) {
  check_rows(input, weight, "rms_norm");
  const at::Tensor x = input.contiguous();
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto y = at::empty(x.sizes(), x.options());
  const float *xp = x.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps), off = static_cast<float>(offset);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) rms_row(xp + r * D, wp, off, e, D, yp + r * D);
  });
  return y;
}

// The residual add and the next RMSNorm in one pass: (x + branch, rms_norm(x + branch)).
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const at::Tensor& input, const at::Tensor& branch_in,
                                                const at::Tensor& weight, double eps, double offset) {
  check_rows(input, weight, "add_rms_norm");
  TORCH_CHECK(branch_in.sizes() == input.sizes() && branch_in.scalar_type() == at::kFloat,
              "lmforge.add_rms_norm: branch ", branch_in.sizes(), " does not match x ", input.sizes());
  const at::Tensor x = input.contiguous(), branch = branch_in.contiguous();
  const int64_t D = x.size(-1), rows = x.numel() / D;
  auto sum = at::empty(x.sizes(), x.options());
  auto y = at::empty(x.sizes(), x.options());
  const float *xp = x.data_ptr<float>(), *bp = branch.data_ptr<float>(), *wp = weight.data_ptr<float>();
  float *sp = sum.data_ptr<float>(), *yp = y.data_ptr<float>();
  const float e = static_cast<float>(eps), off = static_cast<float>(offset);
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      for (int64_t d = 0; d < D; d++) sp[r * D + d] = xp[r * D + d] + bp[r * D + d];
      rms_row(sp + r * D, wp, off, e, D, yp + r * D);
    }
  });
  return {sum, y};
}

// sigmoid(v) from e^-|v| (exp_nonpositive's range): 1 / (1 + e) for v >= 0, e / (1 + e) below.
inline vec16 sigmoid16(vec16 v) {
  const vec16 e = exp_nonpositive(v > 0.f ? -v : v);
  return (v >= 0.f ? vec16{} + 1.f : e) / (1.f + e);
}

inline vec16 silu16(vec16 v) { return v * sigmoid16(v); }

// The tanh GELU, 0.5 v (1 + tanh(y)) = v sigmoid(2y), y = sqrt(2 / pi) (v + 0.044715 v^3).
inline vec16 gelu_tanh16(vec16 v) {
  return v * sigmoid16(2.f * 0.7978845608028654f * (v + 0.044715f * v * v * v));
}

// A gated MLP's activation over (..., 2F) rows [gate | up]: act(gate) * up, with act SiLU (SwiGLU) or, geglu,
// the tanh GELU (Gemma's gelu_pytorch_tanh).
at::Tensor gated(const at::Tensor& input, bool geglu) {
  TORCH_CHECK(input.scalar_type() == at::kFloat && input.device().is_cpu() && input.size(-1) % 2 == 0,
              "lmforge.gated: expected float32 CPU (..., 2F), got ", input.sizes(), " ", input.scalar_type());
  const at::Tensor x = input.contiguous();
  const int64_t F2 = x.size(-1), F = F2 / 2, rows = x.numel() / F2;
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end());
  shape.back() = F;
  auto y = at::empty(shape, x.options());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, rows, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const float *g = xp + r * F2, *u = g + F;
      float* o = yp + r * F;
      int64_t j = 0;
      for (; j + 16 <= F; j += 16) {
        const vec16 v = load16(g + j), a = geglu ? gelu_tanh16(v) : silu16(v), out = a * load16(u + j);
        std::memcpy(o + j, &out, sizeof(vec16));
      }
      for (; j < F; j++) {
        const float v = g[j];
        const float a = geglu ? 0.5f * v * (1.f + std::tanh(0.7978845608028654f * (v + 0.044715f * v * v * v)))
                              : v / (1.f + std::exp(-v));
        o[j] = a * u[j];
      }
    }
  });
  return y;
}

// Rotate-half RoPE in place on the first `heads` heads of each row of qkv (B, T, N) (q's and k's heads, which the
// fused projection puts first): in each head the first d dims rotate (d = cos's last dim: partial rotary leaves the
// rest), x[i] * cos[i] - x[i + d/2] * sin[i] and x[i + d/2] * cos[i + d/2] + x[i] * sin[i + d/2]. cos, sin
// (B or 1, T, d), any strides.
void rope_(at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, int64_t heads, int64_t head_dim) {
  TORCH_CHECK(qkv.dim() == 3 && qkv.scalar_type() == at::kFloat && qkv.is_contiguous() && qkv.device().is_cpu() &&
                  heads * head_dim <= qkv.size(2),
              "lmforge.rope_: qkv must be a contiguous float32 (B, T, >= heads x head_dim) tensor, got ", qkv.sizes());
  const int64_t B = qkv.size(0), T = qkv.size(1), N = qkv.size(2), d = cos.size(-1), half = d / 2;
  for (const at::Tensor* t : {&cos, &sin}) {
    TORCH_CHECK(t->dim() == 3 && t->scalar_type() == at::kFloat && (t->size(0) == B || t->size(0) == 1) &&
                    t->size(1) == T && t->size(2) == d && t->stride(2) == 1 && d % 2 == 0 && d <= head_dim,
                "lmforge.rope_: cos and sin must be float32 (B, T, d) with d even and <= head_dim, got ",
                t->sizes());
  }
  float* xp = qkv.data_ptr<float>();
  const float *cp = cos.data_ptr<float>(), *sp = sin.data_ptr<float>();
  const int64_t cb = cos.size(0) == 1 ? 0 : cos.stride(0), sb = sin.size(0) == 1 ? 0 : sin.stride(0);
  at::parallel_for(0, B * T, kRowsPerTask, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; r++) {
      const int64_t b = r / T, t = r % T;
      const float *c = cp + b * cb + t * cos.stride(1), *s = sp + b * sb + t * sin.stride(1);
      for (int64_t h = 0; h < heads; h++) {
        float* x = xp + r * N + h * head_dim;
        for (int64_t i = 0; i < half; i++) {
          const float a = x[i], z = x[i + half];
          x[i] = a * c[i] + (-z) * s[i];
          x[i + half] = z * c[i + half] + a * s[i + half];
        }
      }
    }
  });
}

// ---- one decode layer in one call -------------------------------------------------------------------------------
// A pre-norm layer (Llama's placement) for one new token per row, the ops above in the order the modules run them:
//   h = rms_norm(x); qkv = h W_qkv; RoPE on q, k; k, v written to the cache at `slot`; attention over slots 0..slot;
//   x1, h2 = add_rms_norm(x, y W_o); x1 + down(gated(h2 W_gate_up)).
// With post_attn_norm and post_mlp_norm, Gemma's sandwich: x1 = x + rms_norm(y W_o); h2 = rms_norm(x1); and
// x1 + rms_norm(down(...)); without attn_norm and mlp_norm, OLMo 2's norms after the branches (h = x, h2 = x1).
// The same kernels and summation order as the module path, so the result is bit-identical to it; what it saves is
// the Python around them: a decode step of a 30-layer model made ~500 module calls, views and cache writes, now 30
// calls (the time it saves: docs/benchmarks.md, "A layer in one call").
// x (B, 1, d); caches (B, Hkv, slots, D); cos, sin (B or 1, 1, rotary dims) or none (a NoPE layer); mask (B, >=
// slot + 1) bool (true = attend) or none. row_slots (B) int64: a ring layer's cache, each row's write slot, and
// attention over every slot of the ring under `mask` (B, slots).
at::Tensor decode_layer(const at::Tensor& x, const std::optional<at::Tensor>& attn_norm,
                        const std::optional<at::Tensor>& mlp_norm, double eps,
                        double offset, const at::Tensor& qkv_panels, const std::optional<at::Tensor>& qkv_bias,
                        const at::Tensor& o_panels, const std::optional<at::Tensor>& o_bias,
                        const at::Tensor& gate_up_panels, const std::optional<at::Tensor>& gate_up_bias,
                        const at::Tensor& down_panels, const std::optional<at::Tensor>& down_bias,
                        const std::optional<at::Tensor>& cos, const std::optional<at::Tensor>& sin,
                        const at::Tensor& k_cache, const at::Tensor& v_cache, int64_t slot,
                        const std::optional<at::Tensor>& mask, int64_t n_heads, int64_t head_dim, double scale,
                        double softcap, bool geglu, int64_t d_ff, const std::optional<at::Tensor>& q_norm,
                        const std::optional<at::Tensor>& k_norm, const std::optional<at::Tensor>& qkv_scale,
                        const std::optional<at::Tensor>& o_scale, const std::optional<at::Tensor>& gate_up_scale,
                        const std::optional<at::Tensor>& down_scale,
                        const std::optional<at::Tensor>& post_attn_norm,
                        const std::optional<at::Tensor>& post_mlp_norm,
                        const std::optional<at::Tensor>& row_slots) {
  TORCH_CHECK(x.dim() == 3 && x.size(1) == 1 && x.is_contiguous(),
              "lmforge.decode_layer: x must be a contiguous (B, 1, d) tensor, got ", x.sizes());
  const int64_t B = x.size(0), d = x.size(2), Hkv = k_cache.size(1), D = head_dim;
  const int64_t q_width = n_heads * D, kv_width = Hkv * D;
  for (const at::Tensor* c : {&k_cache, &v_cache}) {
    TORCH_CHECK(c->dim() == 4 && c->size(0) == B && c->size(3) == D && c->is_contiguous() &&
                    c->scalar_type() == at::kFloat && slot >= 0 && slot < c->size(2) && c->sizes() == k_cache.sizes(),
                "lmforge.decode_layer: caches must be contiguous float32 (", B, ", Hkv, > ", slot, ", ", D,
                "), got ", k_cache.sizes(), " and ", v_cache.sizes());
  }
  // a ring (a sliding layer's window of slots, KVCache): each row writes its own slot and attends over the ring
  const bool ring = row_slots.has_value() && row_slots->defined();
  if (ring) {
    TORCH_CHECK(row_slots->dim() == 1 && row_slots->size(0) == B && row_slots->scalar_type() == at::kLong &&
                    row_slots->is_contiguous(),
                "lmforge.decode_layer: row_slots must be a contiguous int64 (", B, ") tensor");
  }
  const auto given = [](const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); };
  const bool pre = given(attn_norm), sandwich_or_post = given(post_attn_norm);
  TORCH_CHECK((pre || sandwich_or_post) && (given(mlp_norm) || !pre) && given(post_mlp_norm) == sandwich_or_post,
              "lmforge.decode_layer: give attn_norm and mlp_norm (pre-norm), post_attn_norm and post_mlp_norm "
              "(norms after the branches), or all four (sandwich)");
  const at::Tensor h = pre ? rms_norm(x, *attn_norm, eps, offset) : x;  // OLMo 2: the branch reads x itself
  at::Tensor qkv = packed_linear(h, qkv_panels, qkv_bias, q_width + 2 * kv_width, qkv_scale);
  const int64_t row = q_width + 2 * kv_width, slots = k_cache.size(2);
  if (given(q_norm)) {  // q and k RMS-normed before RoPE, in place: each head (Qwen3, Gemma 3) or each whole
                        // projection (OLMo 2)
    const bool per_head = q_norm->numel() == D;
    TORCH_CHECK(given(k_norm) && q_norm->is_contiguous() && k_norm->is_contiguous() &&
                    (per_head ? k_norm->numel() == D : q_norm->numel() == q_width && k_norm->numel() == kv_width),
                "lmforge.decode_layer: q_norm and k_norm must be (", D, ") weights, or (", q_width, ") and (",
                kv_width, ")");
    float* rows = qkv.data_ptr<float>();
    const float *qw = q_norm->data_ptr<float>(), *kw = k_norm->data_ptr<float>();
    const float e = static_cast<float>(eps), off = static_cast<float>(offset);
    for (int64_t b = 0; b < B; b++) {
      if (!per_head) {
        rms_row(rows + b * row, qw, off, e, q_width, rows + b * row);
        rms_row(rows + b * row + q_width, kw, off, e, kv_width, rows + b * row + q_width);
        continue;
      }
      for (int64_t i = 0; i < n_heads + Hkv; i++) {  // q's heads, then k's
        float* head = rows + b * row + i * D;
        rms_row(head, i < n_heads ? qw : kw, off, e, D, head);
      }
    }
  }
  if (cos.has_value() && cos->defined()) rope_(qkv, *cos, *sin, n_heads + Hkv, D);
  const float* src = qkv.data_ptr<float>();
  float *kc = k_cache.data_ptr<float>(), *vc = v_cache.data_ptr<float>();
  const int64_t* ring_slot = ring ? row_slots->data_ptr<int64_t>() : nullptr;
  for (int64_t b = 0; b < B; b++) {
    const int64_t s = ring ? ring_slot[b] : slot;
    TORCH_CHECK(s >= 0 && s < slots, "lmforge.decode_layer: slot ", s, " outside the cache's ", slots);
    for (int64_t hk = 0; hk < Hkv; hk++) {
      const int64_t at_slot = ((b * Hkv + hk) * slots + s) * D;
      std::memcpy(kc + at_slot, src + b * row + q_width + hk * D, D * sizeof(float));
      std::memcpy(vc + at_slot, src + b * row + q_width + kv_width + hk * D, D * sizeof(float));
    }
  }
  // q as (B, H, 1, D) views of qkv's rows; the keys and values as the cache's filled slots
  const at::Tensor q = qkv.narrow(2, 0, q_width).view({B, 1, n_heads, D}).transpose(1, 2);
  const int64_t seen = ring ? slots : slot + 1;
  const at::Tensor y = decode_attention(q, k_cache.narrow(2, 0, seen), v_cache.narrow(2, 0, seen), mask,
                                        std::nullopt, scale, softcap);
  const at::Tensor o = packed_linear(y.view({B, 1, q_width}), o_panels, o_bias, d, o_scale);
  at::Tensor x1, h2;
  if (sandwich_or_post) {  // each branch's output normed before it joins the stream: x + norm(o)
    x1 = x.add(rms_norm(o, *post_attn_norm, eps, offset));
    h2 = pre ? rms_norm(x1, *mlp_norm, eps, offset) : x1;  // Gemma's sandwich norms the MLP's input too
  } else {
    std::tie(x1, h2) = add_rms_norm(x, o, *mlp_norm, eps, offset);
  }
  const at::Tensor down =
      packed_linear(gated(packed_linear(h2, gate_up_panels, gate_up_bias, 2 * d_ff, gate_up_scale), geglu),
                    down_panels, down_bias, d, down_scale);
  return x1.add_(sandwich_or_post ? rms_norm(down, *post_mlp_norm, eps, offset) : down);
}

}  // namespace

TORCH_LIBRARY(lmforge, m) {
  m.def("pack(Tensor weight) -> Tensor");
  m.def("packed_linear(Tensor x, Tensor panels, Tensor? bias, int out_features, Tensor? scales=None) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor? mask, Tensor? length, float scale, float softcap=0.0) -> Tensor");
  m.def("rms_norm(Tensor x, Tensor weight, float eps, float offset) -> Tensor");
  m.def("add_rms_norm(Tensor x, Tensor branch, Tensor weight, float eps, float offset) -> (Tensor, Tensor)");
  m.def("gated(Tensor x, bool geglu) -> Tensor");
  m.def("rope_(Tensor(a!) qkv, Tensor cos, Tensor sin, int heads, int head_dim) -> ()");
  m.def("decode_layer(Tensor x, Tensor? attn_norm, Tensor? mlp_norm, float eps, float offset, Tensor qkv_panels, "
        "Tensor? qkv_bias, Tensor o_panels, Tensor? o_bias, Tensor gate_up_panels, Tensor? gate_up_bias, "
        "Tensor down_panels, Tensor? down_bias, Tensor? cos, Tensor? sin, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "int slot, Tensor? mask, int n_heads, int head_dim, float scale, float softcap, bool geglu, int d_ff, "
        "Tensor? q_norm=None, Tensor? k_norm=None, Tensor? qkv_scale=None, Tensor? o_scale=None, "
        "Tensor? gate_up_scale=None, Tensor? down_scale=None, Tensor? post_attn_norm=None, "
        "Tensor? post_mlp_norm=None, Tensor? row_slots=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(lmforge, CPU, m) {
  m.impl("pack", &pack);
  m.impl("packed_linear", &packed_linear);
  m.impl("decode_attention", &decode_attention);
  m.impl("rms_norm", &rms_norm);
  m.impl("add_rms_norm", &add_rms_norm);
  m.impl("gated", &gated);
  m.impl("rope_", &rope_);
  m.impl("decode_layer", &decode_layer);
}
