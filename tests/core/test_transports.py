"""The SHM, TCP and RDMA (Mooncake, over its TCP protocol here) tensor transports:
byte-exact round trips of every dtype torch can create, in one process and across processes
(the receiver a fresh interpreter that gets the handles as msgspec bytes), small tensors
inline in their handles, nothing held after `free`/`free_request`, SHM segments and RDMA
pool slices reused only once their receiver is done, crash cleanup, a sender that dies
before or during a read, errors that name the handle, and registration through the plugin
hook."""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import math
import os
import signal
import socket
import struct
import subprocess
import sys
import textwrap
import threading
import uuid
import warnings
from collections.abc import Iterator

import msgspec
import pytest
import torch

from mstar.communication.messages import Handle
from mstar.communication.mooncake import MooncakeTransport, port_free
from mstar.communication.shm import (
    SHM_DIR,
    ShmTransport,
    cleanup_deployment,
    deployment_tag,
    segments_in_use,
)
from mstar.communication.tcp import TcpTransport
from mstar.communication.tensor_bytes import INLINE_KEY, INLINE_MAX
from mstar.communication.transport import LocalTransport
from mstar.plugins import transport_registry
from mstar.plugins.registry import import_string

TRANSPORTS = {"SHM": ShmTransport, "TCP": TcpTransport, "RDMA": MooncakeTransport}
HAS_MOONCAKE = importlib.util.find_spec("mooncake") is not None
#: Every test over RDMA needs the Mooncake wheel (CI installs it).
NEEDS_MOONCAKE = pytest.mark.skipif(not HAS_MOONCAKE, reason="Mooncake is not installed")


def protocols(*names: str) -> list:
    """`names` (all by default) as parameters, RDMA skipped without Mooncake."""
    return [pytest.param(n, marks=NEEDS_MOONCAKE) if n == "RDMA" else n
            for n in names or sorted(TRANSPORTS)]
BIG = 64 << 20  # bytes
STORED = INLINE_MAX // 4 + 1  # float32 elements: the smallest tensor not sent inline


def _sendable_dtypes() -> list[torch.dtype]:
    """Every dtype of this torch that can be created and viewed as bytes (the sub-byte
    and quantized ones cannot)."""
    found: list[torch.dtype] = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # complex32 and quantized dtypes warn on creation
        for value in vars(torch).values():
            if not isinstance(value, torch.dtype) or value in found:
                continue
            try:
                torch.zeros(2, 3, dtype=value).t().contiguous().reshape(-1).view(torch.uint8)
            except (RuntimeError, NotImplementedError):
                continue
            found.append(value)
    return found


DTYPES = _sendable_dtypes()


def _random(dtype: torch.dtype, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Random bit patterns (NaNs included) of any dtype; bools are 0 or 1."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    raw = torch.randint(0, 256, (math.prod(shape) * dtype.itemsize,), dtype=torch.uint8,
                        generator=gen)
    return raw.view(dtype).reshape(shape)


