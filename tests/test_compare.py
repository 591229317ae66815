"""The comparison runner in benchmarks/compare.py, on a tiny model and real MAWPS problems."""

import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _load_compare():
    spec = importlib.util.spec_from_file_location("compare", ROOT / "benchmarks" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compare = _load_compare()


def test_eval_specs_parsed():
    specs = compare.parse_eval_specs("mawps:test:3, svamp:test")
    assert [spec["name"] for spec in specs] == ["mawps", "svamp"]
    assert [spec["limit"] for spec in specs] == [3, None]
    assert specs[0]["key"] == "mawps:test:3"


@pytest.mark.parametrize("text", ["mawps", "mawps:test:0", "mawps:test:x", ":test", ""])
def test_eval_specs_invalid(text):
    with pytest.raises(ValueError, match="--eval"):
        compare.parse_eval_specs(text)


def _entry(method, seed, correct, count=50, lr=1e-3, key="mawps:test:50"):
    return {
        "method": method,
        "seed": seed,
        "lr": lr,
        "eval": {key: {"accuracy": correct / count, "correct": correct, "count": count}},
        "trainable_parameters": 1000,
        "throughput": {"tokens_per_second": 10.0, "peak_memory_bytes": 2**30, "wall_seconds": 60},
        "commands": [f"moslora train --method {method}"],
        "machine": {"processor": "x86_64", "cpu_count": 2, "device": "cpu", "torch": "2"},
        "date": "2026-12-04",
    }


def test_aggregate_mean_and_spread():
    runs = {
        "lora-s1": _entry("lora", 1, 10),
        "lora-s2": _entry("lora", 2, 14),
        "moslora-s1": _entry("moslora", 1, 20),
    }
    rows = {row["method"]: row for row in compare.aggregate(runs)}
    cell = rows["lora"]["accuracy"]["mawps:test:50"]
    assert cell["mean"] == pytest.approx(0.24)
    assert cell["spread"] == pytest.approx(0.04)
    assert cell["seeds"] == [0.2, 0.28]
    assert rows["moslora"]["accuracy"]["mawps:test:50"]["spread"] is None


def test_differences_flag_noise():
    small = {"lora-s1": _entry("lora", 1, 10), "moslora-s1": _entry("moslora", 1, 11)}
    large = {"lora-s1": _entry("lora", 1, 2), "moslora-s1": _entry("moslora", 1, 40)}
    (line,) = compare.differences(compare.aggregate(small), "lora", "moslora")
    assert "within noise" in line
    (line,) = compare.differences(compare.aggregate(large), "lora", "moslora")
    assert "outside noise" in line
    assert "+76.0 points" in line


def test_learning_rates_selected_on_results(tmp_path):
    path = tmp_path / "valid.json"
    valid = "mawps:valid:50"
    runs = {
        "lora-a": _entry("lora", 1, 10, lr=1e-3, key=valid),
        "lora-b": _entry("lora", 1, 12, lr=3e-4, key=valid),
        "moslora-a": _entry("moslora", 1, 12, lr=1e-3, key=valid),
        "moslora-b": _entry("moslora", 1, 12, lr=3e-4, key=valid),
    }
    path.write_text(json.dumps({"runs": runs}))
    chosen = compare.select_learning_rates(path)
    assert chosen["lora"] == 3e-4
    assert chosen["moslora"] == 1e-3  # a tie goes to the larger learning rate
    assert chosen["dora"] == 3e-4
    assert chosen["hyplora"] == 1e-3
    assert chosen["spherical"] == 1e-3


def test_learning_rates_never_from_test(tmp_path):
    path = tmp_path / "test.json"
    path.write_text(json.dumps({"runs": {"lora-a": _entry("lora", 1, 10)}}))
    with pytest.raises(ValueError, match="chosen on the test split"):
        compare.select_learning_rates(path)
    with pytest.raises(FileNotFoundError, match="not found"):
        compare.select_learning_rates(tmp_path / "missing.json")


def test_results_entries_checked(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"runs": {"x": 5}}))
    with pytest.raises(ValueError, match="run 'x': expected a mapping"):
        compare._load_results(path)
    entry = _entry("lora", 1, 10)
    entry["eval"]["mawps:test:50"]["accuracy"] = "x"
    path.write_text(json.dumps({"runs": {"lora-s1": entry}}))
    with pytest.raises(ValueError, match="accuracy, correct and count must be numbers"):
        compare._load_results(path)


