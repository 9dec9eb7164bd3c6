// fastfair native kernels: the CPU driver (module fastfair._native).
//
// Drives the row math of xattn_row.h over blocks of query rows with std::thread (no OpenMP, so
// no second OpenMP runtime next to torch's). Inputs arrive as raw pointers with element strides,
// already converted to the accumulation dtype (float32 or float64) by fastfair/native.py;
// outputs are contiguous buffers of that dtype allocated by the caller. No torch C++ is linked.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>

#include <pthread.h>
#include <unistd.h>

#if defined(_OPENMP)
#include <omp.h>
#endif

#include "xattn_row.h"

namespace py = pybind11;
using ff::idx_t;

namespace {

// ------------------------------------------------------------------------------------------
// [0, n) items over nthreads threads, handed out dynamically (robust to busy cores). Results
// never depend on which thread ran an item: per-thread state is scratch only, and reductions go
// through per-item buffers summed in a fixed order.
//
// The worker threads are persistent (spawning them per call cost ~50-100 us, as much as a whole
// cross-attention call at SD's small layers). One job runs at a time; a call that finds the pool
// busy (another Python thread, the GIL being released) runs its items inline instead of waiting.
// After fork() the child gets a fresh pool (the parent's threads do not exist there).
class Pool {
 public:
  static Pool& get() {
    static Pool* pool = nullptr;
    static std::mutex make;
    std::lock_guard<std::mutex> lk(make);
    if (pool == nullptr || pool->pid_ != getpid()) pool = new Pool();  // the old one is leaked after a fork
    return *pool;
  }

  void run(idx_t n, int nthreads, const std::function<void(idx_t, int)>& fn) {
    std::unique_lock<std::mutex> submit(submit_, std::try_to_lock);
    if (!submit.owns_lock()) {  // busy: run inline
      for (idx_t i = 0; i < n; ++i) fn(i, 0);
      return;
    }
    {
      std::lock_guard<std::mutex> lk(m_);
      while (static_cast<int>(workers_.size()) < nthreads - 1) {
        const int wid = static_cast<int>(workers_.size()) + 1;
        workers_.emplace_back([this, wid] { loop(wid); });
        workers_.back().detach();
      }
      job_ = &fn;
      n_ = n;
      next_.store(0);
      participants_ = nthreads;
      pending_ = nthreads - 1;
      errs_.assign(nthreads, nullptr);
      ++gen_;
    }
    cv_.notify_all();
    work(0);
    std::unique_lock<std::mutex> lk(m_);
    done_.wait(lk, [this] { return pending_ == 0; });
    job_ = nullptr;
    for (auto& e : errs_)
      if (e) std::rethrow_exception(e);
  }

 private:
  Pool() : pid_(getpid()) {}

  void work(int tid) {
    try {
      for (idx_t i = next_.fetch_add(1); i < n_; i = next_.fetch_add(1)) (*job_)(i, tid);
    } catch (...) {
      errs_[tid] = std::current_exception();
      next_.store(n_);
    }
  }

  void loop(int wid) {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(m_);
    for (;;) {
      cv_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (wid >= participants_) continue;
      lk.unlock();
      work(wid);
      lk.lock();
      if (--pending_ == 0) done_.notify_one();
    }
  }

