"""The ImageFolder training pipeline against timm's own loader, on the same real photographs.

    .venv/bin/python scripts/bench_data.py                     # 1 worker
    .venv/bin/python scripts/bench_data.py --workers 1,2 --model-img-s 1200,3600

Both run DeiT's training recipe on the same folder of JPEGs: decode, RandomResizedCrop to
224 px (bicubic), flip, RandAugment ``rand-m9-mstd0.5-inc1``, random erasing 0.25, ImageNet
normalisation, batches of 64. Ours is ``data=imagefolder``'s own: ``ImageFolderDataModule``'s
training loader and its ``on_after_batch_transfer`` (uint8 batches from the workers,
normalised and erased on the device). timm's is ``create_dataset`` + ``create_loader`` with
its prefetcher, as timm's ``train.py`` runs it. Here the device is the CPU, so the
normalisation and erasing of both run in the main process, as on a GPU they would run there.

The two take turns, a pass over the folder each, after one untimed pass (workers started,
files in the page cache); a figure is the median over passes of images per second, divided
by the workers: what one worker (one CPU core) delivers. The last lines say how many workers
feed one GPU training at a given model's img/s (``--model-img-s``: caitlab-bench's or
scripts/gpu_check.py's training figure).

The folder: ``--images`` JPEGs (quality 90) cut from the two photographs scikit-learn ships
(china.jpg, flower.jpg, 640x427), each a random crop of 60-100% of each side resized to
ImageNet's median size (500x375, or 375x500 for a portrait crop), in 4 classes.
"""

from __future__ import annotations

import argparse
import math
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table

BATCH = 64
RECIPE = dict(auto_augment="rand-m9-mstd0.5-inc1", reprob=0.25, interpolation="bicubic",
              color_jitter=0.3)


def make_folder(root: Path, images: int, seed: int = 0) -> Path:
    """``root/train/c<k>/<i>.jpg`` and one image per class under ``root/val``."""
    from PIL import Image
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(a) for a in load_sample_images().images]
    rng = random.Random(seed)
    for split, count in (("train", images), ("val", 4)):
        for i in range(count):
            photo = photos[i % len(photos)]
            w, h = photo.size
            cw, ch = int(w * rng.uniform(0.6, 1.0)), int(h * rng.uniform(0.6, 1.0))
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            size = (500, 375) if cw >= ch else (375, 500)
            crop = photo.crop((x, y, x + cw, y + ch)).resize(size, Image.BICUBIC)
            folder = root / split / f"c{i % 4}"
            folder.mkdir(parents=True, exist_ok=True)
            crop.save(folder / f"{i}.jpg", quality=90)
    return root


def ours_pass(root: Path, workers: int, on_device: bool = True):
    """One training pass of caitlab's pipeline: a callable returning (images, seconds)."""
    from caitlab.data import ImageFolderDataModule

    dm = ImageFolderDataModule(str(root), batch_size=BATCH, img_size=224, num_classes=4,
                               num_workers=workers, normalize_on_device=on_device, **RECIPE)
    dm.setup("fit")
    loader = dm.train_dataloader()

    def one_pass() -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        for batch in loader:
            x, _ = dm.on_after_batch_transfer(batch, 0)
            n += len(x)
        return n, time.perf_counter() - t0

    return one_pass


def timm_pass(root: Path, workers: int):
    """One training pass of timm's loader (``create_loader``, prefetcher on)."""
    import torch
    from timm.data import create_dataset, create_loader

    from caitlab.data.augment import guard_augment_ops

    ds = create_dataset("", root=str(root / "train"), split="train", is_training=True)
    loader = create_loader(ds, input_size=(3, 224, 224), batch_size=BATCH, is_training=True,
                           use_prefetcher=True, no_aug=False, re_prob=RECIPE["reprob"],
                           re_mode="const", re_count=1,
                           auto_augment=RECIPE["auto_augment"],
                           interpolation=RECIPE["interpolation"],
                           color_jitter=RECIPE["color_jitter"], num_workers=workers,
                           persistent_workers=workers > 0, device=torch.device("cpu"),
                           pin_memory=False)
    # as it ships, timm's RandAugment raises in a worker about once in 700 images under
    # current Pillow (caitlab.data.augment): the same guard as ours, or the pass dies
    guard_augment_ops(ds.transform)

    def one_pass() -> tuple[int, float]:
        n, t0 = 0, time.perf_counter()
        for x, _ in loader:
            n += len(x)
        return n, time.perf_counter() - t0

    return one_pass


