"""Start, query and stop the shared kernel-dccp-peer VM (Linux 6.1 DCCP under qemu).

The VM tooling lives in ``shared/tools/kernel-dccp-peer`` (``start.sh``/``stop.sh``); this
module only drives it. Every :class:`KernelDccpPeer` gets its *own* network namespace, tap
device and run folder (names carry a short random suffix), so two test sessions on the same
host never collide. Clients must talk to the VM from inside that namespace: use
:func:`netns` to create sockets there (a socket keeps the namespace it was created in).

    peer = KernelDccpPeer.start()
    try:
        with netns(peer.netns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, 33)
        ...
        line = peer.wait_for("CLOSE", port=5001, timeout=5)
    finally:
        peer.stop()
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import os
import re
import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

CLONE_NEWNET = 0x40000000
DEFAULT_SERVICE = 0x44434350  # "DCCP"
SINK_PORT = 5001
ECHO_PORT = 5002

_LINE = re.compile(r"^(?P<kind>ACCEPT|CLOSE|RX)\s+(?P<peer>\S+)\s+(?P<rest>.*)$")
_KV = re.compile(r"(\w+)=(\S+)")


class KdpUnavailable(RuntimeError):
    """The VM cannot run here; the message says why (tests skip with it)."""


class KdpError(RuntimeError):
    """The VM was expected to run but failed (boot failure, missing log line)."""


def tools_dir() -> Path:
    """Where the kernel-dccp-peer scripts are: $KDP_TOOLS, else ``shared/`` next to the repo."""
    env = os.environ.get("KDP_TOOLS")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "shared" / "tools" / "kernel-dccp-peer"
        if cand.is_dir():
            return cand
        cand = parent.parent / "shared" / "tools" / "kernel-dccp-peer"
        if cand.is_dir():
            return cand
    return Path("/work/shared/tools/kernel-dccp-peer")


def build_dir() -> Path:
    env = os.environ.get("KDP_BUILD")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(cache) / "kernel-dccp-peer"


def unavailable_reason() -> str | None:
    """None when the VM can be started here, else a one-line reason."""
    if os.geteuid() != 0:
        return "kernel-dccp-peer needs root (network namespace, tap device)"
    tools = tools_dir()
    if not (tools / "start.sh").is_file():
        return f"kernel-dccp-peer tools not found at {tools}"
    if shutil.which("qemu-system-x86_64") is None:
        return f"qemu-system-x86_64 not installed; run: bash {tools}/setup.sh"
    b = build_dir()
    if not ((b / "vmlinuz").is_file() and (b / "initramfs.cpio.gz").is_file()):
        log = Path("/tmp/vstack-kdp-setup.log")
        seen = f" (its last run failed: see {log})" if log.is_file() else ""
        return f"no VM image in {b}; run: bash {tools}/setup.sh{seen}"
    if not Path("/dev/net/tun").exists():
        return "no /dev/net/tun"
    return None


@contextlib.contextmanager
def netns(name: str) -> Iterator[None]:
    """Run the block with the *calling thread* inside network namespace ``name``.

    Sockets created inside keep that namespace after the block ends, so the usual pattern is
    to create sockets here and use them from the normal event loop afterwards.
    """
    path = f"/run/netns/{name}"
    if not os.path.exists(path):
        raise KdpError(f"network namespace {name!r} does not exist")
    libc = ctypes.CDLL(None, use_errno=True)
    orig = os.open("/proc/thread-self/ns/net", os.O_RDONLY)
    target = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise KdpError(f"setns({name}) failed: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(orig, CLONE_NEWNET) != 0:  # pragma: no cover - cannot happen as root
                err = ctypes.get_errno()
                raise KdpError(f"setns back failed: {os.strerror(err)}")
    finally:
        os.close(target)
        os.close(orig)


@dataclass(frozen=True, slots=True)
class PeerLine:
    """One ACCEPT/CLOSE/RX line of the VM console."""

    kind: str
    peer: str  # "10.77.0.1:37436" or "[fd77::1]:52747"
    fields: dict[str, str]

    @property
    def peer_port(self) -> int:
        return int(self.peer.rsplit(":", 1)[1])

    @property
    def port(self) -> int:
        return int(self.fields.get("port", "0"))

    def int(self, key: str) -> int:
        return int(self.fields[key])


def parse_line(line: str) -> PeerLine | None:
    m = _LINE.match(line.strip().replace("\r", ""))
    if not m:
        return None
    return PeerLine(m["kind"], m["peer"], dict(_KV.findall(m["rest"])))


@dataclass
class KernelDccpPeer:
    netns: str
    tap: str
    run_dir: Path
    host_ip: str = "10.77.0.1"
    vm_ip: str = "10.77.0.2"
    host_ip6: str = "fd77::1"
    vm_ip6: str = "fd77::2"
    service: int = DEFAULT_SERVICE
    sink_port: int = SINK_PORT
    echo_port: int = ECHO_PORT
    boot_ms: int = 0
    env: dict[str, str] = field(default_factory=dict)
    _stopped: bool = False

    @property
    def log_path(self) -> Path:
        return self.run_dir / "console.log"

    @classmethod
    def start(cls, suffix: str | None = None, verbose: bool = False,
              timeout: float = 120.0) -> KernelDccpPeer:
        """Boot a VM in a fresh namespace; raises KdpUnavailable / KdpError."""
        reason = unavailable_reason()
        if reason:
            raise KdpUnavailable(reason)
        sfx = suffix or secrets.token_hex(3)
        ns = f"vsd{sfx}"[:15]
        tap = f"vsdt{sfx}"[:15]
        run_dir = Path(f"/tmp/kdp-{sfx}")
        run_dir.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        env.update(KDP_NETNS=ns, KDP_TAP=tap, KDP_RUN=str(run_dir),
                   KDP_VERBOSE="1" if verbose else "0",
                   KDP_SERVICE=hex(DEFAULT_SERVICE), KDP_BOOT_TIMEOUT=str(int(timeout)))
        peer = cls(netns=ns, tap=tap, run_dir=run_dir, env=env)
        atexit.register(peer.stop)  # an interrupted test session leaves no VM behind
        try:
            proc = subprocess.run(["bash", str(tools_dir() / "start.sh")], env=env,
                                  capture_output=True, text=True, timeout=timeout + 30)
        except subprocess.TimeoutExpired as e:
            peer.stop()
            raise KdpError(f"start.sh did not finish in {timeout + 30:.0f} s") from e
        if proc.returncode != 0:
            peer.stop()
            raise KdpError(f"start.sh failed (rc={proc.returncode}): "
                           f"{proc.stderr.strip()[-800:]} {proc.stdout.strip()[-400:]}")
        penv = peer._peer_env()
        peer.boot_ms = int(penv.get("KDP_BOOT_MS", "0") or 0)
        return peer

    def _peer_env(self) -> dict[str, str]:
        out: dict[str, str] = {}
        with contextlib.suppress(OSError):
            for line in (self.run_dir / "peer.env").read_text().splitlines():
                if "=" in line:
                    k, v = line.split("=", 1)
                    out[k] = v
        return out

    def alive(self) -> bool:
        try:
            pid = int((self.run_dir / "qemu.pid").read_text().strip())
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return False
        return b"kernel-dccp-peer" in cmd

    def stop(self) -> None:
        """Stop qemu (by its recorded pid only) and remove the namespace; idempotent."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)
        subprocess.run(["bash", str(tools_dir() / "stop.sh")], env=self.env,
                       capture_output=True, text=True, timeout=60, check=False)

    # ------------------------------------------------------------------ console log
    def console(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def lines(self, kind: str | None = None) -> list[PeerLine]:
        """Complete console lines only: the VM may be in the middle of writing the last."""
        text = self.console()
        complete = text[: text.rfind("\n") + 1]
        out = []
        for raw in complete.splitlines():
            pl = parse_line(raw)
            if pl and (kind is None or pl.kind == kind):
                out.append(pl)
        return out

    def find(self, kind: str, peer_port: int | None = None,
             port: int | None = None) -> PeerLine | None:
        for pl in self.lines(kind):
            if peer_port is not None and pl.peer_port != peer_port:
                continue
            if port is not None and pl.port != port:
                continue
            return pl
        return None

    def wait_for(self, kind: str, peer_port: int | None = None, port: int | None = None,
                 timeout: float = 10.0) -> PeerLine:
        """Poll the console until a matching line appears; KdpError after ``timeout``."""
        deadline = time.monotonic() + timeout
        while True:
            pl = self.find(kind, peer_port, port)
            if pl is not None:
                return pl
            if time.monotonic() > deadline:
                tail = "\n".join(self.console().splitlines()[-10:])
                raise KdpError(f"no {kind} line for peer port {peer_port} in {timeout}s; "
                               f"console tail:\n{tail}")
            time.sleep(0.05)
