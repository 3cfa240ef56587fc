"""`ctd VERB --flags`: verbs only. Each verb is a function whose signature is its interface
(jsonargparse builds the parser from the type hints); it parses, calls the library, prints."""

from __future__ import annotations

import logging
import os
import sys

from ctd.errors import CtdError


def zoo() -> None:
    """List the packaged models: installed?, vocabulary size, and the pip command for each."""
    from ctd.report import console, table
    from ctd.zoo import ZOO, cache_dir

    rows = []
    for m in ZOO.values():
        cached = (cache_dir() / "models" / m.name / "config.json").exists()
        rows.append([m.name, "yes" if m.installed() else "no", "yes" if cached else "no",
                     f"{m.vocab_size:,}", m.about, m.pip])
    console().print(table(["name", "installed", "cached", "vocab", "what", "install"], rows))


VERBS = {"zoo": zoo}


def main(argv: list[str] | None = None) -> None:
    """Entry point of the `ctd` console script: user errors become one line and exit status 2."""
    from jsonargparse import auto_cli

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        auto_cli(VERBS, args=argv, as_positional=False)
    except CtdError as e:
        print(f"ctd: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("ctd: interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
