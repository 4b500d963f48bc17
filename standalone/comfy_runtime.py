"""The headless runner on a ComfyUI checkout (``--comfyui PATH``, or env COMFYUI_PATH through headless.py): every node
type that ComfyUI has, core and custom, runs through ComfyUI's own node classes and its own executor, in this process.

Set up as ComfyUI's main.py sets up a server, without the server's network side: the checkout's
extra_model_paths.yaml, ``nodes.init_extra_nodes`` (comfy_extras, the API nodes) and the custom nodes of every
custom_nodes folder (this pack itself excepted: its copy loaded here runs), between the hook breaker's save and
restore; a ``server.PromptServer`` is made (not started) first, since nodes reach for ``PromptServer.instance``.
Folders: input and output are the runner's (``--input-dir``, ``--output-dir``), ``--models`` is laid over ComfyUI's
model folders, user and temp folders are a private temporary folder. Custom nodes' prestartup scripts do not run.

The comfy boundary stays in host/: ComfyUI's modules come from ``host.comfyui_runtime_modules()``; this module
never imports ComfyUI. The pack's nodes run on the host's ComfyUI backend (headless.py puts the checkout on the path
before the pack loads), so core and pack nodes share ComfyUI's memory manager, as inside ComfyUI.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import inspect
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from typing import Any

from .. import host
from ..cascade.errors import CascadeError, SamplingInterrupted
from ..nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
from .structure import WorkflowError

log = logging.getLogger("comfyui_stablecascade.standalone")
PACK_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class NodeClasses(dict):
    """Node type -> class, remembering which ComfyUI checkout they come from (None: the pack and its stand-ins)."""

    comfyui_root: str | None = None


def unknown_node_error(node_id: str, node_type: str, classes: Mapping[str, type]) -> WorkflowError:
    """The error for a node type the runner lacks, with the fix for the mode it runs in."""
    root = getattr(classes, "comfyui_root", None)
    if root:
        fix = (f"the ComfyUI at {root} has no such node, core or custom: install the custom node pack that provides "
               f"it into {os.path.join(root, 'custom_nodes')} (or read its import error in the log above)")
    else:
        from .core_standins import core_standins

        fix = ("without ComfyUI the runner knows the pack's nodes and stand-ins for the core nodes "
               f"{sorted(core_standins())}: run with --comfyui PATH (or env COMFYUI_PATH) naming a ComfyUI checkout, "
               "under ComfyUI's Python, to run every core and custom node it has")
    return WorkflowError(f"node {node_id}: unknown node type {node_type!r}; {fix}")


def check_root(path: str) -> str:
    root = os.path.abspath(os.path.expanduser(path))
    if not (os.path.isfile(os.path.join(root, "nodes.py")) and os.path.isdir(os.path.join(root, "comfy"))):
        raise WorkflowError(f"--comfyui {path}: not a ComfyUI checkout (no nodes.py and comfy/ there); give the "
                            "folder holding ComfyUI's main.py, or leave it out to run with the core stand-ins")
    return root


class _QuietServer:
    """What ComfyUI's executor needs of a server when ``server.PromptServer`` cannot be made: nowhere to send."""

    client_id = last_node_id = last_prompt_id = None
    sockets_metadata: dict = {}

    def send_sync(self, *args: Any, **kwargs: Any) -> None:
        return None

    def send_progress_text(self, *args: Any, **kwargs: Any) -> None:
        return None


