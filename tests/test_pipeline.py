"""The pipeline (baseline -> sparsity -> prune -> fine-tune -> report) end to end on tiny
Fashion-MNIST IDX files: stage folders, resume, config checks, multi-pass, presets, report."""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import pytest
import torch

from netslim.checkpoint import load_checkpoint
from netslim.errors import ConfigError, NetslimError
from netslim.padding import nchwc_block
from netslim.pipeline import (PRESET_NOTES, PRESETS, PipelineConfig, list_presets, plan_stages, preset_config,
                              run_pipeline)
from netslim.profile import count
from netslim.report import collect_results, format_flops, format_params, render_table, write_report

try:
    import matplotlib  # noqa: F401
    HAVE_MPL = True
except ImportError:
    HAVE_MPL = False


def tiny(data_dir: Path, **kw) -> PipelineConfig:
    """A vgg-11 at width 0.125, one epoch per stage, on the tiny data."""
    base = dict(dataset="fashion-mnist", arch="vgg", depth=11, arch_options={"width": 0.125}, epochs=1,
                batch_size=64, lr=0.1, s=1e-4, percents=[0.5],
                train_overrides={"seed": 0, "device": "cpu", "test_batch_size": 128, "train_subset": 192},
                data_dir=str(data_dir))
    base.update(kw)
    return PipelineConfig(**base)


LATENCY = 0.01  # seconds per latency figure: the numbers are not the point here


def record(events: list):
    def on_event(ev: dict) -> None:
        if ev["event"] != "step":
            events.append(ev)
    return on_event


