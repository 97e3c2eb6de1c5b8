"""The policy file: parsing, validation, error messages, and the docs and example that describe it."""

from __future__ import annotations

import dataclasses
import errno
import math
import os
import re
import sys
from pathlib import Path

import pytest

from hsmfs.errors import ConfigError
from hsmfs.policy import KEYS, Policy, load_policy

if sys.version_info >= (3, 11):
    import tomllib
else:
    import tomli as tomllib

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "config.md"
EXAMPLE = ROOT / "contrib" / "hsmfs.toml"
PER_USER = "expected an integer from 0 (one less than workers) to 256"
KNOWN = ("(known: allow_devices, allow_suid, commit_interval, fetch_connections, fetch_part_size, fetch_retries, "
         "fetch_timeout, fill_ahead, fill_ahead_bytes, fill_ahead_max_size, fill_timeout, fills_per_user, "
         "high_watermark, log_level, low_watermark, max_resident_bytes, netns, refresh_interval, route_watch, "
         "source_error, workers)")


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "policy.toml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def error_of(path: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_policy(path)
    assert info.value.exit_code == 78
    return info.value.message


# --- valid files -------------------------------------------------------------------------------


def test_none_means_defaults() -> None:
    policy = load_policy(None)
    assert policy == Policy()
    assert (policy.workers, policy.commit_interval, policy.source_error) == (4, 0.5, "EIO")
    assert (policy.log_level, policy.fill_timeout) == ("info", 60.0)
    assert policy.source_errno == errno.EIO


@pytest.mark.parametrize(("workers", "per_user", "expected"),
                         [(4, 0, 3), (1, 0, 1), (2, 0, 1), (16, 0, 15), (4, 2, 2), (4, 9, 4), (1, 5, 1)])
def test_user_fills(workers: int, per_user: int, expected: int) -> None:
    """fills_per_user = 0 leaves one worker for everyone else; never less than 1, never more than workers."""
    assert Policy(workers=workers, fills_per_user=per_user).user_fills == expected


def test_empty_file_means_defaults(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, "# nothing set\n")) == Policy()


def test_every_key_set(tmp_path: Path) -> None:
    text = 'workers = 16\ncommit_interval = 2.5\nsource_error = "EAGAIN"\nlog_level = "debug"\n'
    path = write(tmp_path, text + "fill_timeout = 300\n")
    policy = load_policy(path)
    assert policy == Policy(
        workers=16, commit_interval=2.5, source_error="EAGAIN", log_level="debug", fill_timeout=300.0
    )
    assert policy.source_errno == errno.EAGAIN


def test_integer_seconds_become_floats(tmp_path: Path) -> None:
    policy = load_policy(write(tmp_path, "commit_interval = 1\nfill_timeout = 5\n"))
    assert type(policy.commit_interval) is float and policy.commit_interval == 1.0
    assert type(policy.fill_timeout) is float and policy.fill_timeout == 5.0


def test_quoted_keys(tmp_path: Path) -> None:
    assert load_policy(write(tmp_path, '"workers" = 2\n\'log_level\' = "error"\n')) == Policy(
        workers=2, log_level="error"
    )


@pytest.mark.parametrize(
    ("text", "field", "value"),
    [
        ("workers = 1", "workers", 1),
        ("workers = 256", "workers", 256),
        ("fills_per_user = 0", "fills_per_user", 0),
        ("fills_per_user = 3", "fills_per_user", 3),
        ("commit_interval = 60", "commit_interval", 60.0),
        ("commit_interval = 0.001", "commit_interval", 0.001),
        ("fill_timeout = 0.5", "fill_timeout", 0.5),
        ("fill_timeout = 86400", "fill_timeout", 86400.0),
        ('source_error = "EIO"', "source_error", "EIO"),
        ('source_error = "EAGAIN"', "source_error", "EAGAIN"),
        ('source_error = "EPERM"', "source_error", "EPERM"),
        ('source_error = "EBUSY"', "source_error", "EBUSY"),
        ('log_level = "debug"', "log_level", "debug"),
        ('log_level = "info"', "log_level", "info"),
        ('log_level = "warning"', "log_level", "warning"),
        ('log_level = "error"', "log_level", "error"),
        ("max_resident_bytes = 0", "max_resident_bytes", 0),
        ("max_resident_bytes = 1048576", "max_resident_bytes", 1 << 20),
        ('max_resident_bytes = "500M"', "max_resident_bytes", 500 << 20),
        ('max_resident_bytes = "1.5G"', "max_resident_bytes", 3 << 29),
        ('max_resident_bytes = "2TiB"', "max_resident_bytes", 2 << 40),
        ('max_resident_bytes = "64k"', "max_resident_bytes", 64 << 10),
        ("high_watermark = 1", "high_watermark", 1.0),
        ("low_watermark = 0.5", "low_watermark", 0.5),
    ],
)
def test_valid_values(tmp_path: Path, text: str, field: str, value: object) -> None:
    assert getattr(load_policy(write(tmp_path, text + "\n")), field) == value


