"""Files of a user's server as the server sees them, for the enforcement point's rules.

The raw-file rules need a file's size, and the route classes whether a contents-API path is
a directory. Both must be answered as the *server* would resolve the path: inside its
sandbox (its mounts, ``/datasets``, symbolic links the user made) and never by trusting the
server. :class:`ServerFiles` looks through ``/proc/PID/root`` of the server's process (the
hub is root) and resolves each path component itself, so a symbolic link can neither leave
the sandbox's root nor point at a host path (``/proc/PID/root`` would resolve an absolute
link against the *hub's* root).

A file can change between this check and the server's answer; the size rule is a check at
request time, and the bytes that really left are counted by the egress accounting.
"""

from __future__ import annotations

import os
import pwd
import stat
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ztlab.common.errors import ZtlabError

#: how many symbolic links one path may pass through (as Linux's ``MAXSYMLINKS``)
MAX_LINKS = 40
#: how long a server's view is reused without asking the hub's database again (it is also
#: checked on every use: the same process must still run)
VIEW_SECONDS = 2.0


class UnresolvablePath(ZtlabError):
    """A path that loops or cannot be read (the rule then refuses rather than guesses)."""


@dataclass(frozen=True, slots=True)
class ServerView:
    """Where a server's files are, seen from the hub."""

    #: the server's filesystem root from the hub (``/proc/PID/root``, or ``""`` for the
    #: host's root when the server has no sandbox)
    root: str
    #: the server's root directory (its home), as a path inside ``root``
    home: str


class ServerFiles:
    """Sizes and kinds of the files of users' servers (see the module docstring)."""

    def __init__(self, users: Any, db: Any) -> None:
        self._users = users
        self._db = db
        #: owner -> (until, the process the view was read from, the view)
        self._views: dict[str, tuple[float, str, ServerView]] = {}

    def view(self, owner: str) -> ServerView | None:
        """The view of ``owner``'s running server, or ``None`` when it has none.

        Reused for :data:`VIEW_SECONDS` while the same server process (same pid, same start
        time) still runs; a restarted or stopped server is looked up again at once.
        """
        now = time.monotonic()
        cached = self._views.get(owner)
        if cached is not None and cached[0] > now and _process_identity(cached[2]) == cached[1]:
            return cached[2]
        view = self._lookup(owner)
        if view is None:  # a server about to start is looked up again on the next request
            self._views.pop(owner, None)
        else:
            self._views[owner] = (now + VIEW_SECONDS, _process_identity(view), view)
        return view

    def _lookup(self, owner: str) -> ServerView | None:
        from jupyterhub import orm

        orm_user = orm.User.find(self._db, owner)
        if orm_user is None:
            return None
        spawner = self._users[orm_user].spawner
        account = getattr(spawner, "account", None)
        if not spawner.pid or account is None:
            return None
        try:
            home = pwd.getpwnam(account).pw_dir
        except KeyError:
            return None
        if not getattr(spawner, "sandboxed", False):
            return ServerView(root="", home=home)
        inner = _sandbox_init(int(spawner.pid))
        if inner is None:
            return None
        return ServerView(root=f"/proc/{inner}/root", home=home)

    def stat(self, owner: str, relative: str) -> os.stat_result | None:
        """``stat`` of ``relative`` (to the server's root directory) as the server would
        find it; ``None`` if it does not exist or the server does not run.

        Raises :class:`UnresolvablePath` when it cannot be told.
        """
        view = self.view(owner)
        if view is None:
            return None
        inside = resolve_inside(view.root, f"{view.home}/{relative}")
        if inside is None:
            return None
        try:
            return Path(view.root + inside).stat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnresolvablePath(str(exc)) from exc

    def is_directory(self, owner: str, relative: str) -> bool:
        """Whether ``relative`` is a directory of the server (a listing, not a file)."""
        try:
            found = self.stat(owner, relative)
        except UnresolvablePath:
            return False
        return found is not None and stat.S_ISDIR(found.st_mode)


def _process_identity(view: ServerView | None) -> str:
    """Which process a sandboxed view looks through (pid and start time), "" for others."""
    if view is None or not view.root:
        return ""
    try:
        stat_line = Path(view.root).parent.joinpath("stat").read_text()
    except OSError:
        return "gone"
    # the start time is field 22; the command name (field 2) may hold spaces
    return f"{view.root}:{stat_line.rsplit(')', 1)[-1].split()[19]}"


def _sandbox_init(pid: int) -> int | None:
    """The sandbox's PID 1 (the server), the child of its outer ``bwrap`` ``pid``."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return None
    return int(children[0]) if children else None


def resolve_inside(root: str, path: str) -> str | None:
    """``path`` (absolute, inside ``root``) with every symbolic link resolved *within*
    ``root``: the result is an absolute path inside ``root`` with no link in it, or ``None``
    when a component does not exist. ``..`` never climbs above ``root``.

    Raises :class:`UnresolvablePath` on a loop or an unreadable component.
    """
    pending = [part for part in path.split("/") if part and part != "."]
    done: list[str] = []
    links = 0
    while pending:
        part = pending.pop(0)
        if part == "..":
            if done:
                done.pop()
            continue
        candidate = "/" + "/".join([*done, part])
        try:
            info = Path(root + candidate).lstat()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise UnresolvablePath(f"{candidate}: {exc.strerror}") from exc
        if not stat.S_ISLNK(info.st_mode):
            done.append(part)
            continue
        links += 1
        if links > MAX_LINKS:
            raise UnresolvablePath(f"{path}: too many symbolic links")
        try:
            target = str(Path(root + candidate).readlink())
        except OSError as exc:
            raise UnresolvablePath(f"{candidate}: {exc.strerror}") from exc
        if target.startswith("/"):
            done = []
        pending = [p for p in target.split("/") if p and p != "."] + pending
    return "/" + "/".join(done)