def bench(root: Path, workers: int, passes: int, on_device: bool = True) -> dict:
    runs = {"ours": ours_pass(root, workers, on_device), "timm": timm_pass(root, workers)}
    for one_pass in runs.values():
        one_pass()  # workers up, files cached
    rates: dict[str, list[float]] = {k: [] for k in runs}
    for p in range(passes):
        order = list(runs) if p % 2 == 0 else list(reversed(runs))
        for who in order:
            n, seconds = runs[who]()
            rates[who].append(n / seconds)
    per_worker = {k: statistics.median(v) / max(workers, 1) for k, v in rates.items()}
    ratios = [a / b for a, b in zip(rates["ours"], rates["timm"], strict=True)]
    return dict(workers=workers, ours=per_worker["ours"], timm=per_worker["timm"],
                ratio=statistics.median(ratios), passes=passes)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workers", default="1", help="comma-separated worker counts (default 1)")
    p.add_argument("--images", type=int, default=384, help="training images (default 384)")
    p.add_argument("--passes", type=int, default=6, help="timed passes each (default 6)")
    p.add_argument("--model-img-s", default="1000,3000",
                   help="training img/s of a model on one GPU, for the workers it needs")
    p.add_argument("--in-worker", action="store_true",
                   help="ours with data.normalize_on_device=false (float batches from the "
                   "workers), to see what the uint8 batches buy")
    p.add_argument("--folder", type=Path, default=None,
                   help="an image folder to use instead (root/train/<class>/...)")
    add_doc_args(p)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="caitlab-bench-data-") as tmp:
        root = args.folder or make_folder(Path(tmp), args.images)
        print(f"{root}: {args.images if args.folder is None else 'given'} training images, "
              f"batch {BATCH}, DeiT's train transform at 224 px; {args.passes} passes each",
              flush=True)
        results = [bench(root, int(w), args.passes, not args.in_worker)
                   for w in args.workers.split(",")]
    print(f"\n{'workers':>8}{'ours img/s/worker':>19}{'timm img/s/worker':>19}{'ours/timm':>11}")
    for r in results:
        ok = "ok" if r["ratio"] >= 0.95 else "SLOWER"
        print(f"{r['workers']:>8}{r['ours']:>19.1f}{r['timm']:>19.1f}{r['ratio']:>11.3f}  {ok}")
    rate = results[0]["ours"]
    print(f"\n(median over passes; ours/timm: the median of the passes' ratios, target >= 0.95)"
          f"\nat {rate:.0f} img/s per worker (CPU core), one GPU training at")
    needs = [(float(x), math.ceil(float(x) / rate)) for x in args.model_img_s.split(",")]
    for model_rate, workers in needs:
        print(f"  {model_rate:>6.0f} img/s needs {workers} workers")
    if not args.no_doc:
        ours = ("normalised in the workers (`data.normalize_on_device=false`)" if args.in_worker
                else "uint8 batches, normalised and erased on the device (default)")
        table = markdown_table(
            ["workers", "ours", "ours img/s per worker", "timm img/s per worker", "ours/timm",
             "target"],
            [[r["workers"], ours, f"{r['ours']:.1f}", f"{r['timm']:.1f}",
              f"**{r['ratio']:.3f}**", ">= 0.95 " + ("(met)" if r["ratio"] >= 0.95
                                                     else "(missed)")] for r in results],
            right=(0, 2, 3, 4))
        feeds = markdown_table(["one GPU training at", "workers it needs"],
                               [[f"{m:.0f} img/s", w] for m, w in needs], right=(0, 1))
        source = ("the given folder" if args.folder is not None else
                  f"{args.images} JPEGs at ImageNet's median size")
        write_doc_table("bench_data", "Data pipeline: ours against timm's loader",
                        f"DeiT's training transform at 224 px, batches of {BATCH}, on {source}; "
                        f"medians of {args.passes} passes each, taking turns.\n\n{table}\n\n"
                        f"At {rate:.0f} img/s per worker (one CPU core):\n\n{feeds}",
                        command_line(__file__, argv), args.doc_out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
