"""deploy/: the kustomize base and overlays render with `kubectl kustomize`, validate offline against the
Kubernetes schemas (kubernetes-validate ships them), and say what the server really does: probes on
/health, a scrape annotation on /metrics, the port the server listens on, CPU and memory limits, flags
`kvflow serve` accepts, an HPA metric kvflow exports, and a disaggregated deployment whose Ray worker
pods fit its instances one to one."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")
kubernetes_validate = pytest.importorskip("kubernetes_validate")

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
KUSTOMIZATIONS = ["base", "overlays/edge", "overlays/hpa", "overlays/disagg"]
#: An older minor small clusters still run, and the newest the shipped schemas cover.
K8S_VERSIONS = ["1.31.0", "1.37.0"]
KUBECTL = shutil.which("kubectl")

pytestmark = pytest.mark.skipif(KUBECTL is None, reason="kubectl (with its built-in kustomize) is not installed")


def render(path: str) -> list[dict]:
    out = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {path: render(path) for path in KUSTOMIZATIONS}


def of_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def serve_parser():
    from kvflow.cli import build_parser

    return build_parser("serve")


def parse_serve(args: list[str]):
    """`kvflow serve ARGS` as the CLI parses them (SystemExit on an unknown flag or a bad value)."""
    assert args[0] == "serve", args
    parsed, unknown = serve_parser().parse_known_args(args)
    assert not unknown, f"kvflow serve does not accept {unknown}"
    return parsed


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_resource_validates_against_the_kubernetes_schemas(rendered, path, version):
    docs = rendered[path]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, version, strict=True)  # raises ValidationError


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_every_container_has_cpu_and_memory_requests_and_limits(rendered, path):
    for deployment in of_kind(rendered[path], "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            res = container["resources"]
            for key in ("cpu", "memory"):
                assert key in res["requests"] and key in res["limits"], (deployment["metadata"]["name"], key)
            assert _cpu(res["requests"]["cpu"]) <= _cpu(res["limits"]["cpu"])
            assert _bytes(res["requests"]["memory"]) <= _bytes(res["limits"]["memory"])


def _cpu(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


def _bytes(value: str) -> int:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30}
    return int(value[:-2]) * units[value[-2:]] if value[-2:] in units else int(value)


def _servers(docs: list[dict]) -> list[tuple[dict, dict]]:
    """(deployment, container) for every container that runs `kvflow serve`."""
    out = []
    for deployment in of_kind(docs, "Deployment"):
        for container in deployment["spec"]["template"]["spec"]["containers"]:
            if "kvflow serve" in " ".join(container.get("args", [])) or container.get("args", [""])[0] == "serve":
                out.append((deployment, container))
    return out


def _serve_args(container: dict) -> list[str]:
    args = container["args"]
    if args[0] == "serve":  # the image's entrypoint is `kvflow`
        return args
    script = " ".join(args)
    return script.split("exec kvflow ", 1)[1].split()


def _app_routes() -> set[str]:
    from kvflow.server import app as app_module

    source = Path(app_module.__file__).read_text()
    return {path for path in ("/health", "/metrics") if f'@app.get("{path}"' in source}


@pytest.mark.parametrize("path", KUSTOMIZATIONS)
def test_servers_probe_health_and_are_scraped_on_metrics_at_the_port_they_listen_on(rendered, path):
    assert _app_routes() == {"/health", "/metrics"}
    servers = _servers(rendered[path])
    assert len(servers) == 1
    deployment, container = servers[0]
    args = parse_serve(_serve_args(container))
    assert args.host == "0.0.0.0"
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports["http"] == args.port == 8000
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        get = container[probe]["httpGet"]
        assert get["path"] == "/health" and ports.get(get["port"], get["port"]) == args.port, probe
    notes = deployment["spec"]["template"]["metadata"]["annotations"]
    assert notes["prometheus.io/scrape"] == "true" and notes["prometheus.io/path"] == "/metrics"
    assert int(notes["prometheus.io/port"]) == args.port
    # The Service routes to the server's pods.
    service = next(s for s in of_kind(rendered[path], "Service") if s["metadata"]["name"].startswith("kvflow")
                   and s["spec"]["ports"][0]["name"] == "http")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


@pytest.mark.parametrize("path", ["base", "overlays/edge", "overlays/hpa"])
def test_threads_match_the_cpu_limit_and_the_kv_cache_fits_the_memory_limit(rendered, path):
    (_, container), = _servers(rendered[path])
    env = {e["name"]: e["value"] for e in container["env"]}
    assert int(env["OMP_NUM_THREADS"]) == _cpu(container["resources"]["limits"]["cpu"])
    args = parse_serve(_serve_args(container))
    assert args.kv_cache_memory * 2**30 <= 0.25 * _bytes(container["resources"]["limits"]["memory"])
    assert args.kv_offload_dir == "/var/lib/kvflow/kv-offload"
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert {"/models", args.kv_offload_dir} <= mounts


def test_the_edge_overlay_is_one_core_and_two_gib(rendered):
    (deployment, container), = _servers(rendered["overlays/edge"])
    assert deployment["metadata"]["name"] == "kvflow-edge"
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "2Gi"}
    claim = deployment["spec"]["template"]["spec"]["volumes"][0]["persistentVolumeClaim"]["claimName"]
    assert claim in {p["metadata"]["name"] for p in of_kind(rendered["overlays/edge"], "PersistentVolumeClaim")}


def test_the_hpa_scales_on_the_waiting_gauge_kvflow_exports(rendered):
    docs = rendered["overlays/hpa"]
    (hpa,) = of_kind(docs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] in {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    metric = hpa["spec"]["metrics"][0]["pods"]["metric"]["name"]
    (rules,) = of_kind(docs, "ConfigMap")
    rule = yaml.safe_load(rules["data"]["config.yaml"])["rules"][0]
    assert rule["name"]["as"] == metric
    series = rule["seriesQuery"].split("{", 1)[0].strip("'")
    assert series == "kvflow:num_requests_waiting"
    assert _exported_metric_names() >= {series}


def _exported_metric_names() -> set[str]:
    """The metric families a server's registry holds (what /metrics renders)."""
    from kvflow.server.metrics import ServerMetrics

    return {m.name for m in ServerMetrics("tiny").registry.collect()}


