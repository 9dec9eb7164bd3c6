// fastfair native kernels: the row math, written once for the CPU and the CUDA drivers.
//
// Every function here is `__host__ __device__` (FF_HD) and is driven by one of two drivers:
//   csrc/native_cpu.cpp  -- std::thread over blocks of query rows, SerialGroup (one "lane")
//   csrc/native_cuda.cu  -- one warp (WarpGroup) per query row / one block (BlockGroup) per map
// A "group" G is the set of threads that share one row: it provides lane(), size(), the
// reductions sum/max/min (every lane gets the result), sync() and atomic_add (for scatters
// into row buffers that several lanes may hit). Loops over a row are `for (i = g.lane(); i < n;
// i += g.size())`, so the serial driver runs them as plain, vectorisable loops.
//
// The math is the specification in fastfair/kernels/naive.py:
//   S = q k^T scale, P = softmax(S), lse = logsumexp(S), out = P v, maps = P[:, tok]
//   backward: dS = P * (dP - rowsum(P * dP)), dq = scale dS k, dk = scale dS^T q, dv = P^T dout
//   SoftIoU: min-max normalisation, log-domain Sinkhorn soft top-k (two anchors {0, 1}), IoU,
//   and the exact gradient of the unrolled Sinkhorn iterations.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FF_HD __host__ __device__ __forceinline__
#else
#define FF_HD inline
#endif

namespace ff {

typedef int64_t idx_t;

// ------------------------------------------------------------------------------------------
// Scalars: storage <-> accumulation conversions, exp / log.
// ------------------------------------------------------------------------------------------

template <class T>
struct Cvt {
  template <class A>
  FF_HD static A load(T x) { return static_cast<A>(x); }
  template <class A>
  FF_HD static T store(A x) { return static_cast<T>(x); }
};
#if defined(__CUDACC__)
template <>
struct Cvt<__half> {
  template <class A>
  FF_HD static A load(__half x) { return static_cast<A>(__half2float(x)); }
  template <class A>
  FF_HD static __half store(A x) { return __float2half_rn(static_cast<float>(x)); }
};
template <>
struct Cvt<__nv_bfloat16> {
  template <class A>
  FF_HD static A load(__nv_bfloat16 x) { return static_cast<A>(__bfloat162float(x)); }
  template <class A>
  FF_HD static __nv_bfloat16 store(A x) { return __float2bfloat16_rn(static_cast<float>(x)); }
};
#endif

template <class A, class T>
FF_HD A ld(const T* p, idx_t i) { return Cvt<T>::template load<A>(p[i]); }

template <class A>
FF_HD A ninf() { return static_cast<A>(-INFINITY); }

// exp(xc) / 2^fn for fn = round(xc / ln 2): two-step Cody-Waite reduction and the Cephes polynomial.
// T is float or a float vector (vexp below); the same operations in the same order for both.
template <class T>
FF_HD T exp_poly(T xc, T fn) {
  T r = xc - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  T p = T{} + 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return p * r * r + r + 1.0f;
}

// Branch-free float exp (Cephes polynomial, ~1 ulp) that gcc vectorises; x < -87.3 gives 0.
// Note: the CPU module's -fassociative-math lets GCC merge or reorder the two reduction steps of
// exp_poly (xc - fn C1 - fn C2 -> xc - fn (C1 + C2), or (xc - fn C2) - fn C1), measured at up to
// ~8 ulp for |x| < 10 and ~60 ulp near x = -87 (relative 4e-6) instead of ~1 ulp: harmless at the
// tolerances the tests use, but not the accuracy of the polynomial itself.
FF_HD float fast_expf(float x) {
  float xc = x > 88.3762626647949f ? 88.3762626647949f : x;
  xc = xc < -87.33654475f ? -87.33654475f : xc;
  float t = xc * 1.44269504088896341f;
  const float fn = floorf(t + 0.5f);  // inlined (roundps) with -fno-trapping-math
  float y = exp_poly(xc, fn);
  int32_t bits = (static_cast<int32_t>(fn) + 127) << 23;
  float sc;
  memcpy(&sc, &bits, sizeof(float));
  y = y * sc;
  return x < -87.33654475f ? 0.0f : y;
}

FF_HD float ff_exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return fast_expf(x);
#endif
}
FF_HD double ff_exp(double x) { return exp(x); }
FF_HD float ff_log(float x) { return logf(x); }
FF_HD double ff_log(double x) { return log(x); }

