"""Run a ComfyUI workflow with the pack's nodes, no ComfyUI needed (the command line is ``standalone.cli``).

WORKFLOW.json is what ComfyUI saves (UI format: ``nodes``, ``links``...) or an API-format prompt. Widget
values map to each node's widget inputs in INPUT_TYPES order (with the frontend's hidden
``control_after_generate`` value after every seed), values are checked as ComfyUI's server checks them
(ranges, options, VALIDATE_INPUTS), and the nodes an output needs run in dependency order. Images are written
as PNGs with the API prompt and the workflow in "prompt" / "workflow" text chunks, as ComfyUI's SaveImage
writes them, so the file drags back into ComfyUI. Models come from a ComfyUI-style models folder (``--models``
or env SCW_MODELS_DIR); a loader whose folder is empty runs its tiny random demo network, and says so, but
a folder that holds only files the pack refuses (pickles, other formats) is an error naming them.

The file's structure is checked before anything runs and every problem is reported at once, named by the file,
the node id and the field (``WorkflowError``); an error a node raises while running becomes a ``NodeError``
naming the node id and title (``standalone.cli`` maps both to exit codes, never a traceback).
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import os
from collections import Counter
from collections.abc import Collection, Iterator, Mapping
from typing import Any

from .. import host
from ..cascade.errors import CascadeError, SamplingInterrupted
from ..nodes import NODE_CLASS_MAPPINGS
from ..nodes.common import DEMO_CHOICE
from . import comfy_runtime, core_standins
from .migrate import migrate_prompt
from .structure import WorkflowError, check_structure

log = logging.getLogger("comfyui_stablecascade.standalone")

WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
CONTROL_WIDGET = "control_after_generate"
UPLOAD_WIDGET = "upload"
# Drawn by the frontend and never sent to the server; a PrimitiveNode's value is already in its target's widget.
FRONTEND_ONLY = ("Note", "MarkdownNote", "PrimitiveNode")
PASS_THROUGH = ("Reroute",)
MODE_NEVER, MODE_BYPASS = 2, 4
CORE_NODES = tuple(core_standins.core_standins())  # the core node types the runner stands in for


class NodeError(RuntimeError):
    """A node raised while the workflow ran. The message names the node id, its type and title, and the error
    (``error``, also the ``__cause__``). ``bad_input``: the pack refused a value or file (a ``CascadeError``),
    as opposed to an unexpected failure; ``interrupted``: the user stopped sampling."""

    def __init__(self, node_id: str, class_type: str, title: str | None, error: BaseException) -> None:
        self.node_id, self.class_type, self.title, self.error = node_id, class_type, title, error
        self.bad_input = isinstance(error, (CascadeError, WorkflowError))
        self.interrupted = isinstance(error, SamplingInterrupted)
        titled = f", titled {title!r}" if title and title != class_type else ""
        label = f"node {node_id} ({class_type}{titled})"
        if self.bad_input or self.interrupted:
            message = f"{label}: {error}"
        elif isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":
            message = (f"{label} ran out of memory ({type(error).__name__}: {error}) - use a smaller width, height "
                       "or batch, bf16 weights, or free memory; -v shows where")
        elif class_type not in NODE_CLASS_MAPPINGS:  # a core node (or its stand-in) or another pack's node
            message = (f"{label} failed with {type(error).__name__}: {error} - check its inputs; run again with -v "
                       "for the traceback")
        else:
            message = (f"{label} failed with an unexpected {type(error).__name__}: {error} - the pack did not expect "
                       "this; run again with -v for the traceback (and report it if the inputs look right)")
        super().__init__(message)


def node_classes(input_dir: str = "input") -> dict[str, type]:
    """Every node the runner knows: the pack's, then the core stand-ins (LoadImage reading ``input_dir``)."""
    return {**NODE_CLASS_MAPPINGS, **core_standins.core_standins(input_dir)}


# ---- UI format -> API format ------------------------------------------------------------------------


def _spec_type_and_options(spec: Any) -> tuple[Any, dict]:
    kind = spec[0] if isinstance(spec, (list, tuple)) and spec else spec
    options = spec[1] if isinstance(spec, (list, tuple)) and len(spec) > 1 and isinstance(spec[1], dict) else {}
    return kind, options


