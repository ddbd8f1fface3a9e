"""The OCI images of the three roles (deploy/images, `make images`), built with podman and run from the
mounted image: `make test-images` (marked slow: not part of `make test`; needs root for mount, chroot
and namespaces, as podman itself does on this machine kind).

`podman run` does not work on this machine kind (cgroups), so each image is run the way a container
runtime would, minus cgroups: `podman image mount` (a read-only overlay: the read-only root filesystem),
a private mount, PID and network namespace (`unshare`), the image's volumes as the only writable places
(a state directory bound at /var/lib/fedcare, a tmpfs at /tmp), the kit and the package bound
read-only at their contract paths, then `chroot --userspec=10001:10001` into the mount with the
image's own Env, WorkingDir, Entrypoint and Cmd read from its configuration. The health checks run are
the images' own HEALTHCHECK commands, inside the same namespaces (`nsenter`).

Checked: the configuration contract (user, ports, volumes, health checks, entry points, labels); no
private key, kit file, .git or wheelhouse in any layer; every installed distribution at
requirements.lock's version; `--help` of each role's commands; the App tree is `fedcare.APP_DIR` and
hashes like this checkout's; the inference service from its image answers GET /healthz and an
authenticated POST /v1/analyze over HTTPS verified against the kit's serving CA; the coordinator
image's nginx edge runs as uid 10001 and a hospital node from its image connects to it through it.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

ROLES = ("coordinator", "node", "serve")
UID = GID = 10001
KIT, STATE, DATA, PACKAGE = "/run/fedcare/kit", "/var/lib/fedcare", "/srv/fedcare/data", "/srv/fedcare/package"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
HEALTHCHECKS = {
    "coordinator": ["CMD", "/usr/bin/python3", "-I", "/opt/fedcare/healthcheck.py", "tcp", "9092"],
    "node": ["CMD", "/usr/bin/python3", "-I", "/opt/fedcare/healthcheck.py", "process", "deploy.supernode"],
    "serve": ["CMD", "/usr/bin/python3", "-I", "/opt/fedcare/healthcheck.py", "https", "https://127.0.0.1:8443/healthz"],
}
CMDS = {
    "coordinator": ["coordinator", "start", "--kit", KIT],
    "node": ["node", "start", "--kit", KIT],
    "serve": ["serve", "--package", PACKAGE, "--kit", KIT, "--host", "0.0.0.0", "--port", "8443"],
}
PORTS = {"coordinator": {"9092/tcp"}, "node": set(), "serve": {"8443/tcp"}}
HELP = {"coordinator": ["coordinator", "start"], "node": ["node", "start"], "serve": ["serve"]}
# What `fedcare simulate` / `fedcare example` alone use: not in the deployment images (deploy/images/build.sh)
SIMULATION_ONLY = {"scikit-learn", "ray"}
SERVE_DEPENDENCIES = {"cryptography", "numpy", "onnxruntime", "orjson", "fastapi", "uvicorn", "httptools", "uvloop"}
TRAINING_STACK = {"torch", "opacus", "flwr", "onnx", "onnxscript", "ray", "grpcio", "pyarrow"}
PEM_PRIVATE_KEY = re.compile(rb"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----\s+[A-Za-z0-9+/=:,\-\s]{40,}?-----END")
KIT_FILE_NAMES = {"kit.toml", "site.toml", "tokens.json", "superlink.db", "ledger.jsonl", "node.pub", "signing.pub",
                  "package.pub", "coordinator-signing.pub", "node-ca.crt", "serve-ca.crt"}


def normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(requirement: str) -> str:
    return normalize(re.split(r"[\[=<>!~; ]", requirement, maxsplit=1)[0])


def locked_versions() -> dict[str, str]:
    """requirements.lock, and deploy/images/constraints.txt for what `pip freeze` leaves out (setuptools)."""
    pins = {}
    lines = (ROOT / "requirements.lock").read_text().splitlines()
    lines += (ROOT / "deploy" / "images" / "constraints.txt").read_text().splitlines()
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[normalize(name)] = version.strip()
    return pins


def run(cmd: list[str], timeout: float = 120, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kwargs)
    if check and proc.returncode != 0:
        raise AssertionError(f"{shlex.join(cmd)}: exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


# -- the images ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def images():
    """`deploy/images/build.sh` (what `make images` runs): all three, from scratch or from its caches."""
    if os.geteuid() != 0:
        pytest.fail("tests/test_images.py needs root (podman on this machine kind, mount, chroot, unshare): "
                    "run `make test-images` as root")
    started = time.monotonic()
    proc = subprocess.run([str(ROOT / "deploy" / "images" / "build.sh")], cwd=ROOT, capture_output=True, text=True,
                          timeout=3600, env={**os.environ, "PYTHON": sys.executable})
    assert proc.returncode == 0, f"build.sh failed:\n{proc.stderr[-5000:]}"
    print(f"\nimages: build.sh {time.monotonic() - started:.0f} s\n{proc.stderr.strip()}")
    return {role: f"localhost/fedcare-{role}:{VERSION}" for role in ROLES}


@pytest.fixture(scope="module")
def configs(images):
    """`podman image inspect`, with its HEALTHCHECK (podman shows it beside Config; test_no_secret_in_any_layer
    reads the saved image's own configuration, where a runtime finds it)."""
    found = {}
    for role, ref in images.items():
        info = json.loads(run(["podman", "image", "inspect", ref]).stdout)[0]
        info["Config"]["Healthcheck"] = info.get("Healthcheck")
        found[role] = info
    return found


class Mounted:
    """`podman image mount`: the image's root filesystem, read-only (overlay), unmounted at the end."""

    def __init__(self, ref: str) -> None:
        self.ref = ref
        self.path = Path(run(["podman", "image", "mount", ref]).stdout.strip())

    def close(self) -> None:
        run(["podman", "image", "unmount", self.ref], check=False)


@pytest.fixture(scope="module")
def mounts(images):
    opened = {role: Mounted(ref) for role, ref in images.items()}
    yield {role: m.path for role, m in opened.items()}
    for m in opened.values():
        m.close()


# -- running an image's entry point in namespaces, chrooted into the mounted image -----------------

# Runs as root in fresh mount (and PID, network) namespaces; "$@" is the image's command line.
CONTAINER_SH = r"""
set -eu
root="$1"; shift
[ -n "${FEDCARE_SHARED_NET:-}" ] || ip link set lo up
mount -t proc -o nosuid,nodev,noexec proc "$root/proc"
mount --bind /dev "$root/dev"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/dev/shm"
mount -t tmpfs -o mode=1777,nosuid,nodev tmpfs "$root/tmp"
mount --bind "$FEDCARE_STATE" "$root/var/lib/fedcare"
eval "$FEDCARE_BINDS"
exec setsid chroot --userspec=10001:10001 --groups=10001 "$root" /usr/bin/env -i -C "$FEDCARE_WORKDIR" $FEDCARE_ENV "$@"
"""


def ro_bind(source: Path, target: str, root: Path) -> str:
    dest = shlex.quote(str(root) + target)
    return f"mount --bind {shlex.quote(str(source))} {dest}; mount -o remount,bind,ro,nosuid,nodev {dest}; "


class Container:
    """One image's process tree: PID 1 of its own PID namespace is the entry point, as in a container."""

    def __init__(self, root: Path, config: dict, state: Path, logs: Path, *, command: list[str] | None = None,
                 binds: dict[str, Path] | None = None, share_net_with: "Container | None" = None) -> None:
        self.root, self.config = root, config["Config"]
        self.env = self.config["Env"]
        argv = list(self.config["Entrypoint"]) + list(command if command is not None else self.config["Cmd"])
        binds_sh = "".join(ro_bind(src, dst, root) for dst, src in (binds or {}).items())
        env = {**os.environ, "FEDCARE_STATE": str(state), "FEDCARE_BINDS": binds_sh,
               "FEDCARE_WORKDIR": self.config.get("WorkingDir") or "/", "FEDCARE_ENV": " ".join(map(shlex.quote, self.env))}
        prefix = []
        if share_net_with is not None:
            env["FEDCARE_SHARED_NET"] = "1"
            prefix = ["nsenter", f"--net=/proc/{share_net_with.init_pid}/ns/net"]
        unshare = ["unshare", "--mount", "--propagation", "private", "--pid", "--fork", "--kill-child=SIGKILL"]
        if share_net_with is None:
            unshare.append("--net")
        logs.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = logs / "stdout", logs / "stderr"
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            self.proc = subprocess.Popen([*prefix, *unshare, "sh", "-c", CONTAINER_SH, "sh", str(root), *argv],
                                         stdout=out, stderr=err, env=env, start_new_session=True)
        self.init_pid = self._init_pid()

    def _init_pid(self) -> int | None:
        """Host PID of the namespace's PID 1 (unshare's child); None when the container ended before it was
        seen (a one-shot command such as `--help` of the light serve image can: its exit status tells)."""
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for pid in _descendants(self.proc.pid):
                try:
                    ns_pids = Path(f"/proc/{pid}/status").read_text().split("NSpid:")[1].split("\n")[0].split()
                except (OSError, IndexError):
                    continue
                if ns_pids[-1] == "1":
                    return pid
            if self.proc.poll() is not None:
                return None
            time.sleep(0.05)
        raise AssertionError("no PID 1 in the container's namespace")

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")

    def exec(self, argv: list[str], timeout: float = 60) -> subprocess.CompletedProcess:
        """`argv` inside the running container (its namespaces, chroot, user and Env): a probe's view."""
        assert self.init_pid is not None, f"the container ended (exit {self.proc.returncode}): {self.stderr[-3000:]}"
        inner = ["chroot", "--userspec=10001:10001", "--groups=10001", str(self.root), "/usr/bin/env", "-i",
                 "-C", self.config.get("WorkingDir") or "/", *self.env, *argv]
        return run(["nsenter", f"--target={self.init_pid}", "--mount", "--net", "--pid", "--", *inner],
                   timeout=timeout, check=False)

    def healthcheck(self) -> subprocess.CompletedProcess:
        test = self.config["Healthcheck"]["Test"]
        assert test[0] == "CMD"
        return self.exec(test[1:], timeout=self.config["Healthcheck"]["Timeout"] / 1e9 + 5)

    def wait_healthy(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"exited with {self.proc.returncode}:\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}")
            check = self.healthcheck()
            if check.returncode == 0:
                return
            time.sleep(1)
        raise AssertionError(f"not healthy within {timeout} s: {check.stderr}\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}")

    def wait_output(self, needle: str, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.stdout:
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"no {needle!r} (exit {self.proc.poll()}):\n{self.stdout[-3000:]}\n{self.stderr[-3000:]}")
            time.sleep(0.5)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM to PID 1 (what a runtime's stop does), SIGKILL after `timeout` (the whole namespace goes)."""
        if self.proc.poll() is None and self.init_pid is not None:
            try:
                os.kill(self.init_pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.init_pid, signal.SIGKILL)
                self.proc.wait(timeout=30)
        return self.proc.returncode


def _descendants(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        try:
            children = [int(c) for t in Path(f"/proc/{current}/task").iterdir()
                        for c in (t / "children").read_text().split()]
        except OSError:
            children = []
        found += children
        todo += children
    return found


def one_shot(root: Path, config: dict, argv: list[str], tmp: Path, timeout: float = 120, **kwargs) -> tuple[int, str, str]:
    """`argv` (after the Entrypoint) as a container of its own; (exit status, stdout, stderr)."""
    state = kwargs.pop("state", None) or _state_dir(tmp / "state")
    box = Container(root, config, state, tmp / "logs", command=argv, **kwargs)
    try:
        box.proc.wait(timeout=timeout)
    finally:
        box.stop()
    return box.proc.returncode, box.stdout, box.stderr


def _state_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, UID, GID)
    path.chmod(0o700)
    return path


def _owned_copy(source: Path, target: Path, ignore=None) -> Path:
    """A copy for uid 10001 (the kit's keys are 0600: the image's user must own them)."""
    shutil.copytree(source, target, ignore=ignore)
    for path in [target, *target.rglob("*")]:
        os.chown(path, UID, GID, follow_symlinks=False)
    return target


# -- the configuration contract --------------------------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_configuration_contract(configs, role):
    info = configs[role]
    config = info["Config"]
    assert config["User"] == f"{UID}:{GID}"
    assert config["Entrypoint"] == ["fedcare"] and config["Cmd"] == CMDS[role]
    assert set(config.get("ExposedPorts") or {}) == PORTS[role]
    assert set(config["Volumes"]) == {STATE, "/tmp"}
    assert config["WorkingDir"] == STATE
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HOME"] == STATE and env["FLWR_TELEMETRY_ENABLED"] == "0" and env["FLWR_DISABLE_UPDATE_CHECK"] == "1"
    assert env["PATH"].startswith("/opt/fedcare/venv/bin:")
    assert config["Healthcheck"]["Test"] == HEALTHCHECKS[role]
    labels = config["Labels"]
    revision = run(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).stdout.strip()
    assert labels["org.opencontainers.image.title"] == f"fedcare-{role}"
    assert labels["org.opencontainers.image.version"] == VERSION
    assert labels["org.opencontainers.image.revision"] == revision
    assert labels["org.opencontainers.image.description"]
    assert f"localhost/fedcare-{role}:latest" in info["RepoTags"] and f"localhost/fedcare-{role}:{VERSION}" in info["RepoTags"]


@pytest.mark.parametrize("role", ROLES)
def test_no_secret_in_any_layer(images, tmp_path, role):
    """Every layer tarball (a file deleted in a later layer is still in its own): no private key material,
    no key or kit file, no .git, no wheelhouse, no pip; nor any key in the configuration or history."""
    out = tmp_path / "saved"
    run(["podman", "save", "--quiet", "--format", "docker-dir", "-o", str(out), images[role]], timeout=900)
    manifest = json.loads((out / "manifest.json").read_text())
    config_text = (out / manifest["config"]["digest"].split(":")[1]).read_text()
    assert "PRIVATE KEY" not in config_text
    saved = json.loads(config_text)["config"]
    assert saved["User"] == f"{UID}:{GID}" and saved["Healthcheck"]["Test"] == HEALTHCHECKS[role]
    problems, files, total = [], 0, 0
    for layer in manifest["layers"]:
        with tarfile.open(out / layer["digest"].split(":")[1], "r:*") as tar:
            for member in tar:
                parts = member.name.lstrip("./").split("/")
                name = parts[-1]
                if ".git" in parts or name.endswith((".key", ".whl")) or name in KIT_FILE_NAMES:
                    problems.append(f"{layer['digest'][:19]} {member.name}")
                if name.startswith(".wh."):
                    continue
                if member.isfile():
                    files += 1
                    total += member.size
                    data = tar.extractfile(member).read()
                    if b"PRIVATE KEY-----" in data and PEM_PRIVATE_KEY.search(data):
                        problems.append(f"{layer['digest'][:19]} {member.name}: a PEM private key")
    shutil.rmtree(out)  # gigabytes: not kept with pytest's temporary folders
    print(f"\n{role}: {len(manifest['layers'])} layers, {files} files, {total / 1e6:.0f} MB uncompressed")
    assert problems == []
    assert files > 1000


@pytest.mark.parametrize("role", ROLES)
def test_dependencies_are_the_locked_versions(mounts, configs, tmp_path, role):
    status, out, err = run_python(mounts[role], configs[role], tmp_path,
                                  "import importlib.metadata as m, json, sys; "
                                  "print(json.dumps({'python': sys.version.split()[0], "
                                  "'dists': {d.metadata['Name']: d.version for d in m.distributions()}}))")
    assert status == 0, err
    found = json.loads(out.strip().splitlines()[-1])
    assert found["python"].startswith("3.11.")
    installed = {normalize(name): version for name, version in found["dists"].items()}
    pins = locked_versions()
    assert {name for name in installed if name not in pins} == set()  # nothing unlocked
    assert "pip" not in installed  # the installer ran from its wheel at build time
    wrong = {name: (version, pins[name]) for name, version in installed.items() if version.split("+")[0] != pins[name]}
    assert wrong == {}
    declared = {requirement_name(r) for r in tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]}
    if role == "serve":
        assert SERVE_DEPENDENCIES <= set(installed)
        assert TRAINING_STACK & set(installed) == set()
    else:
        assert declared - SIMULATION_ONLY <= set(installed)
        assert SIMULATION_ONLY & set(installed) == set()
        assert installed["torch"].endswith("+cpu")  # the CPU build: no CUDA wheels
        assert not any(name.startswith("nvidia-") for name in installed)
    print(f"\n{role}: {len(installed)} distributions, all at requirements.lock's versions")


def run_python(root: Path, config: dict, tmp: Path, code: str) -> tuple[int, str, str]:
    """`python3 -c code` with the image's interpreter, as its user, in a container of its own."""
    patched = {**config, "Config": {**config["Config"], "Entrypoint": ["python3"]}}
    return one_shot(root, patched, ["-c", code], tmp)


# -- entry points, the App tree, the read-only root ------------------------------------------------


@pytest.mark.parametrize("role", ROLES)
def test_entry_points_and_the_app_tree(mounts, configs, tmp_path, role):
    root, config = mounts[role], configs[role]
    for argv in (["--help"], [*HELP[role], "--help"]):
        status, out, err = one_shot(root, config, argv, tmp_path / "-".join(argv))
        assert status == 0, err
        assert out.startswith("usage: fedcare"), out
    probe = (
        "import json, os, fedcare\n"
        "def writable(p):\n"
        "    try:\n"
        "        open(os.path.join(p, '.probe'), 'w').close(); os.unlink(os.path.join(p, '.probe')); return True\n"
        "    except OSError as err:\n"
        "        return err.strerror\n"
        "root = [l.split() for l in open('/proc/mounts') if l.split()[1] == '/'][-1]\n"
        "print(json.dumps({'app_dir': str(fedcare.APP_DIR), 'uid': os.getuid(), 'gid': os.getgid(), 'groups': os.getgroups(),\n"
        "    'root_options': root[3].split(','), 'cwd': os.getcwd(),\n"
        "    'writable': {p: writable(p) for p in ('/', '/etc', '/opt/fedcare/app', '/opt/fedcare/venv', '/usr/lib', '/run/fedcare/kit', '/var/lib/fedcare', '/tmp')}}))\n"
    )
    status, out, err = run_python(root, config, tmp_path / "probe", probe)
    assert status == 0, err
    found = json.loads(out.strip().splitlines()[-1])
    assert found["app_dir"] == "/opt/fedcare/app" and found["cwd"] == STATE
    assert (found["uid"], found["gid"], found["groups"]) == (UID, GID, [GID])
    assert "ro" in found["root_options"]
    assert found["writable"] == {"/": "Read-only file system", "/etc": "Read-only file system",
                                 "/opt/fedcare/app": "Read-only file system", "/opt/fedcare/venv": "Read-only file system",
                                 "/usr/lib": "Read-only file system", "/run/fedcare/kit": "Read-only file system",
                                 "/var/lib/fedcare": True, "/tmp": True}
    if role != "serve":  # the App a site approves: this checkout's, byte for byte (deploy/approval.py)
        from deploy.approval import app_hash

        status, out, err = one_shot(root, config, ["node", "app-hash"], tmp_path / "app-hash")
        assert status == 0, err
        assert out.split()[0] == app_hash(ROOT)
        assert "/opt/fedcare/app" in out


# -- the inference service from its image ----------------------------------------------------------

PROBE_SERVE = r"""
import json, ssl, sys, time
import httpx
ca, token, features = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
context = ssl.create_default_context(cafile=ca)
deadline, last = time.monotonic() + 120, None
while time.monotonic() < deadline:
    try:
        r = httpx.get("https://127.0.0.1:8443/healthz", verify=context, timeout=5)
        if r.status_code == 200:
            break
        last = r.status_code
    except httpx.HTTPError as err:
        last = repr(err)
    time.sleep(0.5)
else:
    sys.exit(f"no 200 from /healthz: {last}")
a = httpx.post("https://127.0.0.1:8443/v1/analyze", verify=context, timeout=10,
               headers={"Authorization": f"Bearer {token}"}, json={"patient_id": "MRN-1", "features": features})
n = httpx.post("https://127.0.0.1:8443/v1/analyze", verify=context, timeout=10, json={"patient_id": "x", "features": features})
try:
    httpx.get("http://127.0.0.1:8443/healthz", timeout=5)
    plain = "answered"
except httpx.HTTPError:
    plain = "refused"
import socket
with context.wrap_socket(socket.create_connection(("127.0.0.1", 8443), timeout=5), server_hostname="127.0.0.1") as tls:
    version = tls.version()  # verified against the kit's serving CA, for the name 127.0.0.1
print(json.dumps({"healthz": r.status_code, "healthz_body": r.text, "tls": version,
                  "analyze": a.status_code, "risk": a.json().get("risk"), "no_token": n.status_code, "plain_http": plain}))
"""


def test_serve_answers_healthz_over_https_from_its_image(mounts, configs, tmp_path, tmp_path_factory):
    from tests.test_serve import build_world, valid_features

    world = build_world(tmp_path_factory.mktemp("images-world"))
    # the hospital's kit as its IT would mount it: state on the volume, data at the contract path, a serving certificate
    kit = tmp_path / "kit-src"
    shutil.copytree(world.hospital, kit, ignore=shutil.ignore_patterns("state", "serve-audit*"))
    site = (kit / "site.toml").read_text()
    site = re.sub(r'(?m)^data = .*$', f'data = "{DATA}"', site)
    site = re.sub(r'(?m)^state_dir = .*$', f'state_dir = "{STATE}"', site)
    (kit / "site.toml").write_text(site)
    run([sys.executable, "-m", "cli", "serve", "cert", "--kit", str(kit), "--host", "127.0.0.1,localhost"], cwd=ROOT)
    kit = _owned_copy(kit, tmp_path / "kit")
    package = _owned_copy(world.package, tmp_path / "package")
    state = _state_dir(tmp_path / "state")
    root, config = mounts["serve"], configs["serve"]
    binds = {KIT: kit, PACKAGE: package}
    status, token, err = one_shot(root, config, ["serve", "token", "add", "--kit", KIT, "--name", "gateway"],
                                  tmp_path / "token", state=state, binds=binds)
    assert status == 0, err
    token = token.strip().splitlines()[-1]
    box = Container(root, config, state, tmp_path / "serve", binds=binds)  # the image's own CMD
    try:
        probe = run(["nsenter", f"--net=/proc/{box.init_pid}/ns/net", sys.executable, "-c", PROBE_SERVE,
                     str(kit / "serve-ca.crt"), token, json.dumps(valid_features(world))], timeout=180, check=False)
        assert probe.returncode == 0, f"{probe.stderr}\n{box.stdout[-3000:]}\n{box.stderr[-3000:]}"
        found = json.loads(probe.stdout.strip().splitlines()[-1])
        assert found["healthz"] == 200 and found["tls"] in ("TLSv1.2", "TLSv1.3")
        assert found["analyze"] == 200 and 0.0 < found["risk"] < 1.0
        assert found["no_token"] == 401 and found["plain_http"] == "refused"
        health = box.healthcheck()
        assert health.returncode == 0, health.stderr
        assert "listening on https://0.0.0.0:8443" in box.stdout
        processes = box.exec(["python3", "-c", "import os; print(sorted(int(p) for p in os.listdir('/proc') if p.isdigit()))"])
        assert processes.stdout.split("\n")[0].startswith("[1"), processes  # the entry point is PID 1
    finally:
        status = box.stop()
    assert status == 0, box.stderr
    assert "fedcare serve: stopped" in box.stdout
    # it wrote only to its volume: the audit log (pseudonymized) and the tokens are there
    written = {p.name for p in state.iterdir()}
    assert {"serve-audit.jsonl"} <= written, written
    assert "MRN-1" not in (state / "serve-audit.jsonl").read_text()


# -- the coordinator's edge and a hospital node from their images -----------------------------------


def _hospital_kit(source: Path, target: Path) -> Path:
    """A hospital kit as its IT would mount it: state on the volume, data at the contract path."""
    staging = target.with_name(target.name + "-src")
    shutil.copytree(source, staging, ignore=shutil.ignore_patterns("state", "serve-audit*"))
    site = (staging / "site.toml").read_text()
    site = re.sub(r'(?m)^data = .*$', f'data = "{DATA}"', site)
    site = re.sub(r'(?m)^state_dir = .*$', f'state_dir = "{STATE}"', site)
    (staging / "site.toml").write_text(site)
    return _owned_copy(staging, target)


def test_coordinator_and_node_images_run_a_study(mounts, configs, tmp_path, tmp_path_factory, study):
    """The coordinator image: `coordinator start` as uid 10001 (SuperLink, and nginx as its edge with its
    configuration and temporary files on the state volume) passes its HEALTHCHECK; three hospital nodes
    from the node image connect to it through the edge (TLS with client certificates, node
    authentication) and pass theirs; `fedcare run --rounds 1` from the coordinator image trains one
    SecAgg+ round (ClientApp workers with torch and Opacus on read-only roots), each site's ledger
    records its ε on its own volume, and `fedcare export` there makes a package the serve image verifies."""
    from simulations.cohorts import write_cohorts
    from tests.test_serve import build_world

    world = build_world(tmp_path_factory.mktemp("images-world"))
    coordinator = tmp_path / "coordinator-src"
    shutil.copytree(world.coordinator, coordinator, ignore=shutil.ignore_patterns("state"))
    kit_toml = (coordinator / "kit.toml").read_text()
    (coordinator / "kit.toml").write_text(kit_toml.replace("[coordinator]\n", f'[coordinator]\nstate_dir = "{STATE}"\n', 1))
    coordinator = _owned_copy(coordinator, tmp_path / "coordinator")
    cohorts = tmp_path_factory.mktemp("images-cohorts")
    write_cohorts(study, cohorts, hospitals=3, seed=7)
    hospitals = {name: (_hospital_kit(world.hospital.parent / name, tmp_path / name),
                        _owned_copy(cohorts / f"hospital-0{i}", tmp_path / f"{name}-data"))
                 for i, name in enumerate(("north", "south", "east"), start=1)}
    link_state = _state_dir(tmp_path / "coordinator-state")
    link = Container(mounts["coordinator"], configs["coordinator"], link_state, tmp_path / "coordinator-logs",
                     binds={KIT: coordinator})
    nodes: dict[str, Container] = {}
    statuses: dict[str, int] = {}
    try:
        link.wait_healthy(timeout=120)
        link.wait_output("coordinator listening on 0.0.0.0:9092", timeout=60)
        edge = link.exec(["python3", "-c", (
            "import os\n"
            "for p in os.listdir('/proc'):\n"
            "    if p.isdigit():\n"
            "        cmd = open(f'/proc/{p}/cmdline', 'rb').read().split(b'\\0')[0].decode()\n"
            "        uid = [l.split()[1] for l in open(f'/proc/{p}/status') if l.startswith('Uid:')][0]\n"
            "        print(uid, cmd)\n")])
        assert edge.returncode == 0, edge.stderr
        processes = [line.split(" ", 1) for line in edge.stdout.splitlines()]
        assert any("nginx" in cmd for _, cmd in processes), processes
        assert {uid for uid, _ in processes} == {str(UID)}, processes  # nginx too: no root anywhere
        for name, (kit, data) in hospitals.items():
            nodes[name] = Container(mounts["node"], configs["node"], _state_dir(tmp_path / f"{name}-state"),
                                    tmp_path / f"{name}-logs", binds={KIT: kit, DATA: data}, share_net_with=link)
        for name, node in nodes.items():
            node.wait_output(f"node '{name}' connected", timeout=180)
            health = node.healthcheck()
            assert health.returncode == 0, health.stderr
        status = link.exec(["fedcare", "status", "--kit", KIT], timeout=120)
        assert status.returncode == 0, status.stderr
        for name in hospitals:
            assert re.search(rf"(?m)^{name}\s+\d+\s+online", status.stdout), status.stdout
        assert 'node="north"' in (link_state / "edge" / "access.log").read_text()

        started = time.monotonic()
        study_run = link.exec(["fedcare", "run", "--kit", KIT, "--rounds", "1"], timeout=900)
        print(f"\nfedcare run --rounds 1 from the images: {time.monotonic() - started:.0f} s\n{study_run.stdout[-1500:]}")
        assert study_run.returncode == 0, f"{study_run.stdout[-3000:]}\n{study_run.stderr[-3000:]}"
        run_dir = max((link_state / "runs").iterdir())
        report = json.loads((run_dir / "report.json").read_text())
        assert any(r.get("aggregated") for r in report["rounds"]), report["rounds"]
        for name in hospitals:
            ledger = (tmp_path / f"{name}-state" / "ledger.jsonl").read_text()
            assert ledger.strip(), f"{name}: no ε recorded"
        exported = link.exec(["fedcare", "export", "--run", f"{STATE}/runs/{run_dir.name}", "--kit", KIT,
                              "--out", f"{STATE}/package"], timeout=600)
        assert exported.returncode == 0, exported.stderr[-3000:]
    finally:
        for name, node in nodes.items():
            statuses[name] = node.stop()
        statuses["coordinator"] = link.stop()
    assert statuses == {**{name: 0 for name in hospitals}, "coordinator": 0}, (
        {name: node.stderr[-2000:] for name, node in nodes.items()}, link.stderr[-2000:])
    # the package the coordinator image exported verifies in the serve image, with a hospital's kit
    status, out, err = one_shot(mounts["serve"], configs["serve"], ["verify", PACKAGE, "--kit", KIT], tmp_path / "verify",
                                binds={KIT: hospitals["north"][0], PACKAGE: link_state / "package"})
    assert status == 0, err
