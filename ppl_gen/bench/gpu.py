"""Every CUDA test and the GPU benchmarks, in one command that fits a short GPU loan:

    python -m ppl_gen.bench gpu [--out runs/bench-gpu] [--budget 480]

1. the CUDA tests: ``pytest -m cuda`` (the tests marked ``cuda``, which skip without a GPU:
   every model file on the device, --data-on-host, the runner's device handling);
2. the VAE's SVI step on CUDA (784-400-20, Fashion-MNIST's shape, batch 128): the runner's
   paths against the hand-written PyTorch step (``python -m ppl_gen.bench vae``), with the epoch
   time (60,000 images, 469 steps) that each step time implies;
3. LDA on CUDA (``python -m ppl_gen.bench lda --device cuda``): Reuters, every scheme against
   scikit-learn's batch VB (on the CPU), and the large sparse corpus (1,000,000 documents x
   10,000 words) with minibatches streamed from host memory to the GPU: documents per second;
4. the other model files' training steps on CUDA: PixelCNN and diffusion at 28 x 28
   (``python -m ppl_gen.bench pixelcnn`` / ``diffusion``), runner against hand-written.

Each part runs in its own process with a share of ``--budget`` seconds (the whole stays
under 8 minutes on one GPU); a part that fails or runs out of time is recorded as such and
the rest still run. Writes ``gpu.json`` and ``gpu.md`` (one table) in ``--out``. Without a
GPU it stops at once: one ``error:`` line, exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
# seconds of --budget per part, as shares (tests, vae, lda, pixelcnn, diffusion)
SHARES = {"tests": 0.30, "vae": 0.10, "lda": 0.40, "pixelcnn": 0.10, "diffusion": 0.10}


def _run(argv: list[str], timeout: float) -> dict:
    env = dict(os.environ, PYTHONPATH=str(ROOT), TQDM_DISABLE="1")
    start = time.perf_counter()
    try:
        p = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True, text=True,
                           timeout=timeout)
        rc, out = p.returncode, p.stdout + p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
    return {"command": "python -m " + " ".join(argv), "returncode": rc, "seconds": round(time.perf_counter() - start, 1),
            "tail": out[-3000:]}


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _rows(result: dict) -> list[tuple[str, str, str]]:
    """(part, what, value) rows of the markdown table."""
    rows = []
    t = result["tests"]
    rows.append(("CUDA tests", t["command"], f"{t.get('summary') or t['returncode']} ({t['seconds']} s)"))
    vae = result.get("vae")
    if vae:
        for k, s in vae["seconds_per_step"].items():
            rows.append(("VAE 784-400-20, batch 128", k, f"{1e3 * s:.2f} ms/step, epoch {469 * s:.1f} s, "
                                                          f"{vae['ratio_to_hand_written'][k]:.2f}x hand-written"))
    lda = result.get("lda")
    if lda:
        for r in lda["rows"]["reuters"]:
            rows.append(("LDA Reuters", r["guide"], f"perplexity {r['test_perplexity']:.0f}, fit {r['seconds']:.2f} s"
                         + ("" if r.get("seconds_to_target") is None else
                            f", within 5% of scikit-learn after {r['seconds_to_target']:.2f} s")))
        large = lda.get("large")
        if large:
            for g, r in large["schemes"].items():
                rows.append((f"LDA {large['documents']:,} x {large['vocabulary']:,} sparse", g,
                             f"{r['documents_per_second']:,.0f} documents/s (batch {large['batch_size']}, "
                             f"corpus {large['corpus_bytes'] / 2**30:.2f} GiB on the host)"))
    for name in ("pixelcnn", "diffusion"):
        r = result.get(name)
        if r and "seconds_per_step" in r:
            for k, s in r["seconds_per_step"].items():
                ratio = r.get("ratio_to_hand_written", {}).get(k)
                rows.append((name, k, f"{1e3 * s:.2f} ms/step" + ("" if ratio is None else f", {ratio:.2f}x")))
    for name, part in result["parts"].items():
        if part["returncode"] != 0:
            rows.append((name, "did not finish", f"return code {part['returncode']} after {part['seconds']} s"))
    return rows


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ppl_gen.bench gpu", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="runs/bench-gpu")
    p.add_argument("--budget", type=float, default=450, help="seconds for all parts together")
    p.add_argument("--skip-tests", action="store_true", help="only the benchmarks")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("error: python -m ppl_gen.bench gpu needs a CUDA GPU, and torch finds none on this machine "
              f"(torch {torch.__version__}, CUDA build: {torch.version.cuda or 'no'}); run it where a GPU is",
              file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    share = {k: v * args.budget for k, v in SHARES.items()}
    parts, result = {}, {"device": torch.cuda.get_device_name(0), "torch": torch.__version__}
    if not args.skip_tests:
        parts["tests"] = _run(["pytest", "-m", "cuda", "-n", "0", "-q", "-p", "no:cacheprovider", "tests"],
                              share["tests"])
        found = re.findall(r"\d+ (?:passed|failed|skipped|error)\w*", parts["tests"]["tail"])
        parts["tests"]["summary"] = ", ".join(found)
    else:
        parts["tests"] = {"command": "(skipped)", "returncode": 0, "seconds": 0, "summary": "skipped"}
    result["tests"] = parts["tests"]
    parts["vae"] = _run(["ppl_gen.bench", "vae", "--device", "cuda", "--steps", "50", "--rounds", "3",
                         "--json", str(out / "vae.json")], share["vae"])
    result["vae"] = _read(out / "vae.json")
    parts["lda"] = _run(["ppl_gen.bench", "lda", "--device", "cuda", "--skip-synthetic", "--skip-adam-variant",
                         "--large-steps", "50", "--out", str(out / "lda")], share["lda"])
    result["lda"] = _read(out / "lda" / "bench.json")
    for name in ("pixelcnn", "diffusion"):
        parts[name] = _run(["ppl_gen.bench", name, "--device", "cuda", "--image-size", "28", "--rounds", "3",
                            "--json", str(out / f"{name}.json")], share[name])
        result[name] = _read(out / f"{name}.json")
    result["parts"] = {k: {kk: vv for kk, vv in v.items() if kk != "tail"} for k, v in parts.items()}
    (out / "gpu.json").write_text(json.dumps({**result, "tails": {k: v["tail"] for k, v in parts.items()
                                                                  if "tail" in v}}, indent=2, default=str) + "\n")
    lines = [f"GPU check on {result['device']} (torch {result['torch']}): `python -m ppl_gen.bench gpu`", "",
             "| part | what | result |", "|---|---|---|"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in _rows(result)]
    (out / "gpu.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(v["returncode"] == 0 for v in parts.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
