"""Test-only kill points: where a `kill -9` could leave the adapter store in a different state.

LORAPLEX_TEST_KILL=<point>, read once at import, makes this process SIGKILL itself the first time
execution reaches `reached(<point>)`: no handler, no finally block, no flush runs, exactly as a
`kill -9` (or an OOM kill) at that instant. A value that names no point is refused loudly at import,
since a crash test that silently kills nothing would pass for the wrong reason. Unset (production),
`reached` is one comparison with None.

POINTS lists them in the order an upload, a delete and a collection reach them, each with what the
store holds when it fires; tests/{unit,e2e}/test_crash_consistency.py kill at every one.
"""

from __future__ import annotations

import logging
import os
import signal

log = logging.getLogger(__name__)

KILL_ENV = "LORAPLEX_TEST_KILL"
POINTS: dict[str, str] = {
    "upload-body": "the upload route wrote the first chunk of a part into its staging dir",
    "commit-staged": "staging is complete and fsynced, the blob not yet renamed into blobs/",
    "commit-blob": "the blob is in blobs/ (and a replaced one still there), no pointer names it yet",
    "commit-pointer-temp": "the new pointer is written and fsynced under a temporary name, not renamed",
    "commit-done": "the pointer names the new blob; the staging dir is not yet removed",
    "upload-done": "the upload is committed; its 201 is not yet sent",
    "remove-unlinked": "a delete removed the pointer; its blob is not collected",
    "gc-moved": "the collector moved a blob out of blobs/ and has not yet deleted it or put it back",
    "pinned": "a request on an adapter was admitted and pinned its version: it decodes next",
}


def armed_point(value: str | None) -> str | None:
    """The point LORAPLEX_TEST_KILL names (None when unset); ValueError for a name of no point."""
    if not value:
        return None
    if value not in POINTS:
        raise ValueError(f"{KILL_ENV}={value!r}: expected one of {', '.join(POINTS)}")
    return value


ARMED = armed_point(os.environ.get(KILL_ENV))
if ARMED is not None:
    log.warning("test-only kill point armed: this process SIGKILLs itself at %r (%s)", ARMED, KILL_ENV)


def reached(point: str) -> None:
    """Execution is at `point` (one of POINTS): die here if the test hook names it."""
    if point == ARMED:
        os.kill(os.getpid(), signal.SIGKILL)
