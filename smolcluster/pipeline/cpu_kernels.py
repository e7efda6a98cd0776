"""A decode step's matmuls on x86 CPUs: few rows against a float, bf16 or int8 weight, on every thread.

A decode step multiplies a handful of rows (one per request, or a speculated pass's few) by each weight: a
matrix-vector product, bound by how fast the weight streams from memory. On the x86 CPUs measured here the
libraries torch dispatches to leave most of that on the table (``bench kernels`` times both in one run):

- MKL's fp32 ``x @ W.T`` at one row runs on one thread whatever ``torch.set_num_threads`` says, and its cost
  grows almost linearly with the rows up to ~8 (it is a GEMM tiled for many rows);
- torch's ``_weight_int8pack_mm`` on AVX2 is slower per weight than MKL's fp32 (it converts bf16 activations
  per tile), so an int8 stage was slower than an fp32 one;
- a bf16 weight without AVX512-BF16/AMX goes to torch's cpublas loop, which reads half the bytes and still
  runs at the fp32 product's pace; with AVX512-BF16, oneDNN's bf16 product took 1.7-2.4x this loop's time
  at one row.

:func:`rows_mm` is the one loop all three need, written here because no library serves it: for each block of
4 output channels it streams their weight rows once (fp32, bf16 widened by a shift, or int8 widened and
scaled per channel) against every input row held in L1, with AVX2 FMAs, the output channels split across
torch's intra-op threads (``at::parallel_for``, the stage's ``threads``). It is llama.cpp's "vec_dot per
output row" shape, without its activation quantization: the sums are fp32, as the float path's are (they
differ from MKL's only in summation order), and int8 weights meet fp32 activations, not bf16 ones.

It is compiled on the node, once per source, flags and torch version (torch's C++ extension loader: ``g++``
with ``-mavx2 -mfma``, ~40 s on 2 cores, cached under ``~/.cache/smolcluster/kernels``), and registered as the
torch op ``smolcluster::rows_mm``, which ``torch.compile`` keeps as one call inside a compiled decode step. A
stage never waits for the build (its head has a deadline): the first to find it missing starts it in the
background and runs torch's kernels; ``python -m smolcluster.pipeline.cpu_kernels`` builds it ahead. Where the
CPU lacks AVX2+FMA (ARM: Apple silicon, Raspberry Pi), the build fails (no compiler), or
``SMOLCLUSTER_CPU_KERNELS=0`` is set, stages keep torch's kernels, and their startup line says which path they
took (``quantize.kernels``).
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch
from loguru import logger

# Up to this many rows a CPU stage's matmuls take rows_mm; a prefill's many rows take MKL (a GEMM: there each
# weight byte serves many rows, and MKL's tiling wins). bench kernels prints both sides from 1 to 32 rows.
KERNEL_ROWS = 16

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <cstring>
#include <immintrin.h>

// y[m, o] = (sum_i x[m, i] * w[o, i]) * scale[o] + bias[o]   (x fp32 (M, K); w (N, K) fp32 | bf16 | int8)
namespace {
template <typename W> inline __m256 load8(const W* p);
template <> inline __m256 load8<float>(const float* p) { return _mm256_loadu_ps(p); }
template <> inline __m256 load8<uint16_t>(const uint16_t* p) {  // bf16: the high half of an fp32
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i*)p)), 16)); }
template <> inline __m256 load8<int8_t>(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
template <typename W> inline float load1(W v);
template <> inline float load1<float>(float v) { return v; }
template <> inline float load1<uint16_t>(uint16_t v) { uint32_t u = (uint32_t)v << 16; float f; std::memcpy(&f, &u, 4); return f; }
template <> inline float load1<int8_t>(int8_t v) { return (float)v; }
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// 4 output channels against R input rows at once: each 8 weights are widened once and meet R rows (bf16 and
// int8 widening is the loop's cost past one row), 4 x R independent FMA chains hide the FMA latency. R <= 2
// keeps the 8 accumulators, 4 weights and an input in the 16 ymm registers.
template <typename W, int R>
inline void block4(const float* x, const W* w0, int64_t K, int64_t K8, const char* next, float* s) {
  const W *w1 = w0 + K, *w2 = w1 + K, *w3 = w2 + K;
  __m256 a[R][4];
  for (int r = 0; r < R; ++r) for (int c = 0; c < 4; ++c) a[r][c] = _mm256_setzero_ps();
  for (int64_t i = 0; i < K8; i += 8) {
    if (next) {
      _mm_prefetch(next + 4 * sizeof(W) * i, _MM_HINT_T0);
      _mm_prefetch(next + 4 * sizeof(W) * i + 64, _MM_HINT_T0);
    }
    const __m256 v0 = load8(w0 + i), v1 = load8(w1 + i), v2 = load8(w2 + i), v3 = load8(w3 + i);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + i);
      a[r][0] = _mm256_fmadd_ps(v0, xv, a[r][0]);
      a[r][1] = _mm256_fmadd_ps(v1, xv, a[r][1]);
      a[r][2] = _mm256_fmadd_ps(v2, xv, a[r][2]);
      a[r][3] = _mm256_fmadd_ps(v3, xv, a[r][3]);
    }
  }
  for (int r = 0; r < R; ++r) {
    const float* xr = x + r * K;
    float t[4] = {hsum(a[r][0]), hsum(a[r][1]), hsum(a[r][2]), hsum(a[r][3])};
    for (int64_t i = K8; i < K; ++i) {
      t[0] += xr[i] * load1(w0[i]); t[1] += xr[i] * load1(w1[i]);
      t[2] += xr[i] * load1(w2[i]); t[3] += xr[i] * load1(w3[i]);
    }
    for (int c = 0; c < 4; ++c) s[r * 4 + c] = t[c];
  }
}

// Output channels [o0, o1): 4 at a time (block4), then one at a time.
template <typename W>
void channels(const float* x, const W* w, const float* scale, const float* bias, float* y,
              int64_t M, int64_t K, int64_t N, int64_t o0, int64_t o1) {
  const int64_t K8 = K - K % 8;
  int64_t o = o0;
  for (; o + 4 <= o1; o += 4) {
    const W* w0 = w + o * K;
    // The next block's 4 rows (contiguous after these) are prefetched while these stream, 4 x 8 weights a step,
    // on the first pass: the hardware prefetcher alone leaves a bf16 / int8 block waiting on memory (bench
    // kernels). Later passes over these rows (inputs past the first two) find them in L1.
    const char* next = o + 8 <= o1 ? (const char*)(w0 + 4 * K) : nullptr;
    for (int64_t m = 0; m < M; m += 2) {
      float s[8];
      const int R = M - m >= 2 ? 2 : 1;
      if (R == 2) block4<W, 2>(x + m * K, w0, K, K8, m == 0 ? next : nullptr, s);
      else block4<W, 1>(x + m * K, w0, K, K8, m == 0 ? next : nullptr, s);
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < 4; ++c)
          y[(m + r) * N + o + c] = (scale ? s[r * 4 + c] * scale[o + c] : s[r * 4 + c]) + (bias ? bias[o + c] : 0.f);
    }
  }
  for (; o < o1; ++o) {
    const W* wr = w + o * K;
    for (int64_t m = 0; m < M; ++m) {
      const float* xm = x + m * K;
      __m256 a = _mm256_setzero_ps();
      for (int64_t i = 0; i < K8; i += 8) a = _mm256_fmadd_ps(load8(wr + i), _mm256_loadu_ps(xm + i), a);
      float s = hsum(a);
      for (int64_t i = K8; i < K; ++i) s += xm[i] * load1(wr[i]);
      y[m * N + o] = (scale ? s * scale[o] : s) + (bias ? bias[o] : 0.f);
    }
  }
}
}  // namespace

torch::Tensor rows_mm(const torch::Tensor& x, const torch::Tensor& w, const c10::optional<torch::Tensor>& scale,
                      const c10::optional<torch::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 2 && x.size(1) == w.size(1), "rows_mm: x (M, K) and w (N, K), got ",
              x.sizes(), " and ", w.sizes());
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "rows_mm: CPU tensors only");
  const auto xf = x.to(torch::kFloat).contiguous();
  const auto wc = w.contiguous();
  const int64_t M = xf.size(0), K = xf.size(1), N = wc.size(0);
  auto y = torch::empty({M, N}, xf.options());
  torch::Tensor s, b;
  if (scale) { s = scale->to(torch::kFloat).contiguous(); TORCH_CHECK(s.numel() == N, "rows_mm: one scale a channel"); }
  if (bias) { b = bias->to(torch::kFloat).contiguous(); TORCH_CHECK(b.numel() == N, "rows_mm: one bias a channel"); }
  const float* sp = scale ? s.data_ptr<float>() : nullptr;
  const float* bp = bias ? b.data_ptr<float>() : nullptr;
  const float* xp = xf.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const auto type = wc.scalar_type();
  TORCH_CHECK(type == torch::kFloat || type == torch::kBFloat16 || type == torch::kChar,
              "rows_mm: weights in float32, bfloat16 or int8, got ", type);
  // Tasks of at least 64 KB of weights: below that a thread's start costs more than its share of the stream,
  // so a small model's matrices (gpt2-tiny's 128 x 512) run on the calling thread alone.
  const int64_t grain = std::max<int64_t>(1, (64 << 10) / std::max<int64_t>(1, 4 * K * wc.element_size()));
  at::parallel_for(0, (N + 3) / 4, grain, [&](int64_t b0, int64_t b1) {
    const int64_t o0 = b0 * 4, o1 = std::min(N, b1 * 4);
    if (type == torch::kFloat) channels(xp, wc.data_ptr<float>(), sp, bp, yp, M, K, N, o0, o1);
    else if (type == torch::kBFloat16) channels(xp, (const uint16_t*)wc.data_ptr(), sp, bp, yp, M, K, N, o0, o1);
    else channels(xp, wc.data_ptr<int8_t>(), sp, bp, yp, M, K, N, o0, o1);
  });
  return x.scalar_type() == torch::kFloat ? y : y.to(x.scalar_type());
}

TORCH_LIBRARY(smolcluster, m) { m.def("rows_mm(Tensor x, Tensor w, Tensor? scale, Tensor? bias) -> Tensor"); }
TORCH_LIBRARY_IMPL(smolcluster, CPU, m) { m.impl("rows_mm", &rows_mm); }
"""

