"""Every Triton kernel variant the wrappers launch at the release's shapes compiles for sm_90 (H100 /
H200), checked on any machine: the interpreter that runs the kernel tests on a CPU compiles nothing
and runs no bf16 (numpy has none), so a bf16-only mistake (an fp32 tile fed to a bf16 tl.dot) or a
construct the GPU backend refuses would first show on a GPU, which few sessions are lent.
tests/sm90_compile.py does it in a process of its own (the kernels must be JIT functions, and
conftest.py turns the interpreter on here)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")


def test_every_kernel_variant_compiles_for_sm90():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, str(root / "tests" / "sm90_compile.py")], capture_output=True, text=True,
                          env={**env, "PYTHONPATH": str(root)}, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    failed = [line for line in lines if line.startswith("FAILED")]
    assert not failed, "\n".join(failed)
    compiled = {line.split()[1] for line in lines if line.startswith("ok ")}
    assert compiled == {"_paged_attention_kernel", "_combine_kernel", "_prefill_kernel", "_rope_kv_kernel",
                        "_add_rmsnorm_kernel", "_fp8_linear_kernel", "_gate_up_kernel", "_down_kernel",
                        "_grouped_gate_up_kernel", "_grouped_down_kernel", "_route_kernel", "_sum_parts_kernel",
                        "_swiglu_kernel"}
    assert any("('GEMV', True)" in line for line in lines) and any("('PER_TILE', True)" in line for line in lines)
    # the one-pair expert kernels read INT4 and FP8 weights 16 bytes a thread (1-byte loads, as the
    # INT4 offsets once compiled to, would leave them far from the memory's bandwidth)
    one_pair = [line for line in lines if line.startswith(("ok _gate_up_kernel", "ok _down_kernel"))
                and ("('INT4', True)" in line or "('FP8', True)" in line)]
    assert {(line.split()[1], "('INT4', True)" in line) for line in one_pair} == {
        (kernel, int4) for kernel in ("_gate_up_kernel", "_down_kernel") for int4 in (True, False)}
    assert all("('GROUPS', 2)" in line for line in one_pair)  # tiles of 2 scale blocks
    assert all("ld.global.v4.b32" in line and ".b8'" not in line and ".u8'" not in line for line in one_pair)
