"""A caption dataset as COCO and Flickr30k have it: each picture under several captions, rows in no order.

``benchmarks/preprocess.py --captions K`` runs the side-by-side comparison on ``--samples`` rows of it:
``--samples / K`` pictures made from the bundled sample's photos, each cropped at a place and size of its
own and saved as a JPEG (so no two pictures are the same bytes, and each decodes at the cost of a
photo), each under K captions of its own, the rows shuffled. mbm runs with ``[runner] dedupe`` on (its
default), which decodes and featurizes each picture once; once more with it off; the baselines as a
user writes them, every row's picture decoded and extracted.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from incremental import SAMPLE
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