// x unchanged, as a value the optimiser cannot see into, so that arithmetic on the result is never
// reassociated with the arithmetic that produced it. The CPU module is compiled with
// -fassociative-math (CMakeLists.txt), under which GCC rewrites an epsilon guard d = (hi - lo) + eps
// as hi + (eps - lo): in float, eps - lo rounds to -lo once eps < ulp(lo) / 2 (|lo| > 0.25 for
// eps = 1e-8) and to a neighbour of eps - lo below that, so a constant row got d = 0 (NaN = 0/0
// downstream) or a d off by up to 50% where the guard was meant to give exactly eps. Every guard in
// this file is therefore written opaque(value) + eps. An empty asm costs nothing (the value stays in
// its register); the CUDA build has no reassociation (no --use_fast_math), but the barrier is kept
// there too so that the guards do not depend on the flags.
FF_HD float opaque(float x) {
#if defined(__CUDA_ARCH__)
  asm("" : "+f"(x));
#elif defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(x));
#elif defined(__GNUC__)
  __asm__("" : "+m"(x));
#else
  volatile float v = x;
  x = v;
#endif
  return x;
}
FF_HD double opaque(double x) {
#if defined(__CUDA_ARCH__)
  asm("" : "+d"(x));
#elif defined(__GNUC__) && defined(__x86_64__)
  __asm__("" : "+x"(x));
#elif defined(__GNUC__) && defined(__aarch64__)
  __asm__("" : "+w"(x));
#elif defined(__GNUC__)
  __asm__("" : "+m"(x));
#else
  volatile double v = x;
  x = v;
#endif
  return x;
}

// ------------------------------------------------------------------------------------------
// Groups.
// ------------------------------------------------------------------------------------------

struct SerialGroup {
  FF_HD int lane() const { return 0; }
  FF_HD int size() const { return 1; }
  template <class A>
  FF_HD A sum(A x) const { return x; }
  template <class A>
  FF_HD A max(A x) const { return x; }
  template <class A>
  FF_HD A min(A x) const { return x; }
  FF_HD void sync() const {}
  template <class A>
  FF_HD void atomic_add(A* p, A v) const { *p += v; }
};

// ------------------------------------------------------------------------------------------
// Cross-attention rows.
// ------------------------------------------------------------------------------------------

// Score of one key: scale * <q, k_j>; q already in A (e.g. staged in shared memory), k strided.
template <class A, class T>
FF_HD A score_dot(const A* q, const T* kj, idx_t sd, int D, A scale) {
  A acc = 0;
  for (int d = 0; d < D; ++d) acc += q[d] * ld<A>(kj, d * sd);
  return acc * scale;
}

// Output row element e: out[e] = sum_j p[j] * v[j, e], v strided (rows sr, cols sc). Also the
// dq row (p = dS, v = K). The CPU driver does whole blocks of rows at once with mm_block.
template <class A, class T>
FF_HD A out_col(const A* p, int n, const T* v, idx_t sr, idx_t sc, int e) {
  A acc = 0;
  for (int j = 0; j < n; ++j) acc += p[j] * ld<A>(v, j * sr + e * sc);
  return acc;
}

// Block of scores / products on the CPU: C[M x N] (+)= alpha * A[M x K] B[K x N], with A read
// through strides (sam, sak) -- so A^T costs nothing -- B row-major with ldb, N a multiple of W.
// Register tiles of R rows x NV vectors of W lanes (GCC/Clang vector extensions: one zmm per
// vector with AVX-512, or two ymm): per k, NV loads of B and R broadcasts of A feed R*NV FMAs,
// with R*NV + NV <= 30 registers. The CUDA driver computes its scores with score_dot instead.
#if !defined(__CUDACC__)
// acc = A[R x K] B[K x NV*W] in registers: per k, NV loads of B and R broadcasts of A feed R*NV FMAs.
template <int R, int NV, int W, class A, class V>
__attribute__((always_inline)) inline void mm_acc(int K, const A* a, idx_t sam, idx_t sak, const A* b, idx_t ldb,
                                                  V (&acc)[R][NV]) {
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) acc[r][v] = V{};
  for (int k = 0; k < K; ++k) {
    V bv[NV];
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) memcpy(&bv[v], b + k * ldb + v * W, sizeof(V));
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) {
      const A ar = a[r * sam + k * sak];
#pragma GCC unroll 8
      for (int v = 0; v < NV; ++v) acc[r][v] += ar * bv[v];
    }
  }
}

template <int R, int NV, int W, class A>
inline void mm_tile(int K, const A* a, idx_t sam, idx_t sak, const A* b, idx_t ldb, A* c, idx_t ldc, A alpha,
                    bool accumulate) {
  typedef A V __attribute__((vector_size(W * sizeof(A))));
  V acc[R][NV];
  mm_acc<R, NV, W>(K, a, sam, sak, b, ldb, acc);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      V cur = alpha * acc[r][v];
      A* cp = c + r * ldc + v * W;
      if (accumulate) {
        V old;
        memcpy(&old, cp, sizeof(V));
        cur += old;
      }
      memcpy(cp, &cur, sizeof(V));
    }
}

