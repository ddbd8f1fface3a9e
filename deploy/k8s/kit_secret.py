"""A Kubernetes Secret manifest (or a folder, for compose) holding what one role needs of a fedcare kit.

    deploy/k8s/kit-secret.sh KIT NAME [--role coordinator|node|serve] [--namespace NS] [--container-paths]
    deploy/k8s/kit-secret.sh KIT NAME --items          # the volume's `items:` block for this kit
    deploy/k8s/kit-secret.sh KIT NAME --out-dir DIR    # the same files as a folder (0700 / 0600), for compose

Standard library only (Python 3.11+): no kubectl, no cluster, nothing sent anywhere; the manifest goes to
stdout (pipe it to `kubectl apply -f -`, never into the repository: it holds private keys).

Each role gets only the files its command reads (`ROLE_FILES`); the rest of the kit stays out of the
cluster, and the files left out are named on stderr. Never included: `state/` (runtime state lives on
the pod's volume), the study CA (`ca/` is not a kit and is refused), `node-ca.key` (it issues node
certificates: `coordinator add-node` runs on the operator's machine), `serve-ca.key` (it issues the
serving certificate), and a hospital's `node.key` never goes to its inference pod nor `package.key` to
its node pod. Keys protected with `fedcare kit protect` stay protected in the Secret: the pod gets the
passphrase from a second Secret (FEDCARE_KIT_PASSPHRASE_FILE).

A Secret's keys are flat (`[-._a-zA-Z0-9]+`), a kit has a `nodes/` folder: the key of `nodes/a.pub` is
`nodes_a.pub` ("_" is in no kit file name and in no hospital name), and the pod's Secret volume maps it
back with `items` (`--items` prints that block).

In the cluster the kit is read-only and the writable state is `/var/lib/fedcare`, the site's export
`/srv/fedcare/data`: the coordinator's kit.toml must say `[coordinator] state_dir = "/var/lib/fedcare"`,
a hospital's site.toml `[site] state_dir = "/var/lib/fedcare"` (and, for the node, `data =
"/srv/fedcare/data"`). A kit that says otherwise is refused; `--container-paths` writes those values
into the Secret's copy of the file (the kit folder itself is left as it is).
"""

from __future__ import annotations

import argparse
import base64
import copy
import json
import os
import re
import stat
import sys
import tomllib
from pathlib import Path

STATE_DIR = "/var/lib/fedcare"
DATA_DIR = "/srv/fedcare/data"
SEPARATOR = "_"  # stands for "/" in a Secret key

# role -> (files it needs, of which private keys); `nodes/*` for the coordinator: every accepted node.
ROLE_FILES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # `coordinator start`: kit.toml, study.toml, server.crt/.key (TLS, the edge's), node-ca.crt (client
    # certificates), nodes/<h>.pub (node keys it registers), nodes/<h>.crt (the edge admits them);
    # artifact.key (seals checkpoints; `coordinator start` would create it in the kit if missing, which a
    # read-only kit cannot); `fedcare run`: the study, artifact.key; `fedcare export` (run in the pod):
    # signing.key, signing.pub -- present, so `ensure_signing_key` never tries to create them -- and
    # nodes/<h>.package.pub (`--encrypt-for <h>`). ca.crt: the study CA.
    "coordinator": (("kit.toml", "study.toml", "ca.crt", "server.crt", "server.key", "node-ca.crt",
                     "signing.key", "signing.pub", "artifact.key"), ("server.key", "signing.key", "artifact.key")),
    # `node start`: kit.toml, study.toml, site.toml (data, state_dir, [policy], [approval]), ca.crt
    # (verifies the coordinator), node.key (Flower node authentication; its TLS client key is derived into
    # the state dir at each start), node.crt (the edge's client certificate).
    "node": (("kit.toml", "study.toml", "site.toml", "ca.crt", "node.key", "node.crt"), ("node.key",)),
    # `serve`: kit.toml, study.toml, site.toml (state_dir: tokens, audit log and its key), the key that
    # verifies packages, the serving certificate and key (`fedcare serve cert`, or the hospital's PKI),
    # package.key (opens a package encrypted for this site, PKG.enc, in memory only).
    "serve": (("kit.toml", "study.toml", "site.toml", "coordinator-signing.pub", "serve.crt", "serve.key",
               "package.key"), ("serve.key", "package.key")),
}
SECRET_KEY = re.compile(r"^[-._a-zA-Z0-9]+$")
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")


class KitSecretError(Exception):
    """The kit cannot become this role's Secret; the message says why and what to do."""


