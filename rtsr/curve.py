"""CURVE security for the ZeroMQ services (ZeroMQ's own "Ironhouse" pattern, through `zmq.auth`).

    rtsr keygen keys/                          # server, client, worker and admin pairs; authorized/, workers/, admins/
    rtsr serve --bind tcp://0.0.0.0:5557 --curve-keys keys/
    rtsr filter in.wav out.wav --connect tcp://host:5557 --curve-keys keys/

Every connection is encrypted. A server socket plays one role, told to the ZAP authenticator thread as
its ZAP domain: "clients" (serve's ROUTER, the broker's frontend) lets in keys in DIR/authorized/ or
DIR/admins/, "workers" (the broker's backend) only keys in DIR/workers/, so a client key cannot register
as a worker. Anyone else is never answered. The folders are read again when they change: copying a `.key`
(public part only) in lets that peer in, removing it shuts it out, from the next handshake on, without a
restart. A peer connects with the secret key of its pair (client, worker or admin) and checks the server
against DIR/server.key; `peer_is_admin` tells whether a message came from an admin key.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import shutil
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

log = logging.getLogger("rtsr.curve")
AUTHORIZED, WORKERS, ADMINS = "authorized", "workers", "admins"
ServerRole = Literal["clients", "workers"]  # a server socket's ZAP domain
ClientRole = Literal["client", "worker", "admin"]  # the pair a peer connects with
LETS_IN: dict[str, tuple[str, ...]] = {"clients": (AUTHORIZED, ADMINS), "workers": (WORKERS,)}
PAIR_FOLDER: dict[str, str] = {"client": AUTHORIZED, "worker": WORKERS, "admin": ADMINS}  # where keygen authorises it
PAIRS = ("server", *PAIR_FOLDER)
LOG_EVERY_S = 60.0  # a refused key is logged at most this often
MAX_LOGGED_KEYS = 1024  # refused keys remembered for that; past it (a flood of strangers) no more lines


class CurveKeyError(ValueError):
    """A key folder that cannot be used: missing or unreadable certificates."""


def _role(role: str, roles: Mapping[str, object]) -> str:
    if role not in roles:
        raise ValueError(f"unknown CURVE role {role!r}: one of {', '.join(roles)}")
    return role


class _KeyFolder:
    """The public keys in one folder, read again whenever its listing (names, inodes, mtimes, sizes) changes;
    a missing folder holds no keys. Shared by the ZAP thread and the serving loop, hence the lock."""

    def __init__(self, path: Path):
        self.path = path
        self._lock = threading.Lock()
        self._listing: tuple | None = None
        self._keys: frozenset[bytes] = frozenset()

    def keys(self) -> frozenset[bytes]:
        listing = self._list()
        with self._lock:
            if listing != self._listing:
                self._keys, self._listing = self._load(listing or ()), listing
            return self._keys

    def _list(self) -> tuple | None:
        try:
            entries = list(os.scandir(self.path))
        except OSError:
            return None
        listing = []
        for e in entries:
            try:
                if e.name.endswith(".key"):
                    st = e.stat()
                    listing.append((e.name, st.st_ino, st.st_mtime_ns, st.st_size))
            except OSError:  # removed meanwhile: gone
                continue
        return tuple(sorted(listing))

    def _load(self, listing: tuple) -> frozenset[bytes]:
        keys = set()
        for name, *_ in listing:
            try:
                keys.add(zmq.auth.load_certificate(self.path / name)[0])
            except (OSError, ValueError) as e:  # half-copied or not a key: read again once it changes
                log.warning("CURVE: skipping %s: %s", self.path / name, e)
        return frozenset(keys)


@dataclass(frozen=True)
class CurveKeys:
    """The certificates of one key folder; each side uses the parts it needs."""

    folder: Path
    _folders: dict[str, _KeyFolder] = field(default_factory=dict, init=False, repr=False, compare=False)

    def _pair(self, name: str, secret: bool) -> tuple[bytes, bytes | None]:
        path = self.folder / (f"{name}.key_secret" if secret else f"{name}.key")
        if not path.exists():
            if name in ("worker", "admin"):
                raise CurveKeyError(f"{path} is missing: {self._no_pair(name)}")
            raise CurveKeyError(f"{path} is missing (make a key folder with `rtsr keygen {self.folder}`)")
        try:
            return zmq.auth.load_certificate(path)
        except (OSError, ValueError) as e:
            raise CurveKeyError(f"cannot read {path}: {e}") from e

    def _no_pair(self, pair: str) -> str:
        """What to do with a folder from before worker and admin keys."""
        return (f"folders from an older `rtsr keygen` have no {pair} keys; run `rtsr keygen NEW` into a new folder "
                f"and use it, or move NEW/{pair}.key, NEW/{pair}.key_secret and NEW/{PAIR_FOLDER[pair]}/ into "
                f"{self.folder}")

    def check(self, server: bool, role: str | None = None) -> None:
        """Fail early, before any socket exists, when this side's files are not there. role: a server's
        ("clients" unless given) or the pair a client side connects with ("client" unless given)."""
        if server:
            role = _role(role or "clients", LETS_IN)
            self._pair("server", True)
            needed = self.folder / LETS_IN[role][0]
            if not needed.is_dir():
                why = self._no_pair("worker") if role == "workers" else "no client could be let in"
                raise CurveKeyError(f"{needed} is missing: {why}")
        else:
            self._pair(_role(role or "client", PAIR_FOLDER), True)
            self._pair("server", False)

    def make_server(self, sock: zmq.Socket, role: ServerRole) -> None:
        """Server side of the handshake; the role, as ZAP domain, says which folders the authenticator
        lets in on this socket."""
        public, secret = self._pair("server", True)
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_server = True
        sock.zap_domain = _role(role, LETS_IN).encode()

    def make_client(self, sock: zmq.Socket, role: ClientRole = "client") -> None:
        """Client side: connect with the role's pair (a broker-side worker as "worker"), checking the server."""
        public, secret = self._pair(_role(role, PAIR_FOLDER), True)
        sock.curve_secretkey, sock.curve_publickey = secret, public
        sock.curve_serverkey = self._pair("server", False)[0]

    def public_keys(self, sub: str) -> frozenset[bytes]:
        """The z85 public keys now in DIR/sub (authorized, workers or admins), read again when it changes."""
        return self._folders.setdefault(sub, _KeyFolder(self.folder / sub)).keys()

    def authenticator(self, ctx: zmq.Context) -> ThreadAuthenticator:
        """Started ZAP handler for ctx's server sockets: each role's folders, as they are at each handshake."""
        auth = ThreadAuthenticator(ctx, log=logging.getLogger("rtsr.curve.zap"))
        admission = _Admission(self)
        for domain in LETS_IN:
            auth.configure_curve_callback(domain, admission)
        auth.start()
        return auth


