"""Draw a 4x4 grid of built-in phantoms into docs/phantoms.png.

    python benchmarks/make_phantom_figure.py [--out docs/phantoms.png] [--resolution 128]

The first row shows two patients twice each: with their normal heart and with the same
heart enlarged (a true counterfactual: nothing else changes). The other rows alternate
healthy and cardiomegaly cases; titles give the CTR derived from the phantom parameters.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cxredit.data.phantom import (  # noqa: E402
    heart_scale_for_ctr,
    render,
    sample_case,
)

ROOT = Path(__file__).resolve().parent.parent


def panels(resolution: int) -> list[tuple[object, str]]:
    """The 16 (image, title) panels, in reading order."""
    out = []
    for seed, enlarged_ctr in ((11, 0.60), (14, 0.58)):  # counterfactual pairs
        subject, h = sample_case(seed, cardiomegaly=False)
        for hs, what in ((h, "normal heart"), (heart_scale_for_ctr(subject, enlarged_ctr),
                                                "same, heart enlarged")):
            p = render(subject, hs, resolution)
            out.append((p.image, f"#{seed} {what}\nCTR {p.ctr:.2f}"))
    for k in range(12):
        seed, cardio = 100 + k, k % 2 == 1
        subject, h = sample_case(seed, cardio)
        p = render(subject, h, resolution)
        label = "cardiomegaly" if cardio else "healthy"
        extra = f", {subject.sex}" + (", pacemaker" if subject.device else "")
        out.append((p.image, f"#{seed} {label}{extra}\nCTR {p.ctr:.2f}"))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "phantoms.png")
    ap.add_argument("--resolution", type=int, default=128)
    args = ap.parse_args(argv)
    fig, axes = plt.subplots(4, 4, figsize=(8.4, 9.6), dpi=100)
    for ax, (image, title) in zip(axes.ravel(), panels(args.resolution)):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        ax.set_title(title, fontsize=7.5, linespacing=1.1)
        ax.axis("off")
    fig.suptitle("cxredit phantoms (PA; patient's right on the image left)", fontsize=10)
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.04, hspace=0.22)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out)
    plt.close(fig)
    print(f"wrote {args.out} ({args.out.stat().st_size / 1024:.0f} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
