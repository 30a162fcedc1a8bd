"""deploy/: the Kubernetes manifests and the Containerfile, checked without a cluster, a
container engine or the network, in a few seconds.

- Rendering: each overlay is rendered by tests/deploy_kustomize.py (kubectl is not
  installable from this project's package registries); a kustomization that uses a feature
  the renderer lacks fails. Where a `kubectl` is on PATH anyway, its `kubectl kustomize`
  output must equal ours.
- Schemas: every rendered object against the Kubernetes 1.30 JSON schemas shipped by
  `kubernetes-validate`, in strict mode (an unknown or misspelled field fails). The one
  custom resource, the Prometheus Operator's PodMonitor, has no schema there: its shape is
  checked here (CUSTOM_RESOURCES).
- Commands: the triton-al containers' command lines (and the preStop hook's) are parsed by
  the real CLI parser (typer's Click command, without running anything); tritonserver's
  flags must appear in the `--help` of the real tritonserver binary of the nvidia-pytriton
  wheel.
- Wiring: ports named by probes, Services and the PodMonitor are declared and listened on
  beyond loopback; the outbox path and volume are shared; every variable the containers read
  is set, secrets come from secretKeyRef only and only the uploader gets them; selectors
  select the pods; the shutdown budget adds up; the autoscaler's metric is the adapter
  rule's; the Containerfile's paths and names match the repository.

Each check is a function returning a list of problems; the `test_broken_*` tests feed
each one a broken copy of the rendered manifests and require it to complain.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import importlib
import importlib.util
import ipaddress
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

import kubernetes_validate  # the test extra: kubernetes-validate (Kubernetes' JSON schemas), PyYAML
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
import deploy_kustomize  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
OVERLAYS = ["cpu", "gpu", "fleet"]
COMPONENTS = ["ledger", "drift-watcher"]
# Overlays with optional components on top ("OVERLAY+COMPONENT+..."), rendered from a
# kustomization made for the test, as a user's overlay would list them.
COMBINED = ["gpu+ledger", "cpu+drift-watcher", "fleet+drift-watcher"]
RENDERED = OVERLAYS + COMBINED
KUBERNETES_VERSION = "1.30"
ADAPTER_RULES = K8S / "prometheus-adapter" / "rules.yaml"
SECRET_EXAMPLE = K8S / "secret.example.yaml"
CONTAINERFILE = DEPLOY / "Containerfile"

TRITONSERVER = "tritonserver"  # container names
UPLOADER = "uploader"
DRIFT = "drift-watcher"  # components/drift-watcher
# What the containers read from the environment, and where the code reads it (so that a
# rename in the code fails here too).
OUTBOX_ENV = "TRITON_AL_OUTBOX"
ADMIN_TOKEN_ENV = "TRITON_AL_ADMIN_TOKEN"
SINK_SECRETS = ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "LABEL_STUDIO_API_KEY", "DATATURE_SECRET_KEY"]
READ_WHERE = {
    OUTBOX_ENV: "rust/step/src/settings.rs",
    ADMIN_TOKEN_ENV: "python/triton_al/uploader/admin.py",
    "LABEL_STUDIO_API_KEY": "python/triton_al/sinks/labelstudio.py",
    "DATATURE_SECRET_KEY": "python/triton_al/sinks/nexus_worker.py",
    "TRITON_AL_NUM_THREADS": "rust/kernels/src/parallel.rs",
    "TRITON_AL_NEXUS_PYTHON": "python/triton_al/sinks/nexus.py",
    "TRITON_AL_LEDGER_PASSWORD": "python/triton_al/uploader/ledger.py",
}
SECRET_NAME = re.compile(r"(TOKEN|SECRET|PASSWORD|API_KEY|ACCESS_KEY|CREDENTIAL|AUTH)", re.I)
# The fleet's ledger (components/ledger): its Redis and what the uploader needs to reach it.
LEDGER = "triton-al-ledger"
LEDGER_PASSWORD_ENV = "TRITON_AL_LEDGER_PASSWORD"
WORKLOAD_KINDS = ("StatefulSet", "Deployment")
# A batch in flight when SIGTERM arrives: what the shutdown budget leaves for it.
BATCH_IN_FLIGHT_S = 30
# tritonserver's flags that the pod's ports depend on: port flag, address flag.
TRITON_LISTENERS = {"http": ("--http-port", "--http-address"), "grpc": ("--grpc-port", "--grpc-address"),
                    "metrics": ("--metrics-port", "--metrics-address")}


# --------------------------------------------------------------------------------------------
# Rendering and access


@contextlib.contextmanager
def kustomization_dir(overlay: str):
    """The directory to render: an overlay's, or ("OVERLAY+COMPONENT...") a temporary
    kustomization listing them by relative paths (kustomize refuses absolute ones)."""
    if "+" not in overlay:
        yield K8S / "overlays" / overlay
        return
    base, *components = overlay.split("+")
    with tempfile.TemporaryDirectory() as tmp:
        def rel(path: Path) -> str:
            return os.path.relpath(path, os.path.realpath(tmp))

        (Path(tmp) / "kustomization.yaml").write_text(yaml.safe_dump({
            "apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [rel(K8S / "overlays" / base)], "components": [rel(K8S / "components" / c) for c in components]}))
        yield Path(tmp)


@functools.cache
def _rendered(overlay: str) -> tuple:
    with kustomization_dir(overlay) as directory:
        return tuple(deploy_kustomize.render(directory))


def rendered(overlay: str) -> list[dict]:
    """A fresh copy (the broken-manifest tests change it)."""
    return copy.deepcopy(list(_rendered(overlay)))


def objects_of(objects: list[dict], kind: str) -> list[dict]:
    return [o for o in objects if o.get("kind") == kind]


def one(objects: list[dict], kind: str) -> dict:
    found = objects_of(objects, kind)
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(objects: list[dict]) -> dict:
    return one(objects, "StatefulSet")["spec"]["template"]["spec"]


def container(objects: list[dict], name: str) -> dict:
    spec = pod_spec(objects)
    found = [c for c in (spec.get("initContainers") or []) + (spec.get("containers") or []) if c.get("name") == name]
    assert len(found) == 1, f"expected one container {name}"
    return found[0]


def workloads(objects: list[dict]) -> list[dict]:
    return [o for o in objects if o.get("kind") in WORKLOAD_KINDS]


def workload_containers(workload: dict) -> list[dict]:
    spec = workload["spec"]["template"]["spec"]
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def selects(selector: dict, labels: dict) -> bool:
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def env_of(c: dict) -> dict[str, dict]:
    return {e["name"]: e for e in c.get("env") or []}


def prestop_command(c: dict) -> list[str]:
    return (((c.get("lifecycle") or {}).get("preStop") or {}).get("exec") or {}).get("command") or []


def _expand(arg: str, env: dict[str, dict], configmaps: dict[str, dict], problems: list[str], where: str) -> str:
    """Kubernetes' $(VAR) expansion in command/args, from the container's env."""

    def value(match: re.Match) -> str:
        name = match.group(1)
        entry = env.get(name)
        if entry is None:
            problems.append(f"{where}: $({name}) is not set in the container's env (it would stay literal)")
            return match.group(0)
        if "value" in entry:
            return str(entry["value"])
        ref = (entry.get("valueFrom") or {}).get("configMapKeyRef")
        if ref:
            return str(configmaps.get(ref["name"], {}).get(ref["key"], f"<{name}>"))
        return f"<{name}>"

    return re.sub(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)", value, arg)


def configmaps(objects: list[dict]) -> dict[str, dict]:
    return {o["metadata"]["name"]: o.get("data") or {} for o in objects_of(objects, "ConfigMap")}


# --------------------------------------------------------------------------------------------
# The real command-line parsers


@functools.cache
def _cli():
    import typer.main

    from triton_al.cli import app

    root = typer.main.get_command(app)
    # typer's own Click (vendored in newer typer) or click: whichever built this command.
    exceptions = importlib.import_module(root.context_class.__module__.rsplit(".", 1)[0] + ".exceptions")
    return root, exceptions.ClickException


def parse_triton_al(argv: list[str]) -> tuple[list[str], dict]:
    """Parse `triton-al ARGS...` with the real parser, without running the command: returns
    (the command path, its parameters); raises ValueError naming the problem."""
    root, click_error = _cli()
    if not argv or Path(argv[0]).name != "triton-al":
        raise ValueError(f"not a triton-al command line: {argv}")
    command, ctx, args, path = root, root.context_class(root, info_name="triton-al"), list(argv[1:]), []
    while hasattr(command, "get_command") and hasattr(command, "list_commands"):  # a group
        if path and getattr(command, "invoke_without_command", False) and (not args or args[0].startswith("-")):
            break  # a group that is a command too (`triton-al drift --reference ...`): parse its own options
        if not args or args[0].startswith("-"):
            raise ValueError(f"triton-al {' '.join(path)}: no subcommand in {argv}")
        sub = command.get_command(ctx, args[0])
        if sub is None:
            raise ValueError(f"triton-al {' '.join(path)}: no such command {args[0]!r}")
        path.append(args.pop(0))
        if hasattr(sub, "get_command") and hasattr(sub, "list_commands"):
            ctx = sub.context_class(sub, info_name=path[-1], parent=ctx)
        command = sub
    try:
        parsed = command.make_context(path[-1], args, parent=ctx)
    except click_error as e:
        raise ValueError(f"triton-al {' '.join(path)}: {e.format_message()}") from None
    return path, dict(parsed.params)


@functools.cache
def tritonserver_help() -> str | None:
    """The --help of the nvidia-pytriton wheel's tritonserver (2.51), or None without it."""
    spec = importlib.util.find_spec("pytriton")
    if spec is None or spec.origin is None:
        return None
    base = Path(spec.origin).resolve().parent
    binary = base / "tritonserver" / "bin" / "tritonserver"
    libs = base.parent / "nvidia_pytriton.libs"
    if not binary.exists():
        return None
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"),
           "LD_LIBRARY_PATH": os.pathsep.join(p for p in (str(libs), os.environ.get("LD_LIBRARY_PATH", "")) if p)}
    done = subprocess.run([str(binary), "--help"], capture_output=True, text=True, env=env, timeout=60)
    text = done.stdout + done.stderr
    assert "--model-repository" in text, f"tritonserver --help printed no flags (exit {done.returncode}): {text[-2000:]}"
    return text


