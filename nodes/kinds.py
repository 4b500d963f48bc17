"""The node layer's side of the model kinds: which loader node reads each kind, from which ComfyUI model
folders, through which socket type; and the one table of "how to fix" hints added to loading errors.

``cascade.kinds`` declares what a kind *is*; this table only adds what a ComfyUI user sees. A new kind is one
entry there and, when it gets a loader node, one entry here.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import host
from ..cascade import kinds, loading
from ..cascade.errors import CascadeError, WrongModelError
from ..host.folders import describe_refused
from .common import DEMO_CHOICE, FP8_WEIGHTS, WEIGHT_DTYPES, display_name

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class NodeKind:
    title: str  # display name of the loader node, without the "Stable Cascade " prefix
    folders: tuple[str, ...]  # ComfyUI model folders its files are listed from
    socket: str  # the socket type its loader returns
    node_id: str = ""  # the loader node's id, for "connect ..." hints
    packaged_in: str = ""  # which of ComfyUI's packaged checkpoints holds it ("Stage C" / "Stage B")


_DIFFUSION, _VAE = ("diffusion_models", "unet"), ("vae",)
NODE_KINDS: dict[str, NodeKind] = {
    "stage_c": NodeKind("Load Stage C", _DIFFUSION, "SCW_STAGE_C", "SCW_StageCLoader", "Stage C"),
    "stage_b": NodeKind("Load Stage B", _DIFFUSION, "SCW_STAGE_B", "SCW_StageBLoader", "Stage B"),
    "stage_a": NodeKind("Load Stage A", _VAE, "SCW_STAGE_A", "SCW_StageALoader", "Stage B"),
    "effnet": NodeKind("Load EffNet Encoder", _VAE, "SCW_EFFNET", "SCW_EffNetLoader", "Stage C"),
    "previewer": NodeKind("Load Previewer", _VAE, "SCW_PREVIEWER", "SCW_PreviewerLoader", "Stage C"),
    "text_encoder": NodeKind("Load Text Encoder", ("text_encoders", "clip"), "SCW_TEXT_ENCODER", "SCW_TextEncoderLoader",
                             "Stage C"),
    "clip_vision": NodeKind("Load CLIP Vision", ("clip_vision",), "SCW_CLIP_VISION", "SCW_ClipVisionLoader", "Stage C"),
    "controlnet": NodeKind("Load ControlNet", ("controlnet",), "SCW_CONTROLNET", "SCW_ControlNetLoader"),
    "packaged": NodeKind("Load Packaged Checkpoint", ("checkpoints",), ""),
    "lora": NodeKind("Load Stage C LoRA", ("loras",), "SCW_STAGE_C"),
}


def node_title(kind: str) -> str:
    """The display name of the node that loads ``kind`` ('Stable Cascade Load Stage B')."""
    return display_name(NODE_KINDS[kind].title)


def fix_for(kind: str) -> str:
    """The "how to fix" ending for a model input that got nothing: which node gives a ``kind``."""
    entry = NODE_KINDS[kind]
    where = (f" (or the {kind} output of '{node_title('packaged')}' with the {entry.packaged_in} file)"
             if entry.packaged_in else "")
    return f"connect '{node_title(kind)}'{where}"


FIX = {kind: fix_for(kind) for kind, entry in NODE_KINDS.items() if entry.node_id}


def _folders(kind: str) -> str:
    return " or ".join(f"models/{f}/" for f in NODE_KINDS[kind].folders)


def what_file(kind: str) -> str:
    """What a file of ``kind`` is and where its release lives, for messages about a missing file."""
    if kind == "packaged":
        return (f"It is one of ComfyUI's packaged checkpoints: download {kinds.PACKAGED_EXAMPLES} from "
                f"{kinds.PACKAGED_DOWNLOAD}")
    k = kinds.KINDS[kind]
    return f"It is {k.description}, which {k.role}: download {k.files} from {k.download}"


def missing_file_text(kind: str, file_name: str) -> str:
    """The message of a loader whose file is not installed: the node, the file, the folder it belongs in, what
    it is, where the release lives, what the folder holds instead, and the demo choice."""
    folders = NODE_KINDS[kind].folders
    present = host.model_files(folders)
    more = ", ..." if len(present) > 5 else ""
    there = f"a file that is there ({', '.join(present[:5])}{more}), or " if present else ""
    demo = "a random LoRA" if kind == "lora" else "a tiny random network (its images are noise)"
    refused = describe_refused(host.refused_files(folders))
    return (f"{node_title(kind)}: {file_name!r} is not installed; it belongs in {_folders(kind)}. {what_file(kind)}, "
            f"then refresh the file lists (R in the browser). Or pick {there}{DEMO_CHOICE!r} to try the workflow "
            f"with {demo}{refused}.")


def check_file(kind: str, file_name: Any) -> bool | str:
    """A loader's VALIDATE_INPUTS for its ``file_name``: True when the file is installed (or the demo choice is
    picked), else ``missing_file_text``. ComfyUI skips its own list check for an input a node validates, and
    shows the returned text in the browser; a linked value (None while validating) is checked when it runs."""
    folders = NODE_KINDS[kind].folders
    if file_name is None or file_name == DEMO_CHOICE or file_name in host.model_files(folders):
        return True
    try:  # there under another spelling (a Windows separator) or not listed: the loader reads it and says more
        host.model_path(folders, str(file_name))
        return True
    except CascadeError:
        return missing_file_text(kind, str(file_name))


def demo_notice(kind: str) -> str:
    """What a loader's output says when the demo choice runs (shown on the node in the browser)."""
    folder = f"models/{NODE_KINDS[kind].folders[0]}/"
    if kind == "lora":
        return (f"{node_title(kind)}: a random demo LoRA is applied (it changes the image at random). Put a Stage C "
                f"LoRA into {folder} to use a real one.")
    release = kinds.PACKAGED_EXAMPLES if kind == "packaged" else kinds.KINDS[kind].release
    return (f"{node_title(kind)}: the tiny random demo network runs, so the images are noise. Install {release} "
            f"into {folder} for real images.")


