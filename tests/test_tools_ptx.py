"""Every Triton kernel compiled for sm_80 and sm_90 with no GPU, under both ends of the supported Triton range
(pyproject.toml): dsm_fast/tools/ptx.py through ``dsm-fast profile --ptx``, in a subprocess without the CPU
interpreter that conftest.py turns on (an interpreted @triton.jit kernel compiles for no GPU)."""
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("triton")

from dsm_fast.tools.ptx import TARGETS, problems

ROOT = Path(__file__).resolve().parents[1]


def triton_range() -> tuple[str, str]:
    """(lowest supported version, first unsupported one) from pyproject.toml's dev extra: triton>=A,<B."""
    match = re.search(r'"triton>=([\d.]+),<([\d.]+)"', (ROOT / "pyproject.toml").read_text())
    assert match, "pyproject.toml must declare triton>=LOW,<HIGH in its dev extra"
    return match.group(1), match.group(2)


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", text)[:3])


def kernel_names() -> set[str]:
    """Every @triton.jit kernel (named *_kernel; jitted or, here, interpreted: it wraps ``fn``) of dsm_fast.kernels."""
    from dsm_fast.kernels import cosine_attention, dual_score_loss, mp_block, norm_act

    return {name for module in (norm_act, dual_score_loss, cosine_attention, mp_block)
            for name, obj in inspect.getmembers(module)
            if name.endswith("_kernel") and inspect.isfunction(getattr(obj, "fn", None))}


def compile_check(tmp_path: Path, pythonpath: str | None = None) -> dict:
    """``dsm-fast profile --ptx --preset all --largest-only --json`` in a subprocess; its report."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join([pythonpath, *filter(None, [env.get("PYTHONPATH")])])
    out = tmp_path / "ptx.json"
    run = subprocess.run([sys.executable, "-m", "dsm_fast", "profile", "--ptx", "--preset", "all", "--largest-only",
                          "--json", str(out)], env=env, capture_output=True, text=True, timeout=900, check=False)
    assert out.exists(), run.stdout[-3000:] + run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert run.returncode == (1 if report["failures"] else 0), run.stderr[-3000:]
    return report


def assert_every_kernel_passes(report: dict) -> None:
    assert not report["failures"], "\n".join(report["failures"])
    for target in TARGETS:
        rows = [r for r in report["rows"] if r["target"] == target.name]
        assert {r["kernel"] for r in rows} == kernel_names(), f"kernels not compiled for {target.name}"
        assert {"fp32", "bf16", "fp64"} <= {d for r in rows for d in r["dtypes"].split("/")}
        for r in rows:  # the numbers come from the cubin, not a default
            assert 0 < r["registers"] <= target.max_registers_per_thread and r["cubin_bytes"] > 1000, r


def test_problems_name_what_cannot_launch_or_spills():
    sm80, sm90 = TARGETS
    fits = {"registers": 255, "num_warps": 8, "spill_bytes": 0, "stack_bytes": 0, "static_shared": 0,
            "dynamic_shared": 160 * 1024}
    assert problems(fits, sm80, (2**31 - 1, 65535), 12) == []
    assert any("registers" in p for p in problems({**fits, "num_warps": 16}, sm90, (1,), 1))
    assert any("shared" in p for p in problems({**fits, "dynamic_shared": 200 * 1024}, sm80, (1,), 1))
    assert problems({**fits, "dynamic_shared": 200 * 1024}, sm90, (1,), 1) == []
    assert any("grid" in p for p in problems(fits, sm90, (1, 65536), 1))
    assert any("spills" in p for p in problems({**fits, "spill_bytes": 8}, sm90, (1,), 2))
    assert problems({**fits, "spill_bytes": 8}, sm90, (1,), 1) == []  # once per step: reported, not failed
    assert problems({"error": "CompilationError: x"}, sm90, (1,), 1) == ["compile error: CompilationError: x"]


def test_every_kernel_compiles_and_launches_on_sm80_and_sm90(tmp_path):
    """This environment's Triton (the newest supported): the largest configuration the launchers pick of every
    kernel, per argument dtypes (fp32, bf16 autocast, fp64), over every preset's fused step at batch 128 (edm2-s
    for the attention kernels)."""
    import triton

    low, high = triton_range()
    assert version_tuple(low) <= version_tuple(triton.__version__) < version_tuple(high)
    report = compile_check(tmp_path)
    assert report["triton"] == triton.__version__
    assert_every_kernel_passes(report)


def oldest_triton(version: str) -> str:
    """A folder holding only Triton ``version`` (pip --target, no dependencies; cached under ~/.cache/dsm_fast),
    put first on PYTHONPATH to run this environment's torch and dsm_fast with that Triton."""
    cache = Path(os.environ.get("DSM_FAST_CACHE", Path.home() / ".cache" / "dsm_fast"))
    folder = cache / f"triton-{version}"
    if not (folder / "triton" / "__init__.py").exists():
        cache.mkdir(parents=True, exist_ok=True)
        scratch = tempfile.mkdtemp(dir=cache, prefix=f".triton-{version}-")
        pip = subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target", scratch,
                              f"triton=={version}"], capture_output=True, text=True, timeout=600, check=False)
        assert pip.returncode == 0, f"pip could not install triton=={version}:\n{pip.stderr[-2000:]}"
        if folder.exists():  # a concurrent run installed it first
            shutil.rmtree(scratch)
        else:
            os.replace(scratch, folder)
    return str(folder)


def test_the_oldest_supported_triton_compiles_them_too(tmp_path):
    """The lowest Triton of pyproject.toml's range (the GPU machine's), so that an API only newer Tritons have
    cannot reach a GPU user."""
    low, _ = triton_range()
    version = ".".join(map(str, (*version_tuple(low), 0, 0)[:3]))
    report = compile_check(tmp_path, oldest_triton(version))
    assert report["triton"] == version
    assert_every_kernel_passes(report)
