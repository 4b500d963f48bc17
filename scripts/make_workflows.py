"""Lay out the shipped workflows, write their Notes, and make the Templates copies (example_workflows/).

    python scripts/make_workflows.py                    # workflows/*.json in place + example_workflows/*.json
    python scripts/make_workflows.py --thumbnails DIR   # also example_workflows/*.jpg from frontend screenshots

workflows/*.json are the source: this script only moves nodes (columns, sizes the frontend needs, groups whose
titles fit, a saved view showing everything at 1600 x 1000), replaces each workflow's Note, migrates widget values
of inputs whose meaning changed, and adds the inpainting paste-back. Prompts and settings are left as they are.
example_workflows/<template>.json are byte copies (tests/standalone/test_templates.py compares them), named so they
do not collide with ComfyUI's own templates. Thumbnails: run
``python3 ../shared/tools/frontend_check.py . --shots DIR`` first, then pass DIR.
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import sys
from typing import Any

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKFLOWS = os.path.join(ROOT, "workflows")
TEMPLATES_DIR = os.path.join(ROOT, "example_workflows")
IMAGES_DIR = os.path.join(ROOT, "docs", "images")
PACKAGE = "comfyui_stablecascade"

# workflow file -> Templates name: what ComfyUI's Templates browser shows as title (and, '_' as spaces, description).
TEMPLATES = {
    "text_to_image.json": "stable_cascade_text_to_image",
    "image_to_image.json": "stable_cascade_image_to_image",
    "image_variation.json": "stable_cascade_image_variation",
    "lora.json": "stable_cascade_lora_prompt",
    "reconstruction.json": "stable_cascade_reconstruction_psnr_ssim",
    "controlnet_canny.json": "stable_cascade_controlnet_canny_edges",
    "controlnet_inpaint.json": "stable_cascade_controlnet_inpaint_mask",
    "controlnet_outpaint.json": "stable_cascade_controlnet_outpaint",
    "controlnet_super_resolution.json": "stable_cascade_controlnet_super_resolution_2x",
    "train_lora.json": "stable_cascade_train_lora",
    "train_lora_use.json": "stable_cascade_train_and_use_lora",
}
THUMB_SIZE = (400, 240)

# Canvas units. A node's box is its title bar (TITLE) above pos plus its size; the frontend draws at least
# computeSize(), measured for every node of these workflows (frontend 1.27): HEIGHT holds those minima.
TITLE, GAP, COLUMN_GAP, MARGIN, GROUP_HEAD = 30, 34, 50, 24, 44
VIEW_W, VIEW_H = 1536, 922  # what the 1600 x 1000 window shows of the canvas (minus the side bar and the menu)
WIDTH = {"loader": 420, "SCW_TextEncode": 420, "SCW_StageCSampler": 360, "SCW_StageBSampler": 360,
         "SCW_StageCImageToImage": 420, "SaveImage": 460, "PreviewImage": 300, "LoadImage": 360,
         "MarkdownNote": 420, "SCW_LoraLoader": 420, "SCW_LoraLoaderModelOnly": 420, "default": 420}
HEIGHT = {"loader": 82, "LoadImage": 330, "PreviewImage": 300, "SaveImage": 420, "SCW_ApplyControlNet": 150,
          "SCW_CannyControl": 154, "SCW_ClipVisionEncode": 150, "SCW_EmptyLatent": 150, "SCW_ImageCompare": 80,
          "SCW_InpaintControl": 50, "SCW_LoraLoader": 180, "SCW_LoraLoaderModelOnly": 82, "SCW_OutpaintPad": 150,
          "SCW_ReconstructionEncode": 50, "SCW_StageADecode": 50, "SCW_StageAEncode": 50, "SCW_StageBSampler": 334,
          "SCW_StageCEncode": 130, "SCW_StageCImageToImage": 358, "SCW_StageCSampler": 334,
          "SCW_SuperResolutionControl": 70, "SCW_TextEncode": 130, "SCW_InpaintPasteBack": 130, "default": 120}

FILES = {  # loader type -> (folder under ComfyUI/models/, the file of stabilityai/stable-cascade it reads)
    "SCW_StageCLoader": ("diffusion_models", "stage_c_bf16"),
    "SCW_StageBLoader": ("diffusion_models", "stage_b_bf16"),
    "SCW_StageALoader": ("vae", "stage_a"),
    "SCW_EffNetLoader": ("vae", "effnet_encoder"),
    "SCW_PreviewerLoader": ("vae", "previewer (optional)"),
    "SCW_TextEncoderLoader": ("text_encoders", "text_encoder/model"),
    "SCW_ClipVisionLoader": ("clip_vision", "image_encoder/model of stable-cascade-prior"),
    "SCW_ControlNetLoader": ("controlnet", "controlnet/{file}"),
}
SOURCE = "Empty folder: pick **(tiny random demo)**; it runs, the image is noise."


def load_pack() -> Any:
    if PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(PACKAGE, os.path.join(ROOT, "__init__.py"),
                                                      submodule_search_locations=[ROOT])
        sys.modules[PACKAGE] = module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    from comfyui_stablecascade.standalone import executor

    return executor


# ---- graph editing --------------------------------------------------------------------------------------------


class Graph:
    def __init__(self, wf: dict, executor: Any) -> None:
        self.wf, self.ex = wf, executor
        self.classes = executor.node_classes()

    def node(self, node_id: int) -> dict:
        return next(n for n in self.wf["nodes"] if n["id"] == node_id)

    def by_type(self, kind: str) -> list[dict]:
        return [n for n in self.wf["nodes"] if n["type"] == kind]

    def add(self, kind: str, widgets: list, title: str | None = None) -> int:
        cls = self.classes[kind]
        self.wf["last_node_id"] = node_id = self.wf["last_node_id"] + 1
        specs = self.ex.input_specs(cls)
        names = getattr(cls, "RETURN_NAMES", None) or cls.RETURN_TYPES
        node = {"id": node_id, "type": kind, "pos": [0, 0], "size": [400, 100], "flags": {}, "order": 0, "mode": 0,
                "inputs": [{"name": k, "type": v[0], "link": None} for k, v in specs.items()
                           if not self.ex.is_widget(v)],
                "outputs": [{"name": n, "type": t, "links": [], "slot_index": i}
                            for i, (n, t) in enumerate(zip(names, cls.RETURN_TYPES))],
                "properties": {"Node name for S&R": kind}, "widgets_values": widgets}
        if title:
            node["title"] = title
        self.wf["nodes"].append(node)
        return node_id

    def link(self, src: int, out_slot: int, dst: int, in_name: str) -> None:
        out = self.node(src)["outputs"][out_slot]
        target = self.node(dst)
        slot = next(i for i, s in enumerate(target["inputs"]) if s["name"] == in_name)
        if target["inputs"][slot].get("link") is not None:
            self.unlink(target["inputs"][slot]["link"])
        self.wf["last_link_id"] = link_id = self.wf["last_link_id"] + 1
        self.wf["links"].append([link_id, src, out_slot, dst, slot, out["type"]])
        out["links"] = [*(out.get("links") or []), link_id]
        target["inputs"][slot]["link"] = link_id

    def unlink(self, link_id: int) -> None:
        link = next(lk for lk in self.wf["links"] if lk[0] == link_id)
        self.wf["links"].remove(link)
        out = self.node(link[1])["outputs"][link[2]]
        out["links"] = [x for x in out["links"] if x != link_id] or None
        self.node(link[3])["inputs"][link[4]]["link"] = None

    def source_of(self, dst: int, in_name: str) -> tuple[int, int]:
        slot = next(s for s in self.node(dst)["inputs"] if s["name"] == in_name)
        link = next(lk for lk in self.wf["links"] if lk[0] == slot["link"])
        return link[1], link[2]


# ---- migrations of inputs whose meaning changed (docs/CORE_INTEROP.md) -----------------------------------------


def migrate_widgets(g: Graph) -> None:
    from comfyui_stablecascade.cascade.control_filters import OPENCV_PER_UNIT
    from comfyui_stablecascade.pipeline.controls import is_legacy_threshold

    for node in g.by_type("SCW_CannyControl"):
        values = node["widgets_values"]
        if all(is_legacy_threshold(v) for v in values[:2]):  # OpenCV integers -> core's units, same edges
            values[:2] = [round(v / OPENCV_PER_UNIT, 3) for v in values[:2]]
        if len(values) == 3:
            values.append("official")
    for node in g.by_type("SCW_ClipVisionEncode"):
        if len(node["widgets_values"]) == 1:
            node["widgets_values"].append("center")


def add_paste_back(g: Graph, image: tuple[int, int], mask: tuple[int, int]) -> None:
    """Decode -> paste back (original image + mask) -> Save, once."""
    if g.by_type("SCW_InpaintPasteBack"):
        return
    save = g.by_type("SaveImage")[0]["id"]
    decoded = g.source_of(save, "images")
    paste = g.add("SCW_InpaintPasteBack", [8, 16])
    g.link(*image, paste, "original")
    g.link(*decoded, paste, "generated")
    g.link(*mask, paste, "mask")
    g.link(paste, 0, save, "images")


def make_inpaint(outpaint: dict, ex: Any) -> dict:
    """The mask-inpainting workflow: the outpainting one without the padding, reading a painted mask."""
    wf = copy.deepcopy(outpaint)
    g = Graph(wf, ex)
    pad = g.by_type("SCW_OutpaintPad")[0]["id"]
    load = g.by_type("LoadImage")[0]
    control = g.by_type("SCW_InpaintControl")[0]["id"]
    paste = g.by_type("SCW_InpaintPasteBack")[0]["id"]
    for slot in list(g.node(pad)["inputs"]):
        if slot.get("link") is not None:
            g.unlink(slot["link"])
    for out in g.node(pad)["outputs"]:
        for link_id in list(out.get("links") or []):
            g.unlink(link_id)
    wf["nodes"] = [n for n in wf["nodes"] if n["id"] != pad]
    for name, slot in (("image", 0), ("mask", 1)):
        g.link(load["id"], slot, control, name)
        g.link(load["id"], slot, paste, "original" if name == "image" else "mask")
    load["widgets_values"][0] = "scw_example_mask.png"
    text = next(n for n in g.by_type("SCW_TextEncode") if n["widgets_values"][0])
    text["widgets_values"][0] = ("an oil painting of a red wooden cabin below a snowy mountain at sunset, a small "
                                 "pond in the meadow")
    g.by_type("SCW_EmptyLatent")[0]["widgets_values"][:2] = [1024, 768]
    g.by_type("SaveImage")[0]["widgets_values"] = ["StableCascade_inpaint"]
    wf["extra"]["info"] = {"name": "Stable Cascade ControlNet inpainting (mask)", "description": (
        "Official inpainting recipe (inpainting ControlNet, strength 1, Stage C cfg 4 shift 2, 20 steps): the "
        "masked region of the image is regenerated from the prompt, then pasted back onto the original.")}
    return wf


# ---- layout --------------------------------------------------------------------------------------------------


def _size(node: dict) -> list[int]:
    from comfyui_stablecascade import NODE_DISPLAY_NAME_MAPPINGS

    kind = node["type"]
    key = "loader" if kind.endswith("Loader") and kind not in WIDTH else kind
    title = node.get("title") or NODE_DISPLAY_NAME_MAPPINGS.get(kind, kind)
    w = max(WIDTH.get(key, WIDTH["default"]), 10 * (round(len(title) * 7.6 + 70) // 10))  # 14 px title font
    h = HEIGHT.get(key, HEIGHT["default"])
    if kind == "MarkdownNote":
        h = 50 + 16 * _note_lines(node["widgets_values"][0], w)
    return [w, h]


def _note_lines(text: str, width: int) -> int:
    per_line = max(1, (width - 40) // 6)  # the Markdown Note's 12 px font, about 6 px a character
    return sum(max(1, -(-len(line) // per_line)) for line in text.split("\n"))


def layout(wf: dict, columns: list[list[Any]], groups: dict[str, str]) -> None:
    """Place the columns left to right, each stacked top down; an item is a node id or ("group", key, [ids]).
    Groups are drawn around their members with the title above the first one; the view shows everything."""
    nodes = {n["id"]: n for n in wf["nodes"]}
    wf["groups"] = []
    x = 0
    bottom = 0
    for column in columns:
        width = max(_size(nodes[i])[0] for item in column for i in (item[2] if isinstance(item, tuple) else [item]))
        y = 0
        for item in column:
            members = item[2] if isinstance(item, tuple) else [item]
            if isinstance(item, tuple):
                top = y
                y += GROUP_HEAD
            for node_id in members:
                node = nodes[node_id]
                node["size"] = [width, _size(node)[1]]
                node["pos"] = [x, y + TITLE]
                y += TITLE + node["size"][1] + GAP
            if isinstance(item, tuple):
                wf["groups"].append({"title": groups[item[1]], "bounding": [x - 12, top, width + 24, y - top - 12],
                                     "color": "#3f789e", "font_size": 22, "flags": {}})
                y += 10
        bottom = max(bottom, y)
        x += width + COLUMN_GAP
    width, height = x - COLUMN_GAP, bottom - GAP
    scale = round(min((VIEW_W - 2 * MARGIN) / width, (VIEW_H - 2 * MARGIN) / height, 1.0), 3)
    wf["extra"]["ds"] = {"scale": scale, "offset": [round(MARGIN / scale, 1), round(MARGIN / scale, 1)]}
    for order, node in enumerate(sorted(wf["nodes"], key=lambda n: (n["pos"][0], n["pos"][1]))):
        node["order"] = order


def set_note(g: Graph, text: str) -> int:
    old = g.by_type("MarkdownNote")
    for node in old:
        g.wf["nodes"].remove(node)
    if old:
        node_id = old[0]["id"]  # the same id each run: the script is idempotent
    else:
        g.wf["last_node_id"] += 1
        node_id = g.wf["last_node_id"]
    g.wf["nodes"].append({"id": node_id, "type": "MarkdownNote", "pos": [0, 0], "size": [420, 200], "flags": {},
                          "order": 0, "mode": 0, "inputs": [], "outputs": [],
                          "properties": {"Node name for S&R": "MarkdownNote"}, "widgets_values": [text],
                          "color": "#432", "bgcolor": "#653"})
    return node_id


def files_text(g: Graph) -> str:
    """One line per models folder: which released files go there (names without .safetensors)."""
    folders: dict[str, list[str]] = {}
    for node in g.wf["nodes"]:
        if node["type"] in FILES:
            folder, file = FILES[node["type"]]
            name = file.format(file=str(node["widgets_values"][0]).replace(".safetensors", ""))
            folders.setdefault(folder, [])
            if name not in folders[folder]:
                folders[folder].append(name)
    return "\n".join(f"- `{folder}/`: {', '.join(files)}" for folder, files in folders.items())


# ---- the workflows: columns of node ids (left to right) and what the Note says --------------------------------

IMAGE_STEP = ("Copy `workflows/inputs/{image}` into ComfyUI's `input/` folder (or pick your own image in *Load "
              "Image*).")
SPECS: dict[str, dict[str, Any]] = {
    "text_to_image.json": {
        "title": "Text to image",
        "what": "Stage C draws a small latent from the prompt, Stage B enlarges it, Stage A decodes the pixels.",
        "steps": ["Write the prompt; set the size in *Empty Latent*. Press **Run**."],
        "columns": [["note", ("group", "models", [1, 2, 12, 3, 4])], [5, 6, 7], [8, 9], [10, 11]],
    },
    "lora.json": {
        "title": "LoRA",
        "what": "A Stage C LoRA changes style or subject; LoRAs with learned tokens add words such as [fernando].",
        "steps": ["Put LoRA files into `models/loras/` and pick them in the LoRA loaders (trained with the pack's "
                  "training workflow, or community Stable Cascade LoRAs).",
                  "Use the LoRA's words in the prompt. Press **Run**."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4])], [("group", "loras", [12, 13]), 5, 6, 7], [8, 9],
                    [10, 11]],
    },
    "image_to_image.json": {
        "title": "Image to image",
        "what": "The image is encoded to a Stage C latent and re-drawn from 'denoise' (0.8: keeps the layout).",
        "steps": [IMAGE_STEP, "Describe the result in the prompt. Press **Run**."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4, 5])], [6, 9], [7, 8], [10, 11], [12, 13]],
    },
    "image_variation.json": {
        "title": "Image variation",
        "what": "CLIP vision turns the image into Stage C's image prompt; new images share its content and style.",
        "steps": [IMAGE_STEP, "Leave the prompt empty (the official recipe) or add words. Press **Run**."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4, 5])], [6, 9], [7, 8, 10], [11, 12], [13, 14]],
    },
    "reconstruction.json": {
        "title": "Reconstruction (what the compression keeps)",
        "what": ("The image goes through the EffNet latent (42x smaller) and back through Stage B and Stage A; "
                 "the lower row through Stage A alone. *Image Compare* shows PSNR / SSIM on the node."),
        "steps": [IMAGE_STEP, "Press **Run**; the scores appear on the compare nodes."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4])], [5, 6, 7], [8, 9, 14], [10, 12, 13, 15, 17],
                    [11, 16]],
    },
    "controlnet_canny.json": {
        "title": "ControlNet: canny edges",
        "what": ("Edges of the image guide Stage C's layout. Thresholds are in core's units (0.392 / 0.784 = the "
                 "release's OpenCV 100 / 200); method *core*, resize 0 and 0.3 / 0.7 give core's Canny edges."),
        "steps": [IMAGE_STEP, "Describe the picture in the prompt. Press **Run**."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4, 5])], [6, 9, 10], [7, 8, 11], [12, 13], [14, 15]],
    },
    "controlnet_inpaint.json": {
        "title": "ControlNet: inpainting (paint a mask)",
        "what": "The masked part of the image is regenerated from the prompt; the rest is kept as it was.",
        "steps": ["**Paint the mask**: copy `workflows/inputs/scw_example_mask.png` into ComfyUI's `input/` folder "
                  "(a mask is painted around the blue egg), or load your image, right-click *Load Image* -> *Open "
                  "in MaskEditor*, paint over what to replace, and save.",
                  "Describe the whole picture in the prompt. Press **Run**. *Inpaint Paste Back* puts the original "
                  "back outside the mask (grow / feather soften the seam)."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4, 5])], [6, 10, 11], [7, 8, 12], [13, 14],
                    [15, "paste", 16]],
    },
    "controlnet_outpaint.json": {
        "title": "ControlNet: outpainting",
        "what": ("*Outpaint Padding* widens the image (128 px left and right: 2:1) and masks the new border, which "
                 "is generated to match; give *Empty Latent* the new aspect ratio."),
        "steps": [IMAGE_STEP, "Describe the wider picture in the prompt. Press **Run**. A mask painted in *Load "
                  "Image* is regenerated too."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4, 5])], [6, 9, 10, 11], [7, 8, 12], [13, 14],
                    [15, "paste", 16]],
    },
    "controlnet_super_resolution.json": {
        "title": "ControlNet: 2x super-resolution",
        "what": "The image's EffNet latent guides Stage C at twice the size: 768 px in, about 2048 px out.",
        "steps": [IMAGE_STEP, "Describe the picture in the prompt (cfg 1, as the notebook). Press **Run**."],
        "columns": [["note", ("group", "models", [1, 2, 3, 4, 5, 6])], [7, 10, 11], [8, 9], [12, 13], [14, 15]],
    },
}
GROUPS = {"models": "Models", "loras": "LoRAs"}


def note_text(name: str, g: Graph) -> str:
    spec = SPECS[name]
    images = [n["widgets_values"][0] for n in g.by_type("LoadImage")]
    steps = [s.format(image=images[0] if images else "") for s in spec["steps"]]
    lines = [f"## {spec['title']}", spec["what"], "",
             "**1. Files** into `ComfyUI/models/` (from huggingface.co/stabilityai/stable-cascade), then pick them "
             "in the loaders:", "", files_text(g), "", SOURCE, ""]
    for i, step in enumerate(steps, start=2):
        lines += [f"**{i}.** {step}", ""]
    lines += ["Images are saved to ComfyUI's `output/` folder."]
    return "\n".join(lines)


def build(name: str, wf: dict, ex: Any) -> dict:
    g = Graph(wf, ex)
    migrate_widgets(g)
    if name == "controlnet_outpaint.json":
        pad = g.by_type("SCW_OutpaintPad")[0]["id"]
        add_paste_back(g, (pad, 0), (pad, 1))
        g.by_type("SaveImage")[0]["widgets_values"] = ["StableCascade_outpaint"]
    note = set_note(g, note_text(name, g))
    paste = (g.by_type("SCW_InpaintPasteBack") or [{"id": None}])[0]["id"]
    ids = {"note": note, "paste": paste}
    columns = [[ids.get(item, item) if not isinstance(item, tuple) else item for item in col]
               for col in SPECS[name]["columns"]]
    listed = {i for col in columns for item in col for i in (item[2] if isinstance(item, tuple) else [item])}
    missing = {n["id"] for n in wf["nodes"]} - listed
    if missing:
        raise SystemExit(f"{name}: nodes {sorted(missing)} are in no column of SPECS")
    layout(wf, columns, GROUPS)
    return wf


def write(path: str, wf: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(wf, f, indent=1, ensure_ascii=False)
        f.write("\n")


def thumbnails(shots: str) -> None:
    from PIL import Image

    os.makedirs(IMAGES_DIR, exist_ok=True)
    for source, template in TEMPLATES.items():
        shot = os.path.join(shots, source.replace(".json", ".png"))
        if not os.path.exists(shot):
            continue
        image = Image.open(shot).convert("RGB").crop((64, 78, 1600, 1000))  # the canvas, without menu and side bar
        image.copy().resize(THUMB_SIZE, Image.LANCZOS).save(os.path.join(TEMPLATES_DIR, template + ".jpg"),
                                                             quality=85, optimize=True)
        image.resize((960, 576), Image.LANCZOS).save(os.path.join(IMAGES_DIR, source.replace(".json", ".jpg")),
                                                    quality=80, optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--thumbnails", metavar="DIR", help="frontend_check.py screenshots to make the .jpg from")
    args = parser.parse_args()
    ex = load_pack()
    inpaint, outpaint = (os.path.join(WORKFLOWS, f) for f in ("controlnet_inpaint.json", "controlnet_outpaint.json"))
    if not os.path.exists(outpaint):  # the first run: the old inpaint workflow was the outpainting one
        os.replace(inpaint, outpaint)
    for name in SPECS:
        path = os.path.join(WORKFLOWS, name)
        if name == "controlnet_inpaint.json":
            continue
        with open(path, encoding="utf-8") as f:
            write(path, build(name, json.load(f), ex))
    with open(outpaint, encoding="utf-8") as f:
        write(inpaint, build("controlnet_inpaint.json", make_inpaint(json.load(f), ex), ex))
    os.makedirs(TEMPLATES_DIR, exist_ok=True)
    for source, template in TEMPLATES.items():
        path = os.path.join(WORKFLOWS, source)
        if os.path.exists(path):
            with open(path, "rb") as f, open(os.path.join(TEMPLATES_DIR, template + ".json"), "wb") as out:
                out.write(f.read())
    if args.thumbnails:
        thumbnails(args.thumbnails)


if __name__ == "__main__":
    main()
