"""A small renderer of the kustomize features that deploy/kubernetes/ uses.

kubectl cannot be installed from the package registries this project may use, so the
deployment tests render the overlays with this instead (and, where a `kubectl` happens to be
on PATH, compare the result with `kubectl kustomize`). It supports, and only supports:

- `resources`: YAML files (one or more documents) and directories holding a
  kustomization.yaml, rendered recursively, in order;
- `components`: directories holding a `kind: Component` kustomization
  (kustomize.config.k8s.io/v1alpha1), applied in order after the resources and before the
  kustomization's own patches, images and labels (kustomize 5.1 and later): each adds its
  resources to those accumulated so far, then applies its patches (and images, labels) to
  all of them;
- `labels`: `pairs` added to every object's metadata.labels (`includeSelectors` and
  `includeTemplates` false, their defaults);
- `images`: `name` with `newName`, `newTag` and/or `digest`, applied to the containers and
  init containers of pod templates;
- `patches`: from `path` or inline `patch`, either a strategic merge patch (a mapping,
  targeting the object of its kind and metadata.name, or `target`) or a JSON 6902 patch (a
  list of `add`/`replace`/`remove`/`copy`/`test` operations, with `target` kind and name;
  group and version are checked when given; a failed `test` fails the build, as in kustomize).

Strategic merge follows kustomize: mappings merge key by key, `null` deletes a key, lists
of containers, init containers, volumes and env (by `name`), volume mounts (by
`mountPath`), and ports (by `containerPort`, or `port` in a Service) merge by that key, the
patch's items first, in the patch's order, then the others; every other list is replaced.

Anything else (another kustomization field, a `$patch` directive, a JSON 6902 operation
other than those three) raises UnsupportedFeature, so that a kustomization can never use
a feature this renderer would silently get wrong.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

KUSTOMIZATION_FILES = ("kustomization.yaml", "kustomization.yml", "Kustomization")
SUPPORTED_FIELDS = {"apiVersion", "kind", "resources", "components", "labels", "images", "patches"}
KINDS = {"Kustomization": "kustomize.config.k8s.io/v1beta1", "Component": "kustomize.config.k8s.io/v1alpha1"}
SUPPORTED_LABEL_FIELDS = {"pairs", "includeSelectors", "includeTemplates"}
SUPPORTED_IMAGE_FIELDS = {"name", "newName", "newTag", "digest"}
SUPPORTED_PATCH_FIELDS = {"path", "patch", "target"}
SUPPORTED_TARGET_FIELDS = {"group", "version", "kind", "name"}
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "imagePullSecrets": "name",
}
POD_SPEC_PATHS = {
    # kind -> where its pod spec is
    "Pod": ("spec",),
    "Deployment": ("spec", "template", "spec"),
    "StatefulSet": ("spec", "template", "spec"),
    "DaemonSet": ("spec", "template", "spec"),
    "ReplicaSet": ("spec", "template", "spec"),
    "Job": ("spec", "template", "spec"),
    "CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}


class UnsupportedFeature(ValueError):
    """The kustomization uses something this renderer does not implement."""


def kustomization_file(directory: Path) -> Path:
    for name in KUSTOMIZATION_FILES:
        if (directory / name).is_file():
            return directory / name
    raise FileNotFoundError(f"no kustomization.yaml in {directory}")


def load_documents(path: Path) -> list[dict]:
    with open(path) as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def check_supported(kustomization: dict, where: Path) -> None:
    unknown = set(kustomization) - SUPPORTED_FIELDS
    if unknown:
        raise UnsupportedFeature(f"{where}: kustomize field(s) {sorted(unknown)} are not supported by tests/deploy_kustomize.py")
    kind = kustomization.get("kind", "Kustomization")
    if kind not in KINDS or kustomization.get("apiVersion", KINDS[kind]) != KINDS[kind]:
        raise UnsupportedFeature(f"{where}: {kustomization.get('apiVersion')}/{kind} is not a Kustomization "
                                 f"({KINDS['Kustomization']}) nor a Component ({KINDS['Component']})")
    for entry in kustomization.get("labels") or []:
        if set(entry) - SUPPORTED_LABEL_FIELDS:
            raise UnsupportedFeature(f"{where}: labels field(s) {sorted(set(entry) - SUPPORTED_LABEL_FIELDS)} are not supported")
        if entry.get("includeSelectors") or entry.get("includeTemplates"):
            raise UnsupportedFeature(f"{where}: labels with includeSelectors/includeTemplates are not supported")
    for entry in kustomization.get("images") or []:
        if set(entry) - SUPPORTED_IMAGE_FIELDS or "name" not in entry:
            raise UnsupportedFeature(f"{where}: images entry {entry} is not supported")
    for entry in kustomization.get("patches") or []:
        if set(entry) - SUPPORTED_PATCH_FIELDS or ("path" in entry) == ("patch" in entry):
            raise UnsupportedFeature(f"{where}: patches entry {entry} needs exactly one of path or patch (and maybe target)")
        if set(entry.get("target") or {}) - SUPPORTED_TARGET_FIELDS:
            raise UnsupportedFeature(f"{where}: patch target fields {sorted(set(entry['target']) - SUPPORTED_TARGET_FIELDS)} are not supported")


def render(directory: str | Path, *, _accumulated: list[dict] | None = None) -> list[dict]:
    """The objects `kubectl kustomize DIRECTORY` would print, in resource order."""
    directory = Path(directory)
    path = kustomization_file(directory)
    kustomization = yaml.safe_load(path.read_text()) or {}
    check_supported(kustomization, path)
    is_component = kustomization.get("kind") == "Component"
    if is_component != (_accumulated is not None):
        raise ValueError(f"{path}: a Component is listed under `components`, a Kustomization under `resources`"
                         f" (this one is a {'Component' if is_component else 'Kustomization'})")
    objects: list[dict] = list(_accumulated or [])
    for resource in kustomization.get("resources") or []:
        target = (directory / resource).resolve()
        if target.is_dir():
            objects.extend(render(target))
        elif target.is_file():
            objects.extend(load_documents(target))
        else:
            raise FileNotFoundError(f"{path}: resource {resource} does not exist")
    keys = [identity(o) for o in objects]
    if len(set(keys)) != len(keys):
        raise ValueError(f"{path}: the same object twice: {sorted(k for k in keys if keys.count(k) > 1)}")
    for component in kustomization.get("components") or []:
        target = (directory / component).resolve()
        if not target.is_dir():
            raise FileNotFoundError(f"{path}: component {component} is not a directory")
        objects = render(target, _accumulated=objects)
    for entry in kustomization.get("patches") or []:
        if "path" in entry:
            patches = load_documents(directory / entry["path"])
        else:
            patches = [doc for doc in yaml.safe_load_all(entry["patch"]) if doc is not None]
        for patch in patches:
            apply_patch(objects, patch, entry.get("target"), path)
    for entry in kustomization.get("images") or []:
        for obj in objects:
            set_image(obj, entry)
    for entry in kustomization.get("labels") or []:
        for obj in objects:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update({k: str(v) for k, v in entry["pairs"].items()})
    return objects


def identity(obj: dict) -> tuple[str, str, str]:
    return (obj.get("apiVersion", ""), obj.get("kind", ""), (obj.get("metadata") or {}).get("name", ""))


def _matches(obj: dict, target: dict) -> bool:
    api = obj.get("apiVersion", "")
    group, _, version = api.rpartition("/")
    if "kind" in target and obj.get("kind") != target["kind"]:
        return False
    if "name" in target and (obj.get("metadata") or {}).get("name") != target["name"]:
        return False
    if "group" in target and group != target["group"]:
        return False
    return not ("version" in target and version != target["version"])


def apply_patch(objects: list[dict], patch: Any, target: dict | None, where: Path) -> None:
    if isinstance(patch, list):
        if not target:
            raise UnsupportedFeature(f"{where}: a JSON 6902 patch needs a target")
        hits = [o for o in objects if _matches(o, target)]
        if not hits:
            raise ValueError(f"{where}: patch target {target} matches no object")
        for obj in hits:
            json6902(obj, patch, where)
        return
    if not isinstance(patch, dict):
        raise UnsupportedFeature(f"{where}: a patch must be a mapping (strategic merge) or a list (JSON 6902)")
    if target is None:
        target = {"kind": patch.get("kind"), "name": (patch.get("metadata") or {}).get("name")}
    hits = [o for o in objects if _matches(o, target)]
    if not hits:
        raise ValueError(f"{where}: strategic merge patch for {target} matches no object")
    for obj in hits:
        merged = strategic_merge(obj, patch, where, "")
        obj.clear()
        obj.update(merged)


def strategic_merge(original: Any, patch: Any, where: Path, field: str) -> Any:
    if isinstance(patch, dict):
        directives = [k for k in patch if isinstance(k, str) and k.startswith("$")]
        if directives:
            raise UnsupportedFeature(f"{where}: strategic merge directive(s) {directives} are not supported")
        if not isinstance(original, dict):
            return copy.deepcopy(patch)
        result = copy.deepcopy(original)
        for key, value in patch.items():
            if value is None:
                result.pop(key, None)
            elif key in result:
                result[key] = strategic_merge(result[key], value, where, key)
            else:
                result[key] = strategic_merge(None, value, where, key)
        return result
    if isinstance(patch, list):
        key = _merge_key(field, patch, original)
        if key is None or not isinstance(original, list):
            return copy.deepcopy(patch)
        by_key = {item.get(key): item for item in original if isinstance(item, dict)}
        merged = []
        for item in patch:
            if not isinstance(item, dict) or key not in item:
                raise UnsupportedFeature(f"{where}: an item of {field} without its merge key {key}: {item}")
            if item.get("$patch") is not None:
                raise UnsupportedFeature(f"{where}: $patch in {field} is not supported")
            merged.append(strategic_merge(by_key.get(item[key]), item, where, field) if item[key] in by_key else copy.deepcopy(item))
        seen = {item[key] for item in patch}
        merged.extend(copy.deepcopy(item) for item in original if not (isinstance(item, dict) and item.get(key) in seen))
        return merged
    return copy.deepcopy(patch)


def _merge_key(field: str, patch: list, original: Any) -> str | None:
    if field in MERGE_KEYS:
        return MERGE_KEYS[field]
    if field == "ports":
        items = [i for i in list(patch) + list(original or []) if isinstance(i, dict)]
        if items and all("containerPort" in i for i in items):
            return "containerPort"
        if items and all("port" in i for i in items):
            return "port"
    return None


def _pointer(path: str) -> list[str]:
    if not path.startswith("/"):
        raise ValueError(f"JSON pointer {path!r} must start with /")
    return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]


def _walk(doc: Any, parts: list[str], path: str) -> Any:
    for part in parts:
        if isinstance(doc, list):
            if not part.isdigit() or int(part) >= len(doc):
                raise ValueError(f"JSON 6902 path {path}: no item {part}")
            doc = doc[int(part)]
        elif isinstance(doc, dict):
            if part not in doc:
                raise ValueError(f"JSON 6902 path {path}: no field {part}")
            doc = doc[part]
        else:
            raise ValueError(f"JSON 6902 path {path}: {part} is inside a scalar")
    return doc


def json6902(obj: dict, operations: list, where: Path) -> None:
    for op in operations:
        kind = op.get("op")
        if kind not in ("add", "replace", "remove", "copy", "test") or set(op) - {"op", "path", "value", "from"} \
                or ("from" in op) != (kind == "copy"):
            raise UnsupportedFeature(f"{where}: JSON 6902 operation {op} is not supported (add, replace, remove, copy, test)")
        parts = _pointer(op["path"])
        if kind == "copy":  # RFC 6902: an add of the value found at `from`
            op = {"op": "add", "path": op["path"], "value": _walk(obj, _pointer(op["from"]), op["from"])}
            kind = "add"
        if kind == "test":
            found = _walk(obj, parts, op["path"])
            if found != op.get("value"):
                raise ValueError(f"{where}: JSON 6902 test {op['path']}: expected {op.get('value')!r}, found {found!r}")
            continue
        parent = _walk(obj, parts[:-1], op["path"])
        last = parts[-1]
        value = copy.deepcopy(op.get("value"))
        if isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(value)
                continue
            if not last.isdigit() or int(last) > len(parent) or (kind != "add" and int(last) == len(parent)):
                raise ValueError(f"{where}: JSON 6902 path {op['path']}: no item {last}")
            index = int(last)
            if kind == "add":
                parent.insert(index, value)
            elif kind == "replace":
                parent[index] = value
            else:
                del parent[index]
        elif isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise ValueError(f"{where}: JSON 6902 path {op['path']}: no field {last}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = value
        else:
            raise ValueError(f"{where}: JSON 6902 path {op['path']}: the parent is a scalar")


def pod_spec(obj: dict) -> dict | None:
    path = POD_SPEC_PATHS.get(obj.get("kind", ""))
    if path is None:
        return None
    spec: Any = obj
    for part in path:
        spec = (spec or {}).get(part)
    return spec


def all_containers(obj: dict) -> list[dict]:
    spec = pod_spec(obj) or {}
    return list(spec.get("initContainers") or []) + list(spec.get("containers") or [])


def _split_image(image: str) -> tuple[str, str]:
    """name and the rest (':tag', '@digest' or '')."""
    at = image.find("@")
    if at >= 0:
        return image[:at], image[at:]
    slash = image.rfind("/")
    colon = image.rfind(":")
    if colon > slash:
        return image[:colon], image[colon:]
    return image, ""


def set_image(obj: dict, entry: dict) -> None:
    for container in all_containers(obj):
        name, rest = _split_image(container.get("image", ""))
        if name != entry["name"]:
            continue
        new_name = entry.get("newName", name)
        if "digest" in entry:
            rest = "@" + entry["digest"]
        elif "newTag" in entry:
            rest = ":" + str(entry["newTag"])
        container["image"] = new_name + rest
