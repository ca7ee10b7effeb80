#!/usr/bin/env python3
"""Checks the Kubernetes manifests in deploy/kubernetes/ (CI runs it; so can you).

1. Every core resource (and the Secret example) is valid against the Kubernetes
   OpenAPI schemas bundled by `kubernetes-validate`, in strict mode (an unknown or
   misspelt field is an error), for each Kubernetes version in --kubernetes-versions;
   KEDA's resources against the schemas of KEDA's CRDs (scripts/kubernetes-schemas/),
   strict too.
2. The values that must agree do: ports, probe paths, grace periods, queue names,
   secret keys, and every JELOU_WORKER__<SECTION>__<KEY> variable names a key the
   worker knows. What the worker knows is read at run time from the repository:
   the keys (and defaults) from config/default.toml, which documents every key
   (commented-out ones included), and the HTTP paths from src/server.rs.
3. When kubectl is installed, `kubectl kustomize` builds the directory into the same
   set of resources.
4. With --worker PATH, the real binary runs with the pod's environment against a
   broker: it must accept every value, answer the probes and stop on SIGTERM in time.

    pip install kubernetes-validate pyyaml     # once
    python3 scripts/check_kubernetes.py        # exit 0: valid and consistent
    python3 scripts/check_kubernetes.py --worker target/debug/jelou-worker

Its own tests: python3 -B -m unittest discover -s scripts -p 'test_check_kubernetes.py'
"""

from __future__ import annotations

import argparse
import copy
import ipaddress
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
ENV_PREFIX = "JELOU_WORKER"
# Variables the worker reads that are not configuration keys.
OTHER_ENV = {"RUST_LOG", "JELOU_WORKER_CONFIG"}
# Keys whose values are secrets (or hold one): from the Secret, never inline. `run`
# needs all three (the default amqp.url is a local guest account).
SECRET_KEYS = {"amqp.url", "jelou.client_id", "jelou.client_secret"}
# After shutdown.grace_period_ms the worker hands the remaining jobs back (up to 2 s,
# src/worker.rs `drain`), flushes its acks and closes the connection: the pod's
# terminationGracePeriodSeconds must leave at least this much on top.
STOP_MARGIN_S = 10
# Peak RSS measured by the benchmark at prefetch 64 (README, Performance: 19.8 to
# 22.4 MiB) before counting what large jobs hold in memory.
MEASURED_BASE_RSS_MIB = 22.4
DEFAULT_K8S_VERSIONS = "1.30,1.37"
# Custom resources (KEDA's), which kubernetes-validate has no schema for: validated
# against the CRDs' own schemas, kept in scripts/kubernetes-schemas/.
CUSTOM_GROUPS = {"keda.sh"}
CUSTOM_SCHEMAS = Path(__file__).resolve().parent / "kubernetes-schemas"
# The parameters of KEDA's RabbitMQ scaler (v2.20, pkg/scalers/rabbitmq_scaler.go):
# those it reads from a trigger's metadata, and those a TriggerAuthentication may give.
RABBITMQ_METADATA = {
    "queueName", "mode", "queueLength", "value", "activationValue", "host", "hostFromEnv",
    "protocol", "vhostName", "useRegex", "excludeUnacknowledged", "pageSize", "operation",
    "timeout", "unsafeSsl",
}
RABBITMQ_AUTH_PARAMETERS = {
    "host", "protocol", "vhostName", "username", "password", "ca", "cert", "key",
    "keyPassword", "tls", "workloadIdentityResource",
}