_lock = threading.Lock()
_state: dict[str, object] = {}  # "ok": bool once decided; "why": the reason it is off


def build_dir() -> Path:
    return Path(os.environ.get("SMOLCLUSTER_KERNELS_DIR", Path.home() / ".cache" / "smolcluster" / "kernels"))


# AVX2 + FMA and nothing newer (not -march=native): one build serves every x86 CPU that passes why_off(), so a
# home directory shared by unlike machines never hands one of them instructions it lacks.
CFLAGS = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
BUILD_WAIT_S = 600  # how long a process waits for another's build of the same kernel before going without it
LOAD_WAIT_S = 10  # how long a stage waits for the lock while another process loads a built kernel


def _name() -> str:
    key = f"{SOURCE}{CFLAGS}{torch.__version__}{platform.machine()}"
    return "smolcluster_cpu_" + hashlib.sha256(key.encode()).hexdigest()[:12]


def why_off() -> str | None:
    """Why this machine cannot use :func:`rows_mm`, before any build (None: it can try)."""
    if os.environ.get("SMOLCLUSTER_CPU_KERNELS", "1") == "0":
        return "off (SMOLCLUSTER_CPU_KERNELS=0)"
    if platform.machine().lower() not in ("x86_64", "amd64") or \
            torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        return f"no AVX2 on this CPU ({platform.machine()}, {torch.backends.cpu.get_cpu_capability()})"
    if sys.platform == "win32":
        return "not built on Windows (its build uses g++'s flags; torch's own kernels run)"
    return None