def tritonserver_flags(help_text: str) -> dict[str, bool]:
    """Each flag of `tritonserver --help` -> whether it takes a value (`--flag <type>`)."""
    # Definitions are indented by spaces; mentions inside descriptions by a tab.
    return {flag: bool(value) for flag, value in re.findall(r"^ +(--[a-z0-9][a-z0-9-]*)(?: +(<.*>))? *$", help_text, flags=re.M)}


def tritonserver_argv(c: dict) -> list[str]:
    argv = list(c.get("command") or []) + list(c.get("args") or [])
    for i, arg in enumerate(argv):
        if Path(arg).name == "tritonserver":
            return argv[i:]
    raise AssertionError(f"container {c.get('name')} does not run tritonserver: {argv}")


def tritonserver_options(argv: list[str]) -> dict[str, str]:
    return dict(arg.split("=", 1) if "=" in arg else (arg, "") for arg in argv[1:])


def uploader_params(objects: list[dict]) -> dict:
    c = container(objects, UPLOADER)
    argv = [_expand(a, env_of(c), configmaps(objects), [], "") for a in (c.get("command") or []) + (c.get("args") or [])]
    return parse_triton_al(argv)[1]


def prestop_triton_al_lines(c: dict) -> list[list[str]]:
    """The triton-al invocations of a container's preStop hook (a command, or a shell script)."""
    command = prestop_command(c)
    if command[:1] and Path(command[0]).name == "triton-al":
        return [command]
    lines = []
    if len(command) >= 3 and Path(command[0]).name in ("sh", "bash") and command[1] == "-c":
        for line in command[2].splitlines():
            words = shlex.split(line, comments=True)
            while words and words[0] in ("exec", "command"):
                words = words[1:]
            if words and Path(words[0]).name == "triton-al":
                lines.append(words)
    return lines


# --------------------------------------------------------------------------------------------
# The checks: each returns a list of problems (empty: fine)


def check_podmonitor(obj: dict, pod_labels: dict, port_names: set[str]) -> list[str]:
    """The PodMonitor's shape (monitoring.coreos.com/v1), as far as this deployment uses it."""
    problems = []
    spec = obj.get("spec")
    if not isinstance(spec, dict):
        return ["PodMonitor: no spec"]
    known = {"selector", "podMetricsEndpoints", "namespaceSelector", "jobLabel", "podTargetLabels", "sampleLimit",
             "targetLimit", "labelLimit", "labelNameLengthLimit", "labelValueLengthLimit", "attachMetadata",
             "keepDroppedTargets", "scrapeProtocols", "scrapeClass", "bodySizeLimit"}
    problems += [f"PodMonitor: unknown spec field {k!r}" for k in spec if k not in known]
    selector = spec.get("selector")
    if not isinstance(selector, dict) or not isinstance(selector.get("matchLabels"), dict) or not selector["matchLabels"]:
        problems.append("PodMonitor: spec.selector.matchLabels is required")
    elif any(pod_labels.get(k) != v for k, v in selector["matchLabels"].items()):
        problems.append(f"PodMonitor: selector {selector['matchLabels']} does not select the pods {pod_labels}")
    endpoints = spec.get("podMetricsEndpoints")
    if not isinstance(endpoints, list) or not endpoints:
        problems.append("PodMonitor: spec.podMetricsEndpoints must be a non-empty list")
        endpoints = []
    endpoint_fields = {"port", "portNumber", "targetPort", "path", "scheme", "interval", "scrapeTimeout", "honorLabels",
                       "honorTimestamps", "relabelings", "metricRelabelings", "params", "tlsConfig", "basicAuth",
                       "authorization", "oauth2", "proxyUrl", "followRedirects", "enableHttp2", "filterRunning",
                       "trackTimestampsStaleness", "bearerTokenSecret"}
    for i, ep in enumerate(endpoints):
        if not isinstance(ep, dict):
            problems.append(f"PodMonitor: podMetricsEndpoints[{i}] is not a mapping")
            continue
        problems += [f"PodMonitor: podMetricsEndpoints[{i}]: unknown field {k!r}" for k in ep if k not in endpoint_fields]
        if not isinstance(ep.get("port"), str):
            problems.append(f"PodMonitor: podMetricsEndpoints[{i}].port must name a container port")
        elif ep["port"] not in port_names:
            problems.append(f"PodMonitor: podMetricsEndpoints[{i}] scrapes port {ep['port']!r}, which no container declares")
        if not str(ep.get("path", "/metrics")).startswith("/"):
            problems.append(f"PodMonitor: podMetricsEndpoints[{i}].path must start with /")
        for field in ("interval", "scrapeTimeout"):
            if field in ep and not re.fullmatch(r"(\d+(ms|s|m|h))+", str(ep[field])):
                problems.append(f"PodMonitor: podMetricsEndpoints[{i}].{field} {ep[field]!r} is not a duration")
    return problems


CUSTOM_RESOURCES = {("monitoring.coreos.com/v1", "PodMonitor"): check_podmonitor}


def pod_port_names(objects: list[dict]) -> set[str]:
    spec = pod_spec(objects)
    return {p["name"] for c in (spec.get("initContainers") or []) + spec["containers"] for p in c.get("ports") or [] if "name" in p}


def schema_problems(objects: list[dict]) -> list[str]:
    problems = []
    pod_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    for obj in objects:
        what = f"{obj.get('kind')}/{(obj.get('metadata') or {}).get('name')}"
        custom = CUSTOM_RESOURCES.get((obj.get("apiVersion"), obj.get("kind")))
        if custom is not None:
            problems += custom(obj, pod_labels, pod_port_names(objects))
            continue
        try:
            kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)
        except kubernetes_validate.ValidationError as e:
            problems.append(f"{what}: {e.message} at {'/'.join(map(str, e.path))}")
        except kubernetes_validate.SchemaNotFoundError as e:
            problems.append(f"{what}: {e.message} (and it is not in CUSTOM_RESOURCES)")
    return problems


def cli_problems(objects: list[dict]) -> list[str]:
    """Every triton-al command line in the pods parses with the real CLI."""
    problems = []
    maps = configmaps(objects)
    spec = pod_spec(objects)
    found = 0
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        env = env_of(c)
        lines = []
        argv = list(c.get("command") or []) + list(c.get("args") or [])
        if argv and Path(argv[0]).name == "triton-al":
            lines.append(("command", argv))
        lines += [("preStop", line) for line in prestop_triton_al_lines(c)]
        for where, line in lines:
            found += 1
            expanded = [_expand(a, env, maps, problems, f"{c['name']} {where}") for a in line]
            try:
                path, params = parse_triton_al(expanded)
            except ValueError as e:
                problems.append(f"{c['name']} {where}: {e}")
                continue
            if path == ["uploader"]:
                if (params.get("sink") is None) == (params.get("store") is None):
                    problems.append(f"{c['name']}: the uploader needs exactly one of --sink or --store")
                if params.get("log_format") not in ("json", "text"):
                    problems.append(f"{c['name']}: --log-format must be json or text")
    if not found:
        problems.append("no triton-al command line found in the pod")
    return problems


def tritonserver_problems(objects: list[dict], known: dict[str, bool]) -> list[str]:
    problems = []
    argv = tritonserver_argv(container(objects, TRITONSERVER))
    for arg in argv[1:]:
        flag = arg.split("=", 1)[0]
        if not arg.startswith("--"):
            problems.append(f"tritonserver: {arg!r} is not a flag (write flags as --flag=value)")
        elif flag not in known:
            problems.append(f"tritonserver: {flag} is not a flag of tritonserver (--help)")
        elif known[flag] and "=" not in arg:
            problems.append(f"tritonserver: {flag} takes a value: write it as --flag=value")
        elif not known[flag] and "=" in arg:
            problems.append(f"tritonserver: {flag} takes no value")
    options = tritonserver_options(argv)
    if options.get("--model-control-mode", "none") not in ("none", "poll", "explicit"):
        problems.append(f"tritonserver: --model-control-mode={options['--model-control-mode']} is not none, poll or explicit")
    return problems


def _is_loopback(address: str) -> bool:
    try:
        return address == "localhost" or ipaddress.ip_address(address.strip("[]")).is_loopback
    except ValueError:
        return False


