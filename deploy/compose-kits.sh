#!/bin/sh
# Prepare the local compose federation (deploy/compose.yaml) in OUT: the breast-cancer example's sites
# as data, a study CA and kits for a coordinator named "coordinator" and hospital-01..03, and one folder
# per container holding only that role's kit files with the container paths set (kit_secret.py --out-dir).
#   deploy/compose-kits.sh OUT        (FEDCARE=path/to/fedcare, PYTHON=python3.11+ to override)
# OUT/kits/ are the master kits (ca/ holds the study CA's key): keep them off the containers.
set -eu
out=${1:?usage: deploy/compose-kits.sh OUT}
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
fedcare=${FEDCARE:-fedcare}
python=${PYTHON:-python3}
if [ -e "$out" ] && [ -n "$(ls -A "$out")" ]; then echo "compose-kits: $out is not empty" >&2; exit 2; fi
mkdir -p "$out"
"$fedcare" example breast-cancer --out "$out/data" >/dev/null
"$fedcare" provision --study "$here/../studies/breast-cancer.toml" --coordinator-host coordinator \
  --hospitals hospital-01,hospital-02,hospital-03 --out "$out/kits" >/dev/null
"$fedcare" serve cert --kit "$out/kits/hospital-01" --host serve >/dev/null
secret="$python $here/k8s/kit_secret.py"
$secret "$out/kits/coordinator" coordinator --container-paths --out-dir "$out/coordinator"
for h in hospital-01 hospital-02 hospital-03; do
  $secret "$out/kits/$h" "$h" --role node --container-paths --out-dir "$out/$h"
done
$secret "$out/kits/hospital-01" serve --role serve --container-paths --out-dir "$out/serve-hospital-01"
mkdir -p "$out/package"
echo "compose-kits: ready in $out. Now give the containers' user the kit folders:"
echo "  sudo chown -R 10001:10001 $out/coordinator $out/hospital-0? $out/serve-hospital-01   (rootless Podman: podman unshare chown -R 10001:10001 ...)"
echo "  FEDCARE_COMPOSE=$(CDPATH= cd -- "$out" && pwd) docker compose -f $here/compose.yaml up"