def is_widget(spec: Any) -> bool:
    """Whether the frontend draws this input as a widget (a value) rather than a socket."""
    kind, options = _spec_type_and_options(spec)
    if options.get("forceInput"):
        return False
    return isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES


def combo_options(spec: Any) -> list | None:
    kind, options = _spec_type_and_options(spec)
    if isinstance(kind, (list, tuple)):
        return list(kind)
    return list(options.get("options", [])) if kind == "COMBO" else None


def has_upload_widget(spec: Any) -> bool:
    """The frontend adds a serialized "upload" button value after image-upload combos (core's LoadImage)."""
    return bool(_spec_type_and_options(spec)[1].get("image_upload"))


def has_control_widget(name: str, spec: Any) -> bool:
    """The frontend adds a serialized control_after_generate value after seed-like INT widgets."""
    kind, options = _spec_type_and_options(spec)
    return kind == "INT" and bool(options.get(CONTROL_WIDGET) or name in ("seed", "noise_seed"))


def input_specs(cls: type) -> dict[str, Any]:
    """required then optional inputs, in declaration order (the frontend's widget order)."""
    types = cls.INPUT_TYPES()
    return {**types.get("required", {}), **types.get("optional", {})}


def widget_slots(cls: type) -> list[str]:
    """Names of the values in widgets_values, in order, including the frontend's control values."""
    slots = []
    for name, spec in input_specs(cls).items():
        if is_widget(spec):
            slots.append(name)
            if has_control_widget(name, spec):
                slots.append(CONTROL_WIDGET)
            if has_upload_widget(spec):
                slots.append(UPLOAD_WIDGET)
    return slots


def _links(workflow: Mapping) -> dict[int, tuple[int, int, int, int, str]]:
    """link id -> (from_node, from_slot, to_node, to_slot, type); both the list and the object forms
    (``check_structure`` has made sure each entry has them)."""
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            link = [link["id"], link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"],
                    link.get("type")]
        out[int(link[0])] = (int(link[1]), int(link[2]), int(link[3]), int(link[4]), link[5])
    return out


def _resolve_source(nodes: Mapping[int, dict], links: Mapping, link_id: int | None) -> tuple[int, int] | None:
    """(node id, output slot) feeding a link, through Reroutes and bypassed nodes; None if it comes from
    nothing (a muted node or an unconnected pass-through)."""
    seen = set()
    while link_id is not None:
        if link_id in seen or link_id not in links:
            return None
        seen.add(link_id)
        src, slot, _, _, ltype = links[link_id]
        node = nodes.get(src)
        if node is None or node.get("mode") == MODE_NEVER or node["type"] in FRONTEND_ONLY:
            return None
        if node["type"] in PASS_THROUGH:
            link_id = (node.get("inputs") or [{}])[0].get("link")
        elif node.get("mode") == MODE_BYPASS:
            # As the frontend: the output takes the first input of the same type.
            match = [i for i in node.get("inputs", []) if i.get("type") == ltype and i.get("link") is not None]
            link_id = match[0]["link"] if match else None
        else:
            return src, slot
    return None


def _widget_values(node: Mapping, cls: type) -> dict[str, Any]:
    values = node.get("widgets_values")
    if values is None:
        return {}
    if isinstance(values, Mapping):
        return {k: v for k, v in values.items() if k in input_specs(cls)}
    slots = widget_slots(cls)
    missing = slots[len(values):]
    specs = input_specs(cls)
    if missing and all("default" in _spec_type_and_options(specs.get(name))[1] for name in missing):
        # A workflow saved before a node gained trailing widgets: as the frontend, they keep their defaults.
        log.info("ComfyUI-StableCascade: node %s (%s) was saved without the widgets %s; using their defaults",
                 node["id"], node["type"], missing)
        values = [*values, *(_spec_type_and_options(specs[name])[1]["default"] for name in missing)]
    if len(values) != len(slots):
        raise WorkflowError(
            f"node {node['id']} ({node['type']}): {len(values)} widget values {list(values)!r} for {len(slots)} "
            f"widgets {slots}; the workflow was saved with another version of the node - re-create the node"
        )
    return {name: v for name, v in zip(slots, values) if name not in (CONTROL_WIDGET, UPLOAD_WIDGET)}