class _ErrorsToDebug(logging.Filter):
    """ComfyUI's executor logs a failing node's traceback at error level, and its node loader the traceback of a
    module that does not import; the runner reports a failure in one line (``NodeError``; the loader adds a line
    naming the module), so those records go to debug (``-v``)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if (record.module == "execution" and record.levelno >= logging.ERROR) or \
                record.getMessage().lstrip().startswith("Traceback (most recent call last)"):
            log.debug("ComfyUI: %s", record.getMessage())
            return False
        return True


@contextlib.contextmanager
def _one_line_errors() -> Iterator[None]:
    quiet = _ErrorsToDebug()
    logging.getLogger().addFilter(quiet)
    try:
        yield
    finally:
        logging.getLogger().removeFilter(quiet)


def _run(result: Any) -> Any:
    return asyncio.run(result) if inspect.isawaitable(result) else result


class ComfyRuntime:
    """ComfyUI's node registry, folders and executor, set up once per process (``start``)."""

    def __init__(self, root: str, modules: Any) -> None:
        self.root, self.m = root, modules
        self.private = tempfile.mkdtemp(prefix="scw-comfyui-")
        atexit.register(shutil.rmtree, self.private, ignore_errors=True)
        fp = modules.folder_paths
        yaml = os.path.join(root, "extra_model_paths.yaml")
        if os.path.isfile(yaml):
            modules.extra_config.load_extra_path_config(yaml)
        fp.set_user_directory(os.path.join(self.private, "user"))
        fp.set_temp_directory(os.path.join(self.private, "temp"))
        self.model_defaults = {name: list(paths) for name, (paths, _) in fp.folder_names_and_paths.items()}
        self.server = self._server()
        modules.hook_breaker.save_functions()
        try:
            asyncio.run(self._load_nodes())
        finally:
            modules.hook_breaker.restore_functions()
        # This process's copy of the pack answers for its own node ids (no second copy was loaded).
        modules.nodes.NODE_CLASS_MAPPINGS.update(NODE_CLASS_MAPPINGS)
        modules.nodes.NODE_DISPLAY_NAME_MAPPINGS.update(NODE_DISPLAY_NAME_MAPPINGS)

    def _server(self) -> Any:
        if self.m.server is not None:
            try:
                return self.m.server.PromptServer(asyncio.new_event_loop())
            except Exception as exc:  # custom nodes that register routes will not load; the rest runs
                log.warning("ComfyUI-StableCascade: ComfyUI's PromptServer could not be made (%s: %s); custom nodes "
                            "that need it may not load", type(exc).__name__, exc)
        return _QuietServer()

    async def _load_nodes(self) -> None:
        nodes, fp = self.m.nodes, self.m.folder_paths
        args = getattr(nodes, "args", None)
        await nodes.init_extra_nodes(init_custom_nodes=False,
                                     init_api_nodes=not getattr(args, "disable_api_nodes", False))
        core = set(nodes.NODE_CLASS_MAPPINGS)
        skip_all = getattr(args, "disable_all_custom_nodes", False)
        allowed = set(getattr(args, "whitelist_custom_nodes", None) or ())
        for folder in fp.get_folder_paths("custom_nodes"):
            if not os.path.isdir(folder):
                continue
            for name in sorted(os.listdir(os.path.realpath(folder))):
                path = os.path.join(folder, name)
                if name == "__pycache__" or name.endswith(".disabled") or (os.path.isfile(path) and
                                                                           not name.endswith(".py")):
                    continue
                if os.path.realpath(path) == os.path.realpath(PACK_ROOT) or (skip_all and name not in allowed):
                    continue
                await nodes.load_custom_node(path, core, module_parent="custom_nodes")

    @property
    def classes(self) -> NodeClasses:
        classes = NodeClasses(self.m.nodes.NODE_CLASS_MAPPINGS)
        classes.comfyui_root = self.root
        return classes

    def set_folders(self, models: str | None, input_dir: str, output_dir: str) -> None:
        """The runner's input and output folders; ``models`` (a ComfyUI-style models folder) first in every model
        folder, as an extra_model_paths.yaml entry with that base path would be."""
        fp = self.m.folder_paths
        fp.set_input_directory(os.path.abspath(input_dir))
        fp.set_output_directory(os.path.abspath(output_dir))
        models = models or os.environ.get("SCW_MODELS_DIR")
        if not models:
            return
        for name, paths in self.model_defaults.items():
            for path in reversed(paths):
                if os.path.commonpath([os.path.abspath(path), os.path.abspath(fp.models_dir)]) == \
                        os.path.abspath(fp.models_dir):
                    rel = os.path.relpath(path, fp.models_dir)
                    fp.add_model_folder_path(name, os.path.join(os.path.abspath(models), rel), is_default=True)
        getattr(fp, "filename_list_cache", {}).clear()

    def validate(self, prompt: dict[str, dict]) -> list[str]:
        """ComfyUI's own checks of the whole prompt (its ``validate_prompt``); returns the output node ids."""
        check = self.m.execution.validate_prompt
        args = (uuid.uuid4().hex, prompt, None) if len(inspect.signature(check).parameters) >= 3 else (prompt,)
        with _one_line_errors():
            ok, error, outputs, node_errors = _run(check(*args))[:4]
        if ok and not node_errors:
            return list(outputs)
        problems = [f"node {node_id} ({info.get('class_type')}): {e.get('message')}: {e.get('details')}"
                    for node_id, info in (node_errors or {}).items() for e in info.get("errors", [])]
        if not problems and error:
            problems = [f"{error.get('message')}: {error.get('details')}"]
        raise WorkflowError("ComfyUI refuses the workflow:\n  " + "\n  ".join(problems))

    def execute(self, prompt: dict[str, dict], outputs: list[str], workflow: Mapping | None, plan: Any) -> list[str]:
        """Run the prompt with ComfyUI's executor; images go where ``plan`` (the runner's OutputPlan) says."""
        from .executor import NodeError

        execution = self.m.execution

        class Executor(execution.PromptExecutor):
            failure: tuple[dict, BaseException] | None = None

            def handle_execution_error(self, *args: Any, **kwargs: Any) -> None:
                self.failure = (args[-2], args[-1])  # (error details, the exception): the last two arguments
                super().handle_execution_error(*args, **kwargs)

        executor = Executor(self.server)
        extra = {"extra_pnginfo": {"workflow": workflow}} if workflow is not None else {}
        with _one_line_errors():
            executor.execute(prompt, uuid.uuid4().hex, extra, outputs)
        if executor.failure is not None:
            details, error = executor.failure
            node_id = str(details.get("node_id"))
            log.debug("ComfyUI-StableCascade: traceback of node %s:\n%s", node_id,
                      "".join(details.get("traceback", [])))
            if type(error).__name__ == "InterruptProcessingException":
                error = SamplingInterrupted("sampling was interrupted")
            entry = prompt.get(node_id, {})
            raise NodeError(node_id, entry.get("class_type", "?"), (entry.get("_meta") or {}).get("title"), error)
        return self._collect(executor.history_result.get("outputs", {}), plan)

    def _collect(self, ui: Mapping[str, Any], plan: Any) -> list[str]:
        """The images the output nodes wrote: SaveImage's stay in the output folder (moved to ``--out`` names when
        given), PreviewImage's temporary files are kept too, as the stand-ins keep them."""
        fp = self.m.folder_paths
        for node_id in sorted(ui, key=lambda n: (len(str(n)), str(n))):
            for entry in (ui[node_id] or {}).get("images", []) or []:
                kind = entry.get("type")
                if kind not in ("output", "temp"):
                    continue
                base = fp.get_output_directory() if kind == "output" else fp.get_temp_directory()
                path = os.path.join(base, entry.get("subfolder", ""), entry["filename"])
                if kind == "output" and not plan.out:
                    plan.written.append(path)
                    continue
                target = plan.next_path("preview")
                shutil.move(path, target)
                log.info("ComfyUI-StableCascade: wrote %s", target)
        return plan.written


