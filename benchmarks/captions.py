"""A caption dataset as COCO and Flickr30k have it: each picture under several captions, rows in no order.

Run as a script, it measures a re-run after new captions of known pictures (a new annotation round, a
translation): ``mbm preprocess`` on --pictures x --per rows, then with --new captions more for every
picture (the re-run: the new captions' texts extracted, their pictures' features copied from the samples
that hold them), and --full on the same data (every picture extracted again, once each with dedupe).

    .venv/bin/python benchmarks/captions.py --pictures 400 --per 5 --new 1

``benchmarks/preprocess.py --captions K`` runs the side-by-side comparison on ``--samples`` rows of it:
``--samples / K`` pictures made from the bundled sample's photos, each cropped at a place and size of its
own and saved as a JPEG (so no two pictures are the same bytes, and each decodes at the cost of a
photo), each under K captions of its own, the rows shuffled. mbm runs with ``[runner] dedupe`` on (its
default), which decodes and featurizes each picture once; once more with it off; the baselines as a
user writes them, every row's picture decoded and extracted.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
from pathlib import Path

from incremental import SAMPLE, run
from PIL import Image


def build_captions(data: Path, n: int, per: int, seed: int = 0) -> Path:
    """``n`` rows under ``data`` (``manifest.jsonl`` and ``images/``), ``per`` captions a picture (the last
    picture may have fewer); returns the manifest."""
    rows = [json.loads(x) for x in (SAMPLE / "manifest.jsonl").read_text().splitlines() if x.strip()]
    photos = sorted({r["image"] for r in rows if r.get("image") and not r["id"].startswith("bad")})
    captions = [r["text"] for r in rows if r.get("text") and not r["id"].startswith("bad")]
    bases = [Image.open(SAMPLE / p).convert("RGB") for p in photos]
    rng = random.Random(seed)
    (data / "images").mkdir(parents=True, exist_ok=True)
    out = []
    for p in range((n + per - 1) // per):
        base = bases[p % len(bases)]
        w, h = base.size
        cw, ch = int(w * rng.uniform(0.6, 0.9)), int(h * rng.uniform(0.6, 0.9))
        x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
        name = f"images/{p:06d}.jpg"
        base.crop((x, y, x + cw, y + ch)).save(data / name, quality=90)
        for c in range(min(per, n - p * per)):
            text = f"{captions[(p * per + c) % len(captions)]} (view {c + 1} of picture {p})"
            out.append({"id": f"{p:06d}-{c}", "text": text, "image": name})
    rng.shuffle(out)
    manifest = data / "manifest.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in out))
    return manifest


def add_captions(data: Path, new: int) -> int:
    """``new`` more captions for every picture of ``data``'s manifest (new ids); returns the rows added."""
    manifest = data / "manifest.jsonl"
    rows = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    pictures = sorted({r["image"] for r in rows})
    added = [{"id": f"{Path(p).stem}-new{c}", "text": f"another caption, number {c}, of picture {Path(p).stem}",
              "image": p} for p in pictures for c in range(new)]
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows + added))
    return len(added)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pictures", type=int, default=400)
    ap.add_argument("--per", type=int, default=5, help="captions a picture in the first version")
    ap.add_argument("--new", type=int, default=1, help="captions added to every picture for the re-run")
    args = ap.parse_args()
    if min(args.pictures, args.per, args.new) < 1:
        ap.error("--pictures, --per and --new must be >= 1")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build_captions(tmp / "data", args.pictures * args.per, args.per)
        spec = tmp / "job.toml"
        spec.write_text('[input]\nmanifest = "data/manifest.jsonl"\n[output]\ndir = "out"\n')
        first = run(spec)
        added = add_captions(tmp / "data", args.new)
        rerun = run(spec)
        shutil.copytree(tmp / "out", tmp / "full")
        full = run(spec, "--full", "--output", str(tmp / "full"))
    print(f"{args.pictures} pictures, {args.per} captions each; the change: {added} new captions of known pictures")
    print("| run | wall s | samples | text / image extracted | full run / this |")
    print("| --- | ---: | ---: | --- | ---: |")
    for name, r in (("first version", first), ("new captions", rerun), ("--full on the changed data", full)):
        e, c = r["report"]["extracted_by_modality"], r["report"]["counts"]
        print(f"| {name} | {r['wall']:.1f} | {c['input']} | {e['text']} / {e['image']} | {full['wall'] / r['wall']:.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