// Vector exp for the CPU tiles: fast_expf lane by lane on W-lane vectors, in registers (same
// constants and clamping; x < -87.3 gives 0, -inf gives 0). F and I are template parameters because
// GCC drops a dependent vector_size on a non-dependent type.
template <int W, class F = float, class I = int32_t>
struct Vec {
  typedef F V __attribute__((vector_size(W * sizeof(F))));
  typedef I IV __attribute__((vector_size(W * sizeof(I))));
};

template <int W, class F = float, class I = int32_t>
inline typename Vec<W, F, I>::V vexp(typename Vec<W, F, I>::V v) {
  typedef typename Vec<W, F, I>::V V;
  typedef typename Vec<W, F, I>::IV IV;
  const V hi = V{} + 88.3762626647949f, lo = V{} - 87.33654475f;
  V xc = v > hi ? hi : v;
  xc = xc < lo ? lo : xc;
  const V t = xc * 1.44269504088896341f + 0.5f;
  V fn = __builtin_convertvector(__builtin_convertvector(t, IV), V);  // trunc
  fn = fn > t ? fn - 1.0f : fn;                                       // floor
  V y = exp_poly(xc, fn);
  const IV bits = (__builtin_convertvector(fn, IV) + 127) << 23;
  V sc;
  memcpy(&sc, &bits, sizeof(V));
  y = y * sc;
  return v < lo ? V{} : y;
}

// Fused scores + softmax for rows whose Nkp = NV * W keys fit one register strip (CLIP's 77 keys:
// 80 = 5 x 16 floats): S = alpha * A B in registers, padded keys (>= n_valid) masked to -inf, then
// row max, exp, sum and normalisation without leaving the registers; stores P (ldc) and lse per row.
template <int R, int NV, int W, class F = float>
inline void mm_softmax_tile(int K, const F* a, idx_t sam, idx_t sak, const F* b, idx_t ldb, F* c, idx_t ldc,
                            F alpha, int n_valid, F* lse) {
  typedef F V __attribute__((vector_size(W * sizeof(F))));
  V acc[R][NV];
  mm_acc<R, NV, W>(K, a, sam, sak, b, ldb, acc);
  V col[NV];  // key index of each lane
#pragma GCC unroll 8
  for (int v = 0; v < NV; ++v)
    for (int l = 0; l < W; ++l) col[v][l] = static_cast<float>(v * W + l);
  const V ninf_v = V{} - INFINITY, nvalid = V{} + static_cast<float>(n_valid);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    V mx = ninf_v;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = col[v] < nvalid ? acc[r][v] * alpha : ninf_v;
      mx = acc[r][v] > mx ? acc[r][v] : mx;
    }
    float m = mx[0];
    for (int l = 1; l < W; ++l) m = mx[l] > m ? mx[l] : m;
    V sum = V{};
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      acc[r][v] = vexp<W, F>(acc[r][v] - m);
      sum += acc[r][v];
    }
    float l = 0;
    for (int i = 0; i < W; ++i) l += sum[i];
    const float inv = 1.0f / l;
#pragma GCC unroll 8
    for (int v = 0; v < NV; ++v) {
      const V pv = acc[r][v] * inv;
      memcpy(c + r * ldc + v * W, &pv, sizeof(V));
    }
    lse[r] = m + logf(l);
  }
}

// rows [0, M): fused scores + softmax when the keys fit one strip of at most 5 vectors; returns
// false (nothing done) otherwise, and the caller takes the unfused path.
template <int W>
inline bool mm_softmax_block(int M, int Nkp, int K, float alpha, const float* a, idx_t sam, idx_t sak,
                             const float* b, idx_t ldb, float* c, idx_t ldc, int n_valid, float* lse) {
  const int nv = Nkp / W;
  if (nv < 1 || nv > 5 || nv * W != Nkp) return false;
  auto rows = [&](auto nvc) {
    constexpr int NV = decltype(nvc)::value;
    constexpr int R = NV >= 5 ? 4 : (NV == 4 ? 6 : 8);
    int m = 0;
    for (; m + R <= M; m += R)
      mm_softmax_tile<R, NV, W>(K, a + m * sam, sam, sak, b, ldb, c + m * ldc, ldc, alpha, n_valid, lse + m);
    for (; m < M; ++m)
      mm_softmax_tile<1, NV, W>(K, a + m * sam, sam, sak, b, ldb, c + m * ldc, ldc, alpha, n_valid, lse + m);
  };
  switch (nv) {
    case 1: rows(std::integral_constant<int, 1>{}); break;
    case 2: rows(std::integral_constant<int, 2>{}); break;
    case 3: rows(std::integral_constant<int, 3>{}); break;
    case 4: rows(std::integral_constant<int, 4>{}); break;
    default: rows(std::integral_constant<int, 5>{}); break;
  }
  return true;
}

