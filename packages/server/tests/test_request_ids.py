"""Fresh request ids: 32 hex digits (what uuid4().hex gave), distinct, and distinct between a
forked API worker and its parent."""

from __future__ import annotations

import os
import re

from lmserve_server.access import new_request_id


def test_ids_look_like_uuid_hex_and_do_not_repeat() -> None:
    ids = [new_request_id() for _ in range(10_000)]
    assert all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    assert len(set(ids)) == len(ids)


def test_a_forked_child_does_not_repeat_its_parents_ids() -> None:
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then out without running pytest's teardown
        os.write(write, new_request_id().encode())
        os._exit(0)
    os.close(write)
    os.waitpid(pid, 0)
    child = os.read(read, 64).decode()
    os.close(read)
    assert re.fullmatch(r"[0-9a-f]{32}", child)
    assert child != new_request_id()