def kit_role(kit: Path) -> str:
    """'coordinator' or 'hospital', from the kit's kit.toml."""
    try:
        raw = tomllib.loads((kit / "kit.toml").read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KitSecretError(f"{kit / 'kit.toml'}: not found; is {kit} a fedcare kit folder (not the study CA's ca/)?") from None
    except tomllib.TOMLDecodeError as err:
        raise KitSecretError(f"{kit / 'kit.toml'}: not valid TOML: {err}") from None
    role = raw.get("kit", {}).get("role") if isinstance(raw.get("kit"), dict) else None
    if role not in ("coordinator", "hospital"):
        raise KitSecretError(f"{kit / 'kit.toml'}: [kit] role is {role!r}, expected 'coordinator' or 'hospital'")
    return role


def resolve_role(kit: Path, role: str | None) -> str:
    found = kit_role(kit)
    if found == "coordinator":
        if role not in (None, "coordinator"):
            raise KitSecretError(f"--role {role}: {kit} is a coordinator kit (its role is 'coordinator')")
        return "coordinator"
    if role not in ("node", "serve"):
        raise KitSecretError(f"--role: {kit} is a hospital kit; say which pod the Secret is for: --role node or --role serve")
    return role


def role_files(kit: Path, role: str) -> list[str]:
    """The kit-relative paths this role's Secret holds (every one must exist)."""
    files, _ = ROLE_FILES[role]
    paths = list(files)
    if role == "coordinator":
        nodes = sorted(p for p in (kit / "nodes").glob("*") if p.suffix in (".pub", ".crt")) if (kit / "nodes").is_dir() else []
        paths += [f"nodes/{p.name}" for p in nodes]
        if not any(p.endswith(".pub") for p in paths):
            raise KitSecretError(f"{kit / 'nodes'}: no node key; the coordinator would accept no hospital")
    missing = [p for p in paths if not (kit / p).is_file()]
    if missing:
        hint = {"serve.crt": "issue it with `fedcare serve cert --kit KIT --host NAMES` (the names the EHR gateway "
                             "calls, e.g. fedcare-serve.fedcare-hospital.svc) or save your PKI's certificate and key "
                             "there as serve.crt / serve.key",
                "site.toml": "it names the site's data and state directories",
                "signing.key": "create the coordinator's package signing key before deploying (the cluster's kit "
                               "is read-only: `fedcare export` cannot create it there)",
                "artifact.key": "run `fedcare coordinator start` once outside the cluster, or re-provision (the "
                                "cluster's kit is read-only: the coordinator cannot create it there)",
                "package.key": "create it with `fedcare node package-key --kit KIT` (and send package.pub to the "
                               "coordinator)"}
        hints = "; ".join(f"{m}: {hint[m]}" for m in missing if m in hint)
        raise KitSecretError(f"{kit}: missing {', '.join(missing)} (needed by the {role} pod)" + (f"; {hints}" if hints else ""))
    for path in paths:
        if SEPARATOR in path:
            raise KitSecretError(f"{kit / path}: a kit file name with '{SEPARATOR}' cannot be mapped to a Secret key")
    return paths


def left_out(kit: Path, paths: list[str]) -> list[str]:
    """Kit files not in the Secret (state/ excluded), for the stderr note."""
    keep = set(paths)
    found = []
    for p in sorted(kit.rglob("*")):
        rel = p.relative_to(kit).as_posix()
        if p.is_file() and rel not in keep and not rel.startswith("state/"):
            found.append(rel)
    return found


def check_private(path: Path) -> None:
    """The rule fedcare applies to every private key: not readable by group or others."""
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode & 0o077:
        raise KitSecretError(f"{path}: private key permissions are {mode:o}; run `chmod 600 {path}`")


def secret_key(path: str) -> str:
    key = path.replace("/", SEPARATOR)
    if not SECRET_KEY.match(key):
        raise KitSecretError(f"{path}: not a valid Secret key ({key!r})")
    return key


def _toml_string(value: str) -> str:
    return json.dumps(value)  # a TOML basic string for these ASCII paths


def set_toml_values(text: str, table: str, values: dict[str, str], source: str) -> str:
    """`text` with `[table] key = "value"` for each of `values`; everything else unchanged (checked by parsing)."""
    before = tomllib.loads(text)
    lines = text.splitlines()
    header = re.compile(rf"^\s*\[\s*{re.escape(table)}\s*\]\s*(#.*)?$")
    start = next((i for i, line in enumerate(lines) if header.match(line)), None)
    if start is None:
        lines += ["", f"[{table}]"] + [f"{k} = {_toml_string(v)}" for k, v in values.items()]
    else:
        end = next((i for i in range(start + 1, len(lines)) if re.match(r"^\s*\[", lines[i])), len(lines))
        for key, value in values.items():
            at = next((i for i in range(start + 1, end) if re.match(rf"^\s*{re.escape(key)}\s*=", lines[i])), None)
            if at is None:
                lines.insert(start + 1, f"{key} = {_toml_string(value)}")
                end += 1
            else:
                lines[at] = f"{key} = {_toml_string(value)}"
    result = "\n".join(lines) + "\n"
    expected = copy.deepcopy(before)
    expected.setdefault(table, {}).update(values)
    try:
        after = tomllib.loads(result)
    except tomllib.TOMLDecodeError:
        after = None
    if after != expected:
        raise KitSecretError(f"{source}: could not set [{table}] {', '.join(values)} safely; edit the file by hand")
    return result


def container_settings(kit: Path, role: str) -> tuple[str, str, dict[str, str]]:
    """(file, table, values) the pod needs in its copy of the kit."""
    if role == "coordinator":
        return "kit.toml", "coordinator", {"state_dir": STATE_DIR}
    values = {"state_dir": STATE_DIR} | ({"data": DATA_DIR} if role == "node" else {})
    return "site.toml", "site", values


def kit_contents(kit: Path, role: str, container_paths: bool) -> dict[str, bytes]:
    """kit-relative path -> bytes, for this role, with the container paths checked (or set)."""
    kit = Path(kit)
    role = resolve_role(kit, role)
    paths = role_files(kit, role)
    for private in ROLE_FILES[role][1]:
        check_private(kit / private)
    contents = {p: (kit / p).read_bytes() for p in paths}
    name, table, values = container_settings(kit, role)
    text = contents[name].decode("utf-8")
    current = tomllib.loads(text).get(table, {})
    wrong = {k: v for k, v in values.items() if current.get(k) != v}
    if wrong:
        if not container_paths:
            wanted = ", ".join(f"{k} = {_toml_string(v)}" for k, v in wrong.items())
            raise KitSecretError(f"{kit / name}: in the cluster the kit is read-only; set [{table}] {wanted} (now "
                                 f"{', '.join(f'{k} = {current.get(k)!r}' for k in wrong)}), or pass --container-paths "
                                 "to set them in the Secret's copy only")
        contents[name] = set_toml_values(text, table, values, str(kit / name)).encode("utf-8")
    return contents


def secret_manifest(contents: dict[str, bytes], name: str, role: str, namespace: str | None) -> str:
    """The Secret as YAML (what `kubectl create secret generic --dry-run=client -o yaml` would print)."""
    if not DNS_SUBDOMAIN.match(name) or len(name) > 253:
        raise KitSecretError(f"NAME '{name}': a Secret name is lowercase letters, digits, '-' and '.'")
    if namespace is not None and not DNS_LABEL.match(namespace):
        raise KitSecretError(f"--namespace '{namespace}': not a namespace name")
    lines = ["# fedcare kit Secret: holds private keys. Apply it (kubectl apply -f -); never commit it.",
             "apiVersion: v1", "kind: Secret", "metadata:", f"  name: {name}"]
    if namespace:
        lines.append(f"  namespace: {namespace}")
    lines += ["  labels:", "    app.kubernetes.io/part-of: fedcare", f"    app.kubernetes.io/component: {role}-kit",
              "type: Opaque", "data:"]
    for path in sorted(contents, key=secret_key):
        lines.append(f"  {secret_key(path)}: {base64.b64encode(contents[path]).decode('ascii')}")
    return "\n".join(lines) + "\n"


def items_block(contents: dict[str, bytes], indent: int = 12) -> str:
    """The Secret volume's `items:` (key -> kit path) for these files."""
    pad = " " * indent
    out = [f"{pad}items:"]
    for path in sorted(contents, key=secret_key):
        out += [f"{pad}  - key: {secret_key(path)}", f"{pad}    path: {path}"]
    return "\n".join(out) + "\n"


def write_folder(contents: dict[str, bytes], out: Path) -> None:
    """The files as a folder: directories 0700, files 0600 (for a compose bind mount; chown it to 10001)."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise KitSecretError(f"--out-dir: {out} is not empty")
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    os.chmod(out, 0o700)
    for path, data in sorted(contents.items()):
        target = out / path
        target.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.chmod(target, 0o600)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kit-secret.sh", description=__doc__.split("\n\n")[0])
    parser.add_argument("kit", type=Path, help="the kit folder (coordinator or hospital)")
    parser.add_argument("name", help="the Secret's name (e.g. fedcare-coordinator-kit, fedcare-node-kit, fedcare-serve-kit)")
    parser.add_argument("--role", choices=sorted(ROLE_FILES), default=None,
                        help="which pod: coordinator (a coordinator kit), node or serve (a hospital kit)")
    parser.add_argument("--namespace", default=None, help="metadata.namespace of the Secret")
    parser.add_argument("--container-paths", action="store_true",
                        help=f"set state_dir = {STATE_DIR} (and the node's data = {DATA_DIR}) in the Secret's copy")
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--items", action="store_true", help="print the Secret volume's items: block instead")
    what.add_argument("--out-dir", type=Path, default=None, help="write the files into this new folder instead")
    args = parser.parse_args(argv)
    try:
        role = resolve_role(args.kit, args.role)
        contents = kit_contents(args.kit, role, args.container_paths)
        if args.items:
            sys.stdout.write(items_block(contents))
        elif args.out_dir is not None:
            write_folder(contents, args.out_dir)
            print(f"{args.out_dir}: {len(contents)} files of the {role} kit", file=sys.stderr)
        else:
            sys.stdout.write(secret_manifest(contents, args.name, role, args.namespace))
        skipped = left_out(args.kit, list(contents))
        if skipped:
            print(f"kit-secret: left out of the {role} Secret (not read by its pod): {', '.join(skipped)}", file=sys.stderr)
    except (KitSecretError, OSError, UnicodeDecodeError) as err:
        print(f"kit-secret: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
