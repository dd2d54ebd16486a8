"""PyPI clients against Switchboard: `centrifuge-python` for the client protocol and `cent` for
the server HTTP API.

The server under test comes from the environment (SB_WS_URL, SB_HTTP_URL, SB_API_KEY, SB_SECRET,
SB_BIN), as set by crates/server/tests/sdk_compat.rs. Run with `python -m unittest -v test_sdk`.
"""

import asyncio
import os
import subprocess
import time
import unittest
import uuid
from urllib.parse import urlparse

import cent
import requests
from centrifuge import (
    Client,
    ClientEventHandler,
    ReplyError,
    StreamPosition,
    SubscriptionEventHandler,
)


def env(name):
    value = os.environ.get(name)
    if not value:
        raise RuntimeError(f"{name} is not set: run through `cargo test -p switchboard --test sdk_compat`")
    return value


WS_URL = env("SB_WS_URL")
HTTP_URL = env("SB_HTTP_URL")
API_KEY = env("SB_API_KEY")
SECRET = env("SB_SECRET")
BIN = env("SB_BIN")
STEP = 5.0


def mint(user, ttl="1h", *extra):
    """A connection JWT from `switchboard token`."""
    out = subprocess.run(
        [BIN, "token", "--user", user, "--ttl", ttl, *extra],
        env={**os.environ, "SWITCHBOARD_TOKEN_HMAC_SECRET": SECRET},
        capture_output=True,
        text=True,
        timeout=10,
        check=True,
    ).stdout.strip()
    assert out.count(".") == 2 and " " not in out, f"switchboard token printed {out!r}"
    return out


def uniq(prefix):
    return f"{prefix}_{uuid.uuid4().hex[:12]}"


def api_client():
    """The `cent` client, never through a proxy (the server is on 127.0.0.1)."""
    session = requests.Session()
    session.trust_env = False
    return cent.Client(HTTP_URL + "/api", API_KEY, timeout=STEP, session=session)


class Recorder(SubscriptionEventHandler):
    """Records what a subscription sees."""

    def __init__(self):
        self.pubs = []
        self.subscribed = []
        self.joins = []
        self.leaves = []
        self.unsubscribed = []

    async def on_publication(self, ctx):
        self.pubs.append(ctx.pub)

    async def on_subscribed(self, ctx):
        self.subscribed.append(ctx)

    async def on_join(self, ctx):
        self.joins.append(ctx.info)

    async def on_leave(self, ctx):
        self.leaves.append(ctx.info)

    async def on_unsubscribed(self, ctx):
        self.unsubscribed.append(ctx)


class ClientEvents(ClientEventHandler):
    def __init__(self):
        self.connected = []
        self.connecting = []
        self.disconnected = []
        self.server_subscribed = []
        self.server_pubs = []

    async def on_connected(self, ctx):
        self.connected.append(ctx)

    async def on_connecting(self, ctx):
        self.connecting.append(ctx)

    async def on_disconnected(self, ctx):
        self.disconnected.append(ctx)

    async def on_subscribed(self, ctx):
        self.server_subscribed.append(ctx)

    async def on_publication(self, ctx):
        self.server_pubs.append(ctx)


async def until(cond, what, timeout=STEP):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.01)


class TcpProxy:
    """A TCP proxy in front of the server, to cut connections the way a network does."""

    def __init__(self):
        parsed = urlparse(WS_URL)
        self.target = (parsed.hostname, parsed.port)
        self.path = parsed.path
        self.blocked = False
        self.writers = set()
        self.server = None

    async def start(self):
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        port = self.server.sockets[0].getsockname()[1]
        self.url = f"ws://127.0.0.1:{port}{self.path}"
        return self

    async def _handle(self, reader, writer):
        if self.blocked:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.writers.update((writer, up_writer))

        async def pipe(src, dst):
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (OSError, asyncio.CancelledError):
                pass
            finally:
                dst.transport.abort()

        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        except asyncio.CancelledError:
            pass  # the test loop is shutting down

    def cut(self):
        for w in list(self.writers):
            w.transport.abort()
        self.writers.clear()

    async def close(self):
        self.cut()
        self.server.close()
        await self.server.wait_closed()


