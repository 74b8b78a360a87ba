#!/usr/bin/env bash
# Mints a kubeconfig for nightcrier's triage agent: the nightcrier-triage ServiceAccount of
# deploy/kubernetes/triage-identity.yaml, with a token of bounded lifetime from the TokenRequest API
# (`kubectl create token`, Kubernetes >= 1.24), and the cluster's address and CA taken from the
# current (or named) context of the caller's own kubeconfig.
#
#   deploy/mint-kubeconfig.sh --output /etc/nightcrier/kube/prod.kubeconfig [--context CTX]
#                             [--duration 24h] [--namespace nightcrier]
#                             [--service-account nightcrier-triage]
#
# The file is written mode 0600 and the token never appears on a command line. The API server may
# cap the lifetime below --duration (its --service-account-max-token-expiration); mint again, e.g.
# from a systemd timer, before it runs out -- nightcrier reads the file for every agent it starts.
set -euo pipefail

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

output="" context="" duration=24h namespace=nightcrier account=nightcrier-triage
while [ $# -gt 0 ]; do
    case "$1" in
        --output) output=${2:-}; shift 2 ;;
        --context) context=${2:-}; shift 2 ;;
        --duration) duration=${2:-}; shift 2 ;;
        --namespace) namespace=${2:-}; shift 2 ;;
        --service-account) account=${2:-}; shift 2 ;;
        -h|--help) usage ;;
        *) echo "mint-kubeconfig: unknown argument: $1" >&2; usage ;;
    esac
done
[ -n "$output" ] || { echo "mint-kubeconfig: --output FILE is required" >&2; usage; }

kubectl_ctx=(kubectl)
[ -n "$context" ] && kubectl_ctx+=(--context "$context")

view() {
    "${kubectl_ctx[@]}" config view --minify --raw -o "jsonpath=$1"
}

server=$(view '{.clusters[0].cluster.server}')
[ -n "$server" ] || { echo "mint-kubeconfig: the kubeconfig names no API server for this context" >&2; exit 1; }
ca_data=$(view '{.clusters[0].cluster.certificate-authority-data}')
if [ -z "$ca_data" ]; then
    ca_file=$(view '{.clusters[0].cluster.certificate-authority}')
    [ -n "$ca_file" ] && ca_data=$(base64 -w0 <"$ca_file")
fi
token=$("${kubectl_ctx[@]}" create token "$account" --namespace "$namespace" --duration "$duration")
[ -n "$token" ] || { echo "mint-kubeconfig: kubectl create token returned nothing" >&2; exit 1; }

cluster_lines="    server: $server"
if [ -n "$ca_data" ]; then
    cluster_lines+=$'\n'"    certificate-authority-data: $ca_data"
fi

umask 077
tmp=$(mktemp "$output.XXXXXX")
trap 'rm -f "$tmp"' EXIT
cat >"$tmp" <<KUBECONFIG
apiVersion: v1
kind: Config
clusters:
- name: triage
  cluster:
$cluster_lines
users:
- name: $account
  user:
    token: $token
contexts:
- name: triage
  context:
    cluster: triage
    user: $account
    namespace: $namespace
current-context: triage
KUBECONFIG
mv "$tmp" "$output"
trap - EXIT
echo "mint-kubeconfig: wrote $output ($account in $namespace, token lifetime $duration)" >&2
