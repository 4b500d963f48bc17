"""The structure of a workflow file, checked before anything runs: every problem at once, with where it is.

A damaged or hand-edited file (a list instead of an object, nodes without "id" or "type", links of the wrong
length, widgets_values that are not a list...) is reported in one ``WorkflowError`` naming each node and field,
so nothing in the executor ever meets a missing key.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class WorkflowError(ValueError):
    """The workflow cannot run as written; the message names the node, the value and the fix."""


def _kind(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(value), "a number" if isinstance(value, (int, float)) else type(value).__name__)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_id(value: Any) -> bool:
    return _is_int(value) or (isinstance(value, str) and value.strip().isdigit())


LINK_FIELDS = ("id", "origin_id", "origin_slot", "target_id", "target_slot", "type")


def _ui_node_problems(index: int, node: Any, seen: set) -> list[str]:
    if not isinstance(node, dict):
        return [f"nodes[{index}] is {_kind(node)}, expected a node object"]
    problems = []
    ntype = node.get("type")
    named = f" ({ntype})" if isinstance(ntype, str) and ntype else ""
    if "id" not in node:
        problems.append(f"nodes[{index}]{named}: no 'id'")
        where = f"nodes[{index}]{named}"
    elif not _is_id(node["id"]):
        problems.append(f"nodes[{index}]{named}: 'id' is {node['id']!r}, expected an integer")
        where = f"nodes[{index}]{named}"
    else:
        where = f"node {node['id']}{named}"
        if int(node["id"]) in seen:
            problems.append(f"{where}: 'id' {node['id']} is used by another node too; node ids must be unique")
        seen.add(int(node["id"]))
    if not named:
        problems.append(f"{where}: 'type' is {'missing' if 'type' not in node else _kind(ntype)}, expected the "
                        "node's type name (a string)")
    values = node.get("widgets_values")
    if values is not None and not isinstance(values, (list, dict)):
        problems.append(f"{where}: 'widgets_values' is {_kind(values)}, expected a list of widget values")
    if node.get("mode") is not None and not _is_int(node.get("mode")):
        problems.append(f"{where}: 'mode' is {node['mode']!r}, expected an integer (0 runs, 2 muted, 4 bypassed)")
    inputs = node.get("inputs")
    if inputs is not None and not isinstance(inputs, list):
        problems.append(f"{where}: 'inputs' is {_kind(inputs)}, expected a list of sockets")
    for i, socket in enumerate(inputs if isinstance(inputs, list) else []):
        if not isinstance(socket, dict):
            problems.append(f"{where}: inputs[{i}] is {_kind(socket)}, expected a socket object")
        elif not isinstance(socket.get("name"), str):
            problems.append(f"{where}: inputs[{i}] has no 'name' (a string)")
        elif socket.get("link") is not None and not _is_int(socket["link"]):
            problems.append(f"{where}: input {socket['name']!r}: 'link' is {socket['link']!r}, expected a link id "
                            "(an integer) or null")
    return problems


def _link_problems(index: int, link: Any) -> list[str]:
    if isinstance(link, dict):
        missing = [k for k in LINK_FIELDS[:5] if not _is_int(link.get(k))]
        name = f"links[{index}]" + (f" (link {link['id']})" if _is_int(link.get("id")) else "")
        return [f"{name}: {', '.join(repr(k) for k in missing)} missing or not an integer"] if missing else []
    if not isinstance(link, list):
        return [f"links[{index}] is {_kind(link)}, expected [id, origin node, origin slot, target node, target "
                "slot, type]"]
    name = f"links[{index}]" + (f" (link {link[0]})" if link and _is_int(link[0]) else "")
    if len(link) != len(LINK_FIELDS):
        return [f"{name}: {len(link)} entries {link!r}, expected 6: [id, origin node, origin slot, target node, "
                "target slot, type]"]
    bad = [LINK_FIELDS[i] for i in range(5) if not _is_int(link[i])]
    return [f"{name}: {', '.join(bad)} not an integer in {link!r}"] if bad else []


def _ui_problems(data: Mapping) -> list[str]:
    nodes, links = data.get("nodes"), data.get("links")
    problems = []
    if not isinstance(nodes, list):
        problems.append(f"'nodes' is {_kind(nodes)}, expected a list of nodes")
    seen: set = set()
    for index, node in enumerate(nodes if isinstance(nodes, list) else []):
        problems += _ui_node_problems(index, node, seen)
    if links is not None and not isinstance(links, list):
        problems.append(f"'links' is {_kind(links)}, expected a list of links")
    for index, link in enumerate(links if isinstance(links, list) else []):
        problems += _link_problems(index, link)
    return problems


def _api_problems(data: Mapping) -> list[str]:
    problems = []
    for node_id, entry in data.items():
        where = f"node {node_id!r}"
        if not isinstance(entry, dict):
            problems.append(f"{where} is {_kind(entry)}, expected an object with 'class_type' and 'inputs'")
            continue
        if not isinstance(entry.get("class_type"), str):
            found = "missing" if "class_type" not in entry else _kind(entry["class_type"])
            problems.append(f"{where}: 'class_type' is {found}, expected the node's type name (a string)")
        else:
            where = f"node {node_id!r} ({entry['class_type']})"
        inputs = entry.get("inputs", {})
        if not isinstance(inputs, dict):
            problems.append(f"{where}: 'inputs' is {_kind(inputs)}, expected an object of input values")
            continue
        for name, value in inputs.items():
            if isinstance(value, list) and not (len(value) == 2 and _is_id(value[0]) and _is_int(value[1])):
                problems.append(f"{where} input {name!r}: {value!r} is not a link [node id, output slot]")
    return problems


def check_structure(data: Any) -> str:
    """"ui" or "api": what the parsed JSON is. Raises one WorkflowError listing every structural problem (nodes
    without "id" or "type", links of the wrong length, widgets_values that are not a list...), so a damaged
    file is reported at once and nothing below ever meets a missing key."""
    if not isinstance(data, dict):
        raise WorkflowError(f"the file holds {_kind(data)}, expected a JSON object: a ComfyUI workflow (with "
                            "'nodes') or an API prompt - save it again from ComfyUI (Workflow > Save / Export)")
    if "nodes" in data:
        kind, problems = "ui", _ui_problems(data)
    elif data and any(isinstance(v, dict) and "class_type" in v for v in data.values()):
        kind, problems = "api", _api_problems(data)
    else:
        raise WorkflowError("the file is neither a ComfyUI workflow (no 'nodes') nor an API prompt (no entry with "
                            "'class_type') - save it again from ComfyUI (Workflow > Save / Export)")
    if problems:
        raise WorkflowError(f"{len(problems)} problem{'s' * (len(problems) > 1)} in the workflow's structure "
                            f"(repair the file or save it again from ComfyUI):\n  " + "\n  ".join(problems))
    return kind
