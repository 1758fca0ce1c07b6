"""Command-line plumbing for the scripts: a config dataclass becomes argparse flags, every flag is checked before
any work starts, and expected user errors print as one line instead of a traceback.

Skip on a first reading. Each config field is declared with `option(default, help, check=..., choices=...)` in a
dataclass derived from `Options`, which checks every value as the config is made; `parse_config` builds the
parser, parses, and refuses a bad value with argparse's one-line error naming the flag (exit status 2).
`run_command` runs a script's main() and turns the errors a user can fix (errors.UserError and the file errors:
a missing file, a wrong format, a mismatched checkpoint, a busy folder) into one line naming the thing and the
fix; anything else keeps its traceback, since that is a bug to report. Ctrl-C and SIGTERM stop a program with
one line too (what was saved, how to continue), exit status 130 / 143.
"""
import argparse
import contextlib
import dataclasses
import math
import signal
import sys
import types
import typing
from dataclasses import field

import torch

from utils.errors import Stopped, UserError


class ConfigError(UserError):
    """A combination of flags that cannot work, found after parsing (e.g. needs the backbone's size)."""


# The errors a user can fix by changing a flag or a file; they print as one line.
USER_ERRORS = (UserError, FileNotFoundError, NotADirectoryError, IsADirectoryError, PermissionError)


# -- declaring and checking options -------------------------------------------------------------------------

def option(default, help: str, check=None, choices=None, short: str | None = None, positional: str | None = None):
    """A config field with its command-line help, an optional check (see below) and allowed values; `short` adds
    a one-letter flag ("-k"); `positional` makes it an argument without a flag, with argparse's nargs ("+": one
    or more, a tuple field; "?": optional)."""
    return field(default=default, metadata={"help": help, "check": check, "choices": choices, "short": short,
                                            "positional": positional})


def at_least(low):
    return (f">= {low}", lambda value: value >= low)


def greater_than(low):
    return (f"> {low}", lambda value: value > low)


def between(low, high):
    return (f"between {low} and {high}", lambda value: low <= value <= high)


def _check_value(value, check) -> str | None:
    """None if `value` passes `check`, else what it must be."""
    if check is None or value is None:
        return None
    description, predicate = check
    if isinstance(value, float) and math.isnan(value):
        return f"a number {description}"
    return None if predicate(value) else description


def _field_type(annotation):
    """`int | None` -> int: the type argparse should convert to."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return next(a for a in typing.get_args(annotation) if a is not type(None))
    return annotation


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """argparse's help with each flag's default, except where its text gives the default already or there is
    none to show (None or empty: the flag does nothing unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "default" in text or action.default in (None, "", argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def build_parser(config_class, description: str, only_given: bool = False, prog: str | None = None,
                 leave_out=(), help_of: dict | None = None) -> argparse.ArgumentParser:
    """argparse from a config dataclass: each field is --field-name. With `only_given`, parsing returns just
    the options present on the command line. `prog` names the program in the usage line ("search.py index");
    `leave_out` lists fields that get no flag, and `help_of` replaces the help of some fields."""
    parser = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter,
                                     argument_default=argparse.SUPPRESS if only_given else None)
    for f in dataclasses.fields(config_class):
        if f.name in leave_out:
            continue
        flag = "--" + f.name.replace("_", "-")
        kind = _field_type(f.type)
        default = {} if only_given else {"default": f.default}
        flags = [flag] if not f.metadata.get("short") else [f.metadata["short"], flag]
        text = (help_of or {}).get(f.name, f.metadata["help"])
        if f.metadata.get("positional"):
            parser.add_argument(f.name, nargs=f.metadata["positional"], help=text, **default)
        elif kind is bool:
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, help=text, **default)
        else:
            parser.add_argument(*flags, type=kind, help=text, choices=f.metadata.get("choices"), **default)
    return parser


