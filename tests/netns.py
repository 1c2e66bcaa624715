"""Several hosts on one machine: network namespaces on a bridge, and TCP forwarders that let them
reach services this machine runs on its loopback only (PostgreSQL, Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import shutil
import subprocess
import threading

import psutil
import pytest


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, text=True)


def require_namespaces() -> None:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("network namespaces need root and iproute2")


def kill_namespace(name: str, delete: bool = True) -> None:
    """SIGKILL every process in the namespace: the host dies as a power cut would end it."""
    listed = subprocess.run(["ip", "netns", "pids", name], capture_output=True, text=True).stdout.split()
    for pid in listed:
        with contextlib.suppress(psutil.Error):
            psutil.Process(int(pid)).kill()
    if delete:
        subprocess.run(["ip", "netns", "del", name], capture_output=True)


@contextlib.contextmanager
def bridged_hosts(subnet: str, count: int):
    """`count` hosts (network namespaces) at <subnet>.2, .3 ... on a bridge that this machine's own
    namespace joins at <subnet>.1. Yields [(namespace, address)]."""
    require_namespaces()
    suffix = secrets.token_hex(3)
    bridge = f"fwbr{suffix}"
    hosts = [(f"fw-host{n}-{suffix}", f"{subnet}.{n + 2}") for n in range(count)]
    forward = None
    try:
        try:
            ip("link", "add", bridge, "type", "bridge")
        except subprocess.CalledProcessError as error:  # a container without CAP_NET_ADMIN
            pytest.skip(f"cannot make a bridge here: {error.stderr.strip()}")
        ip("addr", "add", f"{subnet}.1/24", "dev", bridge)
        ip("link", "set", bridge, "up")
        forward = _accept_forwarding(bridge)
        for n, (host, address) in enumerate(hosts):
            outside, inside = f"fwo{n}{suffix}", f"fwi{n}{suffix}"
            ip("netns", "add", host)
            ip("-n", host, "link", "set", "lo", "up")
            ip("link", "add", outside, "type", "veth", "peer", "name", inside)
            ip("link", "set", outside, "master", bridge)
            ip("link", "set", outside, "up")
            ip("link", "set", inside, "netns", host)
            ip("-n", host, "addr", "add", f"{address}/24", "dev", inside)
            ip("-n", host, "link", "set", inside, "up")
        yield hosts
    finally:
        for host, _ in hosts:
            kill_namespace(host)
        subprocess.run(["ip", "link", "del", bridge], capture_output=True)
        if forward:
            subprocess.run(["iptables", "-D", *forward], capture_output=True)


def _accept_forwarding(bridge: str) -> list[str] | None:
    """Let the hosts on the bridge reach each other where a firewall drops forwarded packets: a
    Docker engine sets FORWARD's policy to DROP, and with bridge-nf-call-iptables on, traffic
    between two ports of a bridge passes FORWARD (a two-node training run hung at its rendezvous
    after the Docker tests). Returns the rule to delete, or None without iptables."""
    if shutil.which("iptables") is None:
        return None
    rule = ["FORWARD", "-i", bridge, "-o", bridge, "-j", "ACCEPT"]
    subprocess.run(["iptables", "-I", *rule], check=True, capture_output=True)
    return rule


def interface_of(namespace: str) -> str:
    """The namespace's own interface (its veth; lo aside): what GLOO_SOCKET_IFNAME names, as the
    hostname resolves to no address inside a namespace."""
    links = subprocess.run(["ip", "-n", namespace, "-o", "link"], capture_output=True, text=True).stdout
    names = [line.split(":")[1].strip().split("@")[0] for line in links.splitlines()]
    return next(name for name in names if name != "lo")


class Forwarder(threading.Thread):
    """Listen on (host, port) and pass each connection through to 127.0.0.1:<target_port>."""

    def __init__(self, host: str, port: int, target_port: int) -> None:
        super().__init__(daemon=True)
        self.host, self.port, self.target_port = host, port, target_port
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError):
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target_reader, target_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        await asyncio.gather(self._pipe(reader, target_writer), self._pipe(target_reader, writer))

    def run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._handle, self.host, self.port))
        self.ready.set()
        self.loop.run_forever()

    def __enter__(self) -> Forwarder:
        self.start()
        assert self.ready.wait(10), f"cannot listen on {self.host}:{self.port}"
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