@dataclass
class Worker:
    """What the worker knows, read from the repository."""

    keys: set[str]  # "section.key"
    defaults: dict[str, object]  # "section.key" -> default (active keys only)
    routes: set[str]  # HTTP paths served on server.listen

    @staticmethod
    def from_repo(root: Path = REPO) -> "Worker":
        return Worker.from_sources(
            (root / "config/default.toml").read_text(),
            (root / "src/server.rs").read_text(),
        )

    @staticmethod
    def from_sources(default_toml: str, server_rs: str) -> "Worker":
        defaults = {
            f"{section}.{key}": value
            for section, table in tomllib.loads(default_toml).items()
            if isinstance(table, dict)
            for key, value in table.items()
        }
        # Keys documented but commented out (no default, e.g. jelou.client_secret).
        keys = set(defaults)
        section = None
        for line in default_toml.splitlines():
            line = line.strip()
            if m := re.fullmatch(r"\[([a-z0-9_]+)\]", line):
                section = m.group(1)
            elif section and (m := re.match(r"#\s*([a-z][a-z0-9_]*)\s*=", line)):
                keys.add(f"{section}.{m.group(1)}")
        routes = set(re.findall(r'\.route\(\s*"(/[^"]*)"', server_rs))
        return Worker(keys=keys, defaults=defaults, routes=routes)


@dataclass
class Manifests:
    directory: Path
    kustomization: dict
    objects: list[dict]  # the resources kustomization.yaml lists, in order
    secret: dict  # secret.example.yaml
    files: dict[str, list[dict]] = field(default_factory=dict)

    @staticmethod
    def load(directory: Path) -> "Manifests":
        kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
        files, objects = {}, []
        for name in kustomization.get("resources", []):
            docs = [d for d in yaml.safe_load_all((directory / name).read_text()) if d]
            files[name] = docs
            objects.extend(docs)
        secret = yaml.safe_load((directory / "secret.example.yaml").read_text())
        return Manifests(directory, kustomization, objects, secret, files)

    def all_objects(self) -> list[dict]:
        return self.objects + [self.secret]


def env_to_key(name: str) -> str | None:
    """JELOU_WORKER__AMQP__PREFETCH -> amqp.prefetch; None if not of that form."""
    parts = name.split("__")
    if len(parts) != 3 or parts[0] != ENV_PREFIX or not all(parts[1:]):
        return None
    return f"{parts[1].lower()}.{parts[2].lower()}"


def quantity(q: object) -> float:
    """A Kubernetes quantity as a number (cores, or bytes)."""
    s = str(q)
    units = {
        "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12,
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40,
    }
    for unit in sorted(units, key=len, reverse=True):
        if s.endswith(unit):
            return float(s[: -len(unit)]) * units[unit]
    return float(s)


def one(objects: list[dict], kind: str, errors: list[str]) -> dict:
    found = [o for o in objects if o.get("kind") == kind]
    if len(found) != 1:
        errors.append(f"expected exactly one {kind} in kustomization.yaml's resources, found {len(found)}")
        return {}
    return found[0]


def get(obj: object, *path: object, default: object = None) -> object:
    for p in path:
        if isinstance(obj, dict) and p in obj:
            obj = obj[p]
        elif isinstance(obj, list) and isinstance(p, int) and p < len(obj):
            obj = obj[p]
        else:
            return default
    return obj


