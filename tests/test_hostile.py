"""Hostile peers (issue 27): nothing a peer sends ends a service, reaches another's stream, or holds
others up past its share. Real loopback sockets, servers in threads (test_serve's helpers); raw
DEALERs play the attackers, speaking the protocol from docs/protocol.md by hand.
"""

import ctypes
import json
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import zmq
from test_serve import ANY_PORT, TIMEOUT, client, noise, router, running, service, wait_for_workers

from rtsr import protocol as P
from rtsr.broker import EPOCH_BYTES, Broker
from rtsr.cli import main
from rtsr.client import Client, ServerError
from rtsr.flow import FairShare, FlowLimits
from rtsr.serve import serve_router, serve_worker
from rtsr.transport import Transport, unanswered


@contextmanager
def raw(endpoint: str, routing_id: bytes | None = None) -> Iterator[zmq.Socket]:
    """A bare DEALER, optionally under a routing id of its own choosing."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if routing_id is not None:
        s.setsockopt(zmq.ROUTING_ID, routing_id)
    s.connect(endpoint)
    try:
        yield s
    finally:
        s.close(0)
        ctx.term()


def ask(s: zmq.Socket, frames: list[bytes], wait_s: float = TIMEOUT) -> dict | None:
    s.send_multipart(frames)
    return recv(s, wait_s)


def recv(s: zmq.Socket, wait_s: float = TIMEOUT) -> dict | None:
    return json.loads(s.recv_multipart()[0]) if s.poll(int(wait_s * 1000)) else None


def still_serves(endpoint: str) -> None:
    """An ordinary client gets an ordinary stream through."""
    with client(endpoint) as c:
        y = c.upscale(noise(16000, 0.06), 16000, stream="check")
        assert y.shape == (2880, 1)


@contextmanager
def broker_with_worker(up, **broker_kw) -> Iterator[tuple[dict[str, str], object]]:
    svc = service(up)
    with running(lambda t: Broker(ANY_PORT, ANY_PORT, t, **broker_kw).run()) as eps, \
            running(lambda t: serve_worker(svc, eps["backend"], t)), client(eps["frontend"]) as c:
        wait_for_workers(c, 1)
        yield eps, svc


# --- 1. nothing a peer sends ends a process -------------------------------------------------------

DEEP = b'{"type":"stats","x":' + b"[" * 1000 + b"]" * 1000 + b"}"


def test_a_deeply_nested_header_is_an_error_not_a_crash(up):
    with pytest.raises(P.ProtocolError) as e:
        P.decode_header(DEEP)
    assert e.value.code == P.BAD_JSON
    with router(service(up)) as ep, raw(ep) as s:
        assert ask(s, [DEEP])["code"] == P.BAD_JSON
        still_serves(ep)
    with broker_with_worker(up) as (eps, _), raw(eps["frontend"]) as s:
        assert ask(s, [DEEP])["code"] == P.BAD_JSON
        still_serves(eps["frontend"])


def test_a_header_nested_past_the_depth_is_refused_and_brackets_in_its_strings_are_not_nesting():
    """Under the bracket bound a header is walked for its depth (more containers than the depth
    allows); brackets inside a flat header's strings are text."""
    for depth in (P.MAX_JSON_DEPTH + 1, 2 * P.MAX_JSON_DEPTH):
        nested = b'{"type":"stats","x":' + b"[" * (depth - 1) + b"]" * (depth - 1) + b"}"
        with pytest.raises(P.ProtocolError, match="nested more than"):
            P.decode_header(nested)
    flat = {"type": "audio", "stream": "[[{{[[{{", "token": "}}]]", "seq": 3}
    assert P.decode_header(P.encode(flat)[0]) == {"v": P.VERSION, **flat}
    assert P.decode_header(b'{"type":"stats","x":' + b"[" * 3 + b"]" * 3 + b"}")["x"] == [[[]]]


@pytest.mark.parametrize("heartbeat", [b'{"type":"ready","capacity":"abc"}', b'{"type":"ready","capacity":null}',
                                       b'{"type":"ready","capacity":1e400}', b'[1,2]', DEEP, b"\xff"])
def test_a_bad_worker_message_leaves_the_broker_running(up, heartbeat):
    with broker_with_worker(up) as (eps, _), raw(eps["backend"]) as fake:
        fake.send_multipart([b"", heartbeat])
        fake.send_multipart([b"", b'{"type":"ready","capacity":2}', b"x", b"y"])
        fake.send_multipart([b"\x00" * 3, heartbeat])
        time.sleep(0.2)
        still_serves(eps["frontend"])


