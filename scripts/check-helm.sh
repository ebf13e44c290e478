#!/usr/bin/env bash
# Checks the Helm chart in helm/infermesh offline, with no cluster and no helm
# binary:
#   1. lint          - Helm's linter (helm-python-sdk, the Helm v4 Go SDK in a
#                      shared library, strict) with the defaults and each
#                      example values file
#   2. render        - the chart with its default values (must be refused with
#                      the "controlPlane.tls.secretName is required" message:
#                      TLS is not optional), with each
#                      helm/infermesh/examples/values-*.yaml on top of the
#                      defaults, with the values docs/kubernetes.md walks
#                      through, and with a few variants (webhook off, an
#                      external cert-manager issuer, cluster-wide RBAC, ...)
#   3. schemas       - every rendered manifest, and the example Deployments in
#                      helm/infermesh/examples/*-deployment.yaml, against the
#                      Kubernetes OpenAPI schemas of kubernetes-validate
#                      (strict: unknown fields fail), for the oldest Kubernetes
#                      the chart supports and the newest the tool knows.
#                      Custom kinds (ServiceMonitor, PodMonitor, PrometheusRule,
#                      cert-manager Certificate/Issuer) have no schema there:
#                      they are reported and skipped
#   4. consistency   - Service target ports exist on the pods they select,
#                      PDBs/HPAs point at real workloads, every container runs
#                      non-root with a read-only root filesystem and probes,
#                      the webhook configuration selects only labelled pods and
#                      its caBundle signs the serving certificate, and values
#                      that must be refused are refused
# Tools go into a virtual environment in .tools/helm-venv (created if
# missing). Exits non-zero on any failure.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.tools/helm-venv"
HELM_SDK_VERSION="0.2.2"

# integration-tests/tests/webhook.rs runs $venv/bin/kubernetes-validate too.
if ! "$venv/bin/python" -c 'import helm_python, kubernetes_validate' >/dev/null 2>&1 \
  || [ ! -x "$venv/bin/kubernetes-validate" ]; then
  echo "creating $venv (helm-python-sdk==$HELM_SDK_VERSION, kubernetes-validate)" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    "helm-python-sdk==$HELM_SDK_VERSION" kubernetes-validate
fi

exec "$venv/bin/python" - "$root" <<'PY'
import base64
import copy
import os
import shutil
import subprocess
import sys
import tempfile
import warnings

import yaml
import helm_python as helm
import kubernetes_validate

root = sys.argv[1]
chart_dir = os.path.join(root, "helm", "infermesh")
examples = os.path.join(chart_dir, "examples")
RELEASE, NAMESPACE = "infermesh", "infermesh"
# Kinds without a schema in kubernetes-validate: reported, not failed.
CUSTOM_KINDS = {
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PodMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
}
WORKLOADS = {"Deployment", "StatefulSet", "DaemonSet"}

failures = []
skipped = set()


def fail(message):
    failures.append(message)
    print(f"  FAIL {message}")


def load_yaml(path):
    with open(path) as f:
        return yaml.safe_load(f) or {}


