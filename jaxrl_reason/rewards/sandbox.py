"""Process isolation for untrusted Python: the sandbox under `rewards/code.py`'s test runner.

`run_sandboxed(script, payload, ...)` runs `script` in a fresh interpreter (`python -I -S`: stdlib only,
PYTHON* variables ignored) under the isolation and limits below and returns its output tails and reports.

Isolated in both modes:
  - environment: the child sees only PATH, LANG, LC_ALL, HOME, TMPDIR (no secret of the parent); stdin is
    /dev/null;
  - resources, set in `preexec_fn`: RLIMIT_CPU (timeout + 1 s, SIGKILL a second later), RLIMIT_AS
    (memory_mb), RLIMIT_NPROC (max_processes), RLIMIT_NOFILE, RLIMIT_FSIZE (max_file_mb), RLIMIT_CORE=0,
    PR_SET_NO_NEW_PRIVS (set-uid binaries gain nothing), PR_SET_PDEATHSIG (the main child dies with the
    calling thread);
  - time and output: past the wall-clock limit, or past max_output_bytes of stdout + stderr, the child's
    process group is killed (`start_new_session`, `os.killpg`) and so is every live process carrying the
    sandbox's marker (its network namespace, or its private uid; a run whose marker is the caller's own
    is refused), which catches children that called `setsid()`; the same sweep runs when the main
    process ends;
  - as root (namespaces mode; guard mode only if the interpreter is reachable by others), the code runs as
    a fresh random uid in 0x70000000..0x7FFEFFFF with no groups: RLIMIT_NPROC, which root ignores, then
    counts exactly this sandbox's processes, and file permissions apply.

isolation="namespaces" (Linux, as root or where unprivileged user namespaces are allowed; "auto" takes it
when a probe run works): new mount and network namespaces, plus a user namespace when not root, mapped to
the caller's own uid (never 0 inside), so the code holds no capability once Python starts.
  - network: only a loopback interface, down: no IP traffic at all, 127.0.0.1 included; abstract unix
    sockets are per namespace;
  - files: the whole mount tree is read-only and nosuid; /root, /home, $HOME, /var/tmp, /dev/shm, /run,
    /proc, /mnt, /media, /srv are covered by empty read-only tmpfs (the interpreter's install re-mounted
    read-only if it lives under one); /tmp is a fresh private tmpfs of max_file_mb MiB, the cwd, gone
    with the namespace;
  - NOT isolated: the rest of the filesystem is readable where permissions allow (when not root, as the
    caller's uid: its readable files outside the covered directories); filesystem unix sockets outside
    them stay connectable where permissions allow; CPU time is per process (max_processes of them);
    kernel bugs.
isolation="guard" (where namespaces are not permitted, e.g. Docker's default seccomp profile): cwd is a fresh
temp directory, deleted afterwards, and a PEP 578 audit hook installed before the code runs raises
PermissionError on sockets, process creation (fork, exec, spawn, subprocess, system), kill, ctypes,
importing _posixsubprocess, writing/renaming/deleting/chmod-ing paths outside the temp directory (except
/dev/null), and opening /proc/<other pid>/.
  - NOT isolated: it is a speed bump, not a boundary: C extensions, `dir_fd` arguments, symlink races and
    interpreter bugs get past it; host files stay readable; without a uid drop the code runs as the caller
    (root included) and, as root, RLIMIT_NPROC is void.

Not protected in either mode: processes forked by the code outlive a caller that is SIGKILLed mid-run
(still confined; RLIMIT_CPU ends busy ones).
Tested on Linux only (elsewhere guard mode runs without prctl, untested). `preexec_fn` runs Python in the
forked child: call `run_sandboxed` from a single-threaded process (a VerifierPool worker), as the
`subprocess` docs advise.
"""
import ctypes
import dataclasses
import functools
import json
import math
import os
import resource
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from jaxrl_reason.rewards.sandbox_watch import collect, kill_sandbox, own_markers

SANDBOX_TAG = "jaxrl-reason-code-sandbox"     # argv[1] of every sandbox interpreter
_HIDDEN_DIRS = ("/root", "/home", "/var/tmp", "/dev/shm", "/run", "/proc", "/mnt", "/media", "/srv")
_UID_RANGE = (0x70000000, 0x7FFF0000)        # unused by distributions and by systemd's allocations
_NS_UID_FOR_ROOT = 1000                      # inner uid of a user namespace made by root (tests only)
# Linux uapi constants (sched.h, mount.h, prctl.h); these syscall numbers are the same on all arches.
CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWNET = 0x20000, 0x10000000, 0x40000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
AT_FDCWD, AT_RECURSIVE, OPEN_TREE_CLONE, OPEN_TREE_CLOEXEC = -100, 0x8000, 1, 0o2000000
MOVE_MOUNT_F_EMPTY_PATH, MOUNT_ATTR_RDONLY, MOUNT_ATTR_NOSUID = 4, 1, 2
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442
PR_SET_PDEATHSIG, PR_SET_NO_NEW_PRIVS = 1, 38
_LIBC = ctypes.CDLL(None, use_errno=True) if sys.platform.startswith("linux") else None