def port_problems(objects: list[dict]) -> list[str]:
    """Ports named by probes, Services and the PodMonitor are declared by a container that
    listens on them beyond loopback; port names are valid and unique; selectors select."""
    problems = []
    sts = one(objects, "StatefulSet")
    spec = pod_spec(objects)
    pod_labels = sts["spec"]["template"]["metadata"]["labels"]
    containers = (spec.get("initContainers") or []) + spec["containers"]
    by_name: dict[str, tuple[str, int]] = {}
    numbers: set[int] = set()
    for c in containers:
        for p in c.get("ports") or []:
            numbers.add(p["containerPort"])
            if "name" in p:
                if p["name"] in by_name:
                    problems.append(f"port name {p['name']!r} declared twice in the pod")
                if not re.fullmatch(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?", p["name"]) or len(p["name"]) > 15 or not re.search("[a-z]", p["name"]):
                    problems.append(f"port name {p['name']!r} is not a valid port name (at most 15 characters, a-z0-9-)")
                by_name[p["name"]] = (c["name"], p["containerPort"])
    # Probes: a named port is looked up in the probe's own container.
    for c in containers:
        own = {p.get("name"): p["containerPort"] for p in c.get("ports") or []}
        for probe_kind in ("startupProbe", "readinessProbe", "livenessProbe"):
            probe = c.get(probe_kind)
            if not probe:
                continue
            for handler in ("httpGet", "tcpSocket", "grpc"):
                if handler in probe:
                    port = probe[handler].get("port")
                    if isinstance(port, str) and port not in own:
                        problems.append(f"{c['name']} {probe_kind}: port {port!r} is not declared by this container")
                    if isinstance(port, int) and port not in own.values():
                        problems.append(f"{c['name']} {probe_kind}: port {port} is not declared by this container")
    # Services and their selectors: each selects the pods of one workload (the triton-al
    # StatefulSet's, or another's such as the ledger's), and targets that pod's ports.
    for svc in objects_of(objects, "Service"):
        selector = svc["spec"].get("selector") or {}
        selected = [w for w in workloads(objects) if selects(selector, w["spec"]["template"]["metadata"]["labels"])]
        if len(selected) != 1:
            problems.append(f"Service/{svc['metadata']['name']}: selector {selector} does not select the pods of exactly one "
                            f"workload (it selects {[w['metadata']['name'] for w in selected]})")
            continue
        if selected[0] is sts:
            names, nums = set(by_name), numbers
        else:
            declared = [p for c in workload_containers(selected[0]) for p in c.get("ports") or []]
            names, nums = {p.get("name") for p in declared}, {p["containerPort"] for p in declared}
        for p in svc["spec"].get("ports") or []:
            target = p.get("targetPort", p["port"])
            if isinstance(target, str) and target not in names:
                problems.append(f"Service/{svc['metadata']['name']}: targetPort {target!r} is not a declared container port")
            if isinstance(target, int) and target not in nums:
                problems.append(f"Service/{svc['metadata']['name']}: targetPort {target} is not a declared container port")
    headless = [s["metadata"]["name"] for s in objects_of(objects, "Service") if s["spec"].get("clusterIP") == "None"]
    if sts["spec"].get("serviceName") not in headless:
        problems.append(f"StatefulSet: serviceName {sts['spec'].get('serviceName')!r} is not a headless Service here ({headless})")
    for kind in ("PodDisruptionBudget", "PodMonitor"):
        for obj in objects_of(objects, kind):
            match = (obj["spec"].get("selector") or {}).get("matchLabels") or {}
            if not match or any(pod_labels.get(k) != v for k, v in match.items()):
                problems.append(f"{kind}/{obj['metadata']['name']}: selector {match} does not select the pods")
    for pm in objects_of(objects, "PodMonitor"):
        for ep in pm["spec"].get("podMetricsEndpoints") or []:
            if ep.get("port") not in by_name:
                problems.append(f"PodMonitor: port {ep.get('port')!r} is not a declared container port")
    if sts["spec"]["selector"]["matchLabels"] != {k: pod_labels.get(k) for k in sts["spec"]["selector"]["matchLabels"]}:
        problems.append("StatefulSet: spec.selector does not match the pod template's labels")
    # Every declared port is listened on, beyond loopback, by its container's process.
    triton = tritonserver_options(tritonserver_argv(container(objects, TRITONSERVER)))
    for name, (owner, number) in by_name.items():
        if owner == TRITONSERVER:
            if name not in TRITON_LISTENERS:
                problems.append(f"tritonserver declares port {name!r}, which it has no flag for")
                continue
            port_flag, address_flag = TRITON_LISTENERS[name]
            if triton.get(port_flag) != str(number):
                problems.append(f"tritonserver: port {name} is {number} but {port_flag}={triton.get(port_flag)}")
            if _is_loopback(triton.get(address_flag, "0.0.0.0")):
                problems.append(f"tritonserver: {address_flag} is loopback, but port {name} is used from outside the pod")
        elif owner == UPLOADER:
            try:
                params = uploader_params(objects)
            except ValueError as e:
                problems.append(str(e))
                continue
            if params.get("metrics_port") == number:
                if _is_loopback(params.get("metrics_address", "127.0.0.1")):
                    problems.append(f"uploader: /metrics on loopback (--metrics-address), but port {name} is probed and scraped")
            elif params.get("admin_port") == number:
                if _is_loopback(params.get("admin_address", "127.0.0.1")):
                    problems.append(f"uploader: port {name} is declared but the admin API listens on loopback only")
            else:
                problems.append(f"uploader: port {name} ({number}) is neither --metrics-port nor --admin-port")
        elif owner == DRIFT:
            try:
                params = drift_params(objects)
            except ValueError as e:
                problems.append(str(e))
                continue
            if params.get("serve_metrics") != number:
                problems.append(f"{DRIFT}: port {name} ({number}) is not its --serve-metrics ({params.get('serve_metrics')})")
            elif _is_loopback(params.get("serve_address", "127.0.0.1")):
                problems.append(f"{DRIFT}: --serve-address is loopback, but port {name} is probed and scraped")
        else:
            problems.append(f"{owner} declares port {name!r}, but no check here knows what listens on it")
    return problems


def env_problems(objects: list[dict]) -> list[str]:
    problems = []
    spec = pod_spec(objects)
    sts = one(objects, "StatefulSet")
    triton, uploader = container(objects, TRITONSERVER), container(objects, UPLOADER)
    triton_env, uploader_env = env_of(triton), env_of(uploader)
    # The outbox: one file on the per-pod claim, seen by both containers at the same path.
    claims = {t["metadata"]["name"] for t in sts["spec"].get("volumeClaimTemplates") or []}
    outbox = (triton_env.get(OUTBOX_ENV) or {}).get("value")
    if not outbox:
        problems.append(f"tritonserver: {OUTBOX_ENV} is not set to a path (the step appends there)")
    else:
        try:
            params = uploader_params(objects)
        except ValueError as e:
            params = {}
            problems.append(str(e))
        if str(params.get("outbox")) != outbox:
            problems.append(f"uploader --outbox {params.get('outbox')} is not the step's {OUTBOX_ENV}={outbox}")
        mounts = {}
        for c in (triton, uploader):
            for m in c.get("volumeMounts") or []:
                if outbox.startswith(m["mountPath"].rstrip("/") + "/"):
                    mounts[c["name"]] = (m["name"], m["mountPath"])
        if len(mounts) != 2 or len(set(mounts.values())) != 1:
            problems.append(f"the outbox {outbox} is not on one volume mounted at one path in both containers: {mounts}")
        elif next(iter(mounts.values()))[0] not in claims:
            problems.append(f"the outbox's volume {next(iter(mounts.values()))[0]!r} is not a per-pod claim (volumeClaimTemplates)")
    # The uploader's secrets: from secretKeyRef; the admin token required.
    for name in [ADMIN_TOKEN_ENV, *SINK_SECRETS]:
        entry = uploader_env.get(name)
        if entry is None:
            problems.append(f"uploader: {name} is not set")
        elif not (entry.get("valueFrom") or {}).get("secretKeyRef"):
            problems.append(f"uploader: {name} must come from a secretKeyRef")
    token = ((uploader_env.get(ADMIN_TOKEN_ENV) or {}).get("valueFrom") or {}).get("secretKeyRef") or {}
    if token.get("optional"):
        problems.append(f"uploader: {ADMIN_TOKEN_ENV} is optional, but --admin-require-token refuses to start without it")
    # No literal secrets anywhere, and none for tritonserver (nor its Python-backend processes).
    example = yaml.safe_load(SECRET_EXAMPLE.read_text())
    others = [c for w in workloads(objects) if w is not sts for c in workload_containers(w)]
    for c in others:  # the ledger's Redis and the like: the same rules for secrets
        for entry in c.get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if "value" in entry and SECRET_NAME.search(entry["name"]):
                problems.append(f"{c['name']}: {entry['name']} is a literal value; secrets come from a secretKeyRef")
            if ref and (ref.get("name") != example["metadata"]["name"] or ref.get("key") not in example["stringData"]):
                problems.append(f"{c['name']}: {entry['name']} reads {ref.get('name')}/{ref.get('key')}, not in {SECRET_EXAMPLE.name}")
    for c in (spec.get("initContainers") or []) + spec["containers"]:
        for entry in c.get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("secretKeyRef")
            if "value" in entry and SECRET_NAME.search(entry["name"]):
                problems.append(f"{c['name']}: {entry['name']} is a literal value; secrets come from a secretKeyRef")
            if ref and c["name"] == TRITONSERVER:
                problems.append(f"tritonserver gets the secret {entry['name']}: only the uploader may")
            if ref and (ref.get("name") != example["metadata"]["name"] or ref.get("key") not in example["stringData"]):
                problems.append(f"{c['name']}: {entry['name']} reads {ref.get('name')}/{ref.get('key')}, not in {SECRET_EXAMPLE.name}")
        for source in c.get("envFrom") or []:
            if "secretRef" in source and c["name"] == TRITONSERVER:
                problems.append("tritonserver gets a whole Secret through envFrom")
        # ConfigMap keys that are required must exist.
        for entry in c.get("env") or []:
            ref = (entry.get("valueFrom") or {}).get("configMapKeyRef")
            if ref and not ref.get("optional") and ref["key"] not in configmaps(objects).get(ref["name"], {}):
                problems.append(f"{c['name']}: {entry['name']} needs key {ref['key']} of ConfigMap {ref['name']}, which is not there")
        # $(VAR) references in the command, the args and the preStop hook are defined.
        for arg in (c.get("command") or []) + (c.get("args") or []):
            _expand(arg, env_of(c), configmaps(objects), problems, c["name"])
    return problems


def shutdown_problems(objects: list[dict]) -> list[str]:
    """The preStop hooks and the grace period fit together (see statefulset.yaml)."""
    problems = []
    spec = pod_spec(objects)
    grace = spec.get("terminationGracePeriodSeconds", 30)
    triton, uploader = container(objects, TRITONSERVER), container(objects, UPLOADER)
    if uploader not in (spec.get("initContainers") or []) or uploader.get("restartPolicy") != "Always":
        problems.append("uploader: expected a native sidecar (an init container with restartPolicy: Always)")
    sleep = prestop_command(triton)
    sleep_s = int(sleep[1]) if len(sleep) == 2 and Path(sleep[0]).name == "sleep" and sleep[1].isdigit() else None
    if sleep_s is None:
        problems.append(f"tritonserver preStop: expected `sleep N`, got {sleep}")
        sleep_s = 0
    options = tritonserver_options(tritonserver_argv(triton))
    exit_s = int(options.get("--exit-timeout-secs", "30"))
    script = " ".join(prestop_command(uploader))
    wait = re.search(r"seq (\d+)\)", script)
    probe = re.search(r"/dev/tcp/127\.0\.0\.1/(\d+)", script)
    flushes = [line for line in prestop_triton_al_lines(uploader) if line[1:3] == ["admin", "flush"]]
    if not (wait and probe and len(flushes) == 1):
        return problems + [f"uploader preStop: expected a bounded wait on tritonserver's port, then `triton-al admin flush`: {script!r}"]
    wait_s = int(wait.group(1))
    if probe.group(1) != options.get("--grpc-port"):
        problems.append(f"uploader preStop waits on port {probe.group(1)}; tritonserver closes its gRPC port "
                        f"({options.get('--grpc-port')}) last, after the models are unloaded")
    try:
        _, flush = parse_triton_al(flushes[0])
        params = uploader_params(objects)
    except ValueError as e:
        return problems + [str(e)]
    if not flush["address"].endswith(f":{params.get('admin_port')}") or not _is_loopback(flush["address"].rsplit(":", 1)[0]):
        problems.append(f"uploader preStop flushes {flush['address']}, not this uploader's admin API on 127.0.0.1:{params.get('admin_port')}")
    if flush["timeout"] > params["admin_max_flush_seconds"]:
        problems.append(f"uploader preStop: flush --timeout {flush['timeout']} is over --admin-max-flush-seconds")
    if wait_s < sleep_s + exit_s + 10:
        problems.append(f"uploader preStop waits {wait_s} s, less than tritonserver's {sleep_s} s + {exit_s} s drain (+10)")
    if wait_s + flush["timeout"] + BATCH_IN_FLIGHT_S > grace:
        problems.append(f"terminationGracePeriodSeconds {grace} < wait {wait_s} + flush {flush['timeout']:g} + batch in flight {BATCH_IN_FLIGHT_S}")
    return problems


def autoscaling_problems(objects: list[dict], rules_text: str) -> list[str]:
    problems = []
    sts = one(objects, "StatefulSet")
    hpa = one(objects, "HorizontalPodAutoscaler")
    ref = hpa["spec"]["scaleTargetRef"]
    if (ref.get("kind"), ref.get("name"), ref.get("apiVersion")) != ("StatefulSet", sts["metadata"]["name"], sts["apiVersion"]):
        problems.append(f"HPA scaleTargetRef {ref} is not the StatefulSet")
    if "replicas" in sts["spec"]:
        problems.append("StatefulSet sets replicas, which the HPA owns (every apply would reset it)")
    rules = (yaml.safe_load(rules_text).get("rules") or {}).get("custom") or []
    served = {r["name"]["as"]: r for r in rules}
    pods_metrics = [m["pods"]["metric"]["name"] for m in hpa["spec"].get("metrics") or [] if m.get("type") == "Pods"]
    if not pods_metrics:
        problems.append("HPA: no Pods metric")
    for name in pods_metrics:
        rule = served.get(name)
        if rule is None:
            problems.append(f"HPA metric {name!r} is served by no Prometheus adapter rule ({sorted(served)})")
            continue
        overrides = rule.get("resources", {}).get("overrides", {})
        if overrides.get("pod", {}).get("resource") != "pod" or overrides.get("namespace", {}).get("resource") != "namespace":
            problems.append(f"adapter rule {name}: series are not mapped to pods and namespaces")
        query = rule.get("metricsQuery", "")
        for needed in ("<<.LabelMatchers>>", "<<.GroupBy>>", "nv_inference_queue_duration_us"):
            if needed not in query:
                problems.append(f"adapter rule {name}: metricsQuery lacks {needed}")
        if "nv_inference_queue_duration_us" not in rule.get("seriesQuery", ""):
            problems.append(f"adapter rule {name}: seriesQuery is not Triton's queue time")
    pdb = one(objects, "PodDisruptionBudget")
    if pdb["spec"].get("maxUnavailable", 0) >= hpa["spec"].get("minReplicas", 1):
        problems.append("the PodDisruptionBudget allows every replica of the smallest set to be evicted at once")
    return problems


def drift_params(objects: list[dict]) -> dict:
    c = container(objects, DRIFT)
    argv = [_expand(a, env_of(c), configmaps(objects), [], "") for a in (c.get("command") or []) + (c.get("args") or [])]
    path, params = parse_triton_al(argv)
    if path != ["drift"]:
        raise ValueError(f"{DRIFT}: runs `triton-al {' '.join(path)}`, not `triton-al drift`")
    return params


def drift_problems(objects: list[dict]) -> list[str]:
    """The drift watcher (components/drift-watcher) reads this pod's tritonserver, keeps its
    reference on the pod's claim, exports its gauges where the PodMonitor scrapes, and runs
    the pod's image."""
    problems = []
    try:
        params = drift_params(objects)
    except ValueError as e:
        return [str(e)]
    triton = tritonserver_options(tritonserver_argv(container(objects, TRITONSERVER)))
    wanted = f"http://127.0.0.1:{triton.get('--metrics-port')}/metrics"
    if list(params.get("metrics_url") or []) != [wanted]:
        problems.append(f"{DRIFT}: --metrics-url {params.get('metrics_url')} is not this pod's tritonserver ({wanted})")
    if params.get("url") != f"127.0.0.1:{triton.get('--grpc-port')}":
        problems.append(f"{DRIFT}: --url {params.get('url')} is not this pod's tritonserver gRPC port ({triton.get('--grpc-port')})")
    if params.get("serve_metrics") is None:
        problems.append(f"{DRIFT}: no --serve-metrics: nothing exports the gauges")
    if not params.get("watch") and params.get("serve_metrics") is None:
        problems.append(f"{DRIFT}: neither --watch nor --serve-metrics: it would check once and exit (and be restarted)")
    reference = str(params.get("reference") or "")
    c = container(objects, DRIFT)
    claims = {t["metadata"]["name"] for t in one(objects, "StatefulSet")["spec"].get("volumeClaimTemplates") or []}
    mounts = [m for m in c.get("volumeMounts") or [] if reference.startswith(m["mountPath"].rstrip("/") + "/")]
    if not mounts:
        problems.append(f"{DRIFT}: --reference {reference} is on no mounted volume (a recorded reference would be lost on restart)")
    elif params.get("record_first") and mounts[0]["name"] not in claims:
        problems.append(f"{DRIFT}: --reference {reference} is recorded (--record-first) on {mounts[0]['name']!r}, not on the pod's claim")
    if c.get("image") != container(objects, TRITONSERVER).get("image"):
        problems.append(f"{DRIFT}: image {c.get('image')} is not the pod's ({container(objects, TRITONSERVER).get('image')})")
    port = next((p.get("name") for p in c.get("ports") or [] if p["containerPort"] == params.get("serve_metrics")), None)
    scraped = {ep.get("port") for pm in objects_of(objects, "PodMonitor") for ep in pm["spec"].get("podMetricsEndpoints") or []}
    if port is None or port not in scraped:
        problems.append(f"{DRIFT}: the PodMonitor does not scrape its gauges (port {port!r} for --serve-metrics {params.get('serve_metrics')})")
    return problems


def redis_config(text: str) -> dict[str, str]:
    """redis.conf directives: name (lower case) -> the rest of its line (the last one wins)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, rest = line.partition(" ")
            out[name.lower()] = rest.strip()
    return out


def _memory_bytes(text: str) -> int:
    """A Kubernetes quantity (Mi, Gi, M, G) or a redis.conf size (mb, gb) in bytes."""
    m = re.fullmatch(r"(\d+)\s*([KMGkmg]i?|[kmg]b)?", str(text).strip())
    if not m:
        raise ValueError(f"not a memory size: {text!r}")
    unit = (m.group(2) or "").lower()
    scale = {"": 1, "k": 1000, "m": 1000 ** 2, "g": 1000 ** 3, "ki": 1024, "mi": 1024 ** 2, "gi": 1024 ** 3,
             "kb": 1024, "mb": 1024 ** 2, "gb": 1024 ** 3}[unit]  # redis' kb/mb/gb are powers of 1024
    return int(m.group(1)) * scale


def ledger_redis(objects: list[dict]) -> tuple[dict, dict, str, str]:
    """The ledger's Deployment, its Redis container, the start script and the redis.conf text it reads."""
    deployment = next(o for o in objects_of(objects, "Deployment") if o["metadata"]["name"] == LEDGER)
    redis = next(c for c in workload_containers(deployment) if c["name"] == "redis")
    script = (redis.get("args") or [""])[-1]
    m = re.search(r"redis-server (\S+)", script)
    path = m.group(1) if m else ""
    text = ""
    for mount in redis.get("volumeMounts") or []:
        if path.startswith(mount["mountPath"].rstrip("/") + "/"):
            volume = next((v for v in deployment["spec"]["template"]["spec"].get("volumes") or [] if v["name"] == mount["name"]), {})
            data = configmaps(objects).get((volume.get("configMap") or {}).get("name"), {})
            text = data.get(path[len(mount["mountPath"].rstrip("/")) + 1:], "")
    return deployment, redis, script, text


def ledger_problems(objects: list[dict]) -> list[str]:
    """The fleet's ledger (components/ledger): a Redis that keeps what it is told (append-only,
    fsync always, no eviction, on a claim), a password from the Secret given to it without a
    command line, and the uploader pointed at its Service with the same password."""
    from triton_al.uploader.ledger import parse_ledger_uri

    problems = []
    if not any(o["metadata"]["name"] == LEDGER for o in objects_of(objects, "Deployment")):
        return [f"no Deployment {LEDGER}"]
    deployment, redis, script, text = ledger_redis(objects)
    if deployment["spec"].get("replicas", 1) != 1:
        problems.append(f"{LEDGER}: replicas must be 1 (one ledger; replicas of a Redis are not the same counts)")
    if (deployment["spec"].get("strategy") or {}).get("type") != "Recreate":
        problems.append(f"{LEDGER}: strategy must be Recreate (a rolling update would start a second Redis on the ReadWriteOnce volume)")
    if not text:
        return problems + [f"{LEDGER}: the redis.conf its script starts with ({script!r}) is not in a mounted ConfigMap"]
    conf = redis_config(text)
    if conf.get("appendonly") != "yes":
        problems.append(f"{LEDGER}: appendonly is {conf.get('appendonly')!r}: a restart would forget the window's counts")
    if conf.get("appendfsync") != "always":
        problems.append(f"{LEDGER}: appendfsync is {conf.get('appendfsync')!r}, not always: a crash loses acknowledged grants")
    if conf.get("maxmemory-policy") != "noeviction":
        problems.append(f"{LEDGER}: maxmemory-policy is {conf.get('maxmemory-policy')!r}, not noeviction: an evicted counter is an overshoot")
    limit = (redis.get("resources") or {}).get("limits", {}).get("memory")
    if not conf.get("maxmemory") or not limit or _memory_bytes(conf["maxmemory"]) >= _memory_bytes(limit):
        problems.append(f"{LEDGER}: maxmemory {conf.get('maxmemory')} must be set below the container's memory limit {limit}")
    if "requirepass" in conf or "user" in conf:
        problems.append(f"{LEDGER}: a password in the ConfigMap; it comes from the Secret")
    mounts = {m["mountPath"].rstrip("/"): m["name"] for m in redis.get("volumeMounts") or []}
    volumes = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes") or []}
    claims = {o["metadata"]["name"] for o in objects_of(objects, "PersistentVolumeClaim")}
    data = volumes.get(mounts.get(conf.get("dir", "").rstrip("/"), ""), {})
    if (data.get("persistentVolumeClaim") or {}).get("claimName") not in claims:
        problems.append(f"{LEDGER}: dir {conf.get('dir')} is not on a PersistentVolumeClaim of this deployment")
    # The password: from the Secret, to redis-server on stdin; never on a command line.
    env = env_of(redis)
    password_var = next((name for name in env if re.search(rf"requirepass \$\{{?{name}\b", script)), None)
    if password_var is None:
        problems.append(f"{LEDGER}: the start script does not give redis-server `requirepass $VAR` from the container's env")
    if re.search(r"--requirepass|redis-server[^\n]*\$", script) or any("requirepass" in a for a in redis.get("command") or []):
        problems.append(f"{LEDGER}: the password is on redis-server's command line (visible to every process of the pod)")
    if not re.search(r"redis-server \S+ - <<", script):
        problems.append(f"{LEDGER}: redis-server must read the password from its standard input (`redis-server FILE - <<EOF`)")
    redis_ref = ((env.get(password_var or "") or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not redis_ref:
        problems.append(f"{LEDGER}: the password variable {password_var} is not from a secretKeyRef")
    probe = " ".join(((redis.get("readinessProbe") or {}).get("exec") or {}).get("command") or [])
    if "redis-cli" not in probe or "PONG" not in probe or password_var != "REDISCLI_AUTH":
        problems.append(f"{LEDGER}: the readiness probe must PING with redis-cli, authenticated by REDISCLI_AUTH")
    ports = {p.get("name"): p["containerPort"] for p in redis.get("ports") or []}
    if str(ports.get("redis")) != conf.get("port"):
        problems.append(f"{LEDGER}: containerPort redis {ports.get('redis')} is not redis.conf's port {conf.get('port')}")
    # The uploader reaches it: its Service, its port, the same password.
    service = next((o for o in objects_of(objects, "Service") if o["metadata"]["name"] == LEDGER), None)
    try:
        params = uploader_params(objects)
        address = parse_ledger_uri(params.get("budget_ledger") or "")
    except ValueError as e:
        return problems + [f"uploader --budget-ledger: {e}"]
    if service is None:
        return problems + [f"no Service {LEDGER}"]
    service_port = next((p["port"] for p in service["spec"]["ports"] if p.get("targetPort") in ("redis", ports.get("redis"))), None)
    if address.host.split(".")[0] != LEDGER or address.host.count(".") not in (0, 1, 2, 4):
        problems.append(f"uploader --budget-ledger {address}: the host is not the Service {LEDGER}")
    if address.port != service_port:
        problems.append(f"uploader --budget-ledger {address}: port {address.port} is not the Service's {service_port}")
    uploader_ref = ((env_of(container(objects, UPLOADER)).get(LEDGER_PASSWORD_ENV) or {}).get("valueFrom") or {}).get("secretKeyRef")
    if not uploader_ref:
        problems.append(f"uploader: {LEDGER_PASSWORD_ENV} is not set from a secretKeyRef")
    elif redis_ref and (uploader_ref.get("name"), uploader_ref.get("key")) != (redis_ref.get("name"), redis_ref.get("key")):
        problems.append(f"uploader: {LEDGER_PASSWORD_ENV} reads {uploader_ref.get('name')}/{uploader_ref.get('key')}, "
                        f"not the key the ledger's Redis reads ({redis_ref.get('name')}/{redis_ref.get('key')})")
    elif uploader_ref.get("optional"):
        problems.append(f"uploader: {LEDGER_PASSWORD_ENV} is optional, but the ledger refuses an uploader without it")
    # Only the triton-al pods reach it.
    pod_labels = one(objects, "StatefulSet")["spec"]["template"]["metadata"]["labels"]
    policies = [o for o in objects_of(objects, "NetworkPolicy")
                if selects((o["spec"].get("podSelector") or {}).get("matchLabels") or {}, deployment["spec"]["template"]["metadata"]["labels"])]
    if not policies:
        problems.append(f"no NetworkPolicy selects the {LEDGER} pods")
    for policy in policies:
        for rule in policy["spec"].get("ingress") or []:
            sources = [f.get("podSelector", {}).get("matchLabels") or {} for f in rule.get("from") or []]
            if not sources or not all(selects(src, pod_labels) for src in sources):
                problems.append(f"NetworkPolicy/{policy['metadata']['name']}: ingress from {sources}, not only the triton-al pods")
            if [p.get("port") for p in rule.get("ports") or []] not in (["redis"], [ports.get("redis")]):
                problems.append(f"NetworkPolicy/{policy['metadata']['name']}: ports {rule.get('ports')} are not the ledger's port")
    return problems


# --------------------------------------------------------------------------------------------
# Tests on the real manifests


def kustomization_dirs() -> list[Path]:
    return sorted(p.parent for p in K8S.rglob("kustomization.yaml"))


def test_kustomizations_use_only_what_the_renderer_supports():
    dirs = kustomization_dirs()
    assert {d.relative_to(K8S).as_posix() for d in dirs} == {"base", *(f"overlays/{o}" for o in OVERLAYS),
                                                             *(f"components/{c}" for c in COMPONENTS)}
    for d in dirs:
        deploy_kustomize.check_supported(yaml.safe_load((d / "kustomization.yaml").read_text()), d)


@pytest.mark.parametrize("overlay", RENDERED)
def test_overlay_renders(overlay):
    objects = rendered(overlay)
    kinds = sorted(o["kind"] for o in objects)
    with_ledger = overlay.startswith("fleet") or "+ledger" in overlay
    ledger = ["ConfigMap", "PersistentVolumeClaim", "Deployment", "Service", "NetworkPolicy"] if with_ledger else []
    assert kinds == sorted(["ConfigMap", "StatefulSet", "Service", "Service", "PodDisruptionBudget",
                            "HorizontalPodAutoscaler", "PodMonitor", *ledger])
    assert not objects_of(objects, "Secret"), "no credential belongs in the rendered manifests"
    images = {c["image"] for c in deploy_kustomize.all_containers(one(objects, "StatefulSet"))}
    assert len(images) == 1 and ":" in next(iter(images)), f"the pod's containers run the one image built from deploy/Containerfile: {images}"
    base = overlay.split("+")[0]
    for o in objects:
        if o["metadata"]["name"] == LEDGER:  # the component's own objects
            assert o["metadata"]["labels"]["app.kubernetes.io/part-of"] == "triton-al"
        else:  # the fleet overlay is the cpu overlay plus the ledger
            assert o["metadata"]["labels"].get("triton-al/variant") == {"fleet": "cpu"}.get(base, base)
    names = {c["name"] for c in deploy_kustomize.all_containers(one(objects, "StatefulSet"))}
    assert names == {TRITONSERVER, UPLOADER} | ({DRIFT} if "+drift-watcher" in overlay else set())


def test_the_fleet_overlay_is_the_cpu_overlay_plus_the_ledger():
    cpu, fleet = rendered("cpu"), rendered("fleet")
    assert ledger_problems(fleet) == []
    assert [o for o in fleet if o["metadata"]["name"] != LEDGER and o["kind"] != "StatefulSet"] == \
        [o for o in cpu if o["kind"] != "StatefulSet"]
    uploader, cpu_uploader = container(fleet, UPLOADER), container(cpu, UPLOADER)
    assert uploader["args"] == cpu_uploader["args"] + ["--budget-ledger", "redis://triton-al-ledger:6379/0"]
    assert [e["name"] for e in uploader["env"]] == [e["name"] for e in cpu_uploader["env"]] + [LEDGER_PASSWORD_ENV]
    params = uploader_params(fleet)
    assert params["budget_ledger"] == "redis://triton-al-ledger:6379/0" and params["fleet_claims"] is True
    assert uploader_params(cpu)["budget_ledger"] is None
    assert ledger_problems(cpu) == [f"no Deployment {LEDGER}"]


def test_the_ledger_component_applies_to_the_gpu_overlay_too():
    """Components compose: the same component on top of overlays/gpu (as README section 6
    shows); every other check runs on it through RENDERED."""
    objects = rendered("gpu+ledger")
    assert ledger_problems(objects) == []
    assert container(objects, TRITONSERVER)["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_overlays_differ_as_intended():
    cpu, gpu = container(rendered("cpu"), TRITONSERVER), container(rendered("gpu"), TRITONSERVER)
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    assert env_of(cpu)["NVIDIA_VISIBLE_DEVICES"]["value"] == "void"
    assert "--allow-gpu-metrics=false" in cpu["args"] and "--pinned-memory-pool-byte-size=0" in cpu["args"]
    assert gpu["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "NVIDIA_VISIBLE_DEVICES" not in env_of(gpu)
    gpu_spec = pod_spec(rendered("gpu"))
    assert gpu_spec["tolerations"] and gpu_spec["nodeSelector"]


@pytest.mark.parametrize("overlay", RENDERED)
def test_renderer_agrees_with_kubectl_kustomize(overlay):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl on PATH (it cannot be installed from this project's registries): rendered by tests/deploy_kustomize.py only")
    with kustomization_dir(overlay) as directory:
        done = subprocess.run([kubectl, "kustomize", str(directory)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    theirs = {deploy_kustomize.identity(o): o for o in yaml.safe_load_all(done.stdout) if o}
    ours = {deploy_kustomize.identity(o): o for o in rendered(overlay)}
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key] == theirs[key], f"{key} differs from kubectl kustomize"


@pytest.mark.parametrize("overlay", RENDERED)
def test_schemas(overlay):
    assert schema_problems(rendered(overlay)) == []


def test_secret_example_matches_the_schema_and_the_pods():
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)
    refs = {e["valueFrom"]["secretKeyRef"]["key"] for e in container(rendered("cpu"), UPLOADER)["env"] if "secretKeyRef" in e.get("valueFrom", {})}
    assert refs <= set(secret["stringData"]), refs - set(secret["stringData"])
    for text in (K8S / "base" / "kustomization.yaml").read_text(), *(p.read_text() for p in (K8S / "overlays").rglob("kustomization.yaml")):
        assert "secret.example" not in text


@pytest.mark.parametrize("overlay", RENDERED)
def test_triton_al_command_lines_parse_with_the_real_cli(overlay):
    assert cli_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", RENDERED)
def test_tritonserver_flags_are_real(overlay):
    help_text = tritonserver_help()
    if help_text is None:
        pytest.skip("no tritonserver binary (install the `triton` extra: nvidia-pytriton)")
    assert tritonserver_problems(rendered(overlay), tritonserver_flags(help_text)) == []


@pytest.mark.parametrize("overlay", RENDERED)
def test_ports_probes_services_and_selectors(overlay):
    assert port_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", RENDERED)
def test_environment_and_secrets(overlay):
    assert env_problems(rendered(overlay)) == []


def test_the_variables_are_the_ones_the_code_reads():
    for name, source in READ_WHERE.items():
        assert name in (ROOT / source).read_text(), f"{source} no longer reads {name}"
    nexus = (ROOT / "python/triton_al/sinks/nexus.py").read_text()
    assert 'PYTHON_ENV = "TRITON_AL_NEXUS_PYTHON"' in nexus
    assert "ENV TRITON_AL_NEXUS_PYTHON=" in CONTAINERFILE.read_text()


@pytest.mark.parametrize("overlay", RENDERED)
def test_shutdown_budget(overlay):
    assert shutdown_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", [o for o in RENDERED if o.startswith("fleet") or "+ledger" in o])
def test_ledger(overlay):
    assert ledger_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", [o for o in RENDERED if "+drift-watcher" in o])
def test_drift_watcher(overlay):
    assert drift_problems(rendered(overlay)) == []


@pytest.mark.parametrize("overlay", RENDERED)
def test_autoscaling(overlay):
    assert autoscaling_problems(rendered(overlay), ADAPTER_RULES.read_text()) == []


def test_step_configs_take_the_outbox_from_the_environment():
    """The baked-in repository's steps must not set outbox_path: the step then reads
    TRITON_AL_OUTBOX, which the pod points at the claim."""
    steps = 0
    for config in (ROOT / "model_repository").glob("*/config.pbtxt"):
        text = config.read_text()
        model_py = config.parent / "1" / "model.py"
        is_step = 'backend: "active_learning"' in text or (model_py.exists() and "triton_al.serving.active_learning" in model_py.read_text())
        if is_step:
            steps += 1
            assert not re.search(r'key:\s*"outbox_path"', text), f"{config} sets outbox_path: {OUTBOX_ENV} would be ignored"
    assert steps >= 1


# --------------------------------------------------------------------------------------------
# The Containerfile


def containerfile_instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", CONTAINERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def containerfile_problems(instructions: list[tuple[str, str]], objects: list[dict]) -> list[str]:
    problems = []
    args = {}
    for keyword, rest in instructions:
        if keyword == "ARG" and "=" in rest:
            key, value = rest.split("=", 1)
            args.setdefault(key, value)
    image = args.get("TRITON_IMAGE", "")
    release = re.fullmatch(r"nvcr\.io/nvidia/tritonserver:(\d\d)\.(\d\d)-py3", image)
    if not release:
        problems.append(f"ARG TRITON_IMAGE={image!r} is not an NVIDIA tritonserver -py3 image")
    elif (int(release.group(1)), int(release.group(2))) < (24, 12):
        problems.append(f"{image}: the Python step needs Python >= 3.11, i.e. NVIDIA's 24.12 or later (Python 3.12)")
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    if len(froms) != 2 or any("${TRITON_IMAGE}" not in f for f in froms):
        problems.append(f"expected a build stage and a final stage, both FROM ${{TRITON_IMAGE}}: {froms}")
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    # The crate and its library.
    cargo = tomllib.loads((ROOT / "rust" / "backend" / "Cargo.toml").read_text())
    library = f"lib{cargo['lib']['name']}.so"
    package = cargo["package"]["name"]
    if f"cargo build --release --locked -p {package}" not in runs:
        problems.append(f"the native backend is not built with `cargo build --release --locked -p {package}`")
    backend = f"/opt/tritonserver/backends/active_learning/{library}"
    copies = [rest for keyword, rest in instructions if keyword == "COPY"]
    if not any(c.startswith("--from=build") and f"/src/target/release/{library}" in c and c.endswith(backend) for c in copies):
        problems.append(f"{library} is not copied to {backend}")
    if "libsqlite3-dev" not in runs:
        problems.append("libsqlite3-dev is not installed in the build stage (the extension links the system SQLite)")
    maturin = re.search(r"maturin build ([^;&]*)", runs)
    if not maturin or "--release" not in maturin.group(1) or "--auditwheel skip" not in maturin.group(1):
        problems.append("the wheel must be built with `maturin build --release ... --auditwheel skip` (a repair would bundle a second SQLite)")
    if '"numpy>=1.26,<2"' not in runs:
        problems.append("numpy is not pinned below 2 in the image (the Python backend's stub needs numpy < 2)")
    # What the optional components run needs its clients in the image: the fleet extra (the
    # ledger's Redis client) and the triton extra's tritonclient (the drift watcher).
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    wanted = list(extras["fleet"]) + [r for r in extras["triton"] if r.startswith("tritonclient")]
    for requirement in wanted:
        if f'"{requirement}"' not in runs:
            problems.append(f"{requirement} is not installed in the image (components/ledger and components/drift-watcher need it)")
    rust = re.match(r"(\d+)\.(\d+)", args.get("RUST_VERSION", ""))
    minimum = tuple(int(x) for x in tomllib.loads((ROOT / "Cargo.toml").read_text())["workspace"]["package"]["rust-version"].split("."))
    if not rust or (int(rust.group(1)), int(rust.group(2))) < minimum[:2]:
        problems.append(f"RUST_VERSION is below the workspace's rust-version {minimum}")
    # What is copied from the context exists (and is let through the ignore file).
    allowed = [line[1:].rstrip("/") for line in (DEPLOY / "Containerfile.dockerignore").read_text().splitlines() if line.startswith("!")]
    for c in copies:
        if c.startswith("--from="):
            continue
        for source in c.split()[:-1]:
            source = source.replace("${MODEL_REPOSITORY}", args.get("MODEL_REPOSITORY", "")).rstrip("/")
            if not (ROOT / source).exists():
                problems.append(f"COPY {source}: no such file in the repository")
            if source not in allowed:
                problems.append(f"COPY {source}: excluded by deploy/Containerfile.dockerignore")
    # The image's layout is what the pods use.
    model_copy = [c for c in copies if "${MODEL_REPOSITORY}" in c]
    triton = tritonserver_options(tritonserver_argv(container(objects, TRITONSERVER)))
    if not model_copy or model_copy[0].split()[-1].rstrip("/") != triton.get("--model-repository"):
        problems.append(f"the model repository is not copied to tritonserver's --model-repository {triton.get('--model-repository')}")
    if "/usr/local/bin/triton-al" not in runs or container(objects, UPLOADER)["command"] != ["triton-al"]:
        problems.append("the uploader's command triton-al is not put on PATH (/usr/local/bin) by the Containerfile")
    user = [rest for keyword, rest in instructions if keyword == "USER"][-1:]
    uid = pod_spec(objects)["securityContext"]["runAsUser"]
    if user != [f"{uid}:{pod_spec(objects)['securityContext']['runAsGroup']}"]:
        problems.append(f"the image's final USER {user} is not the pods' {uid}")
    return problems


def test_containerfile():
    assert containerfile_problems(containerfile_instructions(), rendered("cpu")) == []


def test_the_example_repository_uses_the_native_step():
    configs = [p.read_text() for p in (ROOT / "model_repository").glob("*/config.pbtxt")]
    assert any('backend: "active_learning"' in c for c in configs), "the image installs the native step: the example should use it"


# --------------------------------------------------------------------------------------------
# Every check fails on a broken manifest


def _uploader(objects):
    return container(objects, UPLOADER)


def _triton(objects):
    return container(objects, TRITONSERVER)


def _replace_arg(c, old, new):
    c["args"] = [new if a == old else a for a in c["args"]]


def _env_entry(c, name):
    return next(e for e in c["env"] if e["name"] == name)


def _make_literal(entry, value):
    entry.pop("valueFrom")
    entry["value"] = value


def _set_prestop_script(c, old, new):
    c["lifecycle"]["preStop"]["exec"]["command"][2] = c["lifecycle"]["preStop"]["exec"]["command"][2].replace(old, new)


BROKEN = {
    # name: (how to break the rendered cpu overlay, the check, what the complaint says)
    "misspelled uploader flag": (lambda o: _replace_arg(_uploader(o), "--metrics-port", "--metrics-prot"), "cli", "No such option"),
    "uploader flag with a bad value": (lambda o: _replace_arg(_uploader(o), "9090", "ninety"), "cli", "metrics-port"),
    "unknown uploader command": (lambda o: _replace_arg(_uploader(o), "uploader", "upload"), "cli", "no such command"),
    "misspelled flag in the preStop hook": (lambda o: _set_prestop_script(_uploader(o), "--timeout", "--timeot"), "cli", "No such option"),
    "undefined $(VAR)": (lambda o: _env_entry(_uploader(o), "SINK_URI").update(name="SINK"), "cli", "$(SINK_URI) is not set"),
    "unknown tritonserver flag": (lambda o: _replace_arg(_triton(o), "--model-repository=/models", "--model-repo=/models"), "tritonserver", "--model-repo is not"),
    "tritonserver flag without =": (lambda o: _triton(o)["args"].append("--log-verbose"), "tritonserver", "--flag=value"),
    "tritonserver switch with a value": (lambda o: _replace_arg(_triton(o), "--disable-auto-complete-config", "--disable-auto-complete-config=true"), "tritonserver", "takes no value"),
    "probe on an undeclared port": (lambda o: _uploader(o)["livenessProbe"]["httpGet"].update(port="upload-metric"), "ports", "not declared"),
    "probe on another container's port": (lambda o: _uploader(o)["readinessProbe"]["httpGet"].update(port="http"), "ports", "not declared by this container"),
    "Service targetPort undeclared": (lambda o: objects_of(o, "Service")[0]["spec"]["ports"][0].update(targetPort="grpcs"), "ports", "not a declared container port"),
    "PodMonitor port undeclared": (lambda o: one(o, "PodMonitor")["spec"]["podMetricsEndpoints"][1].update(port="uploader-metrics"), "ports", "not a declared container port"),
    "port name too long": (lambda o: _uploader(o)["ports"][0].update(name="uploader-metrics"), "ports", "not a valid port name"),
    "uploader metrics on loopback": (lambda o: _replace_arg(_uploader(o), "0.0.0.0", "127.0.0.1"), "ports", "loopback"),
    "tritonserver port flag disagrees": (lambda o: _replace_arg(_triton(o), "--grpc-port=8001", "--grpc-port=9001"), "ports", "port grpc is 8001"),
    "Service selects nothing": (lambda o: objects_of(o, "Service")[0]["spec"]["selector"].update({"app.kubernetes.io/name": "triton"}), "ports", "does not select"),
    "literal secret": (lambda o: _make_literal(_env_entry(_uploader(o), "AWS_SECRET_ACCESS_KEY"), "hunter2"), "env", "literal value"),
    "secret given to tritonserver": (lambda o: _triton(o)["env"].append(copy.deepcopy(_env_entry(_uploader(o), "LABEL_STUDIO_API_KEY"))), "env", "tritonserver gets the secret"),
    "admin token missing": (lambda o: _uploader(o).update(env=[e for e in _uploader(o)["env"] if e["name"] != ADMIN_TOKEN_ENV]), "env", f"{ADMIN_TOKEN_ENV} is not set"),
    "admin token optional": (lambda o: _env_entry(_uploader(o), ADMIN_TOKEN_ENV)["valueFrom"]["secretKeyRef"].update(optional=True), "env", "optional"),
    "outbox paths differ": (lambda o: _env_entry(_triton(o), OUTBOX_ENV).update(value="/var/lib/triton-al/other.db"), "env", "is not the step's"),
    "outbox not on the claim": (lambda o: _triton(o)["volumeMounts"][0].update(name="dshm"), "env", "not on one volume"),
    "required ConfigMap key missing": (lambda o: one(o, "ConfigMap")["data"].pop("SINK_URI"), "env", "needs key SINK_URI"),
    "schema: wrong type": (lambda o: pod_spec(o).update(terminationGracePeriodSeconds="150"), "schema", "is not of type"),
    "schema: misspelled field": (lambda o: _triton(o).update(livenesProbe=_triton(o)["livenessProbe"]), "schema", "livenesProbe"),
    "schema: unknown kind": (lambda o: o.append({"apiVersion": "example.com/v1", "kind": "Widget", "metadata": {"name": "w"}}), "schema", "Couldn't find schema"),
    "PodMonitor without selector": (lambda o: one(o, "PodMonitor")["spec"].pop("selector"), "schema", "selector"),
    "PodMonitor misspelled field": (lambda o: one(o, "PodMonitor")["spec"].update(podMetricEndpoints=[]), "schema", "unknown spec field"),
    "grace period too short": (lambda o: pod_spec(o).update(terminationGracePeriodSeconds=60), "shutdown", "terminationGracePeriodSeconds 60"),
    "preStop waits on the HTTP port": (lambda o: _set_prestop_script(_uploader(o), "/8001", "/8000"), "shutdown", "gRPC port"),
    "drain outlasts the wait": (lambda o: _replace_arg(_triton(o), "--exit-timeout-secs=30", "--exit-timeout-secs=120"), "shutdown", "less than tritonserver"),
    "flush at another address": (lambda o: _set_prestop_script(_uploader(o), "127.0.0.1:9091", "127.0.0.1:9092"), "shutdown", "not this uploader's admin API"),
    "uploader not a native sidecar": (lambda o: _uploader(o).pop("restartPolicy"), "shutdown", "native sidecar"),
    "HPA metric not served": (lambda o: one(o, "HorizontalPodAutoscaler")["spec"]["metrics"][0]["pods"]["metric"].update(name="triton_queue_us"), "autoscaling", "served by no"),
    "StatefulSet replicas set": (lambda o: one(o, "StatefulSet")["spec"].update(replicas=3), "autoscaling", "owns"),
}


def _ledger_conf(objects, old, new):
    cm = next(o for o in objects_of(objects, "ConfigMap") if o["metadata"]["name"] == LEDGER)
    assert old in cm["data"]["redis.conf"], old
    cm["data"]["redis.conf"] = cm["data"]["redis.conf"].replace(old, new)


def _ledger_script(objects, old, new):
    redis = ledger_redis(objects)[1]
    assert old in redis["args"][-1], old
    redis["args"][-1] = redis["args"][-1].replace(old, new)


def _ledger_object(objects, kind):
    return next(o for o in objects_of(objects, kind) if o["metadata"]["name"] == LEDGER)


BROKEN_FLEET = {
    # name: (how to break the rendered fleet overlay, the check, what the complaint says)
    "no append-only file": (lambda o: _ledger_conf(o, "appendonly yes", "appendonly no"), "ledger", "appendonly"),
    "fsync every second": (lambda o: _ledger_conf(o, "appendfsync always", "appendfsync everysec"), "ledger", "not always"),
    "evicting": (lambda o: _ledger_conf(o, "maxmemory-policy noeviction", "maxmemory-policy volatile-lru"), "ledger", "noeviction"),
    "maxmemory over the limit": (lambda o: _ledger_conf(o, "maxmemory 1536mb", "maxmemory 2gb"), "ledger", "below the container's memory limit"),
    "password in the ConfigMap": (lambda o: _ledger_conf(o, "port 6379", "port 6379\nrequirepass hunter2"), "ledger", "password in the ConfigMap"),
    "config port differs": (lambda o: _ledger_conf(o, "port 6379", "port 6380"), "ledger", "is not redis.conf's port"),
    "data not on the claim": (lambda o: _ledger_conf(o, "dir /data", "dir /tmp"), "ledger", "not on a PersistentVolumeClaim"),
    "password on the command line": (lambda o: _ledger_script(o, "redis-server /etc/redis/redis.conf - <<EOF", 'redis-server /etc/redis/redis.conf --requirepass "$REDISCLI_AUTH" <<EOF'), "ledger", "command line"),
    "config not mounted": (lambda o: _ledger_script(o, "/etc/redis/redis.conf", "/etc/redis.conf"), "ledger", "not in a mounted ConfigMap"),
    "rolling update": (lambda o: _ledger_object(o, "Deployment")["spec"].update(strategy={"type": "RollingUpdate"}), "ledger", "Recreate"),
    "two ledgers": (lambda o: _ledger_object(o, "Deployment")["spec"].update(replicas=2), "ledger", "replicas must be 1"),
    "probe without auth": (lambda o: ledger_redis(o)[1]["env"][0].update(name="REDIS_PASSWORD"), "ledger", "REDISCLI_AUTH"),
    "uploader at another host": (lambda o: _replace_arg(_uploader(o), "redis://triton-al-ledger:6379/0", "redis://redis:6379/0"), "ledger", "is not the Service"),
    "uploader at another port": (lambda o: _replace_arg(_uploader(o), "redis://triton-al-ledger:6379/0", "redis://triton-al-ledger:6380/0"), "ledger", "is not the Service's"),
    "uploader URI with the password": (lambda o: _replace_arg(_uploader(o), "redis://triton-al-ledger:6379/0", "redis://:pw@triton-al-ledger:6379/0"), "ledger", "credentials do not go in the URI"),
    "uploader without the password": (lambda o: _uploader(o).update(env=[e for e in _uploader(o)["env"] if e["name"] != LEDGER_PASSWORD_ENV]), "ledger", f"{LEDGER_PASSWORD_ENV} is not set"),
    "uploader password from another key": (lambda o: _env_entry(_uploader(o), LEDGER_PASSWORD_ENV)["valueFrom"]["secretKeyRef"].update(key="TRITON_AL_ADMIN_TOKEN"), "ledger", "not the key the ledger's Redis reads"),
    "uploader password optional": (lambda o: _env_entry(_uploader(o), LEDGER_PASSWORD_ENV)["valueFrom"]["secretKeyRef"].update(optional=True), "ledger", "optional"),
    "uploader password literal": (lambda o: _make_literal(_env_entry(_uploader(o), LEDGER_PASSWORD_ENV), "hunter2"), "env", "literal value"),
    "ledger password literal": (lambda o: _make_literal(ledger_redis(o)[1]["env"][0], "hunter2"), "env", "redis: REDISCLI_AUTH is a literal value"),
    "ledger password from an unknown key": (lambda o: ledger_redis(o)[1]["env"][0]["valueFrom"]["secretKeyRef"].update(key="REDIS"), "env", "not in secret.example.yaml"),
    "policy open to all": (lambda o: _ledger_object(o, "NetworkPolicy")["spec"]["ingress"][0]["from"][0].update(podSelector={}), "ledger", "not only the triton-al pods"),
    "policy selects other pods": (lambda o: _ledger_object(o, "NetworkPolicy")["spec"]["podSelector"]["matchLabels"].update({"app.kubernetes.io/name": "redis"}), "ledger", "no NetworkPolicy selects"),
    "ledger Service targets an undeclared port": (lambda o: _ledger_object(o, "Service")["spec"]["ports"][0].update(targetPort="rediss"), "ports", "'rediss' is not a declared container port"),
    "ledger Service selects the inference pods": (lambda o: _ledger_object(o, "Service")["spec"].update(selector={"app.kubernetes.io/name": "triton-al"}), "ports", "targetPort 'redis' is not a declared"),
    "ledger Service selects nothing": (lambda o: _ledger_object(o, "Service")["spec"]["selector"].update({"app.kubernetes.io/component": "redis"}), "ports", "exactly one workload"),
    "schema: PVC misspelled": (lambda o: _ledger_object(o, "PersistentVolumeClaim")["spec"].update(accesModes=["ReadWriteOnce"]), "schema", "accesModes"),
}


def _drift(objects):
    return container(objects, DRIFT)


BROKEN_DRIFT = {
    # name: (how to break the rendered cpu overlay with the drift watcher, the check, the complaint)
    "another pod's metrics": (lambda o: _replace_arg(_drift(o), "http://127.0.0.1:8002/metrics", "http://triton-al:8002/metrics"), "drift", "is not this pod's tritonserver"),
    "the HTTP port for gRPC": (lambda o: _replace_arg(_drift(o), "127.0.0.1:8001", "127.0.0.1:8000"), "drift", "gRPC port"),
    "reference off the claim": (lambda o: _replace_arg(_drift(o), "/var/lib/triton-al/drift-reference.json", "/tmp/drift-reference.json"), "drift", "on no mounted volume"),
    "gauges not scraped": (lambda o: one(o, "PodMonitor")["spec"]["podMetricsEndpoints"].pop(), "drift", "does not scrape its gauges"),
    "another image": (lambda o: _drift(o).update(image="triton-al:latest"), "drift", "is not the pod's"),
    "a misspelled drift flag": (lambda o: _replace_arg(_drift(o), "--record-first", "--record-frist"), "cli", "No such option"),
    "a drift subcommand": (lambda o: _drift(o)["args"].insert(1, "record"), "drift", "triton-al drift record: No such option"),
    "gauges on loopback": (lambda o: _replace_arg(_drift(o), "0.0.0.0", "127.0.0.1"), "ports", "--serve-address is loopback"),
    "port is not --serve-metrics": (lambda o: _replace_arg(_drift(o), "9092", "9093"), "ports", "is not its --serve-metrics"),
    "probe on another container's port": (lambda o: _drift(o)["readinessProbe"]["httpGet"].update(port="upload-metrics"), "ports", "not declared by this container"),
    "port name twice": (lambda o: _drift(o)["ports"][0].update(name="metrics"), "ports", "declared twice"),
}


def _run_check(name: str, objects: list[dict]) -> list[str]:
    if name == "cli":
        return cli_problems(objects)
    if name == "tritonserver":
        help_text = tritonserver_help()
        if help_text is None:
            pytest.skip("no tritonserver binary")
        return tritonserver_problems(objects, tritonserver_flags(help_text))
    if name == "ports":
        return port_problems(objects)
    if name == "env":
        return env_problems(objects)
    if name == "schema":
        return schema_problems(objects)
    if name == "shutdown":
        return shutdown_problems(objects)
    if name == "autoscaling":
        return autoscaling_problems(objects, ADAPTER_RULES.read_text())
    if name == "ledger":
        return ledger_problems(objects)
    if name == "drift":
        return drift_problems(objects)
    raise AssertionError(name)


@functools.cache
def _unbroken_problems(check: str, overlay: str = "cpu") -> tuple[str, ...]:
    return tuple(_run_check(check, rendered(overlay)))


# Each overlay with the ways to break it that its checks must catch.
BROKEN_BY_OVERLAY = {"cpu": BROKEN, "cpu+drift-watcher": BROKEN_DRIFT, "fleet": BROKEN_FLEET}


@pytest.mark.parametrize("overlay, case", [(o, c) for o, table in BROKEN_BY_OVERLAY.items() for c in sorted(table)])
def test_broken_manifest_is_caught(overlay, case):
    breaker, check, complaint = BROKEN_BY_OVERLAY[overlay][case]
    assert _unbroken_problems(check, overlay) == (), "the unbroken manifests must pass first"
    objects = rendered(overlay)
    breaker(objects)
    problems = _run_check(check, objects)
    assert any(complaint in p for p in problems), f"{overlay} {case}: expected a complaint with {complaint!r}, got {problems}"


def test_broken_adapter_rule_is_caught():
    text = ADAPTER_RULES.read_text()
    assert autoscaling_problems(rendered("cpu"), text) == []
    problems = autoscaling_problems(rendered("cpu"), text.replace("<<.LabelMatchers>>", "namespace=\"x\""))
    assert any("LabelMatchers" in p for p in problems), problems


def test_broken_containerfile_is_caught():
    good = containerfile_instructions()
    objects = rendered("cpu")
    assert containerfile_problems(good, objects) == []

    cases = [
        # (what is changed, into what, the complaint)
        ("tritonserver:24.12-py3", "tritonserver:24.10-py3", "24.12 or later"),
        ("-p triton-al-backend", "-p triton-al-step", "cargo build"),
        ("backends/active_learning/", "backends/activelearning/", "is not copied to"),
        ("--auditwheel skip", "--auditwheel repair", "--auditwheel skip"),
        ('"numpy>=1.26,<2"', '"numpy>=1.26"', "numpy"),
        ("rust/ rust/", "rustc/ rust/", "no such file"),
        ("model_repository", "model_repo", "no such file"),
        ("/models/", "/srv/models/", "--model-repository"),
        ("1000:1000", "0:0", "USER"),
        ("libsqlite3-dev", "libsqlite3-0", "libsqlite3-dev"),
        ("RUST_VERSION=1.95.0", "RUST_VERSION=1.80.0", "rust-version"),
        ('"redis>=5" ', "", "redis>=5 is not installed"),
        ('"tritonclient[grpc]==2.51.0"', '"tritonclient==2.51.0"', "tritonclient[grpc]==2.51.0 is not installed"),
    ]
    for old, new, complaint in cases:
        broken = [(k, r.replace(old, new)) for k, r in good]
        assert broken != good, f"{old!r} is not in the Containerfile"
        problems = containerfile_problems(broken, objects)
        assert any(complaint in p for p in problems), f"changing {old!r} into {new!r} went unnoticed: {problems}"


def test_unsupported_kustomize_features_are_refused(tmp_path):
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\n")
    cases = {
        "namespace": "namespace: prod\n",
        "commonLabels": "commonLabels:\n  a: b\n",
        "namePrefix": "namePrefix: x-\n",
        "configMapGenerator": "configMapGenerator:\n- name: y\n  literals: [a=b]\n",
        "includeSelectors": "labels:\n- pairs: {a: b}\n  includeSelectors: true\n",
        "$patch": "patches:\n- patch: |\n    apiVersion: v1\n    kind: ConfigMap\n    metadata: {name: x}\n    $patch: delete\n",
        "JSON 6902 move": "patches:\n- target: {kind: ConfigMap, name: x}\n  patch: |\n    - op: move\n      from: /metadata\n      path: /m\n",
    }
    for feature, extra in cases.items():
        (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\n" + extra)
        with pytest.raises(deploy_kustomize.UnsupportedFeature):
            deploy_kustomize.render(tmp_path)
        assert feature


def test_components_are_applied_after_the_resources_and_before_the_patches(tmp_path):
    """kustomize's order (5.1 and later): resources, then each component (its resources, then
    its patches over everything so far), then the kustomization's own patches and labels."""
    (tmp_path / "base").mkdir()
    (tmp_path / "base" / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: x\ndata:\n  a: base\n")
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [cm.yaml]\n")
    (tmp_path / "comp").mkdir()
    (tmp_path / "comp" / "cm2.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: y\n")
    (tmp_path / "comp" / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1alpha1\nkind: Component\nresources: [cm2.yaml]\n"
        "patches:\n- target: {kind: ConfigMap, name: x}\n  patch: |\n    - op: test\n      path: /data/a\n      value: base\n"
        "    - op: replace\n      path: /data/a\n      value: component\n")
    (tmp_path / "top").mkdir()
    (tmp_path / "top" / "kustomization.yaml").write_text(
        "resources: [../base]\ncomponents: [../comp]\nlabels:\n- pairs: {l: top}\n"
        "patches:\n- target: {kind: ConfigMap, name: x}\n  patch: |\n    - op: test\n      path: /data/a\n      value: component\n"
        "    - op: add\n      path: /data/b\n      value: top\n")
    objects = deploy_kustomize.render(tmp_path / "top")
    assert [(o["metadata"]["name"], o.get("data"), o["metadata"]["labels"]) for o in objects] == [
        ("x", {"a": "component", "b": "top"}, {"l": "top"}), ("y", None, {"l": "top"})]
    kubectl = shutil.which("kubectl")
    if kubectl is not None:  # the order is kustomize's own (else its `test`s fail the build)
        done = subprocess.run([kubectl, "kustomize", str(tmp_path / "top")], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        assert [o for o in yaml.safe_load_all(done.stdout) if o] == objects
    # A failed `test` stops the build (as kustomize does); so does a Component under
    # `resources` and a Kustomization under `components`.
    broken = (tmp_path / "top" / "kustomization.yaml").read_text().replace("value: component", "value: base", 1)
    (tmp_path / "top" / "kustomization.yaml").write_text(broken)
    with pytest.raises(ValueError, match="JSON 6902 test /data/a"):
        deploy_kustomize.render(tmp_path / "top")
    (tmp_path / "top" / "kustomization.yaml").write_text("resources: [../base, ../comp]\n")
    with pytest.raises(ValueError, match="a Component is listed under `components`"):
        deploy_kustomize.render(tmp_path / "top")
    (tmp_path / "top" / "kustomization.yaml").write_text("resources: [../comp]\ncomponents: [../base]\n")
    with pytest.raises(ValueError, match="a Component is listed under `components`"):
        deploy_kustomize.render(tmp_path / "top")
    (tmp_path / "top" / "kustomization.yaml").write_text("apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Component\n")
    with pytest.raises(deploy_kustomize.UnsupportedFeature):
        deploy_kustomize.render(tmp_path / "top")


def test_the_ledger_component_refuses_a_statefulset_whose_first_init_container_is_not_the_uploader(tmp_path):
    """The component's JSON 6902 patch appends to init container 0: its `test` makes the build
    fail, rather than give --budget-ledger to another container, if that ever changes."""
    (tmp_path / "base").mkdir()
    sts = copy.deepcopy(one(rendered("cpu"), "StatefulSet"))
    spec = sts["spec"]["template"]["spec"]
    spec["initContainers"].insert(0, {"name": "init-volume", "image": "busybox", "command": ["true"]})
    (tmp_path / "base" / "sts.yaml").write_text(yaml.safe_dump(sts))
    (tmp_path / "base" / "kustomization.yaml").write_text("resources: [sts.yaml]\n")
    (tmp_path / "kustomization.yaml").write_text(f"resources: [base]\ncomponents: [{K8S / 'components' / 'ledger'}]\n")
    with pytest.raises(ValueError, match="expected 'uploader', found 'init-volume'"):
        deploy_kustomize.render(tmp_path)


def test_the_readmes_fleet_overlay_renders_and_passes_the_checks(tmp_path):
    """The example overlay of deploy/kubernetes/README.md section 6 (GPU + ledger + a
    budget), its paths made relative to a temporary folder (kubectl too refuses absolute ones)."""
    readme = (K8S / "README.md").read_text()
    section = readme[readme.index("## 6. A fleet"):readme.index("### The drift watcher")]
    block = next(b for b in re.findall(r"```yaml\n(.*?)```", section, flags=re.S) if "overlays/my-fleet" in b)
    kustomization = yaml.safe_load(block)
    here = K8S / "overlays" / "my-fleet"  # where the README puts it

    def rel(path: str) -> str:
        return os.path.relpath(os.path.normpath(here / path), tmp_path.resolve())

    kustomization["resources"] = [rel(r) for r in kustomization["resources"]]
    kustomization["components"] = [rel(c) for c in kustomization["components"]]
    (tmp_path / "kustomization.yaml").write_text(yaml.safe_dump(kustomization))
    objects = deploy_kustomize.render(tmp_path)
    assert ledger_problems(objects) == [] and cli_problems(objects) == [] and schema_problems(objects) == []
    assert env_problems(objects) == [] and port_problems(objects) == []
    params = uploader_params(objects)
    assert params["budget_ledger"] == "redis://triton-al-ledger:6379/0" and params["rate_limit"] == ["needs-review=500/day"]
    assert container(objects, TRITONSERVER)["resources"]["limits"]["nvidia.com/gpu"] == 1
