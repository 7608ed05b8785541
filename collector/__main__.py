"""Scripts that take part in annotation.

    PREFLOOP_PASSWORD=... python -m collector judge --app URL --user NAME --judge-url URL \\
        --judge-model NAME [--rubric FILE] [--votes N]

Exit codes: 0 done, 2 bad input or a refusal (one line on stderr).
"""

from __future__ import annotations

import argparse
import logging
import sys

from storage.errors import UserError
from storage.flags import add_flags, from_flags, parse


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m collector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    from collector.judge import JudgeConfig

    judge = sub.add_parser("judge", help="an AI judge that votes through the app's API like a person")
    add_flags(judge, JudgeConfig)
    args = parse(parser, argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        from collector.judge import run

        counts = run(from_flags(JudgeConfig, args))
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    print(f"done: {counts['votes']} votes ({counts['left']} left, {counts['right']} right, {counts['tie']} tie; "
          f"{counts['inconsistent']} inconsistent across orders; {counts['unreadable']} pairs unreadable)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