// rows [0, M) of one column strip of NV vectors: full tiles of R rows, then one tile of the rest
template <int R, int NV, int W, class A>
inline void mm_strip(int M, int K, const A* a, idx_t sam, idx_t sak, const A* b, idx_t ldb, A* c, idx_t ldc, A alpha,
                     bool acc) {
  int m = 0;
  for (; m + R <= M; m += R) mm_tile<R, NV, W, A>(K, a + m * sam, sam, sak, b, ldb, c + m * ldc, ldc, alpha, acc);
  const int rest = M - m;
  if (rest == 0) return;
  a += m * sam;
  c += m * ldc;
  switch (rest) {  // rest < R <= 12
    case 1: mm_tile<1, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 2: mm_tile<2, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 3: mm_tile<3, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 4: mm_tile<4, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 5: mm_tile<5, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 6: mm_tile<6, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 7: mm_tile<7, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 8: mm_tile<8, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 9: mm_tile<9, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    case 10: mm_tile<10, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
    default: mm_tile<11, NV, W, A>(K, a, sam, sak, b, ldb, c, ldc, alpha, acc); break;
  }
}

template <int W, class A>
inline void mm_block(int M, int N, int K, A alpha, const A* a, idx_t sam, idx_t sak, const A* b, idx_t ldb, A* c,
                     idx_t ldc, bool accumulate) {
  const int nvt = N / W;
  for (int v0 = 0; v0 < nvt;) {
    const int rem = nvt - v0;
    // strips of 5, 4, 3, 2 or 1 vectors (80 = 5 x 16 covers CLIP's 77 keys in one strip)
    const int nv = (rem % 5 == 0) ? 5 : (rem >= 4 ? 4 : rem);
    const A* bs = b + v0 * W;
    A* cs = c + v0 * W;
    switch (nv) {
      case 5: mm_strip<4, 5, W, A>(M, K, a, sam, sak, bs, ldb, cs, ldc, alpha, accumulate); break;
      case 4: mm_strip<6, 4, W, A>(M, K, a, sam, sak, bs, ldb, cs, ldc, alpha, accumulate); break;
      case 3: mm_strip<8, 3, W, A>(M, K, a, sam, sak, bs, ldb, cs, ldc, alpha, accumulate); break;
      case 2: mm_strip<12, 2, W, A>(M, K, a, sam, sak, bs, ldb, cs, ldc, alpha, accumulate); break;
      default: mm_strip<12, 1, W, A>(M, K, a, sam, sak, bs, ldb, cs, ldc, alpha, accumulate); break;
    }
    v0 += nv;
  }
}
#endif

// max_j s[j] over the group; 16 independent partial maxima per lane (no serial max chain).
template <class G, class A>
FF_HD A row_max(const G& g, const A* s, int n) {
  constexpr int U = 16;
  A m[U];
  for (int u = 0; u < U; ++u) m[u] = ninf<A>();
  const int st = g.size();
  int j = g.lane();
  for (; j + (U - 1) * st < n; j += U * st)
    for (int u = 0; u < U; ++u) {
      const A v = s[j + u * st];
      m[u] = v > m[u] ? v : m[u];
    }
  for (int u = 0; u < U; ++u) {
    const int jj = j + u * st;
    const A v = jj < n ? s[jj] : ninf<A>();
    m[u] = v > m[u] ? v : m[u];
  }
  for (int w = U / 2; w >= 1; w /= 2)
    for (int u = 0; u < w; ++u) m[u] = m[u + w] > m[u] ? m[u + w] : m[u];
  return g.max(m[0]);
}

#if !defined(__CUDACC__)
// Host fast path of row_max for the serial (CPU) group: two vectors of partial maxima and one
// horizontal step (the generic version leaves gcc a serial chain through a stack array).
template <class A>
inline A row_max(const SerialGroup&, const A* s, int n) {
  constexpr int W = 32 / sizeof(A);
  typedef A V __attribute__((vector_size(32)));
  V m0 = ninf<A>() - V{}, m1 = m0;
  int j = 0;
  for (; j + 2 * W <= n; j += 2 * W) {
    V v0, v1;
    memcpy(&v0, s + j, sizeof(V));
    memcpy(&v1, s + j + W, sizeof(V));
    m0 = v0 > m0 ? v0 : m0;
    m1 = v1 > m1 ? v1 : m1;
  }
  m0 = m1 > m0 ? m1 : m0;
  A r = ninf<A>();
  for (; j < n; ++j) r = s[j] > r ? s[j] : r;
  for (int u = 0; u < W; ++u) r = m0[u] > r ? m0[u] : r;
  return r;
}
#endif

