"""The few-shot ablation on DSB2018 in one scheduled sweep (many runs at once, e.g. on one GPU).

Three stages, each run as in ``dsb2018.py run`` (same data, split, budgets, recipes, results JSON):

1. **cpu budget, n20, N=10, 3 seeds**: the baselines, Sequential, the paper's recipe, the first port's
   default, single levers and their combinations.
2. As soon as stage 1 is complete, the DenoiSeg recipe with the best mean *validation* AP of stage 1 is
   chosen (never the test figures) and run with the baseline at n0, n40 (N=10) and at N=19, N=38 (n20).
3. **screen budget** (a third of the steps), n20, N=10, 3 seeds: every recipe, to show whether the cheap
   budget ranks recipes as the cpu budget does (stage 1), and the levers that stage 1 leaves out.

Runs are handed out by priority (stage 2 goes first once it exists; stage 3 fills idle workers).
Every finished run is saved at once, so a sweep cut short keeps what it finished.

Usage::

    python benchmarks/ablation.py --jobs 15 --data ../shared/data/dsb2018
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import sys
import tempfile
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import dsb2018 as dsb  # noqa: E402 (the benchmark next to this file)

SEEDS = (0, 1, 2)
#: ``--smoke``: every stage on the tiny budget, one seed, 16 images per split part (tests)
SMOKE = False
STAGE1 = ("baseline", "baseline_ema", "paper", "denoiseg_v1", "ema", "warm_start", "mean_teacher",
          "pseudo_labels", "combo_a", "combo_b", "combo_d", "combo_c", "combo_d_alpha_0.3", "combo_d_weight_decay", "combo_d_jitter", "sequential", "n2v")
#: DenoiSeg recipes of stage 1 that the default can be chosen from
CANDIDATES = ("paper", "denoiseg_v1", "ema", "warm_start", "mean_teacher", "pseudo_labels", "combo_a", "combo_b",
              "combo_d", "combo_c", "combo_d_alpha_0.3", "combo_d_weight_decay", "combo_d_jitter")
#: (noise, labelled crops) of stage 2
STAGE2_SETTINGS = ((0.0, 10), (40.0, 10), (20.0, 19), (20.0, 38))
STAGE3 = ("baseline", "baseline_ema", "paper", "denoiseg_v1", "tuned_ckpt", "ema", "warm_start", "mean_teacher",
          "pseudo_labels", "half_labelled", "alpha_0.3", "weight_decay", "intensity_jitter", "combo_a", "combo_b",
          "combo_d", "combo_c")


def _budget(name: str) -> str:
    return "tiny" if SMOKE else name


def _seeds() -> tuple[int, ...]:
    return SEEDS[:1] if SMOKE else SEEDS


def stage1() -> list[dsb.RunSpec]:
    return [dsb.RunSpec(_budget("cpu"), recipe, 20.0, 10, seed) for recipe in STAGE1 for seed in _seeds()]


def stage2(chosen: str) -> list[dsb.RunSpec]:
    specs = [dsb.RunSpec(_budget("cpu"), recipe, noise, n, seed)
             for noise, n in STAGE2_SETTINGS for seed in _seeds() for recipe in (chosen, "baseline")]
    # pure N2V at the other noise levels: what the chosen recipe's denoising is compared with
    return specs + [dsb.RunSpec(_budget("cpu"), "n2v", noise, 10, 0) for noise in (0.0, 40.0)]


def stage3() -> list[dsb.RunSpec]:
    if SMOKE:
        return []  # the tiny budget stands in for both, so there is nothing else to screen
    return [dsb.RunSpec("screen", recipe, 20.0, 10, seed) for recipe in STAGE3 for seed in SEEDS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=dsb.DEFAULT_DATA)
    parser.add_argument("--results-dir", type=Path, default=dsb.RESULTS_DIR)
    parser.add_argument("--jobs", type=int, default=1, help="runs at once (one torch thread each)")
    parser.add_argument("--plan", action="store_true", help="print how many runs and exit")
    parser.add_argument("--smoke", action="store_true", help="tiny budget, one seed, 16 images per split part")
    args = parser.parse_args(argv)
    global SMOKE
    SMOKE = args.smoke
    command = "python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results_path = args.results_dir / dsb.RESULTS_JSON
    queue = stage1() + stage3()
    stage1_keys = {spec.key() for spec in stage1()}
    if args.plan:
        print(f"{len(queue)} runs before stage 2, {len(stage2('default'))} in stage 2")
        return 0
    ids = dsb.read_index(args.data)
    split = dsb.load_split(dsb.SPLIT_FILE, ids)
    machine = dsb.machine_description()
    done: set[str] = set()
    chosen: str | None = None
    failures = 0
    with tempfile.TemporaryDirectory(prefix="ablation-") as tmp:
        task = (args.data, split, 0, 16 if SMOKE else None, Path(tmp))
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            running = {}
            while queue or running:
                while queue and len(running) < args.jobs:
                    spec = queue.pop(0)
                    running[pool.submit(dsb._run_task, spec, *task, threads=1)] = spec
                finished, _ = wait(running, return_when=FIRST_COMPLETED)
                for future in finished:
                    spec = running.pop(future)
                    done.add(spec.key())
                    try:
                        run = future.result()
                    except Exception as exc:  # noqa: BLE001 (one failed run must not stop the sweep)
                        failures += 1
                        print(f"!! {spec.key()} failed: {type(exc).__name__}: {exc}", flush=True)
                        continue
                    run.update(command=command, machine=machine,
                               finished=datetime.now(timezone.utc).isoformat(timespec="seconds"))
                    dsb.save_results(results_path, dsb.load_results(results_path), [run])
                    print(json.dumps({k: run.get(k) for k in ("key", "ap50", "psnr", "psnr_best_denoising",
                                                               "validation_ap50_tuned", "train_seconds")}), flush=True)
                if chosen is None and stage1_keys <= done:
                    results = dsb.load_results(results_path)
                    chosen, means = dsb.choose_by_validation(results, CANDIDATES, _budget("cpu"), 20.0, 10)
                    print(f"== chosen by validation AP: {chosen} {json.dumps(means)}", flush=True)
                    queue = stage2(chosen) + queue
    dsb.write_report(args.results_dir)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
