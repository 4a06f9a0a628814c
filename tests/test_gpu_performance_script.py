"""benchmarks/gpu_performance.py runs end to end at a tiny shape on the CPU (its real run needs a GPU)."""

import json

from benchmarks import gpu_performance


def test_gpu_performance_script_runs_at_a_tiny_shape(tmp_path):
    output = tmp_path / "gpu_performance.md"
    assert gpu_performance.main(["--preset", "tiny", "--output", str(output)]) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    (shape,) = report["shapes"]
    assert shape["shape"] == "tiny"
    for value in (shape["scoring"]["micro_k4_ratio"], shape["scoring"]["micro_k10_ratio"],
                  shape["feature_pass"]["ratio"], shape["lora_step"]["ratio"]):
        assert value > 0
    assert "| tiny | 4 x 32 |" in output.read_text()