class CentrifugePythonTest(unittest.IsolatedAsyncioTestCase):
    """The core client flow with centrifuge-python."""

    async def asyncSetUp(self):
        self.clients = []
        self.api = api_client()

    async def asyncTearDown(self):
        for c in self.clients:
            await c.disconnect()
        self.api.close()

    async def connect(self, user, url=WS_URL, **kwargs):
        events = ClientEvents()
        c = Client(url, events=events, token=mint(user), proxy=None, timeout=STEP, **kwargs)
        self.clients.append(c)
        await c.connect()
        await c.ready()
        await until(lambda: events.connected, "the connected event")
        return c, events

    async def subscribe(self, c, channel, **kwargs):
        rec = Recorder()
        sub = c.new_subscription(channel, events=rec, **kwargs)
        await sub.subscribe()
        await sub.ready(timeout=STEP)
        return sub, rec

    async def publish_api(self, channel, data):
        return await asyncio.to_thread(self.api.publish, cent.PublishRequest(channel=channel, data=data))

    async def test_connect_subscribe_and_receive(self):
        channel = uniq("py_news")
        reader, events = await self.connect("py-reader")
        self.assertTrue(events.connected[0].client, "connect reply carries a client id")
        writer, _ = await self.connect("py-writer")
        _, rec = await self.subscribe(reader, channel)

        await writer.publish(channel, {"from": "client"})
        await until(lambda: len(rec.pubs) == 1, "the client publication")
        result = await self.publish_api(channel, {"from": "api"})
        await until(lambda: len(rec.pubs) == 2, "the API publication")

        self.assertEqual([p.data for p in rec.pubs], [{"from": "client"}, {"from": "api"}])
        self.assertEqual(rec.pubs[1].offset, rec.pubs[0].offset + 1)
        self.assertEqual(result.offset, rec.pubs[1].offset)
        self.assertIsNotNone(rec.pubs[0].info, "a client publication says who published it")
        self.assertEqual(rec.pubs[0].info.user, "py-writer")

    async def test_server_side_subscription_from_token(self):
        channel = uniq("py_personal")
        events = ClientEvents()
        c = Client(WS_URL, events=events, token=mint("py-srv", "1h", "--channel", channel), proxy=None)
        self.clients.append(c)
        await c.connect()
        await until(lambda: any(s.channel == channel for s in events.server_subscribed), "server-side subscription")
        await self.publish_api(channel, {"srv": True})
        await until(lambda: len(events.server_pubs) == 1, "a server-side publication")
        self.assertEqual(events.server_pubs[0].channel, channel)
        self.assertEqual(events.server_pubs[0].pub.data, {"srv": True})

    async def test_join_leave_presence_and_stats(self):
        channel = uniq("py_room")
        a, ev_a = await self.connect("py-alice")
        b, ev_b = await self.connect("py-bob")
        sub_a, rec_a = await self.subscribe(a, channel, join_leave=True)
        sub_b, _ = await self.subscribe(b, channel)
        await until(lambda: any(j.user == "py-bob" for j in rec_a.joins), "bob's join")

        presence = await sub_a.presence()
        ids = {ev_a.connected[0].client, ev_b.connected[0].client}
        self.assertEqual(set(presence.clients), ids)
        self.assertEqual({c.user for c in presence.clients.values()}, {"py-alice", "py-bob"})
        stats = await sub_a.presence_stats()
        self.assertEqual((stats.num_clients, stats.num_users), (2, 2))

        await sub_b.unsubscribe()
        await until(lambda: any(l.user == "py-bob" for l in rec_a.leaves), "bob's leave")
        stats = await sub_a.presence_stats()
        self.assertEqual((stats.num_clients, stats.num_users), (1, 1))

    async def test_history_limit_since_reverse(self):
        channel = uniq("py_log")
        c, _ = await self.connect("py-historian")
        sub, _ = await self.subscribe(c, channel)
        for i in range(1, 8):
            await self.publish_api(channel, {"i": i})

        def data(res):
            return [p.data["i"] for p in res.publications]

        top = await sub.history(limit=0)
        self.assertEqual(top.publications, [])
        self.assertTrue(top.epoch)
        self.assertEqual(data(await sub.history(limit=-1)), [1, 2, 3, 4, 5, 6, 7])
        self.assertEqual(data(await sub.history(limit=2)), [1, 2])
        self.assertEqual(data(await sub.history(limit=2, reverse=True)), [7, 6])
        since = StreamPosition(offset=top.offset - 3, epoch=top.epoch)  # after publication 4
        self.assertEqual(data(await sub.history(limit=-1, since=since)), [5, 6, 7])
        self.assertEqual(data(await sub.history(limit=2, since=since, reverse=True)), [3, 2])

    async def test_unknown_rpc_is_104(self):
        c, _ = await self.connect("py-rpc")
        with self.assertRaises(ReplyError) as err:
            await c.rpc("no.such.method", {"x": 1})
        self.assertEqual(err.exception.code, 104)

    async def test_recovery_after_connection_cut(self):
        channel = uniq("py_recover")
        proxy = await TcpProxy().start()
        try:
            c, events = await self.connect(
                "py-recover", url=proxy.url, min_reconnect_delay=0.05, max_reconnect_delay=0.3
            )
            _, rec = await self.subscribe(c, channel, recoverable=True, positioned=True)
            self.assertTrue(rec.subscribed[0].recoverable, "the server must mark the channel recoverable")
            await self.publish_api(channel, {"seq": -1})
            await until(lambda: len(rec.pubs) == 1, "the live publication")

            proxy.blocked = True
            before = len(events.connecting)
            proxy.cut()
            await until(lambda: len(events.connecting) > before, "the client noticing the cut")
            for seq in range(30):
                await self.publish_api(channel, {"seq": seq})
            proxy.blocked = False

            await until(lambda: len(rec.subscribed) == 2, "the resubscribe", timeout=10)
            self.assertTrue(rec.subscribed[1].was_recovering)
            self.assertTrue(rec.subscribed[1].recovered, "the server recovered the stream")
            await until(lambda: len(rec.pubs) >= 31, "the recovered publications")
            await asyncio.sleep(0.3)
            self.assertEqual([p.data["seq"] for p in rec.pubs], list(range(-1, 30)))
            offsets = [p.offset for p in rec.pubs]
            self.assertEqual(offsets, list(range(offsets[0], offsets[0] + 31)))
        finally:
            await proxy.close()


