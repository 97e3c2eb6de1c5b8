"""File names users chose never add lines to hsmfs's output or logs, nor drive the admin's terminal.

Whoever writes to the source picks its names: a newline in one used to print a forged line in
``hsmfs evict`` (issue 11, item 10). Every name here holds a newline followed by a line that looks
like hsmfs's own, a carriage return, or a terminal escape sequence; the directory of the source
holds one too, so the supervisor's and filler's log lines are tried as well.
"""

from __future__ import annotations

import json
import os
import random
import re
from typing import Callable

from conftest import LoopFS, View, hsmfs

NOBODY = 65534
NAMES = ("x\nCRITICAL forged", "evicted  9 GiB  shadow\rok", "esc\x1b[2J\x1b[Hcleared", "bidi\u202etxt.exe")
GONE = "gone\nCRITICAL forged by a vanished file"
# what must never be in a line hsmfs wrote: a control character (a line's own end aside), or a line
# that one of the names started
CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f\u202e]")


def clean(text: str, what: str) -> None:
    for line in text.split("\n"):
        assert not CONTROL.search(line), f"{what}: a control character from a name: {line!r}"
        assert not line.startswith(("CRITICAL", "evicted  9 GiB")), f"{what}: a forged line: {line!r}\n{text}"


def test_names_are_escaped_in_output_and_logs(loopfs: LoopFS, make_view: Callable[..., View]) -> None:
    base = loopfs.fresh_dir("names")
    src = os.path.join(base, "src\nCRITICAL forged by the source's name")
    os.mkdir(src)
    rnd = random.Random(11)
    data = {}
    for name in (*NAMES, GONE):
        data[name] = rnd.randbytes(9000)
        with open(os.path.join(src, name), "wb") as f:
            f.write(data[name])
    v = make_view(src, mount=False)
    mounted = v.mount()
    os.unlink(os.path.join(src, GONE))  # its fill fails: the filler logs its name

    outputs: list[tuple[str, str]] = [("hsmfs mount stderr", mounted.stderr)]
    for name in NAMES:
        with open(v.path(name), "rb") as f:
            assert f.read() == data[name]
    paths = [v.path(n) for n in NAMES]
    for cmd in (["stat"], ["pin"], ["unpin"], ["evict"], ["prefetch"], ["stat"]):
        r = hsmfs(*cmd, *paths)
        outputs.append((f"hsmfs {cmd[0]} stdout", r.stdout))
        outputs.append((f"hsmfs {cmd[0]} stderr", r.stderr))
    stat_lines = outputs[1][1].rstrip("\n").split("\n")
    assert len(stat_lines) == len(NAMES), outputs[1][1]
    assert stat_lines[0].endswith("x\\nCRITICAL forged"), stat_lines
    evict_lines = outputs[7][1].rstrip("\n").split("\n")
    assert len(evict_lines) == len(NAMES) and all(x.startswith("evicted ") for x in evict_lines), evict_lines
    r = hsmfs("prefetch", v.path(GONE), check=False)
    assert r.returncode == 74, r.stderr
    outputs.append(("hsmfs prefetch of a vanished file", r.stderr))
    assert "gone\\nCRITICAL forged by a vanished file" in r.stderr, r.stderr
    r = hsmfs("stat", v.path("missing\nCRITICAL forged"), check=False)
    assert r.returncode == 66
    outputs.append(("hsmfs stat of a missing file", r.stderr))
    r = hsmfs("status", v.name)
    outputs.append(("hsmfs status", r.stdout))
    assert "src\\nCRITICAL forged by the source's name" in r.stdout
    # the exact names stay available, in JSON
    got = [row["path"] for row in json.loads(hsmfs("stat", "--json", *paths).stdout)]
    assert got == paths

    log = v.log
    assert "cannot fill gone\\nCRITICAL forged by a vanished file" in log, log
    assert "src\\nCRITICAL forged by the source's name" in log, log
    outputs.append(("the mount's log", log))
    v.close()
    for what, text in outputs:
        clean(text, what)
