"""The `prospect` command line.

Exit codes (DESIGN.md §6): 0 success; 2 a user error (bad config, bad data, missing file) with a
one-paragraph message and no traceback; 1 anything else (a bug: the traceback is shown).
"""

from __future__ import annotations

import argparse
import sys

from prospect.errors import UserError

def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    try:
        args.run(args)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="prospect",
        description="LoRA fine-tuning (SFT and KTO) from one YAML file.",
        epilog="Config keys: see examples/README.md. Any key can be overridden as key=value.",
    )
    commands = parser.add_subparsers(metavar="COMMAND")

    data = commands.add_parser("data", help="check or preview the training data")
    data_commands = data.add_subparsers(metavar="ACTION")
    check = data_commands.add_parser("check", help="validate the data and print token statistics")
    _config_args(check)
    check.set_defaults(run=_data_check)
    preview = data_commands.add_parser("preview", help="print encoded examples with trained spans marked")
    _config_args(preview)
    preview.add_argument("--n", type=int, default=3, help="how many examples to print (default 3)")
    preview.set_defaults(run=_data_preview)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")


def _load(args):
    from prospect.config import load_config

    return load_config(args.config, args.overrides)


def _prepare(args):
    """Config, tokenizer (no model weights) and encoded data, for the `data` commands."""
    from prospect.data.pipeline import prepare_data
    from prospect.model import load_tokenizer

    config = _load(args)
    tokenizer = load_tokenizer(config.model_name_or_path, trust_remote_code=config.trust_remote_code,
                               cache_dir=config.cache_dir)
    return config, tokenizer, prepare_data(config, tokenizer)


def _data_check(args) -> None:
    from prospect.data.report import print_check

    config, tokenizer, data = _prepare(args)
    print_check(config, data)


def _data_preview(args) -> None:
    from prospect.data.report import print_preview

    config, tokenizer, data = _prepare(args)
    print_preview(config, tokenizer, data, args.n)
