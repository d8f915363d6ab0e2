"""Against crop-and-classify: the same masks classified by MasQ (one CLIP pass, Q mask tokens) and by one CLIP pass
per masked crop (the OVSeg / Grounded-SAM way).

One 640×480 image (the first sample photo, resized) and ``--masks`` random blob masks (unions of 1–3 ellipses,
seeded), one CLIP model with random weights (speed does not depend on them), fp32, ``--threads`` threads:

- MasQ: the image squashed to the CLIP input (``MasQVisual.preprocess``), attention masks from the mask logits at
  stride 4 (as the proposal network gives them), one ``MasQVisual`` forward with Q = ``--masks`` mask tokens, then
  classification against the text bank;
- crop: for each mask, crop its bounding box, set the pixels outside the mask to the CLIP mean colour, resize
  (bicubic) to the CLIP input size, normalise, then open_clip ``encode_image`` on the crops in batches of
  ``--batch``, L2-normalise, classify against the same text bank.

The text bank ((N+1, D) L2-normalised, random: ``--classes`` names + background) is the same for both and its
encoding is not timed. MasQ: warm-up, median of ``--repeats``; crop: warm-up on one batch, median of
``--crop-repeats`` (default 1 at ≥ 336 px, else ``--repeats``); the repetitions of the two are interleaved.

    python bench/crop_classify.py                               # ViT-L-14-336-quickgelu (several minutes)
    python bench/crop_classify.py --clip ViT-B-16 ViT-L-14-336-quickgelu

Writes bench/results/crop_classify.json (one row per CLIP model).
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from _common import RESULTS, SAMPLE_IMAGES, machine_info, median_time, write_json
from PIL import Image

from masqclip_cli.modeling.classifier import classify
from masqclip_cli.modeling.clip_loader import create_open_clip
from masqclip_cli.modeling.factory import TINY_CLIP_CONFIG
from masqclip_cli.modeling.masq_visual import MasQVisual


def sample_image(height: int, width: int) -> torch.Tensor:
    """(3, H, W) uint8: the first sample photo resized, or seeded noise when there is none."""
    photos = sorted(SAMPLE_IMAGES.glob("*.jpg")) if SAMPLE_IMAGES.is_dir() else []
    if photos:
        rgb = np.asarray(Image.open(photos[0]).convert("RGB").resize((width, height), Image.BILINEAR))
        return torch.from_numpy(rgb.copy()).permute(2, 0, 1).contiguous()
    return torch.randint(0, 256, (3, height, width), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)


def blob_masks(count: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    """(count, H, W) bool: each a union of 1–3 random ellipses (areas from ~0.5 % to ~40 % of the image)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width]
    masks = np.zeros((count, height, width), dtype=bool)
    for i in range(count):
        scale = rng.uniform(0.04, 0.35)
        for _ in range(rng.integers(1, 4)):
            cy, cx = rng.uniform(0, height), rng.uniform(0, width)
            ry, rx = rng.uniform(0.3, 1.0, 2) * scale * np.array([height, width])
            masks[i] |= ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
        if not masks[i].any():
            masks[i, int(cy) % height, int(cx) % width] = True
    return torch.from_numpy(masks)