def deep_merge(base, override):
    """Helm's coalescing for values files: maps merge, everything else replaces."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def set_path(values, dotted, value):
    out = copy.deepcopy(values)
    node = out
    keys = dotted.split(".")
    for key in keys[:-1]:
        node = node.setdefault(key, {})
    node[keys[-1]] = value
    return out


# Oldest Kubernetes the chart supports (Chart.yaml kubeVersion) and the newest
# the validator has schemas for.
chart_meta = load_yaml(os.path.join(chart_dir, "Chart.yaml"))
available = kubernetes_validate.utils.all_versions()
min_version = chart_meta["kubeVersion"].lstrip(">=").split("-")[0]
min_mm = ".".join(min_version.split(".")[:2])
if not any(kubernetes_validate.utils.major_minor(v) == min_mm for v in available):
    fail(f"kubernetes-validate has no schemas for Kubernetes {min_mm} (Chart.yaml kubeVersion)")
kube_versions = [min_mm, kubernetes_validate.latest_version()]
print(f"helm-python-sdk {helm.__version__} (Helm {helm.helm_sdk_version()}), "
      f"kubernetes-validate {kubernetes_validate.__version__}, schemas of Kubernetes {' and '.join(kube_versions)}")


def validate_object(obj, where):
    api, kind = obj.get("apiVersion"), obj.get("kind")
    name = (obj.get("metadata") or {}).get("name")
    for version in kube_versions:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            if (api, kind) in CUSTOM_KINDS:
                skipped.add(f"{api} {kind}")
                return
            fail(f"{where}: {api} {kind} {name}: no Kubernetes schema (unknown kind or apiVersion) for {version}")
            return
        except kubernetes_validate.ValidationError as error:
            path = "/".join(str(p) for p in error.path)
            fail(f"{where}: {kind} {name}: Kubernetes {version}: {path}: {error.message}")
            return


def render(values):
    with helm.Chart.load(chart_dir) as chart:
        rendered = chart.render(values=values, name=RELEASE, namespace=NAMESPACE, is_install=True)
    objects = []
    for template, text in sorted(rendered.items()):
        if template.endswith("NOTES.txt"):
            continue
        for doc in yaml.safe_load_all(text):
            if doc:
                objects.append((template, doc))
    return objects, rendered


def pod_spec(obj):
    return ((obj.get("spec") or {}).get("template") or {}).get("spec") or {}


def pod_labels(obj):
    return (((obj.get("spec") or {}).get("template") or {}).get("metadata") or {}).get("labels") or {}


def matches(selector, labels):
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def check_consistency(objects, case):
    by_kind = {}
    for _, obj in objects:
        by_kind.setdefault(obj["kind"], []).append(obj)
    workloads = [o for k in WORKLOADS for o in by_kind.get(k, [])]
    names = {(o["kind"], o["metadata"]["name"]) for _, o in objects}

    for w in workloads:
        spec = pod_spec(w)
        wname = f"{w['kind']} {w['metadata']['name']}"
        psc = spec.get("securityContext") or {}
        if psc.get("runAsNonRoot") is not True:
            fail(f"{case}: {wname}: pod securityContext.runAsNonRoot is not true")
        for c in spec.get("containers", []):
            sc = c.get("securityContext") or {}
            if sc.get("readOnlyRootFilesystem") is not True:
                fail(f"{case}: {wname}/{c['name']}: readOnlyRootFilesystem is not true")
            if sc.get("allowPrivilegeEscalation") is not False:
                fail(f"{case}: {wname}/{c['name']}: allowPrivilegeEscalation is not false")
            for probe in ("readinessProbe", "livenessProbe"):
                if probe not in c:
                    fail(f"{case}: {wname}/{c['name']}: no {probe}")
            if not (c.get("resources") or {}).get("requests"):
                fail(f"{case}: {wname}/{c['name']}: no resource requests")
            ports = {p.get("name") for p in c.get("ports", [])}
            for probe in ("readinessProbe", "livenessProbe", "startupProbe"):
                for handler in ("httpGet", "tcpSocket"):
                    port = ((c.get(probe) or {}).get(handler) or {}).get("port")
                    if isinstance(port, str) and port not in ports:
                        fail(f"{case}: {wname}/{c['name']}: {probe} names port {port!r}, not a container port")
            mounts = {m["name"] for m in c.get("volumeMounts", [])}
            volumes = {v["name"] for v in spec.get("volumes", [])}
            claims = {t["metadata"]["name"] for t in (w.get("spec") or {}).get("volumeClaimTemplates", [])}
            for m in mounts - volumes - claims:
                fail(f"{case}: {wname}/{c['name']}: volumeMount {m!r} has no volume")
        if w["kind"] == "Deployment" and "control-plane" in w["metadata"]["name"]:
            sa = spec.get("serviceAccountName")
            if sa and sa != "default" and ("ServiceAccount", sa) not in names:
                fail(f"{case}: {wname}: serviceAccountName {sa!r} is not rendered")

    for svc in by_kind.get("Service", []):
        selector = (svc.get("spec") or {}).get("selector") or {}
        targets = [w for w in workloads if matches(selector, pod_labels(w))]
        if not targets:
            fail(f"{case}: Service {svc['metadata']['name']} selects no workload of the chart")
            continue
        for port in svc["spec"].get("ports", []):
            target = port.get("targetPort")
            if isinstance(target, str):
                for w in targets:
                    names_ = {p.get("name") for c in pod_spec(w).get("containers", []) for p in c.get("ports", [])}
                    if target not in names_:
                        fail(f"{case}: Service {svc['metadata']['name']} targetPort {target!r} is not a port of {w['kind']} {w['metadata']['name']}")

    for pdb in by_kind.get("PodDisruptionBudget", []):
        selector = (pdb["spec"].get("selector") or {}).get("matchLabels") or {}
        if not any(matches(selector, pod_labels(w)) for w in workloads):
            fail(f"{case}: PodDisruptionBudget {pdb['metadata']['name']} selects no workload")
    for hpa in by_kind.get("HorizontalPodAutoscaler", []):
        ref = hpa["spec"]["scaleTargetRef"]
        target = [w for w in workloads if w["kind"] == ref["kind"] and w["metadata"]["name"] == ref["name"]]
        if not target:
            fail(f"{case}: HPA {hpa['metadata']['name']} targets a missing {ref['kind']} {ref['name']}")
        elif "replicas" in target[0]["spec"]:
            fail(f"{case}: {ref['kind']} {ref['name']} sets replicas although an HPA scales it")

    for binding in by_kind.get("RoleBinding", []) + by_kind.get("ClusterRoleBinding", []):
        ref = binding["roleRef"]
        if (ref["kind"], ref["name"]) not in names:
            fail(f"{case}: {binding['kind']} {binding['metadata']['name']} refers to a missing {ref['kind']} {ref['name']}")

    for mwc in by_kind.get("MutatingWebhookConfiguration", []):
        for hook in mwc["webhooks"]:
            selector = (hook.get("objectSelector") or {}).get("matchLabels") or {}
            if selector != {"infermesh.io/inject": "true"}:
                fail(f"{case}: webhook {hook['name']}: objectSelector is {selector}, not infermesh.io/inject=true")
            svc_ref = hook["clientConfig"]["service"]
            svcs = [s for s in by_kind.get("Service", []) if s["metadata"]["name"] == svc_ref["name"]]
            if not svcs:
                fail(f"{case}: webhook {hook['name']}: Service {svc_ref['name']} is not rendered")
                continue
            if svc_ref.get("path") != "/mutate":
                fail(f"{case}: webhook {hook['name']}: path is {svc_ref.get('path')}, not /mutate")
            if not any(p["port"] == svc_ref.get("port", 443) and p.get("targetPort") == "webhook" for p in svcs[0]["spec"]["ports"]):
                fail(f"{case}: webhook {hook['name']}: Service {svc_ref['name']} has no port {svc_ref.get('port', 443)} -> webhook")
            if hook.get("failurePolicy") not in ("Fail", "Ignore"):
                fail(f"{case}: webhook {hook['name']}: failurePolicy {hook.get('failurePolicy')}")
            injected = (mwc["metadata"].get("annotations") or {}).get("cert-manager.io/inject-ca-from")
            bundle = hook["clientConfig"].get("caBundle")
            if injected:
                ns, cert_name = injected.split("/")
                if ("Certificate", cert_name) not in names:
                    fail(f"{case}: inject-ca-from names a missing Certificate {cert_name}")
            elif not bundle:
                fail(f"{case}: webhook {hook['name']}: no caBundle and no cert-manager injection")
            else:
                check_generated_cert(case, by_kind, svcs[0], bundle)


def check_generated_cert(case, by_kind, svc, bundle):
    secrets = [s for s in by_kind.get("Secret", []) if s.get("type") == "kubernetes.io/tls" and "webhook" in s["metadata"]["name"]]
    if len(secrets) != 1:
        fail(f"{case}: expected one generated webhook Secret, found {len(secrets)}")
        return
    data = secrets[0]["data"]
    if data.get("ca.crt") != bundle:
        fail(f"{case}: caBundle differs from the Secret's ca.crt")
    openssl = shutil.which("openssl")
    if not openssl:
        print("  note: openssl not found; the generated certificate's chain is not checked")
        return
    host = f"{svc['metadata']['name']}.{svc['metadata']['namespace']}.svc"
    with tempfile.TemporaryDirectory() as tmp:
        for key in ("ca.crt", "tls.crt", "tls.key"):
            with open(os.path.join(tmp, key), "wb") as f:
                f.write(base64.b64decode(data[key]))
        verify = subprocess.run(
            [openssl, "verify", "-CAfile", os.path.join(tmp, "ca.crt"), "-verify_hostname", host,
             "-purpose", "sslserver", os.path.join(tmp, "tls.crt")],
            capture_output=True, text=True)
        if verify.returncode != 0:
            fail(f"{case}: the webhook certificate does not verify for {host} against caBundle: {verify.stdout.strip()} {verify.stderr.strip()}")
        pub_cert = subprocess.run([openssl, "x509", "-noout", "-pubkey", "-in", os.path.join(tmp, "tls.crt")], capture_output=True, text=True).stdout
        pub_key = subprocess.run([openssl, "pkey", "-pubout", "-in", os.path.join(tmp, "tls.key")], capture_output=True, text=True).stdout
        if not pub_cert or pub_cert != pub_key:
            fail(f"{case}: tls.key does not belong to tls.crt")


defaults = load_yaml(os.path.join(chart_dir, "values.yaml"))
example_values = sorted(
    f for f in os.listdir(examples) if f.startswith("values-") and f.endswith((".yaml", ".yml"))
)
if not example_values:
    fail("no helm/infermesh/examples/values-*.yaml")

# 1. lint
print("== lint")
# Lint renders leniently (`required` and `fail` only log), so the defaults
# lint cleanly; their refusal is checked under "render" below. The library
# logs those to stderr itself; they are silenced for the defaults.
for name in ["(defaults)"] + example_values:
    values = {} if name == "(defaults)" else load_yaml(os.path.join(examples, name))
    saved = os.dup(2)
    if name == "(defaults)":
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 2)
        os.close(devnull)
    try:
        report = helm.lint(chart_dir, values, namespace=NAMESPACE, strict=True, kube_version=f"v{min_version}")
    finally:
        os.dup2(saved, 2)
        os.close(saved)
    problems = [m for m in report.get("messages", []) if m.get("severity", 0) >= 2]
    for m in problems:
        fail(f"lint ({name}): {m.get('path')}: {m.get('error')}")
    for e in report.get("errors", []) or []:
        fail(f"lint ({name}): {e}")
    if not problems and not report.get("errors"):
        print(f"  ok   {name}")

# 2 + 3 + 4. render, validate, check
print("== render + validate")
try:
    render({})
    fail("defaults: rendered, but must be refused until controlPlane.tls.secretName (or insecurePlaintext) is set")
except helm.HelmError as error:
    if "controlPlane.tls.secretName is required" in str(error):
        print("  ok   defaults: refused as intended (controlPlane.tls.secretName is required)")
    else:
        fail(f"defaults: refused for another reason: {error}")

cases = []
for name in example_values:
    cases.append((name, load_yaml(os.path.join(examples, name))))
# The values file docs/kubernetes.md walks through (its "# my-values.yaml" block).
docs = os.path.join(root, "docs", "kubernetes.md")
if os.path.exists(docs):
    text = open(docs).read()
    blocks = [b.split("```", 1)[0] for b in text.split("```yaml\n")[1:]]
    walkthrough = [b for b in blocks if b.startswith("# my-values.yaml")]
    if len(walkthrough) == 1:
        cases.append(("docs/kubernetes.md my-values.yaml", yaml.safe_load(walkthrough[0])))
    else:
        fail("docs/kubernetes.md: expected one ```yaml block starting with '# my-values.yaml'")
vllm = load_yaml(os.path.join(examples, "values-vllm.yaml"))
sglang = load_yaml(os.path.join(examples, "values-sglang.yaml"))
cases += [
    ("values-vllm.yaml + webhook.enabled=false", set_path(vllm, "webhook.enabled", False)),
    ("values-vllm.yaml + etcd.tls.clientCertificate=false", set_path(vllm, "etcd.tls.clientCertificate", False)),
    ("values-vllm.yaml + controlPlane.serviceAccount.create=false, rbac.create=false",
     set_path(set_path(vllm, "controlPlane.serviceAccount.create", False), "rbac.create", False)),
    ("values-sglang.yaml + webhook.certManager.issuerRef (ClusterIssuer)",
     set_path(sglang, "webhook.certManager.issuerRef", {"name": "corp-ca", "kind": "ClusterIssuer", "group": "cert-manager.io"})),
    ("values-sglang.yaml + rbac.clusterWideScale=false, scaleNamespaces=[team-a, team-b]",
     set_path(set_path(sglang, "rbac.clusterWideScale", False), "rbac.scaleNamespaces", ["team-a", "team-b"])),
    ("values-dev.yaml + monitoring on", set_path(load_yaml(os.path.join(examples, "values-dev.yaml")), "monitoring.serviceMonitor.enabled", True)),
]
# Identities issued by the control plane: edges and injected sidecars trade
# their pods' service-account tokens for certificates, mutual TLS between them.
issued = vllm
for path, value in [
    ("controlPlane.identity.caSecretName", "infermesh-mesh-ca"),
    ("controlPlane.identity.tokenReview", True),
    ("controlPlane.tls.allowUnboundSidecars", False),
    ("webhook.sidecar.identity", "issued"),
    ("edge.identity", "issued"),
    ("edge.upstreamTls", "mutual"),
]:
    issued = set_path(issued, path, value)
cases.append(("values-vllm.yaml + issued identities, mutual TLS", issued))
for case, values in cases:
    try:
        objects, _ = render(values)
    except helm.HelmError as error:
        fail(f"{case}: render failed: {error}")
        continue
    before = len(failures)
    for template, obj in objects:
        validate_object(obj, f"{case} [{template}]")
    check_consistency(objects, case)
    kinds = sorted({o["kind"] for _, o in objects})
    if len(failures) == before:
        print(f"  ok   {case}: {len(objects)} objects ({', '.join(kinds)})")

# Values the chart must refuse, each with its message.
print("== refused values")
refusals = [
    ("bundled etcd with etcd TLS", set_path(sglang, "etcd.tls.secretName", "x"), "TLS applies to an external etcd only"),
    ("http:// endpoint with etcd TLS", set_path(vllm, "etcd.endpoints", ["http://etcd:2379"]), "must be an https:// URL"),
    ("failurePolicy Maybe", set_path(vllm, "webhook.failurePolicy", "Maybe"), "must be Fail or Ignore"),
    ("webhook without the sidecar's TLS Secret", set_path(vllm, "webhook.sidecar.tlsSecretName", ""), "webhook.sidecar.tlsSecretName is required"),
    ("sidecar TLS with a plaintext control plane", set_path(load_yaml(os.path.join(examples, "values-dev.yaml")), "webhook.sidecar.tlsSecretName", "x"), "sidecars cannot use TLS"),
    ("even-sized bundled etcd", set_path(sglang, "etcd.bundled.replicas", 2), "must be 1, 3 or 5"),
    ("podAntiAffinity sometimes", set_path(vllm, "controlPlane.podAntiAffinity", "sometimes"), "must be soft, hard or none"),
    ("HPA with minReplicas > maxReplicas", set_path(vllm, "edge.autoscaling.minReplicas", 20), "must be at least 1 and at most maxReplicas"),
    ("webhook port = metrics port", set_path(vllm, "webhook.port", 9090), "webhook.port"),
    ("a namespace name with capitals", set_path(vllm, "rbac.scaleNamespaces", ["Inference"]), "is not a namespace name"),
    ("an unknown scale actuator", set_path(vllm, "controlPlane.autoscaler.actuator", "keda"), "must be none or kubernetes"),
    ("a 50 ms autoscaling interval", set_path(vllm, "controlPlane.autoscaler.intervalMs", 50), "outside 100-300000"),
    ("token review without a CA", set_path(issued, "controlPlane.identity.caSecretName", ""), "set controlPlane.identity.caSecretName"),
    ("issued sidecars without token review", set_path(set_path(issued, "controlPlane.identity.tokenReview", False), "edge.identity", "certificate"), "set controlPlane.identity.tokenReview=true"),
    ("issued edges without token review", set_path(set_path(issued, "controlPlane.identity.tokenReview", False), "webhook.sidecar.identity", "shared"), "edge.identity=issued"),
    ("an unknown sidecar identity", set_path(issued, "webhook.sidecar.identity", "borrowed"), "must be shared or issued"),
]
for case, values, message in refusals:
    try:
        render(values)
        fail(f"{case}: rendered, but must be refused ({message})")
    except helm.HelmError as error:
        if message in str(error):
            print(f"  ok   {case}")
        else:
            fail(f"{case}: refused with another message: {error}")

# Example workloads outside the chart.
print("== example Deployments")
for name in sorted(os.listdir(examples)):
    if not name.endswith("-deployment.yaml"):
        continue
    with open(os.path.join(examples, name)) as f:
        docs = [d for d in yaml.safe_load_all(f) if d]
    before = len(failures)
    for obj in docs:
        validate_object(obj, name)
        if obj.get("kind") == "Deployment":
            meta = obj["spec"]["template"]["metadata"]
            if (meta.get("labels") or {}).get("infermesh.io/inject") != "true":
                fail(f"{name}: the pod template lacks the label infermesh.io/inject: \"true\"")
            notes = meta.get("annotations") or {}
            for key in ("infermesh.io/model", "infermesh.io/pool", "infermesh.io/region"):
                if not notes.get(key):
                    fail(f"{name}: the pod template lacks the annotation {key}")
            engine = notes.get("infermesh.io/engine", "vllm")
            if engine not in ("vllm", "sglang"):
                fail(f"{name}: infermesh.io/engine {engine!r} is not vllm or sglang")
            port = int(notes.get("infermesh.io/engine-port", "8000"))
            ports = {p["containerPort"] for c in obj["spec"]["template"]["spec"]["containers"] for p in c.get("ports", [])}
            if port not in ports:
                fail(f"{name}: infermesh.io/engine-port {port} is not a container port of the engine")
            if {8081, 9091} & ports:
                fail(f"{name}: ports 8081/9091 belong to the injected sidecar")
            grace = obj["spec"]["template"]["spec"].get("terminationGracePeriodSeconds", 30)
            if grace <= 40:
                fail(f"{name}: terminationGracePeriodSeconds {grace} is not above the sidecar's drain (10) + grace (30)")
    if len(failures) == before:
        print(f"  ok   {name}")

if skipped:
    print(f"note: no schema for custom kinds, skipped: {', '.join(sorted(skipped))}")
if failures:
    print(f"\n{len(failures)} failure(s)")
    sys.exit(1)
print("\nhelm chart OK")
PY
