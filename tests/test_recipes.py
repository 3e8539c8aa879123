"""SPEC §8: recipes. Every shipped recipe validates; a bad recipe exits 2 naming the key;
`symconvert run` drives convert → finetune → report into one run directory."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml
from conftest import REPO, assert_clean_error, run_cli

from symconvert.errors import RecipeError, SymconvertError
from symconvert.pipeline.load import (
    find_recipe,
    finetune_settings,
    load_recipe,
    parse_override,
    parse_recipe,
    resolve,
    shipped_recipes,
)

RECIPES = REPO / "recipes"
MINIMAL = {"model": "timm:resnet_cifar_tiny", "scheme": "channel", "data": "digits"}


def write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


# ------------------------------------------------------------------ shipped recipes


def test_the_required_recipes_are_shipped():
    names = {p.stem for p in RECIPES.glob("*.yaml")}
    assert {"quickstart", "wrn-cifar10-channel", "resnet101-imagenet-channel"} <= names


@pytest.mark.parametrize("path", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_recipe_validates(path):
    recipe = load_recipe(path)
    assert recipe.path == path
    assert recipe.description, "a shipped recipe says what it is for"
    # the trainer accepts its finetune settings (FinetuneConfig's own checks run here)
    resolved = resolve(recipe)
    assert resolved["model"]["name"] == recipe.model.name
    assert Path(resolved["out"]) == recipe.run_dir


def test_quickstart_is_offline_cpu_channel_with_distillation():
    recipe = load_recipe("quickstart")
    assert recipe.model.name == "timm:quickstart_digits" and recipe.model.pretrained
    assert recipe.scheme == "channel"
    assert recipe.data.spec == "digits"
    assert recipe.finetune.device == "cpu"
    assert resolve(recipe)["finetune"]["distill"] is True


def test_wrn_recipe_has_the_papers_cifar_setting():
    recipe = load_recipe("wrn-cifar10-channel")
    ft = recipe.finetune
    assert recipe.model.name == "timm:wrn_28_10"
    assert recipe.data.spec.startswith("cifar10:")
    assert (ft.opt, ft.momentum, ft.weight_decay, ft.lr, ft.epochs, ft.batch_size) == (
        "sgd", 0.9, 5e-4, 0.1, 200, 128)
    assert ft.distill is False  # trained from scratch: no teacher


def test_resnet101_recipe_is_imagefolder_on_gpu_with_amp():
    recipe = load_recipe("resnet101-imagenet-channel")
    assert recipe.model.name == "torchvision:resnet101"
    assert recipe.data.spec.startswith("imagefolder:")
    assert recipe.finetune.amp is True and recipe.finetune.device == "auto"


def test_bare_names_resolve_to_shipped_recipes():
    assert find_recipe("quickstart").resolve() == (RECIPES / "quickstart.yaml").resolve()
    assert find_recipe("quickstart.yaml").resolve() == (RECIPES / "quickstart.yaml").resolve()
    assert set(shipped_recipes()) >= {"quickstart", "wrn-cifar10-channel"}
    with pytest.raises(RecipeError, match="Did you mean quickstart"):
        find_recipe("quikstart")


# ----------------------------------------------------------------------- validation


def test_unknown_key_names_it_and_suggests_the_close_one(tmp_path):
    path = write(tmp_path, {**MINIMAL, "finetune": {"epochs": 1, "lrr": 0.1}})
    result = run_cli("run", path, "--dry-run")
    assert_clean_error(result, "finetune.lrr", "unknown key", "Did you mean finetune.lr?")


def test_unknown_top_level_key(tmp_path):
    path = write(tmp_path, {**MINIMAL, "schema": "channel"})
    assert_clean_error(run_cli("run", path), "schema: unknown key", "scheme")


def test_wrong_type_names_the_key_and_the_type(tmp_path):
    path = write(tmp_path, {**MINIMAL, "finetune": {"epochs": "many"}})
    assert_clean_error(run_cli("run", path), "finetune.epochs", "expected an integer",
                       "'many'")


def test_choice_lists_the_allowed_values(tmp_path):
    path = write(tmp_path, {**MINIMAL, "finetune": {"opt": "adam"}})
    assert_clean_error(run_cli("run", path), "finetune.opt", "sgd, adamw",
                       "Did you mean 'adamw'?")


def test_out_of_range_value(tmp_path):
    path = write(tmp_path, {**MINIMAL, "finetune": {"distill_alpha": 1.5}})
    assert_clean_error(run_cli("run", path), "finetune.distill_alpha", "at most 1")


def test_missing_required_key(tmp_path):
    path = write(tmp_path, {"model": "timm:resnet_cifar_tiny", "data": "digits"})
    assert_clean_error(run_cli("run", path), "scheme: missing (required)")


def test_unknown_scheme_model_and_data_source_name_their_keys(tmp_path):
    path = write(tmp_path, {"model": "timm:resnet_cifar_tinyy", "scheme": "chanel",
                            "data": "cifar11:/x"})
    result = run_cli("run", path)
    assert_clean_error(result, "scheme:", "Did you mean channel", "model.name:",
                       "data.spec:", "cifar11")


def test_missing_data_root_exits_2_naming_data_and_the_path(tmp_path):
    root = tmp_path / "no-cifar-here"
    path = write(tmp_path, {**MINIMAL, "model": {"name": "timm:resnet_cifar_tiny",
                                                 "pretrained": False},
                            "data": f"cifar10:{root}", "finetune": {"distill": False},
                            "out": str(tmp_path / "run")})
    result = run_cli("run", path)
    assert_clean_error(result, "data:", str(root), "cifar-10-batches-py")
    assert not (tmp_path / "run").exists()  # failed before writing anything


def test_distillation_without_a_trained_source_is_a_recipe_error():
    with pytest.raises(RecipeError, match="finetune.distill"):
        parse_recipe({**MINIMAL, "model": {"name": MINIMAL["model"], "pretrained": False}})
    recipe = parse_recipe({**MINIMAL, "model": {"name": MINIMAL["model"], "pretrained": False},
                           "finetune": {"distill": False}})
    assert recipe.finetune.distill is False


def test_every_problem_is_reported_at_once():
    with pytest.raises(RecipeError) as info:
        parse_recipe({**MINIMAL, "finetune": {"epochs": 0, "batch_size": "x"},
                      "report": {"formats": ["pdf"]}})
    text = str(info.value)
    for key in ("finetune.epochs", "finetune.batch_size", "report.formats"):
        assert key in text


def test_shorthands_and_lenient_numbers():
    recipe = parse_recipe({**MINIMAL, "finetune": {"lr": "5e-4"},  # PyYAML reads 5e-4 as str
                           "selection": {"layers": "conv", "include": "stages.*"},
                           "data": {"spec": "digits", "input_size": [16, 16]}})
    assert recipe.model.name == "timm:resnet_cifar_tiny"
    assert recipe.finetune.lr == 5e-4
    assert recipe.selection.layers == ["conv"] and recipe.selection.include == ["stages.*"]
    assert recipe.data.input_size == "16,16"


# ------------------------------------------------------------------------- overrides


def test_set_values_are_yaml():
    assert parse_override("finetune.epochs=3") == ("finetune.epochs", 3)
    assert parse_override("model.pretrained=false") == ("model.pretrained", False)
    assert parse_override("report.compare=[prune, dense]") == ("report.compare",
                                                               ["prune", "dense"])
    assert parse_override("data=cifar10:/data/cifar") == ("data", "cifar10:/data/cifar")
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_override("finetune.epochs")


def test_set_overrides_and_keeps_the_rest_of_a_section():
    base = {**MINIMAL, "data": {"spec": "digits", "subsample": 100},
            "finetune": {"epochs": 5, "lr": 0.1}}
    recipe = parse_recipe(base, overrides=["finetune.epochs=2", "data=mnist:/m",
                                           "model.pretrained=false", "finetune.distill=false"])
    assert recipe.finetune.epochs == 2 and recipe.finetune.lr == 0.1
    assert recipe.data.spec == "mnist:/m" and recipe.data.subsample == 100
    assert recipe.model.name == "timm:resnet_cifar_tiny" and recipe.model.pretrained is False


def test_set_with_an_unknown_key_says_it_came_from_set(tmp_path):
    path = write(tmp_path, MINIMAL)
    result = run_cli("run", path, "--set", "finetune.epoch=3", "--dry-run")
    assert_clean_error(result, "finetune.epoch (from --set)", "Did you mean finetune.epochs")


# ------------------------------------------------------------------ trainer coupling


def test_finetune_settings_map_to_the_trainer():
    recipe = parse_recipe({**MINIMAL, "finetune": {"epochs": 3, "opt": "adamw"},
                           "data": {"spec": "digits", "subsample": 50, "input_size": 16}})
    settings = finetune_settings(recipe)
    assert settings == {"epochs": 3, "opt": "adamw", "subsample": 50, "input_size": "16"}
    resolved = resolve(recipe)["finetune"]
    assert resolved["lr"] == 3e-4  # the trainer's adamw default, spelled out


def test_a_new_trainer_option_is_a_recipe_key_and_a_flag_with_its_check():
    """One field on FinetuneConfig is the recipe key (type, help, bounds) and the CLI flag:
    the schema is generated, nothing else changes."""
    import typer.testing

    from symconvert.cli.options import with_options
    from symconvert.options import option
    from symconvert.pipeline.schema import section_model
    from symconvert.train.config import FinetuneConfig

    @dataclasses.dataclass
    class WithSmoothing(FinetuneConfig):
        label_smoothing: float = option(0.0, "Label smoothing of the cross-entropy.",
                                        ge=0.0, lt=1.0)

    section = section_model(WithSmoothing, "S", "doc", unset=True)
    assert section(label_smoothing=0.1).label_smoothing == 0.1
    assert section.model_fields["label_smoothing"].description.startswith("Label smoothing")
    with pytest.raises(Exception, match="less than 1"):
        section(label_smoothing=1.5)
    with pytest.raises(SymconvertError, match=r"--label-smoothing 1.5: must be in \[0, 1\)"):
        WithSmoothing(label_smoothing=1.5)

    seen = {}
    app = typer.Typer()

    @app.command()
    @with_options(WithSmoothing, unset=True)
    def cmd(config: dict = None) -> None:
        seen.update(config)

    result = typer.testing.CliRunner().invoke(app, ["--label-smoothing", "0.2", "--epochs", "3"])
    assert result.exit_code == 0, result.output
    assert seen == {"label_smoothing": 0.2, "epochs": 3}  # only what was given


def test_extra_names_unknown_and_own_keys():
    """finetune.extra (older recipes) passes trainer options through; it names a key the
    section has and an option the trainer lacks."""
    with pytest.raises(RecipeError, match=r"finetune\.extra\.label_smoothing.*no such setting"):
        parse_recipe({**MINIMAL, "finetune": {"extra": {"label_smoothing": 0.1}}})
    with pytest.raises(RecipeError, match="set it as finetune.lr"):
        parse_recipe({**MINIMAL, "finetune": {"extra": {"lr": 0.1}}})


LM_RECIPE = {"model": {"name": "py:symconvert.models.lstm_lm:lstm_lm", "pretrained": False},
             "scheme": "channel", "data": "text:/data/ptb", "selection": {"layers": "rnn"},
             "finetune": {"epochs": 50, "lr": 20, "clip_grad": 0.25, "batch_size": 20,
                          "bptt": 35}}


def test_a_language_model_recipe_goes_to_the_same_trainer_with_its_tasks_defaults():
    """`data: text:ROOT` is fine-tuned by symconvert.train.run.finetune like images; the
    language-model task fills what the recipe leaves out (plain SGD, clip 0.25, batch 20)."""
    recipe = parse_recipe({**LM_RECIPE, "finetune": {"epochs": 50, "distill": False,
                                                     "bptt": 35}})
    assert finetune_settings(recipe) == {"epochs": 50, "distill": False, "bptt": 35}
    resolved = resolve(recipe)["finetune"]
    assert (resolved["lr"], resolved["clip_grad"], resolved["batch_size"],
            resolved["momentum"], resolved["weight_decay"]) == (20.0, 0.25, 20, 0.0, 0.0)
    with pytest.raises(RecipeError, match=r"finetune\.bpt\b.*Did you mean finetune\.bptt"):
        parse_recipe({**LM_RECIPE, "finetune": {"distill": False, "bpt": 35}})
    with pytest.raises(RecipeError, match=r"finetune\.distill"):  # no trained teacher
        parse_recipe({**LM_RECIPE, "finetune": {"epochs": 1}})


@pytest.mark.slow
@pytest.mark.xdist_group("recipes")
def test_run_a_language_model_recipe(tmp_path):
    from symconvert.tasks.lm import load_corpus

    corpus_dir = tmp_path / "corpus"
    corpus_dir.mkdir()
    words = "the cat sat on a mat dog ran in the park".split()
    for name, n in (("train.txt", 200), ("valid.txt", 40), ("test.txt", 40)):
        lines = (" ".join(words[(i + j) % len(words)] for j in range(3 + i % 5)) for i in range(n))
        (corpus_dir / name).write_text("\n".join(lines) + "\n")
    vocab = len(load_corpus(f"text:{corpus_dir}").vocab)
    out = tmp_path / "lm-run"
    path = write(tmp_path, {
        "model": {"name": "py:symconvert.models.lstm_lm:lstm_lm_small", "pretrained": False,
                  "kwargs": {"vocab_size": vocab, "emb": 16, "hidden": 16}},
        "scheme": "channel", "selection": {"layers": "rnn"}, "data": f"text:{corpus_dir}",
        "finetune": {"epochs": 2, "lr": 5, "clip_grad": 0.25, "batch_size": 4,
                     "distill": False, "device": "cpu", "bptt": 10},
        "report": {"latency_runs": 1, "plot": False}, "out": str(out)})
    result = run_cli("run", path, "--no-progress")
    assert result.code == 0, result
    meta = json.loads((out / "finetuned" / "symconvert.json").read_text())
    assert meta["finetune"]["args"]["bptt"] == 10 and meta["finetune"]["args"]["clip_grad"] == 0.25
    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    assert acc["finetuned"]["perplexity"] == pytest.approx(meta["finetune"]["eval"]["perplexity"],
                                                          rel=1e-6)  # fp32 noise
    assert acc["finetuned"]["perplexity"] < acc["converted"]["perplexity"]  # it trained
    assert "reason" in acc["source"]  # random init: no source model to measure
    assert report["params"]["after"] < report["params"]["before"]
    assert {e["name"] for e in report["layers"]} == {"rnn.weight_hh_l0", "rnn.weight_hh_l1"}


# ------------------------------------------------------------------------ dry run / out


def test_dry_run_prints_the_resolved_recipe_and_plan_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    path = write(tmp_path, {**MINIMAL, "model": {"name": "timm:resnet_cifar_tiny",
                                                 "pretrained": False},
                            "finetune": {"distill": False, "epochs": 4}, "out": str(out)})
    result = run_cli("run", path, "--dry-run", "--set", "finetune.lr=0.2")
    assert result.code == 0, result
    resolved_text = result.stdout.split("stages")[0]
    resolved = yaml.safe_load(resolved_text.split("filled in):", 1)[1])
    assert resolved["finetune"]["lr"] == 0.2 and resolved["finetune"]["epochs"] == 4
    assert resolved["finetune"]["opt"] == "sgd"  # a trainer default, spelled out
    import symconvert

    plan = symconvert.inspect(symconvert.create_model("timm:resnet_cifar_tiny", pretrained=False),
                              "channel")
    assert f"{len(plan.converted)} layers converted" in result.flat
    assert f"{plan.total_before:,} → {plan.total_after:,}" in result.flat
    assert "ready to run" in result.flat
    assert not out.exists()


def test_a_second_run_needs_overwrite_or_resume(tmp_path):
    out = tmp_path / "run"
    (out / "converted").mkdir(parents=True)
    (out / "keep.txt").write_text("the user's own file")
    path = write(tmp_path, {**MINIMAL, "out": str(out)})
    assert_clean_error(run_cli("run", path), "out:", "already holds a run", "--overwrite")


def test_resume_with_another_recipe_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    path = write(tmp_path, {**MINIMAL, "out": str(out), "finetune": {"epochs": 2}})
    recipe = load_recipe(path)
    (out / "recipe.yaml").write_text(yaml.safe_dump(resolve(recipe)))
    result = run_cli("run", path, "--resume", "--set", "finetune.epochs=3")
    assert_clean_error(result, "--resume", "differs", "finetune")


def test_listing_the_shipped_recipes():
    result = run_cli("run")
    assert result.code == 0, result
    for name in ("quickstart", "wrn-cifar10-channel", "resnet101-imagenet-channel"):
        assert name in result.stdout


# ------------------------------------------------------------------------ the pipeline


@pytest.mark.slow
@pytest.mark.xdist_group("recipes")
def test_run_quickstart_pipeline_writes_the_run_directory(tmp_path):
    """The quickstart with a one-epoch budget: every stage runs and the run directory holds
    what SPEC §8 and the README promise (the full budget is the `make demo` check)."""
    out = tmp_path / "qs"
    result = run_cli("run", "quickstart", "--no-progress", "--set", f"out={out}",
                     "--set", "finetune.epochs=1", "--set", "report.latency_runs=1")
    assert result.code == 0, result
    for name in ("recipe.yaml", "run.log", "converted/model.safetensors", "converted/plan.json",
                 "finetuned/model.safetensors", "finetuned/metrics.jsonl", "report.json",
                 "report.md", "report.png"):
        assert (out / name).is_file(), name
    resolved = yaml.safe_load((out / "recipe.yaml").read_text())
    assert resolved["finetune"]["epochs"] == 1 and resolved["out"] == str(out)

    report = json.loads((out / "report.json").read_text())
    acc = report["accuracy"]
    for key in ("source", "converted", "finetuned"):
        assert 0.0 <= acc[key]["top1"] <= 1.0, acc
    assert acc["n"] == 360 and acc["split"] == "test"
    assert report["params"]["saved_fraction"] >= 0.35
    assert report["bytes"]["symconvert"] < report["bytes"]["dense"]
    # the source is the packaged classifier: it really classifies digits
    assert acc["source"]["top1"] > 0.9
    log = (out / "run.log").read_text()
    assert "convert:" in log and "finetune: done" in log and "report: wrote" in log
    # the report table is printed at the end
    assert "fine-tuned" in result.stdout and "parameters" in result.stdout

    # a second run into the same directory replaces only the run's own files
    (out / "notes.txt").write_text("mine")
    again = run_cli("run", "quickstart", "--no-progress", "--dry-run", "--set", f"out={out}")
    assert_clean_error(again, "already holds a run")
    assert (out / "notes.txt").read_text() == "mine"


@pytest.mark.slow
@pytest.mark.xdist_group("recipes")
def test_run_under_torchrun_converts_and_reports_once(tmp_path):
    """`torchrun -m symconvert run`: two CPU processes (gloo) fine-tune together; rank 0
    alone converts, writes the log and prints the report."""
    import os
    import subprocess
    import sys

    from conftest import TESTS, WIDTH

    out = tmp_path / "ddp"
    env = {**os.environ, "COLUMNS": str(WIDTH), "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), str(REPO)])}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "symconvert", "run", "quickstart", "--no-progress", "--set", f"out={out}",
         "--set", "finetune.epochs=1", "--set", "data.subsample=256",
         "--set", "finetune.batch_size=32", "--set", "report.latency_runs=1"],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("accuracy on the test split") == 1, proc.stdout
    log = (out / "run.log").read_text()
    assert log.count("convert: ") == 1 and log.count("finetune: done") == 1, log
    report = json.loads((out / "report.json").read_text())
    assert report["accuracy"]["n"] == 256
    meta = json.loads((out / "finetuned" / "symconvert.json").read_text())
    assert meta["finetune"]["args"]["epochs"] == 1
