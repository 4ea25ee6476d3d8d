"""`quarl verl migrate SCRIPT.sh`: a launch script of the hardware-error verl fork -> plain verl + quarl.

    quarl verl migrate run_e13h.sh                  # writes run_e13h.quarl.sh and run_e13h.quarl.yaml
    quarl verl migrate run_e13h.sh -o new.sh        # writes new.sh and new.quarl.yaml

The fork's ``trainer.hw_error_injection.*`` / ``trainer.noise_injection.*`` overrides become the ``quarl:`` block
(the YAML file) and the plugin's overrides in the script (`quarl.verl.migrate`). What the fork did wrong is refused
with the reasons (exit code 2) and nothing is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("verl", help="quarl inside verl: migrate a launch script of the hardware-error verl fork")
    verl_sub = p.add_subparsers(dest="verl_command", metavar="VERL_COMMAND")
    m = verl_sub.add_parser("migrate", help="rewrite the fork's overrides into the quarl.verl plugin's")
    m.add_argument("script", type=Path, help="the fork's bash launch script")
    m.add_argument("-o", "--out", type=Path, help="rewritten script (default: SCRIPT with .quarl.sh)")
    m.set_defaults(func=_migrate)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def _migrate(args: argparse.Namespace) -> int:
    from quarl.verl.migrate import MigrationRefused, migrate

    out = args.out or args.script.with_suffix(".quarl.sh")
    config_path = out.with_suffix(".yaml") if out.name.endswith(".quarl.sh") else out.with_suffix(".quarl.yaml")
    try:
        result = migrate(args.script.read_text(), str(config_path.resolve()))
    except MigrationRefused as exc:
        print(f"quarl verl migrate: {args.script} was not migrated; the fork's settings below made its runs "
              "report something other than what they claimed:", file=sys.stderr)
        for reason in exc.reasons:
            print(f"  - {reason}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"quarl verl migrate: {exc}", file=sys.stderr)
        return 2
    out.write_text(result.script)
    out.chmod(0o755)
    config_path.write_text(result.yaml)
    print(f"wrote {out} and {config_path}")
    for note in result.notes:
        print(f"note: {note}")
    return 0