def available(wait: bool = False) -> bool:
    """Whether ``smolcluster::rows_mm`` is loaded in this process, decided once per process.

    Built before: loaded (~10 ms). Not yet: with ``wait``, built here (~40 s: the CLI, the test session, a
    benchmark); without (a stage starting up, whose head has a deadline), a build is started in the background
    for the next run and this process runs torch's kernels, as its startup line says."""
    if "ok" in _state:
        return bool(_state["ok"])
    with _lock:
        if "ok" in _state:
            return bool(_state["ok"])
        why = why_off()
        if why is None:
            try:
                why = _load_or_build(wait)
            except Exception as e:  # a failing compiler, an unwritable cache: torch's kernels serve, one line says so
                first = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                if wait:  # a build failed: remembered, so stages do not start the same failing build again
                    why = (f"build failed ({first[:200]}); install g++, then run python -m "
                           f"smolcluster.pipeline.cpu_kernels (or set SMOLCLUSTER_CPU_KERNELS=0)")
                    try:
                        (build_dir() / _name() / "failed").write_text(why)
                    except OSError:
                        pass
                else:
                    why = f"not loaded ({first[:200]}); python -m smolcluster.pipeline.cpu_kernels says more"
                logger.warning(f"smolcluster's CPU matmul kernel is off: {why}")
        _state.update(ok=why is None, why=why)
        return why is None