def test_routing_ids_are_not_predictable_and_a_squatted_id_aborts_nothing(up):
    """Unseeded, libzmq hands out 0x006b8b4567 first in every process, then +1: a peer connected
    under the next one made the next client's connection abort the process."""
    with router(service(up)) as ep, raw(ep, b"\x00\x6b\x8b\x45\x67") as squat1, \
            raw(ep, b"\x00\x6b\x8b\x45\x68") as squat2:
        for squat in (squat1, squat2):
            assert ask(squat, P.encode({"type": "stats"}))["type"] == "stats"
        for _ in range(3):
            still_serves(ep)
    assert _first_routing_id() != _first_routing_id()


def _first_routing_id() -> bytes:
    """What a fresh ROUTER made as the services make theirs hands out first."""
    ctx = zmq.Context()
    r = Transport().socket(ctx, zmq.ROUTER)
    port = r.bind_to_random_port("tcp://127.0.0.1")
    try:
        with raw(f"tcp://127.0.0.1:{port}") as d:
            d.send(b"hi")
            return r.recv_multipart()[0]
    finally:
        r.close(0)
        ctx.term()


def test_the_c_librarys_rand_is_seeded_for_routing_ids():
    libc = ctypes.CDLL(None)
    libc.srand(1)
    Transport().socket(zmq.Context.instance(), zmq.ROUTER).close(0)
    assert libc.rand() != 1804289383  # rand()'s first value after srand(1)


def test_a_message_over_the_socket_limit_cuts_only_its_own_connection(up):
    t = Transport()
    with router(service(up)) as ep, raw(ep) as big:
        big.send_multipart([b'{"type":"stats"}', bytes(t.max_message_bytes + 1)])
        assert recv(big, 0.5) is None
        still_serves(ep)
    assert t.recv_hwm * t.max_message_bytes <= 2 * 64 * 2**20


# --- 2. a stream belongs to who opened it ---------------------------------------------------------


def test_a_peer_that_names_its_own_connection_is_refused(up):
    with router(service(up)) as ep, raw(ep, b"victim-id") as s:
        assert ask(s, P.encode({"type": "open", "stream": "mic", "sr": 16000}))["code"] == P.FORBIDDEN
        still_serves(ep)
    with broker_with_worker(up) as (eps, _), raw(eps["frontend"], b"x" * 5) as s:
        assert ask(s, P.encode({"type": "open", "stream": "mic", "sr": 16000}))["code"] == P.FORBIDDEN


def test_a_peer_under_a_departed_clients_routing_id_gets_none_of_its_audio(up):
    """Even one that guessed a routing id of the ROUTER's own form and took it after the victim left."""
    victim_id = b"\x00vict"
    with router(service(up, idle_timeout=30)) as ep:
        with raw(ep, victim_id) as v:
            opened = ask(v, P.encode({"type": "open", "stream": "mic", "sr": 16000}))
            assert len(opened["token"]) >= 16
            for seq in range(3):
                v.send_multipart(P.encode({"type": "audio", "stream": "mic", "token": opened["token"], "seq": seq},
                                          noise(16000, 0.1).tobytes()))
            for _ in range(3):
                assert recv(v)["type"] == "audio"
        time.sleep(0.3)
        with raw(ep, victim_id) as thief:
            for guess in (None, "", "x" * 22):
                h = {"type": "audio", "stream": "mic", "seq": 3, **({} if guess is None else {"token": guess})}
                r = ask(thief, P.encode(h, noise(16000, 0.1).tobytes()))
                assert r["type"] == "error" and r["code"] in (P.BAD_TOKEN, P.UNKNOWN_STREAM), r
            r = ask(thief, P.encode({"type": "close", "stream": "mic"}))
            assert r["type"] == "error" and r["code"] in (P.BAD_TOKEN, P.UNKNOWN_STREAM), r
            assert recv(thief, 0.3) is None


def test_a_new_broker_never_hands_out_an_old_brokers_stream(up):
    """The worker keeps a stream of the first broker; a client of the second, under whatever id,
    opens and closes a stream of the same name and gets only its own (empty) output."""
    svc = service(up)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        backend = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
    with running(lambda t: serve_worker(svc, backend, t)):
        with running(lambda t: Broker(ANY_PORT, backend, t).run()) as eps, client(eps["frontend"]) as c:
            wait_for_workers(c, 1)
            c.open("mic", 16000)
            c.send("mic", noise(16000, 0.5))
            assert c.recv().type == "audio"
        assert len(svc.sessions) == 1  # the first broker is gone; the worker still holds the stream
        with running(lambda t: Broker(ANY_PORT, backend, t).run()) as eps, client(eps["frontend"]) as c:
            wait_for_workers(c, 1)
            c.open("mic", 16000)
            c.close("mic")
            tail = [r for r in c.replies(1.0) if r.type == "audio"]
            assert [len(r.audio) for r in tail] == [0]
            assert len(svc.sessions) == 0