def parse_config(config_class, argv=None, description: str = "", prog: str | None = None):
    """Parse argv into a `config_class`; a value that fails its field's check is argparse's error (exit 2).
    Words left over after an optional text argument (`query a cup`) are a one-line ConfigError that shows the
    text in quotes."""
    parser = build_parser(config_class, description, prog=prog)
    namespace, extra = parser.parse_known_args(argv)
    if extra:
        texts = [f.name for f in dataclasses.fields(config_class) if f.metadata.get("positional") == "?"]
        given = getattr(namespace, texts[0]) if texts else None
        if given is not None and not any(word.startswith("-") for word in extra):
            quoted = " ".join([given, *extra])
            raise ConfigError(f"unrecognized arguments: {' '.join(extra)}; a text of several words goes in quotes, "
                              f"as one argument: \"{quoted}\"")
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return config_class(**vars(namespace))
    except ConfigError as error:  # a field's check (Options): argparse's one-line error, exit status 2
        parser.error(str(error))


class Options:
    """The base of each script's config dataclass: a value that fails its field's check, or is not one of its
    choices, is refused as the config is made, from the command line or in Python alike, so a config that exists
    holds valid values."""

    def __post_init__(self):
        check_config(self)


def check_config(config) -> None:
    """Each field's check and choices (`option`): a ConfigError naming the flag of the first that fails."""
    for f in dataclasses.fields(config):
        problem = _check_value(getattr(config, f.name), f.metadata.get("check"))
        if problem:
            raise ConfigError(f"--{f.name.replace('_', '-')}: must be {problem}, got {getattr(config, f.name)!r}")
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) is not None and getattr(config, f.name) not in choices:
            raise ConfigError(f"--{f.name.replace('_', '-')}: must be one of {', '.join(map(str, choices))}, "
                              f"got {getattr(config, f.name)!r}")


@contextlib.contextmanager
def flag_errors(**flag_of):
    """Turn a ValueError that names its field in `error.field` (vop.SettingError, from VoPConfig or VoP) into a
    ConfigError naming its flag ('--fn-layers: must be ...'); `flag_of` gives the flags of fields named
    otherwise (video_prompts="prompts"). Any other ValueError is a bug, and keeps its traceback."""
    try:
        yield
    except ValueError as error:
        field = getattr(error, "field", None)
        if field is None:
            raise
        flag = flag_of.get(field, field).replace("_", "-")
        raise ConfigError(f"--{flag}: {error.reason}") from None


def resolve_device(name: str) -> torch.device:
    """--device: "auto" is CUDA when there is one, else the CPU; a name torch does not know, or CUDA where
    there is none, is a ConfigError."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ConfigError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {name}: no CUDA device is available here; use --device cpu")
    return device


PRECISIONS = {"fp32": None, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of --precision: auto is fp16 on CUDA (with a GradScaler) and none (fp32) elsewhere."""
    if precision == "auto":
        return torch.float16 if device.type == "cuda" else None
    if precision not in PRECISIONS:
        raise ConfigError(f"--precision: unknown {precision!r}; choose auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[precision]


# -- running a command ------------------------------------------------------------------------------------

def run_command(main, argv=None, program: str | None = None):
    """main(argv), with the errors a user can fix printed as one line (exit status 2); the rest keep their
    traceback. SIGTERM stops it as Ctrl-C does: one line (what was saved, how to continue), then exit status
    143 (130 for Ctrl-C), after the program's own clean-up (locks released, worker processes ended)."""
    program = program or sys.argv[0].rsplit("/", 1)[-1]
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        return main(argv)
    except USER_ERRORS as error:
        message = str(error) or type(error).__name__
        print(f"{program}: error: {message}", file=sys.stderr)
        raise SystemExit(2) from None
    except KeyboardInterrupt as stop:
        by = getattr(stop, "signal", signal.SIGINT)
        print(f"{program}: stopped ({'SIGTERM' if by == signal.SIGTERM else 'Ctrl-C'}). {stop}".rstrip(),
              file=sys.stderr)
        raise SystemExit(128 + by) from None


def _stop_on_sigterm(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the process at once
    raise Stopped(signal_number=signal.SIGTERM)