# The audit-hook guard of guard mode (PEP 578), run inside the sandbox by the caller's script before the
# untrusted code: `_guard(root)` blocks what the module docstring lists.
GUARD_SOURCE = r'''
import os, sys

def _guard(root):
    realpath, fsdecode, sep, pid = os.path.realpath, os.fsdecode, os.sep, str(os.getpid())
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
    blocked = ("socket.", "os.fork", "os.forkpty", "os.exec", "os.posix_spawn", "os.spawn", "os.system",
               "os.kill", "subprocess.", "ctypes.", "pty.")
    path_events = ("os.remove", "os.rename", "os.rmdir", "os.mkdir", "os.chmod", "os.chown", "os.link",
                   "os.symlink", "os.truncate", "os.utime", "shutil.")
    def inside(p):
        p = realpath(fsdecode(p))
        return p == root or p.startswith(root + sep) or p == "/dev/null"
    def other_proc(p):
        parts = realpath(fsdecode(p)).split(sep)
        return len(parts) > 2 and parts[1] == "proc" and parts[2].isdigit() and parts[2] != pid
    def hook(event, args):
        if event.startswith(blocked) or (event == "import" and args[0] == "_posixsubprocess"):
            raise PermissionError("sandbox guard blocks " + event)
        if event == "open" and not isinstance(args[0], int):
            path, mode, flags = args
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & write_flags)
            if (writing and not inside(path)) or other_proc(path):
                raise PermissionError("sandbox guard blocks open(%r)" % (path,))
        elif event.startswith(path_events) and not all(
                inside(a) for a in args if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__")):
            raise PermissionError("sandbox guard blocks " + event)
    sys.addaudithook(hook)
'''


# ------------------------------------------------------------------ sandbox set-up (parent plans, child acts)

@dataclasses.dataclass(frozen=True)
class _Plan:
    namespaces: bool
    userns: bool              # not root: a user namespace grants the right to make the others
    uid: int                  # the code's uid: fresh when root drops, the inner one in a user namespace
    gid: int
    host_ids: tuple           # the caller's (uid, gid), mapped to (uid, gid) in a user namespace
    drop: bool                # root: switch to uid/gid before exec
    workdir: str
    scratch_mb: int
    hide: tuple               # directories covered by an empty tmpfs (the workdir by the scratch tmpfs)
    expose: tuple             # interpreter directories under `hide`, re-mounted read-only
    rlimits: tuple            # (resource, soft, hard)
    res_w: int                # result pipe: set-up errors are reported there


def _ok(ret: int, what: str) -> int:
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")
    return ret


def _sys(number: int, *args, what: str) -> int:
    return _ok(_LIBC.syscall(ctypes.c_long(number), *args), what)


def _mount(src, target: str, fstype, flags: int, data=None):
    _ok(_LIBC.mount(src, target.encode(), fstype, ctypes.c_ulong(flags), data), f"mount {target}")


def _set_ro(path: str, recursive: bool, readonly: bool):
    """mount_setattr: (recursively) make read-only + nosuid, or clear read-only."""
    attr = (ctypes.c_uint64 * 4)(MOUNT_ATTR_RDONLY | MOUNT_ATTR_NOSUID if readonly else 0,
                                 0 if readonly else MOUNT_ATTR_RDONLY, 0, 0)
    _sys(SYS_MOUNT_SETATTR, AT_FDCWD, path.encode(), ctypes.c_uint(AT_RECURSIVE if recursive else 0),
         ctypes.byref(attr), ctypes.c_size_t(32), what=f"mount_setattr {path}")