class _Admission:
    """zmq.auth's credentials provider: on a domain, the keys in its folders get in. Each refusal is logged
    (a key at most once a minute), so a server's log says why a peer gets no reply."""

    def __init__(self, keys: CurveKeys):
        self.keys = keys
        self.logged: dict[bytes, float] = {}

    def callback(self, domain: str, key: bytes) -> bool:
        try:
            if any(key in self.keys.public_keys(sub) for sub in LETS_IN[domain]):
                return True
            self._refused(domain, key)
        except Exception:  # raised out of here, it would end the ZAP thread, and no one would get in again
            log.exception("CURVE: checking a key on %r failed; refused", domain)
        return False

    def _refused(self, domain: str, key: bytes) -> None:
        now = time.monotonic()
        if len(self.logged) >= MAX_LOGGED_KEYS:
            self.logged = {k: t for k, t in self.logged.items() if now - t < LOG_EVERY_S}
        if now - self.logged.get(key, -LOG_EVERY_S) < LOG_EVERY_S or len(self.logged) >= MAX_LOGGED_KEYS:
            return
        self.logged[key] = now
        folders = LETS_IN[domain]
        why = f"not in {' or '.join(f'{self.keys.folder / sub}/' for sub in folders)}"
        for pair, sub in PAIR_FOLDER.items():
            if sub not in folders and key in self.keys.public_keys(sub):
                why += f" (it is a {pair} key)"
        log.warning("CURVE: refused key %s... on %s: %s", key[:8].decode("ascii", "replace"), domain, why)


