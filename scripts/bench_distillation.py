"""What a teacher costs a training step: the module's own training step (forward, loss,
backward, AdamW) of one student without distillation and with a frozen teacher, taking turns
in one run.

    .venv/bin/python scripts/bench_distillation.py                        # digits-sized
    .venv/bin/python scripts/bench_distillation.py --student deit_tiny_distilled_patch16_224 \
        --teacher deit_small_patch16_224 --img-size 224 --batch 32 --device cuda --precision bf16

Prints the median step time of each and their ratio. The teacher is built with random
weights (the cost does not depend on them); ``--teacher`` is any caitlab model name.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from benchdoc import add_doc_args, command_line, markdown_table, write_doc_table
from caitlab.analysis.timing import autocast, resolve_device, time_interleaved
from caitlab.config import DistillationConfig, TrainConfig
from caitlab.models import create_model
from caitlab.training.module import ClassificationModule


def _module(student: str, teacher: torch.nn.Module | None, size: int, device, kind: str):
    torch.manual_seed(0)
    extra = {"img_size": size} if size != 8 else {}
    model = create_model(student, **extra)
    cfg = TrainConfig(distillation=DistillationConfig(kind if teacher is not None else "none",
                                                      teacher="bench" if teacher else None))
    module = ClassificationModule(model, num_classes=model.num_classes, cfg=cfg,
                                  teacher=teacher).to(device)
    if teacher is not None:
        teacher.to(device)
    return module


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="cait_tiny")
    parser.add_argument("--teacher", default="cait_tiny")
    parser.add_argument("--kind", choices=("soft", "hard"), default="hard")
    parser.add_argument("--img-size", type=int, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--device", default=None)
    parser.add_argument("--precision", default="32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--iters", type=int, default=10)
    add_doc_args(parser)
    args = parser.parse_args(argv)

    device = resolve_device(args.device)
    extra = {"img_size": args.img_size} if args.img_size != 8 else {}
    teacher = create_model(args.teacher, **extra).eval().requires_grad_(False)
    modules = {"student alone": _module(args.student, None, args.img_size, device, args.kind),
               "with teacher": _module(args.student, teacher, args.img_size, device,
                                       args.kind)}
    chans = modules["student alone"].model.config["in_chans"]
    x = torch.randn(args.batch, chans, args.img_size, args.img_size, device=device)
    y = torch.randint(0, modules["student alone"].num_classes, (args.batch,), device=device)

    def step(module):
        optimizer = torch.optim.AdamW(module.model.parameters(), lr=1e-4)
        module.model.train()

        def run():
            with autocast(device, args.precision):
                loss = module.training_step((x, y), 0)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return run

    times = time_interleaved({name: step(m) for name, m in modules.items()}, device,
                             warmup=3, repeats=args.repeats, iters=args.iters)
    alone, with_teacher = (statistics.median(times[k]) / args.iters * 1000
                           for k in ("student alone", "with teacher"))
    print(f"student {args.student}, teacher {args.teacher} ({args.kind}), batch {args.batch}, "
          f"{args.img_size} px, {device}, precision {args.precision}")
    print(f"step: {alone:.2f} ms alone, {with_teacher:.2f} ms with the teacher: "
          f"{with_teacher / alone:.2f}x")
    if not args.no_doc:
        table = markdown_table(
            ["student", "teacher", "distillation", "batch", "image", "device", "precision",
             "step alone", "step with the teacher", "with / alone"],
            [[f"`{args.student}`", f"`{args.teacher}`", args.kind, args.batch,
              f"{args.img_size} px", str(device), args.precision, f"{alone:.2f} ms",
              f"{with_teacher:.2f} ms", f"**{with_teacher / alone:.2f}x**"]],
            right=(3, 7, 8, 9))
        write_doc_table("bench_distillation", "What a teacher costs a training step",
                        f"Median of {args.repeats} interleaved repeats of {args.iters} steps "
                        f"after 3 warm-up.\n\n{table}", command_line(__file__, argv),
                        args.doc_out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