def consistency_errors(m: Manifests, w: Worker) -> list[str]:
    """Every way the manifests disagree with each other or with the worker."""
    errors: list[str] = []
    err = errors.append
    deployment = one(m.objects, "Deployment", errors)
    configmap = one(m.objects, "ConfigMap", errors)
    service = one(m.objects, "Service", errors)
    pdb = one(m.objects, "PodDisruptionBudget", errors)
    scaled = one(m.objects, "ScaledObject", errors)
    trigger_auth = one(m.objects, "TriggerAuthentication", errors)
    if any(o.get("kind") == "Secret" for o in m.objects):
        err("a Secret is listed in kustomization.yaml: `apply -k` would overwrite the real credentials")
    if not deployment:
        return errors

    secret_name = get(m.secret, "metadata", "name")
    secret_keys = set(get(m.secret, "stringData", default={}) or {}) | set(
        get(m.secret, "data", default={}) or {}
    )
    used_secret_keys: set[str] = set()

    def secret_ref(where: str, name: object, key: object) -> None:
        if name != secret_name:
            err(f"{where}: refers to Secret {name!r}, but the example Secret is {secret_name!r}")
        elif key not in secret_keys:
            err(f"{where}: key {key!r} is not in secret.example.yaml (it has {sorted(secret_keys)})")
        used_secret_keys.add(str(key))

    pod = get(deployment, "spec", "template", "spec", default={})
    containers = get(pod, "containers", default=[]) or []
    if len(containers) != 1:
        err(f"Deployment: expected one container, found {len(containers)}")
        return errors
    c = containers[0]
    name = f"Deployment {get(deployment, 'metadata', 'name')}, container {c.get('name')}"

    # --- The configuration the worker will run with ----------------------------------
    config: dict[str, object] = dict(w.defaults)
    from_secret: set[str] = set()

    def known(where: str, env: str) -> str | None:
        if env in OTHER_ENV:
            return None
        key = env_to_key(env)
        if key is None:
            err(f"{where}: {env} is not of the form {ENV_PREFIX}__<SECTION>__<KEY>")
        elif key not in w.keys:
            err(f"{where}: {env} names {key}, which is not a key of config/default.toml")
        return key

    cm_name = get(configmap, "metadata", "name")
    for env_from in c.get("envFrom", []) or []:
        ref = env_from.get("configMapRef")
        if ref is None or ref.get("name") != cm_name or env_from.get("prefix"):
            err(f"{name}: envFrom must take the ConfigMap {cm_name!r} as it is (got {env_from})")
    if not any(get(e, "configMapRef", "name") == cm_name for e in c.get("envFrom", []) or []):
        err(f"{name}: the ConfigMap {cm_name!r} is not in envFrom")
    for env, value in (get(configmap, "data", default={}) or {}).items():
        key = known(f"ConfigMap {cm_name}", env)
        if key in SECRET_KEYS:
            err(f"ConfigMap {cm_name}: {env} is a secret: it belongs in the Secret")
        if key:
            config[key] = value
    for e in c.get("env", []) or []:
        env = e.get("name", "")
        key = known(name, env)
        if "value" in e:
            if key in SECRET_KEYS:
                err(f"{name}: {env} is a secret given inline: use valueFrom.secretKeyRef")
            if key:
                config[key] = e["value"]
        elif ref := get(e, "valueFrom", "secretKeyRef"):
            secret_ref(f"{name}: {env}", ref.get("name"), ref.get("key"))
            if key:
                from_secret.add(key)
                config[key] = "<secret>"
        elif ref := get(e, "valueFrom", "configMapKeyRef"):
            data = get(configmap, "data", default={}) or {}
            if ref.get("name") != cm_name or ref.get("key") not in data:
                err(f"{name}: {env} refers to a ConfigMap key that does not exist")
            elif key:
                config[key] = data[ref["key"]]
    for key in sorted(SECRET_KEYS - from_secret):
        env = f"{ENV_PREFIX}__{key.replace('.', '__').upper()}"
        err(f"{name}: {env} must come from the Secret by secretKeyRef ({key} is a secret, or holds one)")

    # --- Command, ports, probes -----------------------------------------------------
    if (c.get("args") or c.get("command", [])[1:]) != ["run"]:
        err(f"{name}: the worker must be started with `run` (args: [run])")
    listen = str(config.get("server.listen", ""))
    host, _, port_s = listen.rpartition(":")
    port = int(port_s) if port_s.isdigit() else None
    try:
        unspecified = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        unspecified = False
    if not unspecified:
        err(f"server.listen is {listen!r}: it must listen on 0.0.0.0 (or [::]) to be probed and scraped")
    ports = {p.get("name"): p.get("containerPort") for p in c.get("ports", []) or []}
    if port not in ports.values():
        err(f"{name}: no containerPort is server.listen's port {port} (ports: {ports})")

    def resolve(p: object) -> object:
        return ports.get(p, "<no such port name>") if isinstance(p, str) else p

    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        http = get(c, probe, "httpGet")
        if not http:
            err(f"{name}: {probe} must be an httpGet on {path}")
            continue
        if path not in w.routes:
            err(f"src/server.rs no longer serves {path}: update {probe}")
        if http.get("path") != path:
            err(f"{name}: {probe} path is {http.get('path')!r}, must be {path!r}")
        if resolve(http.get("port")) != port:
            err(f"{name}: {probe} port {http.get('port')!r} is not server.listen's port {port}")

    annotations = get(deployment, "spec", "template", "metadata", "annotations", default={}) or {}
    if annotations.get("prometheus.io/scrape") != "true":
        err("Deployment: the pod template lacks prometheus.io/scrape: \"true\"")
    if str(annotations.get("prometheus.io/port")) != str(port):
        err(f"Deployment: prometheus.io/port is {annotations.get('prometheus.io/port')!r}, server.listen's port is {port}")
    metrics_path = annotations.get("prometheus.io/path", "/metrics")
    if metrics_path not in w.routes:
        err(f"Deployment: prometheus.io/path {metrics_path!r} is not served by src/server.rs")

    # --- Labels and selectors -------------------------------------------------------
    labels = get(deployment, "spec", "template", "metadata", "labels", default={}) or {}

    def selects(selector: object, what: str) -> None:
        if not selector or any(labels.get(k) != v for k, v in dict(selector).items()):
            err(f"{what}: selector {selector} does not select the Deployment's pods {labels}")

    selects(get(deployment, "spec", "selector", "matchLabels"), "Deployment")
    if service:
        selects(get(service, "spec", "selector"), "Service")
        for p in get(service, "spec", "ports", default=[]) or []:
            if resolve(p.get("targetPort", p.get("port"))) != port:
                err(f"Service: targetPort {p.get('targetPort')!r} is not server.listen's port {port}")
    if pdb:
        selects(get(pdb, "spec", "selector", "matchLabels"), "PodDisruptionBudget")

    # --- Stopping --------------------------------------------------------------------
    grace_ms = int(config.get("shutdown.grace_period_ms", 0))
    tgps = pod.get("terminationGracePeriodSeconds", 30)
    if tgps < grace_ms / 1000 + STOP_MARGIN_S:
        err(
            f"Deployment: terminationGracePeriodSeconds {tgps} must be at least "
            f"shutdown.grace_period_ms ({grace_ms} ms) + {STOP_MARGIN_S} s, or Kubernetes "
            "kills workers that are still draining"
        )

    request_ms = int(config.get("jelou.request_timeout_ms", 0))
    if request_ms > grace_ms:
        err(
            f"jelou.request_timeout_ms ({request_ms}) exceeds shutdown.grace_period_ms ({grace_ms}): "
            "an attempt under way at SIGTERM could be cut off and its job sent again"
        )

    # --- Hardening and resources -----------------------------------------------------
    psc, csc = pod.get("securityContext", {}) or {}, c.get("securityContext", {}) or {}
    if not (csc.get("runAsNonRoot", psc.get("runAsNonRoot")) is True):
        err(f"{name}: runAsNonRoot must be true")
    if csc.get("readOnlyRootFilesystem") is not True:
        err(f"{name}: readOnlyRootFilesystem must be true")
    if csc.get("allowPrivilegeEscalation") is not False:
        err(f"{name}: allowPrivilegeEscalation must be false")
    if csc.get("privileged"):
        err(f"{name}: must not be privileged")
    if "ALL" not in (get(csc, "capabilities", "drop", default=[]) or []):
        err(f"{name}: capabilities must drop ALL")
    res = c.get("resources", {}) or {}
    for kind in ("requests", "limits"):
        for r in ("cpu", "memory"):
            if r not in (res.get(kind) or {}):
                err(f"{name}: resources.{kind}.{r} is missing")
    mem_limit = get(res, "limits", "memory")
    if mem_limit is not None:
        prefetch = int(config.get("amqp.prefetch", 0))
        job = int(config.get("amqp.max_job_bytes", 0)) + int(config.get("jelou.max_response_bytes", 0))
        # The retry queue is consumed beside, with a quarter of the prefetch on top.
        worst = MEASURED_BASE_RSS_MIB * 2**20 + prefetch * 1.25 * job
        if quantity(mem_limit) < worst:
            err(
                f"{name}: memory limit {mem_limit} is below the worst case for amqp.prefetch "
                f"{prefetch}: {MEASURED_BASE_RSS_MIB} MiB measured + {prefetch} x 1.25 jobs x "
                f"{job} bytes = {worst / 2**20:.1f} MiB"
            )

    # --- Autoscaling -------------------------------------------------------------------
    if scaled:
        if "replicas" in deployment.get("spec", {}):
            err("Deployment: spec.replicas is set, but KEDA owns the replica count (every apply would reset it)")
        target = get(scaled, "spec", "scaleTargetRef", default={}) or {}
        if target.get("name") != get(deployment, "metadata", "name") or target.get("kind", "Deployment") != "Deployment":
            err(f"ScaledObject: scaleTargetRef {target} is not the Deployment")
        lo = get(scaled, "spec", "minReplicaCount", default=0)
        hi = get(scaled, "spec", "maxReplicaCount", default=100)
        if lo < 1:
            err("ScaledObject: minReplicaCount must be at least 1: parked retries come back "
                "through <jobs_queue>.retry, which only a running worker consumes")
        if hi < lo:
            err(f"ScaledObject: maxReplicaCount {hi} < minReplicaCount {lo}")
        partitions = config.get("order.partitions")
        ordered = str(config.get("order.enabled", "true")).lower() != "false"
        if partitions is not None and ordered and hi > int(partitions):
            err(f"ScaledObject: maxReplicaCount {hi} > order.partitions {partitions}: "
                "the replicas beyond hold no partition")
        min_available = get(pdb, "spec", "minAvailable")
        if isinstance(min_available, int) and min_available >= lo:
            err("PodDisruptionBudget: minAvailable >= minReplicaCount would block every node drain")
        behavior = get(scaled, "spec", "advanced", "horizontalPodAutoscalerConfig", "behavior", "scaleDown", default={}) or {}
        for policy in behavior.get("policies", []) or []:
            if policy.get("type") == "Pods" and policy.get("periodSeconds", 0) < tgps:
                err(f"ScaledObject: a scale-down policy removes pods every {policy.get('periodSeconds')} s, "
                    f"faster than a worker drains (terminationGracePeriodSeconds {tgps})")
        triggers = [t for t in get(scaled, "spec", "triggers", default=[]) or [] if t.get("type") == "rabbitmq"]
        if not triggers:
            err("ScaledObject: no rabbitmq trigger")
        jobs_queue = config.get("amqp.jobs_queue")
        for t in triggers:
            md = t.get("metadata", {}) or {}
            ordered = str(config.get("order.enabled", "true")).lower() != "false"
            if str(md.get("useRegex", "false")).lower() == "true":
                # With order on the backlog is in the partition queues too: the regex
                # must take the jobs queue and every partition queue, not a wait queue.
                try:
                    pattern = re.compile(md.get("queueName") or "")
                except re.error as e:
                    err(f"ScaledObject: queueName is not a regular expression: {e}")
                    pattern = None
                wanted = [jobs_queue] + [f"{jobs_queue}.order.{p}" for p in (0, 15)]
                for name in wanted if pattern else []:
                    if not pattern.fullmatch(name):
                        err(f"ScaledObject: the trigger's queueName does not match {name!r}")
                if pattern and pattern.fullmatch(f"{jobs_queue}.order.0.wait"):
                    err("ScaledObject: the trigger counts a wait queue (its jobs are held by a worker)")
                if md.get("protocol") != "http" or md.get("operation") != "sum":
                    err("ScaledObject: a queueName regex needs protocol http and operation sum")
            elif ordered:
                err("ScaledObject: with order on the backlog sits in the partition queues: "
                    "match <jobs_queue>(.order.<n>)? with useRegex")
            elif md.get("queueName") != jobs_queue:
                err(f"ScaledObject: the trigger's queueName {md.get('queueName')!r} is not amqp.jobs_queue {jobs_queue!r}")
            if md.get("mode") not in ("QueueLength", "MessageRate"):
                err(f"ScaledObject: mode {md.get('mode')!r} is not QueueLength or MessageRate")
            try:
                if float(md.get("value")) <= 0:
                    raise ValueError
            except (TypeError, ValueError):
                err(f"ScaledObject: the trigger's value {md.get('value')!r} must be a positive number (a string)")
            for unknown in sorted(set(md) - RABBITMQ_METADATA):
                err(f"ScaledObject: {unknown!r} is not a parameter of KEDA's rabbitmq scaler")
            for inline in ("host", "password", "username"):
                if inline in md:
                    err(f"ScaledObject: {inline} is inline in the trigger: use the TriggerAuthentication")
            if get(t, "authenticationRef", "name") != get(trigger_auth, "metadata", "name"):
                err(f"ScaledObject: authenticationRef {t.get('authenticationRef')} is not the TriggerAuthentication")
        refs = get(trigger_auth, "spec", "secretTargetRef", default=[]) or []
        if "host" not in {r.get("parameter") for r in refs}:
            err("TriggerAuthentication: no secretTargetRef for the parameter host")
        for r in refs:
            if r.get("parameter") not in RABBITMQ_AUTH_PARAMETERS:
                err(f"TriggerAuthentication: {r.get('parameter')!r} is not a parameter of KEDA's rabbitmq scaler")
            secret_ref(f"TriggerAuthentication: parameter {r.get('parameter')}", r.get("name"), r.get("key"))

    for key in sorted(secret_keys - used_secret_keys):
        err(f"secret.example.yaml: key {key!r} is used by nothing")
    return errors