def test_the_disaggregated_overlay_has_one_ray_worker_pod_per_instance(rendered):
    from kvflow.disagg.deployment import DeploymentSpec

    docs = rendered["overlays/disagg"]
    names = {d["metadata"]["name"] for d in of_kind(docs, "Deployment")}
    assert names == {"kvflow-router", "kvflow-prefill", "kvflow-decode"}  # the single server is gone
    spec = DeploymentSpec.load(DEPLOY / "overlays/disagg/deployment.json")
    assert spec.placement_strategy == "STRICT_SPREAD"  # one instance per Ray node (pod)
    for role in ("prefill", "decode"):
        (deployment,) = [d for d in of_kind(docs, "Deployment") if d["metadata"]["name"] == f"kvflow-{role}"]
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        offered = next(float(a.split("=", 1)[1]) for a in container["command"] if a.startswith("--num-cpus="))
        wanted = [i.num_cpus for i in spec.instances if i.role == role]
        assert deployment["spec"]["replicas"] == len(wanted)
        assert set(wanted) == {offered} == {_cpu(container["resources"]["limits"]["cpu"])}
        assert "--address=kvflow-ray-head:6379" in container["command"]
    # The prefill bundle fits only a prefill pod: no decode pod offers that many CPUs.
    assert max(i.num_cpus for i in spec.instances if i.role == "decode") < min(
        i.num_cpus for i in spec.instances if i.role == "prefill")
    (router, container), = _servers(docs)
    args = parse_serve(_serve_args(container))
    assert args.disagg and args.ray_address == "127.0.0.1:6379"
    assert str(args.deployment) == "/etc/kvflow/deployment.json"
    assert "--num-cpus=0" in container["args"][0]  # the head hosts no instance
    config = next(v for v in router["spec"]["template"]["spec"]["volumes"] if v["name"] == "deployment")
    (cm,) = of_kind(docs, "ConfigMap")
    assert config["configMap"]["name"] == cm["metadata"]["name"]
    assert json.loads(cm["data"]["deployment.json"]) == json.loads(
        (DEPLOY / "overlays/disagg/deployment.json").read_text())
    head = next(s for s in of_kind(docs, "Service") if s["metadata"]["name"] == "kvflow-ray-head")
    assert head["spec"]["selector"].items() <= router["spec"]["template"]["metadata"]["labels"].items()
