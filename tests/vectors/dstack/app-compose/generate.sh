#!/bin/sh
# Regenerates the app-compose vectors by running dstack v0.5.11's own vmm-cli.py `compose`.
# Usage (from this directory): sh generate.sh /path/to/dstack.git [python]
# Needs only the Python standard library (vmm-cli's `compose` runs offline).
set -eu
REPO=${1:?path to a clone or bare mirror of github.com/Dstack-TEE/dstack}
PY=${2:-python3}
TAG=v0.5.11
CLI=$(mktemp)
git -C "$REPO" show "$TAG:vmm/src/vmm-cli.py" > "$CLI"
KPID=3059301306072a8648ce3d020106082a8648ce3d03010703420004aabbccdd
run() {  # run <id> <vmm-cli compose options...>
  id=$1; shift
  "$PY" "$CLI" compose "$@" --output "out/$id.json" > /dev/null
  printf '%s\t%s\n' "$id" "$*" >> out/cases.tsv
}
rm -rf out && mkdir out
run minimal --name web --docker-compose input/docker-compose.yaml
run deploy-default --name web --docker-compose input/docker-compose.yaml --kms --gateway --public-logs --public-sysinfo
run env-file --name web --docker-compose input/docker-compose.yaml --kms --gateway --public-logs --public-sysinfo --env-file input/app.env
run local-key-provider --name web --docker-compose input/docker-compose.yaml --local-key-provider --gateway
run key-provider-local-over-kms --name web --docker-compose input/docker-compose.yaml --kms --key-provider local
run key-provider-kms --name web --docker-compose input/docker-compose.yaml --key-provider kms --gateway
run key-provider-none --name web --docker-compose input/docker-compose.yaml --kms --key-provider none
run key-provider-id --name web --docker-compose input/docker-compose.yaml --kms --gateway --key-provider-id "$KPID"
run no-instance-id --name web --docker-compose input/docker-compose.yaml --kms --no-instance-id
run secure-time --name web --docker-compose input/docker-compose.yaml --kms --gateway --secure-time
run prelaunch --name web --docker-compose input/docker-compose.yaml --kms --gateway --prelaunch-script input/prelaunch.sh
run swap-4g --name web --docker-compose input/docker-compose.yaml --kms --swap 4G
run swap-0 --name web --docker-compose input/docker-compose.yaml --kms --swap 0
run unicode-crlf --name café-app --docker-compose input/docker-compose-unicode.yaml --kms --gateway --public-logs
run everything --name web --docker-compose input/docker-compose.yaml --kms --gateway --local-key-provider --key-provider kms --key-provider-id "$KPID" --public-logs --public-sysinfo --env-file input/app.env --no-instance-id --secure-time --prelaunch-script input/prelaunch.sh --swap 512M
(cd out && sha256sum *.json > SHA256SUMS)
rm -f "$CLI"