def to_api_prompt(workflow: Mapping, classes: Mapping[str, type]) -> dict[str, dict]:
    """ComfyUI's API format (what its "prompt" PNG chunk holds) of a UI-format workflow."""
    nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
    links = _links(workflow)
    prompt = {}
    for node_id, node in sorted(nodes.items()):
        if node["type"] in FRONTEND_ONLY + PASS_THROUGH or node.get("mode") in (MODE_NEVER, MODE_BYPASS):
            continue
        cls = classes.get(node["type"])
        if cls is None:
            raise comfy_runtime.unknown_node_error(str(node_id), node["type"], classes)
        inputs = _widget_values(node, cls)
        for socket in node.get("inputs", []) or []:
            source = _resolve_source(nodes, links, socket.get("link"))
            if source is not None:
                inputs[socket["name"]] = [str(source[0]), source[1]]
        prompt[str(node_id)] = {"inputs": inputs, "class_type": node["type"],
                                "_meta": {"title": node.get("title") or node["type"]}}
    return prompt


# ---- checks, as ComfyUI's server does them ----------------------------------------------------------


def _check_value(node_id: str, cls: type, name: str, spec: Any, value: Any, bounded: bool = True) -> None:
    """As ComfyUI's server: ``bounded`` False (the node's VALIDATE_INPUTS takes this input) skips the options and
    min/max checks, which the node then owns; types and finiteness are still checked."""
    kind, options = _spec_type_and_options(spec)
    where = f"node {node_id} ({getattr(cls, 'NODE_ID', cls.__name__)}) input {name!r}"
    choices = combo_options(spec)
    if choices is not None:
        if bounded and value not in choices:
            raise WorkflowError(f"{where}: {value!r} is not one of {choices}")
        return
    if kind in ("INT", "FLOAT"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise WorkflowError(f"{where}: {value!r} is not a{'n integer' if kind == 'INT' else ' number'}")
        if not math.isfinite(value):
            # JSON readers accept NaN and Infinity; no range check can hold for them (NaN compares false).
            raise WorkflowError(f"{where}: {value} is not a finite number; expected "
                                f"{options.get('min', '-inf')}..{options.get('max', 'inf')}")
        if kind == "INT" and value != int(value):
            raise WorkflowError(f"{where}: {value!r} is not an integer")
        if bounded and "min" in options and value < options["min"]:
            raise WorkflowError(f"{where}: {value} is below the minimum {options['min']}")
        if bounded and "max" in options and value > options["max"]:
            raise WorkflowError(f"{where}: {value} is above the maximum {options['max']}")
    elif kind == "STRING" and not isinstance(value, str):
        raise WorkflowError(f"{where}: {value!r} is not a string")
    elif kind == "BOOLEAN" and not isinstance(value, bool):
        raise WorkflowError(f"{where}: {value!r} is not a boolean")


def _check_model_files(node_id: str, cls: type, inputs: dict) -> None:
    """A loader's ``file_name`` that its folders do not offer: with no weights file there at all, the tiny demo
    network runs instead (logged); otherwise, or when the folders hold files the pack refuses (a .ckpt next to
    nothing else), an error naming the missing file and what the folders hold, and why it is not read."""
    folders = tuple(getattr(cls, "FOLDERS", ()))
    spec = input_specs(cls).get("file_name")
    value = inputs.get("file_name")
    choices = combo_options(spec) if spec is not None else None
    if not folders or choices is None or not isinstance(value, str) or value == DEMO_CHOICE or value in choices:
        return
    node = getattr(cls, "NODE_ID", cls.__name__)
    where = f"node {node_id} ({node}) input 'file_name'"
    refused = host.refused_files(folders)
    if choices == [DEMO_CHOICE] and not refused:
        log.warning("ComfyUI-StableCascade: node %s (%s): %r is not installed (no weights file in models/%s); "
                    "running the tiny random demo network instead.", node_id, node, value, " or models/".join(folders))
        inputs["file_name"] = DEMO_CHOICE
        return
    demo = "; the tiny demo network does not stand in for them" if choices == [DEMO_CHOICE] else ""
    why = dict(refused).get(value)
    if why is not None:  # the named file is there, and is one the pack refuses
        raise WorkflowError(f"{where}: {value!r} is in the models folder but is {why}{demo}")
    # The loader's own check gives the text the browser shows (which folder, what the file is, where the release
    # lives). Any other file that is there (another spelling, or not weights at all): the loader reads it and names
    # what is wrong with it.
    check = getattr(cls, "VALIDATE_INPUTS", None)
    found = check(file_name=value) if check is not None else True
    if found is not True:
        raise WorkflowError(f"{where}: {str(found).rstrip('.') if demo else found}{demo}")


def validate(prompt: dict[str, dict], classes: Mapping[str, type], checked: Collection[str] | None = None) -> None:
    """Missing inputs, links to missing nodes, widget values out of range, VALIDATE_INPUTS messages. Missing model
    files come first, all of them in one error (as ComfyUI names each loader whose file is missing). ``checked``:
    the node types to check (default all; with --comfyui, the pack's, ComfyUI's own check follows)."""
    missing = []
    for node_id, entry in prompt.items():
        if checked is not None and entry["class_type"] not in checked:
            continue
        try:
            _check_model_files(node_id, classes[entry["class_type"]], entry["inputs"])
        except WorkflowError as exc:
            missing.append(str(exc))
    if missing:
        raise WorkflowError("\n".join(missing) if len(missing) == 1 else
                            f"{len(missing)} model files are missing:\n" + "\n".join(f"- {m}" for m in missing))
    for node_id, entry in prompt.items():
        if checked is not None and entry["class_type"] not in checked:
            continue
        cls = classes[entry["class_type"]]
        inputs = entry["inputs"]
        required = cls.INPUT_TYPES().get("required", {})
        check = getattr(cls, "VALIDATE_INPUTS", None)
        owned = inspect.getfullargspec(check) if check is not None else None
        owns = (lambda name: bool(owned.varkw) or name in owned.args) if owned else (lambda name: False)
        for name, spec in input_specs(cls).items():
            value = inputs.get(name)
            if value is None:
                if name in required:
                    raise WorkflowError(f"node {node_id} ({entry['class_type']}): required input {name!r} is not "
                                        "connected or has no value")
            elif isinstance(value, list):
                if value[0] not in prompt:
                    raise WorkflowError(f"node {node_id}: input {name!r} is linked to node {value[0]}, which does "
                                        "not run (muted, bypassed without a matching input, or missing)")
            else:
                _check_value(node_id, cls, name, spec, value, bounded=not owns(name))
        if check is not None:
            params = inspect.signature(check).parameters
            result = check(**{k: v for k, v in inputs.items() if k in params and not isinstance(v, list)})
            if result is not True:
                raise WorkflowError(f"node {node_id} ({entry['class_type']}): {result}")


# ---- execution --------------------------------------------------------------------------------------


def execution_order(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> list[str]:
    """The nodes the output nodes need, each after its inputs (as ComfyUI, nodes no output needs don't run)."""
    outputs = [i for i, e in prompt.items() if getattr(classes[e["class_type"]], "OUTPUT_NODE", False)]
    if not outputs:
        raise WorkflowError("the workflow has no output node (e.g. SaveImage), so nothing would run - add one")
    order: list[str] = []
    state: dict[str, str] = {}
    sizes: dict[str, int] = {}

    def upstream(node_id: str) -> int:
        if node_id not in sizes:
            sizes[node_id] = 0  # a cycle is reported by visit(); this only keeps the count finite
            sizes[node_id] = 1 + sum(upstream(v[0]) for v in prompt[node_id]["inputs"].values()
                                     if isinstance(v, list) and v[0] in prompt)
        return sizes[node_id]

    def visit(node_id: str) -> None:
        if state.get(node_id) == "done":
            return
        if state.get(node_id) == "active":
            raise WorkflowError(f"the workflow has a cycle through node {node_id}")
        state[node_id] = "active"
        # Deepest inputs first, so a loader (no inputs) runs just before the node that needs it and its network
        # is not resident while earlier stages run.
        # A link to a node that is not in the prompt is reported by validate(), with the input's name.
        links = [v for v in prompt[node_id]["inputs"].values() if isinstance(v, list) and v[0] in prompt]
        for value in sorted(links, key=lambda v: -upstream(v[0])):
            visit(value[0])
        state[node_id] = "done"
        order.append(node_id)

    for node_id in sorted(outputs, key=int):
        visit(node_id)
    return order


def _hidden_inputs(cls: type, node_id: str, prompt: dict, workflow: Mapping | None) -> dict[str, Any]:
    values = {"PROMPT": prompt, "EXTRA_PNGINFO": {"workflow": workflow} if workflow is not None else None,
              "UNIQUE_ID": node_id}
    return {name: values.get(kind) for name, kind in cls.INPUT_TYPES().get("hidden", {}).items()}


def execute(prompt: dict[str, dict], classes: Mapping[str, type], workflow: Mapping | None = None,
            output: Any = None) -> dict[str, tuple]:
    """Run the nodes in dependency order; returns the output nodes' results by node id.

    A node's outputs are dropped after their last consumer ran (networks handed back to the host), so a
    stage's networks are not held while later stages run.
    """
    results: dict[str, tuple] = {}
    order = execution_order(prompt, classes)
    pending = Counter(v[0] for n in order for v in prompt[n]["inputs"].values() if isinstance(v, list))
    for node_id in order:
        entry = prompt[node_id]
        cls = classes[entry["class_type"]]
        kwargs = {name: results[v[0]][v[1]] if isinstance(v, list) else v for name, v in entry["inputs"].items()}
        kwargs.update(_hidden_inputs(cls, node_id, prompt, workflow))
        if issubclass(cls, core_standins.SaveImage):
            kwargs["output"] = output
        log.info("ComfyUI-StableCascade: running node %s (%s)", node_id, entry["class_type"])
        try:
            out = getattr(cls(), cls.FUNCTION)(**kwargs)
        except Exception as exc:
            # The traceback is for -v (debug); the message names the node so the user knows where to look.
            log.debug("ComfyUI-StableCascade: node %s (%s) raised", node_id, entry["class_type"], exc_info=True)
            title = (entry.get("_meta") or {}).get("title")
            raise NodeError(node_id, entry["class_type"], title, exc) from exc
        results[node_id] = tuple(out.get("result", ()) if isinstance(out, dict) else out)
        for value in entry["inputs"].values():
            if isinstance(value, list):
                pending[value[0]] -= 1
                if pending[value[0]] == 0:
                    host.forget(results.pop(value[0], ()))
    return results


def override_seed(workflow: Mapping | None, prompt: dict[str, dict], classes: Mapping[str, type], seed: int) -> None:
    """Set every seed widget (INT with a control_after_generate value) in the prompt and in the workflow copy
    that gets embedded, so the PNG reproduces the run."""
    for entry in prompt.values():
        for name, spec in input_specs(classes[entry["class_type"]]).items():
            if has_control_widget(name, spec) and not isinstance(entry["inputs"].get(name), list):
                entry["inputs"][name] = seed
    for node in (workflow or {}).get("nodes", []):
        cls = classes.get(node["type"])
        if cls is None or not isinstance(node.get("widgets_values"), list):
            continue
        slots = widget_slots(cls)
        for index, name in enumerate(slots):
            if index < len(node["widgets_values"]) and name in input_specs(cls) and \
                    has_control_widget(name, input_specs(cls)[name]):
                node["widgets_values"][index] = seed


def _parse_file(path: str | os.PathLike) -> Any:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise WorkflowError("no such file - check the path") from None
    except UnicodeDecodeError:
        raise WorkflowError("not a text file (not UTF-8), so not a workflow .json") from None
    except OSError as exc:
        raise WorkflowError(f"cannot be read ({exc.strerror or exc})") from None
    if not text.strip():
        raise WorkflowError("the file is empty - save the workflow again from ComfyUI")
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise WorkflowError(f"not valid JSON ({exc.msg}, line {exc.lineno} column {exc.colno}): a truncated or "
                            "hand-edited file? - save the workflow again from ComfyUI") from None


@contextlib.contextmanager
def _in_file(source: str | os.PathLike | Mapping) -> Iterator[None]:
    """Prefix the workflow file's name to every WorkflowError raised inside."""
    try:
        yield
    except WorkflowError as exc:
        if isinstance(source, (str, os.PathLike)):
            raise WorkflowError(f"{os.fspath(source)}: {exc}") from None
        raise


def read_workflow(source: str | Mapping) -> tuple[dict | None, dict]:
    """(UI workflow or None, API prompt-or-UI data) from a path or an already parsed JSON object; its structure
    is checked first (``check_structure``) and errors name the file."""
    with _in_file(source):
        data = _parse_file(source) if isinstance(source, (str, os.PathLike)) else source
        kind = check_structure(data)
        data = json.loads(json.dumps(data))  # a private copy: seeds and demo choices are written into it
    return (data, data) if kind == "ui" else (None, data)


def default_input_dir(source: str | Mapping) -> str:
    """Images for LoadImage: the ``inputs`` folder next to a workflow file when there is one (the shipped
    workflows keep their example images there), else ./input as in ComfyUI."""
    if isinstance(source, (str, os.PathLike)):
        beside = os.path.join(os.path.dirname(os.path.abspath(source)), "inputs")
        if os.path.isdir(beside):
            return beside
    return "input"


def _normalise_prompt(prompt: Mapping[str, dict], classes: Mapping[str, type]) -> None:
    """API prompts name their node types directly (one the runner lacks is an error, not a KeyError) and may
    give linked node ids as numbers (made strings, as the prompt's keys)."""
    for node_id, entry in prompt.items():
        entry.setdefault("inputs", {})
        for name, value in entry["inputs"].items():
            if isinstance(value, list):
                entry["inputs"][name] = [str(value[0]), value[1]]  # API prompts may give node ids as numbers
        if entry["class_type"] not in classes:
            raise comfy_runtime.unknown_node_error(node_id, entry["class_type"], classes)


def run_workflow(source: str | Mapping, out: str | None = None, output_dir: str = "output", seed: int | None = None,
                 models: str | None = None, input_dir: str | None = None, comfyui: str | None = None) -> list[str]:
    """Check and run a workflow; returns the paths of the images written. ``comfyui``: a ComfyUI checkout whose
    core and custom nodes run through its own executor (``comfy_runtime``), instead of the core stand-ins."""
    if models:
        host.set_models_dir(models)
    input_dir = input_dir or default_input_dir(source)
    runtime = comfy_runtime.start(comfyui, models, input_dir, output_dir, out) if comfyui else None
    classes = runtime.classes if runtime else node_classes(input_dir)
    host.set_io_dirs(input_dir, output_dir)  # folders a node reads or writes by itself (training sets, states)
    workflow, data = read_workflow(source)
    with _in_file(source):
        prompt = to_api_prompt(workflow, classes) if workflow is not None else data
        _normalise_prompt(prompt, classes)
        migrate_prompt(prompt)  # inputs saved by older versions of the pack: today's names and units
        if seed is not None:
            override_seed(workflow, prompt, classes, seed)
        # As ComfyUI: only what an output needs is checked and run.
        needed = {node_id: prompt[node_id] for node_id in execution_order(prompt, classes)}
        validate(needed, classes, NODE_CLASS_MAPPINGS if runtime else None)
        outputs = runtime.validate(prompt) if runtime else []
    output = core_standins.OutputPlan(directory=output_dir, out=out)
    if runtime:
        runtime.execute(prompt, outputs, workflow, output)
    else:
        execute(prompt, classes, workflow, output)
    if any(DEMO_CHOICE in e["inputs"].values() for e in prompt.values()):
        log.warning("ComfyUI-StableCascade: this run used tiny random networks, so the image is NOISE. Install the "
                    "weights named in the warnings above (see README, 'Which file goes where') and run again.")
    return output.written
