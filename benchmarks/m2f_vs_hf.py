"""Our Mask2Former head against Hugging Face ``transformers``' Mask2Former head: training step and inference.

    python benchmarks/m2f_vs_hf.py [--device cuda] [--size 512] [--batch B] [--iters 5] [--quick]

Both heads read the same frozen ViT features (random ``(B, C, H/16, W/16)`` maps, 4 layers) through the same
``SimpleFeaturePyramid`` (strides 4/8/16/32), then: ours = ``Mask2FormerHead``'s pixel decoder, masked-attention
decoder and criterion; Hugging Face = ``Mask2FormerPixelDecoder`` + ``Mask2FormerTransformerModule`` + a class
predictor + ``Mask2FormerLoss`` built from one ``Mask2FormerConfig`` with the same widths (hidden 256, FFN 1024),
queries (100), layers (6 encoder, 9 decoder), heads, points (12544, oversample 3, importance 0.75) and loss weights
(2 / 5 / 5, no-object 0.1). Targets: ADE20K-like label maps, turned into per-class masks inside each step.

A training step is forward + loss + backward + AdamW step; inference is forward + semantic scores at full
resolution under ``torch.inference_mode``. Both heads live in one process and take turns, step by step; each
figure is the fastest of ``--iters`` rounds after ``--warmup``, so load from other processes inflates neither
side. On CPU the process's CPU time per step is reported too: on a machine shared with other jobs it moves
less than the wall time (exact with one thread, ``OMP_NUM_THREADS=1``). Peak memory of one training step of each
head above what was allocated before it: on CUDA ``torch.cuda.max_memory_allocated`` after the warm-up rounds, in
this process (the counters reset per step; no extra CUDA start-up); on CPU the peak resident set size, each head in
its own child process (a process's peak RSS cannot be reset).
The last line is ``m2f train steps/s ours vs hf: N.NNx``.
Defaults: batch 2 and one warm-up round on CPU, batch 8 and two warm-up rounds on CUDA.
``--quick``: 256 px, batch 1, two rounds (a CPU smoke run).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _peak_rss_bytes() -> int:
    """Peak resident set size of this process (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _label_maps(batch: int, size: int, num_classes: int, device):
    """Piecewise-constant label maps with ~10 classes and a strip of ignore (255), ``(B, H, W)``."""
    import torch
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    coarse = torch.randint(0, 10, (batch, 1, 8, 8), generator=g).float()
    classes = torch.randperm(num_classes, generator=g)[:10]
    mask = classes[F.interpolate(coarse, size=(size, size), mode="nearest")[:, 0].long()]
    mask[:, : size // 32] = 255
    return mask.to(device)


def _hf_head(channels, num_classes: int, args):
    """Hugging Face's Mask2Former pieces behind our pyramid, with ``forward``/``loss``/``predict`` like ours."""
    import torch
    import torch.nn.functional as F
    from torch import nn
    from transformers import Mask2FormerConfig
    from transformers.models.mask2former.modeling_mask2former import (
        Mask2FormerLoss,
        Mask2FormerPixelDecoder,
        Mask2FormerTransformerModule,
    )

    from heads.mask2former import SimpleFeaturePyramid, semantic_to_targets

    config = Mask2FormerConfig(
        feature_size=args.hidden, mask_feature_size=args.hidden, hidden_dim=args.hidden,
        encoder_feedforward_dim=4 * args.hidden, dim_feedforward=4 * args.hidden, encoder_layers=6,
        decoder_layers=9 + 1,  # Hugging Face counts the prediction before the first layer
        num_attention_heads=8, num_queries=100, num_labels=num_classes, train_num_points=12544,
        oversample_ratio=3.0, importance_sample_ratio=0.75, class_weight=2.0, mask_weight=5.0, dice_weight=5.0,
        no_object_weight=0.1, use_auxiliary_loss=True, feature_strides=[4, 8, 16, 32], common_stride=4,
    )
    weights = {"loss_cross_entropy": 2.0, "loss_mask": 5.0, "loss_dice": 5.0}

    class HFHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.pyramid = SimpleFeaturePyramid(channels, [16] * len(channels), args.hidden)
            self.pixel_decoder = Mask2FormerPixelDecoder(config, feature_channels=[args.hidden] * 4)
            self.transformer = Mask2FormerTransformerModule(in_features=args.hidden, config=config)
            self.class_predictor = nn.Linear(args.hidden, num_classes + 1)
            self.criterion = Mask2FormerLoss(config, weight_dict=weights)

        def forward(self, maps):
            decoded = self.pixel_decoder(self.pyramid(maps), return_dict=True)
            out = self.transformer(list(decoded.multi_scale_features), decoded.mask_features)
            logits = [self.class_predictor(h.transpose(0, 1)) for h in out.intermediate_hidden_states]
            return logits, out.masks_queries_logits

        def loss(self, outputs, mask):
            logits, masks = outputs
            targets = semantic_to_targets(mask, num_classes)
            losses = self.criterion(masks[-1], logits[-1], [t["masks"] for t in targets], [t["labels"] for t in targets],
                                    [{"masks_queries_logits": m, "class_queries_logits": c}
                                     for m, c in zip(masks[:-1], logits[:-1])])
            return sum(value * weights[next(k for k in weights if k in name)] for name, value in losses.items())

        def predict(self, outputs, size):
            logits, masks = outputs
            masks = F.interpolate(masks[-1], size=size, mode="bilinear", align_corners=False)
            return torch.einsum("bqk,bqhw->bkhw", logits[-1].softmax(-1)[..., :-1], masks.sigmoid())

    return HFHead()


def _our_head(channels, num_classes: int, args):
    from torch import nn

    from backbones.features import Features
    from heads.mask2former import Mask2FormerHead

    class OurHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.head = Mask2FormerHead(channels, [16] * len(channels), num_classes, hidden_dim=args.hidden,
                                        dim_feedforward=4 * args.hidden)

        def forward(self, maps):
            features = Features(maps=maps, cls=None, strides=[16] * len(maps), channels=channels, patch_size=16,
                                padded_size=(args.size, args.size))
            return self.head(features, (args.size, args.size))

        def loss(self, outputs, mask):
            return sum(self.head.loss(outputs, {"mask": mask}).values())

        def predict(self, outputs, size):
            return self.head.predict(outputs, size)

    return OurHead()


class _Bench:
    """One head with its inputs, optimizer, training step and inference."""

    def __init__(self, which: str, args):
        import torch

        self.device = torch.device(args.device)
        torch.manual_seed(0)
        channels = [args.channels] * 4
        grid = args.size // 16
        self.maps = [torch.randn(args.batch, args.channels, grid, grid, device=self.device) for _ in range(4)]
        self.mask = _label_maps(args.batch, args.size, 150, self.device)
        self.head = (_our_head if which == "ours" else _hf_head)(channels, 150, args).to(self.device)
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=1e-4)
        self.size = (args.size, args.size)

    def sync(self):
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def train_step(self):
        self.head.train()
        loss = self.head.loss(self.head(self.maps), self.mask)
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.sync()

    def infer(self):
        import torch

        self.head.eval()
        with torch.inference_mode():
            self.head.predict(self.head(self.maps), self.size)
        self.sync()


def _peak_memory(which: str, args, queue) -> None:
    """CPU child process: one head, one training step; its peak resident set size above the size before the step."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    bench = _Bench(which, args)
    base = _peak_rss_bytes()
    bench.train_step()
    queue.put(_peak_rss_bytes() - base)


def _cuda_peak(bench) -> float:
    """Bytes allocated at the peak of one training step of ``bench`` above what was allocated before it."""
    import torch

    from benchmarks.common import peak_memory_mib, reset_peak_memory

    reset_peak_memory(bench.device)
    base = torch.cuda.memory_allocated(bench.device)
    bench.train_step()
    return peak_memory_mib(bench.device) * 2**20 - base


def _child_result(process, queue, which: str):
    """What the child process put in ``queue``; an error naming the head if it died first (a crash or an
    out-of-memory kill would otherwise leave ``queue.get()`` waiting forever)."""
    import queue as queues

    while True:
        try:
            return queue.get(timeout=5)
        except queues.Empty:
            if not process.is_alive():
                raise RuntimeError(f"the peak-memory process of {which!r} died (exit code {process.exitcode}) "
                                   "before reporting; its error is printed above") from None


def _timings(args) -> dict[str, dict[str, float]]:
    """Training-step and inference seconds of both heads, fastest of ``args.iters`` rounds in turns."""
    sys.path.insert(0, str(ROOT))
    import torch

    torch.set_num_threads(args.threads)
    benches = {which: _Bench(which, args) for which in ("ours", "hf")}
    times = {which: {"train_s": [], "infer_s": [], "train_cpu_s": [], "infer_cpu_s": []} for which in benches}
    peaks = {}
    for round_ in range(args.warmup + args.iters):
        if round_ == args.warmup and args.device.startswith("cuda"):
            peaks = {which: _cuda_peak(bench) for which, bench in benches.items()}
        for which, bench in benches.items():
            for key, fn in (("train", bench.train_step), ("infer", bench.infer)):
                start, start_cpu = time.perf_counter(), time.process_time()
                fn()
                if round_ >= args.warmup:
                    times[which][f"{key}_s"].append(time.perf_counter() - start)
                    times[which][f"{key}_cpu_s"].append(time.process_time() - start_cpu)
    return {which: {key: min(values) for key, values in per.items()} | {
        "params": sum(p.numel() for p in benches[which].head.parameters()), **(
            {"train_peak": peaks[which]} if peaks else {})} for which, per in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if os.environ.get("CUDA_VISIBLE_DEVICES", "x") != "" and
                        __import__("torch").cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=512, help="image side; features are size / 16")
    parser.add_argument("--batch", type=int, default=None, help="2 on CPU, 8 on CUDA")
    parser.add_argument("--channels", type=int, default=384, help="backbone width (384 = ViT-S, 1024 = ViT-L)")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds first (1 on CPU, 2 on CUDA)")
    parser.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "0") or 0) or
                        os.cpu_count(), help="torch CPU threads (this process and the CPU memory children)")
    parser.add_argument("--quick", action="store_true", help="256 px, batch 1, two rounds")
    args = parser.parse_args()
    if args.quick:
        args.size, args.batch, args.iters = 256, 1, 2
    sys.path.insert(0, str(ROOT))
    import torch

    from benchmarks.common import describe, device_defaults

    device_defaults(args, cpu=dict(batch=2, warmup=1), cuda=dict(batch=8, warmup=2))
    print(f"device {describe(torch.device(args.device))}, batch {args.batch}, {args.size} px "
          f"(features {args.size // 16}^2 x {args.channels}), hidden {args.hidden}, 100 queries, 6 + 9 layers, "
          f"12544 points, fastest of {args.iters} rounds after {args.warmup}")
    peaks = {}
    if not args.device.startswith("cuda"):
        context = mp.get_context("spawn")
        for which in ("ours", "hf"):
            queue = context.Queue()
            process = context.Process(target=_peak_memory, args=(which, args, queue))
            process.start()
            peaks[which] = _child_result(process, queue, which)
            process.join()
    results = _timings(args)
    memory = "CUDA max allocated" if args.device.startswith("cuda") else "peak RSS increase"
    for which, r in results.items():
        r.setdefault("train_peak", peaks.get(which))
        print(f"{which:>4}: {r['params'] / 1e6:.2f}M params | train {1 / r['train_s']:.3f} steps/s "
              f"({r['train_s'] * 1000:.0f} ms) | inference {1 / r['infer_s']:.3f} batches/s "
              f"({r['infer_s'] * 1000:.0f} ms) | {memory} in a training step {r['train_peak'] / 2**20:.0f} MiB")
    ours, hf = results["ours"], results["hf"]
    if not args.device.startswith("cuda"):
        print(f"CPU time per step: train ours {ours['train_cpu_s']:.2f} s, hf {hf['train_cpu_s']:.2f} s "
              f"({hf['train_cpu_s'] / ours['train_cpu_s']:.2f}x); inference ours {ours['infer_cpu_s']:.2f} s, "
              f"hf {hf['infer_cpu_s']:.2f} s ({hf['infer_cpu_s'] / ours['infer_cpu_s']:.2f}x)")
    print(f"m2f inference ours vs hf: {hf['infer_s'] / ours['infer_s']:.2f}x")
    print(f"m2f train memory hf / ours: {hf['train_peak'] / max(ours['train_peak'], 1):.2f}x")
    print(f"m2f train steps/s ours vs hf: {hf['train_s'] / ours['train_s']:.2f}x")


if __name__ == "__main__":
    main()