_RUNTIME: ComfyRuntime | None = None


def start(comfyui: str, models: str | None, input_dir: str, output_dir: str, out: str | None = None) -> ComfyRuntime:
    """ComfyUI's runtime for this process (made on the first call) with the runner's folders (with ``out``,
    SaveImage writes into the private folder and the runner moves its images to the ``out`` names)."""
    global _RUNTIME
    root = check_root(comfyui)
    if _RUNTIME is None:
        try:
            with _one_line_errors():
                modules = host.comfyui_runtime_modules()
        except CascadeError as exc:
            raise WorkflowError(f"--comfyui {root}: {exc} - run headless.py with ComfyUI's own Python (the one "
                                "that runs its main.py), which puts the checkout on the path before the pack "
                                "loads") from None
        imported = os.path.dirname(os.path.realpath(modules.nodes.__file__))
        if imported != os.path.realpath(root):
            raise WorkflowError(f"--comfyui {root}: this Python imported another ComfyUI, {imported}; give that path, "
                                "or take the other one off PYTHONPATH")
        with _one_line_errors():
            _RUNTIME = ComfyRuntime(root, modules)
        log.info("ComfyUI-StableCascade: running on the ComfyUI at %s, with its %d node types (core and custom)",
                 root, len(modules.nodes.NODE_CLASS_MAPPINGS))
    elif os.path.realpath(root) != os.path.realpath(_RUNTIME.root):
        raise WorkflowError(f"--comfyui {root}: this process already runs the ComfyUI at {_RUNTIME.root}")
    _RUNTIME.set_folders(models, input_dir, os.path.join(_RUNTIME.private, "output") if out else output_dir)
    return _RUNTIME