class CentServerApiTest(unittest.IsolatedAsyncioTestCase):
    """The server HTTP API through `cent`, with a live centrifuge-python client to observe it."""

    async def test_server_api(self):
        api = api_client()
        channel = uniq("py_api")
        other = uniq("py_api_other")
        events = ClientEvents()
        c = Client(WS_URL, events=events, token=mint("py-api-user"), proxy=None)
        try:
            await c.connect()
            await c.ready()
            rec = Recorder()
            sub = c.new_subscription(channel, events=rec)
            await sub.subscribe()
            await sub.ready(timeout=STEP)
            client_id = events.connected[0].client if events.connected else None

            def call(fn, req):
                return asyncio.to_thread(fn, req)

            # publish
            res = await call(api.publish, cent.PublishRequest(channel=channel, data={"n": 1}))
            self.assertGreater(res.offset, 0)
            self.assertTrue(res.epoch)
            await until(lambda: len(rec.pubs) == 1, "the published message")
            self.assertEqual(rec.pubs[0].data, {"n": 1})

            # broadcast: one response per channel, in order
            res = await call(api.broadcast, cent.BroadcastRequest(channels=[channel, other], data={"n": 2}))
            self.assertEqual(len(res.responses), 2)
            for r in res.responses:
                self.assertIsNone(r.error, r)
                self.assertGreater(r.result.offset, 0)
            await until(lambda: len(rec.pubs) == 2, "the broadcast message")
            self.assertEqual(rec.pubs[1].data, {"n": 2})

            # presence and presence_stats see the live client
            res = await call(api.presence, cent.PresenceRequest(channel=channel))
            self.assertEqual(len(res.presence), 1)
            (info,) = res.presence.values()
            self.assertEqual(info.user, "py-api-user")
            if client_id:
                self.assertEqual(info.client, client_id)
            res = await call(api.presence_stats, cent.PresenceStatsRequest(channel=channel))
            self.assertEqual((res.num_clients, res.num_users), (1, 1))

            # history, then history_remove
            res = await call(api.history, cent.HistoryRequest(channel=channel, limit=10))
            self.assertEqual([p.data for p in res.publications], [{"n": 1}, {"n": 2}])
            top = res.offset
            self.assertEqual(res.publications[1].offset, top)
            res = await call(api.history, cent.HistoryRequest(channel=channel, limit=1, reverse=True))
            self.assertEqual([p.data for p in res.publications], [{"n": 2}])
            res = await call(
                api.history,
                cent.HistoryRequest(channel=channel, limit=10, since=cent.StreamPosition(offset=top - 1, epoch=res.epoch)),
            )
            self.assertEqual([p.data for p in res.publications], [{"n": 2}])
            await call(api.history_remove, cent.HistoryRemoveRequest(channel=channel))
            res = await call(api.history, cent.HistoryRequest(channel=channel, limit=10))
            self.assertEqual(res.publications, [])

            # channels lists active channels with their subscriber counts
            res = await call(api.channels, cent.ChannelsRequest())
            self.assertIn(channel, res.channels)
            self.assertEqual(res.channels[channel].num_clients, 1)
            res = await call(api.channels, cent.ChannelsRequest(pattern=channel))
            self.assertEqual(list(res.channels), [channel])

            # info: this node, with at least our connection
            res = await call(api.info, cent.InfoRequest())
            self.assertGreaterEqual(len(res.nodes), 1)
            self.assertGreaterEqual(res.nodes[0].num_clients, 1)

            # an API error comes back as an API error, not a transport failure
            with self.assertRaises(cent.CentApiResponseError) as err:
                await call(api.publish, cent.PublishRequest(channel="nope:x", data={}))
            self.assertEqual(err.exception.code, 102)

            # unsubscribe: the server ends the client's subscription
            await call(api.unsubscribe, cent.UnsubscribeRequest(user="py-api-user", channel=channel))
            await until(lambda: rec.unsubscribed, "the unsubscribe push")

            # subscribe: a server-side subscription appears on the client
            await call(api.subscribe, cent.SubscribeRequest(user="py-api-user", channel=other))
            await until(lambda: any(s.channel == other for s in events.server_subscribed), "the subscribe push")

            # disconnect: the client is told to go
            await call(api.disconnect, cent.DisconnectRequest(user="py-api-user"))
            await until(lambda: events.connecting or events.disconnected, "the disconnect")
        finally:
            await c.disconnect()
            api.close()

    def test_wrong_key_is_unauthorized(self):
        session = requests.Session()
        session.trust_env = False
        bad = cent.Client(HTTP_URL + "/api", "wrong-key", timeout=STEP, session=session)
        with self.assertRaises(cent.CentUnauthorizedError):
            bad.publish(cent.PublishRequest(channel="x", data={}))
        bad.close()


if __name__ == "__main__":
    unittest.main(verbosity=2)