def peer_is_admin(frame: zmq.Frame, keys: CurveKeys | None) -> bool:
    """May this message's peer make admin requests (stats)? With CURVE, when its key (the User-Id zmq.auth
    gives it) is in admins/ now; without, when it is on loopback (127.0.0.0/8, ::1, also IPv4-mapped).
    Anything unreadable (no such property, ipc, inproc) is no admin."""
    try:
        if keys is not None:
            return frame.get("User-Id").encode() in keys.public_keys(ADMINS)
        ip = ipaddress.ip_address(frame.get("Peer-Address").split("%")[0])
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        return ip.is_loopback
    except Exception:  # a check that fails closed
        return False


def keygen(folder: Path) -> list[Path]:
    """Write the server's pair and a client, a worker and an admin pair, each authorised in its folder
    (authorized/, workers/, admins/); never replaces keys."""
    names = [f"{p}{ext}" for p in PAIRS for ext in (".key", ".key_secret")]
    names += [f"{sub}/{pair}.key" for pair, sub in PAIR_FOLDER.items()]
    if existing := [folder / n for n in names if (folder / n).exists()]:
        raise CurveKeyError(f"{existing[0]} exists already: keys are not replaced (remove them first)")
    folder.mkdir(parents=True, exist_ok=True)
    for pair in PAIRS:
        public, secret = zmq.auth.create_certificates(folder, pair)
        Path(secret).chmod(0o600)
        if pair in PAIR_FOLDER:
            (folder / PAIR_FOLDER[pair]).mkdir(exist_ok=True)
            shutil.copy(public, folder / PAIR_FOLDER[pair] / f"{pair}.key")
    return [folder / n for n in names]


def curve_keys(folder: str | Path | None, server: bool, role: str | None = None) -> CurveKeys | None:
    """--curve-keys DIR as keys checked for this side (server or client) and role (as `CurveKeys.check`),
    or None without it."""
    if folder is None:
        return None
    keys = CurveKeys(Path(folder))
    keys.check(server, role)
    return keys


def add_curve_argument(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--curve-keys", type=Path, metavar="DIR",
                   help=f"CURVE encryption and authentication with the keys `rtsr keygen DIR` wrote: {what}")


def beyond_loopback(endpoint: str) -> bool:
    """A TCP endpoint that other hosts can reach (ipc and inproc never are; `*` and 0.0.0.0 are)."""
    if not endpoint.startswith("tcp://"):
        return False
    host = endpoint[len("tcp://"):].rsplit(":", 1)[0].strip("[]")
    try:
        return not ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host != "localhost"


def warn_if_open(endpoint: str, keys: CurveKeys | None, program: str) -> None:
    """A loud warning for a TCP endpoint bound beyond loopback with no keys: anyone who reaches the
    port can use the service, in clear text."""
    if keys is None and beyond_loopback(endpoint):
        log.warning("WARNING: %s listens on %s without --curve-keys: anyone who can reach this port can use "
                    "it, unencrypted. Make keys with `rtsr keygen DIR` and pass --curve-keys DIR.", program, endpoint)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "keygen", help="write CURVE keys for serve, broker, filter and clients (--curve-keys DIR)",
        description="Write DIR/server.key(_secret) and the client, worker and admin pairs DIR/client.key(_secret), "
                    "DIR/worker.key(_secret), DIR/admin.key(_secret), each authorised by a copy of its public key: "
                    "DIR/authorized/client.key, DIR/workers/worker.key, DIR/admins/admin.key. Give serve and the "
                    "broker the folder without the client, worker and admin secrets; give each peer server.key and "
                    "its own pair's secret. Existing keys are never replaced.")
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
