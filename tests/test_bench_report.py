"""bench/report.py: docs/benchmarks.md is what the recorded tables make, and a new result is recorded with its machine and date."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _report():
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_docs_benchmarks_page_is_generated_from_the_recorded_tables():
    report = _report()
    assert (ROOT / "docs" / "benchmarks.md").read_text() == report.render_docs(), \
        "docs/benchmarks.md is stale: run python bench/report.py --write"


def test_a_new_result_is_recorded_with_its_machine_and_date(tmp_path, monkeypatch):
    report = _report()
    results, recorded = tmp_path / "results", tmp_path / "recorded"
    results.mkdir()
    recorded.mkdir()
    monkeypatch.setattr(report, "RESULTS", results)
    monkeypatch.setattr(report, "RECORDED", recorded)
    rows = [dict(concurrency=c, requests=2 * c, errors=0, agg_tok_s=50.0 * c, speedup_vs_single=float(c),
                 per_stream_tok_s=50.0, ttft_p50_ms=30, ttft_p99_ms=40, itl_p50_ms=12.0, itl_p99_ms=18.0) for c in (1, 16)]
    (results / "serve.json").write_text(json.dumps(dict(model="small", dtype="bfloat16", prompt_len=32, new=64,
                                                        date="2027-01-02", machine="Test CPU (x86_64), 2 cores",
                                                        rows=rows)))
    path = report.record("serve")
    assert path.name == "2027-01-02-serve-test-cpu-x86-64-2-cores.md"
    text = path.read_text()
    assert text.startswith("### Serving, Test CPU (x86_64), 2 cores (`bench/serve.py`, 2027-01-02)")
    assert "| 16 | 32 | 0 | 800.0 | 16.00x |" in text and "PASS: aggregate tok/s at 16 streams" in text
    page = report.render_docs()
    assert text.strip() in page and "(nothing recorded yet: run `python bench/decode.py`)" in page


def test_gguf_table_names_the_files_a_time_limit_left_out():
    report = _report()
    run = dict(llama_cpp_python="0.3.36", threads=2, date="2027-01-02", machine="Test CPU", prompt_len=128,
               new_tokens=128, rounds=3, skipped=["mixtral-moe-1.1b MXFP4_MOE"])
    side = dict(decode_tok_s=30.0, prefill_tok_s=100.0, rss_bytes=700 * 2**20)
    run["rows"] = [dict(model="llama-1.1b", type="Q4_0", file_bytes=607 * 2**20, ember=side, llama_cpp=side,
                        decode_ratio=1.0, prefill_ratio=1.0, rss_ratio=1.0)]
    text = report.gguf_table(run)
    assert "| llama-1.1b | Q4_0 | 607 | 30.00 | 30.00 | 1.00x |" in text
    assert text.endswith("Not run within the run's time limit: mixtral-moe-1.1b MXFP4_MOE.")
    assert "time limit" not in report.gguf_table({**run, "skipped": []})


def test_speculative_table_reads_the_bench_json(tmp_path, monkeypatch):
    """bench/speculative.py's JSON as it writes it: the models' training, the pass cost, a row per comparison."""
    report = _report()
    monkeypatch.setattr(report, "RESULTS", tmp_path)
    rows = [dict(row="draft, held-out prompts (mean of 4)", plain_tok_s=90.0, spec_tok_s=135.0, speedup=1.5,
                 acceptance=0.69, tokens_per_pass=2.31, target=">= 2.0x"),
            dict(row="serve 4 streams, ngram", plain_tok_s=195.0, spec_tok_s=191.1, speedup=0.98, acceptance=None,
                 tokens_per_pass=1.0, target="> 1.0x")]
    (tmp_path / "speculative.json").write_text(json.dumps(dict(
        date="2027-01-02", machine="Test CPU", dtype="fp32", new_tokens=96, k=4,
        pass_cost=dict(step_cpu_s=0.02, pass_cpu_s=0.0274, pass_over_step=1.37),
        target=dict(params=78_662_400, steps=200, last_loss=0.164), draft=dict(params=6_688_128, steps=168,
                                                                                last_loss=0.347), rows=rows)))
    text = report.TABLES["speculative"]()
    assert "target 78.7M parameters (200 steps, loss 0.16)" in text and "5 rows cost 1.37 one-token steps" in text
    assert "| draft, held-out prompts (mean of 4) | 90.0 | 135.0 | 1.50x | 69% | 2.31 | >= 2.0x |" in text
    assert "| serve 4 streams, ngram | 195.0 | 191.1 | 0.98x | - | 1.00 | > 1.0x |" in text
