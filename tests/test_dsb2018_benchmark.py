"""The DSB2018 benchmark runs end to end (tiny budget) so it cannot rot.

Always on a synthetic stand-in written to tmp (same layout as the real data); also on a few
real DSB2018 images when the shared data folder is present.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from denoiseg_core.io import write_tiff
from denoiseg_core.synthetic import make_nuclei_image

BENCHMARK = Path(__file__).resolve().parents[1] / "benchmarks" / "dsb2018.py"


def _load_benchmark():
    # imported by name from its folder, so the worker processes of `--jobs` can import it too
    # (spawned children get the parent's sys.path)
    if str(BENCHMARK.parent) not in sys.path:
        sys.path.insert(0, str(BENCHMARK.parent))
    return importlib.import_module(BENCHMARK.stem)


dsb = _load_benchmark()


def _write_fake_dsb(root: Path, n_images: int = 7, shape=(256, 256)) -> list[str]:
    """A DSB2018-like folder: images/<id>.tif uint8, masks/<id>.tif uint16, index.csv."""
    ids = []
    root.mkdir(parents=True, exist_ok=True)
    with (root / "index.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "image_id", "height", "width", "n_labels_in_image"])
        for i in range(n_images):
            clean, _, labels = make_nuclei_image(shape, np.random.default_rng([7, i]), noise_sigma=0)
            image_id = f"fake{i:02d}"
            write_tiff(root / "images" / f"{image_id}.tif", np.clip(clean, 0, 255).astype(np.uint8))
            write_tiff(root / "masks" / f"{image_id}.tif", labels.astype(np.uint16))
            writer.writerow(["train", image_id, *shape, int(labels.max())])
            ids.append(image_id)
    return ids


def _check_outputs(results_dir: Path, expected_recipes: set[str]) -> list[dict]:
    results = json.loads((results_dir / dsb.RESULTS_JSON).read_text())
    runs = results["runs"]
    assert {r["recipe"] for r in runs} == expected_recipes
    for run in runs:
        assert run["command"].startswith("python benchmarks/dsb2018.py run")
        assert run["machine"]["torch"]
        assert np.isfinite(run["psnr"]) and np.isfinite(run["psnr_255"])
        if run["method"] == "n2v":
            assert run["ap50"] is None
        else:
            for name in ("ap50", "map", "seg", "seg_pooled", "validation_ap50_tuned"):
                assert 0.0 <= run[name] <= 1.0, (name, run[name])
            assert run["threshold"] is not None
    table = (results_dir / dsb.RESULTS_TABLE).read_text()
    assert "| tiny | n20 |" in table and "python benchmarks/dsb2018.py run" in table
    assert (results_dir / dsb.RESULTS_PLOT).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return runs


def test_end_to_end_on_synthetic_data(tmp_path):
    data = tmp_path / "dsb"
    ids = _write_fake_dsb(data)
    split_file = tmp_path / "split.json"
    results_dir = tmp_path / "results"
    results_dir.mkdir()
    section = results_dir / dsb.README_SECTION
    section.write_text(f"intro\n{dsb.TABLE_START}\nold table\n{dsb.TABLE_END}\noutro\n")
    common = ["--data", str(data), "--split", str(split_file), "--budget", "tiny", "--noise", "20",
              "--labelled", "3", "--results-dir", str(results_dir), "--threads", "1"]
    # every recipe of the ablation (so none can rot), two at a time in worker processes
    assert dsb.main(["run", "--write-split", *common, "--jobs", "2", "--recipes", *dsb.RECIPES]) == 0
    split = json.loads(split_file.read_text())
    assert sorted(split["train"] + split["val"] + split["test"]) == ids
    runs = _check_outputs(results_dir, set(dsb.RECIPES))
    refreshed = section.read_text()  # the README's table comes from the benchmark's own output
    assert "old table" not in refreshed and "| tiny | n20 | 3 | default" in refreshed
    assert refreshed.startswith("intro\n") and refreshed.endswith("outro\n")
    by_method = {r["recipe"]: r for r in runs}
    by_method["denoiseg"] = by_method["default"]
    # a recipe's levers reach the trainer
    assert by_method["mean_teacher"]["training"]["semi_supervised"]["name"] == "mean_teacher"
    assert by_method["warm_start"]["training"]["warm_start_epochs"] == 1
    assert by_method["paper"]["training"]["labelled_fraction"] is None
    # denoising recipes report the PSNR of best_denoising.pt too
    assert np.isfinite(by_method["default"]["psnr_best_denoising"])
    # the baseline sees only the labelled crops; DenoiSeg all of them, with the same labelled ones
    assert by_method["baseline"]["n_train_crops"] == 3
    assert by_method["denoiseg"]["n_train_crops"] == 4 * len(split["train"])
    assert by_method["denoiseg"]["labelled_crops"] == by_method["baseline"]["labelled_crops"]
    # Sequential segments the same labelled crops (N2V-denoised); its PSNR is its N2V stage's, which
    # at this budget must at least differ from the noisy input's
    assert by_method["sequential"]["n_train_crops"] == 3
    assert by_method["sequential"]["labelled_crops"] == by_method["baseline"]["labelled_crops"]
    assert by_method["sequential"]["psnr"] != by_method["sequential"]["psnr_noisy_input"]
    assert "| tiny | n20 | 3 | sequential |" in refreshed
    # choosing by validation AP picks one of the candidates, and the table marks the choice
    chosen = dsb.main(["choose", "combo_a", "combo_b", "--budget", "tiny", "--labelled", "3",
                       "--results-dir", str(results_dir)])
    assert chosen == 0 and "★" in refreshed

    # the split never changes silently: refused when the data and the split file disagree
    with pytest.raises(dsb.BenchmarkError, match="split disagrees with the data"):
        dsb.load_split(split_file, ids[:-1])
    with pytest.raises(dsb.BenchmarkError, match="never change silently"):
        dsb.main(["run", "--write-split", *common])


def test_noise_and_label_choice_are_reproducible():
    sample = dsb.Sample("abc", np.full((256, 128), 50, np.float32), np.zeros((256, 128), np.int32))
    first, again = dsb.noisy_version(sample, 20, 0), dsb.noisy_version(sample, 20, 0)
    np.testing.assert_array_equal(first, again)
    assert abs(float((first - sample.clean).std()) - 20) < 1.0
    assert not np.array_equal(first, dsb.noisy_version(sample, 20, 1))
    crops = dsb.crop_records([sample], 10, 0)
    assert len(crops) == 2 and crops[0].image.shape == (1, 128, 128)
    chosen, keep = dsb.few_shot(crops, 1, seed=3)
    assert keep == dsb.few_shot(crops, 1, seed=3)[1]
    assert sum(r.labels is not None for r in chosen) == 1


@pytest.mark.skipif(
    not (dsb.DEFAULT_DATA / "index.csv").is_file(), reason=f"real DSB2018 data not at {dsb.DEFAULT_DATA}"
)
def test_end_to_end_on_real_data_subset(tmp_path):
    results_dir = tmp_path / "results"
    argv = ["run", "--budget", "tiny", "--noise", "20", "--labelled", "5", "--limit-images", "2",
            "--recipes", "default", "baseline", "--results-dir", str(results_dir), "--threads", "1"]
    assert dsb.main(argv) == 0  # also checks the committed split against the data on disk
    _check_outputs(results_dir, {"default", "baseline"})


def test_the_validation_choice_compares_recipes_that_ran_the_most_seeds():
    def row(recipe, seeds, val, method="denoiseg"):
        return {"recipe": recipe, "method": method, "budget": "cpu", "noise": 20, "n_labelled": 10,
                "seeds": list(range(seeds)), "validation_ap50_tuned": (val, 0.0)}

    rows = [row("lucky", 1, 0.90), row("steady", 3, 0.70), row("weaker", 3, 0.65), row("baseline", 3, 0.95, "baseline")]
    assert dsb._validation_choice(rows) == {("cpu", 20, 10): "steady"}
    # with one seed each, the best mean wins as before
    assert dsb._validation_choice([row("a", 1, 0.6), row("b", 1, 0.7)]) == {("cpu", 20, 10): "b"}


def test_readme_table_is_the_benchmarks_own_output():
    """The README's results table is exactly what ``report`` makes of the committed results JSON."""
    results = dsb.load_results(dsb.RESULTS_DIR / dsb.RESULTS_JSON)
    assert results["runs"], "no committed DSB2018 results"
    body = dsb.table_body(results)
    for document in (dsb.REPOSITORY / "README.md", dsb.RESULTS_DIR / dsb.README_SECTION):
        text = document.read_text()
        shown = text.split(dsb.TABLE_START, 1)[1].split(dsb.TABLE_END, 1)[0]
        assert shown == "\n" + body, f"{document.name}: table out of date, run `python benchmarks/dsb2018.py report`"