def test_the_broker_drops_a_stalled_workers_late_replies_and_names_every_block_in_flight(up):
    """A worker that stalls past the timeout: each block in flight gets worker_lost with its seq;
    its replies when it wakes (for a stream since reopened elsewhere) reach no one."""
    ready = P.encode({"type": "ready", "capacity": 4})
    with running(lambda t: Broker(ANY_PORT, ANY_PORT, t, worker_timeout=1.5).run()) as eps, \
            raw(eps["backend"]) as stalled, client(eps["frontend"]) as c:
        stalled.send_multipart([b"", *ready])
        wait_for_workers(c, 1)
        c.send_raw({"type": "open", "stream": "s", "sr": 16000})
        while True:
            client_frame, header = stalled.recv_multipart()
            if json.loads(header)["type"] == "open":
                break
        assert len(client_frame) > EPOCH_BYTES
        stalled.send_multipart([b"", *ready])
        stalled.send_multipart([client_frame, *P.encode({"type": "opened", "stream": "s", "token": "T1"})])
        assert c._take(lambda r: r.type == "opened").header["token"] == "T1"
        c._streams["s"], c._seq["s"], c._tokens["s"] = (1, "float32"), 0, "T1"
        for _ in range(3):
            c.send("s", noise(16000, 0.02))
        lost = [c.recv() for _ in range(3)]
        assert [(r.header["code"], r.header.get("seq")) for r in lost] == [(P.WORKER_LOST, q) for q in range(3)]
        with running(lambda t: serve_worker(service(up), eps["backend"], t)):
            wait_for_workers(c, 1)
            c.open("s", 16000)
            for seq in range(3):  # the stalled worker wakes up and answers its old blocks
                stalled.send_multipart([client_frame, *P.encode({"type": "audio", "stream": "s", "token": "T1",
                                                                 "seq": seq}, np.ones((960, 1), np.float32))])
            c.send("s", noise(16000, 0.02))
            replies = list(c.replies(1.0))
        assert [(r.type, r.header.get("seq")) for r in replies] == [("audio", 0)]
        assert not np.any(replies[0].audio == 1.0)  # the stale replies' ones reached no one


# --- 3. workers are workers ------------------------------------------------------------------------


def test_a_backend_reachable_from_other_hosts_needs_keys(capsys):
    assert main(["broker", "--frontend", "tcp://127.0.0.1:0", "--backend", "tcp://0.0.0.0:0"]) == 2
    assert "--insecure-backend" in capsys.readouterr().err


# --- 4. fair share, bounded cost -------------------------------------------------------------------


def test_an_open_the_broker_refuses_costs_no_worker_a_slot(up):
    with broker_with_worker(up) as (eps, _), raw(eps["frontend"]) as s:
        for i in range(130):
            s.send_multipart(P.encode({"type": "open", "stream": i, "sr": 16000}, bytes(4)))
        codes = {recv(s)["code"] for _ in range(130)}
        assert codes == {P.BAD_PCM}
        still_serves(eps["frontend"])


def test_one_connection_holds_at_most_its_share_of_streams(up):
    with router(service(up, max_streams=8, max_streams_per_peer=3)) as ep, client(ep) as c:
        for i in range(3):
            c.open(i, 16000)
        with pytest.raises(ServerError) as e:
            c.open(3, 16000)
        assert e.value.code == P.BUSY
        still_serves(ep)


@pytest.mark.parametrize("blocks, sr, dtype", [(1, 8000, "int16"), (0, 384000, "float32")])
def test_a_message_asking_for_more_than_its_bound_of_work_is_refused(up, blocks, sr, dtype):
    """A 20 s block, and a seq that jumps 10,000 blocks ahead at 384 kHz: refused, nothing computed."""
    with router(service(up)) as ep, client(ep) as c:
        c.open("big", sr, dtype=dtype)
        if blocks:
            c.send("big", np.zeros(20 * sr, np.float32))
            assert (r := c.recv()).header["code"] == P.TOO_BIG and r.header["seq"] == 0
        else:
            c.send("big", np.zeros(384, np.float32))
            assert c.recv().type == "audio"
            c.send("big", np.zeros(384, np.float32), seq=10_000)
            assert (r := c.recv()).header["code"] == P.SEQ and r.header["closed"]


