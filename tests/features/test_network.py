"""CP-INV-6 with the OpenVINO backend: a whole demo (build, verify, selftest, query), each command
in its own process under an audit hook, opens no socket off this host and writes nothing under
$HOME but c10's own state. The hook (a sitecustomize on PYTHONPATH) is inherited by every Python
process the commands start and by forked children, where OpenVINO's telemetry sends from; it
records each attempt and refuses it, so even a failing run sends nothing."""
from __future__ import annotations

import importlib.util
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

# find_spec, not importorskip: importing openvino here would send its telemetry from pytest itself
pytestmark = pytest.mark.skipif(importlib.util.find_spec("openvino") is None,
                                reason="needs openvino (pip install 'c10[openvino]')")

C10 = str(Path(sys.executable).with_name("c10"))
# c10's own state under $HOME: the demo's key, the anti-rollback state (c10/cli/trust.py)
OWN_STATE = Path(".local", "state", "c10")
# openvino_telemetry sends nothing when one of these says CI: the runs must not inherit them
CI_VARIABLES = ("CI", "TF_BUILD", "JENKINS_URL")

SITECUSTOMIZE = textwrap.dedent('''
    import ipaddress, json, os, sys

    _LOG = os.environ.get("C10_TEST_AUDIT_LOG")
    _HOME = os.path.realpath(os.environ.get("HOME", "/nonexistent"))
    _ADDRESSED = {"socket.connect", "socket.sendto", "socket.sendmsg", "socket.bind"}
    _LOOKUP = {"socket.getaddrinfo", "socket.gethostbyname", "socket.gethostbyaddr"}
    _LOCAL_NAMES = {"localhost", "localhost.localdomain", "ip6-localhost", "ip6-loopback"}


    def _local(event, args):
        """Loopback and AF_UNIX/netlink only; a lookup of any other name is an attempt."""
        host = args[0] if event in _LOOKUP else args[1]
        if event not in _LOOKUP:
            if not isinstance(host, tuple):
                return True  # AF_UNIX path or abstract name
            host = host[0]
        if isinstance(host, int):
            return True  # AF_NETLINK (pid, groups)
        if host is None:
            return event == "socket.getaddrinfo"
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if host.lower() in _LOCAL_NAMES:
            return True
        try:
            return ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            return False


    def _log(record):
        record["pid"] = os.getpid()
        with open(_LOG, "a") as f:
            f.write(json.dumps(record, default=repr) + "\\n")


    def _under_home(path):
        try:
            path = os.path.realpath(os.fsdecode(path))
        except (TypeError, ValueError):
            return False  # a file descriptor
        return path == _HOME or path.startswith(_HOME + os.sep)


    def _hook(event, args):
        if event in _ADDRESSED or event in _LOOKUP:
            local = _local(event, args)
            _log({"event": event, "args": list(args if event in _LOOKUP else args[1:]),
                  "local": local})
            if not local:
                raise OSError(101, f"{event} refused by the test's audit hook (CP-INV-6)")
        elif event == "open" and _under_home(args[0]):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                _log({"event": "write", "path": os.path.realpath(os.fsdecode(args[0]))})
        elif event == "os.mkdir" and _under_home(args[0]):
            _log({"event": "mkdir", "path": os.path.realpath(os.fsdecode(args[0]))})


    def _exit():
        ot = sys.modules.get("openvino_telemetry", "absent")
        _log({"event": "exit", "argv": sys.argv, "openvino": "openvino" in sys.modules,
              "openvino_telemetry": "absent" if ot == "absent" else "hidden" if ot is None
              else "imported"})


    if _LOG:
        import atexit

        atexit.register(_exit)  # the process itself, not its forked children (they _exit)
        sys.addaudithook(_hook)
''')


