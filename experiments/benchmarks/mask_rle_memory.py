"""Peak memory (RSS) of turning 100 detections' masks on a 12 MP image into COCO RLEs.

"full" pastes all masks at once at full size, as torchvision's ``postprocess`` does
(N x 1 x H x W float32), then encodes them; "rle" is :func:`segnest.inference.coco.
encode_masks`: each 28 x 28 probability map pasted, thresholded and encoded before the
next. Each case runs in a fresh subprocess and reports the growth of its peak resident
set size (``VmHWM``) over its resident size before the masks are made.

Run: python experiments/benchmarks/mask_rle_memory.py   (about a minute on 2 CPU cores)
"""

from __future__ import annotations

import json
import subprocess
import sys

HEIGHT, WIDTH, DETECTIONS = 3000, 4000, 100

_CASE = """
import json, torch
from torchvision.models.detection.roi_heads import paste_masks_in_image
from segnest.inference.coco import encode_full_masks, encode_masks

def rss_kib(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1])

generator = torch.Generator().manual_seed(0)
probs = torch.rand({n}, 1, 28, 28, generator=generator)
corner = torch.rand({n}, 2, generator=generator) * torch.tensor([{w} * 0.7, {h} * 0.7])
size = torch.rand({n}, 2, generator=generator) * torch.tensor([{w} * 0.3, {h} * 0.3]) + 8
boxes = torch.cat([corner, corner + size], dim=1)
before = rss_kib("VmRSS")
if "{case}" == "full":
    rles = encode_full_masks(paste_masks_in_image(probs, boxes, ({h}, {w})))
else:
    rles = encode_masks(probs, boxes, {h}, {w})
print(json.dumps({{"case": "{case}", "peak_growth_mib": (rss_kib("VmHWM") - before) / 1024,
                  "masks": len(rles)}}))
"""


def main() -> None:
    for case in ("rle", "full"):
        code = _CASE.format(case=case, n=DETECTIONS, h=HEIGHT, w=WIDTH)
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                check=True).stdout
        print(json.loads(output.strip().splitlines()[-1]))


if __name__ == "__main__":
    main()