def pod_environment(m: Manifests) -> tuple[dict[str, str], dict[str, str]]:
    """The worker container's variables: (literal values, variable -> Secret key)."""
    deployment = next(o for o in m.objects if o.get("kind") == "Deployment")
    configmap = next(o for o in m.objects if o.get("kind") == "ConfigMap")
    c = deployment["spec"]["template"]["spec"]["containers"][0]
    data = {k: str(v) for k, v in (configmap.get("data") or {}).items()}
    env, secrets = dict(data), {}
    for e in c.get("env", []) or []:
        if "value" in e:
            env[e["name"]] = str(e["value"])
        elif ref := get(e, "valueFrom", "secretKeyRef"):
            secrets[e["name"]] = ref["key"]
        elif ref := get(e, "valueFrom", "configMapKeyRef"):
            env[e["name"]] = data[ref["key"]]
    return env, secrets


def smoke_errors(m: Manifests, worker: Path, amqp_url: str) -> tuple[list[str], str]:
    """Runs the worker binary with the pod's environment against a local broker: it must
    accept every value, answer /healthz, /readyz and /metrics, and stop on SIGTERM
    well within terminationGracePeriodSeconds.

    Only what cannot run here is replaced: the secrets (the local broker, dummy Jelou
    credentials; no job is sent), the queue and exchange names (test.k8s-smoke.*, so
    nothing of a real topology is declared), and the listen port (a free one, on the
    ConfigMap's address: the port itself is checked by consistency_errors)."""
    import os
    import signal
    import socket
    import time
    import urllib.error
    import urllib.request

    env, secrets = pod_environment(m)
    stand_ins = {
        "JELOU_WORKER__AMQP__URL": amqp_url,
        "JELOU_WORKER__JELOU__CLIENT_ID": "k8s-smoke",
        "JELOU_WORKER__JELOU__CLIENT_SECRET": "k8s-smoke-secret",
    }
    for var in secrets:
        env[var] = stand_ins.get(var, "k8s-smoke")
    prefix = "test.k8s-smoke"
    env.update({
        "JELOU_WORKER__AMQP__JOBS_QUEUE": f"{prefix}.jobs",
        "JELOU_WORKER__AMQP__RESULT_EXCHANGE": f"{prefix}.results",
        "JELOU_WORKER__AMQP__DEAD_LETTER_EXCHANGE": f"{prefix}.dead",
        "JELOU_WORKER__AMQP__DEAD_LETTER_QUEUE": f"{prefix}.jobs.dead",
    })
    host = env.get("JELOU_WORKER__SERVER__LISTEN", "").rpartition(":")[0] or "0.0.0.0"
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env["JELOU_WORKER__SERVER__LISTEN"] = f"{host}:{port}"
    full_env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX) and k != "RUST_LOG"}
    full_env.update(env)
    tgps = next(o for o in m.objects if o.get("kind") == "Deployment")["spec"]["template"]["spec"].get(
        "terminationGracePeriodSeconds", 30
    )

    def status(path: str) -> int:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
                return r.status
        except urllib.error.HTTPError as e:
            return e.code
        except OSError:
            return 0

    errors: list[str] = []
    started = time.monotonic()
    proc = subprocess.Popen(
        [str(worker), "run"], cwd=REPO, env=full_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        ready_after = None
        while time.monotonic() - started < 60 and proc.poll() is None:
            if status("/healthz") == 200 and status("/readyz") == 200:
                ready_after = time.monotonic() - started
                break
            time.sleep(0.2)
        if ready_after is None:
            proc.kill()
            _, stderr = proc.communicate()
            last = stderr.strip().splitlines()[-3:]
            what = "was not ready within 60 s" if proc.returncode == -9 else f"exited {proc.returncode} at start"
            return [f"the worker with the pod's environment {what}: {' | '.join(last)}"], ""
        if status("/metrics") != 200:
            errors.append("the worker with the pod's environment does not serve /metrics")
        stop = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(timeout=tgps)
        except subprocess.TimeoutExpired:
            errors.append(f"the worker did not stop within terminationGracePeriodSeconds ({tgps} s) of SIGTERM")
            return errors, ""
        stopped_after = time.monotonic() - stop
        if code != 0:
            errors.append(f"the worker exited {code} on SIGTERM, not 0")
        return errors, (
            f"worker run with the pod's environment: /healthz and /readyz 200 after {ready_after:.1f} s, "
            f"exit {code} {stopped_after:.2f} s after SIGTERM (terminationGracePeriodSeconds {tgps})"
        )
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        rabbitmqctl = shutil.which("rabbitmqctl")
        if rabbitmqctl:
            listed = subprocess.run(
                [rabbitmqctl, "-q", "list_queues", "--no-table-headers", "name"],
                capture_output=True, text=True, timeout=120,
            )
            from concurrent.futures import ThreadPoolExecutor

            ours = [q for q in listed.stdout.split() if q.startswith(prefix + ".")]
            with ThreadPoolExecutor(max_workers=4) as pool:  # rabbitmqctl takes ~1 s a call
                list(pool.map(
                    lambda q: subprocess.run([rabbitmqctl, "-q", "delete_queue", q], capture_output=True, timeout=120),
                    ours,
                ))


def strict(schema: object) -> object:
    """An OpenAPI schema that rejects unknown fields, as `kubectl --validate=strict` does."""
    if isinstance(schema, dict):
        schema = {k: strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
    elif isinstance(schema, list):
        schema = [strict(v) for v in schema]
    return schema


def custom_resource_errors(obj: dict) -> list[str]:
    import json

    import jsonschema

    group, _, version = obj.get("apiVersion", "").partition("/")
    what = f"{obj.get('kind')}/{get(obj, 'metadata', 'name')}"
    path = CUSTOM_SCHEMAS / f"{str(obj.get('kind')).lower()}-{group.split('.')[0]}-{version}.json"
    if not path.exists():
        return [f"{what}: no schema for {obj.get('apiVersion')} {obj.get('kind')} in {CUSTOM_SCHEMAS}"]
    validator = jsonschema.Draft202012Validator(strict(json.loads(path.read_text())))
    return [
        f"{what} ({path.name}): {'.'.join(str(p) for p in e.path)}: {e.message}"
        for e in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.path)))
    ]


