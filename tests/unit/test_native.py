"""The compiled bindings, exercised for real: namespaces, mounts, pidfds."""
from __future__ import annotations

import asyncio
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from hostel import native
from hostel.spawn import Plan, StepFailed, spawn, wait_exit

NS_FLAGS = native.CLONE_NEWPID | native.CLONE_NEWUTS | native.CLONE_NEWNS


def run_plan(plan: Plan, flags: int) -> tuple[bytes, native.ExitInfo]:
    """Spawn `plan` with its stdout on a pipe; return the output and how it ended."""
    out_r, out_w = os.pipe()
    plan.dup2(out_w, 1)
    plan.steps.insert(0, plan.steps.pop())  # stdout first, before anything can fail
    child = spawn(plan, flags)
    os.close(out_w)
    try:
        child.wait_started()
        with os.fdopen(out_r, "rb") as out:
            data = out.read()
        return data, native.pidfd_wait(child.pidfd, block=True)
    finally:
        child.close()


def add_shell(plan: Plan, script: str) -> Plan:
    plan.execve("/bin/sh", ["sh", "-c", script], ["PATH=/usr/sbin:/usr/bin:/sbin:/bin"])
    return plan


def shell_plan(script: str) -> Plan:
    return add_shell(Plan(), script)


def test_child_in_new_namespaces_is_pid1_with_its_own_hostname() -> None:
    plan = Plan()
    plan.sethostname("hostel-test")
    plan.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
    plan.mount("proc", "/proc", "proc", native.MS_NOSUID | native.MS_NODEV | native.MS_NOEXEC)
    plan.execve("/bin/sh", ["sh", "-c", "echo $$ $(hostname) $(ls /proc | grep -c '^[0-9]')"],
                ["PATH=/bin:/usr/bin"])
    out, info = run_plan(plan, NS_FLAGS)
    pid, hostname, nprocs = out.split()
    assert (pid, hostname) == (b"1", b"hostel-test")
    host_procs = sum(name.isdigit() for name in os.listdir("/proc"))
    assert int(nprocs) <= 4 < host_procs  # sh, a subshell, ls, grep: nothing of the host
    assert info.exited and info.status == 0
    assert os.uname().nodename != "hostel-test"


def test_exit_status_and_signal_come_back_through_the_pidfd() -> None:
    _, info = run_plan(shell_plan("exit 42"), NS_FLAGS)
    assert (info.exited, info.status, info.returncode) == (True, 42, 42)
    _, info = run_plan(shell_plan("kill -TERM $$"), 0)
    assert not info.exited and info.status == signal.SIGTERM
    assert info.returncode == 128 + signal.SIGTERM
    assert info.describe() == f"killed by signal {signal.SIGTERM}"


def test_failing_step_is_named_with_its_errno(tmp_path: Path) -> None:
    plan = Plan()
    plan.mkdir(str(tmp_path / "ok"))
    plan.mount("proc", str(tmp_path / "missing" / "proc"), "proc")
    plan.execve("/bin/true", ["true"], [])
    child = spawn(plan, native.CLONE_NEWNS)
    try:
        with pytest.raises(StepFailed) as failure:
            child.wait_started()
        assert failure.value.index == 1
        assert failure.value.errno == errno.ENOENT
        assert str(failure.value) == (
            f"step 1 (mount proc on {tmp_path}/missing/proc): ENOENT (No such file or directory)")
        assert native.pidfd_wait(child.pidfd, block=True).status == 127
    finally:
        child.close()
    assert (tmp_path / "ok").is_dir()


def test_execve_failure_is_reported() -> None:
    plan = Plan()
    plan.execve("/nonexistent/binary", ["x"], [])
    child = spawn(plan, 0)
    try:
        with pytest.raises(StepFailed, match=r"step 0 \(execute /nonexistent/binary\): ENOENT"):
            child.wait_started()
    finally:
        native.pidfd_wait(child.pidfd, block=True)
        child.close()


def test_parent_side_work_is_synchronised_over_a_pipe(tmp_path: Path) -> None:
    """The child waits at WAIT_FD until the parent has done its part."""
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    out_r, out_w = os.pipe()
    marker = tmp_path / "parent-was-here"
    plan = Plan()
    plan.wait_for_parent(go_r, "parent writes the marker")
    plan.dup2(out_w, 1)
    add_shell(plan, f"cat {marker}")
    child = spawn(plan, 0)
    os.close(go_r)
    os.close(out_w)
    try:
        marker.write_text("done by parent\n")
        os.write(go_w, b"x")
        os.close(go_w)
        child.wait_started()
        assert os.read(out_r, 100) == b"done by parent\n"
        assert native.pidfd_wait(child.pidfd, block=True).status == 0
    finally:
        os.close(out_r)
        child.close()


