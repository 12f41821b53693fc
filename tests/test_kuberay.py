"""The Kubernetes door: cluster/kuberay/ checked offline against KubeRay's CRD fields, and its entrypoint run.

No Kubernetes runs here. What can be shown without one:

1. The manifests use only fields that KubeRay's published CRDs define, with
   the values its schema allows, and hold together: the GPU worker group
   autoscales from 0 with GPU limits, the head offers no CPUs for work, the
   in-tree autoscaler is on, the entrypoint's ``tracking.uri`` names the
   MLflow Service (port and pods included), ``--storage`` lies on a
   ReadWriteMany volume that the head and the workers mount, and the image
   is Ray's own of the installed Ray and Python.
2. The RayJob's entrypoint, a Jobs-API command, runs for real: ``ray job submit
   --working-dir <a fresh copy of the project> -- <entrypoint>`` against a
   local Ray head with its dashboard, with the cluster-only names swapped for
   local ones (``LOCAL``) and a tiny budget appended.

The field lists below are written down from KubeRay v1.7.0 (commit
59d663aeec13760646da3db9c1cf8cfe883e30b7), files
``ray-operator/config/crd/bases/ray.io_rayjobs.yaml`` and
``ray-operator/config/crd/bases/ray.io_rayclusters.yaml``, version ``v1``,
``openAPIV3Schema`` (whose ``rayClusterSpec`` is the RayCluster's ``spec``,
field for field); the pod template's fields are Kubernetes' own as those CRDs
embed them. Only the objects the manifests use are listed; a key outside its
list, or a required key missing, fails.
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import ray
import yaml
from mlflowserver import mlflow_server
from projectcopy import tracked_files
from rayhead import free_port, start_head

ROOT = Path(__file__).resolve().parent.parent
KUBERAY = ROOT / "cluster" / "kuberay"

# KubeRay v1.7.0, ray.io_rayjobs.yaml, v1: properties (and `required`) of each object, by where it sits.
RAYJOB = {"apiVersion", "kind", "metadata", "spec", "status"}
RAYJOB_SPEC = {
    "activeDeadlineSeconds", "backoffLimit", "clusterSelector", "deletionStrategy", "entrypoint",
    "entrypointNumCpus", "entrypointNumGpus", "entrypointResources", "jobId", "managedBy", "metadata",
    "preRunningDeadlineSeconds", "rayClusterSpec", "runtimeEnvYAML", "shutdownAfterJobFinishes", "submissionMode",
    "submitterConfig", "submitterPodTemplate", "suspend", "ttlSecondsAfterFinished",
}  # fmt: skip
RAYCLUSTER_SPEC = {
    "authOptions", "autoscalerOptions", "enableInTreeAutoscaling", "gcsFaultToleranceOptions", "headGroupSpec",
    "headServiceAnnotations", "historyServerOptions", "managedBy", "networkPolicy", "rayVersion", "suspend",
    "tlsOptions", "upgradeStrategy", "workerGroupSpecs",
}  # fmt: skip
RAYCLUSTER_REQUIRED = {"headGroupSpec"}
AUTOSCALER_OPTIONS = {
    "args", "command", "env", "envFrom", "idleTimeoutSeconds", "image", "imagePullPolicy", "resources",
    "securityContext", "upscalingMode", "version", "volumeMounts",
}  # fmt: skip
UPSCALING_MODES = {"Default", "Aggressive", "Conservative"}
AUTOSCALER_VERSIONS = {"v1", "v2"}
HEAD_GROUP = {
    "enableIngress", "headService", "ingressOptions", "labels", "rayStartParams", "resources", "serviceType",
    "template",
}  # fmt: skip
HEAD_GROUP_REQUIRED = {"template"}
WORKER_GROUP = {
    "groupName", "idleTimeoutSeconds", "labels", "maxReplicas", "minReplicas", "numOfHosts", "priority",
    "rayStartParams", "replicas", "resources", "scaleStrategy", "suspend", "template",
}  # fmt: skip
WORKER_GROUP_REQUIRED = {"groupName", "maxReplicas", "minReplicas", "template"}
POD_TEMPLATE = {"metadata", "spec"}
POD_TEMPLATE_METADATA = {"annotations", "finalizers", "labels", "name", "namespace"}
POD_SPEC = {
    "activeDeadlineSeconds", "affinity", "automountServiceAccountToken", "containers", "dnsConfig", "dnsPolicy",
    "enableServiceLinks", "ephemeralContainers", "hostAliases", "hostIPC", "hostNetwork", "hostPID", "hostUsers",
    "hostname", "hostnameOverride", "imagePullSecrets", "initContainers", "nodeName", "nodeSelector", "os",
    "overhead", "preemptionPolicy", "priority", "priorityClassName", "readinessGates", "resourceClaims",
    "resources", "restartPolicy", "runtimeClassName", "schedulerName", "schedulingGates", "schedulingGroup",
    "securityContext", "serviceAccount", "serviceAccountName", "setHostnameAsFQDN", "shareProcessNamespace",
    "subdomain", "terminationGracePeriodSeconds", "tolerations", "topologySpreadConstraints", "volumes",
}  # fmt: skip
POD_SPEC_REQUIRED = {"containers"}
CONTAINER = {
    "args", "command", "env", "envFrom", "image", "imagePullPolicy", "lifecycle", "livenessProbe", "name", "ports",
    "readinessProbe", "resizePolicy", "resources", "restartPolicy", "restartPolicyRules", "securityContext",
    "startupProbe", "stdin", "stdinOnce", "terminationMessagePath", "terminationMessagePolicy", "tty",
    "volumeDevices", "volumeMounts", "workingDir",
}  # fmt: skip
CONTAINER_REQUIRED = {"name"}
RESOURCES = {"claims", "limits", "requests"}
CONTAINER_PORT = {"containerPort", "hostIP", "hostPort", "name", "protocol"}
VOLUME_MOUNT = {"mountPath", "mountPropagation", "name", "readOnly", "recursiveReadOnly", "subPath", "subPathExpr"}
VOLUME_MOUNT_REQUIRED = {"mountPath", "name"}
VOLUME_SOURCES = {
    "awsElasticBlockStore", "azureDisk", "azureFile", "cephfs", "cinder", "configMap", "csi", "downwardAPI",
    "emptyDir", "ephemeral", "fc", "flexVolume", "flocker", "gcePersistentDisk", "gitRepo", "glusterfs", "hostPath",
    "image", "iscsi", "nfs", "persistentVolumeClaim", "photonPersistentDisk", "portworxVolume", "projected",
    "quobyte", "rbd", "scaleIO", "secret", "storageos", "vsphereVolume",
}  # fmt: skip
PVC_SOURCE = {"claimName", "readOnly"}
TOLERATION = {"effect", "key", "operator", "tolerationSeconds", "value"}
# limits/requests: Kubernetes quantities (additionalProperties with this shape in the CRD)
QUANTITY = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
GPU = "nvidia.com/gpu"

# The entrypoint's cluster-only names and what the local run uses instead (the only differences).
TRACKING = "tracking.uri=http://distmaml-mlflow:5000"
STORAGE = "/shared/sweeps"
TINY = [
    "--trials", "1", "--quiet", "--set", "meta.steps=4", "--set", "meta.val_every=2", "--set", "meta.val_tasks=8",
    "--set", "meta.test_tasks=8", "--set", "meta.checkpoint_every=2", "--set", "tracking.log_every=1",
]  # fmt: skip


def documents(name: str) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all((KUBERAY / name).read_text()) if d]


def rayjob() -> dict[str, Any]:
    (job,) = documents("rayjob.yaml")
    return job


def kinds() -> dict[tuple[str, str], dict[str, Any]]:
    """Every object of cluster/kuberay/*.yaml by (kind, name)."""
    found = {}
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in documents(path.name):
            found[(doc["kind"], doc["metadata"]["name"])] = doc
    return found


def check_keys(obj: dict[str, Any], allowed: set[str], required: set[str], where: str) -> None:
    assert isinstance(obj, dict), f"{where}: an object, not {obj!r}"
    assert set(obj) <= allowed, f"{where}: fields {sorted(set(obj) - allowed)} are not in KubeRay v1.7.0's CRD"
    assert required <= set(obj), f"{where}: required fields {sorted(required - set(obj))} missing"


def check_pod_template(template: dict[str, Any], where: str) -> dict[str, Any]:
    """The pod template's fields, as far as the manifests use them; returns the pod spec."""
    check_keys(template, POD_TEMPLATE, set(), where)
    check_keys(template.get("metadata", {}), POD_TEMPLATE_METADATA, set(), f"{where}.metadata")
    spec = template["spec"]
    check_keys(spec, POD_SPEC, POD_SPEC_REQUIRED, f"{where}.spec")
    volumes = {}
    for i, volume in enumerate(spec.get("volumes", [])):
        check_keys(volume, VOLUME_SOURCES | {"name"}, {"name"}, f"{where}.spec.volumes[{i}]")
        assert len(set(volume) - {"name"}) == 1, f"{where}.spec.volumes[{i}]: one source per volume"
        if "persistentVolumeClaim" in volume:
            check_keys(volume["persistentVolumeClaim"], PVC_SOURCE, {"claimName"}, f"{where}.volumes[{i}].pvc")
        volumes[volume["name"]] = volume
    for i, toleration in enumerate(spec.get("tolerations", [])):
        check_keys(toleration, TOLERATION, set(), f"{where}.spec.tolerations[{i}]")
    for i, container in enumerate(spec["containers"]):
        at = f"{where}.spec.containers[{i}]"
        check_keys(container, CONTAINER, CONTAINER_REQUIRED, at)
        check_keys(container.get("resources", {}), RESOURCES, set(), f"{at}.resources")
        for kind in ("limits", "requests"):
            for name, amount in container.get("resources", {}).get(kind, {}).items():
                assert QUANTITY.match(str(amount)), f"{at}.resources.{kind}.{name}: {amount!r} is not a quantity"
        for port in container.get("ports", []):
            check_keys(port, CONTAINER_PORT, {"containerPort"}, f"{at}.ports")
        for mount in container.get("volumeMounts", []):
            check_keys(mount, VOLUME_MOUNT, VOLUME_MOUNT_REQUIRED, f"{at}.volumeMounts")
            assert mount["name"] in volumes, f"{at}: mounts volume {mount['name']!r}, which the pod does not define"
    return spec


def test_the_rayjob_uses_only_kuberays_fields():
    job = rayjob()
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    check_keys(job, RAYJOB, set(), "RayJob")
    check_keys(job["spec"], RAYJOB_SPEC, set(), "spec")
    assert isinstance(job["spec"]["entrypoint"], str)
    assert isinstance(yaml.safe_load(job["spec"]["runtimeEnvYAML"]), dict)  # a YAML string of a runtime env
    cluster = job["spec"]["rayClusterSpec"]
    check_keys(cluster, RAYCLUSTER_SPEC, RAYCLUSTER_REQUIRED, "rayClusterSpec")
    check_keys(cluster["autoscalerOptions"], AUTOSCALER_OPTIONS, set(), "autoscalerOptions")
    head = cluster["headGroupSpec"]
    check_keys(head, HEAD_GROUP, HEAD_GROUP_REQUIRED, "headGroupSpec")
    check_pod_template(head["template"], "headGroupSpec.template")
    for i, group in enumerate(cluster["workerGroupSpecs"]):
        check_keys(group, WORKER_GROUP, WORKER_GROUP_REQUIRED, f"workerGroupSpecs[{i}]")
        check_pod_template(group["template"], f"workerGroupSpecs[{i}].template")
    # rayStartParams: a map of strings (additionalProperties: string)
    for params in [head["rayStartParams"], *(g["rayStartParams"] for g in cluster["workerGroupSpecs"])]:
        assert all(isinstance(v, str) for v in params.values()), params


def test_a_cpu_head_and_gpu_workers_that_autoscale_from_zero():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__  # the Ray of the image, and of this project's tests
    assert cluster["enableInTreeAutoscaling"] is True
    options = cluster["autoscalerOptions"]
    assert options["upscalingMode"] in UPSCALING_MODES and options.get("version", "v1") in AUTOSCALER_VERSIONS
    assert isinstance(options["idleTimeoutSeconds"], int) and options["idleTimeoutSeconds"] > 0
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"  # no worker actors on the head, as cluster/config.yaml
    (head_container,) = head["template"]["spec"]["containers"]
    assert GPU not in head_container["resources"]["limits"]
    (group,) = cluster["workerGroupSpecs"]
    assert group["minReplicas"] == 0 and group["replicas"] == 0 and group["maxReplicas"] >= 1
    (worker,) = group["template"]["spec"]["containers"]
    limits, requests = worker["resources"]["limits"], worker["resources"]["requests"]
    assert int(limits[GPU]) >= 1 and requests.get(GPU, limits[GPU]) == limits[GPU]  # extended resources: equal
    assert "num-gpus" not in group["rayStartParams"]  # KubeRay passes the GPU limit to `ray start`


def test_one_image_of_rays_own_with_distmaml_installed():
    cluster = rayjob()["spec"]["rayClusterSpec"]
    images = {c["image"] for c in cluster["headGroupSpec"]["template"]["spec"]["containers"]}
    for group in cluster["workerGroupSpecs"]:
        images |= {c["image"] for c in group["template"]["spec"]["containers"]}
    mlflow = kinds()[("Deployment", "distmaml-mlflow")]
    images |= {c["image"] for c in mlflow["spec"]["template"]["spec"]["containers"]}
    assert len(images) == 1, images
    dockerfile = (KUBERAY / "Dockerfile").read_text()
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    (base,) = re.findall(r"^FROM (\S+)$", dockerfile, re.M)
    assert base == f"rayproject/ray:{ray.__version__}-{python}-gpu"
    # the install step puts the project where the RayJob's working_dir expects it
    working_dir = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])["working_dir"]
    assert f"COPY --chown=ray:users . {working_dir}" in dockerfile
    assert f"-e {working_dir}" in dockerfile
    pins = dict(re.findall(r"\b(torch|torchvision)==(\S+)", dockerfile))
    assert set(pins) == {"torch", "torchvision"}


def entrypoint_argv() -> list[str]:
    argv = shlex.split(rayjob()["spec"]["entrypoint"])
    assert argv[:2] == ["distmaml", "tune"]
    return argv


def test_tracking_goes_to_the_mlflow_service_and_sweeps_to_a_shared_volume():
    argv = entrypoint_argv()
    objects = kinds()
    uri = next(v.split("=", 1)[1] for k, v in zip(argv, argv[1:]) if k == "--set" and v.startswith("tracking.uri="))
    match = re.fullmatch(r"http://([a-z0-9-]+):(\d+)", uri)
    assert match, uri
    service = objects[("Service", match[1])]  # a Service of the manifests, reached by its name in the namespace
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"  # inside the cluster only
    (port,) = [p for p in service["spec"]["ports"] if p["port"] == int(match[2])]
    deployment = next(d for (kind, _), d in objects.items() if kind == "Deployment")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()  # the Service's pods are the MLflow server's
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    (server,) = deployment["spec"]["template"]["spec"]["containers"]
    assert server["command"] == ["mlflow", "server"]
    assert {"name": "MLFLOW_SERVER_ENABLE_JOB_EXECUTION", "value": "false"} in server["env"]  # no job runner
    target = next(
        p for p in server["ports"] if p.get("name") == port["targetPort"] or p["containerPort"] == port["targetPort"]
    )
    assert f"--port={target['containerPort']}" in server["args"]
    allowed = next(a for a in server["args"] if a.startswith("--allowed-hosts=")).split("=", 1)[1].split(",")
    assert f"{match[1]}:{match[2]}" in allowed  # MLflow accepts the Host header the trials send
    # --storage: a folder on a ReadWriteMany claim that the head and every worker mount at the same place
    storage = argv[argv.index("--storage") + 1]
    cluster = rayjob()["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]["spec"]] + [g["template"]["spec"] for g in cluster["workerGroupSpecs"]]
    claims = set()
    for pod in pods:
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for c in pod["containers"] for m in c["volumeMounts"] if storage.startswith(m["mountPath"] + "/")]
        claims.add(volumes[mount["name"]]["persistentVolumeClaim"]["claimName"])
    (claim,) = claims
    assert objects[("PersistentVolumeClaim", claim)]["spec"]["accessModes"] == ["ReadWriteMany"]
    assert (ROOT / argv[argv.index("--space") + 1]).is_file()  # relative to the working_dir, the project


# --- the entrypoint, run through the Jobs API against a local head with its dashboard ------------------------


@pytest.fixture(scope="module")
def head():
    port = free_port()
    h = start_head(
        num_cpus=2,
        extra_args=["--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--dashboard-port", str(port)],
    )
    h.env["DISTMAML_DASHBOARD"] = f"http://127.0.0.1:{port}"
    try:
        yield h
    finally:
        h.stop()
        assert h.pids() == []


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """A real MLflow server on loopback, standing in for mlflow.yaml's Service."""
    with mlflow_server(tmp_path_factory.mktemp("mlflow")) as uri:
        yield uri


def fresh_copy(to: Path) -> Path:
    """The project as a user's checkout holds it (the files git tracks), without this run's leftovers."""
    for name in tracked_files():
        (to / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, to / name)
    return to


@pytest.mark.slow
def test_the_entrypoint_runs_through_the_jobs_api(head, mlflow_uri, tmp_path):
    argv = entrypoint_argv()
    sweeps = tmp_path / "sweeps"
    local = [a.replace(STORAGE, str(sweeps)).replace(TRACKING, f"tracking.uri={mlflow_uri}") for a in argv]
    assert local.count(str(sweeps)) == 1 and f"tracking.uri={mlflow_uri}" in local  # both names were there
    project = fresh_copy(tmp_path / "project")
    ray_cli = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.run(
        [ray_cli, "job", "submit", "--address", head.env["DISTMAML_DASHBOARD"], "--working-dir", str(project),
         "--", *local, *TINY],
        cwd=tmp_path, env=head.env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-5000:]
    assert "succeeded" in out
    assert list(sweeps.iterdir()), out[-3000:]  # Tune's storage: the trial's checkpoints
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=mlflow_uri)
    experiment = client.get_experiment_by_name("sinusoid")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 2 and all(r.info.status == "FINISHED" for r in runs), json.dumps([r.info.status for r in runs])