def _cases() -> list[torch.Tensor]:
    """For every dtype: 0-d, empty, contiguous, transposed and step-sliced tensors (inline)
    and a transposed one stored by the transport; one 64 MiB float32 tensor."""
    gen = torch.Generator().manual_seed(0)
    cases = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for dtype in DTYPES:
            cases += [_random(dtype, (), gen), _random(dtype, (0,), gen),
                      _random(dtype, (0, 3), gen), _random(dtype, (5, 7), gen),
                      _random(dtype, (6, 4), gen).t(), _random(dtype, (5, 9), gen)[1:, ::3],
                      _random(dtype, (INLINE_MAX // dtype.itemsize // 8 + 1, 8), gen).t()]
    cases.append(torch.randn(BIG // 4, generator=gen))
    return cases


def digest(tensor: torch.Tensor) -> str:
    """dtype, shape and a hash of the bytes: equal digests mean byte-exact (NaN-safe). The
    bits are gathered as integers (float4 has no copy kernel of its own)."""
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
    bits = tensor.view(ints[tensor.element_size()]) if tensor.element_size() in ints else tensor
    raw = bits.contiguous().reshape(-1).view(torch.uint8)
    return f"{tensor.dtype}{list(tensor.shape)}:{hashlib.blake2b(raw.numpy()).hexdigest()}"


# A fresh interpreter: builds the transport from the registry, reads the handles
# (msgpack) from stdin, gets and frees each, answers with the digests and what it holds.
RECEIVER = '''
import hashlib
import sys

import msgspec
import torch

from mstar.communication.messages import Handle
from mstar.plugins import transport_registry
from mstar.plugins.registry import import_string

''' + textwrap.dedent(inspect.getsource(digest)) + '''

protocol, deployment = sys.argv[1:3]
transport = import_string(transport_registry().get(protocol).transport_class)(
    "worker:1", deployment_id=deployment)
digests = []
for handle in msgspec.msgpack.decode(sys.stdin.buffer.read(), type=list[Handle]):
    tensor = transport.get(handle)
    assert tensor.device.type == "cpu" and tensor.is_contiguous()
    digests.append(digest(tensor))
    transport.free(handle)
left = transport.live_handles()
transport.close()
sys.stdout.buffer.write(msgspec.msgpack.encode([digests, left]))
'''

# Puts three tensors, says so, and waits to be killed.
KILLED_SENDER = '''
import sys
import time

import torch

from mstar.communication.shm import ShmTransport

transport = ShmTransport("worker:0", deployment_id=sys.argv[1])
for i in range(3):
    transport.put(torch.full((1 << 17,), float(i)), "r", owner="worker:1")
print("ready", flush=True)
time.sleep(60)
'''


def _segments(deployment_id: str) -> list[str]:
    return sorted(p.name for p in SHM_DIR.glob(f"mstar_{deployment_tag(deployment_id)}_*"))


@pytest.fixture
def deployment() -> Iterator[str]:
    deployment_id = uuid.uuid4().hex[:8]
    yield deployment_id
    cleanup_deployment(deployment_id)  # a failed test leaves nothing behind


@pytest.fixture(params=protocols())
def pair(request: pytest.FixtureRequest,
         deployment: str) -> Iterator[tuple[ShmTransport | TcpTransport | MooncakeTransport, ...]]:
    """A sender (worker:0) and a receiver (worker:1) in this process."""
    cls = TRANSPORTS[request.param]
    sender = cls("worker:0", deployment_id=deployment)
    receiver = cls("worker:1", deployment_id=deployment)
    yield sender, receiver
    sender.close()
    receiver.close()


def test_every_dtype_and_layout_round_trips_byte_exact_in_process(pair, deployment):
    torch.manual_seed(0)
    sender, receiver = pair
    for tensor in _cases():
        handle = sender.put(tensor, "r1", owner="worker:1")
        assert handle.owner == "worker:1" and handle.request_id == "r1"
        got = receiver.get(handle)
        assert got.dtype == tensor.dtype and got.shape == tensor.shape
        assert digest(got) == digest(tensor), handle
        receiver.free(handle)
        del got
        assert sender.live_handles() == receiver.live_handles() == 0
    assert segments_in_use(deployment) == []


@pytest.mark.parametrize("protocol", protocols())
def test_every_dtype_round_trips_byte_exact_across_processes(protocol, deployment):
    sender = TRANSPORTS[protocol]("worker:0", deployment_id=deployment)
    cases = _cases()
    handles = [sender.put(tensor, "r1", owner="worker:1") for tensor in cases]
    stored = sum(h.inline is None for h in handles)
    assert stored == len(DTYPES) + 1  # the rest travel inline
    assert sender.live_handles() == stored
    child = subprocess.run([sys.executable, "-c", RECEIVER, protocol, deployment],
                           input=msgspec.msgpack.encode(handles), capture_output=True,
                           timeout=120)
    assert child.returncode == 0, child.stderr.decode()
    digests, left_in_child = msgspec.msgpack.decode(child.stdout)
    assert digests == [digest(t) for t in cases]
    assert left_in_child == 0
    assert sender.live_handles() == 0  # the child freed every one
    assert segments_in_use(deployment) == []
    sender.close()
    assert _segments(deployment) == []


def test_the_receivers_tensor_is_its_own_copy(pair):
    """Writing what `get` returned changes nothing for a second reader, and it stays
    valid after `free`."""
    sender, receiver = pair
    for size in (16, STORED, BIG // 4):  # inline; copied; SHM's copy-on-write mapping
        source = torch.arange(size, dtype=torch.float32)
        handle = sender.put(source, "r1", owner="worker:1")
        first = receiver.get(handle)
        first.fill_(-1.0)
        second = receiver.get(handle)
        assert torch.equal(second, torch.arange(size, dtype=torch.float32))
        receiver.free(handle)
        assert torch.equal(first, torch.full((size,), -1.0))  # valid after free


def test_concurrent_gets_from_one_sender(pair):
    """Receiver threads share one connection per peer (TCP) without mixing replies."""
    sender, receiver = pair
    sources = [torch.full((STORED + i,), float(i)) for i in range(48)]
    handles = [sender.put(t, "r", owner="worker:1") for t in sources]
    results: dict[int, torch.Tensor] = {}

    def fetch(indices: range) -> None:
        for i in indices:
            results[i] = receiver.get(handles[i])
            receiver.free(handles[i])

    threads = [threading.Thread(target=fetch, args=(range(k, 48, 4),)) for k in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert all(torch.equal(results[i], sources[i]) for i in range(48))
    assert sender.live_handles() == receiver.live_handles() == 0


def test_free_request_frees_only_what_is_addressed_to_the_caller(pair, deployment):
    """A worker releasing a request must not pull its outputs from under their reader:
    it frees what is addressed to itself (results nobody consumed); receivers free the rest
    (also what reaches them after they dropped the request)."""
    sender, receiver = pair
    mine = sender.put(torch.ones(STORED), "a")  # a walk result kept for itself
    in_flight = sender.put(torch.zeros(2, STORED), "a", owner="worker:1")
    other = sender.put(torch.arange(STORED), "b", owner="worker:1")
    sender.free_request("a")
    with pytest.raises(KeyError, match=mine.key):
        receiver.get(mine)
    assert torch.equal(receiver.get(in_flight), torch.zeros(2, STORED))
    receiver.free(in_flight)
    receiver.free_request("a")
    assert torch.equal(receiver.get(other), torch.arange(STORED))  # other requests untouched
    receiver.free(other)
    assert sender.live_handles() == receiver.live_handles() == 0
    assert segments_in_use(deployment) == []


def test_a_shm_receiver_frees_what_it_read_without_the_sender(deployment):
    sender = ShmTransport("worker:0", deployment_id=deployment)
    receiver = ShmTransport("frontend", deployment_id=deployment)
    handle = sender.put(torch.randn(STORED), "r", owner="frontend")
    receiver.get(handle)
    assert receiver.live_handles() == 1 and len(segments_in_use(deployment)) == 1
    receiver.free_request("r")
    assert segments_in_use(deployment) == []
    assert sender.live_handles() == receiver.live_handles() == 0


def test_shm_names_are_short_and_close_unlinks_what_is_left():
    deployment_id = "a-long-deployment-name/with:odd characters"
    sender = ShmTransport("worker:0", deployment_id=deployment_id)
    handles = [sender.put(torch.randn(STORED), f"r{i}") for i in range(3)]
    assert all(len(h.key.partition("#")[0]) <= 30 and h.key.startswith("mstar_")
               for h in handles)
    assert sender.put(torch.empty(0, 3), "r").key == INLINE_KEY  # no segment for no bytes
    assert len(_segments(deployment_id)) == 3
    sender.close()
    assert _segments(deployment_id) == [] and sender.live_handles() == 0


def test_cleanup_deployment_removes_what_a_killed_process_left(deployment):
    other = ShmTransport("worker:0", deployment_id=deployment + "x")
    kept = other.put(torch.ones(STORED), "r")
    child = subprocess.Popen([sys.executable, "-c", KILLED_SENDER, deployment],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "ready"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    assert len(_segments(deployment)) == 3  # SIGKILL left them
    assert cleanup_deployment(deployment) == 3
    assert _segments(deployment) == []
    assert torch.equal(other.get(kept), torch.ones(STORED))  # another deployment is untouched
    other.close()


def test_shm_get_of_a_freed_or_foreign_segment_is_refused(deployment):
    sender = ShmTransport("worker:0", deployment_id=deployment)
    handle = sender.put(torch.randn(STORED), "r7")
    sender.free(handle)
    with pytest.raises(KeyError, match=f"{handle.key} of request r7 is gone"):
        sender.get(handle)
    elsewhere = Handle(key="mstar_x/../../etc/passwd#1", owner="worker:0", request_id="r7",
                       dtype="uint8", shape=[4])
    for call in (sender.get, sender.free):
        with pytest.raises(ValueError, match="not an SHM segment of deployment"):
            call(elsewhere)


@pytest.mark.parametrize("protocol", protocols("TCP", "RDMA"))
def test_tcp_and_rdma_errors_name_the_handle(protocol, deployment):
    sender = TRANSPORTS[protocol]("worker:0", deployment_id=deployment)
    receiver = TRANSPORTS[protocol]("worker:1", deployment_id=deployment)
    handle = sender.put(torch.randn(STORED), "r7", owner="worker:1")
    receiver.free(handle)
    with pytest.raises(KeyError, match=f"{handle.key} of request r7 is gone"):
        receiver.get(handle)
    again = sender.put(torch.randn(STORED), "r8", owner="worker:1")
    sender.close()
    with pytest.raises(ConnectionError, match=f"for tensor {again.key} of request r8"):
        receiver.get(again)
    receiver.free(again)  # the holder is gone, and its store with it: not an error
    receiver.close()


@pytest.mark.parametrize("protocol", protocols("TCP", "RDMA"))
def test_tcp_and_rdma_bind_the_address_of_a_device_and_refuse_wildcards(protocol, deployment):
    cls = TRANSPORTS[protocol]
    transport = cls("worker:0", deployment_id=deployment, device="lo")
    assert transport.put(torch.ones(STORED), "r").key.startswith("127.0.0.1:")
    transport.close()
    with pytest.raises(ValueError, match="interface 'nosuchnic0'.*interfaces: .*lo"):
        cls("worker:0", deployment_id=deployment, device="nosuchnic0")
    with pytest.raises(ValueError, match="wildcard"):
        cls("worker:0", deployment_id=deployment, host="0.0.0.0")


def test_handles_travel_as_msgspec_bytes(pair):
    sender, receiver = pair
    handle = sender.put(torch.arange(6).reshape(2, 3), "r", owner="worker:1")
    decoded = msgspec.msgpack.decode(msgspec.msgpack.encode(handle), type=Handle)
    assert torch.equal(receiver.get(decoded), torch.arange(6).reshape(2, 3))
    receiver.free(decoded)


def test_small_tensors_travel_inline_in_their_handle(pair):
    """Up to INLINE_MAX bytes nothing is stored: the receiver needs no segment or peer."""
    sender, receiver = pair
    small = torch.randn(INLINE_MAX // 4).reshape(-1, 4).t()
    handle = sender.put(small, "r", owner="worker:1")
    assert handle.key == INLINE_KEY and len(handle.inline) == INLINE_MAX
    assert sender.live_handles() == 0
    sender.close()  # the sender's store is irrelevant to an inline handle
    got = receiver.get(handle)
    assert torch.equal(got, small)
    got.add_(1)  # writable, and the receiver's own
    assert torch.equal(receiver.get(handle), small)
    with pytest.raises(ValueError, match="holds 3 bytes"):
        receiver.get(msgspec.structs.replace(handle, inline=b"abc"))


def test_a_shm_segment_is_reused_only_after_its_receiver_is_done(deployment):
    """The pool reuses a segment once the receiver freed the handle and dropped every
    tensor made from it; a tensor still alive keeps its bytes (copy-on-write mapping of a
    segment the sender would otherwise overwrite)."""
    sender = ShmTransport("worker:0", deployment_id=deployment)
    receiver = ShmTransport("worker:1", deployment_id=deployment)
    big = BIG // 16 // 4  # float32 elements, above the mapping threshold
    first = sender.put(torch.full((big,), 1.0), "r", owner="worker:1")
    held = receiver.get(first)[::2]  # a view outlives the tensor `get` returned
    receiver.free(first)
    assert segments_in_use(deployment) == [first.key.partition("#")[0]]  # held is alive
    second = sender.put(torch.full((big,), 2.0), "r", owner="worker:1")
    assert second.key.partition("#")[0] != first.key.partition("#")[0]
    assert torch.equal(held, torch.full((big // 2,), 1.0))
    del held
    assert segments_in_use(deployment) == [second.key.partition("#")[0]]
    third = sender.put(torch.full((big,), 3.0), "r", owner="worker:1")
    assert third.key.partition("#")[0] == first.key.partition("#")[0]  # reused
    with pytest.raises(KeyError, match="is gone"):
        receiver.get(first)  # a stale handle of a reused segment is refused
    for handle, value in ((second, 2.0), (third, 3.0)):
        assert torch.equal(receiver.get(handle), torch.full((big,), value))
        receiver.free(handle)
    assert segments_in_use(deployment) == [] and len(_segments(deployment)) == 2
    sender.close()
    receiver.close()
    assert _segments(deployment) == []


def test_the_shm_pool_keeps_few_free_segments(deployment):
    sender = ShmTransport("worker:0", deployment_id=deployment)
    handles = [sender.put(torch.randn(STORED), "r") for _ in range(8)]
    assert len(_segments(deployment)) == 8
    for handle in handles:
        sender.free(handle)
    sender.free(sender.put(torch.randn(STORED), "r"))
    assert len(_segments(deployment)) == 3  # at most IDLE_PER_CAPACITY + the one taken
    sender.close()


@NEEDS_MOONCAKE
def test_rdma_pool_slices_are_reused_once_their_receiver_is_done(deployment):
    """The sender's registered pool hands out slices, takes them back when the receiver
    marks them done, and reuses them; a stale handle of a reused slice is refused; a read
    stages in the receiver's pool and gives the slice back."""
    sender = MooncakeTransport("worker:0", deployment_id=deployment)
    receiver = MooncakeTransport("worker:1", deployment_id=deployment)
    first = sender.put(torch.full((STORED,), 1.0), "r", owner="worker:1")
    second = sender.put(torch.full((STORED,), 2.0), "r", owner="worker:1")
    used, registered = sender.pool_bytes()
    assert used >= 2 * STORED * 4 and sender.live_handles() == 2
    assert torch.equal(receiver.get(first), torch.full((STORED,), 1.0))
    assert receiver.pool_bytes()[0] == 0  # the staging slice is back
    receiver.free(first)
    assert sender.live_handles() == 1 and sender.pool_bytes()[0] < used
    third = sender.put(torch.full((STORED,), 3.0), "r", owner="worker:1")
    assert third.key.rpartition("@")[2] == first.key.rpartition("@")[2]  # reused
    assert sender.pool_bytes() == (used, registered)
    with pytest.raises(KeyError, match="is gone"):
        receiver.get(first)
    big = sender.put(torch.ones(BIG // 4), "r", owner="worker:1")  # grows the pool
    assert sender.pool_bytes()[1] > registered
    for handle in (second, third, big):
        receiver.get(handle)
        receiver.free(handle)
    assert sender.live_handles() == 0 and sender.pool_bytes()[0] == 0
    assert sender.pool_bytes()[1] > registered  # registered once: kept at its peak
    sender.close()
    receiver.close()


# Puts one stored tensor addressed to worker:1, writes its handle, waits to be killed.
DOOMED_SENDER = '''
import sys
import time

import msgspec
import torch

from mstar.plugins import transport_registry
from mstar.plugins.registry import import_string

transport = import_string(transport_registry().get(sys.argv[1]).transport_class)(
    "worker:0", deployment_id=sys.argv[2])
handle = transport.put(torch.ones(1 << 20), "r9", owner="worker:1")
sys.stdout.buffer.write(msgspec.msgpack.encode(handle).hex().encode() + b"\\n")
sys.stdout.flush()
time.sleep(60)
'''


@pytest.mark.parametrize("protocol", protocols("TCP", "RDMA"))
def test_a_read_from_a_killed_sender_fails_and_releases_the_receivers_buffers(protocol,
                                                                              deployment):
    child = subprocess.Popen([sys.executable, "-c", DOOMED_SENDER, protocol, deployment],
                             stdout=subprocess.PIPE)
    try:
        handle = msgspec.msgpack.decode(bytes.fromhex(child.stdout.readline().decode()),
                                        type=Handle)
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=30)
    receiver = TRANSPORTS[protocol]("worker:1", deployment_id=deployment)
    with pytest.raises(ConnectionError, match=f"for tensor {handle.key} of request r9"):
        receiver.get(handle)
    receiver.free(handle)  # the holder is gone, and its store with it: not an error
    assert receiver.live_handles() == 0
    if protocol == "RDMA":
        assert receiver.pool_bytes()[0] == 0
    receiver.close()


def test_a_tcp_sender_that_hangs_up_mid_transfer_fails_the_read(deployment):
    """A peer that announces 1 MiB, sends half and hangs up: the read fails naming the
    handle, and the broken connection is not reused."""
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def half_a_reply() -> None:
        with listener, listener.accept()[0] as peer:
            peer.recv(9)  # op:u8 id:u64
            peer.sendall(struct.pack("!BQ", 0, 1 << 20) + bytes(1 << 19))

    server = threading.Thread(target=half_a_reply)
    server.start()
    receiver = TcpTransport("worker:1", deployment_id=deployment)
    handle = Handle(key=f"127.0.0.1:{port}/0", owner="worker:1", request_id="r5",
                    dtype="uint8", shape=[1 << 20])
    with pytest.raises(ConnectionError, match=rf"for tensor {handle.key} of request r5: "
                                              rf"connection closed after {1 << 19} of"):
        receiver.get(handle)
    server.join(timeout=30)
    with pytest.raises(ConnectionError, match="Connection refused"):  # a new connection
        receiver.get(handle)
    receiver.close()


# Not installed: `import mooncake` fails, as it does where the wheel is absent.
WITHOUT_MOONCAKE = '''
import sys

sys.modules["mooncake"] = None
from mstar.cli.serve import serve_main
from mstar.communication.mooncake import MooncakeTransport

try:
    MooncakeTransport("worker:0", deployment_id="d")
except RuntimeError as exc:
    print(exc)
sys.argv[1:] = ["--config", "testvla_single", "--preset", "tiny", "--load-format", "dummy",
                "--tensor-comm-protocol", "RDMA", "--validate-config"]
sys.exit(serve_main())
'''


def test_rdma_without_mooncake_is_a_clear_error():
    child = subprocess.run([sys.executable, "-c", WITHOUT_MOONCAKE], capture_output=True,
                           text=True, timeout=120)
    assert child.returncode == 1, child.stderr
    assert child.stdout.startswith("the RDMA tensor transport needs Mooncake")
    assert "pip install 'mstar-core[rdma]'" in child.stdout
    assert "--tensor-comm-protocol RDMA needs Mooncake" in child.stderr


# Two transports on --mooncake-port P in one process: the first gets P or P+1; the second
# finds both taken; another port is refused (Mooncake fixed its ports at import).
ON_A_PORT = '''
import sys

from mstar.communication.mooncake import MooncakeTransport

port = int(sys.argv[1])
first = MooncakeTransport("worker:0", deployment_id="d", mooncake_port=port)
print(first.session)
for other in (port, port + 2):
    try:
        MooncakeTransport("worker:1", deployment_id="d", mooncake_port=other)
    except (OSError, RuntimeError) as exc:
        print(exc)
'''


@NEEDS_MOONCAKE
def test_rdma_listens_on_the_mooncake_port():
    # a free port whose successor is free too, where Mooncake takes ports (below 32768)
    port = next(p for p in range(20000 + os.getpid() % 10000, 32766, 2)
                if all(port_free(q) for q in (p, p + 1)))
    child = subprocess.run([sys.executable, "-c", ON_A_PORT, str(port)], capture_output=True,
                           text=True, timeout=60)
    assert child.returncode == 0, child.stderr
    session, taken, other = child.stdout.splitlines()
    assert session in (f"127.0.0.1:{port}", f"127.0.0.1:{port + 1}")
    assert taken.startswith(f"--mooncake-port {port}: port {port} is in use")
    assert other.startswith(f"--mooncake-port {port + 2}: Mooncake reads its ports once")
    with pytest.raises(ValueError, match="--mooncake-port 40000: Mooncake listens below 32768"):
        MooncakeTransport("worker:0", deployment_id="d", mooncake_port=40000)


def test_core_transports_are_registered_by_protocol():
    registry = transport_registry()
    for protocol, cls in {**TRANSPORTS, "LOCAL": LocalTransport}.items():
        assert import_string(registry.get(protocol.lower()).transport_class) is cls
        assert registry.owner(protocol) == "mstar-core"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("protocol", protocols())
def test_cuda_tensors_arrive_on_the_host(protocol, deployment):
    sender = TRANSPORTS[protocol]("worker:0", deployment_id=deployment)
    source = torch.randn(3, 5, device="cuda").t()
    handle = sender.put(source, "r")
    got = sender.get(handle)
    assert got.device.type == "cpu" and torch.equal(got, source.cpu())
    sender.free(handle)
    sender.close()
