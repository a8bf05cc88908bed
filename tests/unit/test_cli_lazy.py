"""The command word imports only its own subcommand module, with the same parser."""

from __future__ import annotations

import argparse
import subprocess
import sys

from enforcer.cli.main import COMMAND_MODULES, SUBCOMMAND_MODULES, build_parser


def _choices(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def test_every_command_maps_to_the_module_that_registers_it() -> None:
    full = _choices(build_parser())
    assert set(COMMAND_MODULES) == set(full)
    assert set(COMMAND_MODULES.values()) == set(SUBCOMMAND_MODULES)
    for word, module in COMMAND_MODULES.items():
        alone = _choices(build_parser(module))
        assert list(alone) == [word]
        assert alone[word].format_help() == full[word].format_help()


def test_run_does_not_import_the_other_commands() -> None:
    code = (
        "import sys\n"
        "from enforcer.cli.main import main\n"
        "try:\n"
        "    main(['run', '--help'])\n"
        "except SystemExit:\n"
        "    pass\n"
        "print(sorted(m for m in sys.modules if m.startswith('enforcer.cli.')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    loaded = out.strip().splitlines()[-1]
    assert "enforcer.cli.run" in loaded
    for other in ("enforcer.cli.certs", "enforcer.cli.bench", "enforcer.cli.replay",
                  "enforcer.cli.intercept", "enforcer.cli.demo", "enforcer.cli.policy"):
        assert other not in loaded
