"""opdiff vs the diffusers example `train_text_to_image_lora_sdxl.py`: seconds per epoch on the same work.

Both train a rank-4 LoRA on to_q, to_k, to_v, to_out.0 of the bundled tiny SDXL, on the same images and captions
(the bundled demo set written as one `metadata.jsonl` folder that both read), at the same resolution, batch size,
learning rate and seed, float32, on this machine's device. The diffusers script is not part of opdiff and is
never committed: give its path (it is in the diffusers repository under examples/text_to_image/).

Seconds per epoch are measured without start-up costs: each tool runs once for `--epochs A` and once for
`--epochs B` (whole processes, wall clock), and per epoch = (T_B - T_A) / (B - A). Start-up (imports, loading,
opdiff's cache fill, the end-of-run sample grid, export, the diffusers script's final reload) cancels out. The
runs are interleaved (diffusers, opdiff, diffusers, opdiff) so machine noise hits both alike, and the whole set
is repeated (`--repeat`), keeping each run's fastest time: a shared machine's noise only ever adds time.

What differs by design: the diffusers script runs the VAE and both text encoders on every step; opdiff encodes
every image and caption once and trains from the cache (`--no-cache-latents` turns that off, and is timed too).

    python bench/vs_diffusers.py --script PATH/train_text_to_image_lora_sdxl.py [--epochs 1,9] [--resolution 64]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # run from a checkout without installing

from pipelines.config import BUNDLED_DATA, BUNDLED_MODEL  # noqa: E402


def write_dataset(folder: Path, images: int | None) -> int:
    """The bundled demo set as an image folder with metadata.jsonl (the layout both tools read); return its size."""
    folder.mkdir(parents=True)
    pngs = sorted(BUNDLED_DATA.glob("*.png"))[:images]
    with open(folder / "metadata.jsonl", "w") as f:
        for png in pngs:
            (folder / png.name).write_bytes(png.read_bytes())
            f.write(json.dumps({"file_name": png.name, "text": png.with_suffix(".txt").read_text().strip()}) + "\n")
    return len(pngs)


def diffusers_command(script: Path, data: Path, out: Path, epochs: int, args: argparse.Namespace) -> list[str]:
    return [sys.executable, str(script), "--pretrained_model_name_or_path", str(BUNDLED_MODEL),
            "--train_data_dir", str(data), "--caption_column", "text", "--resolution", str(args.resolution),
            "--center_crop", "--train_batch_size", "1", "--num_train_epochs", str(epochs), "--learning_rate", "1e-4",
            "--lr_scheduler", "constant", "--lr_warmup_steps", "0", "--rank", "4", "--seed", "0",
            "--output_dir", str(out), "--dataloader_num_workers", "0", "--checkpointing_steps", "1000000",
            "--mixed_precision", "no"]


def opdiff_command(data: Path, out: Path, epochs: int, args: argparse.Namespace, cached: bool) -> list[str]:
    return [sys.executable, "-m", "pipelines.cli", "train", "--data", str(data), "--output-dir", str(out),
            "--method", "lora", "--rank", "4", "--alpha", "4", "--epochs", str(epochs), "--resolution",
            str(args.resolution), "--batch-size", "1", "--lr", "1e-4", "--seed", "0", "--mixed-precision", "no",
            *([] if cached else ["--no-cache-latents"])]


def wall(command: list[str], log: Path) -> float:
    """Seconds the command took; its output goes to `log`, which is shown if it fails."""
    t0 = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run(command, cwd=REPO, stdout=f, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - t0
    if done.returncode:
        sys.exit(f"failed ({done.returncode}): {' '.join(command)}\n{log.read_text()[-3000:]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", type=Path, required=True,
                        help="path to diffusers' examples/text_to_image/train_text_to_image_lora_sdxl.py")
    parser.add_argument("--epochs", default="1,9", help="the two epoch counts A,B (default 1,9)")
    parser.add_argument("--resolution", type=int, default=64, help="training image size (default 64, the bundled "
                        "model's native size)")
    parser.add_argument("--repeat", type=int, default=2, help="run everything this many times, interleaved, and "
                        "keep each run's fastest time (default 2)")
    parser.add_argument("--images", type=int, default=None, help="use the first N demo images (default: all 24)")
    args = parser.parse_args()
    if not args.script.is_file():
        sys.exit(f"--script {args.script}: no such file (it is diffusers' "
                 "examples/text_to_image/train_text_to_image_lora_sdxl.py)")
    a, b = (int(e) for e in args.epochs.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        n = write_dataset(tmp / "data", args.images)
        tools = {
            "diffusers script": lambda e, out: diffusers_command(args.script.resolve(), tmp / "data", out, e, args),
            "opdiff": lambda e, out: opdiff_command(tmp / "data", out, e, args, cached=True),
            "opdiff --no-cache-latents": lambda e, out: opdiff_command(tmp / "data", out, e, args, cached=False),
        }
        seconds: dict[str, dict[int, float]] = {name: {} for name in tools}
        for repeat in range(args.repeat):
            for epochs in (a, b):
                for i, (name, command) in enumerate(tools.items()):
                    out = tmp / f"run-{i}-{epochs}-{repeat}"
                    t = wall(command(epochs, out), tmp / f"log-{i}-{epochs}.txt")
                    seconds[name][epochs] = min(t, seconds[name].get(epochs, t))  # noise only ever adds time
                    print(f"  {name}, {epochs} epochs: {t:.1f} s", flush=True)
    print(f"\nBundled tiny SDXL, {n} demo images, {args.resolution} px, batch 1, lora r=4 on to_q,to_k,to_v,to_out.0,"
          f" fp32; per epoch = (T_{b} - T_{a}) / {b - a}, T the fastest of {args.repeat} runs")
    print(f"{'tool':28} {'T_' + str(a) + ' s':>8} {'T_' + str(b) + ' s':>8} {'s/epoch':>9} {'x faster':>9}")
    reference = (seconds["diffusers script"][b] - seconds["diffusers script"][a]) / (b - a)
    for name, t in seconds.items():
        per_epoch = (t[b] - t[a]) / (b - a)
        print(f"{name:28} {t[a]:8.1f} {t[b]:8.1f} {per_epoch:9.2f} {reference / per_epoch:9.2f}")


if __name__ == "__main__":
    main()
