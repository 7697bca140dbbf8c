"""bench/posttrain_gains.py's bookkeeping, with the model work stubbed out (the benchmark itself takes minutes)."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "posttrain_gains.py"


def test_sampled_pass_rates_are_this_runs_in_a_reused_out_dir(tmp_path, monkeypatch):
    spec = importlib.util.spec_from_file_location("posttrain_gains", BENCH)
    gains = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gains)
    out = tmp_path / "gains"
    (out / "round-1").mkdir(parents=True)
    # a previous run's samples in the reused --out: every prompt failed
    (out / "round-1" / "samples.jsonl").write_text(json.dumps({"scores": [0.0] * 16}) + "\n")
    monkeypatch.setattr(sys, "argv", ["posttrain_gains.py", "--out", str(out), "--png", str(tmp_path / "g.png"),
                                      "--threads", "1", "--train-prompts", "4", "--eval-prompts", "2"])
    monkeypatch.setattr(gains, "success", lambda *args: {"accuracy": 0.5, "ci95": [0.4, 0.6], "correct": 1, "n": 2,
                                                         "per_problem": [True, False], "examples": []})
    monkeypatch.setattr(gains, "plot", lambda *args: None)

    def run_rounds(model, prompts, scorer, out_dir, on_stage, **options):
        this_run = "".join(json.dumps({"scores": [1.0] + [0.0] * 15}) + "\n" for _ in prompts)
        (Path(out_dir) / "round-1" / "samples.jsonl").write_text(this_run)
        on_stage("round 1: SFT", "sft")
        on_stage("round 1: DPO", "dpo")

    monkeypatch.setattr(gains, "run_rounds", run_rounds)
    gains.main()
    sampling = json.loads((out / "results.json").read_text())["sampling"]
    assert sampling == {"k": 16, "pass_at_1": 1 / 16, "pass_at_k": 1.0, "prompts": 4}
