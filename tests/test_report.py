"""SPEC §7 / §7.1: the report — one computation, three renderings, a plot, the baselines.

The real-data cases use the packaged ``timm:quickstart_digits`` (trained on scikit-learn's
digits), converted with ``channel`` and fine-tuned for one epoch; one ``report`` run with
``--compare structured,lowrank,prune,dense --plot`` is shared by the tests that only read
its outputs.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import assert_clean_error, run_cli
from torch import nn

import symconvert
from symconvert.errors import SymconvertError
from symconvert.report.measure import read_metrics
from symconvert.report.options import parse_compare
from symconvert.report.render import compare_sentence, render_markdown, render_text, sections

MODEL = "timm:quickstart_digits"
FT_EPOCHS = "1"


def _source() -> nn.Module:
    """The pretrained source, as the report rebuilds it."""
    return symconvert.create_model(MODEL)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread per xdist worker: two workers x two OpenMP threads on two shared
    cores spin-wait each other, which made a forward pass of this tiny model take a
    second instead of a millisecond."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)

# SPEC §7.1, the keys scripts rely on
SPEC_KEYS = {
    "model": str, "scheme": str,
    "params": {"before": int, "after": int, "saved_fraction": float},
    "bytes": {"symconvert": int, "dense": int},
    "accuracy": {"source": {"top1": float, "top5": float},
                 "converted": {"top1": float, "top5": float},
                 "finetuned": {"top1": float, "top5": float},
                 "split": str, "n": int},
}
LAYER_KEYS = {"name": str, "shape": list, "scheme": str, "params_before": int,
              "params_after": int, "symmetrization_error": float}


def _check_keys(obj: dict, spec: dict, where: str = "") -> None:
    for key, kind in spec.items():
        assert key in obj, f"missing key {where}{key}"
        if isinstance(kind, dict):
            _check_keys(obj[key], kind, f"{where}{key}.")
        else:
            assert isinstance(obj[key], kind) and not isinstance(obj[key], bool), \
                f"{where}{key} = {obj[key]!r} is not {kind.__name__}"


# ------------------------------------------------------------------ the real run


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, one_thread):
    """convert timm:quickstart_digits (channel) → finetune 1 epoch on digits → report
    --format json --plot --compare structured,lowrank,prune,dense; every step through the
    CLI."""
    from symconvert.models.cifar_resnet import QUICKSTART_WEIGHTS

    assert QUICKSTART_WEIGHTS.is_file(), (
        f"{QUICKSTART_WEIGHTS} is missing: the packaged quickstart weights are part of the "
        "package (scripts/train_quickstart_model.py writes them)")
    root = tmp_path_factory.mktemp("report")
    conv, ft = root / "conv", root / "conv" / "finetuned"
    result = run_cli("convert", MODEL, "--scheme", "channel", "--out", conv)
    assert result.code == 0, result
    result = run_cli("finetune", conv, "--data", "digits", "--epochs", FT_EPOCHS,
                     "--device", "cpu", "--lr", "0.05")
    assert result.code == 0, result
    out_json, png = root / "report.json", root / "report.png"
    result = run_cli("report", ft, "--data", "digits", "--format", "json", "--out", out_json,
                     "--plot", png, "--compare", "structured,lowrank,prune,dense", "--device", "cpu",
                     "--latency-runs", "3")
    assert result.code == 0, result
    return {"conv": conv, "ft": ft, "json": out_json, "png": png,
            "report": json.loads(out_json.read_text()), "stderr": result.stderr}


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_json_has_every_spec_key(pipeline):
    report = pipeline["report"]
    _check_keys(report, SPEC_KEYS)
    assert report["model"] == MODEL and report["scheme"] == "channel"
    assert report["kind"] == "finetuned"
    assert report["accuracy"]["split"] == "test" and report["accuracy"]["n"] == 360
    assert report["layers"], "no per-layer rows"
    for entry in report["layers"]:
        _check_keys(entry, LAYER_KEYS, f"layers[{entry.get('name')}].")


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_params_and_bytes_are_the_real_ones(pipeline, tmp_path):
    report, ft = pipeline["report"], pipeline["ft"]
    model = symconvert.load(ft)
    assert report["params"]["after"] == symconvert.count_parameters(model)
    source = symconvert.create_model(MODEL, pretrained=False)
    assert report["params"]["before"] == symconvert.count_parameters(source)
    saved = report["params"]["before"] - report["params"]["after"]
    assert report["params"]["saved_fraction"] == pytest.approx(saved / report["params"]["before"])
    assert 0.3 < report["params"]["saved_fraction"] < 0.5  # channel on square 3x3 convs
    assert report["bytes"]["symconvert"] == (ft / "model.safetensors").stat().st_size
    from symconvert.io.export import export

    dense = export(symconvert.load(ft), "dense", tmp_path / "d.safetensors")
    assert report["bytes"]["dense"] == dense.stat().st_size
    assert report["bytes"]["symconvert"] < report["bytes"]["dense"]
    # the per-layer rows add up to the saving
    assert sum(e["params_before"] - e["params_after"] for e in report["layers"]) == saved


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_accuracy_equals_evaluate(pipeline):
    from symconvert.train.evaluate import evaluate

    acc = pipeline["report"]["accuracy"]
    ft = evaluate(symconvert.load(pipeline["ft"]), "digits", device="cpu")
    assert acc["finetuned"]["top1"] == ft["top1"] and acc["finetuned"]["top5"] == ft["top5"]
    conv = evaluate(symconvert.load(pipeline["conv"]), "digits", device="cpu")
    assert acc["converted"]["top1"] == conv["top1"]
    src = evaluate(_source(), "digits", device="cpu")
    assert acc["source"]["top1"] == src["top1"]
    # a trained model on real data: far above chance (10 %), and fine-tuning helped
    assert src["top1"] > 0.9
    assert acc["finetuned"]["top1"] > acc["converted"]["top1"]


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_symmetrization_error_is_measured_on_the_source_weights(pipeline):
    from symconvert.schemes import get_scheme

    source = _source()
    scheme = get_scheme("channel")
    for entry in pipeline["report"]["layers"]:
        w = source.get_submodule(entry["name"]).weight.detach()
        assert list(w.shape) == entry["shape"]
        expected = float((w - scheme.project(w)).norm() / w.norm())
        assert entry["symmetrization_error"] == pytest.approx(expected, rel=1e-4)
        assert entry["params_before"] == w.numel()
        assert entry["params_after"] == scheme.free_count(tuple(w.shape))


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_flops_latency_and_provenance(pipeline):
    report = pipeline["report"]
    flops = report["flops"]
    # two 3x3 convs of 32->32 on 8x8 alone: 2 * 2*32*32*9*64 FLOPs
    assert flops["source"] > 2 * 2 * 32 * 32 * 9 * 64
    assert flops["folded"] == flops["source"]  # folding restores the dense computation
    lat = report["latency"]
    assert lat["source_ms"] > 0 and lat["folded_ms"] > 0 and lat["runs"] == 3
    prov = report["provenance"]
    assert prov["data"] == "digits" and prov["n"] == 360 and prov["split"] == "test"
    assert prov["device"].startswith("cpu")
    assert prov["versions"]["torch"] == torch.__version__
    assert prov["convert"]["scheme"] == "channel" and prov["convert"]["model"] == MODEL
    assert prov["finetune"]["epochs"] == int(FT_EPOCHS) and prov["finetune"]["data"] == "digits"
    assert Path(prov["parent"]).resolve() == pipeline["conv"].resolve()


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_compare_prune_and_dense_side_by_side(pipeline):
    report = pipeline["report"]
    cmp_ = report["compare"]
    removed = report["params"]["before"] - report["params"]["after"]
    assert cmp_["removed"] == removed
    source = _source()
    assert all(int((p == 0).sum()) == 0 for p in source.parameters() if p.ndim >= 2), \
        "the source has exact zeros: the non-zero count below would not be exact"
    prune, dense = cmp_["prune"], cmp_["dense"]
    # honest counting: every weight is still stored, only the non-zeros are fewer
    assert prune["params_stored"] == report["params"]["before"]
    assert prune["params_nonzero"] == report["params"]["before"] - removed
    # unstructured zeros do not shrink a dense file
    assert prune["bytes"] == report["bytes"]["dense"] > report["bytes"]["symconvert"]
    assert "do not shrink" in prune["note"]
    assert dense["params_nonzero"] == dense["params_stored"] == report["params"]["before"]
    for entry in (prune, dense):
        assert 0.1 < entry["top1"] <= 1.0  # trained and evaluated, not a placeholder
        assert len(entry["curve"]) == int(FT_EPOCHS)  # fine-tuned with the same budget
    assert cmp_["budget"]["epochs"] == int(FT_EPOCHS) and cmp_["budget"]["data"] == "digits"
    sym = cmp_["symmetric"]
    assert sym["top1"] == report["accuracy"]["finetuned"]["top1"]
    assert sym["before_finetune"]["top1"] == report["accuracy"]["converted"]["top1"]
    assert sym["params_nonzero"] == sym["params_stored"] == report["params"]["after"]
    # pruning alone, before training, measured on the same split
    assert 0.0 <= prune["before_finetune"]["top1"] <= 1.0
    assert dense["before_finetune"] == report["accuracy"]["source"]
    # the sentence names the winner and the margin, computed from these numbers
    diff = (cmp_["symmetric"]["top1"] - prune["top1"]) * 100
    winner = "symmetry wins" if diff > 0 else "pruning wins" if diff < 0 else "a tie"
    assert winner in cmp_["summary"]
    if diff:
        assert f"by {abs(diff):.2f} pt" in cmp_["summary"]


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_compare_structured_and_lowrank_at_the_same_budget(pipeline):
    """Issue 21: the peers users pick instead, at the symmetric model's removed-parameter
    count (to within one channel / one rank), fine-tuned alike, with bytes, FLOPs, latency."""
    report = pipeline["report"]
    cmp_ = report["compare"]
    before, removed = report["params"]["before"], cmp_["removed"]
    for kind in ("structured", "lowrank"):
        e = cmp_[kind]
        assert "reason" not in e, e
        assert 0 <= e["difference"] == removed - e["removed"] < e["step"]
        assert e["params_stored"] == e["params_nonzero"] == before - e["removed"]
        # really smaller: the file shrinks with the parameters, the FLOPs with the layers
        assert e["bytes"] < report["bytes"]["dense"]
        assert e["flops"] < report["flops"]["source"]
        assert e["latency_ms"] > 0 and e["latency_vs_source"] > 0
        assert len(e["curve"]) == int(FT_EPOCHS)  # the same fine-tuning budget
        assert 0.1 < e["top1"] <= 1.0 and 0.0 <= e["before_finetune"]["top1"] <= 1.0
    assert cmp_["structured"]["scope"] == "all channels"  # 1x1 projection shortcuts
    assert cmp_["lowrank"]["whitened"] == 0  # the directory was not calibrated
    assert cmp_["symmetric"]["flops"] == report["flops"]["folded"]
    assert "structured pruning reaches" in cmp_["summary"]
    side = _md_sections(render_markdown(report))
    rows = {row[0]: row for row in side[next(t for t in side if t.startswith("side by side"))]}
    for kind in ("structured", "lowrank"):
        assert _int(rows[cmp_[kind]["label"]][-2]) == cmp_[kind]["flops"]


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_table_json_and_markdown_show_the_same_numbers(pipeline):
    report = pipeline["report"]
    md = _md_sections(render_markdown(report))
    table = _table_sections(render_text(report, width=2000))
    assert list(md) == list(table)
    assert md == table  # every cell of every section, formatted identically

    # ... and those cells are the JSON's numbers
    summary = md[next(t for t in md if t.startswith(MODEL))]
    params = {row[0]: row for row in summary}["parameters"]
    assert _int(params[1]) == report["params"]["before"]
    assert _int(params[2]) == report["params"]["after"]
    nbytes = {row[0]: row for row in summary}["bytes on disk"]
    assert _int(nbytes[1]) == report["bytes"]["dense"]
    assert _int(nbytes[2]) == report["bytes"]["symconvert"]
    acc = md[next(t for t in md if t.startswith("accuracy"))]
    for row, key in zip(acc, ("source", "converted", "calibrated", "finetuned"), strict=True):
        if "reason" in report["accuracy"][key]:  # not calibrated: a dash and the reason
            assert row[1] == "—" and "not calibrated" in row[3]
            continue
        assert _pct(row[1]) == pytest.approx(report["accuracy"][key]["top1"] * 100, abs=0.005)
        assert _pct(row[2]) == pytest.approx(report["accuracy"][key]["top5"] * 100, abs=0.005)
    layers = md[next(t for t in md if t.startswith("per layer"))]
    assert len(layers) == len(report["layers"])
    for row, entry in zip(layers, report["layers"], strict=True):
        assert row[0] == entry["name"]
        assert row[1] == "×".join(map(str, entry["shape"]))
        assert (_int(row[3]), _int(row[4])) == (entry["params_before"], entry["params_after"])
        assert float(row[5]) == pytest.approx(entry["symmetrization_error"], abs=5e-5)
    side = md[next(t for t in md if t.startswith("side by side"))]
    by_label = {row[0]: row for row in side}
    prune = report["compare"]["prune"]
    assert _int(by_label[prune["label"]][2]) == prune["params_nonzero"]
    assert _pct(by_label[prune["label"]][4]) == pytest.approx(
        prune["before_finetune"]["top1"] * 100, abs=0.005)
    assert _pct(by_label[prune["label"]][5]) == pytest.approx(prune["top1"] * 100, abs=0.005)
    assert report["compare"]["summary"] in render_markdown(report)


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_plot_is_a_readable_png(pipeline):
    import matplotlib.image

    png = pipeline["png"]
    assert png.is_file()
    pixels = matplotlib.image.imread(png)
    height, width = pixels.shape[:2]
    assert width >= 800 and height >= 600
    grey = pixels[..., :3].mean(axis=2)
    assert grey.std() > 0.05, "the plot is blank"
    assert (grey < 0.5).mean() > 0.01  # dark ink: bars, text
    # more than a few colours: bars of several kinds, not a single fill
    rgb = (pixels[..., :3] * 255).astype(np.int64)
    assert len(np.unique(rgb[..., 0] * 65536 + rgb[..., 1] * 256 + rgb[..., 2])) > 20


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_report_of_a_converted_directory(pipeline):
    """A directory that was not fine-tuned: it is the converted model; the fine-tuned
    entry is absent with a reason."""
    result = run_cli("report", pipeline["conv"], "--data", "digits", "--format", "json",
                     "--device", "cpu", "--latency-runs", "1", "--no-progress")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    assert report["kind"] == "converted"
    acc = report["accuracy"]
    assert acc["converted"]["top1"] == pipeline["report"]["accuracy"]["converted"]["top1"]
    assert "top1" not in acc["finetuned"] and "finetune" in acc["finetuned"]["reason"]
    assert report["layers_from"].endswith("plan.json")


@pytest.mark.slow
@pytest.mark.xdist_group("report")
def test_layers_recomputed_without_plan_json(pipeline, tmp_path):
    """A directory without plan.json (copied without it): the per-layer rows are recomputed
    on the source weights and agree with what convert recorded."""
    import shutil

    from symconvert.report.build import build_report

    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("model.safetensors", "symconvert.json"):
        shutil.copy(pipeline["conv"] / name, bare / name)
    report = build_report(bare, latency_runs=1, device="cpu")
    assert report["layers_from"] == "recomputed on the source weights"
    recorded = {e["name"]: e for e in pipeline["report"]["layers"]}
    assert [e["name"] for e in report["layers"]] == list(recorded)
    for entry in report["layers"]:
        ref = recorded[entry["name"]]
        assert (entry["params_before"], entry["params_after"]) == \
            (ref["params_before"], ref["params_after"])
        assert entry["symmetrization_error"] == pytest.approx(ref["symmetrization_error"],
                                                              rel=1e-4)


# ------------------------------------------------------------------- no --data


@pytest.fixture(scope="module")
def random_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report-nodata") / "conv"
    result = run_cli("convert", "timm:resnet_cifar_tiny", "--scheme", "channel",
                     "--no-pretrained", "--out", out)
    assert result.code == 0, result
    return out


@pytest.mark.xdist_group("report")
def test_without_data_accuracy_is_absent_with_a_reason(random_dir):
    result = run_cli("report", random_dir, "--format", "json", "--latency-runs", "1",
                     "--device", "cpu")
    assert result.code == 0, result
    report = json.loads(result.stdout)
    acc = report["accuracy"]
    assert set(acc) == {"reason"} and "--data" in acc["reason"]
    # never a zero standing in for a measurement
    assert "0.00 %" not in render_markdown(report)
    assert "not measured" in render_markdown(report)
    _check_keys(report, {k: v for k, v in SPEC_KEYS.items() if k != "accuracy"})
    assert report["params"]["after"] == symconvert.count_parameters(symconvert.load(random_dir))
    assert report["bytes"]["symconvert"] == (random_dir / "model.safetensors").stat().st_size
    assert report["curves"]["finetuned"] == []


@pytest.mark.xdist_group("report")
def test_markdown_and_table_on_stdout(random_dir, tmp_path):
    md = run_cli("report", random_dir, "--format", "markdown", "--latency-runs", "1",
                 "--device", "cpu", "--no-progress")
    assert md.code == 0, md
    assert md.stdout.startswith("# symconvert report: timm:resnet_cifar_tiny")
    assert "| parameters |" in md.stdout and "## per layer" in md.stdout
    table = run_cli("report", random_dir, "--latency-runs", "1", "--device", "cpu",
                    "--plot", tmp_path / "p.png")
    assert table.code == 0, table
    assert "per layer" in table.stdout and "┃ quantity" in table.stdout
    assert (tmp_path / "p.png").is_file()  # plot without data or metrics still draws


def test_language_model_is_timed_on_tokens(tmp_path):
    """A model with an embedding gets token ids, not an image, for FLOPs and latency."""
    from symconvert.report.build import build_report

    model = symconvert.create_model("py:symconvert.models.lstm_lm:lstm_lm", pretrained=False,
                                    vocab_size=50, emb=16, hidden=16)
    model, _ = symconvert.convert(model, "block")
    symconvert.save(model, tmp_path / "lm")
    report = build_report(tmp_path / "lm", latency_runs=1, latency_batch=2, device="cpu")
    assert report["flops"]["input"] == [35, 1] and report["flops"]["source"] > 0
    assert report["latency"]["input"] == [35, 2] and report["latency"]["folded_ms"] > 0
    assert report["params"]["after"] < report["params"]["before"]
    # no source weights: the per-layer error is unknown, not zero
    assert all(e["symmetrization_error"] is None for e in report["layers"])
    assert "—" in next(s for s in sections(report) if s.title.startswith("per layer")).rows[0]


@pytest.mark.parametrize(("args", "needles"), [
    (["--compare", "magic", "--data", "digits"], ["--compare 'magic'", "prune, dense"]),
    (["--compare", "prune"], ["needs --data"]),
    (["--format", "xml"], ["--format 'xml'", "table, json, markdown"]),
    (["--plot", "out.jpg"], [".png"]),
    (["--data", "nosuchdata"], ["unknown --data source"]),
])
def test_bad_input_is_a_clean_error(random_dir, args, needles):
    assert_clean_error(run_cli("report", random_dir, *args), *needles)


def test_not_a_model_directory(tmp_path):
    assert_clean_error(run_cli("report", tmp_path), "not a symconvert model directory")


# ------------------------------------------------------------------- the parts


def test_parse_compare():
    assert parse_compare("prune,dense") == ["prune", "dense"]
    assert parse_compare(["dense", "prune,dense"]) == ["dense", "prune"]
    assert parse_compare(None) == []
    with pytest.raises(SymconvertError, match="choose from"):
        parse_compare("prune,sparse")


def test_read_metrics_tolerates_broken_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "train_loss": 0.5}\n\nnot json\n[1, 2]\n'
                    '{"epoch": 2, "eval_top1": 0.9}\n')
    assert read_metrics(path) == [{"epoch": 1, "train_loss": 0.5}, {"epoch": 2, "eval_top1": 0.9}]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_plot_with_partial_metrics(tmp_path):
    """Missing keys in metrics.jsonl and unmeasured accuracy still give a full plot."""
    import matplotlib.image

    from symconvert.report.plot import plot_report

    report = _synthetic_report()
    report["curves"] = {"finetuned": [{"epoch": 1, "train_loss": 1.0}, {"epoch": 2},
                                      {"epoch": 3, "eval_top1": 0.5, "train_loss": 0.4}]}
    path = plot_report(report, tmp_path / "r.png")
    h, w = matplotlib.image.imread(path).shape[:2]
    assert w >= 800 and h >= 600
    with pytest.raises(SymconvertError, match=".png"):
        plot_report(report, tmp_path / "r.pdf")


class _Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3)
        self.fc = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)


def test_prune_removes_exactly_the_smallest_weights():
    from symconvert.report.prune import count_nonzero, make_permanent, prune_global_l1

    torch.manual_seed(0)
    model = _Tiny()
    weights = torch.cat([model.conv.weight.detach().flatten(), model.fc.weight.detach().flatten()])
    before = count_nonzero(model)
    pool = prune_global_l1(model, 37)
    assert pool == weights.numel() == 72 + 12  # conv and fc weights only: no bias, no BN
    assert count_nonzero(model) == before - 37
    threshold = weights.abs().sort().values[36]
    kept = torch.cat([model.conv.weight.flatten(), model.fc.weight.flatten()])
    assert bool((kept[kept != 0].abs() > threshold).all())
    make_permanent(model)
    assert set(model.state_dict()) == set(_Tiny().state_dict())
    assert count_nonzero(model) == before - 37
    with pytest.raises(SymconvertError, match="cannot prune"):
        prune_global_l1(_Tiny(), 10_000)


def test_compare_sentence_names_the_winner():
    cmp_ = {"removed": 1000,
            "symmetric": {"label": "symmetric (channel)", "top1": 0.95, "bytes": 100},
            "prune": {"top1": 0.90, "bytes": 200}, "dense": {"top1": 0.97, "bytes": 200}}
    text = compare_sentence(cmp_)
    assert "symmetry wins by 5.00 pt" in text and "symmetry costs 2.00 pt" in text
    cmp_["prune"]["top1"] = 0.96
    assert "pruning wins by 1.00 pt" in compare_sentence(cmp_)
    cmp_["n"] = 200
    assert "pruning wins by 1.00 pt = 2 of 200 images" in compare_sentence(cmp_)
    cmp_["prune"]["top1"] = 0.95
    assert "(a tie)" in compare_sentence(cmp_)


def test_sections_mark_unmeasured_entries():
    report = _synthetic_report()
    report["accuracy"] = {"source": {"top1": 0.9, "top5": 1.0},
                          "converted": {"reason": "parent gone"},
                          "finetuned": {"top1": 0.8, "top5": 0.99}, "split": "test", "n": 10}
    acc = next(s for s in sections(report) if s.title.startswith("accuracy"))
    assert acc.rows[1][:3] == ["converted, before fine-tuning", "—", "—"]
    assert "parent gone" in acc.rows[1][3]
    assert acc.rows[0][1] == "90.00 %"


# ----------------------------------------------------------------------- helpers


def _synthetic_report() -> dict:
    return {
        "model": "timm:x", "scheme": "channel", "kind": "finetuned", "directory": "/d",
        "params": {"before": 100, "after": 60, "saved": 40, "saved_fraction": 0.4},
        "bytes": {"symconvert": 300, "dense": 500, "saved_fraction": 0.4},
        "flops": {"source": 10, "folded": 10},
        "latency": {"source_ms": 1.0, "folded_ms": 1.0, "converted_ms": 1.1,
                    "folded_vs_source": 1.0, "batch": 2, "runs": 3, "device": "cpu"},
        "accuracy": {"reason": "no --data given"},
        "layers": [{"name": "a", "shape": [4, 4, 3, 3], "scheme": "channel",
                    "params_before": 144, "params_after": 90, "symmetrization_error": 0.3}],
        "layers_from": "plan.json", "curves": {"finetuned": []},
        "provenance": {"data": None, "split": None, "n": None, "device": "cpu",
                       "versions": {"torch": "x"}, "convert": None, "finetune": None,
                       "parent": None},
    }


def _int(cell: str) -> int:
    return int(cell.replace(",", ""))


def _pct(cell: str) -> float:
    assert cell.endswith(" %"), cell
    return float(cell[:-2])


def _md_sections(text: str) -> dict[str, list[list[str]]]:
    """{section title: body rows as cells} of the markdown rendering."""
    out: dict[str, list[list[str]]] = {}
    title = None
    for line in text.splitlines():
        if line.startswith("## "):
            title = line[3:].replace("\\|", "|")
            out[title] = []
        elif title and line.startswith("|") and not re.fullmatch(r"\|[-:|]+\|", line):
            cells = [c.strip().replace("\\|", "|")
                     for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            out[title].append(cells)
    # drop the header row of each table
    return {t: rows[1:] for t, rows in out.items()}


def _table_sections(text: str) -> dict[str, list[list[str]]]:
    """The same from the rich table text (title line, box-drawn table, wide console)."""
    out: dict[str, list[list[str]]] = {}
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith(("┏", "┌")) and i > 0:
            title = lines[i - 1].strip()
            rows = []
            for body in lines[i + 1:]:
                if body.startswith(("└", "╰")):
                    break
                if body.startswith("│"):
                    rows.append([c.strip() for c in body.strip()[1:-1].split("│")])
            out[title] = rows
    return out


def test_helpers_parse_what_they_should():
    """The section parsers used above read a real rendering, not an empty one."""
    report = _synthetic_report()
    md, table = _md_sections(render_markdown(report)), _table_sections(render_text(report, 2000))
    assert len(md) == len(sections(report)) and md == table
    assert md["per layer (1 converted)"][0][:5] == ["a", "4×4×3×3", "channel", "144", "90"]
    assert md["accuracy"][0][:3] == ["source", "—", "—"]
