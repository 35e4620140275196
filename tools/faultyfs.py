#!/usr/bin/python3
"""A pass-through FUSE file system that fails chosen operations on request: a disk that fails
fsync, or writes, without a device mapper (these machines have no dm-flakey), for the tests of
what blkmirror does when its journal's disk fails.

    faultyfs.py BACKING_DIR MOUNT_POINT --faults RULES_FILE

Every file under MOUNT_POINT is the file of the same name under BACKING_DIR. RULES_FILE (read
again whenever it changes; absent or empty: no faults) holds one rule per line:

    OPERATION ERRNO GLOB        e.g.   fsync EIO *.jnl

OPERATION is `write`, `fsync` (a file's fsync or fdatasync), `fsyncdir` (a directory's) or
`create`; ERRNO a name from Python's errno module (EIO, ENOSPC, ...); GLOB an fnmatch pattern
on the path under the mount point, which starts with "/" (`*` matches "/" too). The first rule
that matches fails the call. Each failure is logged on standard error as
`faultyfs: OPERATION PATH -> ERRNO`, so a test can check that its faults happened.

Runs in the foreground until the file system is unmounted (`umount MOUNT_POINT`). Needs Debian's
python3-fusepy (module `fusepy`; libfuse2 mounts directly when run as root).
"""

import argparse
import errno
import fnmatch
import os
import sys
import threading

from fusepy import FUSE, FuseOSError, Operations

OPERATIONS = ("write", "fsync", "fsyncdir", "create")


def parse_rules(text):
    rules = []
    for n, line in enumerate(text.splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        parts = line.split()
        if len(parts) != 3 or parts[0] not in OPERATIONS or not hasattr(errno, parts[1]):
            raise ValueError(f"line {n}: {line!r}: want 'OPERATION ERRNO GLOB', "
                             f"OPERATION one of {', '.join(OPERATIONS)}")
        if parts[1] == "ENOSYS":
            # FUSE takes ENOSYS as "not implemented" and never asks again: every later call
            # would succeed without reaching this file system.
            raise ValueError(f"line {n}: ENOSYS would turn the operation off for good")
        rules.append((parts[0], getattr(errno, parts[1]), parts[1], parts[2]))
    return rules


class Rules:
    """The rules file, read again when its modification time or size changes."""

    def __init__(self, path):
        self.path = path
        self.seen = None
        self.rules = []
        self.lock = threading.Lock()

    def current(self):
        # Opened first, then looked at: the file may be removed (healed) at any moment, and
        # a rule that is half gone must not fail the call being served.
        try:
            with open(self.path) as f:
                text = f.read()
        except FileNotFoundError:
            text = None
        with self.lock:
            if text != self.seen:
                self.rules = []
                if text is not None:
                    try:
                        self.rules = parse_rules(text)
                    except ValueError as e:
                        # A bad rule fails nothing: say so once.
                        print(f"faultyfs: {self.path}: {e}", file=sys.stderr, flush=True)
                self.seen = text
            return self.rules

    def check(self, operation, path):
        for op, code, name, glob in self.current():
            if op == operation and fnmatch.fnmatchcase(path, glob):
                print(f"faultyfs: {operation} {path} -> {name}", file=sys.stderr, flush=True)
                raise FuseOSError(code)


class Passthrough(Operations):
    def __init__(self, root, rules):
        self.root = os.path.realpath(root)
        self.rules = rules

    def _full(self, path):
        return os.path.join(self.root, path.lstrip("/"))

    # Metadata.
    def access(self, path, mode):
        if not os.access(self._full(path), mode):
            raise FuseOSError(errno.EACCES)

    def getattr(self, path, fh=None):
        st = os.fstat(fh) if fh is not None else os.lstat(self._full(path))
        keys = ("st_atime", "st_ctime", "st_gid", "st_mode", "st_mtime", "st_nlink", "st_size",
                "st_uid", "st_blocks", "st_ino")
        return {k: getattr(st, k) for k in keys}

    def chmod(self, path, mode):
        os.chmod(self._full(path), mode)

    def chown(self, path, uid, gid):
        os.lchown(self._full(path), uid, gid)

    def utimens(self, path, times=None):
        os.utime(self._full(path), times, follow_symlinks=False)

    def statfs(self, path):
        s = os.statvfs(self._full(path))
        keys = ("f_bavail", "f_bfree", "f_blocks", "f_bsize", "f_favail", "f_ffree", "f_files",
                "f_flag", "f_frsize", "f_namemax")
        return {k: getattr(s, k) for k in keys}

    # Names.
    def readdir(self, path, fh):
        return [".", ".."] + os.listdir(self._full(path))

    def readlink(self, path):
        return os.readlink(self._full(path))

    def mkdir(self, path, mode):
        os.mkdir(self._full(path), mode)

    def rmdir(self, path):
        os.rmdir(self._full(path))

    def mknod(self, path, mode, dev):
        os.mknod(self._full(path), mode, dev)

    def unlink(self, path):
        os.unlink(self._full(path))

    def symlink(self, target, source):
        os.symlink(source, self._full(target))

    def link(self, target, source):
        os.link(self._full(source), self._full(target))

    def rename(self, old, new):
        os.rename(self._full(old), self._full(new))

    # Files. O_DIRECT is not passed on: the kernel hands FUSE buffers that need not be aligned.
    def open(self, path, flags):
        return os.open(self._full(path), flags & ~os.O_DIRECT)

    def create(self, path, mode, fi=None):
        self.rules.check("create", path)
        # Read and written through this handle whatever the caller asked (fusepy does not
        # pass its flags here): the kernel reads through it too, for mmap among others.
        return os.open(self._full(path), os.O_RDWR | os.O_CREAT, mode)

    def read(self, path, size, offset, fh):
        return os.pread(fh, size, offset)

    def write(self, path, data, offset, fh):
        self.rules.check("write", path)
        return os.pwrite(fh, data, offset)

    def truncate(self, path, length, fh=None):
        if fh is not None:
            os.ftruncate(fh, length)
        else:
            os.truncate(self._full(path), length)

    def flush(self, path, fh):
        # close(2), not a request for durability.
        return 0

    def release(self, path, fh):
        os.close(fh)

    def fsync(self, path, datasync, fh):
        self.rules.check("fsync", path)
        if datasync:
            os.fdatasync(fh)
        else:
            os.fsync(fh)

    def opendir(self, path):
        return 0

    def releasedir(self, path, fh):
        return 0

    def fsyncdir(self, path, datasync, fh):
        self.rules.check("fsyncdir", path)
        fd = os.open(self._full(path), os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("backing")
    p.add_argument("mountpoint")
    p.add_argument("--faults", required=True, help="the rules file (may not exist yet)")
    a = p.parse_args()
    rules = Rules(a.faults)
    rules.current()
    FUSE(Passthrough(a.backing, rules), a.mountpoint, foreground=True, nothreads=False,
         big_writes=True, max_write=131072, fsname="faultyfs", subtype="faultyfs")


if __name__ == "__main__":
    main()