// In place: s[0..n) (scores) -> probabilities softmax(s); returns lse = logsumexp(s).
template <class G, class A>
FF_HD A softmax_row(const G& g, A* s, int n) {
  const A m = row_max(g, s, n);
  A l = 0;
  for (int j = g.lane(); j < n; j += g.size()) {
    const A e = ff_exp(s[j] - m);
    s[j] = e;
    l += e;
  }
  l = g.sum(l);
  const A inv = A(1) / l;
  for (int j = g.lane(); j < n; j += g.size()) s[j] *= inv;
  g.sync();
  return m + ff_log(l);
}

// In place: s (scores) -> P = exp(s - lse), probabilities recomputed from the saved LSE.
template <class G, class A>
FF_HD void probs_from_lse(const G& g, A* s, int n, A lse) {
  for (int j = g.lane(); j < n; j += g.size()) s[j] = ff_exp(s[j] - lse);
  g.sync();
}

// Map of one query row: value of P at key tok[t] for each token t (per head; heads are summed
// by the driver when head_reduce="sum").
template <class A>
FF_HD A map_value(const A* p, const int64_t* tok, int t) { return p[tok[t]]; }

// Scatter of the map gradient into a row of dP: dp[tok[t]] += dmaps[t] (tokens may repeat).
template <class G, class A, class T>
FF_HD void scatter_map_grad(const G& g, A* dp, const int64_t* tok, int ntok, const T* dm, idx_t sdm) {
  for (int t = g.lane(); t < ntok; t += g.size()) g.atomic_add(dp + tok[t], ld<A>(dm, t * sdm));
  g.sync();
}

// delta = rowsum(P * dP)
template <class G, class A>
FF_HD A row_delta(const G& g, const A* p, const A* dp, int n) {
  A acc = 0;
  for (int j = g.lane(); j < n; j += g.size()) acc += p[j] * dp[j];
  return g.sum(acc);
}

// In place: dp -> dS = P * (dP - delta)
template <class G, class A>
FF_HD void dsoftmax_row(const G& g, const A* p, A* dp, int n, A delta) {
  for (int j = g.lane(); j < n; j += g.size()) dp[j] = p[j] * (dp[j] - delta);
  g.sync();
}

// ------------------------------------------------------------------------------------------
// SoftIoU rows (BiasMap): min-max normalisation, Sinkhorn soft top-k, IoU and their gradients.
//
// Sinkhorn in naive.sinkhorn_topk_mask (BiasMap's order), per row, C_ij = (x_i - y_j)^2 / gamma,
// y = {0, 1}, f^0 = 0:
//   g^t_j = lnu_j - LSE_i(f^{t-1}_i - C_ij),   f^t_i = lmu - LSE_j(g^t_j - C_ij),   t = 1..T,
//   mask_i = n exp(f^T_i + g^T_1 - C_i1).
// With sigma^t_ij = softmax_j(g^t_j - C_ij) (a two-way sigmoid) and S^t_j = sum_i sigma^t_ij,
// f^t_i - C_ij = lmu - g^t_j + log sigma^t_ij exactly, hence
//   g^1_j = lnu_j - M_j - log E_j,  E_j = sum_i exp(-C_ij - M_j),  M_j = max_i(-C_ij) (closed form),
//   g^t_j = g^{t-1}_j + lnu_j - lmu - log S^{t-1}_j            (t >= 2),
//   softmax_i(f^t_i - C_ij) = sigma^t_ij / S^t_j,   mask_i = sigma^T_i1  (T = 0: n exp(-C_i1)).
// One exp per element and iteration, no stored f: the driver keeps g^t, S^t and E only.
// ------------------------------------------------------------------------------------------

template <class A>
struct SinkCfg {
  A inv_gamma;    // 1 / gamma
  A lmu;          // -log n
  A lnu0, lnu1;   // log((n-k)/n), log(k/n)
  A nf;           // n
  int iters;      // T
};

// Host-side configuration of a row of n elements with k of them on the top-k anchor.
template <class A>
inline SinkCfg<A> sink_cfg(int n, int k, double gamma, int iters) {
  SinkCfg<A> c;
  c.inv_gamma = static_cast<A>(1.0 / gamma);
  c.lmu = static_cast<A>(-std::log(static_cast<double>(n)));
  c.lnu0 = static_cast<A>(std::log(static_cast<double>(n - k) / n));
  c.lnu1 = static_cast<A>(std::log(static_cast<double>(k) / n));
  c.nf = static_cast<A>(n);
  c.iters = iters;
  return c;
}

