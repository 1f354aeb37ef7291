"""The ``fiatprint`` command: one subcommand per module.

Each subcommand module exposes ``add_arguments(parser)`` and ``run(args) ->
int`` (the exit status); this file only wires them together.
"""

from __future__ import annotations

import argparse
import importlib
import sys

#: subcommand name -> (module, one-line help)
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "config": ("oracle.config", "check the settings and print them as TOML"),
    "price": ("oracle.price_cli", "compute the price from blocks or a vector file"),
    "replay": (
        "oracle.replay",
        "publish real blocks over ZMQ in Bitcoin Core's format",
    ),
    "serve": ("oracle.service_cli", "run the price service beside a Bitcoin Core node"),
    "demo": (
        "oracle.service_cli",
        "replay a real block into the service, no node needed",
    ),
}

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NO_DATA = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fiatprint",
        description="Exchange-free Bitcoin price from your own node's transactions.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args._run(args))
    except KeyboardInterrupt:
        return 130
    except BaseExceptionGroup as group:
        # Ctrl-C inside trio arrives wrapped in the nurseries' groups.
        _, rest = group.split(KeyboardInterrupt)
        if rest is None:
            return 130
        raise


if __name__ == "__main__":
    sys.exit(main())
