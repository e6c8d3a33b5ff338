"""CURVE: `rtsr keygen` keys, serve and broker letting in only authorised clients (real loopback sockets)."""

import logging
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import zmq
import zmq.auth
from test_serve import running, wait_for_workers

from rtsr import protocol as P
from rtsr.broker import Broker
from rtsr.cli import main
from rtsr.client import Client
from rtsr.curve import CurveKeyError, CurveKeys, keygen, warn_if_open
from rtsr.serve import Limits, Service, serve_router, serve_worker

ANY_PORT = "tcp://127.0.0.1:*"
TIMEOUT = 10.0


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


def test_keygen_writes_the_five_files_and_never_replaces_them(keys, capsys):
    for name in ("server.key", "server.key_secret", "client.key", "client.key_secret", "authorized/client.key"):
        assert (keys / name).is_file()
    assert (keys / "client.key_secret").stat().st_mode & 0o077 == 0
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
        c = Client(eps["frontend"], timeout=TIMEOUT, curve_keys=keys)
        try:
            wait_for_workers(c, 1)
            x = (0.1 * np.random.default_rng(1).standard_normal((3200, 1))).astype(np.float32)
            y = c.upscale(x, 16000, stream="s")
        finally:
            c.shutdown()
        assert open_with(eps["frontend"], None, 1.0) is None
    assert np.abs(y - up.upscale(x, 16000)).max() <= 1e-5 * np.abs(y).max()


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
