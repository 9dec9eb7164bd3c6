// fastfair native kernels: the CUDA driver (kernels and launchers of fastfair._native_cuda; the
// pybind11 glue is csrc/native_cuda_module.cpp, the interface csrc/native_cuda.h).
//
// Drives the row math of xattn_row.h with one warp per query row (cross-attention) and one block
// per map pair (SoftIoU). Reads fp16 / bf16 / fp32 natively and accumulates in fp32 (fp64 for
// fp64). All buffers (outputs and scratch) are allocated by fastfair/native.py with torch and
// passed as raw pointers together with the current CUDA stream; this module never allocates.
// cudart is linked statically, and this module is imported only when CUDA tensors are used.
//
// Backward: kernel 1 (warp per query row) recomputes P from the LSE, forms dS and dq, and writes
// dS (and P for dv) into a scratch (B,H,Nq,Nk) buffer; kernel 2 (warp per key) reduces them over
// the queries into dk / dv / dmk -- deterministic, no atomics on global memory. (Forward maps with
// head_reduce="sum" are accumulated over heads with atomicAdd.)
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>
#include <vector>

#include "native_cuda.h"
#include "xattn_row.h"

using ff::idx_t;
using ff_cuda::BwdCall;
using ff_cuda::FwdCall;

namespace {

constexpr unsigned FULL = 0xffffffffu;

template <class X>
__device__ __forceinline__ X shfl_xor(X x, int o) { return __shfl_xor_sync(FULL, x, o); }

struct OpSum { template <class X> __device__ X operator()(X a, X b) const { return a + b; } };
struct OpMax { template <class X> __device__ X operator()(X a, X b) const { return b > a ? b : a; } };
struct OpMin { template <class X> __device__ X operator()(X a, X b) const { return b < a ? b : a; } };

template <class X, class Op>
__device__ __forceinline__ X warp_reduce(X x, Op op) {
  for (int o = 16; o > 0; o >>= 1) x = op(x, shfl_xor(x, o));
  return x;
}

// One warp per row.
struct WarpGroup {
  __host__ __device__ int lane() const {
#if defined(__CUDA_ARCH__)
    return threadIdx.x & 31;
#else
    return 0;
#endif
  }
  __host__ __device__ int size() const { return 32; }
  template <class X>
  __host__ __device__ X sum(X x) const {
#if defined(__CUDA_ARCH__)
    return warp_reduce(x, OpSum());
#else
    return x;
#endif
  }
  template <class X>
  __host__ __device__ X max(X x) const {
#if defined(__CUDA_ARCH__)
    return warp_reduce(x, OpMax());
#else
    return x;
#endif
  }
  template <class X>
  __host__ __device__ X min(X x) const {
#if defined(__CUDA_ARCH__)
    return warp_reduce(x, OpMin());
#else
    return x;
#endif
  }
  __host__ __device__ void sync() const {
#if defined(__CUDA_ARCH__)
    __syncwarp();
#endif
  }
  template <class X>
  __host__ __device__ void atomic_add(X* p, X v) const {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
};

// One block per row; red: 33 doubles of shared memory.
struct BlockGroup {
  double* red;
  __host__ __device__ int lane() const {
#if defined(__CUDA_ARCH__)
    return threadIdx.x;
#else
    return 0;
#endif
  }
  __host__ __device__ int size() const {
#if defined(__CUDA_ARCH__)
    return blockDim.x;
#else
    return 1;
#endif
  }
  template <class X, class Op>
  __device__ X reduce(X x, Op op, X id) const {
    X* r = reinterpret_cast<X*>(red);
    const int w = threadIdx.x >> 5, l = threadIdx.x & 31, nw = (blockDim.x + 31) >> 5;
    x = warp_reduce(x, op);
    if (l == 0) r[w] = x;
    __syncthreads();
    if (w == 0) {
      X y = l < nw ? r[l] : id;
      y = warp_reduce(y, op);
      if (l == 0) r[32] = y;
    }
    __syncthreads();
    const X out = r[32];
    __syncthreads();
    return out;
  }
  template <class X>
  __host__ __device__ X sum(X x) const {
#if defined(__CUDA_ARCH__)
    return reduce(x, OpSum(), X(0));
#else
    return x;
#endif
  }
  template <class X>
  __host__ __device__ X max(X x) const {
#if defined(__CUDA_ARCH__)
    return reduce(x, OpMax(), static_cast<X>(-INFINITY));
#else
    return x;
#endif
  }
  template <class X>
  __host__ __device__ X min(X x) const {
#if defined(__CUDA_ARCH__)
    return reduce(x, OpMin(), static_cast<X>(INFINITY));
#else
    return x;
#endif
  }
  __host__ __device__ void sync() const {
#if defined(__CUDA_ARCH__)
    __syncthreads();
#endif
  }
  template <class X>
  __host__ __device__ void atomic_add(X* p, X v) const {
#if defined(__CUDA_ARCH__)
    atomicAdd(p, v);
#else
    *p += v;
#endif
  }
};

struct S4 { idx_t s[4]; };

S4 strides4(const std::vector<idx_t>& v) {
  S4 r{{0, 0, 0, 0}};
  if (v.empty()) return r;
  if (v.size() != 4) throw std::invalid_argument("fastfair._native_cuda: expected 4 strides");
  for (int i = 0; i < 4; ++i) r.s[i] = v[i];
  return r;
}

template <class T, class A>
struct XP {
  int B, H, Nq, Nk, Nm, D, Dv, NT;  // NT: number of map tokens
  A scale;
  bool per_head;
  const T *q, *k, *v, *mk;
  S4 sq, sk, sv, smk;
  const int64_t* tok;
};

template <class T>
__device__ __forceinline__ const T* at(const T* base, const S4& s, idx_t b, idx_t h, idx_t n) {
  return base + b * s.s[0] + h * s.s[1] + n * s.s[2];
}

// ---------------------------------------------------------------------------------------------
// Forward: warp per (b, h, n) row.
// ---------------------------------------------------------------------------------------------
template <class T, class A>
__global__ void xattn_fwd_kernel(XP<T, A> p, T* out, A* lse, A* mlse, A* maps) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int wpb = blockDim.x >> 5, w = threadIdx.x >> 5;
  const idx_t row = static_cast<idx_t>(blockIdx.x) * wpb + w;
  if (row >= static_cast<idx_t>(p.B) * p.H * p.Nq) return;
  WarpGroup g;
  const int per = p.D + p.Nk + p.Nm;
  A* qs = reinterpret_cast<A*>(smem_raw) + static_cast<idx_t>(w) * per;
  A* s = qs + p.D;
  A* sm = s + p.Nk;
  const idx_t n = row % p.Nq, bh = row / p.Nq, b = bh / p.H, h = bh % p.H;
  const T* qr = at(p.q, p.sq, b, h, n);
  for (int d = g.lane(); d < p.D; d += 32) qs[d] = ff::ld<A>(qr, d * p.sq.s[3]);
  g.sync();
  const T* kb = at(p.k, p.sk, b, h, 0);
  for (int j = g.lane(); j < p.Nk; j += 32) s[j] = ff::score_dot(qs, kb + j * p.sk.s[2], p.sk.s[3], p.D, p.scale);
  g.sync();
  const A l = ff::softmax_row(g, s, p.Nk);
  if (g.lane() == 0) lse[row] = l;
  const T* vb = at(p.v, p.sv, b, h, 0);
  for (int e = g.lane(); e < p.Dv; e += 32)
    out[row * p.Dv + e] = ff::Cvt<T>::store(ff::out_col(s, p.Nk, vb, p.sv.s[2], p.sv.s[3], e));
  const A* P = s;
  if (p.mk) {
    const T* mb = at(p.mk, p.smk, b, h, 0);
    for (int j = g.lane(); j < p.Nm; j += 32) sm[j] = ff::score_dot(qs, mb + j * p.smk.s[2], p.smk.s[3], p.D, p.scale);
    g.sync();
    const A lm = ff::softmax_row(g, sm, p.Nm);
    if (g.lane() == 0) mlse[row] = lm;
    P = sm;
  }
  if (p.tok && maps) {
    const int64_t* tb = p.tok + b * p.NT;
    for (int t = g.lane(); t < p.NT; t += 32) {
      const A val = ff::map_value(P, tb, t);
      if (p.per_head) maps[(bh * p.NT + t) * p.Nq + n] = val;
      else atomicAdd(maps + (b * p.NT + t) * p.Nq + n, val);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Backward kernel 1: warp per row -> dq, and dS / P / dSm rows into scratch.
// ---------------------------------------------------------------------------------------------
template <class T, class A>
__global__ void xattn_bwd_rows_kernel(XP<T, A> p, const A* lse, const A* mlse, const T* dout, S4 sdo,
                                      const A* dmaps, T* dq, A* ds_buf, A* p_buf, A* dsm_buf, bool p_path,
                                      bool mk_path) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int wpb = blockDim.x >> 5, w = threadIdx.x >> 5;
  const idx_t row = static_cast<idx_t>(blockIdx.x) * wpb + w;
  if (row >= static_cast<idx_t>(p.B) * p.H * p.Nq) return;
  WarpGroup g;
  const int per = p.D + p.Dv + 2 * p.Nk + 2 * p.Nm;
  A* qs = reinterpret_cast<A*>(smem_raw) + static_cast<idx_t>(w) * per;
  A* dos = qs + p.D;
  A* s = dos + p.Dv;
  A* dp = s + p.Nk;
  A* sm = dp + p.Nk;
  A* gm = sm + p.Nm;
  const idx_t n = row % p.Nq, bh = row / p.Nq, b = bh / p.H, h = bh % p.H;
  const T* qr = at(p.q, p.sq, b, h, n);
  for (int d = g.lane(); d < p.D; d += 32) qs[d] = ff::ld<A>(qr, d * p.sq.s[3]);
  if (dout) {
    const T* dr = at(dout, sdo, b, h, n);
    for (int e = g.lane(); e < p.Dv; e += 32) dos[e] = ff::ld<A>(dr, e * sdo.s[3]);
  }
  g.sync();
  const bool has_maps = p.tok && dmaps;
  const int64_t* tb = has_maps ? p.tok + b * p.NT : nullptr;
  const A* dmr = has_maps ? (p.per_head ? dmaps + bh * p.NT * p.Nq : dmaps + b * p.NT * p.Nq) + n : nullptr;
  const T* kb = at(p.k, p.sk, b, h, 0);
  if (p_path) {
    const T* vb = at(p.v, p.sv, b, h, 0);
    for (int j = g.lane(); j < p.Nk; j += 32) {
      s[j] = ff::score_dot(qs, kb + j * p.sk.s[2], p.sk.s[3], p.D, p.scale);
      dp[j] = dout ? ff::score_dot(dos, vb + j * p.sv.s[2], p.sv.s[3], p.Dv, A(1)) : A(0);
    }
    g.sync();
    ff::probs_from_lse(g, s, p.Nk, lse[row]);
    if (has_maps && !p.mk) ff::scatter_map_grad(g, dp, tb, p.NT, dmr, static_cast<idx_t>(p.Nq));
    ff::dsoftmax_row(g, s, dp, p.Nk, ff::row_delta(g, s, dp, p.Nk));
    for (int j = g.lane(); j < p.Nk; j += 32) {
      if (ds_buf) ds_buf[row * p.Nk + j] = dp[j];
      if (p_buf) p_buf[row * p.Nk + j] = s[j];
    }
  }
  if (mk_path) {
    const T* mb = at(p.mk, p.smk, b, h, 0);
    for (int j = g.lane(); j < p.Nm; j += 32) {
      sm[j] = ff::score_dot(qs, mb + j * p.smk.s[2], p.smk.s[3], p.D, p.scale);
      gm[j] = 0;
    }
    g.sync();
    ff::probs_from_lse(g, sm, p.Nm, mlse[row]);
    ff::scatter_map_grad(g, gm, tb, p.NT, dmr, static_cast<idx_t>(p.Nq));
    ff::dsoftmax_row(g, sm, gm, p.Nm, ff::row_delta(g, sm, gm, p.Nm));
    if (dsm_buf)
      for (int j = g.lane(); j < p.Nm; j += 32) dsm_buf[row * p.Nm + j] = gm[j];
  }
  if (dq) {
    const T* mb = p.mk ? at(p.mk, p.smk, b, h, 0) : nullptr;
    for (int d = g.lane(); d < p.D; d += 32) {
      A acc = 0;
      if (p_path) acc += ff::out_col(dp, p.Nk, kb, p.sk.s[2], p.sk.s[3], d);
      if (mk_path) acc += ff::out_col(gm, p.Nm, mb, p.smk.s[2], p.smk.s[3], d);
      dq[row * p.D + d] = ff::Cvt<T>::store(acc * p.scale);
    }
  }
}

// Backward kernel 2: warp per (b, h, j): out[bh, j, :] = alpha * sum_n coef[bh, n, j] * x[b, h, n, :].
template <class T, class A>
__global__ void xattn_bwd_cols_kernel(int B, int H, int Nq, int Nc, int Dx, A alpha, const A* coef, const T* x, S4 sx,
                                      T* outp) {
  const int wpb = blockDim.x >> 5, w = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const idx_t item = static_cast<idx_t>(blockIdx.x) * wpb + w;
  if (item >= static_cast<idx_t>(B) * H * Nc) return;
  const idx_t j = item % Nc, bh = item / Nc, b = bh / H, h = bh % H;
  const A* cb = coef + bh * Nq * Nc + j;
  const T* xb = at(x, sx, b, h, 0);
  for (int d0 = 0; d0 < Dx; d0 += 128) {
    A acc[4] = {0, 0, 0, 0};
    for (idx_t n = 0; n < Nq; ++n) {
      const A c = cb[n * Nc];
      const T* xr = xb + n * sx.s[2];
#pragma unroll
      for (int u = 0; u < 4; ++u) {
        const int d = d0 + u * 32 + lane;
        if (d < Dx) acc[u] += c * ff::ld<A>(xr, d * sx.s[3]);
      }
    }
#pragma unroll
    for (int u = 0; u < 4; ++u) {
      const int d = d0 + u * 32 + lane;
      if (d < Dx) outp[item * Dx + d] = ff::Cvt<T>::store(acc[u] * alpha);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// SoftIoU: block per row.
// ---------------------------------------------------------------------------------------------
template <class T, class A>
__global__ void soft_iou_kernel(int N, int n, ff::SinkCfg<A> c, bool topk, A eps, const T* a, const T* b, A* out,
                                const A* dy, A* da, A* db) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  BlockGroup g{reinterpret_cast<double*>(smem_raw)};
  A* hist = reinterpret_cast<A*>(smem_raw + 33 * sizeof(double));
  const int H = 2 * (c.iters + 1);
  const idx_t row = blockIdx.x;
  const T* ar = a + row * n;
  const T* br = b + row * n;
  ff::MapRow<A> ma, mb;
  ff::minmax_stats(g, ar, n, ma.lo, ma.hi, ma.R);
  ff::minmax_stats(g, br, n, mb.lo, mb.hi, mb.R);
  ma.hist = hist; ma.shist = hist + H;
  mb.hist = hist + 2 * H; mb.shist = hist + 3 * H;
  if (topk) {
    ff::sinkhorn_fwd(g, ar, n, ma, c);
    ff::sinkhorn_fwd(g, br, n, mb, c);
  }
  A inter, sa, sb;
  ff::iou_sums(g, ar, br, n, ma, mb, c, topk, inter, sa, sb);
  if (out && g.lane() == 0) out[row] = ff::iou_value(inter, sa, sb, eps);
  if (dy) {
    A ci, cs;
    ff::iou_grad_coeffs(inter, sa, sb, eps, dy[row], ci, cs);
    ff::iou_map_bwd(g, ar, br, n, ma, mb, c, topk, ci, cs, da + row * n);
    ff::minmax_bwd(g, ar, n, ma, da + row * n);
    ff::iou_map_bwd(g, br, ar, n, mb, ma, c, topk, ci, cs, db + row * n);
    ff::minmax_bwd(g, br, n, mb, db + row * n);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.
// ---------------------------------------------------------------------------------------------
void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string("fastfair._native_cuda: ") + what + ": " + cudaGetErrorString(e));
}

constexpr int kMaxSmem = 48 * 1024;

int warps_per_block(int per_warp_bytes) {
  int wpb = 4;
  while (wpb > 1 && wpb * per_warp_bytes > kMaxSmem) --wpb;
  if (per_warp_bytes > kMaxSmem)
    throw std::invalid_argument("fastfair._native_cuda: rows too long for shared memory (reduce Nk / D)");
  return wpb;
}

template <class T, class A>
XP<T, A> make_xp(int B, int H, int Nq, int Nk, int Nm, int D, int Dv, int T_, double scale, bool per_head, uintptr_t q,
                 const std::vector<idx_t>& qs, uintptr_t k, const std::vector<idx_t>& ks, uintptr_t v,
                 const std::vector<idx_t>& vs, uintptr_t mk, const std::vector<idx_t>& mks, uintptr_t tok) {
  XP<T, A> p;
  p.B = B; p.H = H; p.Nq = Nq; p.Nk = Nk; p.Nm = Nm; p.D = D; p.Dv = Dv; p.NT = T_;
  p.scale = static_cast<A>(scale);
  p.per_head = per_head;
  p.q = reinterpret_cast<const T*>(q); p.k = reinterpret_cast<const T*>(k);
  p.v = reinterpret_cast<const T*>(v); p.mk = reinterpret_cast<const T*>(mk);
  p.sq = strides4(qs); p.sk = strides4(ks); p.sv = strides4(vs); p.smk = strides4(mks);
  p.tok = reinterpret_cast<const int64_t*>(tok);
  return p;
}

template <class T, class A>
void launch_fwd(const FwdCall& c, cudaStream_t st) {
  XP<T, A> p = make_xp<T, A>(c.B, c.H, c.Nq, c.Nk, c.Nm, c.D, c.Dv, c.T, c.scale, c.per_head, c.q, c.qs, c.k, c.ks,
                             c.v, c.vs, c.mk, c.mks, c.tok);
  const int per = (c.D + c.Nk + c.Nm) * static_cast<int>(sizeof(A));
  const int wpb = warps_per_block(per);
  const idx_t rows = static_cast<idx_t>(c.B) * c.H * c.Nq;
  if (rows == 0) return;
  const unsigned grid = static_cast<unsigned>((rows + wpb - 1) / wpb);
  xattn_fwd_kernel<T, A><<<grid, wpb * 32, wpb * per, st>>>(p, reinterpret_cast<T*>(c.out), reinterpret_cast<A*>(c.lse),
                                                             reinterpret_cast<A*>(c.mlse), reinterpret_cast<A*>(c.maps));
  check(cudaGetLastError(), "xattn_fwd launch");
}

template <class T, class A>
void launch_bwd(const BwdCall& c, cudaStream_t st) {
  const FwdCall& f = c.f;
  XP<T, A> p = make_xp<T, A>(f.B, f.H, f.Nq, f.Nk, f.Nm, f.D, f.Dv, f.T, f.scale, f.per_head, f.q, f.qs, f.k, f.ks,
                             f.v, f.vs, f.mk, f.mks, f.tok);
  const idx_t rows = static_cast<idx_t>(f.B) * f.H * f.Nq;
  if (rows == 0) return;
  const bool has_maps = f.tok && c.dmaps && f.T > 0;
  const bool mk_path = f.mk && has_maps && (c.dq || c.dmk);
  const bool p_path = c.dq || c.dk || c.dv;
  const int per = (f.D + f.Dv + 2 * f.Nk + 2 * f.Nm) * static_cast<int>(sizeof(A));
  const int wpb = warps_per_block(per);
  const unsigned grid = static_cast<unsigned>((rows + wpb - 1) / wpb);
  xattn_bwd_rows_kernel<T, A><<<grid, wpb * 32, wpb * per, st>>>(
      p, reinterpret_cast<const A*>(f.lse), reinterpret_cast<const A*>(f.mlse), reinterpret_cast<const T*>(c.dout),
      strides4(c.douts), has_maps ? reinterpret_cast<const A*>(c.dmaps) : nullptr, reinterpret_cast<T*>(c.dq),
      reinterpret_cast<A*>(c.ds_buf), reinterpret_cast<A*>(c.p_buf), mk_path ? reinterpret_cast<A*>(c.dsm_buf) : nullptr,
      p_path, mk_path);
  check(cudaGetLastError(), "xattn_bwd rows launch");
  auto cols = [&](uintptr_t coef, int Nc, uintptr_t x, const S4& sx, int Dx, A alpha, uintptr_t outp) {
    const idx_t items = static_cast<idx_t>(f.B) * f.H * Nc;
    if (items == 0) return;
    const unsigned g2 = static_cast<unsigned>((items + 3) / 4);
    xattn_bwd_cols_kernel<T, A><<<g2, 128, 0, st>>>(f.B, f.H, f.Nq, Nc, Dx, alpha, reinterpret_cast<const A*>(coef),
                                                   reinterpret_cast<const T*>(x), sx, reinterpret_cast<T*>(outp));
    check(cudaGetLastError(), "xattn_bwd cols launch");
  };
  const A scale = static_cast<A>(f.scale);
  if (c.dk) cols(c.ds_buf, f.Nk, f.q, p.sq, f.D, scale, c.dk);
  if (c.dv) cols(c.p_buf, f.Nk, c.dout, strides4(c.douts), f.Dv, A(1), c.dv);
  if (c.dmk && mk_path) cols(c.dsm_buf, f.Nm, f.q, p.sq, f.D, scale, c.dmk);
}

template <class F>
void dispatch(int dtype, F&& f) {
  switch (dtype) {
    case ff_cuda::F32: f(float(), float()); break;
    case ff_cuda::F64: f(double(), double()); break;
    case ff_cuda::F16: f(__half(), float()); break;
    case ff_cuda::BF16: f(__nv_bfloat16(), float()); break;
    default: throw std::invalid_argument("fastfair._native_cuda: unsupported dtype code");
  }
}

}  // namespace

namespace ff_cuda {

void xattn_fwd(int dtype, int device, uintptr_t stream, const FwdCall& c) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto t, auto a) { launch_fwd<decltype(t), decltype(a)>(c, st); });
}

void xattn_bwd(int dtype, int device, uintptr_t stream, const BwdCall& c) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  dispatch(dtype, [&](auto t, auto a) { launch_bwd<decltype(t), decltype(a)>(c, st); });
}

void soft_iou(int dtype, int device, uintptr_t stream, const SiouCall& s) {
  check(cudaSetDevice(device), "cudaSetDevice");
  cudaStream_t st = reinterpret_cast<cudaStream_t>(stream);
  if (s.N == 0) return;
  dispatch(dtype, [&](auto t, auto acc) {
    using T = decltype(t);
    using A = decltype(acc);
    const bool topk = s.k > 0;
    const ff::SinkCfg<A> c = ff::sink_cfg<A>(s.n, topk ? s.k : 1, s.gamma, s.iters);
    const size_t smem = 33 * sizeof(double) + 8 * (s.iters + 1) * sizeof(A);
    if (smem > static_cast<size_t>(kMaxSmem)) throw std::invalid_argument("fastfair._native_cuda: too many iters");
    soft_iou_kernel<T, A><<<s.N, 256, smem, st>>>(s.N, s.n, c, topk, static_cast<A>(s.eps),
                                                   reinterpret_cast<const T*>(s.a), reinterpret_cast<const T*>(s.b),
                                                   reinterpret_cast<A*>(s.out), reinterpret_cast<const A*>(s.dy),
                                                   reinterpret_cast<A*>(s.da), reinterpret_cast<A*>(s.db));
    check(cudaGetLastError(), "soft_iou launch");
  });
}

}  // namespace ff_cuda
