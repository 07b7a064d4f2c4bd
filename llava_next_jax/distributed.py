"""Several processes (hosts) as one JAX system: joining it, and moving batches in and results out.

Every process runs the same program on the same inputs (multi-controller JAX): `initialize` joins
the processes, after which `jax.devices()` lists the devices of all of them and a mesh over those
(`sharding.make_mesh`) spans hosts. A process holds only the shards on its own devices
(`jax.local_devices()`), so host data goes in with `put` and comes back out with `fetch`.

Worked example, two processes with two CPU devices each (process 0 owns global devices 0, 1):

    mesh 2 x 2 (data x model): [[0, 1], [2, 3]]   a [4, T] batch put over "data" leaves
                                                   rows 0-1 on process 0, rows 2-3 on process 1;
    mesh 1 x 4:                [[0, 1, 2, 3]]      a weight split over "model" leaves
                                                   half of it on each process.
"""

from __future__ import annotations

import errno
import os
import socket
import time
from typing import Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils

def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               timeout_s: int = 300) -> None:
    """Joins this process to the others (`jax.distributed.initialize`); call it first, before any
    other JAX call, in every process.

    coordinator_address: "host:port" of process 0, which serves the coordination service there;
        every process must pass the same one. Default: $JAX_COORDINATOR_ADDRESS.
    num_processes, process_id: how many processes and which one this is (0 .. num_processes - 1).
        Default: $JAX_NUM_PROCESSES, $JAX_PROCESS_ID.
    local_device_ids: the local accelerators this process uses (e.g. one GPU each).
        Default: $JAX_LOCAL_DEVICE_IDS ("0,1"), else all of them.
    Whatever is still unset after that is detected by JAX where it can be (Cloud TPU pods, Slurm,
    Open MPI); elsewhere it is an error.

    CPU devices exchange data through gloo collectives over TCP (selected here, before the backend
    starts). timeout_s: how long to wait for the coordinator and the other processes.

    Raises RuntimeError when process 0 cannot serve on the coordinator's port, ConnectionError when
    another process cannot reach it within timeout_s (JAX itself would crash or abort there).
    Processes that reach the coordinator but wait in vain for the rest (a wrong num_processes, a
    process that never started) are ended by JAX after timeout_s with a DEADLINE_EXCEEDED log.
    """
    from jax._src import xla_bridge  # no public way to ask whether the backend has started
    if jax.distributed.is_initialized():
        raise RuntimeError("distributed.initialize was already called in this process (once per process)")
    if xla_bridge.backends_are_initialized():
        raise RuntimeError("distributed.initialize must run before any other JAX call (jax.devices, "
                           "device_put, a computation...): the backend has already started in this process")
    coordinator_address = coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS")
    num_processes = _env_int(num_processes, "JAX_NUM_PROCESSES")
    process_id = _env_int(process_id, "JAX_PROCESS_ID")
    deadline = time.monotonic() + timeout_s
    if coordinator_address is not None and process_id is not None:
        _check_coordinator(coordinator_address, process_id, deadline)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address, num_processes, process_id, local_device_ids,
                                   initialization_timeout=max(1, round(deadline - time.monotonic())))
    except Exception as e:
        raise RuntimeError(f"could not join the JAX processes through coordinator {coordinator_address!r} as "
                           f"process {process_id} of {num_processes}: {e}") from e


def _check_coordinator(address: str, process_id: int, deadline: float) -> None:
    """Process 0: the coordinator's port can be bound. Others: it accepts connections before `deadline`."""
    host, port = _host_port(address, "coordinator_address")
    if process_id == 0:
        bind = os.environ.get("JAX_COORDINATOR_BIND_ADDRESS", f"[::]:{port}")  # what JAX binds
        bind_host, bind_port = _host_port(bind, "$JAX_COORDINATOR_BIND_ADDRESS")
        try:
            with socket.socket(socket.AF_INET6 if ":" in bind_host else socket.AF_INET) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind((bind_host, bind_port))
        except OSError as e:
            if e.errno in (errno.EADDRINUSE, errno.EACCES):
                raise RuntimeError(f"process 0 cannot serve the coordinator on {bind}: {e.strerror}; "
                                   f"choose a free port in coordinator_address ({address})") from None
        return
    while True:
        try:
            socket.create_connection((host, port), timeout=max(0.1, min(5.0, deadline - time.monotonic()))).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise ConnectionError(f"process {process_id} cannot reach the coordinator at {address}: {e} "
                                      f"(is process 0 running, with this same address, and is the host:port "
                                      f"reachable from here?)") from None
            time.sleep(0.25)


def _host_port(address: str, what: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"{what} must be host:port (e.g. 10.0.0.1:1234 or [::1]:1234); got {address!r}")
    return host.strip("[]"), int(port)


def _env_int(value: int | None, name: str) -> int | None:
    if value is not None or not os.environ.get(name):
        return value
    try:
        return int(os.environ[name])
    except ValueError:
        raise ValueError(f"${name} must be an integer; got {os.environ[name]!r}") from None


def put(host: np.ndarray, sharding: jax.sharding.Sharding) -> jax.Array:
    """A global array laid out as `sharding`, from a numpy array every process holds in full (the
    same values everywhere): each process copies only the slices its own devices hold."""
    if sharding.is_fully_addressable:
        return jax.device_put(host, sharding)
    host = np.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def fetch(array: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process) array as numpy, in every process (an all-gather when
    other processes hold parts of it)."""
    if array.is_fully_addressable:
        return np.asarray(array)
    return np.asarray(multihost_utils.process_allgather(array, tiled=True))
