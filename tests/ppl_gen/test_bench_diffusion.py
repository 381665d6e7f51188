"""ppl_gen/bench/diffusion.py at tiny sizes: the runner's step and the hand-written one compute
the same loss at the same draws, and every number it reports is finite (no timing asserted)."""

import math

from ppl_gen.bench import diffusion as bench_diffusion


def test_bench_runs_and_both_paths_compute_the_same_loss(capsys):
    r = bench_diffusion.bench_diffusion(image_size=8, batch_size=8, channels=8, T=6, steps=1, rounds=1,
                                        sample_images=2)
    assert math.isfinite(r["loss_runner"]) and r["loss_runner"] > 0
    assert abs(r["loss_runner"] - r["loss_hand_written"]) <= 1e-5 * abs(r["loss_hand_written"])
    assert set(r["seconds_per_step"]) == {"hand-written torch", "runner (meanfield)"}
    assert all(math.isfinite(v) and v > 0 for v in r["ratio_to_hand_written"].values())
    assert math.isfinite(r["sample_seconds"])
    assert bench_diffusion.main(["--image-size", "8", "--batch-size", "4", "--channels", "8", "--T", "3",
                                 "--steps", "1", "--rounds", "1", "--sample-images", "1"]) == 0
    assert "ratio" in capsys.readouterr().out