def test_parent_giving_up_cancels_the_child() -> None:
    go_r, go_w = os.pipe2(os.O_CLOEXEC)
    plan = Plan()
    plan.wait_for_parent(go_r, "veth moved into the namespace")
    plan.execve("/bin/true", ["true"], [])
    child = spawn(plan, 0)
    os.close(go_r)
    os.close(go_w)  # EOF instead of the go byte
    try:
        with pytest.raises(StepFailed, match=r"wait for parent: veth moved .*ECANCELED"):
            child.wait_started()
    finally:
        native.pidfd_wait(child.pidfd, block=True)
        child.close()


def test_foreign_descriptors_are_not_inherited() -> None:
    secret_r, secret_w = os.pipe()  # not in the plan: must be closed in the child
    try:
        out, _ = run_plan(shell_plan("ls /proc/self/fd | sort -n | tr '\\n' ' '"), 0)
        fds = {int(x) for x in out.split()}
        assert secret_r not in fds - {0, 1, 2, 3} and secret_w not in fds - {0, 1, 2, 3}
        assert fds <= {0, 1, 2, 3}  # 3 is ls's own directory handle
    finally:
        os.close(secret_r)
        os.close(secret_w)


def test_stub_init_reaps_and_passes_on_the_payload_status() -> None:
    plan = Plan()
    plan.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
    plan.mount("proc", "/proc", "proc")
    plan.stub_init()
    plan.execve("/bin/sh", ["sh", "-c", "echo $$; (sleep 0.1 &) ; exit 7"], ["PATH=/bin:/usr/bin"])
    out, info = run_plan(plan, NS_FLAGS)
    assert out.strip() == b"2"
    assert info.exited and info.status == 7


def test_capabilities_no_new_privs_and_bounding_set() -> None:
    plan = Plan()
    plan.no_new_privs()
    plan.drop_bounding_caps(1 << 21)  # CAP_SYS_ADMIN
    add_shell(plan, "grep -E '^(CapBnd|NoNewPrivs)' /proc/self/status")
    out, _ = run_plan(plan, 0)
    fields = dict(line.split(":\t") for line in out.decode().splitlines())
    assert fields["NoNewPrivs"] == "1"
    assert not int(fields["CapBnd"], 16) & (1 << 21)
    assert int(fields["CapBnd"], 16) & (1 << 0)  # CAP_CHOWN kept


def test_async_wait_exit_uses_the_pidfd() -> None:
    async def scenario() -> native.ExitInfo:
        child = spawn(shell_plan("sleep 0.2; exit 3"), 0)
        try:
            await child.started()
            return await asyncio.wait_for(wait_exit(child.pidfd), 10)
        finally:
            child.close()

    info = asyncio.run(scenario())
    assert info.exited and info.status == 3


def test_pidfd_open_and_send_signal_on_a_foreign_process() -> None:
    proc = subprocess.Popen(["sleep", "30"])
    pidfd = native.pidfd_open(proc.pid)
    try:
        assert native.pidfd_wait(pidfd) is None  # still running
        native.pidfd_send_signal(pidfd, signal.SIGKILL)
        info = native.pidfd_wait(pidfd, block=True)
        assert info.pid == proc.pid and info.status == signal.SIGKILL
    finally:
        os.close(pidfd)
        proc.returncode = -9  # reaped through the pidfd already
    with pytest.raises(OSError, match="pidfd_open"):
        native.pidfd_open(2**22 + 12345)