def test_every_recipe_trains_with_its_methods_alpha_unless_it_sets_one(tmp_path):
    # a recipe's settings must not override the method's loss weighting by accident: the baseline and
    # Sequential train segmentation only, N2V denoising only, DenoiSeg recipes at 0.5 unless they say otherwise
    dsb = _load_benchmark()
    for name, recipe in dsb.RECIPES.items():
        spec = dsb.RunSpec("tiny", name, 20.0, 10, 0)
        config = dsb.make_config(spec, dsb.BUDGETS["tiny"], tmp_path / name)
        expected = recipe.training.get("alpha", dsb.METHOD_ALPHA[recipe.method])
        assert config.training.alpha == expected, name
        if recipe.method in ("baseline", "sequential"):
            assert config.training.alpha == 0.0, name
        if recipe.method == "n2v":
            assert config.training.alpha == 1.0, name


def test_a_recipe_with_its_own_network_gets_its_share_of_the_budget(tmp_path):
    dsb = _load_benchmark()
    recipe = dsb.RECIPES["combo_d_jitter_paper_unet"]
    screen = dsb.BUDGETS["screen"]
    budget = recipe.budget(screen)
    assert budget.epochs == round(screen.epochs * recipe.epochs_scale) < screen.epochs
    assert budget.steps_per_epoch == screen.steps_per_epoch and budget.batch_size == screen.batch_size
    assert "halved second convolutions" in budget.description
    config = dsb.make_config(dsb.RunSpec("screen", "combo_d_jitter_paper_unet", 20.0, 10, 0), budget, tmp_path / "run")
    assert config.model.backbone.params == {"depth": 4, "first_filters": 32, "halve_second_conv": True, "dropout": 0.0}
    assert config.training.epochs == budget.epochs
    # `default` keeps the budget as it is
    assert dsb.RECIPES["default"].budget(screen) is screen


