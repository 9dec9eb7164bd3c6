// fastfair native kernels: the pybind11 module fastfair._native_cuda around the CUDA driver
// (csrc/native_cuda.cu). Arguments are raw pointers (tensor.data_ptr()), shapes, element strides,
// a dtype code (0 f32, 1 f64, 2 f16, 3 bf16), the device index and the cudaStream_t as an integer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "native_cuda.h"

namespace py = pybind11;
using ff_cuda::idx_t;

PYBIND11_MODULE(_native_cuda, m) {
  m.doc() = "fastfair native CUDA kernels (see csrc/xattn_row.h and fastfair/native.py)";
  m.def(
      "xattn_fwd",
      [](int dtype, int device, uintptr_t stream, int B, int H, int Nq, int Nk, int Nm, int D, int Dv, int T,
         double scale, bool per_head, uintptr_t q, std::vector<idx_t> qs, uintptr_t k, std::vector<idx_t> ks,
         uintptr_t v, std::vector<idx_t> vs, uintptr_t mk, std::vector<idx_t> mks, uintptr_t tok, uintptr_t out,
         uintptr_t lse, uintptr_t mlse, uintptr_t maps) {
        ff_cuda::FwdCall c{B, H, Nq, Nk, Nm, D, Dv, T, scale, per_head, q, k, v, mk, tok, out, lse, mlse, maps,
                           qs, ks, vs, mks};
        py::gil_scoped_release nogil;
        ff_cuda::xattn_fwd(dtype, device, stream, c);
      });
  m.def(
      "xattn_bwd",
      [](int dtype, int device, uintptr_t stream, int B, int H, int Nq, int Nk, int Nm, int D, int Dv, int T,
         double scale, bool per_head, uintptr_t q, std::vector<idx_t> qs, uintptr_t k, std::vector<idx_t> ks,
         uintptr_t v, std::vector<idx_t> vs, uintptr_t mk, std::vector<idx_t> mks, uintptr_t tok, uintptr_t lse,
         uintptr_t mlse, uintptr_t dout, std::vector<idx_t> douts, uintptr_t dmaps, uintptr_t dq, uintptr_t dk,
         uintptr_t dv, uintptr_t dmk, uintptr_t ds_buf, uintptr_t p_buf, uintptr_t dsm_buf) {
        ff_cuda::BwdCall c;
        c.f = ff_cuda::FwdCall{B, H, Nq, Nk, Nm, D, Dv, T, scale, per_head, q, k, v, mk, tok, 0, lse, mlse, 0,
                               qs, ks, vs, mks};
        c.dout = dout; c.dmaps = dmaps; c.dq = dq; c.dk = dk; c.dv = dv; c.dmk = dmk;
        c.ds_buf = ds_buf; c.p_buf = p_buf; c.dsm_buf = dsm_buf; c.douts = douts;
        py::gil_scoped_release nogil;
        ff_cuda::xattn_bwd(dtype, device, stream, c);
      });
  m.def(
      "soft_iou",
      [](int dtype, int device, uintptr_t stream, int N, int n, int k, double gamma, int iters, double eps, uintptr_t a,
         uintptr_t b, uintptr_t out, uintptr_t dy, uintptr_t da, uintptr_t db) {
        ff_cuda::SiouCall c{N, n, k, iters, gamma, eps, a, b, out, dy, da, db};
        py::gil_scoped_release nogil;
        ff_cuda::soft_iou(dtype, device, stream, c);
      });
}
