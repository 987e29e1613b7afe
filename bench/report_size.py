"""Size of the HTML report for N synthetic previews at SIDE x SIDE (default 100 at 1024): index page, case pages,
thumbnails, full-size images, total. Synthetic records; the images are made and encoded as the runner makes them
(a JPEG q75 preview, renders a few levels off it, their heat maps); no model runs.

    python bench/report_size.py [N] [SIDE] [compact|lossless]     (default: both encodings, side by side)
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_report import measure  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
    side = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    modes = sys.argv[3:] or ["compact", "lossless"]
    for mode in modes:
        with tempfile.TemporaryDirectory() as tmp:
            figures = measure(Path(tmp) / "reports", n=n, side=side, mode=mode)
        width = max(map(len, figures))
        print(f"-- {mode} images")
        for key, value in figures.items():
            mb = f"  ({value / 1e6:.2f} MB)" if key.endswith("_bytes") or key == "bytes_per_preview" else ""
            print(f"{key:<{width}}  {value}{mb}")
        print(f"index under 2 MB: {figures['index_bytes'] < 2e6}; "
              f"total under 150 MB: {figures['total_bytes'] < 150e6}\n")


if __name__ == "__main__":
    main()
