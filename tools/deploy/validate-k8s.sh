#!/usr/bin/env bash
# Validates the Kubernetes manifests of docker/k8s without a cluster:
#  1. every .yaml file with `kubernetes-validate --strict` (unknown fields are errors) against the
#     oldest supported Kubernetes (1.29) and the newest the tool knows. That tool only has schemas
#     for built-in kinds: for a custom resource or a kustomization it prints a WARN and passes, so
#     here such a WARN fails unless the kind is one of the three expected below;
#  2. the custom resources (KEDA ScaledObject, Prometheus operator ServiceMonitor) against their
#     CRDs' own schemas (docker/k8s/crd-schemas/, copied from the projects' releases), strictly;
#  3. `kubectl kustomize` (kustomize built into kubectl) builds docker/k8s and the alternative,
#     and the built output (generated ConfigMaps, namespace, image set) goes through 1 and 2 again.
#     Skipped, and said so, where kubectl is missing.
# Not checked here: that a cluster accepts them (nothing is applied), nginx's parsing of the
# gateway config, the images themselves. tests/deploy_k8s.rs checks how the files fit together.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$root"
venv="$(bash tools/deploy/venv.sh)"
py="$venv/bin/python"
kv="$venv/bin/kubernetes-validate"
oldest=1.29.0
latest="$("$py" -c 'import kubernetes_validate.utils as u; print(u.latest_version())')"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

mapfile -t files < <(find docker/k8s -name '*.yaml' | sort)
[ "${#files[@]}" -gt 0 ] || { echo "no manifests under docker/k8s" >&2; exit 1; }

# Runs kubernetes-validate --strict on the given files for both versions; fails on any ERROR and
# on any WARN other than "no schema" for the expected custom kinds.
validate_builtin() {
    local version out rc=0
    for version in "$oldest" "$latest"; do
        out="$("$kv" --strict -k "$version" "$@" 2>&1)" || rc=1
        KV_OUT="${out//$work\//built:}" KV_VERSION="$version" "$py" - <<'EOF' || rc=1
import os, re, sys
allowed = {
    ("Kustomization", "kustomize.config.k8s.io/v1beta1"): "kustomize's file: built below",
    ("ScaledObject", "keda.sh/v1alpha1"): "custom resource: checked against its CRD below",
    ("ServiceMonitor", "monitoring.coreos.com/v1"): "custom resource: checked against its CRD below",
}
version, bad, passed, custom = os.environ["KV_VERSION"], 0, 0, 0
for line in os.environ["KV_OUT"].splitlines():
    m = re.match(r"WARN (\S+) Couldn't find schema for kind (\S+) with api version (\S+)", line)
    if line.startswith("INFO ") and " passed for resource " in line:
        passed += 1
        words = line.split()
        print(f"  ok   {version}: {words[1]} {words[5]}")
    elif m and (m.group(2), m.group(3)) in allowed:
        custom += 1
        print(f"  --   {version}: {m.group(1)} {m.group(2)}: no schema in kubernetes-validate "
              f"({allowed[(m.group(2), m.group(3))]})")
    else:
        bad += 1
        print(f"  FAIL {version}: {line}")
print(f"kubernetes-validate --strict {version}: {passed} resources passed, {custom} without "
      f"a schema there, {bad} failures")
sys.exit(1 if bad or passed == 0 else 0)
EOF
    done
    return "$rc"
}

# Validates ScaledObject and ServiceMonitor documents in the given files against the CRD schemas,
# with unknown fields rejected (as the API server's strict field validation does).
validate_custom() {
    WORK="$work" "$py" - "$@" <<'EOF'
import glob, json, os, sys, yaml, jsonschema

def label(path):
    return path.replace(os.environ["WORK"] + "/", "built:")

def strict(node):
    if isinstance(node, dict):
        if (node.get("type") == "object" and "properties" in node
                and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            node["additionalProperties"] = False
        for v in node.values():
            strict(v)
    elif isinstance(node, list):
        for v in node:
            strict(v)
    return node

schemas = {}
for path in glob.glob("docker/k8s/crd-schemas/*.json"):
    doc = json.load(open(path))
    key = (doc["kind"], f'{doc["group"]}/{doc["version"]}')
    schemas[key] = (path, strict(doc["openAPIV3Schema"]))
bad = checked = 0
for path in sys.argv[1:]:
    for doc in yaml.safe_load_all(open(path)):
        if not doc:
            continue
        key = (doc.get("kind"), doc.get("apiVersion"))
        if key not in schemas or key[0] not in ("ScaledObject", "ServiceMonitor"):
            continue
        checked += 1
        errors = list(jsonschema.Draft7Validator(schemas[key][1]).iter_errors(doc))
        for e in errors:
            print(f"  FAIL {label(path)} {key[0]}: {'.'.join(map(str, e.path))}: {e.message}")
        if errors:
            bad += 1
        else:
            print(f"  ok   {label(path)} {key[0]}/{doc['metadata']['name']} against {schemas[key][0]}")
print(f"CRD schemas (strict): {checked} custom resources checked, {bad} failures")
sys.exit(1 if bad or checked == 0 else 0)
EOF
}

status=0
echo "== kubernetes-validate --strict, Kubernetes $oldest and $latest: ${#files[@]} files"
validate_builtin "${files[@]}" || status=1
echo "== custom resources against their CRDs"
validate_custom "${files[@]}" || status=1

if command -v kubectl >/dev/null 2>&1; then
    echo "== kubectl kustomize ($(kubectl version --client 2>/dev/null | grep -i kustomize || echo 'kustomize'))"
    for dir in docker/k8s docker/k8s/alternatives/prometheus-adapter; do
        out="$work/$(echo "$dir" | tr / _).yaml"
        if kubectl kustomize "$dir" >"$out"; then
            echo "  ok   built $dir ($(grep -c '^kind:' "$out") resources)"
            validate_builtin "$out" || status=1
            if grep -q '^kind: \(ScaledObject\|ServiceMonitor\)' "$out"; then
                validate_custom "$out" || status=1
            fi
        else
            echo "  FAIL kubectl kustomize $dir"
            status=1
        fi
    done
else
    echo "== kubectl kustomize: SKIPPED (no kubectl here; the kustomizations were not built)"
fi

if [ "$status" -eq 0 ]; then
    echo "validate-k8s: all checks passed"
else
    echo "validate-k8s: FAILED" >&2
fi
exit "$status"