def _enter_namespaces(p: _Plan):
    """New mount + network (+ user) namespaces: read-only tree, covered dirs, private rw tmpfs workdir."""
    _ok(_LIBC.unshare(CLONE_NEWNS | CLONE_NEWNET | (CLONE_NEWUSER if p.userns else 0)), "unshare")
    if p.userns:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{p.uid} {p.host_ids[0]} 1"),
                           ("gid_map", f"{p.gid} {p.host_ids[1]} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    _mount(None, "/", None, MS_REC | MS_PRIVATE)      # nothing below propagates to the host
    clones = [_sys(SYS_OPEN_TREE, AT_FDCWD, e.encode(), ctypes.c_uint(OPEN_TREE_CLONE | OPEN_TREE_CLOEXEC
                                                                     | AT_RECURSIVE), what=f"open_tree {e}")
              for e in p.expose]
    for d in p.hide:
        data = (f"mode=700,uid={p.uid},gid={p.gid},size={p.scratch_mb}m" if d == p.workdir
                else "mode=755,size=64k")
        _mount(b"tmpfs", d, b"tmpfs", MS_NOSUID | MS_NODEV, data.encode())
    for fd, e in zip(clones, p.expose):
        os.makedirs(e, exist_ok=True)
        _sys(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, e.encode(), ctypes.c_uint(MOVE_MOUNT_F_EMPTY_PATH),
             what=f"move_mount {e}")
        os.close(fd)
    _set_ro("/", recursive=True, readonly=True)
    _set_ro(p.workdir, recursive=False, readonly=False)


def _preexec(p: _Plan):
    """Runs in the forked child before exec: namespaces, rlimits, uid drop, no_new_privs, pdeathsig, cwd."""
    try:
        if p.namespaces:
            _enter_namespaces(p)
        for res, soft, hard in p.rlimits:
            resource.setrlimit(res, (soft, hard))
        if p.drop:
            os.setgroups([])
            os.setresgid(p.gid, p.gid, p.gid)
            os.setresuid(p.uid, p.uid, p.uid)
        for option, value in ((PR_SET_NO_NEW_PRIVS, 1), (PR_SET_PDEATHSIG, signal.SIGKILL)) if _LIBC else ():
            _ok(_LIBC.prctl(option, *(ctypes.c_ulong(v) for v in (value, 0, 0, 0))), f"prctl {option}")
        os.chdir(p.workdir)
    except BaseException as e:
        tb = e.__traceback__.tb_next or e.__traceback__
        os.write(p.res_w, f"setup_error {e!r} (sandbox.py line {tb.tb_lineno})\n".encode())
        raise


def _under(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


def _python() -> str:
    return os.path.realpath(sys.executable)


def _is_root() -> bool:
    return os.geteuid() == 0


def _mount_layout(workdir: str):
    """(hide, expose): top-level dirs to cover (incl. workdir) and interpreter dirs living under them."""
    dirs = {os.path.realpath(d) for d in _HIDDEN_DIRS + (os.path.expanduser("~"),)}
    dirs = {d for d in dirs if d != "/" and os.path.isdir(d) and not _under(workdir, d)} | {workdir}
    hide = sorted(d for d in dirs if not any(o != d and _under(d, o) for o in dirs))
    need = {os.path.realpath(d) for d in (sys.base_prefix, sys.base_exec_prefix, os.path.dirname(_python()))}
    need = {n for n in need if not any(o != n and _under(n, o) for o in need)}
    return tuple(hide), tuple(sorted(n for n in need if any(_under(n, h) for h in hide)))


def _reachable_by_others(path: str) -> bool:
    """Every directory above `path` is searchable by 'others' (a fresh uid without groups)."""
    parts = os.path.realpath(path).split("/")
    return all(os.stat("/" + "/".join(parts[1:i])).st_mode & 0o001 for i in range(1, len(parts)))


def _rlimits(timeout_s, memory_mb, max_processes, max_open_files, max_file_mb) -> tuple:
    cpu = math.ceil(timeout_s) + 1
    out = []
    for res, soft, hard in ((resource.RLIMIT_CPU, cpu, cpu + 1), (resource.RLIMIT_AS, memory_mb << 20, None),
                            (resource.RLIMIT_NPROC, max_processes, None),
                            (resource.RLIMIT_NOFILE, max_open_files, None),
                            (resource.RLIMIT_FSIZE, max_file_mb << 20, None), (resource.RLIMIT_CORE, 0, None)):
        hard = soft if hard is None else hard
        cap = resource.getrlimit(res)[1]
        if cap != resource.RLIM_INFINITY and not _is_root():   # only root may raise a hard limit
            soft, hard = min(soft, cap), min(hard, cap)
        out.append((res, soft, hard))
    return tuple(out)


def _make_plan(namespaces: bool, workdir: str, rlimits: tuple, max_file_mb: int, res_w: int) -> _Plan:
    root = _is_root()
    reachable = all(_reachable_by_others(p) for p in (_python(), sys.base_prefix, workdir))
    drop = root and (namespaces or reachable)
    uid = secrets.randbelow(_UID_RANGE[1] - _UID_RANGE[0]) + _UID_RANGE[0] if drop else os.getuid()
    gid = uid if drop else os.getgid()
    if namespaces and not root:      # inner ids of the user namespace; never 0: no capability after exec
        uid, gid = uid or _NS_UID_FOR_ROOT, gid or _NS_UID_FOR_ROOT
    hide, expose = _mount_layout(workdir) if namespaces else ((), ())
    return _Plan(namespaces=namespaces, userns=namespaces and not root, uid=uid, gid=gid,
                 host_ids=(os.getuid(), os.getgid()), drop=drop, workdir=workdir, scratch_mb=max_file_mb,
                 hide=hide, expose=expose, rlimits=rlimits, res_w=res_w)


def _spawn(plan: _Plan, script: str, payload: bytes, res_r: int):
    """Starts the sandboxed interpreter, which waits for a byte on `go_w`; returns (proc, go_w)."""
    go_r, go_w = os.pipe()
    env = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "HOME": plan.workdir,
           "TMPDIR": plan.workdir}
    try:
        with tempfile.TemporaryFile() as f:
            f.write(payload)
            f.flush()
            f.seek(0)
            fds = (f.fileno(), go_r, plan.res_w)
            argv = [_python(), "-I", "-S", "-c", script, SANDBOX_TAG, *map(str, fds)]
            return subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, env=env, start_new_session=True, pass_fds=fds,
                                    preexec_fn=functools.partial(_preexec, plan)), go_w
    except BaseException as e:
        os.close(go_w)
        if not isinstance(e, subprocess.SubprocessError):
            raise
        os.set_blocking(res_r, False)
        try:
            why = os.read(res_r, 4096).decode("utf-8", "replace").strip()
        except BlockingIOError:
            why = str(e)
        raise RuntimeError(f"the code sandbox could not be set up ({why}).") from None
    finally:
        os.close(go_r)