def _load_or_build(wait: bool) -> str | None:
    """Load the kernel, or build it (``wait``) or have it built in the background; None once loaded, else why not."""
    import fcntl

    name = _name()
    target = build_dir() / name
    built = target / f"{name}.so"
    try:
        target.mkdir(parents=True, exist_ok=True)
        held = open(target / "build.flock", "w")
    except OSError:
        if not built.exists():
            raise
        # A read-only cache built ahead (an image, a shared install): nothing is built here, so no lock is needed.
        torch.ops.load_library(str(built))
        _register_fake()
        return None
    # One process builds or loads at a time: our own flock, which the OS releases when its holder dies, so a
    # build killed half-way (SIGKILL, the OOM killer) never leaves the next stage waiting forever, as torch's
    # "lock" file (its loader's baton, left behind by a killed build) would. A stage (no ``wait``) waits only
    # while another process loads a built kernel (milliseconds), never through a build.
    with held:
        deadline = time.monotonic() + (BUILD_WAIT_S if wait else LOAD_WAIT_S)
        while True:
            try:
                fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    if not wait:
                        return "being built by another process (this one runs torch's kernels)"
                    raise TimeoutError(f"another process has been building {target} for {BUILD_WAIT_S}s") from None
                if not wait and not built.exists():
                    return "being built by another process (this one runs torch's kernels)"
                time.sleep(0.05)
        (target / "lock").unlink(missing_ok=True)  # torch's baton: every builder holds our flock, so it is stale
        if built.exists():
            # Built before (the name hashes source, flags and torch): load it directly, ~10 ms against the
            # loader's ~200 ms of checks in every stage process. A damaged file is rebuilt.
            try:
                torch.ops.load_library(str(built))
                _register_fake()
                return None
            except OSError as e:
                logger.warning(f"the cached CPU matmul kernel {built} does not load ({e}); building it again")
                built.unlink(missing_ok=True)
        if not wait:
            failed = target / "failed"
            if failed.exists():  # an earlier build failed: no new one until asked for (the CLI, or a fix)
                return failed.read_text()
            # Detached, so it outlives a stage stopped meanwhile; it waits for our flock, released on return. This
            # very code tree (-P and PYTHONPATH: not the working directory's), at the lowest priority and one
            # compiler job, beside a stage warming up on the same cores.
            env = {**os.environ, "MAX_JOBS": "1",
                   "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[2]),
                                                  *filter(None, [os.environ.get("PYTHONPATH")])])}
            nice = ["nice", "-n", "19"] if shutil.which("nice") else []
            with open(target / "build.log", "a") as log:
                subprocess.Popen([*nice, sys.executable, "-P", "-m", "smolcluster.pipeline.cpu_kernels"], env=env,
                                 stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                 start_new_session=True)
            logger.info(f"building smolcluster's CPU matmul kernel in the background (~40 s, once per machine; "
                        f"log {target / 'build.log'}): this process runs torch's kernels, the next ones rows_mm")
            return "being built in the background (this process runs torch's kernels)"
        from torch.utils.cpp_extension import load_inline

        logger.info(f"building smolcluster's CPU matmul kernel for this machine (once, ~40 s with g++) in {target}")
        t0 = time.perf_counter()
        load_inline(name, cpp_sources=[SOURCE], extra_cflags=CFLAGS, extra_ldflags=["-fopenmp"],
                    build_directory=str(target), is_python_module=False, verbose=False)
        (target / "failed").unlink(missing_ok=True)
        logger.info(f"CPU matmul kernel built in {time.perf_counter() - t0:.0f}s")
    _register_fake()
    return None


def _register_fake() -> None:
    # Shapes only, for torch.compile's tracing (the op is one opaque call in a compiled graph).
    @torch.library.register_fake("smolcluster::rows_mm")
    def _(x, w, scale, bias):
        return x.new_empty(x.shape[0], w.shape[0])


def describe() -> str:
    """What the stage's small matmuls run on, in words (its startup line, ``/v1/models``)."""
    return f"smolcluster rows_mm (AVX2, <= {KERNEL_ROWS} rows)" if available() else f"rows_mm {_state['why']}"


def rows_mm(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor | None = None,
            bias: torch.Tensor | None = None) -> torch.Tensor:
    """``(x @ w.T) * scale + bias`` for ``x`` (M, K) in any float type and ``w`` (N, K) in fp32, bf16 or int8;
    fp32 sums, returned in ``x``'s type. Only after :func:`available` said yes."""
    return torch.ops.smolcluster.rows_mm(x, w, scale, bias)


if __name__ == "__main__":
    # Build ahead (CI, an image, a node before its first stage; a stage's background build) and say what this
    # machine gets.
    ok = available(wait=True)
    print(f"{describe()}; cache: {build_dir() / _name()}" if ok else describe())
    sys.exit(0 if ok or why_off() else 1)