  const pid_t pid_;
  std::mutex submit_, m_;
  std::condition_variable cv_, done_;
  std::vector<std::thread> workers_;
  const std::function<void(idx_t, int)>* job_ = nullptr;
  idx_t n_ = 0;
  std::atomic<idx_t> next_{0};
  int participants_ = 0, pending_ = 0;
  uint64_t gen_ = 0;
  std::vector<std::exception_ptr> errs_;
};

#if defined(_OPENMP)
std::atomic<bool>& forked_flag() {
  static std::atomic<bool> f(false);
  return f;
}
bool forked_child() { return forked_flag().load(std::memory_order_relaxed); }
const int fork_hook_registered = pthread_atfork(nullptr, nullptr, [] { forked_flag().store(true); });

template <class F>
void omp_for(idx_t n, int nthreads, F& fn) {
  std::vector<std::exception_ptr> errs(nthreads);
  std::atomic<bool> failed(false);
#pragma omp parallel for schedule(dynamic, 1) num_threads(nthreads)
  for (idx_t i = 0; i < n; ++i) {
    if (failed.load(std::memory_order_relaxed)) continue;
    const int tid = omp_get_thread_num();
    try {
      fn(i, tid);
    } catch (...) {
      errs[tid] = std::current_exception();
      failed.store(true);
    }
  }
  for (auto& e : errs)
    if (e) std::rethrow_exception(e);
}
#endif

// With OpenMP (the default build), the items run on the OpenMP runtime's threads. torch's CPU wheel
// ships libgomp.so.1 and loads it before this module, so the dynamic linker resolves our libgomp.so.1
// to that same runtime: one thread pool for torch and fastfair. With a separate pool, torch's OpenMP
// workers (spinning after each torch op) and ours competed for the cores, and a 2-thread native call
// interleaved with torch ops ran no faster than a 1-thread one. Without OpenMP, and in a child forked
// after OpenMP ran (libgomp's team is gone there and a parallel region would hang): the Pool above.
template <class F>
void parallel_for(idx_t n, int nthreads, F&& fn) {
  nthreads = static_cast<int>(std::max<idx_t>(1, std::min<idx_t>(nthreads, n)));
#if defined(_OPENMP)
  if (omp_in_parallel()) nthreads = 1;  // called from inside a parallel region: no nested team
#endif
  if (nthreads <= 1) {
    for (idx_t i = 0; i < n; ++i) fn(i, 0);
    return;
  }
#if defined(_OPENMP)
  if (!forked_child()) return omp_for(n, nthreads, fn);
#endif
  const std::function<void(idx_t, int)> f(std::ref(fn));
  Pool::get().run(n, nthreads, f);
}

inline int round_up(int x, int m) { return (x + m - 1) / m * m; }

// Grow-only scratch, one per (thread, dtype, slot), kept between calls: fresh large buffers per call
// cost page faults and zeroing (~15% of a call at SD shapes, perf). Worker threads and the calling
// thread each have their own, so concurrent callers never share one.
// Buffers over 32 MiB are not kept: tl_trim (at the end of each kernel) frees them.
template <class A, int SLOT>
std::vector<A>& tl_vec() {
  thread_local std::vector<A> v;
  return v;
}

template <class A, int SLOT>
A* tl_buf(idx_t n, bool zero = false) {
  std::vector<A>& v = tl_vec<A, SLOT>();
  if (static_cast<idx_t>(v.size()) < n) v.resize(n);
  if (zero) std::fill(v.begin(), v.begin() + n, A(0));
  return v.data();
}

template <class A, int SLOT>
void tl_trim_one() {
  std::vector<A>& v = tl_vec<A, SLOT>();
  if (v.capacity() * sizeof(A) > (size_t(32) << 20)) std::vector<A>().swap(v);
}

template <class A>
void tl_trim() {
  tl_trim_one<A, 0>(); tl_trim_one<A, 1>(); tl_trim_one<A, 2>(); tl_trim_one<A, 3>();
  tl_trim_one<A, 4>(); tl_trim_one<A, 5>(); tl_trim_one<A, 6>(); tl_trim_one<A, 7>();
}

struct T4 {  // a strided 4-d tensor view (B, H, N, D)
  uintptr_t ptr;
  std::vector<idx_t> st;
  template <class A>
  const A* at(idx_t b, idx_t h, idx_t n) const {
    return reinterpret_cast<const A*>(ptr) + b * st[0] + h * st[1] + n * st[2];
  }
};

T4 view(uintptr_t p, const std::vector<idx_t>& st) {
  if (p && st.size() != 4) throw std::invalid_argument("fastfair._native: expected 4 strides");
  return T4{p, st};
}

constexpr int MB = 64;  // query rows per block

// Copy rows [n0, n0+m) of x[b,h] (strided) into dst (m x ld), zero-padding columns [D, ld).
template <class A>
void load_rows(const T4& x, idx_t b, idx_t h, idx_t n0, int m, int D, A* dst, int ld) {
  const idx_t sd = x.st[3];
  for (int r = 0; r < m; ++r) {
    const A* src = x.at<A>(b, h, n0 + r);
    A* o = dst + static_cast<idx_t>(r) * ld;
    if (sd == 1) {
      for (int d = 0; d < D; ++d) o[d] = src[d];
    } else {
      for (int d = 0; d < D; ++d) o[d] = src[d * sd];
    }
    for (int d = D; d < ld; ++d) o[d] = 0;
  }
}

// Key matrix x[b,h] (N x D) into transposed, padded (D x ldt) and/or row-major padded (N x ldr).
template <class A>
void load_keys(const T4& x, idx_t b, idx_t h, int N, int D, A* xt, int ldt, A* xr, int ldr) {
  if (xt) {
    std::fill(xt, xt + static_cast<idx_t>(D) * ldt, A(0));
    for (int j = 0; j < N; ++j) {
      const A* src = x.at<A>(b, h, j);
      for (int d = 0; d < D; ++d) xt[static_cast<idx_t>(d) * ldt + j] = src[d * x.st[3]];
    }
  }
  if (xr) load_rows<A>(x, b, h, 0, N, D, xr, ldr);
}

struct XArgs {
  int B, H, Nq, Nk, Nm, D, Dv, T;
  double scale;
  bool per_head;
  T4 q, k, v, mk;
  uintptr_t tok;  // (B, T) int64 contiguous
  int nthreads;
};

// ------------------------------------------------------------------------------------------
// Forward: out (B,H,Nq,Dv), lse (B,H,Nq), mlse (B,H,Nq) [mk], maps (B,T,Nq) or (B,H,T,Nq).
// ------------------------------------------------------------------------------------------
template <class A>
void xattn_fwd(const XArgs& p, uintptr_t out_p, uintptr_t lse_p, uintptr_t mlse_p, uintptr_t maps_p) {
  constexpr int W = 64 / sizeof(A);
  const int B = p.B, H = p.H, Nq = p.Nq, Nk = p.Nk, Nm = p.Nm, D = p.D, Dv = p.Dv, T = p.T;
  const bool has_mk = p.mk.ptr != 0, has_maps = p.tok != 0 && T > 0;
  const int Nkp = round_up(Nk, W), Nmp = round_up(std::max(Nm, 1), W), Dvp = round_up(Dv, W);
  const A scale = static_cast<A>(p.scale);
  A* out = reinterpret_cast<A*>(out_p);
  A* lse = reinterpret_cast<A*>(lse_p);
  A* mlse = reinterpret_cast<A*>(mlse_p);
  A* maps = reinterpret_cast<A*>(maps_p);
  const int64_t* tok = reinterpret_cast<const int64_t*>(p.tok);
  const idx_t BH = static_cast<idx_t>(B) * H;

  // per (b,h): K^T (D x Nkp), V (Nk x Dvp), MK^T (D x Nmp)
  const idx_t szK = static_cast<idx_t>(D) * Nkp, szV = static_cast<idx_t>(Nk) * Dvp,
              szM = has_mk ? static_cast<idx_t>(D) * Nmp : 0;
  A* Kt = tl_buf<A, 0>(BH * szK);
  A* Vp = tl_buf<A, 1>(BH * szV);
  A* MKt = tl_buf<A, 2>(BH * szM);
  parallel_for(BH, p.nthreads, [&](idx_t bh, int) {
    const idx_t b = bh / H, h = bh % H;
    load_keys<A>(p.k, b, h, Nk, D, Kt + bh * szK, Nkp, nullptr, 0);
    load_rows<A>(p.v, b, h, 0, Nk, Dv, Vp + bh * szV, Dvp);
    if (has_mk) load_keys<A>(p.mk, b, h, Nm, D, MKt + bh * szM, Nmp, nullptr, 0);
  });

  const idx_t nblk = (Nq + MB - 1) / MB;
  const int nth = p.nthreads;
  // Work items: (batch, block of MB query rows, group of heads). Head groups give many-core CPUs
  // enough items at SD's small layers (Nq 64-256); their number depends on the shapes only, so the
  // results (the order of the head sums of the maps) do not depend on the thread count.
  const idx_t base = static_cast<idx_t>(B) * nblk;
  const int want = static_cast<int>(std::min<idx_t>(H, std::max<idx_t>(1, (32 + base - 1) / base)));
  const int hpg = (H + want - 1) / want;
  const int ng = (H + hpg - 1) / hpg;  // head groups of hpg heads
  const bool partial = has_maps && !p.per_head && ng > 1;
  A* part = partial ? tl_buf<A, 3>(static_cast<idx_t>(ng) * B * T * Nq) : nullptr;  // (ng, B, T, Nq)
  struct Scratch { std::vector<A> s, o, sm, acc; };
  ff::SerialGroup g;
  parallel_for(base * ng, nth, [&](idx_t item, int tid) {
    thread_local Scratch sc;  // per worker thread, kept between calls
    sc.s.resize(static_cast<idx_t>(MB) * Nkp);
    sc.o.resize(static_cast<idx_t>(MB) * Dvp);
    if (has_mk) sc.sm.resize(static_cast<idx_t>(MB) * Nmp);
    if (has_maps && !p.per_head) sc.acc.assign(static_cast<idx_t>(T) * MB, A(0));
    const idx_t gi = item % ng, bi = item / ng;
    const idx_t b = bi / nblk, n0 = (bi % nblk) * MB;
    const int m = static_cast<int>(std::min<idx_t>(MB, Nq - n0));
    const int h0 = static_cast<int>(gi) * hpg, h1 = std::min(H, h0 + hpg);
    for (int h = h0; h < h1; ++h) {
      const idx_t bh = b * H + h;
      // q rows are read in place through their strides (the register tiles broadcast them)
      const A* Q = p.q.at<A>(b, h, n0);
      const idx_t sqr = p.q.st[2], sqd = p.q.st[3];
      A* S = sc.s.data();
      bool fused = false;
      if constexpr (std::is_same<A, float>::value)  // scores and softmax in registers (keys <= 80)
        fused = ff::mm_softmax_block<W>(m, Nkp, D, scale, Q, sqr, sqd, Kt + bh * szK, Nkp, S, Nkp, Nk,
                                        lse + bh * Nq + n0);
      if (!fused) {
        ff::mm_block<W, A>(m, Nkp, D, scale, Q, sqr, sqd, Kt + bh * szK, Nkp, S, Nkp, false);
        // padded key columns -> -inf, so the row loops run over whole vectors (exp(-inf) = 0)
        for (int r = 0; r < m; ++r) {
          A* row = S + static_cast<idx_t>(r) * Nkp;
          for (int j = Nk; j < Nkp; ++j) row[j] = ff::ninf<A>();
          lse[bh * Nq + n0 + r] = ff::softmax_row(g, row, Nkp);
        }
      }
      if (Dvp == Dv) {  // head dim a multiple of the vector width: the tiles store straight into out
        ff::mm_block<W, A>(m, Dvp, Nk, A(1), S, Nkp, 1, Vp + bh * szV, Dvp, out + (bh * Nq + n0) * Dv, Dv, false);
      } else {
        ff::mm_block<W, A>(m, Dvp, Nk, A(1), S, Nkp, 1, Vp + bh * szV, Dvp, sc.o.data(), Dvp, false);
        for (int r = 0; r < m; ++r) {
          A* o = out + (bh * Nq + n0 + r) * Dv;
          const A* src = sc.o.data() + static_cast<idx_t>(r) * Dvp;
          for (int e = 0; e < Dv; ++e) o[e] = src[e];
        }
      }
      const A* P = S;
      int ldp = Nkp;
      if (has_mk) {
        A* Sm = sc.sm.data();
        ff::mm_block<W, A>(m, Nmp, D, scale, Q, sqr, sqd, MKt + bh * szM, Nmp, Sm, Nmp, false);
        for (int r = 0; r < m; ++r) {
          A* row = Sm + static_cast<idx_t>(r) * Nmp;
          for (int j = Nm; j < Nmp; ++j) row[j] = ff::ninf<A>();
          mlse[bh * Nq + n0 + r] = ff::softmax_row(g, row, Nmp);
        }
        P = Sm;
        ldp = Nmp;
      }
      if (has_maps) {
        const int64_t* tb = tok + b * T;
        for (int t = 0; t < T; ++t) {
          if (p.per_head) {
            A* dst = maps + ((bh * T + t) * Nq + n0);
            for (int r = 0; r < m; ++r) dst[r] = ff::map_value(P + static_cast<idx_t>(r) * ldp, tb, t);
          } else {
            A* dst = sc.acc.data() + static_cast<idx_t>(t) * MB;
            for (int r = 0; r < m; ++r) dst[r] += ff::map_value(P + static_cast<idx_t>(r) * ldp, tb, t);
          }
        }
      }
    }
    if (has_maps && !p.per_head) {
      A* dst0 = partial ? part + (gi * B + b) * T * Nq : maps + b * T * Nq;
      for (int t = 0; t < T; ++t) {
        A* dst = dst0 + static_cast<idx_t>(t) * Nq + n0;
        for (int r = 0; r < m; ++r) dst[r] = sc.acc[static_cast<idx_t>(t) * MB + r];
      }
    }
  });
  if (partial)  // head groups' partial maps, summed in group order
    parallel_for(static_cast<idx_t>(B) * T, nth, [&](idx_t bt, int) {
      A* dst = maps + bt * Nq;
      const idx_t gs = static_cast<idx_t>(B) * T * Nq;
      for (idx_t n = 0; n < Nq; ++n) dst[n] = part[bt * Nq + n];
      for (int gi = 1; gi < ng; ++gi)
        for (idx_t n = 0; n < Nq; ++n) dst[n] += part[gi * gs + bt * Nq + n];
    });
  tl_trim<A>();
}

// ------------------------------------------------------------------------------------------
// Backward: dq (B,H,Nq,D), dk (B,H,Nk,D), dv (B,H,Nk,Dv), dmk (B,H,Nm,D), contiguous; a zero
// pointer means "not needed". dout strided (or 0), dmaps contiguous (or 0), lse/mlse contiguous.
// ------------------------------------------------------------------------------------------
template <class A>
void xattn_bwd(const XArgs& p, uintptr_t lse_p, uintptr_t mlse_p, const T4& dout, uintptr_t dmaps_p,
               uintptr_t dq_p, uintptr_t dk_p, uintptr_t dv_p, uintptr_t dmk_p) {
  constexpr int W = 64 / sizeof(A);
  const int B = p.B, H = p.H, Nq = p.Nq, Nk = p.Nk, Nm = p.Nm, D = p.D, Dv = p.Dv, T = p.T;
  const bool has_mk = p.mk.ptr != 0, has_dout = dout.ptr != 0;
  const bool has_maps = p.tok != 0 && dmaps_p != 0 && T > 0;
  const bool need_q = dq_p != 0, need_k = dk_p != 0, need_v = dv_p != 0 && has_dout;
  const bool need_mk = dmk_p != 0 && has_mk && has_maps;
  const bool mk_path = has_mk && has_maps && (need_q || need_mk);
  const int Nkp = round_up(Nk, W), Nmp = round_up(std::max(Nm, 1), W), Dvp = round_up(Dv, W), Dp = round_up(D, W);
  const A scale = static_cast<A>(p.scale);
  const A* lse = reinterpret_cast<const A*>(lse_p);
  const A* mlse = reinterpret_cast<const A*>(mlse_p);
  const A* dmaps = reinterpret_cast<const A*>(dmaps_p);
  const int64_t* tok = reinterpret_cast<const int64_t*>(p.tok);
  const idx_t BH = static_cast<idx_t>(B) * H;
  const int nth = std::max(1, p.nthreads);

  // per (b,h): K^T (D x Nkp), K (Nk x Dp), V^T (Dv x Nkp), MK^T (D x Nmp), MK (Nm x Dp)
  const idx_t szKt = static_cast<idx_t>(D) * Nkp, szK = static_cast<idx_t>(Nk) * Dp,
              szVt = has_dout ? static_cast<idx_t>(Dv) * Nkp : 0, szMt = mk_path ? static_cast<idx_t>(D) * Nmp : 0,
              szM = mk_path ? static_cast<idx_t>(Nm) * Dp : 0;
  A* Kt = tl_buf<A, 0>(BH * szKt);
  A* Kr = tl_buf<A, 1>(need_q ? BH * szK : 0);
  A* Vt = tl_buf<A, 2>(BH * szVt);
  A* MKt = tl_buf<A, 3>(BH * szMt);
  A* MKr = tl_buf<A, 4>(BH * szM);
  parallel_for(BH, nth, [&](idx_t bh, int) {
    const idx_t b = bh / H, h = bh % H;
    load_keys<A>(p.k, b, h, Nk, D, Kt + bh * szKt, Nkp, need_q ? Kr + bh * szK : nullptr, Dp);
    if (has_dout) load_keys<A>(p.v, b, h, Nk, Dv, Vt + bh * szVt, Nkp, nullptr, 0);
    if (mk_path) load_keys<A>(p.mk, b, h, Nm, D, MKt + bh * szMt, Nmp, MKr + bh * szM, Dp);
  });

  // Accumulators of dK (Nk x Dp), dV (Nk x Dvp), dMK (Nm x Dp) per (b, h, chunk of query blocks);
  // the chunking depends on the shapes only, so results do not depend on the thread count.
  const idx_t accK = need_k ? static_cast<idx_t>(Nk) * Dp : 0, accV = need_v ? static_cast<idx_t>(Nk) * Dvp : 0,
              accM = need_mk ? static_cast<idx_t>(Nm) * Dp : 0;
  const idx_t nblk = (Nq + MB - 1) / MB;
  const idx_t nchunk = std::min<idx_t>(nblk, 8);
  const idx_t items = BH * nchunk;
  const int nthr = static_cast<int>(std::max<idx_t>(1, std::min<idx_t>(nth, items)));
  A* dK = tl_buf<A, 5>(items * accK, true);
  A* dV = tl_buf<A, 6>(items * accV, true);
  A* dMK = tl_buf<A, 7>(items * accM, true);
  struct Scratch { std::vector<A> q, o, s, dp, dq, sm, gm; };
  ff::SerialGroup g;
  A* dq_out = reinterpret_cast<A*>(dq_p);

  // one block of MB query rows of (b, h)
  auto run_block = [&](idx_t bh, idx_t blk, int tid, A* dKc, A* dVc, A* dMKc) {
    const idx_t b = bh / H, h = bh % H;
    thread_local Scratch sc;  // per worker thread, kept between calls
    sc.q.resize(static_cast<idx_t>(MB) * Dp);
    sc.s.resize(static_cast<idx_t>(MB) * Nkp);
    sc.dp.resize(static_cast<idx_t>(MB) * Nkp);
    if (has_dout) sc.o.resize(static_cast<idx_t>(MB) * Dvp);
    if (need_q) sc.dq.resize(static_cast<idx_t>(MB) * Dp);
    if (mk_path) { sc.sm.resize(static_cast<idx_t>(MB) * Nmp); sc.gm.resize(static_cast<idx_t>(MB) * Nmp); }
    const idx_t n0 = blk * MB;
    const int m = static_cast<int>(std::min<idx_t>(MB, Nq - n0));
    const int64_t* tb = has_maps ? tok + b * T : nullptr;
    // dmaps row accessor: element (t, n) of this (b,h)
    const A* dm_base = nullptr;
    idx_t dm_st = Nq;  // stride over t
    if (has_maps) dm_base = p.per_head ? dmaps + bh * T * Nq : dmaps + b * T * Nq;

    A* Q = sc.q.data();
    A* S = sc.s.data();
    A* dP = sc.dp.data();
    load_rows<A>(p.q, b, h, n0, m, D, Q, Dp);
    if (has_dout) load_rows<A>(dout, b, h, n0, m, Dv, sc.o.data(), Dvp);
    const bool p_path = need_q || need_k || need_v;
    if (p_path) {
      ff::mm_block<W, A>(m, Nkp, D, scale, Q, Dp, 1, Kt + bh * szKt, Nkp, S, Nkp, false);
      for (int r = 0; r < m; ++r) ff::probs_from_lse(g, S + static_cast<idx_t>(r) * Nkp, Nk, lse[bh * Nq + n0 + r]);
      if (has_dout)
        ff::mm_block<W, A>(m, Nkp, Dv, A(1), sc.o.data(), Dvp, 1, Vt + bh * szVt, Nkp, dP, Nkp, false);
      else
        std::fill(dP, dP + static_cast<idx_t>(m) * Nkp, A(0));
      if (need_v)
        ff::mm_block<W, A>(Nk, Dvp, m, A(1), S, 1, Nkp, sc.o.data(), Dvp, dVc, Dvp, true);
      if (has_maps && !has_mk)
        for (int r = 0; r < m; ++r) ff::scatter_map_grad(g, dP + static_cast<idx_t>(r) * Nkp, tb, T, dm_base + n0 + r, dm_st);
      for (int r = 0; r < m; ++r) {
        const A* pr = S + static_cast<idx_t>(r) * Nkp;
        A* dr = dP + static_cast<idx_t>(r) * Nkp;
        ff::dsoftmax_row(g, pr, dr, Nk, ff::row_delta(g, pr, dr, Nk));
      }
      if (need_q) ff::mm_block<W, A>(m, Dp, Nk, scale, dP, Nkp, 1, Kr + bh * szK, Dp, sc.dq.data(), Dp, false);
      if (need_k) ff::mm_block<W, A>(Nk, Dp, m, scale, dP, 1, Nkp, Q, Dp, dKc, Dp, true);
    } else if (need_q) {
      std::fill(sc.dq.begin(), sc.dq.end(), A(0));
    }
    if (mk_path) {
      A* Sm = sc.sm.data();
      A* Gm = sc.gm.data();
      ff::mm_block<W, A>(m, Nmp, D, scale, Q, Dp, 1, MKt + bh * szMt, Nmp, Sm, Nmp, false);
      std::fill(Gm, Gm + static_cast<idx_t>(m) * Nmp, A(0));
      for (int r = 0; r < m; ++r) {
        A* pr = Sm + static_cast<idx_t>(r) * Nmp;
        A* gr = Gm + static_cast<idx_t>(r) * Nmp;
        ff::probs_from_lse(g, pr, Nm, mlse[bh * Nq + n0 + r]);
        ff::scatter_map_grad(g, gr, tb, T, dm_base + n0 + r, dm_st);
        ff::dsoftmax_row(g, pr, gr, Nm, ff::row_delta(g, pr, gr, Nm));
      }
      if (need_q) ff::mm_block<W, A>(m, Dp, Nm, scale, Gm, Nmp, 1, MKr + bh * szM, Dp, sc.dq.data(), Dp, true);
      if (need_mk) ff::mm_block<W, A>(Nm, Dp, m, scale, Gm, 1, Nmp, Q, Dp, dMKc, Dp, true);
    }
    if (need_q)
      for (int r = 0; r < m; ++r) {
        A* o = dq_out + (bh * Nq + n0 + r) * D;
        const A* src = sc.dq.data() + static_cast<idx_t>(r) * Dp;
        for (int d = 0; d < D; ++d) o[d] = src[d];
      }
  };
  parallel_for(items, nthr, [&](idx_t item, int tid) {
    const idx_t bh = item / nchunk, chunk = item % nchunk;
    for (idx_t blk = nblk * chunk / nchunk; blk < nblk * (chunk + 1) / nchunk; ++blk)
      run_block(bh, blk, tid, dK + item * accK, dV + item * accV, dMK + item * accM);
  });

  // reduce the per-chunk accumulators (fixed order) into the outputs
  auto reduce = [&](const A* acc, uintptr_t out_p, int N, int Dc, int ld) {
    A* out = reinterpret_cast<A*>(out_p);
    const idx_t sz = static_cast<idx_t>(N) * ld;
    parallel_for(BH, nth, [&](idx_t bh, int) {
      for (int j = 0; j < N; ++j) {
        A* o = out + (bh * N + j) * Dc;
        for (int d = 0; d < Dc; ++d) o[d] = 0;
        for (idx_t c = 0; c < nchunk; ++c) {
          const A* src = acc + (bh * nchunk + c) * sz + static_cast<idx_t>(j) * ld;
          for (int d = 0; d < Dc; ++d) o[d] += src[d];
        }
      }
    });
  };
  if (need_k) reduce(dK, dk_p, Nk, D, Dp);
  if (dv_p) {
    if (need_v) reduce(dV, dv_p, Nk, Dv, Dvp);
    else std::fill(reinterpret_cast<A*>(dv_p), reinterpret_cast<A*>(dv_p) + BH * Nk * Dv, A(0));
  }
  if (dmk_p && has_mk) {
    if (need_mk) reduce(dMK, dmk_p, Nm, D, Dp);
    else std::fill(reinterpret_cast<A*>(dmk_p), reinterpret_cast<A*>(dmk_p) + BH * Nm * D, A(0));
  }
  tl_trim<A>();
}

// ------------------------------------------------------------------------------------------
// SoftIoU: a, b (N, n) contiguous in A; out (N,); da, db (N, n).
// ------------------------------------------------------------------------------------------
template <class A>
void soft_iou(int N, int n, int k, double gamma, int iters, double eps, uintptr_t a_p, uintptr_t b_p,
              uintptr_t out_p, uintptr_t dy_p, uintptr_t da_p, uintptr_t db_p, int nthreads) {
  const A* a = reinterpret_cast<const A*>(a_p);
  const A* b = reinterpret_cast<const A*>(b_p);
  const bool topk = k > 0;
  const ff::SinkCfg<A> c = ff::sink_cfg<A>(n, topk ? k : 1, gamma, iters);
  const A e = static_cast<A>(eps);
  const int H = 2 * (iters + 1);
  ff::SerialGroup g;
  parallel_for(N, nthreads, [&](idx_t row, int) {
    std::vector<A> hist(4 * H);
    const A* ar = a + row * n;
    const A* br = b + row * n;
    ff::MapRow<A> ma, mb;
    ff::minmax_stats(g, ar, n, ma.lo, ma.hi, ma.R);
    ff::minmax_stats(g, br, n, mb.lo, mb.hi, mb.R);
    ma.hist = hist.data(); ma.shist = hist.data() + H;
    mb.hist = hist.data() + 2 * H; mb.shist = hist.data() + 3 * H;
    if (topk) {
      ff::sinkhorn_fwd(g, ar, n, ma, c);
      ff::sinkhorn_fwd(g, br, n, mb, c);
    }
    A inter, sa, sb;
    ff::iou_sums(g, ar, br, n, ma, mb, c, topk, inter, sa, sb);
    if (out_p) reinterpret_cast<A*>(out_p)[row] = ff::iou_value(inter, sa, sb, e);
    if (dy_p) {
      A ci, cs;
      ff::iou_grad_coeffs(inter, sa, sb, e, reinterpret_cast<const A*>(dy_p)[row], ci, cs);
      A* da = reinterpret_cast<A*>(da_p) + row * n;
      A* db = reinterpret_cast<A*>(db_p) + row * n;
      ff::iou_map_bwd(g, ar, br, n, ma, mb, c, topk, ci, cs, da);
      ff::minmax_bwd(g, ar, n, ma, da);
      ff::iou_map_bwd(g, br, ar, n, mb, ma, c, topk, ci, cs, db);
      ff::minmax_bwd(g, br, n, mb, db);
    }
  });
}

XArgs make_args(int B, int H, int Nq, int Nk, int Nm, int D, int Dv, int T, double scale, bool per_head,
                uintptr_t q, const std::vector<idx_t>& qs, uintptr_t k, const std::vector<idx_t>& ks, uintptr_t v,
                const std::vector<idx_t>& vs, uintptr_t mk, const std::vector<idx_t>& mks, uintptr_t tok, int nthreads) {
  XArgs p;
  p.B = B; p.H = H; p.Nq = Nq; p.Nk = Nk; p.Nm = Nm; p.D = D; p.Dv = Dv; p.T = T;
  p.scale = scale; p.per_head = per_head;
  p.q = view(q, qs); p.k = view(k, ks); p.v = view(v, vs); p.mk = view(mk, mks);
  p.tok = tok; p.nthreads = std::max(1, nthreads);
  return p;
}

}  // namespace

