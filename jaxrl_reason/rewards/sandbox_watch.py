"""The parent side of one `rewards/sandbox.py` run: watch its output, kill it and every process it left.

A sandbox's processes carry a marker, ("net", <network namespace link>) in namespaces mode or ("uid", <fresh
uid>) when root dropped to a private uid; `kill_sandbox` kills the process group and then every live process
with the marker (which catches children that called `setsid()`), never one that carries the marker of this
process. `collect` reads stdout, stderr and the result pipe until EOF, keeping tails, and enforces the
wall-clock and output limits.
"""
import os
import selectors
import signal
import time

TAIL_BYTES = 4096
RESULT_CAP = 1 << 20


def own_markers() -> tuple:
    return ("net", os.readlink("/proc/self/ns/net")), ("uid", os.getuid())


def matches(pid: int, marker) -> bool:
    """Whether live process `pid` carries the sandbox marker: ("net", netns link) or ("uid", real uid).
    Never true for a marker this process carries itself (a sandbox that failed to isolate)."""
    if marker in own_markers() or pid == os.getpid():
        return False
    try:
        if marker[0] == "net":
            return os.readlink(f"/proc/{pid}/ns/net") == marker[1]
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return fields["State"].split()[0] not in ("Z", "X") and int(fields["Uid"].split()[0]) == marker[1]
    except (OSError, KeyError, ValueError, IndexError):
        return False


def kill_sandbox(pgid: int, marker):
    """SIGKILL the process group, then every live process carrying `marker`, until none is left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    for _ in range(1000 if marker is not None else 0):
        pids = [int(n) for n in os.listdir("/proc") if n.isdigit() and matches(int(n), marker)]
        if not pids:
            return
        for pid in pids:
            try:   # a pidfd pins the process: the check and the signal cannot hit a recycled pid
                fd = os.pidfd_open(pid)
            except OSError:
                continue
            try:
                if matches(pid, marker):
                    signal.pidfd_send_signal(fd, signal.SIGKILL)
            except OSError:
                pass
            finally:
                os.close(fd)
        time.sleep(0.001)


def collect(proc, res_r: int, deadline: float, max_output_bytes: int, kill):
    """Reads stdout, stderr and results until EOF. Past the deadline (main process alive) or the output
    cap, or once the main process ends, calls `kill()` once. Returns (stdout_tail, stderr_tail, results,
    status or None)."""
    bufs = {proc.stdout.fileno(): bytearray(), proc.stderr.fileno(): bytearray(), res_r: bytearray()}
    sel = selectors.DefaultSelector()
    for fd in bufs:
        os.set_blocking(fd, False)
        sel.register(fd, selectors.EVENT_READ)
    total, status, killed_at = 0, None, None
    while sel.get_map():
        now = time.monotonic()   # waitid(WNOWAIT): the zombie keeps its pid (= the pgid) reserved until reaped
        alive = os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None
        if killed_at is None:
            if total > max_output_bytes:
                status = "output_limit"
            elif now >= deadline and alive:
                status = "timeout"
            if status is not None or not alive or now >= deadline:
                kill()
                killed_at = now
        elif now > killed_at + 2.0:   # an unkillable writer (guard mode, no marker): stop waiting
            break
        for key, _ in sel.select(timeout=0.05):
            chunk = os.read(key.fd, 65536)
            if not chunk:
                sel.unregister(key.fd)
            elif key.fd == res_r:
                bufs[res_r] += chunk[:max(0, RESULT_CAP - len(bufs[res_r]))]
            else:
                total += len(chunk)
                bufs[key.fd] += chunk
                del bufs[key.fd][:-TAIL_BYTES]
    sel.close()
    out, err = (bytes(bufs[f.fileno()]).decode("utf-8", "replace") for f in (proc.stdout, proc.stderr))
    return out, err, bytes(bufs[res_r]).decode("ascii", "replace"), status
