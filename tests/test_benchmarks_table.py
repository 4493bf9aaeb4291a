"""benchmarks/gpu_table.py: the table a GPU session records, from the JSON files benchmarks/gpu_check.sh writes."""
import importlib.util
import json
from pathlib import Path

import pytest

TABLE = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_table.py"


@pytest.fixture(scope="module")
def gpu_table():
    spec = importlib.util.spec_from_file_location("gpu_table", TABLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_bench(path: Path, preset: str, rows: dict[str, float]) -> None:
    path.write_text(json.dumps({"config": {"preset": preset}, "rows": [
        {"route": route, "kernels": "triton" if route.startswith("fused") else "torch", "ms_per_step": ms,
         "peak_gib": 4.0, "first_step_s": 1.0} for route, ms in rows.items()]}))


def test_each_network_is_compared_with_its_own_compiled_score_step(tmp_path, gpu_table):
    write_bench(tmp_path / "bench_bf16_compiled.json", "paper", {"score+compile": 10.0, "fused+compile+graph": 15.0})
    write_bench(tmp_path / "bench_bf16_edm2_eager.json", "edm2-s", {"score": 90.0, "fused": 300.0})
    write_bench(tmp_path / "bench_bf16_edm2_compiled.json", "edm2-s", {"score+compile": 60.0})
    lines = gpu_table.table(tmp_path).splitlines()
    row = {tuple(cell.strip() for cell in line.split("|")[1:4]): line.split("|")[8].strip()
           for line in lines if line.startswith(("| paper", "| edm2"))}
    assert row["paper", "bf16", "fused+compile+graph"] == "1.50"
    assert row["edm2-s", "bf16", "fused"] == "5.00" and row["edm2-s", "bf16", "score+compile"] == "1.00"
    assert "1.50× compiled bf16 score ≤ 1.6 met" in lines[-1] and "15.0 ms ≤ 26 met" in lines[-1]