@pytest.mark.parametrize("name", ["EIO", "EAGAIN", "EPERM", "EBUSY"])
def test_source_errno(name: str) -> None:
    assert Policy(source_error=name).source_errno == getattr(errno, name)


def test_policy_is_frozen() -> None:
    policy = Policy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.workers = 8  # type: ignore[misc]


def test_policy_validates_on_construction() -> None:
    with pytest.raises(ConfigError, match=r"^workers: expected an integer from 1 to 256, got 0$"):
        Policy(workers=0)
    with pytest.raises(ConfigError, match=r"^source_error: "):
        Policy(source_error="ENOSPC")


# --- bad values --------------------------------------------------------------------------------

WORKERS = "expected an integer from 1 to 256"
INTERVAL = "expected a number of seconds greater than 0 and at most 60"
TIMEOUT = "expected a finite number of seconds greater than 0"
ERRNOS = 'expected one of "EIO", "EAGAIN", "EPERM", "EBUSY"'
LEVELS = 'expected one of "debug", "info", "warning", "error"'
BYTES = ('expected a number of bytes (0 for no budget), as an integer or a string such as "500M" or "20G" '
         "(K, M, G, T are powers of 1024)")
MARK = "expected a fraction of max_resident_bytes greater than 0 and at most 1"


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ('workers = "four"', f'workers: {WORKERS}, got "four"'),
        ("workers = 0", f"workers: {WORKERS}, got 0"),
        ("workers = 257", f"workers: {WORKERS}, got 257"),
        ("workers = -1", f"workers: {WORKERS}, got -1"),
        ("workers = 4.0", f"workers: {WORKERS}, got 4.0"),
        ("workers = true", f"workers: {WORKERS}, got true"),  # bool is not an int
        ("workers = [4]", f"workers: {WORKERS}, got an array"),
        ("fills_per_user = -1", f"fills_per_user: {PER_USER}, got -1"),
        ("fills_per_user = 257", f"fills_per_user: {PER_USER}, got 257"),
        ("fills_per_user = true", f"fills_per_user: {PER_USER}, got true"),
        ("commit_interval = 0", f"commit_interval: {INTERVAL}, got 0"),
        ("commit_interval = -0.5", f"commit_interval: {INTERVAL}, got -0.5"),
        ("commit_interval = 60.5", f"commit_interval: {INTERVAL}, got 60.5"),
        ("commit_interval = nan", f"commit_interval: {INTERVAL}, got nan"),
        ("commit_interval = inf", f"commit_interval: {INTERVAL}, got inf"),
        ("commit_interval = false", f"commit_interval: {INTERVAL}, got false"),
        ('commit_interval = "0.5"', f'commit_interval: {INTERVAL}, got "0.5"'),
        ("fill_timeout = 0", f"fill_timeout: {TIMEOUT}, got 0"),
        ("fill_timeout = -1.0", f"fill_timeout: {TIMEOUT}, got -1.0"),
        ("fill_timeout = inf", f"fill_timeout: {TIMEOUT}, got inf"),
        ("fill_timeout = nan", f"fill_timeout: {TIMEOUT}, got nan"),
        ("fill_timeout = true", f"fill_timeout: {TIMEOUT}, got true"),
        ("fill_timeout = 1979-05-27", f"fill_timeout: {TIMEOUT}, got a date"),
        ('source_error = "ENOSPC"', f'source_error: {ERRNOS}, got "ENOSPC"'),
        ('source_error = "ETXTBSY"', f'source_error: {ERRNOS}, got "ETXTBSY"'),
        ('source_error = "eio"', f'source_error: {ERRNOS}, got "eio"'),
        ("source_error = 5", f"source_error: {ERRNOS}, got 5"),
        ('log_level = "INFO"', f'log_level: {LEVELS}, got "INFO"'),
        ('log_level = "critical"', f'log_level: {LEVELS}, got "critical"'),
        ("log_level = 10", f"log_level: {LEVELS}, got 10"),
        ("log_level = {a = 1}", f"log_level: {LEVELS}, got a table"),
        ('max_resident_bytes = "ten"', f'max_resident_bytes: {BYTES}, got "ten"'),
        ("max_resident_bytes = -1", f"max_resident_bytes: {BYTES}, got -1"),
        ('max_resident_bytes = "5P"', f'max_resident_bytes: {BYTES}, got "5P"'),
        ("max_resident_bytes = 1.5", f"max_resident_bytes: {BYTES}, got 1.5"),
        ("max_resident_bytes = true", f"max_resident_bytes: {BYTES}, got true"),
        ("high_watermark = 1.5", f"high_watermark: {MARK}, got 1.5"),
        ("high_watermark = 0", f"high_watermark: {MARK}, got 0"),
        ("low_watermark = -0.1", f"low_watermark: {MARK}, got -0.1"),
        ("low_watermark = 0.95", "low_watermark: must be below high_watermark (0.9), got 0.95"),
        ("high_watermark = 0.5", "high_watermark: must be above low_watermark (0.8), got 0.5"),
    ],
)
def test_bad_value_names_file_line_and_key(tmp_path: Path, line: str, expected: str) -> None:
    path = write(tmp_path, f"# policy\n\n{line}\n")
    assert error_of(path) == f"{path}:3: {expected}"


