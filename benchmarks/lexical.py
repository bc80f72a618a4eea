"""The lexical hybrid (issue 24): MiniLM-L6 and TF-IDF fused under one head, against the rest.

`few_labels.py` on its two real text sets (short fortunes; long, technical Debian package
descriptions) with its subject set to `tfxfer-hybrid` (`--backbone minilm-l6,tfidf`, every
other setting at the text recipe's default) and target (1) at +1 point over the best of the
others run beside it: the text recipe's default (MiniLM alone), keras-hub's two-line fit,
frozen MiniLM + LR, TF-IDF + LR, and both side by side + LR (`hybrid-lr`: issue 24's row).
Every argument is `few_labels.py`'s; these are the defaults this script adds:

    .venv/bin/python benchmarks/lexical.py                                   # 8, 64, all; 3 seeds
    .venv/bin/python benchmarks/lexical.py --budgets 8 64 \\
        --variants tfxfer-hybrid,minilm-lr,tfidf-lr,hybrid-lr
"""

from __future__ import annotations

import sys

import few_labels

DEFAULTS = {
    "--datasets": ["fortunes,debian-sections"],
    "--budgets": ["8", "64", "all"],
    "--variants": ["tfxfer-hybrid,tfxfer,keras-hub,minilm-lr,tfidf-lr,hybrid-lr"],
    "--subject": ["tfxfer-hybrid"],
    "--margin": ["1"],
    "--section": ["lexical"],
}


def with_defaults(argv: list[str]) -> list[str]:
    """`argv` plus each of `DEFAULTS` it does not give itself."""
    given = {arg.split("=", 1)[0] for arg in argv if arg.startswith("--")}
    extra = [
        part for flag, values in DEFAULTS.items() if flag not in given for part in (flag, *values)
    ]
    return extra + argv


if __name__ == "__main__":
    argv = sys.argv[1:]
    sys.exit(few_labels.main(argv if "--child" in argv else with_defaults(argv)))
