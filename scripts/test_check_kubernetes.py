"""Tests of scripts/check_kubernetes.py: the real manifests pass, and each kind of
mistake the checker exists for makes it fail, naming what is wrong.

    python3 -B -m unittest discover -s scripts -p 'test_check_kubernetes.py'
"""

import copy
import sys
import unittest
from pathlib import Path

sys.dont_write_bytecode = True  # no __pycache__ beside the scripts
sys.path.insert(0, str(Path(__file__).resolve().parent))

import check_kubernetes as ck  # noqa: E402

MANIFESTS = ck.Manifests.load(ck.REPO / "deploy/kubernetes")
WORKER = ck.Worker.from_repo()


def kind(m, k):
    return next(o for o in m.all_objects() if o["kind"] == k)


def container(m):
    return kind(m, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def trigger(m):
    return kind(m, "ScaledObject")["spec"]["triggers"][0]


class TheRepositorysManifests(unittest.TestCase):
    def test_are_consistent(self):
        self.assertEqual(ck.consistency_errors(MANIFESTS, WORKER), [])

    def test_are_valid_against_the_schemas(self):
        self.assertEqual(ck.schema_errors(MANIFESTS, ck.DEFAULT_K8S_VERSIONS.split(",")), [])

    def test_build_with_kustomize_when_kubectl_is_there(self):
        self.assertEqual(ck.kustomize_errors(MANIFESTS)[0], [])


class WhatTheWorkerKnows(unittest.TestCase):
    def test_keys_come_from_default_toml_commented_ones_included(self):
        for key in ("amqp.prefetch", "server.listen", "shutdown.grace_period_ms",
                    "jelou.client_secret", "amqp.tls_ca_file"):
            self.assertIn(key, WORKER.keys)
        self.assertEqual(WORKER.defaults["shutdown.grace_period_ms"], 30000)
        self.assertEqual(WORKER.routes, {"/metrics", "/healthz", "/readyz"})

    def test_a_key_added_to_default_toml_is_known_without_touching_the_checker(self):
        toml = (ck.REPO / "config/default.toml").read_text() + (
            "\n[fleet]\n# A section the checker has never seen.\nsize = 3\n# spare = 1\n"
        )
        w = ck.Worker.from_sources(toml, (ck.REPO / "src/server.rs").read_text())
        self.assertTrue({"fleet.size", "fleet.spare", "order.partitions"} <= w.keys)
        m = copy.deepcopy(MANIFESTS)
        kind(m, "ConfigMap")["data"]["JELOU_WORKER__FLEET__SIZE"] = "3"
        self.assertEqual(ck.consistency_errors(m, w), [])
        # And more replicas than partitions is then a mistake.
        kind(m, "ScaledObject")["spec"]["maxReplicaCount"] = 20
        self.assertIn("order.partitions", " ".join(ck.consistency_errors(m, w)))
        kind(m, "ConfigMap")["data"]["JELOU_WORKER__ORDER__ENABLED"] = "false"
        self.assertEqual(ck.consistency_errors(m, w), [])

    def test_env_names(self):
        self.assertEqual(ck.env_to_key("JELOU_WORKER__AMQP__PREFETCH"), "amqp.prefetch")
        self.assertIsNone(ck.env_to_key("JELOU_WORKER_AMQP_PREFETCH"))
        self.assertIsNone(ck.env_to_key("JELOU_WORKER__AMQP"))


class ThePodsEnvironment(unittest.TestCase):
    def test_is_the_configmap_plus_the_secret_references(self):
        env, secrets = ck.pod_environment(MANIFESTS)
        self.assertEqual(env["JELOU_WORKER__SERVER__LISTEN"], "0.0.0.0:9464")
        self.assertEqual(secrets, {
            "JELOU_WORKER__AMQP__URL": "amqp-url",
            "JELOU_WORKER__JELOU__CLIENT_ID": "jelou-client-id",
            "JELOU_WORKER__JELOU__CLIENT_SECRET": "jelou-client-secret",
        })


class ABrokenManifestFails(unittest.TestCase):
    """Each case breaks one thing in a copy of the real manifests."""

    def fails(self, breaks, expected):
        m = copy.deepcopy(MANIFESTS)
        breaks(m)
        errors = ck.consistency_errors(m, WORKER)
        self.assertTrue(errors, "the checker accepted a broken manifest")
        self.assertIn(expected, "\n".join(errors))

    def test_termination_grace_period_shorter_than_the_workers(self):
        def breaks(m):
            kind(m, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = 30
        self.fails(breaks, "terminationGracePeriodSeconds 30")

    def test_worker_grace_period_raised_without_the_pods(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__SHUTDOWN__GRACE_PERIOD_MS"] = "60000"
        self.fails(breaks, "terminationGracePeriodSeconds")

    def test_request_timeout_longer_than_the_grace_period(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__JELOU__REQUEST_TIMEOUT_MS"] = "60000"
        self.fails(breaks, "could be cut off")

    def test_probe_on_the_wrong_port(self):
        def breaks(m):
            container(m)["livenessProbe"]["httpGet"]["port"] = 8080
        self.fails(breaks, "livenessProbe port 8080")

    def test_probe_on_the_wrong_path(self):
        def breaks(m):
            container(m)["readinessProbe"]["httpGet"]["path"] = "/healthz"
        self.fails(breaks, "readinessProbe path")

    def test_listening_on_loopback(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__SERVER__LISTEN"] = "127.0.0.1:9464"
        self.fails(breaks, "0.0.0.0")

    def test_listen_port_changed_alone(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__SERVER__LISTEN"] = "0.0.0.0:9000"
        self.fails(breaks, "no containerPort is server.listen's port 9000")

    def test_scrape_annotation_on_another_port(self):
        def breaks(m):
            kind(m, "Deployment")["spec"]["template"]["metadata"]["annotations"]["prometheus.io/port"] = "9090"
        self.fails(breaks, "prometheus.io/port")

    def test_unknown_configuration_key(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__AMQP__PREFETCH_COUNT"] = "64"
        self.fails(breaks, "amqp.prefetch_count, which is not a key")

    def test_malformed_variable_name(self):
        def breaks(m):
            container(m)["env"].append({"name": "JELOU_WORKER_LOG_LEVEL", "value": "debug"})
        self.fails(breaks, "not of the form")

    def test_secret_inline(self):
        def breaks(m):
            env = container(m)["env"]
            env[:] = [e for e in env if e["name"] != "JELOU_WORKER__JELOU__CLIENT_SECRET"]
            env.append({"name": "JELOU_WORKER__JELOU__CLIENT_SECRET", "value": "hunter2"})
        self.fails(breaks, "inline")

    def test_secret_in_the_configmap(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__AMQP__URL"] = "amqp://u:p@h/%2f"
        self.fails(breaks, "belongs in the Secret")

    def test_secret_key_missing_from_the_example(self):
        def breaks(m):
            del m.secret["stringData"]["jelou-client-id"]
        self.fails(breaks, "key 'jelou-client-id' is not in secret.example.yaml")

    def test_keda_reads_a_key_the_secret_lacks(self):
        def breaks(m):
            kind(m, "TriggerAuthentication")["spec"]["secretTargetRef"][0]["key"] = "rabbitmq-host"
        self.fails(breaks, "'rabbitmq-host' is not in secret.example.yaml")

    def test_keda_watches_another_queue(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__AMQP__JOBS_QUEUE"] = "acme.jobs"
        self.fails(breaks, "the trigger's queueName does not match 'acme.jobs.order.0'")

    def test_keda_counts_only_the_jobs_queue_while_order_is_on(self):
        def breaks(m):
            md = kind(m, "ScaledObject")["spec"]["triggers"][0]["metadata"]
            md["useRegex"] = "false"
            md["queueName"] = "jelou.jobs"
        self.fails(breaks, "the backlog sits in the partition queues")

    def test_keda_counts_a_wait_queue(self):
        def breaks(m):
            kind(m, "ScaledObject")["spec"]["triggers"][0]["metadata"]["queueName"] = "^jelou\\.jobs.*$"
        self.fails(breaks, "counts a wait queue")

    def test_keda_scales_down_faster_than_a_worker_drains(self):
        def breaks(m):
            behavior = kind(m, "ScaledObject")["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
            behavior["scaleDown"]["policies"][0]["periodSeconds"] = 15
        self.fails(breaks, "faster than a worker drains")

    def test_keda_scales_to_zero(self):
        def breaks(m):
            kind(m, "ScaledObject")["spec"]["minReplicaCount"] = 0
        self.fails(breaks, "minReplicaCount must be at least 1")

    def test_keda_host_inline(self):
        def breaks(m):
            trigger(m)["metadata"]["host"] = "amqp://guest:guest@rabbitmq/%2f"
        self.fails(breaks, "host is inline")

    def test_replicas_fixed_beside_keda(self):
        def breaks(m):
            kind(m, "Deployment")["spec"]["replicas"] = 3
        self.fails(breaks, "KEDA owns the replica count")

    def test_writable_root_filesystem(self):
        def breaks(m):
            container(m)["securityContext"]["readOnlyRootFilesystem"] = False
        self.fails(breaks, "readOnlyRootFilesystem")

    def test_memory_limit_too_small_for_the_prefetch(self):
        def breaks(m):
            kind(m, "ConfigMap")["data"]["JELOU_WORKER__AMQP__PREFETCH"] = "1024"
        self.fails(breaks, "memory limit 96Mi is below the worst case")

    def test_service_selects_nothing(self):
        def breaks(m):
            kind(m, "Service")["spec"]["selector"] = {"app": "jelou"}
        self.fails(breaks, "Service: selector")

    def test_a_trigger_parameter_keda_does_not_know(self):
        def breaks(m):
            trigger(m)["metadata"]["queueLength"] = "1000"
            trigger(m)["metadata"]["queue"] = "jelou.jobs"
        self.fails(breaks, "'queue' is not a parameter")

    def test_secret_listed_in_the_kustomization(self):
        def breaks(m):
            m.objects.append(m.secret)
        self.fails(breaks, "would overwrite the real credentials")


class TheSchemasCatch(unittest.TestCase):
    def errors(self, breaks):
        m = copy.deepcopy(MANIFESTS)
        breaks(m)
        return ck.schema_errors(m, ["1.30"])

    def test_a_misspelt_field(self):
        def breaks(m):
            container(m)["readinesProbe"] = container(m).pop("readinessProbe")
        self.assertIn("readinesProbe", "\n".join(self.errors(breaks)))

    def test_a_wrong_type(self):
        def breaks(m):
            kind(m, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "45s"
        self.assertIn("terminationGracePeriodSeconds", "\n".join(self.errors(breaks)))

    def test_a_misspelt_keda_field(self):
        def breaks(m):
            spec = kind(m, "ScaledObject")["spec"]
            spec["cooldownPeriods"] = spec.pop("cooldownPeriod")
        self.assertIn("cooldownPeriods", "\n".join(self.errors(breaks)))

    def test_a_wrong_keda_type(self):
        def breaks(m):
            kind(m, "ScaledObject")["spec"]["maxReplicaCount"] = "16"
        self.assertIn("maxReplicaCount", "\n".join(self.errors(breaks)))

    def test_a_kind_that_does_not_exist(self):
        def breaks(m):
            kind(m, "PodDisruptionBudget")["apiVersion"] = "policy/v1beta2"
        self.assertIn("Couldn't find schema", "\n".join(self.errors(breaks)))


if __name__ == "__main__":
    unittest.main()