class CropClassifier:
    """OVSeg-style: one masked, resized crop per mask through open_clip ``encode_image``."""

    def __init__(self, clip, size: int, mean, std, batch: int):  # noqa: ANN001
        self.clip, self.size, self.batch = clip, size, batch
        self.mean = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)

    def crop(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(3, R, R) normalised CLIP input of one mask's bounding box, outside-mask pixels = the mean colour."""
        rows, cols = mask.any(1).nonzero(), mask.any(0).nonzero()
        y0, y1, x0, x1 = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
        region = image[:, y0:y1, x0:x1].float() / 255.0
        region = torch.where(mask[y0:y1, x0:x1], region, self.mean)
        region = F.interpolate(region[None], size=(self.size, self.size), mode="bicubic", align_corners=False)[0]
        return (region - self.mean) / self.std

    def embed(self, image: torch.Tensor, masks: torch.Tensor, limit: int | None = None) -> torch.Tensor:
        out = []
        count = masks.shape[0] if limit is None else min(limit, masks.shape[0])
        for start in range(0, count, self.batch):
            crops = torch.stack([self.crop(image, m) for m in masks[start : min(start + self.batch, count)]])
            out.append(F.normalize(self.clip.encode_image(crops).float(), dim=-1))
        return torch.cat(out)


def measure(model_name: str, args: argparse.Namespace) -> dict:
    torch.manual_seed(0)
    t0 = time.perf_counter()
    clip, spec = create_open_clip(TINY_CLIP_CONFIG if model_name == "tiny" else model_name, None)
    clip.eval()
    masq = MasQVisual(clip.visual).eval()
    build_s = time.perf_counter() - t0
    size = masq.image_size
    height, width = args.height, args.width
    image = sample_image(height, width)
    masks = blob_masks(args.masks, height, width)
    # the proposal network's mask logits are at stride 4 of the (padded) image: +1 inside, -1 outside
    logits = F.avg_pool2d(masks[None].float(), 4) * 2 - 1
    text = F.normalize(torch.randn(args.classes + 1, masq.output_dim, generator=torch.Generator().manual_seed(1)),
                       dim=-1)
    padded = [-(-height // 32) * 32, -(-width // 32) * 32]

    def masq_classify():
        raw = torch.zeros(1, 3, *padded)
        raw[0, :, :height, :width] = image.float()
        pixels = masq.preprocess(raw)
        embeddings = masq(pixels, masq.attention_masks(logits))
        return classify(embeddings.float(), text).p_cls

    cropper = CropClassifier(clip, size, masq.image_mean, masq.image_std, args.batch)

    def crop_classify():
        return classify(cropper.embed(image, masks), text).p_cls

    crop_repeats = args.crop_repeats or (1 if size >= 336 else args.repeats)
    masq_all: list[float] = []
    crop_all: list[float] = []
    with torch.inference_mode():
        p_masq = masq_classify()  # warm-up
        cropper.embed(image, masks, limit=args.batch)  # warm-up: one batch
        for i in range(max(args.repeats, crop_repeats)):  # interleaved: changes in machine load hit both alike
            if i < args.repeats:
                masq_all.append(median_time(masq_classify, 1)[0])
            if i < crop_repeats:
                start = time.perf_counter()
                p_crop = crop_classify()
                crop_all.append(time.perf_counter() - start)
    masq_s, crop_s = statistics.median(masq_all), statistics.median(crop_all)
    assert p_masq.shape[-2:] == p_crop.shape == (args.masks, args.classes)
    return {
        "model": model_name,
        "image_size": size,
        "image": [height, width],
        "masks": args.masks,
        "mask_area_fraction": {
            "min": round(float(masks.float().mean((1, 2)).min()), 4),
            "median": round(float(masks.float().mean((1, 2)).median()), 4),
            "max": round(float(masks.float().mean((1, 2)).max()), 4),
        },
        "classes": args.classes,
        "crop_batch_size": args.batch,
        "crop_fill": "CLIP mean colour",
        "build_clip_s": round(build_s, 2),
        "masq_s": round(masq_s, 4),
        "masq_s_all": [round(t, 4) for t in masq_all],
        "crop_s": round(crop_s, 3),
        "crop_s_all": [round(t, 3) for t in crop_all],
        "crop_ms_per_mask": round(1000 * crop_s / args.masks, 2),
        "masq_repeats": args.repeats,
        "crop_repeats": crop_repeats,
        "speedup": round(crop_s / masq_s, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clip", nargs="+", default=["ViT-L-14-336-quickgelu"],
                        help="open_clip model names (ViT-L-14-336-quickgelu, ViT-B-16, ...) or 'tiny'")
    parser.add_argument("--masks", type=int, default=100)
    parser.add_argument("--classes", type=int, default=150)
    parser.add_argument("--batch", type=int, default=32, help="crops per encode_image call")
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=640)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crop-repeats", type=int, default=None)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="tiny CLIP, 8 masks, one repetition")
    parser.add_argument("--out", type=Path, default=RESULTS / "crop_classify.json")
    args = parser.parse_args()
    if args.smoke:
        args.clip, args.masks, args.repeats, args.crop_repeats, args.batch = ["tiny"], 8, 1, 1, 4
        args.height, args.width = 240, 320
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.clip:
        rows.append(measure(name, args))
        r = rows[-1]
        print(f"{name} @{r['image_size']}, {r['masks']} masks: MasQ {r['masq_s']} s, crop-and-classify "
              f"{r['crop_s']} s (batch {r['crop_batch_size']}): {r['speedup']}x", flush=True)
    write_json(args.out, {"bench": "crop_classify", **machine_info(torch.get_num_threads()), "dtype": "float32",
                          "rows": rows})


if __name__ == "__main__":
    main()
