#!/bin/sh
# Print a Kubernetes Secret manifest holding what one pod needs of a fedcare kit (no kubectl needed):
#   deploy/k8s/kit-secret.sh KIT NAME [--role coordinator|node|serve] [--namespace NS] [--container-paths]
#   deploy/k8s/kit-secret.sh KIT NAME --items | --out-dir DIR
# e.g. deploy/k8s/kit-secret.sh kits/coordinator fedcare-coordinator-kit --namespace fedcare-coordinator \
#        --container-paths | kubectl apply -f -
# The output holds private keys: pipe it to kubectl, never write it into the repository. See kit_secret.py.
set -eu
here=$(CDPATH= cd -- "$(dirname -- "$0")" && pwd)
exec "${PYTHON:-python3}" "$here/kit_secret.py" "$@"