def run_sandboxed(script: str, payload: dict, *, namespaces: bool, timeout_s: float, memory_mb: int,
                  max_output_bytes: int, max_processes: int, max_open_files: int, max_file_mb: int):
    """Runs `script` on `payload` in one sandbox (module docstring): namespaces or guard mode.

    The script runs as `python -I -S -c script SANDBOX_TAG <payload_fd> <go_fd> <result_fd>`: it reads the
    JSON payload (plus "guard": True in guard mode) from payload_fd, waits for a byte on go_fd (sent once the
    parent knows the sandbox's marker), calls `_guard(cwd)` of `GUARD_SOURCE` if payload["guard"], and writes
    its reports to result_fd. The wall clock `timeout_s` covers start-up and everything the script runs.

    Returns:
      (stdout_tail, stderr_tail, result_text, status, returncode): the last sandbox_watch.TAIL_BYTES of each
      stream, what the script wrote to result_fd (at most 1 MiB), status "timeout" / "output_limit" / None (it ended).
    """
    if not (timeout_s > 0 and memory_mb >= 64 and max_output_bytes > 0 and max_processes >= 1
            and max_open_files >= 16 and max_file_mb >= 1):
        raise ValueError("need timeout_s > 0, memory_mb >= 64, max_output_bytes > 0, max_processes >= 1, "
                         "max_open_files >= 16 and max_file_mb >= 1.")
    workdir = os.path.realpath("/tmp") if namespaces else tempfile.mkdtemp(prefix="jaxrl_code_")
    res_r, res_w = os.pipe()
    try:
        plan = _make_plan(namespaces, workdir, _rlimits(timeout_s, memory_mb, max_processes, max_open_files,
                                                        max_file_mb), max_file_mb, res_w)
        if plan.drop and not namespaces:
            os.chown(workdir, plan.uid, plan.gid)
        data = json.dumps({**payload, "guard": not namespaces}).encode()
        return _run(plan, script, data, res_r, timeout_s, max_output_bytes)
    finally:
        for fd in (res_r, res_w):
            try:
                os.close(fd)
            except OSError:   # res_w is closed by _run once the child holds it
                pass
        if not namespaces:
            shutil.rmtree(workdir, ignore_errors=True)


def _run(plan: _Plan, script: str, payload: bytes, res_r: int, timeout_s: float, max_output_bytes: int):
    """Spawns, releases, watches and reaps one sandbox run; returns run_sandboxed's tuple."""
    proc, go_w = _spawn(plan, script, payload, res_r)
    try:
        os.close(plan.res_w)   # the child's copy is the only writer left: EOF when the sandbox is gone
        marker = (("net", os.readlink(f"/proc/{proc.pid}/ns/net")) if plan.namespaces else
                  ("uid", plan.uid) if plan.drop else None)
        if marker is not None and marker in own_markers():
            raise RuntimeError("the code sandbox did not get its own network namespace or uid.")
        kill = functools.partial(kill_sandbox, proc.pid, marker)
        try:
            os.write(go_w, b"g")
        except BrokenPipeError:
            pass
        out, err, res, status = collect(proc, res_r, time.monotonic() + timeout_s, max_output_bytes, kill)
        kill()
        proc.wait()
        return out, err, res, status, proc.returncode
    finally:
        os.close(go_w)
        if proc.returncode is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
