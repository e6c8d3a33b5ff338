"""CURVE: `rtsr keygen` keys, roles (clients, workers, admins) told apart by one authenticator that rereads its
folders, and serve and broker letting in only authorised clients (real loopback sockets)."""

import logging
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from test_serve import running, wait_for_workers

from rtsr import protocol as P
from rtsr.broker import Broker
from rtsr.cli import main
from rtsr.client import Client, ServerError
from rtsr.curve import CurveKeyError, CurveKeys, keygen, peer_is_admin, warn_if_open
from rtsr.serve import Limits, Service, serve_router, serve_worker

ANY_PORT = "tcp://127.0.0.1:*"
TIMEOUT = 10.0
REFUSED_S = 0.5  # how long a refused peer is given to show it gets nothing


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("keys")
    assert main(["keygen", str(folder)]) == 0
    return folder


def open_with(endpoint: str, socket_setup: Callable[[zmq.Socket], None] | None, wait_s: float) -> dict | None:
    """A bare DEALER (set up by socket_setup) sends `open`; returns the reply header or None."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if socket_setup:
        socket_setup(s)
    s.connect(endpoint)
    try:
        s.send_multipart(P.encode({"type": "open", "stream": "a", "sr": 16000}))
        if not s.poll(int(wait_s * 1000)):
            return None
        return P.decode_header(s.recv_multipart()[0])
    finally:
        s.close(0)
        ctx.term()


def as_client(keys: Path) -> Callable[[zmq.Socket], None]:
    return CurveKeys(keys).make_client


@contextmanager
def curve_router(keys: Path, role: str) -> Iterator[tuple[zmq.Socket, str]]:
    """A bare CURVE ROUTER playing role, with the keys' authenticator; yields it and its endpoint."""
    ctx = zmq.Context()
    auth = CurveKeys(keys).authenticator(ctx)
    sock = ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    CurveKeys(keys).make_server(sock, role)
    sock.bind(ANY_PORT)
    try:
        yield sock, sock.getsockopt_string(zmq.LAST_ENDPOINT)
    finally:
        sock.close(0)
        auth.stop()
        ctx.term()


def reaches(server: tuple[zmq.Socket, str], keys: Path, role: str, wait_s: float = REFUSED_S) -> zmq.Frame | None:
    """A DEALER connecting with keys' `role` pair sends one message: the frame the server got, or None."""
    sock, endpoint = server
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    CurveKeys(keys).make_client(s, role)
    s.connect(endpoint)
    try:
        s.send(b"hello")
        return sock.recv_multipart(copy=False)[1] if sock.poll(int(wait_s * 1000)) else None
    finally:
        s.close(0)
        ctx.term()


def test_keygen_writes_the_four_pairs_authorised_and_never_replaces_them(keys, capsys):
    for pair in ("server", "client", "worker", "admin"):
        assert (keys / f"{pair}.key").is_file()
        assert (keys / f"{pair}.key_secret").stat().st_mode & 0o077 == 0
    for name in ("authorized/client.key", "workers/worker.key", "admins/admin.key"):
        assert (keys / name).read_bytes() == (keys / Path(name).name).read_bytes()
    before = (keys / "server.key_secret").read_bytes()
    assert main(["keygen", str(keys)]) == 2 and "exists already" in capsys.readouterr().err
    assert (keys / "server.key_secret").read_bytes() == before


def test_serve_answers_only_authorised_clients(up, keys, tmp_path):
    stranger = tmp_path / "stranger"
    keygen(stranger)  # valid keys, but its client key is not in `keys`/authorized
    wrong_server = tmp_path / "mixed"
    shutil.copytree(stranger, wrong_server)
    shutil.copy(keys / "client.key_secret", wrong_server / "client.key_secret")  # our key, the wrong server's
    svc = Service({"tiny": up}, "tiny", Limits())
    with running(lambda t: serve_router(svc, ANY_PORT, t), CurveKeys(keys)) as eps:
        ep = eps["router"]
        assert open_with(ep, None, 1.0) is None  # no keys: no reply at all
        assert open_with(ep, as_client(stranger), 1.0) is None  # a key not authorised
        assert open_with(ep, as_client(wrong_server), 1.0) is None  # expects another server key
        assert open_with(ep, as_client(keys), TIMEOUT)["type"] == "opened"
        x = (0.1 * np.random.default_rng(0).standard_normal((3200, 1))).astype(np.float32)
        c = Client(ep, timeout=TIMEOUT, curve_keys=keys)
        try:
            y = c.upscale(x, 16000, stream="b")
        finally:
            c.shutdown()
    assert np.abs(y - up.upscale(x, 16000)).max() <= 1e-5 * np.abs(y).max()
    assert svc.stats.opened == 2