def test_python_wrappers_in_a_scratch_process(tmp_path: Path) -> None:
    """unshare, sethostname, mount, pivot_root, umount, setns, prctl, in a child Python."""
    script = textwrap.dedent(f"""
        import os
        from hostel import native
        host_mnt = os.open("/proc/self/ns/mnt", os.O_RDONLY)
        native.unshare(native.CLONE_NEWNS | native.CLONE_NEWUTS)
        native.sethostname("scratch")
        native.mount(None, "/", None, native.MS_REC | native.MS_PRIVATE)
        root = "{tmp_path}/root"
        os.makedirs(root)
        native.mount("tmpfs", root, "tmpfs", 0, "size=1m")
        os.makedirs(root + "/old")
        open(root + "/inside", "w").write("x")
        native.pivot_root(root, root + "/old")
        os.chdir("/")
        native.umount("/old", native.MNT_DETACH)
        print(sorted(os.listdir("/")), os.uname().nodename)
        native.prctl(native.PR_SET_NO_NEW_PRIVS, 1)
        print(native.prctl(native.PR_GET_NO_NEW_PRIVS))
        native.setns(host_mnt, native.CLONE_NEWNS)
        print(os.path.exists("{tmp_path}/root"))
        try:
            native.mount("proc", "/nonexistent-hostel", "proc")
        except OSError as e:
            print(e.errno, e.filename)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                         check=True, timeout=30).stdout.splitlines()
    assert out == ["['inside', 'old'] scratch", "1", "True",
                   f"{errno.ENOENT} mount proc on /nonexistent-hostel"]
    assert not os.path.ismount(tmp_path / "root")


def test_which_plans_run_on_our_memory() -> None:
    """A child that waits for us or stays behind as stub init must have its own memory."""
    plan = Plan()
    plan.mkdir("/tmp")
    plan.execve("/bin/true", ["true"], [])
    assert plan.may_share_memory
    waiting = Plan()
    waiting.wait_for_parent(0, "the test")
    assert not waiting.may_share_memory
    stub = Plan()
    stub.stub_init()
    assert not stub.may_share_memory


def test_a_shared_memory_spawn_returns_after_the_exec(tmp_path: Path) -> None:
    """posix_spawn semantics: when spawn() returns, every step ran and the payload exec'd
    (vfork), however long the steps took; the spawning thread's signal mask is restored."""
    plan = Plan()
    for i in range(500):
        plan.mkdir(str(tmp_path / f"d{i}"))
    plan.execve("/bin/sleep", ["sleep", "60"], [])
    assert plan.may_share_memory
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])
    child = spawn(plan, native.CLONE_NEWNS)
    try:
        assert signal.pthread_sigmask(signal.SIG_BLOCK, []) == mask
        assert os.readlink(f"/proc/{child.pid}/exe") == os.path.realpath("/bin/sleep")
        assert len(os.listdir(tmp_path)) == 500
        child.wait_started()
    finally:
        native.pidfd_send_signal(child.pidfd, signal.SIGKILL)
        native.pidfd_wait(child.pidfd, block=True)
        child.close()


def test_shared_memory_spawns_beside_busy_threads() -> None:
    """Children run on our memory while other threads run Python and fail system calls:
    every child reports right, and no thread sees another's errno."""
    import threading

    stop = threading.Event()
    wrong: list[BaseException] = []

    def expect_eagain() -> None:
        r, w = os.pipe2(os.O_NONBLOCK)
        try:
            while not stop.is_set():
                try:
                    os.read(r, 1)
                except BlockingIOError:
                    continue
                except OSError as e:  # an errno that is not ours
                    wrong.append(e)
        finally:
            os.close(r)
            os.close(w)

    results: list[str] = []

    def spawner(n: int) -> None:
        for i in range(60):
            plan = Plan()
            # fails and is skipped: the child's own errno is ENOENT for a moment
            plan.symlink("x", "/nonexistent/dir/link", best_effort=True)
            target = "/bin/true" if (n + i) % 2 else "/nonexistent/binary"
            plan.execve(target, ["x"], [])
            child = spawn(plan, 0)
            try:
                child.wait_started()
                results.append("ran" if native.pidfd_wait(child.pidfd, block=True).status == 0
                               else "bad exit")
            except StepFailed as e:
                results.append("ENOENT" if e.errno == errno.ENOENT else f"errno {e.errno}")
                native.pidfd_wait(child.pidfd, block=True)
            finally:
                child.close()

    busy = [threading.Thread(target=expect_eagain) for _ in range(2)]
    spawners = [threading.Thread(target=spawner, args=(n,)) for n in range(4)]
    for thread in busy + spawners:
        thread.start()
    for thread in spawners:
        thread.join()
    stop.set()
    for thread in busy:
        thread.join()
    assert wrong == []
    assert sorted(set(results)) == ["ENOENT", "ran"] and len(results) == 240
    assert results.count("ran") == 120