def test_folder_reused_only_by_same_command(tmp_path):
    record = tmp_path / "run" / "train-command.json"
    compare._check_command(record, ["python", "-m", "moslora.cli", "train", "--lr", "1e-3"])
    compare._check_command(record, ["/other/python", "-m", "moslora.cli", "train", "--lr", "1e-3"])
    with pytest.raises(RuntimeError, match="was made by another command"):
        compare._check_command(record, ["python", "-m", "moslora.cli", "train", "--lr", "3e-4"])


def test_write_section_replaces_only_its_block(tmp_path):
    doc = tmp_path / "bench.md"
    doc.write_text("# Title\n\nkept text\n")
    compare.write_section(doc, "mawps", "first\n")
    compare.write_section(doc, "mawps", "second\n")
    compare.write_section(doc, "other", "third\n")
    text = doc.read_text()
    assert text.startswith("# Title\n\nkept text\n")
    assert "first" not in text
    assert text.count("<!-- compare:mawps:begin -->") == 1
    assert "second" in text
    assert "third" in text


def test_report_merges_results_files(tmp_path):
    first, second, doc = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bench.md"
    first.write_text(json.dumps({"runs": {"lora-s1": _entry("lora", 1, 10)}}))
    second.write_text(json.dumps({"runs": {"moslora-s1": _entry("moslora", 1, 12)}}))
    args = ["report", "--doc", str(doc), "--results", str(first), str(second)]
    assert compare.main(args) == 0
    text = doc.read_text()
    assert "| lora |" in text
    assert "| moslora |" in text


def test_report_rejects_repeated_run(tmp_path, capsys):
    first, second = tmp_path / "a.json", tmp_path / "b.json"
    for path in (first, second):
        path.write_text(json.dumps({"runs": {"lora-s1": _entry("lora", 1, 10)}}))
    args = ["report", "--doc", str(tmp_path / "x.md"), "--results", str(first), str(second)]
    assert compare.main(args) == 2
    assert "repeats the run(s) lora-s1" in capsys.readouterr().err


def test_results_file_damaged_named(tmp_path):
    path = tmp_path / "results.json"
    path.write_text("{oops")
    with pytest.raises(ValueError, match="results.json is not valid JSON"):
        compare._load_results(path)


@pytest.mark.slow
def test_runner_trains_evaluates_and_reports(tiny_model_dir, tmp_path, data_dir):
    runs, results, doc = tmp_path / "runs", tmp_path / "results.json", tmp_path / "bench.md"
    common = [
        "--model", str(tiny_model_dir), "--runs", str(runs), "--results", str(results),
        "--train-limit", "8", "--eval", "mawps:test:2", "--max-new-tokens", "4",
        "--train-args", "--max-steps 2 --batch-size 4 --max-length 128 --logging-steps 1",
    ]  # fmt: skip
    assert compare.main(["run", "--methods", "base,lora,moslora", "--seeds", "1", *common]) == 0
    data = json.loads(results.read_text())
    assert sorted(data["runs"]) == ["base", "lora-s1", "moslora-s1"]
    for name, entry in data["runs"].items():
        assert entry["eval"]["mawps:test:2"]["count"] == 2
        if name != "base":
            assert entry["trainable_parameters"] > 0
            assert entry["throughput"]["tokens_per_second"] > 0
            assert "--method" in entry["commands"][0]
    assert "hyperbolic" in data["runs"]["moslora-s1"]["curvature_by_kind"]

    # A second call skips the finished runs and adds a new seed.
    adapter = runs / "lora-s1" / "adapter" / "adapter_model.safetensors"
    modified = adapter.stat().st_mtime_ns
    assert compare.main(["run", "--methods", "lora", "--seeds", "1,2", *common]) == 0
    assert adapter.stat().st_mtime_ns == modified
    data = json.loads(results.read_text())
    assert "lora-s2" in data["runs"]

    report = ["report", "--results", str(results), "--doc", str(doc), "--runs", str(runs)]
    assert compare.main([*report, "--figures", "moslora-s1"]) == 0
    text = doc.read_text()
    for method in ("base", "lora", "moslora"):
        assert f"| {method} |" in text
    assert "(n=2)" in text
    assert "MoSLoRA against LoRA" in text
    figures = sorted((tmp_path / "figures").glob("*.png"))
    assert [path.name for path in figures] == [
        "mawps-moslora-s1-curvature.png",
        "mawps-moslora-s1-expert_usage.png",
        "mawps-moslora-s1-loss.png",
    ]


def test_runner_rejects_unknown_method(tmp_path, capsys):
    code = compare.main(["run", "--methods", "qlora", "--results", str(tmp_path / "r.json")])
    assert code == 2
    assert "unknown qlora" in capsys.readouterr().err