def test_a_heavy_peer_waits_its_turn():
    """Per round each peer runs at most share_s seconds of audio; the rest waits, in order."""
    fair = FairShare(FlowLimits(share_s=0.5))
    for i in range(4):
        fair.add(b"heavy", f"h{i}", 10, 2.0)
    fair.add(b"light", "l0", 10, 0.02)
    rounds = [fair.take() for _ in range(6)]
    assert rounds[0] == ["l0"] and rounds[3] == ["h0"]
    assert [m for r in rounds for m in r] == ["l0", "h0"]
    assert fair.take_all(b"heavy") == ["h1", "h2", "h3"] and not fair.waiting()


def test_a_peer_that_stops_reading_is_told_which_blocks_get_no_reply(up):
    """Every block gets its audio or an error naming it: not_reading carries seq..last_seq."""
    sent = 400  # 0.25 s each: 19 MB of replies, more than ZeroMQ's and TCP's buffers take
    with running(lambda t: serve_router(service(up), ANY_PORT, t), hwm=2,
                 flow=FlowLimits(max_stall_s=0.5)) as eps:
        c = Client(eps["router"], timeout=TIMEOUT, hwm=4)
        try:
            c.open("s", 16000)
            for _ in range(sent):
                c.send("s", noise(16000, 0.25))
            time.sleep(5.0)
            answered, codes = [], set()
            for r in c.replies(2.0):
                if r.type == "audio":
                    answered.append(r.header["seq"])
                else:
                    codes.add(r.header["code"])
                    answered += range(r.header["seq"], r.header.get("last_seq", r.header["seq"]) + 1)
        finally:
            c.shutdown()
    assert codes == {P.NOT_READING}, (codes, len(answered))
    assert sorted(answered) == list(range(sent))


def test_unanswered_names_each_streams_first_and_last_seq():
    msgs = [[b"id", json.dumps({"type": "audio", "stream": sid, "seq": q}).encode()]
            for sid, q in [("a", 5), ("b", 9), ("a", 6), ("a", 4)]]
    msgs.append([b"id", b'{"type":"close","stream":"a"}'])
    assert unanswered(msgs) == {"a": (4, 6), "b": (9, 9)}


# --- 6. stats -------------------------------------------------------------------------------------


def test_the_broker_answers_an_unknown_type_as_such_and_shows_no_worker_ids(up):
    with broker_with_worker(up) as (eps, _), client(eps["frontend"]) as c:
        c.send_raw({"type": "dance"})
        assert c.recv().header["code"] == P.UNKNOWN_TYPE
        assert all(set(w) == {"streams", "capacity"} for w in c.stats()["workers"])


# --- an engine failure stays its stream's own ------------------------------------------------------


def test_a_stream_failing_in_a_batched_round_ends_alone_and_the_others_are_whole(up):
    """Socket-free: four streams' audio in each batch; one stream's band tracker fails from its
    third call on. It gets `internal` (closed) with its seq; the others equal offline upscaling."""
    svc = service(up)
    peer, xs, tokens = b"p", {i: noise(16000, 0.6, seed=i) for i in range(4)}, {}
    for i in xs:
        (_, frames), = svc.handle_batch([(peer, P.encode({"type": "open", "stream": i, "sr": 16000}))])
        tokens[i] = json.loads(frames[0])["token"]
    engine = svc.sessions[(peer, 1)].engine
    real, calls = engine.cutoff.take, {"n": 0}

    def breaks_from_the_third_call(*args):
        calls["n"] += 1
        if calls["n"] >= 3:
            raise ValueError("injected")
        return real(*args)
    engine.cutoff.take = breaks_from_the_third_call
    outs: dict[int, list[np.ndarray]] = {i: [] for i in xs}
    errors = []
    for seq, pos in enumerate(range(0, 9600, 960)):
        msgs = [(peer, P.encode({"type": "audio", "stream": i, "token": tokens[i], "seq": seq}, x[pos:pos + 960]))
                for i, x in xs.items() if (peer, i) in svc.sessions]
        for _, (head, *pcm) in svc.handle_batch(msgs):
            h = json.loads(head)
            if h["type"] == "error":
                errors.append(h)
            else:
                outs[h["stream"]].append(P.pcm_to_array(pcm[0], 1))
    assert [(e["stream"], e["code"], e["closed"]) for e in errors] == [(1, P.INTERNAL, True)]
    for i in (0, 2, 3):
        (_, (head, tail)), _ = svc.handle_batch([(peer, P.encode({"type": "close", "stream": i, "token": tokens[i]}))])
        y, ref = np.concatenate(outs[i] + [P.pcm_to_array(tail, 1)]), up.upscale(xs[i], 16000)
        assert y.shape == ref.shape and np.abs(y - ref).max() <= 1e-5 * np.abs(ref).max()
