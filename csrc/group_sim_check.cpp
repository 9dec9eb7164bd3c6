// Runs the row math of xattn_row.h with a multi-lane group emulated by std::threads (lane-strided
// loops, group reductions, sync() and atomic_add() as the CUDA driver's WarpGroup/BlockGroup use
// them) and compares with the serial (CPU driver) group. Catches group-logic errors of the CUDA
// path on machines without a GPU. Built and run by tests/test_native.py:
//   g++ -std=c++20 -O1 -pthread -Icsrc csrc/group_sim_check.cpp -o sim && ./sim   -> "OK ..." / exit 1
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdio>
#include <functional>
#include <mutex>
#include <random>
#include <thread>
#include <vector>

#include "xattn_row.h"

namespace {

struct Shared {
  explicit Shared(int n) : bar(n), buf(n) {}
  std::barrier<> bar;
  std::vector<double> buf;
  std::mutex mu;
};

struct SimGroup {
  int l, n;
  Shared* sh;
  int lane() const { return l; }
  int size() const { return n; }
  template <class X, class Op>
  X reduce(X x, Op op) const {
    sh->buf[l] = static_cast<double>(x);
    sh->bar.arrive_and_wait();
    double r = sh->buf[0];
    for (int i = 1; i < n; ++i) r = op(r, sh->buf[i]);
    sh->bar.arrive_and_wait();
    return static_cast<X>(r);
  }
  template <class X>
  X sum(X x) const { return reduce(x, [](double a, double b) { return a + b; }); }
  template <class X>
  X max(X x) const { return reduce(x, [](double a, double b) { return b > a ? b : a; }); }
  template <class X>
  X min(X x) const { return reduce(x, [](double a, double b) { return b < a ? b : a; }); }
  void sync() const { sh->bar.arrive_and_wait(); }
  template <class X>
  void atomic_add(X* p, X v) const {
    std::lock_guard<std::mutex> lk(sh->mu);
    *p += v;
  }
};

template <class F>
void run_group(int lanes, F&& body) {
  Shared sh(lanes);
  std::vector<std::thread> ts;
  for (int l = 0; l < lanes; ++l) ts.emplace_back([&, l] { body(SimGroup{l, lanes, &sh}); });
  for (auto& t : ts) t.join();
}

double maxdiff(const std::vector<double>& a, const std::vector<double>& b) {
  double m = 0;
  for (size_t i = 0; i < a.size(); ++i) m = std::fmax(m, std::fabs(a[i] - b[i]));
  return m;
}

// One cross-attention row, forward + backward terms, as the CUDA rows kernels drive them.
template <class G>
void xattn_row(const G& g, int Nk, int D, int T, const double* q, const double* K, const double* V,
               const int64_t* tok, const double* dmaps, const double* dout, double* s, double* dp, double* out,
               double* maps, double* dq, double& lse) {
  const double scale = 1.0 / std::sqrt(static_cast<double>(D));
  for (int j = g.lane(); j < Nk; j += g.size()) s[j] = ff::score_dot(q, K + j * D, 1, D, scale);
  g.sync();
  const double l = ff::softmax_row(g, s, Nk);
  if (g.lane() == 0) lse = l;
  for (int e = g.lane(); e < D; e += g.size()) out[e] = ff::out_col(s, Nk, V, D, 1, e);
  for (int t = g.lane(); t < T; t += g.size()) maps[t] = ff::map_value(s, tok, t);
  for (int j = g.lane(); j < Nk; j += g.size()) dp[j] = ff::score_dot(dout, V + j * D, 1, D, 1.0);
  g.sync();
  ff::scatter_map_grad(g, dp, tok, T, dmaps, 1);
  ff::dsoftmax_row(g, s, dp, Nk, ff::row_delta(g, s, dp, Nk));
  for (int d = g.lane(); d < D; d += g.size()) dq[d] = scale * ff::out_col(dp, Nk, K, D, 1, d);
  g.sync();
}

// One SoftIoU row pair, forward + backward, as the CUDA soft_iou kernel drives it.
template <class G>
void siou_row(const G& g, int n, int k, int iters, bool topk, const double* a, const double* b, double* hist,
              double* da, double* db, double& iou) {
  const ff::SinkCfg<double> c = ff::sink_cfg<double>(n, topk ? k : 1, 0.05, iters);
  const int H = 2 * (iters + 1);
  ff::MapRow<double> ma, mb;
  ff::minmax_stats(g, a, n, ma.lo, ma.hi, ma.R);
  ff::minmax_stats(g, b, n, mb.lo, mb.hi, mb.R);
  ma.hist = hist; ma.shist = hist + H;
  mb.hist = hist + 2 * H; mb.shist = hist + 3 * H;
  if (topk) {
    ff::sinkhorn_fwd(g, a, n, ma, c);
    ff::sinkhorn_fwd(g, b, n, mb, c);
  }
  double inter, sa, sb, ci, cs;
  ff::iou_sums(g, a, b, n, ma, mb, c, topk, inter, sa, sb);
  if (g.lane() == 0) iou = ff::iou_value(inter, sa, sb, 1e-8);
  ff::iou_grad_coeffs(inter, sa, sb, 1e-8, 0.7, ci, cs);
  ff::iou_map_bwd(g, a, b, n, ma, mb, c, topk, ci, cs, da);
  ff::minmax_bwd(g, a, n, ma, da);
  ff::iou_map_bwd(g, b, a, n, mb, ma, c, topk, ci, cs, db);
  ff::minmax_bwd(g, b, n, mb, db);
}

}  // namespace

