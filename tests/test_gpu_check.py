"""benchmarks/gpu_check.py --cpu-smoke: every part of the GPU check runs at toy size on the CPU and passes, so the
script cannot rot between the times a GPU is available."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PARTS = ["setup", "train", "resume", "evaluate", "search index", "search query", "torchrun", "step VoP",
         "step VoP[fn,pos]", "step VoP[fn,ctx]", "step VoP[pos,ctx]", "step full", "encode_image", "eval", "compile"]


@pytest.mark.slow
def test_the_cpu_smoke_run_passes_every_part_and_writes_the_table(tmp_path):
    json_path = tmp_path / "table.json"
    completed = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--cpu-smoke", "--out", str(tmp_path),
                                "--json", str(json_path)], cwd=REPO, capture_output=True, text=True, timeout=900)
    table = json.loads(json_path.read_text())
    rows = {row["part"]: row for row in table["rows"]}
    assert [row["part"] for row in table["rows"]] == PARTS
    failed = {part: row.get("note") for part, row in rows.items() if not row["ok"]}
    assert not failed and completed.returncode == 0, (failed, completed.stdout[-4000:])

    # the commands, as a user runs them: stopped by SIGTERM in epoch 2, resumed, evaluated, indexed, queried
    assert rows["train"]["exit"] == 143 and rows["resume"]["exit"] == 0
    for part in ("evaluate", "search index", "search query", "torchrun"):
        assert rows[part]["exit"] == 0
    for part in ("train", "resume", "torchrun"):
        assert rows[part]["loss_finite"] is True and rows[part]["rate"] > 0
        assert rows[part]["peak_rss_mib"] > 0  # the memory hook ran in the command's process
    assert "gloo (world size 1)" in rows["torchrun"]["note"]  # NCCL on a GPU, read from the process itself
    # the speed parts: a rate each, FLOPs counted for every step, the compiled step timed
    for part in PARTS[PARTS.index("step VoP"):]:
        assert rows[part]["rate"] > 0
    assert all(rows[part]["gflop_per_video"] > 0 for part in PARTS if part.startswith("step "))
    assert rows["compile"]["compile_seconds"] > 0 and rows["compile"]["eager_rate"] > 0
    assert table["environment"]["torch"] and table["environment"]["peak_flops"] is None
    # and the table is printed at the end
    assert "| part | ok |" in completed.stdout and "| compile | ok |" in completed.stdout
    assert "ALL OK" in completed.stdout