// sigma_i0, sigma_i1 for normalised value x and potentials (g0, g1).
template <class A>
FF_HD void sink_sigma(A x, A g0, A g1, A inv_gamma, A& s0, A& s1) {
  // z = (g1 - C_i1) - (g0 - C_i0) = g1 - g0 + (2x - 1) / gamma
  const A z = g1 - g0 + (A(2) * x - A(1)) * inv_gamma;
  const A az = z < A(0) ? -z : z;
  const A e = ff_exp(-az);
  const A big = A(1) / (A(1) + e);
  const A small = e * big;
  s1 = z >= A(0) ? big : small;
  s0 = z >= A(0) ? small : big;
}

// Min-max statistics of row a: lo, hi and R = hi - lo + 1e-8 (naive.minmax's default eps), the
// difference rounded first, as in naive.minmax, so a constant row gets R = 1e-8 (x = 0), never 0.
template <class G, class A, class T>
FF_HD void minmax_stats(const G& g, const T* a, int n, A& lo, A& hi, A& R) {
  A mn = static_cast<A>(INFINITY), mx = ninf<A>();
  for (int i = g.lane(); i < n; i += g.size()) {
    const A v = ld<A>(a, i);
    mn = v < mn ? v : mn;
    mx = v > mx ? v : mx;
  }
  lo = g.min(mn);
  hi = g.max(mx);
  R = opaque(hi - lo) + static_cast<A>(1e-8);  // not hi + (1e-8 - lo): see opaque
}

template <class A, class T>
FF_HD A minmax_value(const T* a, int i, A lo, A R) { return (ld<A>(a, i) - lo) / R; }

// Per-row state of one map in SoftIoU: normalisation and Sinkhorn history.
//   hist[2t + j] = g^t_j (t = 1..T),  shist[2t + j] = S^t_j (t = 1..T-1),  shist[j] = E_j.
template <class A>
struct MapRow {
  A lo, hi, R;
  A* hist;
  A* shist;
};

// -M_1 = min_i C_i1 = (x_max - 1)^2 / gamma (x_max = the normalised maximum); M_0 = 0 (x_min = 0).
template <class A>
FF_HD A sink_m1(const MapRow<A>& m, const SinkCfg<A>& c) {
  const A xm = (m.hi - m.lo) / m.R - A(1);
  return -xm * xm * c.inv_gamma;
}

// exp(-C_ij - M_j) for j = 0, 1 (the first column update, from f^0 = 0).
template <class A>
FF_HD void sink_first(A x, A m1, A inv_gamma, A& e0, A& e1) {
  const A d1 = x - A(1);
  e0 = ff_exp(-x * x * inv_gamma);
  e1 = ff_exp(-d1 * d1 * inv_gamma - m1);
}

// Forward Sinkhorn on one row: fills m.hist / m.shist (written by lane 0; shared memory on the GPU).
template <class G, class A, class T>
FF_HD void sinkhorn_fwd(const G& g, const T* a, int n, MapRow<A>& m, const SinkCfg<A>& c) {
  if (c.iters == 0) return;
  const A m1 = sink_m1(m, c), lo = m.lo, R = m.R, ig = c.inv_gamma;
  A E0 = 0, E1 = 0;
  for (int i = g.lane(); i < n; i += g.size()) {
    A e0, e1;
    sink_first(minmax_value<A>(a, i, lo, R), m1, ig, e0, e1);
    E0 += e0;
    E1 += e1;
  }
  E0 = g.sum(E0);
  E1 = g.sum(E1);
  A g0 = c.lnu0 - ff_log(E0);
  A g1 = c.lnu1 - m1 - ff_log(E1);
  if (g.lane() == 0) { m.shist[0] = E0; m.shist[1] = E1; m.hist[2] = g0; m.hist[3] = g1; }
  for (int t = 2; t <= c.iters; ++t) {
    A S0 = 0, S1 = 0;
    for (int i = g.lane(); i < n; i += g.size()) {
      A s0, s1;
      sink_sigma(minmax_value<A>(a, i, lo, R), g0, g1, ig, s0, s1);
      S0 += s0;
      S1 += s1;
    }
    S0 = g.sum(S0);
    S1 = g.sum(S1);
    g0 = g0 + c.lnu0 - c.lmu - ff_log(S0);
    g1 = g1 + c.lnu1 - c.lmu - ff_log(S1);
    if (g.lane() == 0) {
      m.shist[2 * (t - 1)] = S0; m.shist[2 * (t - 1) + 1] = S1;
      m.hist[2 * t] = g0; m.hist[2 * t + 1] = g1;
    }
  }
  g.sync();
}