@pytest.mark.parametrize("budget", ["cpu", "screen"])
def test_the_default_recipe_is_what_denoiseg_train_does_and_what_the_readme_measured(budget, tmp_path):
    """``default`` overrides nothing but the budget's size, so it is ``denoiseg train``'s recipe; the README's
    figures for the default come from ``combo_f_labelled_constant_dropout``, which must train the same
    network with the same settings. Every other recipe keeps the network the grid ran with (no dropout)."""
    from denoiseg_core.config import validate_components

    def resolved(recipe: str) -> tuple[dict, dict]:
        spec = dsb.RunSpec(budget, recipe, 20.0, 10, 0)
        config = dsb.make_config(spec, dsb.RECIPES[recipe].budget(dsb.BUDGETS[budget]), tmp_path / "run")
        return validate_components(config)["backbone"].model_dump(), config.model_dump(exclude={"model"})

    default_network, default_rest = resolved("default")
    assert default_network["dropout"] == 0.2 and default_network["depth"] == dsb.BUDGETS[budget].backbone["depth"]
    assert resolved("combo_f_labelled_constant_dropout") == (default_network, default_rest)
    assert resolved("combo_f_labelled_constant") == ({**default_network, "dropout": 0.0}, default_rest)
    for recipe in ("baseline", "paper", "sequential", "combo_d_jitter_paper_unet"):
        assert resolved(recipe)[0]["dropout"] == 0.0, recipe


def test_the_readmes_paper_recipe_is_the_benchmarks_paper_recipe(tmp_path):
    """The README says the paper's recipe is one option set away: those ``--set`` options on the defaults
    give every training setting and the network of the benchmark's ``paper`` recipe."""
    import re

    from denoiseg_core.config import load_config, validate_components

    readme = (BENCHMARK.parents[1] / "README.md").read_text()
    sentence = readme[readme.index("The paper's recipe: "):readme.index("(the `paper` recipe of the benchmark")]
    overrides = re.findall(r"--set\s+([\w.]+=\S+?)`?(?=\s|$)", sentence)
    assert len(overrides) >= 8, overrides
    from_readme = load_config(overrides=overrides)
    spec = dsb.RunSpec("cpu", "paper", 20.0, 10, 0)
    benchmark = dsb.make_config(spec, dsb.RECIPES["paper"].budget(dsb.BUDGETS["cpu"]), tmp_path / "run")
    for key in dsb.RECIPES["paper"].training:
        assert getattr(from_readme.training, key) == getattr(benchmark.training, key), key
    assert from_readme.training.alpha == benchmark.training.alpha == 0.5
    assert validate_components(from_readme)["backbone"].dropout == validate_components(benchmark)["backbone"].dropout == 0.0
