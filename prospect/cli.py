"""The `prospect` command line.

Exit codes: 0 success; 2 a user error (bad config, bad data, missing file) with a
one-paragraph message and no traceback; 1 anything else (a bug: the traceback is shown).

Every command takes a config file and `key=value` overrides; the work itself lives in the module
each command names, imported only when that command runs, so `prospect --help` stays instant.
"""

from __future__ import annotations

import argparse
import logging
import sys
import warnings

from prospect.errors import UserError


def main(argv: list[str] | None = None) -> int:
    # PEFT reads a transformers attribute that 5.x deprecated; the warning is not the user's to fix.
    warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
    # bitsandbytes (imported by PEFT whenever installed) asks the hub for an optional CPU kernel and
    # warns when it cannot have it; its own CPU kernel runs instead.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
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

    train = commands.add_parser("train", help="train (SFT or KTO; on Ray when USE_RAY=1 or ray_num_workers > 1)")
    _config_args(train)
    train.set_defaults(run=_train)

    data = commands.add_parser("data", help="check or preview the training data")
    data_commands = data.add_subparsers(metavar="ACTION")
    check = data_commands.add_parser("check", help="validate the data and print token statistics")
    _config_args(check)
    check.set_defaults(run=_data_check)
    preview = data_commands.add_parser("preview", help="print encoded examples with trained spans marked")
    _config_args(preview)
    preview.add_argument("--n", type=int, default=3, help="how many examples to print (default 3)")
    preview.set_defaults(run=_data_preview)

    export = commands.add_parser("export", help="merge adapters into the base model and write a plain HF model")
    _config_args(export)
    export.set_defaults(run=_export)
    chat = commands.add_parser("chat", help="chat in the terminal with the base model + adapter(s)")
    _config_args(chat)
    chat.set_defaults(run=_chat)
    serve = commands.add_parser("serve", help="OpenAI-compatible HTTP server: one base model, many adapters")
    _config_args(serve)
    serve.set_defaults(run=_serve)
    evaluate = commands.add_parser("eval", help="held-out metrics of a trained run")
    _config_args(evaluate)
    evaluate.set_defaults(run=_eval)
    return parser


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML or JSON config file")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")


def _load(args):
    from prospect.config import load_config

    return load_config(args.config, args.overrides)


def _train(args) -> None:
    from prospect.allocator import set_allocator_env
    from prospect.launch import launch

    set_allocator_env()  # before anything imports torch
    launch(_load(args))


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


def _export(args) -> None:
    from prospect.export import export_model

    export_model(_load(args))


def _chat(args) -> None:
    from prospect.chat import chat

    chat(_load(args))


def _serve(args) -> None:
    from prospect.serve import serve

    serve(_load(args))


def _eval(args) -> None:
    from prospect.evaluate import evaluate

    evaluate(_load(args))