def test_broker_with_keys_serves_authorised_clients_through_an_authorised_worker(up, keys):
    svc = Service({"tiny": up}, "tiny", Limits())
    with running(lambda t: Broker(ANY_PORT, ANY_PORT, t).run(), CurveKeys(keys)) as eps, \
            running(lambda t: serve_worker(svc, eps["backend"], t), CurveKeys(keys)):
        admin = Client(eps["frontend"], timeout=TIMEOUT, curve_keys=keys, curve_role="admin")
        c = Client(eps["frontend"], timeout=TIMEOUT, curve_keys=keys)
        try:
            wait_for_workers(admin, 1)
            with pytest.raises(ServerError, match="forbidden"):
                c.stats()  # for admin keys only
            x = (0.1 * np.random.default_rng(1).standard_normal((3200, 1))).astype(np.float32)
            y = c.upscale(x, 16000, stream="s")
        finally:
            c.shutdown()
            admin.shutdown()
        assert open_with(eps["frontend"], None, 1.0) is None
    assert np.abs(y - up.upscale(x, 16000)).max() <= 1e-5 * np.abs(y).max()


def test_broker_backend_refuses_a_client_key_posing_as_a_worker(up, keys, tmp_path, caplog):
    posing = tmp_path / "posing"
    shutil.copytree(keys, posing)
    shutil.copy(keys / "client.key_secret", posing / "worker.key_secret")  # a client's pair where a worker's goes
    client_key = zmq.auth.load_certificate(keys / "client.key")[0].decode()
    svc = Service({"tiny": up}, "tiny", Limits())
    with caplog.at_level(logging.WARNING, logger="rtsr.curve"), \
            running(lambda t: Broker(ANY_PORT, ANY_PORT, t).run(), CurveKeys(keys)) as eps, \
            running(lambda t: serve_worker(svc, eps["backend"], t), CurveKeys(posing)):
        deadline = time.monotonic() + TIMEOUT
        while not any(f"{client_key[:8]}... on workers" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, "the broker's backend let a client key in"
            time.sleep(0.05)


def test_missing_keys_are_a_clear_error(tmp_path, capsys):
    with pytest.raises(CurveKeyError, match="rtsr keygen"):
        Client("tcp://127.0.0.1:1", curve_keys=tmp_path)
    assert main(["broker", "--curve-keys", str(tmp_path)]) == 2
    assert "server.key_secret is missing" in capsys.readouterr().err


def test_binding_beyond_loopback_without_keys_warns(caplog, keys):
    with caplog.at_level(logging.WARNING, logger="rtsr.curve"):
        warn_if_open("tcp://127.0.0.1:5557", None, "rtsr serve")
        warn_if_open("tcp://0.0.0.0:5557", CurveKeys(keys), "rtsr serve")
        assert not caplog.records
        warn_if_open("tcp://0.0.0.0:5557", None, "rtsr serve")
        warn_if_open("tcp://*:5557", None, "rtsr broker")
    assert len(caplog.records) == 2 and "without --curve-keys" in caplog.records[0].message


def test_workers_domain_takes_only_worker_keys_and_clients_domain_clients_and_admins(keys, caplog):
    with caplog.at_level(logging.WARNING, logger="rtsr.curve"):
        with curve_router(keys, "workers") as server:
            assert reaches(server, keys, "client") is None  # a client cannot register as a worker
            assert reaches(server, keys, "admin") is None
            assert reaches(server, keys, "worker", TIMEOUT) is not None
        with curve_router(keys, "clients") as server:
            assert reaches(server, keys, "worker") is None
            assert reaches(server, keys, "admin", TIMEOUT) is not None
            assert reaches(server, keys, "client", TIMEOUT) is not None
    client_key = zmq.auth.load_certificate(keys / "client.key")[0].decode()
    refused = [r.getMessage() for r in caplog.records if client_key[:8] in r.getMessage()]
    assert len(refused) == 1  # ZeroMQ retried the handshake many times: one line a minute per key
    assert "on workers" in refused[0] and "it is a client key" in refused[0]


def test_key_folders_are_reread_without_restarting_the_authenticator(keys, tmp_path):
    folder, stranger = tmp_path / "keys", tmp_path / "stranger"
    shutil.copytree(keys, folder)
    keygen(stranger)
    shutil.copy(folder / "server.key", stranger / "server.key")  # its own client pair, talking to our server
    with curve_router(folder, "clients") as server:
        assert reaches(server, folder, "client", TIMEOUT) is not None
        assert reaches(server, stranger, "client") is None
        (folder / "authorized/client.key").unlink()
        shutil.copy(stranger / "client.key", folder / "authorized/stranger.key")
        assert reaches(server, folder, "client") is None  # removed: refused from the next handshake on
        assert reaches(server, stranger, "client", TIMEOUT) is not None  # copied in: let in


def test_peer_is_admin_for_admin_keys_and_loopback_without_curve(keys, tmp_path):
    folder = tmp_path / "keys"
    shutil.copytree(keys, folder)
    with curve_router(folder, "clients") as server:
        admin, client = reaches(server, folder, "admin", TIMEOUT), reaches(server, folder, "client", TIMEOUT)
        assert peer_is_admin(admin, CurveKeys(folder)) and not peer_is_admin(client, CurveKeys(folder))
        (folder / "admins/admin.key").unlink()
        assert not peer_is_admin(admin, CurveKeys(folder))  # no longer listed: no longer an admin
    ctx = zmq.Context()
    r, d = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
    try:
        r.bind(ANY_PORT)
        d.connect(r.getsockopt_string(zmq.LAST_ENDPOINT))
        d.send(b"stats")
        assert r.poll(int(TIMEOUT * 1000))
        plain = r.recv_multipart(copy=False)[1]
        assert peer_is_admin(plain, None)  # loopback without CURVE
        assert not peer_is_admin(plain, CurveKeys(folder))  # keys expected, no User-Id
        assert not peer_is_admin(zmq.Frame(b"stats"), None)  # no peer at all
    finally:
        r.close(0)
        d.close(0)
        ctx.term()


class AddressFrame:
    """Stands for a frame from a peer at `address` (a real one needs a non-loopback interface)."""

    def __init__(self, address: str):
        self.address = address

    def get(self, name: str) -> str:
        return {"Peer-Address": self.address}[name]


@pytest.mark.parametrize("address, admin", [
    ("127.0.0.1", True), ("127.8.0.2", True), ("::1", True), ("::ffff:127.0.0.1", True),  # IPv4 on a dual stack
    ("192.0.2.7", False), ("::ffff:192.0.2.7", False), ("fe80::1%eth0", False), ("localhost:0:0:7058", False)])
def test_peer_is_admin_without_curve_only_on_loopback(address, admin):  # the last: libzmq's ipc peer
    assert peer_is_admin(AddressFrame(address), None) is admin


def test_an_older_key_folder_asks_for_new_worker_and_admin_keys(keys, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(keys, old)
    for name in ("worker.key", "worker.key_secret", "admin.key", "admin.key_secret"):
        (old / name).unlink()
    shutil.rmtree(old / "workers")
    shutil.rmtree(old / "admins")
    CurveKeys(old).check(server=True)  # serving clients as before
    CurveKeys(old).check(server=False)
    for server, role in ((True, "workers"), (False, "worker"), (False, "admin")):
        with pytest.raises(CurveKeyError, match=r"older `rtsr keygen`.*rtsr keygen NEW"):
            CurveKeys(old).check(server, role)
    with pytest.raises(CurveKeyError, match="worker.key_secret is missing"):
        CurveKeys(old).make_client(zmq.Context.instance().socket(zmq.DEALER), "worker")
    with pytest.raises(ValueError, match="unknown CURVE role"):
        CurveKeys(keys).check(True, "client")