// CMakeLists.txt builds this file as several modules (_native, _native_v3, _native_v4: one per instruction set,
// fastfair/native.py picks one at import); the init function's name must match the module file's.
#ifndef FASTFAIR_MODULE_NAME
#define FASTFAIR_MODULE_NAME _native
#endif
#ifndef FASTFAIR_VARIANT
#define FASTFAIR_VARIANT "portable"
#endif

PYBIND11_MODULE(FASTFAIR_MODULE_NAME, m) {
  m.doc() = "fastfair native CPU kernels (see csrc/xattn_row.h and fastfair/native.py)";
  m.attr("variant") = FASTFAIR_VARIANT;  // the instruction set it was compiled for: portable, v3, v4 or native
  m.def(
      "xattn_fwd",
      [](bool f64, int B, int H, int Nq, int Nk, int Nm, int D, int Dv, int T, double scale, bool per_head,
         uintptr_t q, std::vector<idx_t> qs, uintptr_t k, std::vector<idx_t> ks, uintptr_t v, std::vector<idx_t> vs,
         uintptr_t mk, std::vector<idx_t> mks, uintptr_t tok, uintptr_t out, uintptr_t lse, uintptr_t mlse,
         uintptr_t maps, int nthreads) {
        XArgs p = make_args(B, H, Nq, Nk, Nm, D, Dv, T, scale, per_head, q, qs, k, ks, v, vs, mk, mks, tok, nthreads);
        py::gil_scoped_release nogil;
        if (f64) xattn_fwd<double>(p, out, lse, mlse, maps);
        else xattn_fwd<float>(p, out, lse, mlse, maps);
      });
  m.def(
      "xattn_bwd",
      [](bool f64, int B, int H, int Nq, int Nk, int Nm, int D, int Dv, int T, double scale, bool per_head,
         uintptr_t q, std::vector<idx_t> qs, uintptr_t k, std::vector<idx_t> ks, uintptr_t v, std::vector<idx_t> vs,
         uintptr_t mk, std::vector<idx_t> mks, uintptr_t tok, uintptr_t lse, uintptr_t mlse, uintptr_t dout,
         std::vector<idx_t> douts, uintptr_t dmaps, uintptr_t dq, uintptr_t dk, uintptr_t dv, uintptr_t dmk,
         int nthreads) {
        XArgs p = make_args(B, H, Nq, Nk, Nm, D, Dv, T, scale, per_head, q, qs, k, ks, v, vs, mk, mks, tok, nthreads);
        T4 dov = view(dout, douts);
        py::gil_scoped_release nogil;
        if (f64) xattn_bwd<double>(p, lse, mlse, dov, dmaps, dq, dk, dv, dmk);
        else xattn_bwd<float>(p, lse, mlse, dov, dmaps, dq, dk, dv, dmk);
      });
  m.def(
      "soft_iou",
      [](bool f64, int N, int n, int k, double gamma, int iters, double eps, uintptr_t a, uintptr_t b, uintptr_t out,
         uintptr_t dy, uintptr_t da, uintptr_t db, int nthreads) {
        py::gil_scoped_release nogil;
        if (f64) soft_iou<double>(N, n, k, gamma, iters, eps, a, b, out, dy, da, db, nthreads);
        else soft_iou<float>(N, n, k, gamma, iters, eps, a, b, out, dy, da, db, nthreads);
      });
}
