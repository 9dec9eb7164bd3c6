// fastfair native kernels: the host interface of the CUDA driver (csrc/native_cuda.cu), used by
// the pybind11 module csrc/native_cuda_module.cpp. Plain C++: no CUDA or pybind11 headers, so the
// module and the kernels compile in parallel and the kernels file stays light for nvcc.
#pragma once

#include <cstdint>
#include <vector>

namespace ff_cuda {

typedef int64_t idx_t;

enum DType { F32 = 0, F64 = 1, F16 = 2, BF16 = 3 };

struct FwdCall {
  int B, H, Nq, Nk, Nm, D, Dv, T;
  double scale;
  bool per_head;
  uintptr_t q, k, v, mk, tok, out, lse, mlse, maps;
  std::vector<idx_t> qs, ks, vs, mks;
};

struct BwdCall {
  FwdCall f;
  uintptr_t dout, dmaps, dq, dk, dv, dmk, ds_buf, p_buf, dsm_buf;
  std::vector<idx_t> douts;
};

struct SiouCall {
  int N, n, k, iters;
  double gamma, eps;
  uintptr_t a, b, out, dy, da, db;
};

// Each launches on `stream` (a cudaStream_t) after cudaSetDevice(device); throws std::runtime_error
// on CUDA errors and std::invalid_argument on unsupported arguments.
void xattn_fwd(int dtype, int device, uintptr_t stream, const FwdCall& c);
void xattn_bwd(int dtype, int device, uintptr_t stream, const BwdCall& c);
void soft_iou(int dtype, int device, uintptr_t stream, const SiouCall& c);

}  // namespace ff_cuda
