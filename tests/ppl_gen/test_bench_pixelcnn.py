"""ppl_gen/bench/pixelcnn.py at tiny sizes: it runs, its three steps optimize the same
objective, and every number it prints is finite (no timing is asserted)."""

import json
import math

from ppl_gen.bench import pixelcnn as bench


def test_bench_runs_and_compares_the_same_objective(tmp_path, capsys):
    out = tmp_path / "bench.json"
    code = bench.main(["--batch-size", "4", "--layers", "2", "--channels", "3", "--kernel-size", "3",
                       "--steps", "2", "--rounds", "1", "--samples", "2", "--threads", "1", "--json", str(out)])
    assert code == 0
    r = json.loads(out.read_text())
    loss = r["loss_per_image"]
    # Pyro's -ELBO of the latent-free model is the hand-written summed BCE, at the same weights
    assert abs(loss["runner"] - loss["hand-written torch"]) < 1e-5 * loss["hand-written torch"]
    assert 0 < loss["runner"] < 64 * math.log(2) * 2
    for key in ("seconds_per_step", "images_per_second", "ratio_to_hand_written"):
        assert set(r[key]) == {"hand-written torch", "runner (default)", "runner --jit"}
        assert all(math.isfinite(v) and v > 0 for v in r[key].values()), r[key]
    assert r["ratio_to_hand_written"]["hand-written torch"] == 1.0
    times = r["sampling"]["seconds_per_image"]
    assert len(times) == 3 and all(math.isfinite(t) and t > 0 for t in times.values()), times
    assert "runner (default)" in capsys.readouterr().out