def test_example_message_from_the_docs(tmp_path: Path) -> None:
    path = write(tmp_path, '# hsmfs\nlog_level = "info"\n  workers   =   "four"  # oops\n')
    assert error_of(path) == f'{path}:3: workers: expected an integer from 1 to 256, got "four"'


def test_quoted_key_line_is_found(tmp_path: Path) -> None:
    path = write(tmp_path, "\n'workers' = 0\n")
    assert error_of(path) == f"{path}:2: workers: {WORKERS}, got 0"


# --- unknown keys ------------------------------------------------------------------------------


def test_unknown_key(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 4\n\n\n\n\n\nwokers = 3\n")
    assert error_of(path) == f"{path}:7: wokers: unknown key {KNOWN}"


def test_unknown_table(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 4\n\n[filler]\nworkers = 8\n")
    assert error_of(path) == f"{path}:3: filler: unknown key {KNOWN}"


def test_unknown_dotted_key(tmp_path: Path) -> None:
    path = write(tmp_path, "\nfiller.workers = 8\n")
    assert error_of(path) == f"{path}:2: filler: unknown key {KNOWN}"


def test_allow_keys_take_booleans_only(tmp_path: Path) -> None:
    assert load_policy(str(write(tmp_path, "allow_suid = true\nallow_devices = false\n"))) == \
        Policy(allow_suid=True)
    path = write(tmp_path, 'allow_suid = 1\nallow_devices = "yes"\n')
    assert error_of(path).splitlines() == [f"{path}:1: allow_suid: expected true or false, got 1",
                                           f'{path}:2: allow_devices: expected true or false, got "yes"']


def test_known_keys_in_message_are_the_policy_fields() -> None:
    assert list(KEYS) == sorted(f.name for f in dataclasses.fields(Policy))
    assert f"(known: {', '.join(KEYS)})" == KNOWN


def test_all_mistakes_reported_in_file_order(tmp_path: Path) -> None:
    path = write(tmp_path, 'log_level = "loud"\nworkers = 0\nbogus = 1\n')
    assert error_of(path).splitlines() == [
        f'{path}:1: log_level: {LEVELS}, got "loud"',
        f"{path}:2: workers: {WORKERS}, got 0",
        f"{path}:3: bogus: unknown key {KNOWN}",
    ]


# --- files that are not valid TOML or cannot be read ------------------------------------------


def test_toml_syntax_error_names_file_line_and_column(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 4\n\ncommit_interval = 0.5s\n")
    message = error_of(path)
    assert message.startswith(f"{path}:3:")
    assert "invalid TOML" in message
    assert "(at line" not in message  # the position is given once, up front


def test_toml_error_at_end_of_file_names_last_line(tmp_path: Path) -> None:
    path = write(tmp_path, 'workers = 4\nlog_level = "info')  # unterminated, no newline
    message = error_of(path)
    assert message.startswith(f"{path}:2: invalid TOML: "), message
    assert "end of document" not in message


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 4\nworkers = 5\n")
    assert error_of(path).startswith(f"{path}:2")


def test_missing_file(tmp_path: Path) -> None:
    path = str(tmp_path / "nope.toml")
    assert error_of(path) == f"{path}: cannot read policy file: No such file or directory"


def test_directory_is_not_a_policy_file(tmp_path: Path) -> None:
    assert error_of(str(tmp_path)) == f"{tmp_path}: cannot read policy file: Is a directory"


def test_unreadable_file(tmp_path: Path) -> None:
    path = write(tmp_path, "workers = 4\n")
    os.chmod(path, 0)
    expected = f"{path}: cannot read policy file: Permission denied"
    if os.geteuid() != 0:
        assert error_of(path) == expected
        return
    # root reads any file: try as nobody, in a forked child so this process keeps its uid
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover (child)
        try:
            os.close(rfd)
            os.setegid(65534)
            os.seteuid(65534)
            try:
                load_policy(path)
                got = "loaded"
            except ConfigError as e:
                got = e.message
            os.write(wfd, got.encode())
        finally:
            os._exit(0)
    os.close(wfd)
    with os.fdopen(rfd, "rb") as r:
        got = r.read().decode()
    os.waitpid(pid, 0)
    assert got == expected


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"workers = 4\n# caf\xe9\n")
    assert error_of(str(path)) == f"{path}:2: invalid TOML: not UTF-8"


# --- docs/config.md and contrib/hsmfs.toml --------------------------------------------------------


def documented_defaults() -> dict[str, object]:
    """{key: default} from docs/config.md: a `### `key`` heading, then a `- Default: `value`` line."""
    defaults: dict[str, object] = {}
    key = None
    for line in DOC.read_text(encoding="utf-8").splitlines():
        heading = re.fullmatch(r"### `(\w+)`", line)
        if heading:
            key = heading.group(1)
            assert key not in defaults, f"{key} documented twice"
            defaults[key] = None
            continue
        default = re.fullmatch(r"- Default: `(.+)`", line)
        if default and key is not None:
            defaults[key] = tomllib.loads(f"v = {default.group(1)}")["v"]
            key = None
    return defaults


def test_every_policy_key_is_documented() -> None:
    documented = documented_defaults()
    fields = [f.name for f in dataclasses.fields(Policy)]
    undocumented = sorted(set(fields) - set(documented))
    assert not undocumented, f"add these keys to docs/config.md: {undocumented}"
    stale = sorted(set(documented) - set(fields))
    assert not stale, f"docs/config.md documents keys Policy does not have: {stale}"


def test_documented_defaults_are_the_defaults() -> None:
    defaults = Policy()
    for key, value in documented_defaults().items():
        assert value is not None, f"docs/config.md gives no '- Default:' line for {key}"
        got = getattr(defaults, key)
        assert value == got and type(value) is type(got), f"{key}: docs say {value!r}, Policy has {got!r}"


def test_documented_ranges_are_enforced() -> None:
    # each `- Range:` line of the docs, checked at its edges
    text = DOC.read_text(encoding="utf-8")
    assert "- Range: 1 to 256" in text
    assert "- Range: more than 0, at most 60" in text
    assert '- Range: one of `"EIO"`, `"EAGAIN"`, `"EPERM"`, `"EBUSY"`' in text
    assert '- Range: one of `"debug"`, `"info"`, `"warning"`, `"error"`' in text
    for bad in ({"workers": 0}, {"workers": 257}, {"commit_interval": 0}, {"commit_interval": 60.01}):
        with pytest.raises(ConfigError):
            Policy(**bad)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        Policy(fill_timeout=math.inf)


def test_example_loads_and_matches_the_docs() -> None:
    policy = load_policy(str(EXAMPLE))
    assert policy == Policy(), "contrib/hsmfs.toml should set every key to its documented default"
    text = EXAMPLE.read_text(encoding="utf-8")
    assert set(tomllib.loads(text)) == set(KEYS), "contrib/hsmfs.toml should show every key"
    blocks = re.findall(r"```toml\n(.*?)```", DOC.read_text(encoding="utf-8"), flags=re.S)
    assert text in blocks, "docs/config.md should quote contrib/hsmfs.toml verbatim in a ```toml block"