// Soft top-k mask value of an element with normalised value x (after sinkhorn_fwd).
template <class A>
FF_HD A sink_mask(A x, const SinkCfg<A>& c, const A* hist) {
  if (c.iters == 0) {
    const A d = x - A(1);
    return c.nf * ff_exp(-d * d * c.inv_gamma);
  }
  A s0, s1;
  sink_sigma(x, hist[2 * c.iters], hist[2 * c.iters + 1], c.inv_gamma, s0, s1);
  return s1;
}

template <class A, class T>
FF_HD A iou_mask(const T* a, int i, const MapRow<A>& m, const SinkCfg<A>& c, bool topk) {
  const A x = minmax_value<A>(a, i, m.lo, m.R);
  return topk ? sink_mask(x, c, m.hist) : x;
}

// Sums for IoU: inter = sum(ma mb), sa = sum(ma), sb = sum(mb).
template <class G, class A, class T>
FF_HD void iou_sums(const G& g, const T* a, const T* b, int n, const MapRow<A>& ma, const MapRow<A>& mb,
                    const SinkCfg<A>& c, bool topk, A& inter, A& sa, A& sb) {
  A si = 0, s1 = 0, s2 = 0;
  if (topk && c.iters > 0) {  // the common case, branch-free: mask_i = sigma^T_i1
    const A ig = c.inv_gamma, alo = ma.lo, aR = ma.R, blo = mb.lo, bR = mb.R;
    const A ga0 = ma.hist[2 * c.iters], ga1 = ma.hist[2 * c.iters + 1];
    const A gb0 = mb.hist[2 * c.iters], gb1 = mb.hist[2 * c.iters + 1];
    for (int i = g.lane(); i < n; i += g.size()) {
      A u0, va, w0, vb;
      sink_sigma(minmax_value<A>(a, i, alo, aR), ga0, ga1, ig, u0, va);
      sink_sigma(minmax_value<A>(b, i, blo, bR), gb0, gb1, ig, w0, vb);
      si += va * vb;
      s1 += va;
      s2 += vb;
    }
  } else {
    for (int i = g.lane(); i < n; i += g.size()) {
      const A va = iou_mask(a, i, ma, c, topk), vb = iou_mask(b, i, mb, c, topk);
      si += va * vb;
      s1 += va;
      s2 += vb;
    }
  }
  inter = g.sum(si);
  sa = g.sum(s1);
  sb = g.sum(s2);
}

