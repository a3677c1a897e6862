"""Predict with a trained head: ``python predict.py ckpt=PATH input=FILE_OR_FOLDER output=DIR [key=value ...]``.

``ckpt`` is a ``train.py`` checkpoint, an ``export.py`` folder, or one of Meta's released head files with
``backbone=NAME backbone_weights=SOURCE``. For each image it writes the raw result and
a picture into ``output`` (folder structure of ``input`` kept):

- segmentation: ``NAME_labels.png`` (class ids, 8-bit, 16-bit above 256 classes) and ``NAME_overlay.png``
- depth: ``NAME_depth.png`` (16-bit, millimetres) or ``NAME_depth.npy`` (metres, ``depth_format=npy``)
  and ``NAME_depth_color.png``
- detection: ``NAME_boxes.json`` (COCO-style results, ``bbox`` as x, y, w, h) and ``NAME_boxes.png``

A file that cannot be read is reported by name and skipped; the exit code is 1 if any failed. ``output`` must
be new, empty or an earlier ``predict.py`` output; ``overwrite=true`` writes into any folder (same-named files
replaced, no other file touched).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import yaml

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".gif"}
DEFAULTS = {
    "ckpt": None, "input": None, "output": None,
    "mode": None, "crop": None, "stride": None, "batch_size": None,      # None: the checkpoint's eval settings
    "stitch": None,                                                      # slide: full | native (None: checkpoint's)
    "tta_flip": None, "tta_scales": None,                 # None: the checkpoint's eval settings
    "small_image": None, "activation": None,        # pad|shrink windows on small images; auto|softmax|normalize
    "eval": None,                                   # an evaluation preset (tasks/tta.py EVAL_PRESETS), e.g. meta_m2f
    "device": "cpu", "out_device": "cpu",                                # out_device=cpu: sums live in RAM
    "depth_format": "png", "score_threshold": 0.3, "alpha": 0.5, "images_per_step": 8,
    "backbone": None, "backbone_weights": None,     # only for Meta's released head files: the backbone they run on
    "overwrite": False,                             # write into a non-empty folder predict.py did not write
}
REQUIRED = ("ckpt", "input", "output")


def parse_key_values(argv: list[str], defaults: dict, required: tuple[str, ...], usage: str) -> dict:
    """``key=value`` arguments (values parsed as YAML: ``true``, ``[0.75,1.0]``, ``null``) over ``defaults``."""
    args = dict(defaults)
    for item in argv:
        if item in ("-h", "--help"):
            print(usage)
            sys.exit(0)
        key, sep, value = item.partition("=")
        key = key.lstrip("+")
        if not sep or key not in defaults:
            sys.exit(f"error: bad argument {item!r}; expected key=value with key in: {', '.join(defaults)}\n{usage}")
        try:
            args[key] = yaml.safe_load(value) if value != "" else None
        except yaml.YAMLError:
            args[key] = value
    missing = [k for k in required if args.get(k) in (None, "")]
    if missing:
        sys.exit(f"error: missing {', '.join(f'{k}=...' for k in missing)}\n{usage}")
    return args


def list_images(path: Path) -> list[Path]:
    """The image files of a folder (recursive, sorted) or the file itself."""
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise FileNotFoundError(f"input not found: {path}")
    return sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def output_stems(files: list[Path], root: Path) -> dict[Path, Path]:
    """Output path stem per input (relative folders kept; ``a.png`` and ``a.jpg`` become ``a_png``, ``a_jpg``)."""
    base = root if root.is_dir() else root.parent
    stems = {f: f.relative_to(base).with_suffix("") for f in files}
    counts: dict[Path, int] = {}
    for stem in stems.values():
        counts[stem] = counts.get(stem, 0) + 1
    return {f: (s if counts[s] == 1 else s.with_name(f"{s.name}_{f.suffix.lstrip('.').lower()}")) for f, s in stems.items()}


def draw_boxes(image, boxes, labels, scores, names, colours):
    from PIL import Image, ImageDraw

    picture = Image.fromarray(image)
    draw = ImageDraw.Draw(picture)
    for box, label, score in zip(boxes, labels, scores):
        colour = tuple(int(c) for c in colours[int(label) % len(colours)])
        draw.rectangle([float(v) for v in box], outline=colour, width=2)
        name = names[int(label)] if names and 0 <= int(label) < len(names) else str(int(label))
        draw.text((float(box[0]) + 2, max(float(box[1]) - 11, 0)), f"{name} {float(score):.2f}", fill=colour)
    return picture


def write_result(predictor, result: dict, image, stem: Path, out: Path, args: dict) -> list[Path]:
    """Write the raw result and the picture of one image; returns the written paths."""
    import numpy as np
    from PIL import Image

    from tasks.visualize import colorize_labels, palette

    target = out / stem
    target.parent.mkdir(parents=True, exist_ok=True)
    written = []
    if predictor.kind == "segmentation":
        labels = result["labels"].numpy()
        dtype, mode = (np.uint8, "L") if predictor.num_classes <= 256 else (np.uint16, "I;16")
        path = target.with_name(target.name + "_labels.png")
        Image.fromarray(labels.astype(dtype), mode=mode).save(path)
        colour = colorize_labels(labels, predictor.num_classes).astype(np.float32)
        overlay = (1 - args["alpha"]) * image.astype(np.float32) + args["alpha"] * colour
        picture = target.with_name(target.name + "_overlay.png")
        Image.fromarray(np.clip(overlay + 0.5, 0, 255).astype(np.uint8)).save(picture)
        written += [path, picture]
    elif predictor.kind == "depth":
        from tasks.visualize_depth import colorize_depth

        depth = result["depth"].numpy().astype(np.float32)
        if args["depth_format"] == "npy":
            path = target.with_name(target.name + "_depth.npy")
            np.save(path, depth)
        else:
            path = target.with_name(target.name + "_depth.png")
            millimetres = np.clip(np.nan_to_num(depth) * 1000.0 + 0.5, 0, 65535).astype(np.uint16)
            Image.fromarray(millimetres).save(path)
        picture = target.with_name(target.name + "_depth_color.png")
        Image.fromarray(colorize_depth(depth)).save(picture)
        written += [path, picture]
    elif predictor.kind == "detection":
        names = predictor.class_names
        boxes, scores, labels = (result[k].numpy() for k in ("boxes", "scores", "labels"))
        records = [{"image_id": stem.as_posix(), "category_id": int(label),
                    "category_name": names[int(label)] if names and 0 <= int(label) < len(names) else None,
                    "bbox": [round(float(b[0]), 2), round(float(b[1]), 2), round(float(b[2] - b[0]), 2),
                             round(float(b[3] - b[1]), 2)], "score": round(float(score), 5)}
                   for b, score, label in zip(boxes, scores, labels)]
        path = target.with_name(target.name + "_boxes.json")
        path.write_text(json.dumps(records, indent=1))
        keep = scores >= args["score_threshold"]
        picture = target.with_name(target.name + "_boxes.png")
        draw_boxes(image, boxes[keep], labels[keep], scores[keep], names,
                   palette(max(predictor.num_classes or 1, 1))).save(picture)
        written += [path, picture]
    else:
        path = target.with_name(target.name + "_class.json")
        names = predictor.class_names
        path.write_text(json.dumps({"label": result["label"], "name": names[result["label"]] if names else None,
                                    "probs": [round(float(p), 6) for p in result["probs"]]}))
        written.append(path)
    return written


def main(argv: list[str]) -> int:
    args = parse_key_values(argv, DEFAULTS, REQUIRED, __doc__.split("\n\n")[0])
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from tqdm import tqdm

    from dense_data.io import read_rgb
    from tasks import load_predictor
    from tasks.outputs import OutputFolderError, claim_output_folder

    try:
        files = list_images(Path(args["input"]))
    except FileNotFoundError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not files:
        print(f"error: no images ({', '.join(sorted(IMAGE_SUFFIXES))}) in {args['input']}", file=sys.stderr)
        return 2
    try:
        out = claim_output_folder(args["output"], "predict", bool(args["overwrite"]))
    except OutputFolderError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    try:
        predictor = load_predictor(args["ckpt"], device=args["device"], backbone=args["backbone"],
                                   backbone_weights=args["backbone_weights"])
    except (FileNotFoundError, ValueError, RuntimeError) as err:
        print(f"error loading {args['ckpt']}: {err}", file=sys.stderr)
        return 2
    tta = None if args["tta_flip"] is None and args["tta_scales"] is None else {
        "flip": bool(args["tta_flip"]), "scales": args["tta_scales"] or [1.0]}
    options = dict(mode=args["mode"], crop=args["crop"], stride=args["stride"], batch_size=args["batch_size"], tta=tta,
                   preset=args["eval"], stitch=args["stitch"])
    if predictor.kind in ("segmentation", "depth"):
        options.update(out_device=args["out_device"], return_probs=False, small_image=args["small_image"],
                       activation=args["activation"])
    stems = output_stems(files, Path(args["input"]))
    failed: dict[Path, str] = {}
    done = 0
    step = max(int(args["images_per_step"]), 1)
    with tqdm(total=len(files), unit="image", desc=f"predict ({predictor.kind})", file=sys.stderr) as bar:
        for start in range(0, len(files), step):
            group = []
            for path in files[start:start + step]:
                try:
                    group.append((path, read_rgb(path)))
                except Exception as err:  # a corrupt file must not stop the others
                    failed[path] = str(err)
                    tqdm.write(f"failed: {path}: {err}", file=sys.stderr)
                    bar.update(1)
            if not group:
                continue
            try:
                results = predictor.predict([image for _, image in group], **options)
            except ValueError as err:  # a bad option: the same for every image
                print(f"error: {err}", file=sys.stderr)
                return 2
            for (path, image), result in zip(group, results):
                try:
                    write_result(predictor, result, image, stems[path], out, args)
                    done += 1
                except Exception as err:
                    failed[path] = f"cannot write its outputs: {err}"
                    tqdm.write(f"failed: {path}: {failed[path]}", file=sys.stderr)
                bar.update(1)
    print(f"{done} of {len(files)} images predicted into {out}")
    if failed:
        print(f"{len(failed)} failed:")
        for path, reason in failed.items():
            print(f"  {path}: {reason}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
