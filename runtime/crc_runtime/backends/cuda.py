"""A small checked layer over cuda-bindings' runtime API: every call goes through :func:`check`.

Pinned host buffers, device buffers, streams, events and CUDA graphs are small classes that free what
they own (``close()``, or when garbage-collected). Nothing here imports torch or pycuda; the module
imports ``cuda.bindings`` lazily so the CPU runtime never needs it.
"""

from __future__ import annotations

import ctypes
import logging
from typing import Any

import numpy as np

from ..errors import BackendError

log = logging.getLogger(__name__)

_INSTALL = "install the GPU extra: pip install 'crc-fusion[trt]' (cuda-bindings)"


def cudart() -> Any:
    """The ``cuda.bindings.runtime`` module (older releases: ``cuda.cudart``).

    Raises:
        BackendError: cuda-bindings is not installed.
    """
    try:
        from cuda.bindings import runtime
    except ImportError:
        try:
            from cuda import cudart as runtime  # cuda-python < 12.6 layout
        except ImportError:
            raise BackendError(f"cuda-bindings is not installed; {_INSTALL}") from None
    return runtime


def check(result: Any, what: str = "CUDA call") -> Any:
    """Unpack a cuda-bindings result tuple ``(err, *values)``; raise on any error code.

    Args:
        result: What a cuda-bindings function returned.
        what: The call, named in the error message.

    Returns:
        None, the single value, or a tuple of values.

    Raises:
        BackendError: The error code is not success; the message names the call and CUDA's own words.
    """
    if not isinstance(result, tuple):
        result = (result,)
    err, values = result[0], result[1:]
    if int(err) != 0:
        rt = cudart()
        text = ""
        try:
            _, raw = rt.cudaGetErrorString(err)
            text = raw.decode() if isinstance(raw, bytes) else str(raw)
        except Exception:  # the error-to-text call itself may be what is broken
            text = str(err)
        raise BackendError(f"{what} failed: {getattr(err, 'name', err)} ({text})")
    if not values:
        return None
    return values[0] if len(values) == 1 else values