def demo_result(kind: str, outputs: tuple) -> dict:
    """A loader's result when it runs the demo choice: the outputs, and the notice as the node's ``ui`` text
    (ComfyUI keeps it in the run's outputs and sends it to the browser) with a badge the pack's web extension
    draws on the node (web/scw_results.js)."""
    badge = "demo LoRA (random)" if kind == "lora" else "demo network (random weights)"
    return {"ui": {"text": [demo_notice(kind)], "scw_badge": [badge]}, "result": outputs}


def how_to_load(found: str) -> str:
    """The "how to fix" sentence for a file of kind ``found`` given to the wrong node."""
    if found == "lora":
        return (f"A LoRA is not a network: load the Stage C first, then apply the LoRA with the pack's LoRA node, "
                f"'{node_title('lora')}'")
    if found not in NODE_KINDS:
        return "This pack has no loader for it"
    return f"Load it with the '{node_title(found)}' node (in {_folders(found)})"


@contextlib.contextmanager
def explained() -> Iterator[None]:
    """Add the node to use to a WrongModelError raised in the block (same type, message extended)."""
    try:
        yield
    except WrongModelError as exc:
        if exc.found is None:
            raise
        raise WrongModelError(f"{exc} {how_to_load(exc.found)}.", exc.found) from exc


def demo_network(kind: str, dtype: torch.dtype | None = None) -> nn.Module:
    """The tiny random network of ``kind``, logging which file to install and where."""
    module = kinds.demo_network(kind, dtype)
    folder = NODE_KINDS[kind].folders[0]
    log.warning("ComfyUI-StableCascade: using a TINY RANDOM %s: images will be noise until real weights are "
                "installed. Put %s into models/%s/ and pick it in the loader.", kinds.KINDS[kind].label,
                kinds.KINDS[kind].release, folder)
    return module



def operations_for(kind: str, path: Any, weight_dtype: str) -> dict[str, Any]:
    """The layers to build ``kind`` with: the host's for dense weights; for fp8/GGUF weights (a quantized file,
    or an fp8 weight dtype) the pack's dequantizing layers (``cascade.quant.OPS``), inside ComfyUI too, since
    core's cast layers cannot expand GGML blocks or apply an fp8 scale (ComfyUI-GGUF does the same)."""
    if not kinds.KINDS[kind].takes_operations:
        return {}
    if weight_dtype in FP8_WEIGHTS or loading.weight_format(path) != "dense":
        from ..cascade.quant import OPS

        return {"operations": OPS}
    return {"operations": host.operations()}


def load_network(kind: str, file_name: str, weight_dtype: str) -> Any:
    """The handle of the ``kind`` network in ``file_name`` (or its demo network), built with the host's layers
    (or the dequantizing ones for quantized weights, see ``operations_for``)."""
    dtype = WEIGHT_DTYPES[weight_dtype]
    quantize = weight_dtype if weight_dtype in FP8_WEIGHTS else None
    if file_name == DEMO_CHOICE:
        module = demo_network(kind, dtype)
        if quantize and kinds.KINDS[kind].takes_operations:
            module = loading.load(kind, module.state_dict(), quantize=quantize)
        return host.wrap(module, kind)
    with explained():
        path = host.model_path(NODE_KINDS[kind].folders, file_name)
        module = loading.load(kind, path, dtype=dtype, quantize=quantize, **operations_for(kind, path, weight_dtype))
    return host.wrap(module, kind)
