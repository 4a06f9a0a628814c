"""The serving soak (benchmarks/performance/serving_soak.py) for a few seconds: 4 clients on 127.0.0.1 mixing good,
malformed, slow, token-less and hung-up requests; no 5xx, no acknowledged feedback lost, every kind answered as due."""

import json

from benchmarks.performance import serving_soak


def test_a_short_soak_gets_no_5xx_and_loses_no_feedback(tmp_path):
    output = tmp_path / "serving_soak.md"
    assert serving_soak.main(["--duration", "6", "--clients", "4", "--output", str(output)]) == 0
    report = json.loads(output.with_suffix(".json").read_text())
    assert report["any_5xx"] == 0 and report["feedback"]["lost"] == 0 and report["feedback"]["acknowledged"] > 0
    assert report["feedback"]["stored"] == report["feedback"]["stored_distinct"]  # every comparison applied once
    for kind in ("get_reward", "score", "feedback", "malformed"):
        assert report["kinds"][kind]["requests"] > 0, kind
    assert {kind: result["errors"] for kind, result in report["kinds"].items() if result["errors"]} == {}
    assert (
        report["server"]["health"]["status"] == "ok" and "Answers of 5xx to good requests: **0**" in output.read_text()
    )
