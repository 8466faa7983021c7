"""What the command lines (train.py, infer.py, python -m minilm.evaluate) share: one-line errors, strictly read values.

No torch here: infer.py checks its arguments before importing it, so that `--help` and mistakes are instant.
"""

import argparse
import re

# Python's int() and float() also take "1_0" (10), " 7 " and other scripts' digits ("٣" is 3): a typo would pass
WHOLE = re.compile(r"[+-]?[0-9]+")
REAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose mistakes are one line, exit status 2, like every other error of these tools (argparse prints its
    usage line above the error; the usage is one `--help` away)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def whole_number(minimum: int | None = None):
    """An argparse type: a whole number written in ASCII digits, at least `minimum`."""
    def parse(text: str) -> int:
        if not WHOLE.fullmatch(text):
            raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}")
        value = int(text)
        if minimum is not None and value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}, got {value}")
        return value
    return parse


def real_number(text: str) -> float:
    """An argparse type: a decimal number such as 5e-5, 0.1 or inf (each option's own rule then says which it takes)."""
    if not REAL.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}")
    return float(text)


def true_or_false(text: str) -> bool:
    """An argparse type: true or false, in any case."""
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")
    return text.lower() == "true"
