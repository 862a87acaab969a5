"""The sandbox the bundle's installer runs in when ``image`` installs it into a staged root:
``chroot`` in user, mount, PID and network namespaces of its own, with a minimal /dev.

Always a user namespace, also when this tool runs as root: the code that runs there (the
bundle's installer, the base's python) is root only inside it (SECURITY.md says what it can
and cannot reach). Where user namespaces are disabled this refuses, never falls back to
real root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

from bundler.errors import ImageError
from bundler.oci.rootfs import STAGE_ID, lmode, remove
from bundler.subproc import last_lines

SOURCE_DIR = ".pyannote-bundle-src"  # the unpacked bundle inside the staged root, removed
STAGE_IDS = 65536  # ids 0-65535 inside the installer's namespace (nobody is 65534)


# Run inside the installer's namespaces, in the staged root (the working folder): a /dev of
# four nodes bound from the host's (a user namespace cannot make device nodes), never the
# host's whole /dev, then chroot.
SANDBOX_SH = """set -e
mount -t tmpfs -o mode=0755,nosuid,size=64m pyannote-bundle-dev dev
for n in null zero random urandom; do : > "dev/$n"; mount --bind "/dev/$n" "dev/$n"; done
mkdir -m 1777 dev/shm
ln -s /proc/self/fd dev/fd
ln -s /proc/self/fd/0 dev/stdin
ln -s /proc/self/fd/1 dev/stdout
ln -s /proc/self/fd/2 dev/stderr
exec "$@"
"""


def _no_user_namespace(why: str) -> ImageError:
    return ImageError(f"this host cannot make a user namespace ({why or 'unshare failed'}): "
                      "the bundle's installer is never run as the host's root; enable them "
                      "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone) "
                      "and run again")


@contextlib.contextmanager
def user_namespace(root: Path, unshare: str) -> Iterator[list[str]]:
    """The command prefix that puts a program in a user namespace of its own.

    As root: a namespace is made by a holder process running as ``STAGE_ID``, and this
    tool (privileged in the parent namespace, so no /etc/subuid is needed) maps ids
    0-65535 inside to ``STAGE_ID`` and the ids after it; ``nsenter`` then enters it as its
    root. Root inside is ``STAGE_ID`` outside, and the installer can still make itself
    ``nobody`` to check that other users can run the install. Otherwise: the caller's own
    id as root, the only mapping an unprivileged caller can make alone."""
    if os.geteuid() != 0:
        probe = subprocess.run([unshare, "--user", "--map-root-user", "true"],
                               capture_output=True, text=True, errors="replace",
                               stdin=subprocess.DEVNULL)
        if probe.returncode != 0:
            raise _no_user_namespace(last_lines(probe.stderr, 1))
        yield [unshare, "--user", "--map-root-user"]
        return
    nsenter = shutil.which("nsenter")
    if nsenter is None:
        raise ImageError("nsenter (util-linux) is needed to install into the image")
    os.chown(root, STAGE_ID, STAGE_ID)
    for folder, dirs, files in os.walk(root / SOURCE_DIR):
        for name in [folder, *(os.path.join(folder, n) for n in dirs + files)]:
            os.lchown(name, STAGE_ID, STAGE_ID)
    holder = subprocess.Popen([unshare, "--user", "sh", "-c", "read -r _"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, user=STAGE_ID, group=STAGE_ID,
                              extra_groups=[])
    try:
        ns, own = f"/proc/{holder.pid}/ns/user", os.readlink("/proc/self/ns/user")
        deadline = time.monotonic() + 10
        while True:  # until the holder's unshare has made its namespace
            if holder.poll() is not None or time.monotonic() > deadline:
                holder.kill()
                _, err = holder.communicate()
                raise _no_user_namespace(last_lines(err.decode(errors="replace"), 1))
            try:
                if os.readlink(ns) != own:
                    break
            except OSError:  # exiting: poll() says so next
                pass
            time.sleep(0.01)
        for kind in ("uid_map", "gid_map"):
            with open(f"/proc/{holder.pid}/{kind}", "w") as f:
                f.write(f"0 {STAGE_ID} {STAGE_IDS}\n")
        yield [nsenter, f"--user={ns}"]
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate()


def sandbox(root: Path, argv: list[str], env: dict[str, str],
            timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` chrooted into ``root`` with no network, in user, mount and PID namespaces
    of its own (all gone with it), with a minimal /dev.

    Always a user namespace (``user_namespace``), also when this tool runs as root: the
    code that runs there (the bundle's installer, the base's python) is root only inside
    it. Where user namespaces are disabled this refuses, never falls back to real root."""
    unshare = shutil.which("unshare")
    chroot = shutil.which("chroot") or "/usr/sbin/chroot"
    if unshare is None:
        raise ImageError("unshare (util-linux) is needed to install into the image")
    for name in ("proc", "dev"):  # mount points: real folders, never a base's link
        if not stat.S_ISDIR(lmode(root / name)):
            remove(root / name)
            (root / name).mkdir()
    # --kill-child: if this tool is stopped, the installer and everything it started (a
    # namespace of their own) go with it, and the staged root can be removed. Paths are
    # relative to the working folder: the work folder above it is private to this tool.
    inner = [unshare, "--mount", "--net", "--pid", "--fork", "--kill-child",
             "--mount-proc=proc", "sh", "-c", SANDBOX_SH, "sh", chroot, ".", *argv]
    with user_namespace(root, unshare) as enter:
        return subprocess.run([*enter, *inner], env=env, capture_output=True, text=True,
                              errors="replace", stdin=subprocess.DEVNULL, timeout=timeout,
                              cwd=root)