int main() {
  std::mt19937_64 rng(7);
  std::normal_distribution<double> nd;
  std::uniform_real_distribution<double> ud;
  double worst = 0;
  int cases = 0;
  for (int Nk : {1, 7, 77, 300}) {
    for (int lanes : {3, 32}) {
      const int D = 40, T = 5;
      std::vector<double> q(D), K(Nk * D), V(Nk * D), dmaps(T), dout(D);
      std::vector<int64_t> tok(T);
      for (auto& x : q) x = nd(rng);
      for (auto& x : K) x = nd(rng);
      for (auto& x : V) x = nd(rng);
      for (auto& x : dmaps) x = nd(rng);
      for (auto& x : dout) x = nd(rng);
      for (auto& t : tok) t = static_cast<int64_t>(rng() % Nk);
      std::vector<double> s1(Nk), dp1(Nk), out1(D), maps1(T), dq1(D), s2(Nk), dp2(Nk), out2(D), maps2(T), dq2(D);
      double lse1 = 0, lse2 = 0;
      xattn_row(ff::SerialGroup(), Nk, D, T, q.data(), K.data(), V.data(), tok.data(), dmaps.data(), dout.data(),
                s1.data(), dp1.data(), out1.data(), maps1.data(), dq1.data(), lse1);
      run_group(lanes, [&](SimGroup g) {
        xattn_row(g, Nk, D, T, q.data(), K.data(), V.data(), tok.data(), dmaps.data(), dout.data(), s2.data(),
                  dp2.data(), out2.data(), maps2.data(), dq2.data(), lse2);
      });
      const double e = std::fmax(std::fmax(maxdiff(out1, out2), maxdiff(maps1, maps2)),
                                 std::fmax(maxdiff(dq1, dq2), std::fabs(lse1 - lse2)));
      worst = std::fmax(worst, e);
      ++cases;
    }
  }
  for (int n : {5, 97, 1000}) {
    for (int iters : {0, 1, 2, 7}) {
      for (bool topk : {false, true}) {
        for (int lanes : {4, 32}) {
          std::vector<double> a(n), b(n);
          for (auto& x : a) x = ud(rng);
          for (auto& x : b) x = ud(rng) * ud(rng);
          a[1] = a[3] = *std::max_element(a.begin(), a.end());  // tied maxima
          const int k = std::max(1, n * 3 / 10);
          const int H = 2 * (iters + 1);
          std::vector<double> h1(4 * H), h2(4 * H), da1(n), db1(n), da2(n), db2(n);
          double iou1 = 0, iou2 = 0;
          siou_row(ff::SerialGroup(), n, k, iters, topk, a.data(), b.data(), h1.data(), da1.data(), db1.data(), iou1);
          run_group(lanes, [&](SimGroup g) {
            siou_row(g, n, k, iters, topk, a.data(), b.data(), h2.data(), da2.data(), db2.data(), iou2);
          });
          const double e = std::fmax(std::fmax(maxdiff(da1, da2), maxdiff(db1, db2)), std::fabs(iou1 - iou2));
          worst = std::fmax(worst, e);
          ++cases;
        }
      }
    }
  }
  const bool ok = worst < 1e-9;
  std::printf("%s: %d cases, max |serial - group| = %.3g\n", ok ? "OK" : "FAIL", cases, worst);
  return ok ? 0 : 1;
}