// Backward of one map: dx[i] = d iou / d x_i of the normalised values x = minmax(a), where the
// gradient reaching the mask is dmask_i = ci * other_mask_i + cs. dx is lane-owned (it may be the
// output buffer of da) and is overwritten. Exact gradient of the unrolled iterations:
//   step t = T..1 (one pass each):  df^t_i = [t=T] dL_i - sum_j dg^{t+1}_j sigma^t_ij / S^t_j,
//     dC_ij += dg^{t+1}_j sigma^t_ij / S^t_j + df^t_i sigma^t_ij,  dg^t_j = -sum_i df^t_i sigma^t_ij
//     (+ sum_i dL_i for j = 1, t = T), with dL_i = dmask_i mask_i and dC_i1 -= dL_i at t = T;
//   then the first column update: dC_ij += dg^1_j exp(-C_ij - M_j) / E_j.
template <class G, class A, class T>
FF_HD void iou_map_bwd(const G& g, const T* a, const T* other, int n, const MapRow<A>& m, const MapRow<A>& mo,
                       const SinkCfg<A>& c, bool topk, A ci, A cs, A* dx) {
  // loop invariants in registers (dx stores could otherwise alias m, mo and c)
  const A ig = c.inv_gamma, two_ig = A(2) * ig;
  const A lo = m.lo, R = m.R, olo = mo.lo, oR = mo.R;
  if (!topk) {
    for (int i = g.lane(); i < n; i += g.size()) dx[i] = ci * iou_mask(other, i, mo, c, topk) + cs;
    g.sync();
    return;
  }
  const int iters = c.iters;
  if (iters == 0) {  // mask_i = n exp(-C_i1): dx_i = -dmask_i mask_i dC_i1/dx_i
    for (int i = g.lane(); i < n; i += g.size()) {
      const A x = minmax_value<A>(a, i, lo, R);
      const A dl = (ci * iou_mask(other, i, mo, c, topk) + cs) * sink_mask(x, c, m.hist);
      dx[i] = -dl * two_ig * (x - A(1));
    }
    g.sync();
    return;
  }
  A dgn0, dgn1;  // dg^{t+1}
  {  // t = T: df^T_i = dL_i = dmask_i sigma^T_i1, dC_i1 = -dL_i + dL_i sigma_i1, dC_i0 = dL_i sigma_i0
    const A g0 = m.hist[2 * iters], g1 = m.hist[2 * iters + 1];
    const A go0 = mo.hist[2 * iters], go1 = mo.hist[2 * iters + 1];
    A acc0 = 0, acc1 = 0, accl = 0;
    for (int i = g.lane(); i < n; i += g.size()) {
      const A x = minmax_value<A>(a, i, lo, R);
      A s0, s1, o0, o1;
      sink_sigma(x, g0, g1, ig, s0, s1);
      sink_sigma(minmax_value<A>(other, i, olo, oR), go0, go1, ig, o0, o1);
      const A dl = (ci * o1 + cs) * s1;  // mask_i = sigma^T_i1
      const A dc0 = dl * s0, dc1 = dl * (s1 - A(1));
      dx[i] = dc0 * two_ig * x + dc1 * two_ig * (x - A(1));
      acc0 += dl * s0;
      acc1 += dl * s1;
      accl += dl;
    }
    dgn0 = -g.sum(acc0);
    dgn1 = g.sum(accl) - g.sum(acc1);
  }
  for (int t = iters - 1; t >= 1; --t) {
    const A g0 = m.hist[2 * t], g1 = m.hist[2 * t + 1];
    const A w0 = dgn0 / m.shist[2 * t], w1 = dgn1 / m.shist[2 * t + 1];
    A acc0 = 0, acc1 = 0;
    for (int i = g.lane(); i < n; i += g.size()) {
      const A x = minmax_value<A>(a, i, lo, R);
      A s0, s1;
      sink_sigma(x, g0, g1, ig, s0, s1);
      const A p0 = w0 * s0, p1 = w1 * s1;  // dg^{t+1}_j pi^{t+1}_ij
      const A df = -(p0 + p1);
      const A dc0 = p0 + df * s0, dc1 = p1 + df * s1;
      dx[i] += dc0 * two_ig * x + dc1 * two_ig * (x - A(1));
      acc0 += df * s0;
      acc1 += df * s1;
    }
    dgn0 = -g.sum(acc0);
    dgn1 = -g.sum(acc1);
  }
  const A m1 = sink_m1(m, c);
  const A w0 = dgn0 / m.shist[0], w1 = dgn1 / m.shist[1];
  for (int i = g.lane(); i < n; i += g.size()) {
    const A x = minmax_value<A>(a, i, lo, R);
    A e0, e1;
    sink_first(x, m1, ig, e0, e1);
    dx[i] += w0 * e0 * two_ig * x + w1 * e1 * two_ig * (x - A(1));
  }
  g.sync();
}

// Backward of x = (a - lo) / (hi - lo + eps) in place: dx -> da. torch's amin/amax gradients
// are shared evenly between tied extremes, and so are these.
template <class G, class A, class T>
FF_HD void minmax_bwd(const G& g, const T* a, int n, const MapRow<A>& m, A* dx) {
  const A lo = m.lo, hi = m.hi, R = m.R;
  A dlo = 0, dhi = 0, nlo = 0, nhi = 0;
  for (int i = g.lane(); i < n; i += g.size()) {
    const A v = ld<A>(a, i);
    const A x = (v - lo) / R;
    dlo += dx[i] * (x - A(1));
    dhi -= dx[i] * x;
    nlo += v == lo ? A(1) : A(0);
    nhi += v == hi ? A(1) : A(0);
  }
  dlo = g.sum(dlo) / R / g.sum(nlo);
  dhi = g.sum(dhi) / R / g.sum(nhi);
  for (int i = g.lane(); i < n; i += g.size()) {
    const A v = ld<A>(a, i);
    dx[i] = dx[i] / R + (v == lo ? dlo : A(0)) + (v == hi ? dhi : A(0));
  }
  g.sync();
}

// IoU and the coefficients of its gradient: d iou = ci * d inter + cs * (d sa + d sb) ... as
// dmask_a_i = ci * mask_b_i + cs (and symmetrically), for upstream gradient dy.
template <class A>
FF_HD A iou_union(A inter, A sa, A sb, A eps) { return opaque(sa + sb - inter) + eps; }  // see opaque

template <class A>
FF_HD A iou_value(A inter, A sa, A sb, A eps) { return inter / iou_union(inter, sa, sb, eps); }

template <class A>
FF_HD void iou_grad_coeffs(A inter, A sa, A sb, A eps, A dy, A& ci, A& cs) {
  const A U = iou_union(inter, sa, sb, eps);
  const A r = inter / (U * U);
  ci = dy * (A(1) / U + r);
  cs = -dy * r;
}

}  // namespace ff
