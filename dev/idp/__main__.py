"""``python -m ztlab.dev.idp``: run the development IdP in the foreground.

    python -m ztlab.dev.idp --state-dir /tmp/devidp --port 8009 \\
        --client-id hub --client-secret s3cret \\
        --redirect-uri http://127.0.0.1:8000/hub/oauth_callback

or ``--config FILE`` with a JSON object of the same settings::

    {"state_dir": "...", "port": 8009, "issuer": "http://127.0.0.1:8009",
     "clients": [{"client_id": "hub", "client_secret": "...", "redirect_uris": ["..."]}],
     "users": {...}}

Without ``users`` the demonstration users are served (see ``demo_users``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from ztlab.common.errors import ZtlabError
from ztlab.dev.idp.launcher import DevIdP, DevIdPError, demo_users, run_forever


def _build(argv: list[str] | None) -> DevIdP:
    parser = argparse.ArgumentParser(prog="python -m ztlab.dev.idp", description=__doc__)
    parser.add_argument("--config", type=Path, help="a JSON file with the settings below")
    parser.add_argument("--state-dir", type=Path)
    parser.add_argument("--port", type=int)
    parser.add_argument("--issuer")
    parser.add_argument("--client-id")
    parser.add_argument("--client-secret")
    parser.add_argument("--redirect-uri", action="append", default=[])
    args = parser.parse_args(argv)

    settings: dict[str, object] = {}
    if args.config is not None:
        try:
            loaded = json.loads(args.config.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise DevIdPError(f"{args.config}: cannot read the IdP settings: {exc}") from exc
        if not isinstance(loaded, dict):
            raise DevIdPError(f"{args.config}: expected a JSON object")
        settings.update(loaded)
    for key in ("state_dir", "port", "issuer"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.client_id:
        settings["clients"] = [
            {
                "client_id": args.client_id,
                "client_secret": args.client_secret or "",
                "redirect_uris": args.redirect_uri,
            }
        ]
    if "state_dir" not in settings or "clients" not in settings:
        raise DevIdPError(
            "devidp: give --state-dir and a client (--client-id, --client-secret, "
            "--redirect-uri), or --config FILE"
        )
    users = settings.get("users") or demo_users()
    port = settings.get("port", 0)
    issuer = settings.get("issuer")
    clients = settings["clients"]
    if not isinstance(users, dict) or not isinstance(clients, list):
        raise DevIdPError("devidp: users must be an object and clients a list")
    if not isinstance(port, int) or not (issuer is None or isinstance(issuer, str)):
        raise DevIdPError("devidp: port must be an integer and issuer a string")
    return DevIdP(
        users=users,
        clients=clients,
        state_dir=Path(str(settings["state_dir"])),
        port=port,
        issuer=issuer,
    )


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    try:
        run_forever(_build(argv))
    except ZtlabError as exc:
        print(f"error: {exc.diagnostics()}", file=sys.stderr)
        return exc.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
