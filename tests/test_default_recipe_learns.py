"""A learning test: the default recipe, seeded, on CPU, must segment synthetic nuclei.

Everything but the size of the run (network, patches, steps) is the default of `denoiseg train`,
so a change to the defaults or to the training code that stops the network learning fails here.
fp32 and one thread make the run repeatable; the bar sits well below what the run reaches
(see MEASURED) so that harmless numerical changes do not trip it.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from denoiseg_core.checkpoint import load_checkpoint
from denoiseg_core.config import DenoiSegConfig
from denoiseg_core.data import load_folder
from denoiseg_core.evaluation import ScoredImage, evaluate
from denoiseg_core.synthetic import write_synthetic_dataset
from denoiseg_core.training import train

#: the size of the run: everything else is the default recipe
EPOCHS, STEPS = 6, 25
#: test AP@0.5 this run reached when the bar was set (seed 0, fp32, 1 thread, AMD EPYC, torch 2.13):
#: 0.843 with the default recipe (EMA + pseudo-labels + a constant labelled share of 0.75 + intensity jitter +
#: learned loss weights + dropout 0.2 in the U-Net + a denoising finish in the last 2 of the 6 epochs); without
#: dropout 0.826, and then: with the labelled share falling to 0.25 0.809, without the finish 0.826, with alpha
#: 0.5 instead of learned weights 0.843, without the jitter 0.727, with EMA alone 0.753
MEASURED = 0.843
REQUIRED_AP50 = 0.70


@pytest.mark.slow
def test_default_recipe_reaches_the_stated_ap_in_seeded_steps(tmp_path):
    torch.set_num_threads(1)
    folders = write_synthetic_dataset(tmp_path / "data", n_train=16, n_labelled=3, n_val=3, n_test=4, seed=0)
    config = DenoiSegConfig.model_validate(
        {
            "seed": 0,
            "run_dir": str(tmp_path / "run"),
            "data": {"train": str(folders["train"]), "validation": str(folders["val"]), "patch_size": [64, 64]},
            "model": {"backbone": {"name": "unet", "params": {"depth": 2, "first_filters": 16}}},
            "training": {"epochs": EPOCHS, "steps_per_epoch": STEPS, "batch_size": 16, "device": "cpu",
                         "precision": "fp32", "learning_rate": 2e-3},
        }
    )
    # the recipe is the default: the run sets only its size, device and precision
    assert config.training.model_fields_set == {"epochs", "steps_per_epoch", "batch_size", "device", "precision",
                                                "learning_rate"}
    run = train(config, progress=False, log=lambda _: None)
    model = load_checkpoint(run.best_checkpoint)
    records = load_folder(folders["test"], require_masks=True)
    ap50 = evaluate(model, [ScoredImage(r.path.name, r.image, r.labels) for r in records], device="cpu")["ap50"]
    print(f"default recipe, {EPOCHS * STEPS} steps: test AP@0.5 {ap50:.3f}")
    assert np.isfinite(ap50) and ap50 >= REQUIRED_AP50, f"test AP@0.5 {ap50:.3f} < {REQUIRED_AP50} after {EPOCHS * STEPS} steps"