def schema_errors(m: Manifests, versions: list[str]) -> list[str]:
    """The core resources against the Kubernetes schemas (strict: no unknown fields)."""
    try:
        import kubernetes_validate
    except ImportError:
        return ["kubernetes-validate is not installed: pip install kubernetes-validate pyyaml"]
    errors = []
    for obj in m.all_objects():
        if obj.get("apiVersion", "").split("/")[0] in CUSTOM_GROUPS:
            errors += custom_resource_errors(obj)
            continue
        what = f"{obj.get('kind')}/{get(obj, 'metadata', 'name')}"
        for version in versions:
            try:
                kubernetes_validate.validate(copy.deepcopy(obj), version, strict=True)
            except kubernetes_validate.ValidationError as e:
                path = ".".join(str(p) for p in e.path)
                errors.append(f"{what} (Kubernetes {version}): {path}: {e.message}")
            except kubernetes_validate.SchemaNotFoundError as e:
                errors.append(f"{what}: {e.message}")
            except kubernetes_validate.VersionNotSupportedError as e:
                return [f"{e.message}: pip install --upgrade kubernetes-validate"]
    return errors


def kustomize_errors(m: Manifests) -> tuple[list[str], str]:
    kubectl = shutil.which("kubectl")
    if not kubectl:
        return [], "kubectl not installed: `kubectl kustomize` not tried"
    run = subprocess.run([kubectl, "kustomize", str(m.directory)], capture_output=True, text=True)
    if run.returncode != 0:
        return [f"kubectl kustomize failed: {run.stderr.strip()}"], ""
    built = {(o["kind"], o["metadata"]["name"]) for o in yaml.safe_load_all(run.stdout) if o}
    listed = {(o["kind"], o["metadata"]["name"]) for o in m.objects}
    if built != listed:
        return [f"kubectl kustomize built {sorted(built)}, the files list {sorted(listed)}"], ""
    return [], f"kubectl kustomize builds {len(built)} resources"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", type=Path, default=REPO / "deploy/kubernetes")
    parser.add_argument(
        "--kubernetes-versions",
        default=DEFAULT_K8S_VERSIONS,
        help=f"comma-separated (default {DEFAULT_K8S_VERSIONS})",
    )
    parser.add_argument(
        "--worker",
        type=Path,
        help="also run this jelou-worker binary with the pod's environment (needs a broker)",
    )
    parser.add_argument(
        "--amqp-url",
        default="amqp://guest:guest@127.0.0.1:5672/%2f",
        help="the broker for --worker (default: the local one)",
    )
    args = parser.parse_args()
    m = Manifests.load(args.dir)
    w = Worker.from_repo()
    versions = [v.strip() for v in args.kubernetes_versions.split(",") if v.strip()]
    errors = schema_errors(m, versions)
    print(f"schemas: {len(m.all_objects())} resources against Kubernetes {', '.join(versions)} and KEDA's CRDs (strict)")
    errors += consistency_errors(m, w)
    print(f"consistency: {len(w.keys)} configuration keys from config/default.toml, routes {sorted(w.routes)}")
    more, note = kustomize_errors(m)
    errors += more
    if note:
        print(note)
    if args.worker and not errors:
        more, note = smoke_errors(m, args.worker, args.amqp_url)
        errors += more
        if note:
            print(note)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if errors:
        print(f"{len(errors)} problem(s) in {args.dir}", file=sys.stderr)
        return 1
    print(f"{args.dir}: valid and consistent with the worker's configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
