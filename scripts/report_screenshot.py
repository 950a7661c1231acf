"""A PNG of a job's report as headless chromium draws it (docs/images/report.png).

    python scripts/report_screenshot.py out/JOB_ID/report.html docs/images/report.png
    python scripts/report_screenshot.py REPORT.html OUT.png --width 1200 --height 1600

Drives chromium over the DevTools protocol with the tests' driver (tests/browser.py),
which also says whether the page logged an error or asked the network for anything:
either fails the script, so a screenshot in the docs is one of a report that works offline.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a file: tests/ is importable from the repository's root

from tests.browser import open_page  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("report", type=Path, help="a report.html")
    parser.add_argument("png", type=Path, help="where to write the screenshot")
    parser.add_argument("--width", type=int, default=1200)
    parser.add_argument("--height", type=int, default=1600)
    args = parser.parse_args(argv)
    with open_page(args.report, width=args.width, height=args.height) as page:
        args.png.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(args.png)
        errors, external = page.console_errors, page.external_requests
    if errors or external:
        print(f"error: the report logged {errors} and requested {external}", file=sys.stderr)
        return 1
    print(f"{args.png} ({args.png.stat().st_size:,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
