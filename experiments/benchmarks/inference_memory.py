"""Peak memory (RSS) of predicting one large photo: labels band by band vs at full size.

"before" is the path eval and predict took until #16: the photo normalized at full size,
every view's probabilities interpolated to ``C x H x W``, averaged, then the argmax
(``segnest.inference.strategies.infer``, which ``Predictor(output="probs")`` still uses).
"after" is :func:`segnest.inference.strategies.segment`: views at their working
resolution, labels made a band of rows at a time, no full-resolution float image.

Each case runs in a fresh subprocess and reports its peak resident set size (``VmHWM``
from /proc/self/status) and the resident size just before inference (model built and
photo in memory). The model is a DeepLabV3-ResNeSt-50 with random weights and BN folded
(memory does not depend on the weights); the photo is random uint8 RGB; whole-image
inference at base size 520 (the ADE20K preset). A "before" case whose full-resolution
probabilities would not fit in the memory available now is skipped and says so.

Run: python experiments/benchmarks/inference_memory.py [--cases 4k-150-before,...]
     (all cases: a few minutes on 2 CPU cores; --list names them)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

# name -> (side, classes, path, scales, flip)
CASES = {
    "4k-150-before": (4000, 150, "before", (1.0,), False),
    "4k-150-after": (4000, 150, "after", (1.0,), False),
    "8k-150-before": (8000, 150, "before", (1.0,), False),
    "8k-150-after": (8000, 150, "after", (1.0,), False),
    "8k-8-before": (8000, 8, "before", (1.0,), False),
    "8k-8-after": (8000, 8, "after", (1.0,), False),
    "4k-150-msflip-after": (4000, 150, "after", (0.5, 0.75, 1.0, 1.25, 1.5, 1.75), True),
}
BASE_SIZE = 520
MODEL = "deeplabv3_resnest50"


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _available_bytes() -> int:
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def run_case(name: str) -> dict:
    """One case, in this process."""
    import numpy as np
    import torch

    from segnest.data.transforms import MEAN, STD, to_normalized_tensors
    from segnest.inference.settings import InferenceSettings
    from segnest.inference.strategies import infer, inference_model, segment
    from segnest.models import create_model

    side, classes, path, scales, flip = CASES[name]
    torch.manual_seed(0)
    model = inference_model(create_model(MODEL, num_classes=classes))
    photo = np.random.default_rng(0).integers(0, 256, (side, side, 3), dtype=np.uint8)
    settings = InferenceSettings(scales=scales, flip=flip, base_size=BASE_SIZE)
    baseline_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    with torch.inference_mode():
        if path == "before":
            tensor, _ = to_normalized_tensors(photo, np.zeros((1, 1), np.uint8), MEAN, STD)
            labels = infer(model, tensor[None], classes, settings)[0].argmax(0)
        else:
            _, labels, _ = next(segment(model, [(0, photo)], classes, settings))
    seconds = time.perf_counter() - start
    assert tuple(labels.shape) == (side, side)
    return {"case": name, "side": side, "classes": classes, "path": path,
            "views": len(scales) * (2 if flip else 1),
            "baseline_gb": baseline_kb / 2**20, "peak_gb": _status_kb("VmHWM") / 2**20,
            "seconds": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=",".join(CASES),
                        help="comma-separated case names (default: all)")
    parser.add_argument("--list", action="store_true", help="list the cases and exit")
    parser.add_argument("--case", help=argparse.SUPPRESS)  # one case, in a subprocess
    args = parser.parse_args()
    if args.case:
        print(json.dumps(run_case(args.case)))
        return
    if args.list:
        print("\n".join(CASES))
        return
    import torch

    print(f"{MODEL} (random weights, BN folded), whole image at base size {BASE_SIZE}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| photo | classes | views | path | RSS before inference | peak RSS | time |")
    print("|---|---|---|---|---|---|---|")
    for name in args.cases.split(","):
        side, classes, path, scales, flip = CASES[name]
        views = len(scales) * (2 if flip else 1)
        row = f"| {side}x{side} | {classes} | {views} | {path} |"
        # The full-resolution path holds one C x H x W float32 tensor (two with several
        # scales), beside the model and the photo; leave a margin for other programs.
        needed = (1 if len(scales) == 1 else 2) * classes * side * side * 4 + 3 * 2**30
        if path == "before" and needed > _available_bytes():
            print(f"{row} skipped: needs about {needed / 2**30:.0f} GB, "
                  f"{_available_bytes() / 2**30:.0f} GB available | | |")
            continue
        done = subprocess.run([sys.executable, __file__, "--case", name],
                              capture_output=True, text=True)
        if done.returncode != 0:
            print(f"{row} failed (exit {done.returncode}): "
                  f"{done.stderr.strip().splitlines()[-1:]} | | |")
            continue
        result = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"{row} {result['baseline_gb']:.2f} GB | {result['peak_gb']:.2f} GB | "
              f"{result['seconds']:.1f} s |", flush=True)


if __name__ == "__main__":
    main()