class Audited:
    """Runs commands with a fresh $HOME and the audit hook; `records()` is what they did."""

    def __init__(self, root: Path):
        self.home = root / "home"
        self.home.mkdir(parents=True)
        hook_dir = root / "hook"
        hook_dir.mkdir()
        (hook_dir / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.log = root / "audit.jsonl"
        env = {k: v for k, v in os.environ.items()
               if k not in CI_VARIABLES and not k.startswith("XDG_")}  # XDG_*: state under HOME
        path = os.pathsep.join(p for p in (str(hook_dir), env.get("PYTHONPATH")) if p)
        self.env = env | {"HOME": str(self.home), "PYTHONPATH": path, "C10_NO_PROGRESS": "1",
                          "C10_TEST_AUDIT_LOG": str(self.log)}

    def run(self, *args: str, cwd: Path | None = None) -> str:
        proc = subprocess.run(args, cwd=cwd, env=self.env, capture_output=True, text=True,
                              timeout=60)
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, f"{' '.join(args)} exited {proc.returncode}:\n{out[-3000:]}"
        return out

    def records(self) -> list[dict]:
        if not self.log.exists():
            return []
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def network(self) -> list[dict]:
        return [r for r in self.records() if r.get("local") is False]

    def home_paths(self) -> list[Path]:
        """Everything under $HOME now, and every file or directory a process opened for writing
        or made there (a file written and removed again included), relative to $HOME."""
        home = os.path.realpath(self.home)
        now = {p.relative_to(self.home) for p in self.home.rglob("*")}
        made = {Path(os.path.relpath(r["path"], home)) for r in self.records()
                if r["event"] in ("write", "mkdir")}
        return sorted(now | made)


def _own_state(rel: Path) -> bool:
    """c10's state dir, or one of its parents."""
    return rel.parts[:len(OWN_STATE.parts)] == OWN_STATE.parts or rel in OWN_STATE.parents


def _trust(command: str, pub: str, audited: Audited) -> list[str]:
    """`--trusted-keys PUB` where COMMAND takes it (query and selftest are gaining it)."""
    help_text = audited.run(C10, command, "--help")
    return ["--trusted-keys", pub] if "--trusted-keys" in help_text else []


def test_an_openvino_demo_verify_selftest_and_query_open_no_socket(tmp_path):  # CP-INV-6
    audited = Audited(tmp_path)
    root = tmp_path / "cache"
    out = audited.run(C10, "demo", str(root), "--backend", "openvino", "--tiles", "40")
    pub = re.search(r"--trusted-keys (\S+)", out)
    assert pub, out
    pub = pub.group(1)
    assert list((root / "engines").glob("*.blob")), "the demo did not build OpenVINO engines"
    audited.run(C10, "verify", str(root), "--trusted-keys", pub)
    audited.run(C10, "selftest", str(root), "-n", "5", *_trust("selftest", pub, audited))
    image = sorted((root / "tiles").rglob("*.jpg"))[0]
    audited.run(C10, "query", str(root), str(image), *_trust("query", pub, audited))

    assert audited.network() == []
    exits = {r["argv"][1]: r for r in audited.records()
             if r["event"] == "exit" and len(r["argv"]) > 1 and "--help" not in r["argv"]}
    for command in ("demo", "selftest", "query"):  # the hook ran in each, and OpenVINO did
        assert exits.get(command, {}).get("openvino"), (command, exits)
        assert exits[command]["openvino_telemetry"] != "imported", exits[command]
    strays = [str(p) for p in audited.home_paths() if not _own_state(p)]
    assert strays == [], f"written under $HOME besides {OWN_STATE}: {strays}"
    assert not (audited.home / "intel").exists()


@pytest.mark.skipif(importlib.util.find_spec("openvino_telemetry") is None,
                    reason="openvino_telemetry is not installed: nothing to catch")
@pytest.mark.parametrize("how", ["import openvino", "c10's import_openvino()"])
def test_the_hook_catches_openvinos_telemetry_and_import_openvino_stops_it(tmp_path, how):
    """The control: OpenVINO's own import, in a fresh $HOME, looks up an analytics host from a
    forked child (refused here) and writes ~/intel; through import_openvino() it does neither.
    If the first case ever finds nothing, OpenVINO has stopped sending at import."""
    audited = Audited(tmp_path)
    code = ("import openvino as ov; ov.Core()" if how == "import openvino" else
            "from c10.features.backends.openvino import import_openvino; import_openvino().Core()")
    audited.run(sys.executable, "-c", code)
    exits = [r for r in audited.records() if r["event"] == "exit" and r["openvino"]]
    assert exits, audited.records()
    if how == "import openvino":
        assert audited.network(), f"no telemetry attempt seen: {audited.records()}"
        assert (audited.home / "intel").is_dir()
    else:
        assert audited.network() == [] and audited.home_paths() == []
        assert exits[0]["openvino_telemetry"] == "hidden"
