"""CURVE security for the ZeroMQ services (ZeroMQ's own "Ironhouse" pattern, through `zmq.auth`).

    rtsr keygen keys/                          # keys/server.key(_secret), client.key(_secret), authorized/
    rtsr serve --bind tcp://0.0.0.0:5557 --curve-keys keys/
    rtsr filter in.wav out.wav --connect tcp://host:5557 --curve-keys keys/

Every connection is encrypted; a server (serve's ROUTER, the broker's two ROUTERs) accepts only
peers whose public key is in DIR/authorized/ (a ZAP authenticator thread does the checking, so a
client without keys, or with a key not listed there, is never answered). Clients and broker-side
workers connect with DIR/client.key_secret and check the server against DIR/server.key. To let
another client in, copy its `.key` (public part only) into the server's authorized/ folder.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("rtsr.curve")
AUTHORIZED = "authorized"
LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


class CurveKeyError(ValueError):
    """A key folder that cannot be used: missing or unreadable certificates."""


@dataclass(frozen=True)
class CurveKeys:
    """The certificates of one key folder; each side uses the parts it needs."""

    folder: Path

    def _pair(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        path = self.folder / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.exists():
            raise CurveKeyError(f"{path} is missing (make a key folder with `rtsr keygen {self.folder}`)")
        try:
            return zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise CurveKeyError(f"cannot read {path}: {e}") from e

    def check(self, server: bool) -> None:
        """Fail early, before any socket exists, when this side's files are not there."""
        if server:
            self._pair("server", True)
            if not (self.folder / AUTHORIZED).is_dir():
                raise CurveKeyError(f"{self.folder / AUTHORIZED} is missing: no client could be let in")
        else:
            self._pair("client", True)
            self._pair("server", False)

    def make_server(self, sock: zmq.Socket) -> None:
        public, secret = self._pair("server", True)
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_server = True

    def make_client(self, sock: zmq.Socket) -> None:
        public, secret = self._pair("client", True)
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = self._pair("server", False)[0]

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """Started ZAP handler for ctx: CURVE peers whose key is in authorized/ get in, no one else."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("rtsr.curve.zap"))
        auth.start()
        auth.configure_curve(domain="*", location=str(self.folder / AUTHORIZED))
        return auth


def keygen(folder: Path) -> list[Path]:
    """Write a server and a client certificate and authorise the client; never replaces keys."""
    names = ("server.key", "server.key_secret", "client.key", "client.key_secret")
    if existing := [folder / n for n in names if (folder / n).exists()]:
        raise CurveKeyError(f"{existing[0]} exists already: keys are not replaced (remove them first)")
    folder.mkdir(parents=True, exist_ok=True)
    (folder / AUTHORIZED).mkdir(exist_ok=True)
    zmq.auth.create_certificates(folder, "server")
    client_public, _ = zmq.auth.create_certificates(folder, "client")
    shutil.copy(client_public, folder / AUTHORIZED / "client.key")
    (folder / "server.key_secret").chmod(0o600)
    (folder / "client.key_secret").chmod(0o600)
    return [folder / n for n in names] + [folder / AUTHORIZED / "client.key"]


def curve_keys(folder: str | Path | None, server: bool) -> CurveKeys | None:
    """--curve-keys DIR as keys checked for this side (server or client), or None without it."""
    if folder is None:
        return None
    keys = CurveKeys(Path(folder))
    keys.check(server)
    return keys


def add_curve_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--curve-keys", type=Path, metavar="DIR",
                   help=f"CURVE encryption and authentication with the keys `rtsr keygen DIR` wrote: {what}")


def warn_if_open(endpoint: str, keys: CurveKeys | None, program: str) -> None:
    """A loud warning for a TCP endpoint bound beyond loopback with no keys: anyone who reaches the
    port can use the service, in clear text."""
    if keys is not None or not endpoint.startswith("tcp://"):
        return
    host = urlsplit(endpoint).hostname or endpoint[len("tcp://"):].rsplit(":", 1)[0]
    if host not in LOOPBACK:
        log.warning("WARNING: %s listens on %s without --curve-keys: anyone who can reach this port can use "
                    "it, unencrypted. Make keys with `rtsr keygen DIR` and pass --curve-keys DIR.", program, endpoint)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keygen", help="write CURVE keys for serve, broker, filter and clients (--curve-keys DIR)",
        description="Write DIR/server.key, DIR/server.key_secret, DIR/client.key, DIR/client.key_secret and "
                    "DIR/authorized/client.key (the clients let in). Give the server side the whole folder; "
                    "give a client its client.key_secret and server.key. Existing keys are never replaced.")
    p.add_argument("folder", type=Path, metavar="DIR")
    p.set_defaults(func=run_keygen)


def run_keygen(args: argparse.Namespace) -> int:
    try:
        written = keygen(args.folder)
    except (CurveKeyError, OSError) as e:
        print(f"rtsr keygen: {e}", file=sys.stderr)
        return 2
    print("\n".join(str(p) for p in written))
    return 0