def device_info(device: int = 0) -> dict:
    """Name, compute capability, memory and driver / runtime versions of one CUDA device.

    Raises:
        BackendError: No usable CUDA device or driver.
    """
    rt = cudart()
    count = check(rt.cudaGetDeviceCount(), "cudaGetDeviceCount")
    if count <= device:
        raise BackendError(f"CUDA device {device} not found ({count} device(s) visible)")
    prop = check(rt.cudaGetDeviceProperties(device), "cudaGetDeviceProperties")
    name = prop.name.decode(errors="replace") if isinstance(prop.name, bytes) else str(prop.name)
    driver = check(rt.cudaDriverGetVersion(), "cudaDriverGetVersion")
    runtime = check(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion")
    return {
        "index": int(device),
        "name": name.rstrip("\x00"),
        "compute_capability": f"{prop.major}.{prop.minor}",
        "memory_gib": round(prop.totalGlobalMem / 2**30, 1),
        "cuda_driver": f"{driver // 1000}.{driver % 1000 // 10}",
        "cuda_runtime": f"{runtime // 1000}.{runtime % 1000 // 10}",
    }


def describe(device: int = 0) -> dict:
    """:func:`device_info` when cuda-bindings can ask the driver; else the ordinal and why not.

    For backends whose own library does not name the GPU (onnxruntime): a report still says which
    device ran, and cuda-bindings is an optional extra.
    """
    try:
        return device_info(device)
    except BackendError as exc:
        return {"index": int(device), "name": f"CUDA device {device}", "details_unavailable": str(exc)}


def cuda_available() -> tuple[bool, str]:
    """(True, device name) when cuda-bindings sees a device, else (False, why not)."""
    try:
        info = device_info()
    except BackendError as exc:
        return False, str(exc)
    return True, f"{info['name']} (sm {info['compute_capability']})"


class _Owned:
    """A CUDA object freed by ``close()``, and at garbage collection as a last resort."""

    def close(self) -> None:
        raise NotImplementedError

    def _free(self, attr: str, api: str) -> None:
        """Free ``self.<attr>`` with ``cudart().<api>`` once (cleared first, so never twice)."""
        handle = getattr(self, attr, None)
        if handle is not None:
            setattr(self, attr, None)
            check(getattr(cudart(), api)(handle), api)

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: the driver may already be gone
            pass


class Stream(_Owned):
    """One CUDA stream (non-blocking with respect to the legacy default stream)."""

    def __init__(self) -> None:
        rt = cudart()
        self.handle = check(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")

    def synchronize(self) -> None:
        check(cudart().cudaStreamSynchronize(self.handle), "cudaStreamSynchronize")

    def close(self) -> None:
        self._free("handle", "cudaStreamDestroy")


class Event(_Owned):
    """A CUDA event for timing work on a stream."""

    def __init__(self) -> None:
        self.handle = check(cudart().cudaEventCreate(), "cudaEventCreate")

    def record(self, stream: Stream) -> None:
        check(cudart().cudaEventRecord(self.handle, stream.handle), "cudaEventRecord")

    def elapsed_ms(self, start: Event) -> float:
        """Milliseconds from ``start`` to this event (both recorded and completed)."""
        return float(check(cudart().cudaEventElapsedTime(start.handle, self.handle), "cudaEventElapsedTime"))

    def close(self) -> None:
        self._free("handle", "cudaEventDestroy")


class DeviceBuffer(_Owned):
    """``nbytes`` of device memory, allocated once."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = int(nbytes)
        self.ptr = check(cudart().cudaMalloc(max(self.nbytes, 1)), f"cudaMalloc({self.nbytes})")

    def close(self) -> None:
        self._free("ptr", "cudaFree")


class PinnedBuffer(_Owned):
    """Page-locked host memory seen as a flat numpy array of ``dtype`` (so copies can be async)."""

    def __init__(self, count: int, dtype: np.dtype | str) -> None:
        self.dtype = np.dtype(dtype)
        self.nbytes = int(count) * self.dtype.itemsize
        self.ptr = check(cudart().cudaMallocHost(max(self.nbytes, 1)), f"cudaMallocHost({self.nbytes})")
        raw = (ctypes.c_byte * self.nbytes).from_address(int(self.ptr))
        self.array = np.frombuffer(raw, dtype=self.dtype, count=int(count))

    def view(self, shape: tuple[int, ...]) -> np.ndarray:
        """The first ``prod(shape)`` elements shaped as ``shape`` (no copy)."""
        return self.array[: int(np.prod(shape))].reshape(shape)

    def close(self) -> None:
        self.array = None  # no numpy view may outlive the pinned memory
        self._free("ptr", "cudaFreeHost")


def copy_htod_async(dst: DeviceBuffer, src: PinnedBuffer, nbytes: int, stream: Stream) -> None:
    """Host (pinned) -> device copy of ``nbytes`` on ``stream``."""
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyHostToDevice
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync H2D")


def copy_dtoh_async(dst: PinnedBuffer, src: DeviceBuffer, nbytes: int, stream: Stream) -> None:
    """Device -> host (pinned) copy of ``nbytes`` on ``stream``."""
    rt = cudart()
    kind = rt.cudaMemcpyKind.cudaMemcpyDeviceToHost
    check(rt.cudaMemcpyAsync(dst.ptr, src.ptr, nbytes, kind, stream.handle), "cudaMemcpyAsync D2H")


class Graph(_Owned):
    """A captured and instantiated CUDA graph: ``launch(stream)`` replays the captured work."""

    def __init__(self, graph: Any, exec_handle: Any) -> None:
        self._graph, self._exec = graph, exec_handle

    @classmethod
    def capture(cls, stream: Stream, work) -> Graph:
        """Capture what ``work()`` enqueues on ``stream`` (nothing runs during capture)."""
        rt = cudart()
        mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
        check(rt.cudaStreamBeginCapture(stream.handle, mode), "cudaStreamBeginCapture")
        try:
            work()
        except BaseException:
            # End the capture so the stream is usable again, but let work()'s own error be the one
            # raised (an invalidated capture makes EndCapture fail too, which would hide the cause).
            ended = rt.cudaStreamEndCapture(stream.handle)
            if int(ended[0]) == 0 and len(ended) > 1 and ended[1] is not None:
                rt.cudaGraphDestroy(ended[1])
            raise
        graph = check(rt.cudaStreamEndCapture(stream.handle), "cudaStreamEndCapture")
        try:
            exec_handle = check(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
        except BaseException:
            rt.cudaGraphDestroy(graph)  # nothing else holds the captured graph
            raise
        return cls(graph, exec_handle)

    def launch(self, stream: Stream) -> None:
        check(cudart().cudaGraphLaunch(self._exec, stream.handle), "cudaGraphLaunch")

    def close(self) -> None:
        self._free("_exec", "cudaGraphExecDestroy")
        self._free("_graph", "cudaGraphDestroy")