@pytest.fixture(scope="module")
def full(data_dir, tmp_path_factory):
    """One finished run with two percents and two passes, shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("runs") / "full"
    events: list = []
    cfg = tiny(data_dir, percents=[0.5, 0.7], passes=2)
    results = run_pipeline(cfg, run, on_event=record(events), latency_seconds=LATENCY)
    return run, cfg, results, events


# --------------------------------------------------------------------------- end to end


def test_every_stage_folder_holds_loadable_checkpoints(full):
    run, cfg, results, _ = full
    keys = [s.key for s in plan_stages(cfg)]
    assert keys == ["baseline", "sparsity", "prune-50", "finetune-50", "prune-70", "finetune-70",
                    "pass2/sparsity", "pass2/prune-50", "pass2/finetune-50"]
    for key in keys:
        folder = run / key
        assert (folder / "done.json").exists(), key
        files = ["pruned.pt", "prune.json"] if "prune-" in key else ["model_best.pt", "checkpoint.pt", "metrics.jsonl"]
        for name in files:
            assert (folder / name).exists(), f"{key}/{name}"
        for pt in folder.glob("*.pt"):
            obj = torch.load(pt, map_location="cpu", weights_only=True)
            assert obj["arch"]["name"] == "vgg" and obj["dataset"]["name"] == "fashion-mnist"
            assert obj["input_size"] == [1, 32, 32]
    assert json.loads((run / "pipeline.json").read_text())["seed"] == 0
    assert results["complete"] is True


def test_results_agree_with_the_checkpoints(full):
    run, _, results, _ = full
    on_disk = json.loads((run / "results.json").read_text())
    assert on_disk["stages"] == results["stages"]
    for row in on_disk["stages"]:
        model, meta = load_checkpoint(run / row["checkpoint"])
        c = count(model, meta["input_size"])
        assert (row["params"], row["macs"], row["flops"]) == (c["params"], c["macs"], c["flops"]), row["key"]
        assert row["flops"] == 2 * row["macs"]
        assert row["top1"] == meta["metrics"]["test_top1"], row["key"]
        assert set(row["latency_ms"]) == {"64", "1"} and all(v > 0 for v in row["latency_ms"].values())
        ort = row["latency_onnxruntime_ms"]  # onnxruntime is installed here
        assert set(ort) == {"64", "1"} and all(v > 0 for v in ort.values())
        if row["kind"] == "train":
            lines = [json.loads(x) for x in (run / row["key"] / "metrics.jsonl").read_text().splitlines()]
            assert row["top1"] == max(r["test_top1"] for r in lines)
            assert row["final_top1"] == lines[-1]["test_top1"]
    by = {r["key"]: r for r in on_disk["stages"]}
    # pruning shrinks, fine-tuning keeps the shape, and the second pass shrinks again
    assert by["prune-50"]["params"] < by["sparsity"]["params"]
    assert by["finetune-50"]["params"] == by["prune-50"]["params"]
    assert by["prune-70"]["params"] < by["prune-50"]["params"]
    assert by["pass2/prune-50"]["params"] < by["finetune-50"]["params"]
    assert by["pass2/sparsity"]["params"] == by["finetune-50"]["params"]
    prune = json.loads((run / "prune-50" / "prune.json").read_text())
    assert by["prune-50"]["channels_kept"] == prune["channels_kept"] == sum(d["kept"] for d in prune["layers"])


def test_markdown_table_in_the_seed_layout(full):
    run, _, results, _ = full
    md = (run / "results.md").read_text()
    table = render_table(results)
    assert table in md
    header = table.splitlines()[0]
    for col in ("Baseline", "Sparsity (1e-4)", "Prune (50%)", "Fine-tune (50%)", "Prune (70%)", "Fine-tune (70%)"):
        assert col in header
    for row in ("Top1 Accuracy (%)", "Parameters", "FLOPs", "CPU latency, batch 64 (ms)", "CPU latency, batch 1 (ms)",
                "onnxruntime latency, batch 64 (ms)", "onnxruntime latency, batch 1 (ms)"):
        assert f"| {row} |" in table
    assert "x in onnxruntime)" in md and "in an onnxruntime CPU session" in md
    by = {r["key"]: r for r in results["stages"]}
    params_line = next(ln for ln in table.splitlines() if ln.startswith("| Parameters"))
    assert format_params(by["prune-50"]["params"]) in params_line
    assert "1 thread(s)" in md and "2 x MACs" in md and "model_best.pt" in md


def test_multi_pass_summary_and_layer_cap(full):
    run, _, results, _ = full
    summary = [e for e in results["summary"] if e["percent"] == 0.5]
    assert [e["pass"] for e in summary] == [1, 2]
    assert summary[1]["params"] < summary[0]["params"]
    assert summary[1]["flops_reduction"] > summary[0]["flops_reduction"] > 0
    # the paper's multi-pass rule: later passes cap every layer at 50% when no cap is set
    assert json.loads((run / "pass2/prune-50/prune.json").read_text())["max_layer_percent"] == 0.5
    assert json.loads((run / "prune-50/prune.json").read_text())["max_layer_percent"] is None
    p2 = json.loads((run / "pass2/prune-50/prune.json").read_text())
    assert all(d["kept"] >= d["total"] - int(d["total"] * 0.5) for d in p2["layers"])
    table = render_table(results)
    assert "Sparsity (1e-4, pass 2)" in table and "| 2 | pass2/finetune-50 |" in table


def test_events_mark_stages_and_pass_fit_progress_through(full):
    _, cfg, _, events = full
    kinds = [(e["event"], e.get("stage")) for e in events]
    assert kinds[0][0] == "pipeline_start" and kinds[-1][0] == "pipeline_end"
    for s in plan_stages(cfg):
        start, end = kinds.index(("stage_start", s.key)), kinds.index(("stage_end", s.key))
        assert start < end
        if s.kind == "train":
            assert start < kinds.index(("epoch", s.key)) < end  # fit's events, tagged with the stage
    assert ("report_start", None) in kinds


@pytest.mark.skipif(not HAVE_MPL, reason="matplotlib not installed")
def test_plots_are_written(full):
    run, _, results, _ = full
    assert results["report"]["plots_skipped"] is None
    for name in ("gamma_hist.png", "kept_channels.png", "accuracy.png"):
        png = run / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(png) in results["report"]["plots"]


def test_report_without_matplotlib_still_writes_md_and_json(full, tmp_path, monkeypatch, caplog):
    run, _, results, _ = full
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    monkeypatch.setattr(logging.getLogger("netslim"), "propagate", True)  # a CLI test may have set it off
    files = write_report(tmp_path, results)
    assert files["plots"] == [] and "matplotlib" in files["plots_skipped"]
    assert "Plots skipped" in (tmp_path / "results.md").read_text()
    assert json.loads((tmp_path / "results.json").read_text())["report"]["plots_skipped"]
    assert "plots skipped" in caplog.text


def test_finished_run_is_not_retrained(full):
    run, cfg, _, _ = full
    mtimes = {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")}
    events: list = []
    results = run_pipeline(cfg, run, on_event=record(events), latency_seconds=LATENCY)
    assert {e["event"] for e in events} == {"pipeline_start", "stage_skip", "report_start", "pipeline_end"}
    assert mtimes == {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")}
    assert results["complete"] and len(results["stages"]) == 9


# --------------------------------------------------------------------------- resume and refusal


class Stop(Exception):
    pass


def test_resume_after_a_stop_in_the_sparsity_stage(data_dir, tmp_path):
    run = tmp_path / "run"
    cfg = tiny(data_dir, epochs={"baseline": 1, "sparsity": 2, "finetune": 1})

    def stop_after_first_sparsity_epoch(ev: dict) -> None:
        if ev["event"] == "epoch" and ev["stage"] == "sparsity":
            raise Stop

    with pytest.raises(Stop):
        run_pipeline(cfg, run, on_event=stop_after_first_sparsity_epoch, latency_seconds=0)
    assert (run / "baseline/done.json").exists() and not (run / "sparsity/done.json").exists()
    assert torch.load(run / "sparsity/checkpoint.pt", weights_only=True)["train_state"]["epoch"] == 1
    assert not (run / "results.json").exists()
    baseline_mtime = (run / "baseline/model_best.pt").stat().st_mtime_ns

    events: list = []
    results = run_pipeline(cfg, run, on_event=record(events), latency_seconds=0)
    by = {(e["event"], e.get("stage")): e for e in events}
    assert ("stage_skip", "baseline") in by and ("stage_start", "baseline") not in by
    assert by[("stage_start", "sparsity")]["resume"] is True
    assert by[("start", "sparsity")]["start_epoch"] == 1  # fit continued, did not restart
    assert [e["epoch"] for e in events if e["event"] == "epoch" and e["stage"] == "sparsity"] == [2]
    assert (run / "baseline/model_best.pt").stat().st_mtime_ns == baseline_mtime
    assert results["complete"] and [r["key"] for r in results["stages"]] == [
        "baseline", "sparsity", "prune-50", "finetune-50"]
    assert len((run / "sparsity/metrics.jsonl").read_text().splitlines()) == 2

    # the same folder with another config is refused, and nothing is touched ...
    with pytest.raises(NetslimError, match="different settings.*s: 0.0001 there, 0.001 now"):
        run_pipeline(dataclasses.replace(cfg, s=1e-3), run, latency_seconds=0)
    assert (run / "baseline/model_best.pt").stat().st_mtime_ns == baseline_mtime
    # ... a change of where the data lives or of the device is not a different config ...
    (tmp_path / "data-link").symlink_to(data_dir)
    moved = dataclasses.replace(cfg, data_dir=str(tmp_path / "data-link"),
                                train_overrides={**cfg.train_overrides, "device": "auto"})
    run_pipeline(moved, run, latency_seconds=0)
    assert (run / "baseline/model_best.pt").stat().st_mtime_ns == baseline_mtime
    # ... and force starts over with the new config
    events = []
    other = dataclasses.replace(cfg, epochs=1, percents=[0.6])
    results = run_pipeline(other, run, on_event=record(events), force=True, latency_seconds=0)
    assert ("stage_start", "baseline") in {(e["event"], e.get("stage")) for e in events}
    assert not (run / "prune-50").exists() and (run / "prune-60/done.json").exists()
    assert json.loads((run / "pipeline.json").read_text())["config"]["percents"] == [0.6]


def test_stage_folders_without_pipeline_file_are_refused(data_dir, tmp_path):
    (tmp_path / "baseline").mkdir()
    with pytest.raises(NetslimError, match="no pipeline.json"):
        run_pipeline(tiny(data_dir), tmp_path, latency_seconds=0)


def test_collect_results_of_an_unfinished_run(data_dir, tmp_path):
    def stop_at_prune(ev: dict) -> None:
        if ev["event"] == "stage_start" and ev["stage"] == "prune-50":
            raise Stop
    with pytest.raises(Stop):
        run_pipeline(tiny(data_dir), tmp_path, on_event=stop_at_prune, latency_seconds=0)
    results = collect_results(tmp_path, latency_seconds=0)
    assert not results["complete"]
    assert [r["done"] for r in results["stages"]] == [True, True, False, False]
    assert "| --- |" in render_table(results)


# --------------------------------------------------------------------------- presets and config


def test_unknown_preset_lists_the_valid_names():
    with pytest.raises(ConfigError) as e:
        preset_config("cifar10-vgg99")
    for name in PRESETS:
        assert name in str(e.value)


def test_presets_are_valid_and_documented():
    assert list_presets()[0] == "quick"
    assert set(PRESET_NOTES) == set(PRESETS)
    for name in PRESETS:
        cfg = preset_config(name)
        assert cfg.percents and cfg.passes == 1
    vgg13 = preset_config("cifar10-vgg13")
    assert (vgg13.depth, vgg13.s, vgg13.batch_size, vgg13.stage_epochs()["finetune"], vgg13.percents) == \
        (13, 1e-4, 512, 99, [0.4])
    assert preset_config("cifar100-vgg19").depth == 19
    best = preset_config("quick-scratch-b")   # the quick model with the recovery that won, seed-exact one flag away
    assert (best.s, best.train_overrides["target_sparsity"], best.retrain, best.percents) == \
        ("auto", 0.7, "scratch-b", [0.7])
    q = preset_config("quick")
    assert (q.dataset, q.arch, q.depth, q.arch_options, q.percents) == (
        "fashion-mnist", "vgg", 13, {"width": 0.25}, [0.5, 0.7])


def test_preset_overrides_win():
    q = preset_config("quick", epochs={"finetune": 9}, batch_size=None, train_overrides={"amp": "off"})
    assert q.stage_epochs() == {"baseline": 6, "sparsity": 6, "finetune": 9}
    assert q.batch_size == 128  # None = keep the preset's
    assert q.train_overrides == {"seed": 0, "amp": "off"}
    assert preset_config("quick", epochs=2).stage_epochs() == {"baseline": 2, "sparsity": 2, "finetune": 2}
    r = preset_config("quick", arch="resnet", depth=20)  # the preset's vgg width does not follow
    assert r.arch_options == {} and r.depth == 20
    with pytest.raises(ConfigError, match="unknown pipeline setting"):
        preset_config("quick", epoch=3)


@pytest.mark.parametrize("change, says", [
    (dict(percents=[50]), "use 0.5 for 50%"),
    (dict(percents=[0.5, 0.5]), "repeat"),
    (dict(epochs={"baseline": 1}), "exactly the keys"),
    (dict(train_overrides={"epochs": 3}), "may not set epochs"),
    (dict(train_overrides={"bogus": 1}), "unknown train override bogus"),
    (dict(arch_options={"depth_mult": 2}), "unknown arch option"),
    (dict(prune_mode="cut"), "slim or mask"),
    (dict(passes=0), "passes"),
    (dict(lr=-1.0), "lr"),
    (dict(retrain="scratch"), "finetune or scratch-b"),
    (dict(recalibrate=-1), "recalibrate"),
    (dict(round_to="fast"), "round_to 'fast' is not valid: use an integer >= 1 or 'auto'"),
    (dict(round_to="auto", runtime="tensorrt"), "runtime 'tensorrt' is not valid"),
])
def test_bad_configs_are_refused_before_any_work(data_dir, tmp_path, change, says):
    with pytest.raises(ConfigError, match=says):
        run_pipeline(tiny(data_dir, **change), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_recovery_options_distill_scratch_b_and_recalibration(data_dir, tmp_path):
    from netslim.retrain import scratch_b_epochs, scratch_model

    run = tmp_path / "run"
    results = run_pipeline(tiny(data_dir, distill=True, retrain="scratch-b", recalibrate=2), run, latency_seconds=0)
    ft = torch.load(run / "finetune-50" / "checkpoint.pt", weights_only=True)["train_state"]["config"]
    assert ft["distill"] == str((run / "sparsity" / "model_best.pt").resolve())
    fresh, meta = scratch_model(run / "prune-50" / "pruned.pt", seed=0)
    assert ft["epochs"] == scratch_b_epochs(fresh, meta, 1)[0] > 1       # the dense budget x the FLOPs ratio
    prune = json.loads((run / "prune-50" / "prune.json").read_text())
    assert prune["recalibration"]["batches"] == 2 and prune["compensation"]["removed_channels"] > 0
    by = {r["key"]: r for r in results["stages"]}
    assert by["prune-50"]["top1_before_recalibration"] == prune["recalibration"]["top1_before"]
    md = (run / "results.md").read_text()
    assert "after BN recalibration on 2 batches" in md and "Scratch-B" in md


def test_round_to_auto_measures_widths_in_the_runtime_given(data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("NETSLIM_CACHE", str(tmp_path / "cache"))
    run_pipeline(tiny(data_dir, round_to="auto", runtime="onnxruntime"), tmp_path / "run", latency_seconds=0)
    report = json.loads((tmp_path / "run" / "prune-50" / "prune.json").read_text())
    assert report["round_to"] == "auto"
    cache = json.loads((tmp_path / "cache" / "widths.json").read_text())
    assert cache and all(f"|onnxruntime|pad{nchwc_block()}|t{torch.get_num_threads()}|b1|" in key for key in cache)


def test_number_formats():
    assert format_params(9_413_066) == "9.41M" and format_params(150_000) == "0.15M"
    assert format_flops(458_532_864) == "0.46G" and format_flops(28_100_000) == "28.1M"


def test_mask_mode_reports_effective_counts(data_dir, tmp_path):
    from netslim.engine.trace import example_input
    from netslim.engine.slim import apply_plan

    results = run_pipeline(tiny(data_dir, prune_mode="mask"), tmp_path, latency_seconds=0)
    by = {r["key"]: r for r in results["stages"]}
    for key in ("prune-50", "finetune-50"):
        model, meta = load_checkpoint(tmp_path / by[key]["checkpoint"])
        assert meta["mode"] == "mask"
        slim = apply_plan(model, meta["mask"], example_input(meta["input_size"]))
        assert by[key]["effective"] and by[key]["params"] == count(slim, meta["input_size"])["params"]
        assert by[key]["stored_params"] == count(model, meta["input_size"])["params"] == by["baseline"]["params"]
    assert by["prune-50"]["params"] < by["baseline"]["params"]
    assert "effective" in (tmp_path / "results.md").read_text()


def test_more_passes_reuse_the_finished_ones(data_dir, tmp_path):
    run = tmp_path / "run"
    run_pipeline(tiny(data_dir), run)
    first = {p: p.stat().st_mtime_ns for p in run.rglob("*.pt")}
    events = []
    results = run_pipeline(tiny(data_dir, passes=2), run, on_event=events.append)
    assert all(p.stat().st_mtime_ns == t for p, t in first.items())  # pass 1 untouched
    started = [e["stage"] for e in events if e["event"] == "stage_start"]
    assert started and all(s.startswith("pass2") for s in started)
    assert (run / "pass2").is_dir() and {r["pass"] for r in results["stages"]} == {1, 2}


def test_the_start_line_names_what_flags_changed_in_the_preset():
    """`pipeline --preset quick --arch resnet-cifar` must not announce the preset's vgg-13."""
    from netslim.cli import _preset_note
    assert _preset_note("quick", preset_config("quick", data_dir="/elsewhere")) == PRESET_NOTES["quick"]
    note = _preset_note("quick", preset_config("quick", arch="resnet-cifar", depth=20))
    assert "vgg-13" not in note and "arch resnet-cifar" in note and "depth 20" in note


def test_no_remove_blocks_reaches_the_prune_stage(data_dir, tmp_path):
    """`pipeline --no-remove-blocks` prunes as `prune --no-remove-blocks` does (dead branches keep
    min-channels per layer), and the resolved config records it."""
    from netslim import cli
    args = cli.build_parser().parse_args(["pipeline", "--no-remove-blocks"])
    assert args.remove_blocks is False
    assert preset_config("quick").remove_blocks is True
    run_pipeline(tiny(data_dir, remove_blocks=False), tmp_path / "run", latency_seconds=0)
    report = json.loads((tmp_path / "run" / "prune-50" / "prune.json").read_text())
    assert report["remove_blocks"] is False
