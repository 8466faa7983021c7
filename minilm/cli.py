"""What the command lines (train.py, infer.py, python -m minilm.evaluate) share: one-line errors, strictly read values,
stopping on signals, the end of a process torchrun started.

No torch here: infer.py checks its arguments before importing it, so that `--help` and mistakes are instant.
"""

import argparse
import os
import re
import signal
import sys

# Python's int() and float() also take "1_0" (10), " 7 " and other scripts' digits ("٣" is 3): a typo would pass
WHOLE = re.compile(r"[+-]?[0-9]+")
REAL = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?|[+-]?(inf|infinity|nan)", re.IGNORECASE)


class ArgumentParser(argparse.ArgumentParser):
    """argparse, and:
      * a mistake is one line, exit status 2, like every other error of these tools (argparse prints its usage line
        above the error; the usage is one `--help` away);
      * no abbreviations: a typo (--epoch) is not taken for another option (--epochs);
      * `--batch_size` for `--batch-size`, as Hugging Face's argument parser takes;
      * a negative number as an option's value (`--lr -1e-5`, which argparse takes for an option, as it reads only
        `-1` and `-.5` as numbers), so that the option's own rule says what is wrong with it;
      * `renamed`: what other tools call an option ({"learning_rate": "--lr"}), named in the error when it is used
        here (a hint, never an alias: `per_device_train_batch_size` is not the global `--batch-size`)."""

    def __init__(self, *args, renamed: dict | None = None, **kwargs):
        super().__init__(*args, allow_abbrev=False, **kwargs)
        self.renamed = renamed or {}

    def error(self, message):
        if message.startswith("unrecognized arguments: "):
            unknown = message.removeprefix("unrecognized arguments: ").split()
            for arg in unknown:
                name = arg.partition("=")[0].lstrip("-").replace("-", "_")
                if arg.startswith("--") and name in self.renamed:
                    message += f"; for Hugging Face's --{name}, use {self.renamed[name]}"
                    break
            else:
                texts = any(not action.option_strings for action in self._actions)  # infer.py's QUERY PASSAGE...
                if texts and any(arg.startswith("-") and not arg.startswith("--") for arg in unknown):
                    message += "; a text that starts with '-'? put `--` before the texts"
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(self.rewritten(args), namespace)

    def parse_known_intermixed_args(self, args=None, namespace=None):  # Python >= 3.12.8 does not go through the above
        return super().parse_known_intermixed_args(self.rewritten(args), namespace)

    def rewritten(self, args) -> list:
        """`args` with `--x_y` as `--x-y` and `--opt -1e-5` as `--opt=-1e-5`, for this parser's own options only (a
        passage such as "--snake_case is a style" stays as written); the same when applied twice."""
        args = sys.argv[1:] if args is None else list(args)
        end = args.index("--") if "--" in args else len(args)  # after it, nothing is an option
        out = []
        for a in args[:end]:
            name, equals, value = a.partition("=")
            if a.startswith("--") and name.replace("_", "-") in self._option_string_actions:
                a = name.replace("_", "-") + equals + value
            action = self._option_string_actions.get(out[-1]) if out else None
            if action is not None and action.nargs is None and a.startswith("-") and REAL.fullmatch(a):
                out[-1] += f"={a}"
            else:
                out.append(a)
        return out + args[end:]


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


def stop_on_signals(handler) -> None:
    """`handler` for SIGTERM and SIGHUP (SIGHUP stays ignored under nohup). Under torchrun also SIGTERM when torchrun
    dies: it starts its processes in sessions of their own, so `kill -9` of torchrun (or the out-of-memory killer)
    left them running on, holding their GPUs, and train.py's --output lock."""
    for signum in (signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, handler)
    if "TORCHELASTIC_RUN_ID" in os.environ and sys.platform.startswith("linux"):
        import ctypes

        # Not checked: whether torchrun died before this call (the process would then find no rendezvous to join).
        # A parent process id of 1 says nothing here: in a container torchrun itself is often process 1.
        set_parent_death_signal = 1  # PR_SET_PDEATHSIG, from <sys/prctl.h>
        ctypes.CDLL(None).prctl(set_parent_death_signal, signal.SIGTERM)


def exit_after_process_group(status: int):
    """Exit with `status`, skipping the interpreter's teardown: for a process torchrun started, once it has destroyed
    its process group and closed its files.

    destroy_process_group() leaves gloo's threads running (torch 2.13), and now and then the teardown then aborts
    ("terminate called without an active exception", SIGABRT; 1 of about 600 two-process infer.py runs here, and once
    in CI), so that torchrun reports as failed a run that wrote all its output. Nothing is left to do at this point
    but flush the standard streams; atexit handlers do not run (a tool that reports through one, such as coverage.py,
    sees nothing of a torchrun process)."""
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):  # a full disk or a closed pipe behind stdout: as Python's own exit would, fail
            status = status or 120
    os._exit(status)
