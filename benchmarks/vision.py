"""Step 3.7 images: views per second through the vision tower (+ projector) and time to first token
with one image.

Tiny (default): a random tiny Step 3.7 checkpoint (tests/checkpoints.py: vision width 32, 2 layers,
112-pixel global views, 56-pixel crops), on the CPU: tower throughput for global views and crops at
batch 1 and 8, and TTFT (one token, greedy, prefix cache off) of a chat prompt with one 200x100 image
(8 crops + the global view: 31 placeholder tokens) next to the same prompt without it.
Real (`--real`): the published tower shape (width 1536, 47 layers, 728-pixel views, 504-pixel crops;
random weights) in bf16 on the given device: global views/s and crops/s. ~11.5 TFLOP per view: a GPU
job (on this 2-core CPU one view takes minutes).

    python benchmarks/vision.py [--threads 1] [--real --device cuda] [--out benchmarks/results/...json]
"""

import argparse
import datetime
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from checkpoints import write_vision_checkpoint  # noqa: E402
from stepflash import LLM, SamplingParams  # noqa: E402
from stepflash.config import VisionConfig  # noqa: E402
from stepflash.model.vision import Step3p7Vision  # noqa: E402
from stepflash.multimodal import IMAGE_TOKEN  # noqa: E402


@torch.inference_mode()
def views_per_second(vision: torch.nn.Module, side: int, batch: int, device: torch.device, dtype: torch.dtype,
                     seconds: float = 2.0) -> float:
    pixels = torch.randn(batch, 3, side, side, device=device, dtype=dtype)
    vision(pixels)  # warm-up
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds or runs < 2:
        vision(pixels)
        runs += 1
    sync()
    return batch * runs / (time.perf_counter() - start)


def tiny(threads: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_vision_checkpoint(Path(tmp) / "tiny-vision")
        llm = LLM(str(ckpt), mtp=0, max_model_len=512, max_num_seqs=1, enable_prefix_caching=False)
        vision, cfg = llm.engine.model.vision, llm.engine.model_config.vision
        tower = {f"{name}_b{batch}": views_per_second(vision, side, batch, torch.device("cpu"), torch.float32)
                 for name, side in (("global", cfg.image_size), ("crop", cfg.crop_size)) for batch in (1, 8)}
        image = torch.randint(0, 256, (3, 100, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        params = SamplingParams(temperature=0.0, max_tokens=1)
        ttft = {}
        for name, text, images in (("text_only", "Describe the picture, please.", []),
                                   ("one_image", f"Describe {IMAGE_TOKEN} the picture, please.", [image])):
            times = []
            for _ in range(5):
                start = time.perf_counter()
                out = llm.generate({"prompt": text, "multi_modal_data": {"image": images}}, params)[0]
                times.append(time.perf_counter() - start)
            ttft[name] = {"prompt_tokens": len(out.prompt_token_ids), "seconds_median": sorted(times)[2]}
    return {"model": "tiny random Step 3.7 (vision width 32, 2 layers)", "device": "cpu", "threads": threads,
            "views_per_second": tower, "ttft": ttft}


def real(device: torch.device) -> dict:
    cfg = VisionConfig(text_hidden_size=4096)
    with torch.device(device):
        vision = Step3p7Vision(cfg).to(torch.bfloat16)
    for p in vision.parameters():
        torch.nn.init.normal_(p, std=0.02)
    out = {"model": "published Step 3.7 tower shape (random weights, bf16)", "device": str(device),
           "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()}
    out["views_per_second"] = {f"{name}_b{batch}": views_per_second(vision, side, batch, device, torch.bfloat16)
                               for name, side in (("global", cfg.image_size), ("crop", cfg.crop_size))
                               for batch in (1, 8)}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--real", action="store_true", help="the published tower shape instead of the tiny checkpoint")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    result = real(torch.device(args.device)) if args.real else tiny(args.threads)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    result.update(date=datetime.date.today().isoformat(), git_commit=commit, torch=torch.__version__)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
