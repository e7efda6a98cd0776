"""The CPU matmul kernel (``smolcluster::rows_mm``) against torch's own products, and the stages that use it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from smolcluster.pipeline import cpu_kernels, quantize

pytestmark = pytest.mark.skipif(cpu_kernels.why_off() is not None,
                                reason=f"rows_mm is not built here: {cpu_kernels.why_off()}")


@pytest.fixture(scope="module", autouse=True)
def built():
    assert cpu_kernels.available(wait=True), cpu_kernels.describe()


@pytest.mark.parametrize("wtype", [torch.float32, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows,k,n", [(1, 64, 9), (3, 37, 70), (16, 576, 1030)])
def test_rows_mm_equals_torch_products(wtype, rows, k, n):
    # K off a multiple of 8 (the vector loop's tail), N off a multiple of 4 (the single-channel tail), and N
    # large enough to split across both threads.
    torch.manual_seed(rows * k + n)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # the channels split across two threads (restored below: other tests run after)
    try:
        _check_rows_mm(wtype, rows, k, n)
    finally:
        torch.set_num_threads(threads)


def _check_rows_mm(wtype, rows, k, n):
    x = torch.randn(rows, k)
    w = torch.randint(-127, 128, (n, k), dtype=torch.int8) if wtype == torch.int8 else torch.randn(n, k).to(wtype)
    scale = torch.rand(n) + 0.5 if wtype == torch.int8 else None
    bias = torch.randn(n)
    want = x.double() @ w.double().t()
    want = (want * scale.double() if scale is not None else want) + bias.double()
    got = cpu_kernels.rows_mm(x, w, scale, bias)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    # fp32 sums in another order than the float64 reference: a few ulps of the sum's magnitude
    tol = 1e-5 * (x.abs().double() @ w.double().abs().t()).max().item() * (scale.max().item() if scale is not None else 1)
    assert (got.double() - want).abs().max().item() < tol
    no_bias = cpu_kernels.rows_mm(x, w, scale, None)
    torch.testing.assert_close(no_bias + bias, got, rtol=0, atol=tol)
    # bf16 activations come back in bf16: the fp32 sums rounded once
    got16 = cpu_kernels.rows_mm(x.bfloat16(), w, scale, bias)
    ref16 = cpu_kernels.rows_mm(x.bfloat16().float(), w, scale, bias).bfloat16()
    assert got16.dtype == torch.bfloat16 and torch.equal(got16, ref16)


def test_rows_mm_refuses_mismatched_shapes_by_name():
    with pytest.raises(RuntimeError, match=r"rows_mm: x \(M, K\) and w \(N, K\)"):
        cpu_kernels.rows_mm(torch.randn(2, 8), torch.randn(4, 9))
    with pytest.raises(RuntimeError, match="weights in float32, bfloat16 or int8"):
        cpu_kernels.rows_mm(torch.randn(2, 8), torch.randn(4, 8).half())


def test_rows_mm_inside_a_compiled_graph():
    # The op is one opaque call in an inductor graph (its fake kernel gives the shape); the ops around it fuse.
    w, b = torch.randn(40, 24), torch.randn(40)

    def f(x):
        return torch.relu(cpu_kernels.rows_mm(x * 2, w, None, b)) + 1

    x = torch.randn(3, 24)
    compiled = torch.compile(f, dynamic=False, fullgraph=True)
    torch.testing.assert_close(compiled(x), torch.relu(F.linear(x * 2, w, b)) + 1, rtol=1e-5, atol=1e-5)


def test_float_stage_holds_its_projections_for_the_kernel(tmp_path):
    # GPT-2's Conv1D weights are stored (in, out) and held (out, in): a step's logits equal the reference stage's
    # (MKL's products on the file's layout), prefill (MKL, many rows) and a decode row (the kernel) alike.
    from transformers import GPT2Config, GPT2LMHeadModel

    from smolcluster.pipeline.architectures import KVCache
    from smolcluster.pipeline.weights import load_stage

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=300, n_positions=64)
    GPT2LMHeadModel(cfg).eval().save_pretrained(tmp_path)
    stage = load_stage(tmp_path, json.loads((tmp_path / "config.json").read_text()), range(2), embed=True, head=True)
    kinds = {type(m).__name__ for m in stage.modules()}
    assert "FloatLinear" in kinds and "FloatEmbedding" in kinds and "Conv1D" not in kinds
    hf = GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 250, 11, 8, 64, 1, 2, 3, 4, 5, 6, 7, 8, 9]])  # 19 > KERNEL_ROWS
    with torch.inference_mode():
        cache = KVCache(2)
        prefill = stage.logits(stage.run_blocks(stage.embed(ids[:, :-1], 0), cache))
        step = stage.logits(stage.run_blocks(stage.embed(ids[:, -1:], cache.length), cache))
        want = hf(ids).logits
    torch.testing.assert_close(prefill, want[:, :-1], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(step, want[:, -1:], rtol=1e-4, atol=1e-4)


def test_off_switch_keeps_torch_kernels_and_says_so():
    code = ("from smolcluster.pipeline import quantize as q; f = q.StageFormat(); "
            "print(q.uses_rows_mm(f)); print(q.kernels(f)); print(q.kernels(q.StageFormat('fp32', 'int8')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "SMOLCLUSTER_CPU_KERNELS": "0"}).stdout.splitlines()
    assert out[0] == "False"
    assert out[1].startswith("fp32: MKL sgemm") and "rows_mm" not in out[1]
    assert "_weight_int8pack_mm" in out[2]
    assert quantize.uses_rows_mm(quantize.StageFormat()) and quantize.kernels(quantize.StageFormat()).startswith(
        "fp32: smolcluster rows_mm")


def test_bench_kernels_times_both_sides_and_agrees(tmp_path):
    from smolcluster.bench import kernels

    kernels.main(["--rows", "1,3", "--shapes", "40x24", "--rounds", "1", "--stream-mb", "1", "--out", str(tmp_path)])
    rows = json.loads((tmp_path / "bench-kernels.json").read_text())["rows"]
    assert [(r["format"], r["rows"]) for r in rows] == [(f, m) for f in ("fp32", "bf16", "int8") for m in (1, 3)]
    for r in rows:
        assert r["rows_mm us"] > 0 and r["torch us"] > 0 and r["rows_mm / torch"] > 0
        # the same product: fp32 to rounding; bf16 / int8 sides differ by torch's bf16 activations / output
        assert float(r["max rel diff"]) < (1e-5 if r["format"] == "fp32" else 2e-2), r


def test_a_failed_build_warns_once_and_keeps_torch_kernels(tmp_path):
    # No working compiler (CXX=/bin/false) and no earlier build: one warning naming the fix, then torch's kernels.
    code = ("from smolcluster.pipeline import cpu_kernels as k, quantize as q; f = q.StageFormat(); "
            "k.available(wait=True); print(q.uses_rows_mm(f), q.uses_rows_mm(f)); print(q.kernels(f))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "CXX": "/bin/false", "SMOLCLUSTER_KERNELS_DIR": str(tmp_path)})
    assert got.stdout.splitlines() == ["False False", f"fp32: MKL sgemm ({quantize.cpu_isa()})"]
    assert got.stderr.count("CPU matmul kernel is off: build failed") == 1
    assert "install g++, then run python -m smolcluster.pipeline.cpu_kernels" in got.stderr


def test_an_empty_inner_dimension_gives_the_bias():
    bias = torch.randn(5)
    torch.testing.assert_close(cpu_kernels.rows_mm(torch.randn(2, 0), torch.randn(5, 0), None, bias),
                               bias.expand(2, 5))


def test_a_build_killed_half_way_leaves_no_lock_that_hangs_the_next_stage():
    # torch's loader leaves its "lock" file behind when its process is killed mid-build; the next process must
    # load the kernel at once (our flock died with the killed process), not wait on that file forever.
    target = cpu_kernels.build_dir() / cpu_kernels._name()
    (target / "lock").touch()
    code = "from smolcluster.pipeline import cpu_kernels as k; print(k.available())"
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    assert got.stdout.split() == ["True"] and not (target / "lock").exists()


def test_a_stage_never_waits_for_a_build_and_the_next_run_finds_why(tmp_path):
    # Not built yet: a starting stage runs torch's kernels at once and a detached process builds for the next run;
    # that build fails here (CXX=/bin/false), and the next stage reads why instead of starting another.
    env = {**os.environ, "CXX": "/bin/false", "SMOLCLUSTER_KERNELS_DIR": str(tmp_path)}
    code = "from smolcluster.pipeline import cpu_kernels as k; print(k.available()); print(k.describe())"
    first = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                           check=True).stdout.splitlines()
    assert first == ["False", "rows_mm being built in the background (this process runs torch's kernels)"]
    failed = tmp_path / cpu_kernels._name() / "failed"
    deadline = time.monotonic() + 60
    while not failed.exists():  # the background build's end (a state, not a duration)
        assert time.monotonic() < deadline, (tmp_path / cpu_kernels._name() / "build.log").read_text()
        time.sleep(0.2)
    second = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env,
                            check=True)
    assert second.stdout.splitlines()[0] == "False" and "install g++" in second.stdout
    assert "in the background" not in second.stderr


def test_an_unusable_cache_folder_is_a_warning_not_a_crash():
    # /proc refuses new folders: the stage loads its format with torch's kernels and one line says why.
    code = ("from smolcluster.pipeline import quantize as q; f = q.StageFormat(); "
            "print(q.uses_rows_mm(f)); print(q.kernels(f))")
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={**os.environ, "SMOLCLUSTER_KERNELS_DIR": "/proc/smolcluster-kernels"})
    assert got.stdout.splitlines()[0] == "False" and got.stdout.splitlines()[1].startswith("fp32: MKL sgemm")
    assert "CPU matmul kernel is off: not loaded" in got.stderr
