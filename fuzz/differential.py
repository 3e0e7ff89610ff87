"""The differential framing suite's long mode: many more streams, several seeds.

    python fuzz/differential.py --cases 200000 --seed 1

Runs tests/home/httpdiff.py's generator and checks (tunneld's RequestReader and what
the proxy forwards, against aiohttp's C and pure-Python request parsers and h11),
prints the parsers' versions and the figures, writes every finding and unexplained
difference to --out, and exits 1 if there is any. Needs the test extra
(`pip install -e '.[test]'`), not atheris.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.home import httpdiff  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200_000, help="generated streams")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("differential-findings.txt"))
    args = parser.parse_args()
    print(httpdiff.versions(), flush=True)
    started = time.monotonic()
    report = httpdiff.run(args.seed, args.cases)
    elapsed = time.monotonic() - started
    print(f"seed {args.seed}: {report.summary()}")
    print(f"{elapsed:.0f} s, {report.cases / elapsed:.0f} cases/s")
    if not (report.findings or report.unexplained):
        return 0
    with args.out.open("w") as out:
        for name, raw, why in report.findings:
            out.write(f"finding {name}: {why}\n  {raw!r}\n")
        for raw, verdict in report.unexplained:
            out.write(f"unexplained {verdict}\n  {raw!r}\n")
    print(f"{len(report.findings) + len(report.unexplained)} written to {args.out}")
    return 1


if __name__ == "__main__":
    sys.exit(main())
