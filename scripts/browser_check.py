#!/usr/bin/env python3
"""The first Run in the real ComfyUI frontend, in headless chromium (Playwright), with an EMPTY models folder.

    python scripts/browser_check.py [--shots DIR] [--port N]

1. first run: loads workflows/text_to_image.json as shipped and presses Run; the error dialog must name the
   missing file's loader by its display name and the folder it belongs in (the loaders' VALIDATE_INPUTS text).
2. demo run: loads workflows/reconstruction.json, picks "(tiny random demo)" in every loader (as a user does) and
   runs it; PSNR/SSIM must appear on the page (web/scw_results.js shows the compare nodes' ui text), the demo
   network must be announced (a toast from the pack's scw.notice events, and the loaders' own text), and the
   report box must stay out of the saved workflow.
3. node library: searching "cascade" and "stable cascade" must list every node of the pack.
4. training: loads workflows/train_lora.json, picks the demo networks and presses Run: the trainer must report
   every step to the frontend's progress bar with the loss as the node's progress text, send previews, and the
   save node must write the LoRA into the models folder; a screenshot is taken while it trains.
Screenshots go to --shots (default /tmp/f_shots); --checks picks some of first,demo,library,train.
Exit 0 when every check holds, 1 otherwise, 2 when something it needs is absent (the message says what): the
reference ComfyUI ($COMFYUI_REF, default ~/comfyui-ref with ComfyUI/ and venv/), chromium ($CHROMIUM or on the
PATH) and Playwright for Python (this script re-runs itself with ~/.venvs/frontend-check/bin/python when its own
python lacks it; no `playwright install` is needed). Every request that is not to 127.0.0.1 is aborted. Only one
browser check should run at a time on a shared machine: `flock /tmp/scw-browser.lock python scripts/browser_check.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FOLDER = "ComfyUI-StableCascade"
DEMO = "(tiny random demo)"
REF = os.environ.get("COMFYUI_REF") or os.path.expanduser("~/comfyui-ref")
CHROMIUM = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser") or ""
ALT_PY = os.environ.get("FRONTEND_CHECK_PY") or os.path.expanduser("~/.venvs/frontend-check/bin/python")
CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Workflow.ShowMissingNodesWarning": True}
RUN_TIMEOUT_S = 300

try:
    from playwright.sync_api import sync_playwright
except ImportError:
    if os.path.exists(ALT_PY) and not os.environ.get("_SCW_BROWSER_REEXEC"):
        os.environ["_SCW_BROWSER_REEXEC"] = "1"
        os.execv(ALT_PY, [ALT_PY, os.path.abspath(__file__), *sys.argv[1:]])
    print("SKIP: Playwright for Python is missing (python3 -m venv ~/.venvs/frontend-check && "
          "~/.venvs/frontend-check/bin/pip install playwright)")
    sys.exit(2)

READY_JS = """() => !!(window.app && window.app.graph && window.app.canvas && window.LiteGraph
    && Object.keys(window.LiteGraph.registered_node_types).length > 50
    && typeof window.app.loadGraphData === 'function')"""
LOAD_JS = """async ([wf, name]) => { await window.app.loadGraphData(wf, true, true, name);
  return window.app.graph.nodes.length; }"""
PICK_DEMO_JS = """(demo) => { const picked = [];
  for (const n of window.app.graph.nodes) {
    const w = (n.widgets || []).find(w => w.name === 'file_name');
    const listed = Array.isArray(w?.options?.values) && w.options.values.includes(demo);  // loaders, not savers
    if (n.type.startsWith('SCW_') && w && listed) { w.value = demo; w.callback?.(demo); picked.push(n.type); } }
  window.app.graph.setDirtyCanvas(true, true); return picked; }"""
DIALOG_JS = """() => [...document.querySelectorAll('.p-dialog')].map(d => (d.innerText || '').replace(/\\s+/g, ' '))"""
TOASTS_JS = """() => [...document.querySelectorAll('.p-toast-message')]
  .map(t => (t.innerText || '').replace(/\\s+/g, ' '))"""
REPORTS_JS = """() => window.app.graph.nodes.filter(n => n.type.startsWith('SCW_')).map(n => {
  const w = (n.widgets || []).find(w => w.name === 'scw_report');
  return {id: n.id, type: n.type, text: w ? w.scwBox.value : '', badge: n.scwBadge ? n.scwBadge.text : '',
          saved: n.serialize().widgets_values}; })"""
BOXES_JS = """() => [...document.querySelectorAll('textarea.scw-report')].map(t => t.value)"""
PROMPT_JS = """async () => { const p = await window.app.graphToPrompt();
  return Object.values(p.output).some(n => 'scw_report' in (n.inputs || {})); }"""
FOCUS_JS = """(type) => { const n = window.app.graph.nodes.find(n => n.type === type);
  if (n) { window.app.canvas.centerOnNode(n); window.app.canvas.setDirty(true, true); } return !!n; }"""


def log(msg: str) -> None:
    print(msg, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(port: int) -> tuple[subprocess.Popen, str]:
    """The reference ComfyUI with a fresh base directory: the pack as its only custom node, no model files."""
    comfy, py = os.path.join(REF, "ComfyUI"), os.path.join(REF, "venv", "bin", "python")
    if not (os.path.isfile(os.path.join(comfy, "main.py")) and os.path.exists(py)):
        log(f"SKIP: no reference ComfyUI at {REF} (ComfyUI/ and venv/; set COMFYUI_REF)")
        sys.exit(2)
    base = tempfile.mkdtemp(prefix="scw-browser-")
    os.makedirs(os.path.join(base, "custom_nodes"))
    os.symlink(REPO, os.path.join(base, "custom_nodes", FOLDER))
    os.makedirs(os.path.join(base, "models"))  # empty: the first Run of a new user
    os.makedirs(os.path.join(base, "input"))
    inputs = os.path.join(REPO, "workflows", "inputs")
    for name in os.listdir(inputs):  # the example images and the training dataset folder
        if os.path.isfile(os.path.join(inputs, name)):
            shutil.copy(os.path.join(inputs, name), os.path.join(base, "input", name))
        else:
            shutil.copytree(os.path.join(inputs, name), os.path.join(base, "input", name))
    os.makedirs(os.path.join(base, "user", "default"))
    with open(os.path.join(base, "user", "default", "comfy.settings.json"), "w", encoding="utf-8") as f:
        json.dump(SETTINGS, f)
    server_log = open(os.path.join(base, "server.log"), "w", encoding="utf-8")
    proc = subprocess.Popen([py, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
                             "--base-directory", base, "--disable-auto-launch",
                             "--database-url", "sqlite:///:memory:"],
                            cwd=comfy, stdout=server_log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            break
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/system_stats", timeout=5) as r:
                if r.status == 200:
                    return proc, base
        except OSError:
            time.sleep(1)
    tail = open(os.path.join(base, "server.log"), encoding="utf-8", errors="replace").read()[-3000:]
    stop(proc)
    log(f"FAIL: ComfyUI did not start:\n{tail}")
    sys.exit(1)


def stop(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except OSError:
            pass


def workflow(name: str) -> dict:
    with open(os.path.join(REPO, "workflows", name), encoding="utf-8") as f:
        return json.load(f)


def press_run(page) -> None:
    """The Run button as a user presses it (the frontend's queue button), else the same call it makes."""
    button = page.locator("[data-testid='queue-button'], button:has-text('Run')").first
    try:
        button.click(timeout=5000)
    except Exception:
        page.evaluate("() => window.app.queuePrompt(0, 1)")


def error_dialog(page, what: str, problems: list[str]) -> bool:
    """An error dialog on the page: noted in ``problems`` (its first 400 characters); True when there is one."""
    errors = [d for d in page.evaluate(DIALOG_JS) if "error" in d.lower()]
    if errors:
        problems.append(f"{what}: error dialog {errors[0][:400]!r}")
    return bool(errors)


def first_run(page, shots: str) -> list[str]:
    """The shipped text-to-image workflow, Run, with no model files: the dialog names the loaders and folders."""
    problems = []
    page.evaluate(LOAD_JS, [workflow("text_to_image.json"), "text_to_image.json"])
    page.wait_for_timeout(1000)
    press_run(page)
    dialogs = []
    for _ in range(60):
        page.wait_for_timeout(500)
        dialogs = [d for d in page.evaluate(DIALOG_JS) if "validation" in d.lower() or "not installed" in d]
        if dialogs:
            break
    shot = os.path.join(shots, "first_run_missing_files.png")
    page.screenshot(path=shot)
    text = " ".join(dialogs)
    log(f"first run: dialog {text[:600]!r}...\n    screenshot {shot}")
    for want in ("Stable Cascade Load Stage C: 'stage_c_bf16.safetensors' is not installed",
                 "it belongs in models/diffusion_models/", "it belongs in models/vae/",
                 "huggingface.co/stabilityai/stable-cascade", DEMO):
        if want not in text:
            problems.append(f"first run: the dialog does not say {want!r}")
    if "SCW_" in text:
        problems.append("first run: the dialog names a node by its id instead of its display name")
    for _ in range(3):
        page.keyboard.press("Escape")
    page.wait_for_timeout(500)
    return problems


def demo_run(page, shots: str) -> list[str]:
    """The reconstruction workflow on the demo networks: scores on the page, the demo announced."""
    problems = []
    page.evaluate(LOAD_JS, [workflow("reconstruction.json"), "reconstruction.json"])
    page.wait_for_timeout(1000)
    picked = page.evaluate(PICK_DEMO_JS, DEMO)
    log(f"demo run: picked {DEMO} in {picked}")
    press_run(page)
    toasts: list[str] = []
    boxes: list[str] = []
    deadline = time.monotonic() + RUN_TIMEOUT_S
    while time.monotonic() < deadline:
        page.wait_for_timeout(1000)
        toasts = sorted(set(toasts) | set(page.evaluate(TOASTS_JS)))
        boxes = page.evaluate(BOXES_JS)
        if toasts and not os.path.exists(os.path.join(shots, "reconstruction_demo_toast.png")):
            page.screenshot(path=os.path.join(shots, "reconstruction_demo_toast.png"))
        if sum("PSNR" in b for b in boxes) >= 2:
            break
        if error_dialog(page, "demo run", problems):
            break
    page.wait_for_timeout(500)
    toasts = sorted(set(toasts) | set(page.evaluate(TOASTS_JS)))
    shot = os.path.join(shots, "reconstruction_demo_toast.png")
    if not os.path.exists(shot):
        page.screenshot(path=shot)
    page.evaluate(FOCUS_JS, "SCW_ImageCompare")
    page.wait_for_timeout(800)
    shot2 = os.path.join(shots, "reconstruction_scores.png")
    page.screenshot(path=shot2)
    reports = page.evaluate(REPORTS_JS)
    log(f"demo run: toasts {[t[:160] for t in toasts]}")
    for r in reports:
        if r["text"] or r["badge"]:
            log(f"    node {r['id']} {r['type']}: badge {r['badge']!r}, text {r['text'][:300]!r}")
    log(f"    screenshots {shot}, {shot2}")
    scores = [r for r in reports if r["type"] == "SCW_ImageCompare" and "PSNR" in r["text"] and "SSIM" in r["text"]]
    if len(scores) < 2:
        problems.append(f"demo run: PSNR/SSIM shown on {len(scores)} of the 2 compare nodes")
    loaders = [r for r in reports if r["type"].endswith("Loader")]
    if not loaders or not all(r["badge"].startswith("demo network") for r in loaders):
        badges = [(r["type"], r["badge"]) for r in loaders]
        problems.append(f"demo run: not every loader shows the demo badge: {badges}")
    if not any("TINY RANDOM" in t for t in toasts):
        problems.append("demo run: no toast announced the tiny random networks")
    for r in scores:
        if r["saved"] != [4.0]:
            problems.append(f"demo run: the report box entered the saved workflow: {r['saved']}")
    if page.evaluate(PROMPT_JS):
        problems.append("demo run: the report box is sent with the prompt")
    return problems


LIBRARY_JS = """() => [...document.querySelectorAll('.p-tree-node-label, .p-treenode-label')]
  .map(e => (e.innerText || '').trim())"""
PACK_NODES_JS = "() => Object.keys(window.LiteGraph.registered_node_types).filter(t => t.startsWith('SCW_')).length"


def library_search(page, shots: str) -> list[str]:
    """The node library's search: "cascade" and "stable cascade" list every node of the pack (in its folder)."""
    problems = []
    total = page.evaluate(PACK_NODES_JS)
    page.locator("text=Nodes").first.click()  # the node library tab of the side bar
    page.wait_for_timeout(1500)
    box = page.locator(".side-bar-panel input, .sidebar-content-container input").first
    for query in ("cascade", "stable cascade"):
        box.fill(query)
        page.wait_for_timeout(2000)
        labels = page.evaluate(LIBRARY_JS)
        folder = next((lab for lab in labels if lab.startswith("Stable Cascade\n")), "")
        found = int(folder.split("\n")[1]) if folder else 0
        shot = os.path.join(shots, f"library_{query.replace(' ', '_')}.png")
        page.screenshot(path=shot)
        log(f"node library search {query!r}: the 'Stable Cascade' folder lists {found} of the pack's {total} nodes; "
            f"screenshot {shot}")
        if found != total or total < 20:
            problems.append(f"node library search {query!r} finds {found} of the pack's {total} nodes")
    box.fill("")
    page.locator("text=Nodes").first.click()
    page.wait_for_timeout(500)
    return problems


LISTEN_JS = """async () => { const { api } = await import('/scripts/api.js');
  const seen = window.__scwSeen = {progress: [], text: [], previews: 0};
  api.addEventListener('progress', ({detail}) => seen.progress.push([String(detail.node), detail.value, detail.max]));
  api.addEventListener('progress_text', ({detail}) => seen.text.push(String(detail.text)));
  for (const ev of ['b_preview', 'b_preview_with_metadata']) api.addEventListener(ev, () => { seen.previews++; });
  return true; }"""
NODE_ID_JS = "(type) => String(window.app.graph.nodes.find(n => n.type === type)?.id)"


def train_run(page, shots: str, base: str) -> list[str]:
    """The training workflow as shipped on the demo networks: Run, progress with the loss, previews, the file."""
    problems = []
    wf = workflow("train_lora.json")
    total = next(n["widgets_values"][0] for n in wf["nodes"] if n["type"] == "SCW_TrainLora")  # steps, its 1st widget
    page.evaluate(LOAD_JS, [wf, "train_lora.json"])
    page.wait_for_timeout(1000)
    page.evaluate(PICK_DEMO_JS, DEMO)
    page.evaluate(LISTEN_JS)
    trainer = page.evaluate(NODE_ID_JS, "SCW_TrainLora")
    lora = os.path.join(base, "models", "loras", "scw_wurst.safetensors")
    press_run(page)
    shot = os.path.join(shots, "train_progress.png")
    deadline, seen = time.monotonic() + RUN_TIMEOUT_S, {}
    while time.monotonic() < deadline:
        page.wait_for_timeout(500)
        seen = page.evaluate("() => window.__scwSeen")
        mine = [p for p in seen["progress"] if p[0] == trainer]
        if mine and 0 < mine[-1][1] < mine[-1][2] and not os.path.exists(shot):
            page.screenshot(path=shot)  # mid-run: the bar on the trainer, the loss under it
        if os.path.exists(lora) and mine and mine[-1][1] == mine[-1][2]:
            break
        if error_dialog(page, "training run", problems):
            break
    page.wait_for_timeout(1500)
    done = os.path.join(shots, "train_done.png")
    page.screenshot(path=done)
    mine = [p for p in seen.get("progress", []) if p[0] == trainer]
    losses = [t for t in seen.get("text", []) if "loss" in t]
    log(f"training run: {len(mine)} progress events on the trainer (last {mine[-1] if mine else None}), "
        f"{len(losses)} loss texts (last {losses[-1] if losses else None!r}), {seen.get('previews', 0)} previews; "
        f"LoRA written: {os.path.exists(lora)}\n    screenshots {shot}, {done}")
    if len({p[1] for p in mine}) < total or not mine or mine[-1][1:] != [total, total]:
        problems.append(f"training run: the progress bar did not go through all {total} steps: {mine[-5:]}")
    if not losses or f"step {total}/{total}" not in losses[-1]:
        problems.append(f"training run: no 'step {total}/{total}  loss ...' text on the trainer: {losses[-2:]}")
    if not seen.get("previews"):
        problems.append("training run: no preview image reached the frontend")
    if not os.path.exists(lora):
        problems.append(f"training run: the save node did not write {lora}")
    if not os.path.exists(shot):
        problems.append("training run: no progress event was seen mid-run")
    return problems


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shots", default="/tmp/f_shots")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--checks", default="first,demo,library,train", help="comma list of first,demo,library,train")
    args = ap.parse_args()
    checks = set(args.checks.split(","))
    if not CHROMIUM:
        log("SKIP: no chromium on the PATH (set CHROMIUM)")
        return 2
    os.makedirs(args.shots, exist_ok=True)
    for old in ("first_run_missing_files.png", "reconstruction_demo_toast.png", "reconstruction_scores.png",
                "library_cascade.png", "library_stable_cascade.png", "train_progress.png", "train_done.png"):
        if os.path.exists(os.path.join(args.shots, old)):
            os.remove(os.path.join(args.shots, old))
    port = args.port or free_port()
    log(f"starting the reference ComfyUI ({REF}) on 127.0.0.1:{port} with an empty models folder ...")
    proc, base = start_comfyui(port)
    problems: list[str] = []
    try:
        with sync_playwright() as pw:
            ctx = pw.chromium.launch_persistent_context(
                os.path.join(base, "chrome"), executable_path=CHROMIUM, headless=True, args=CHROME_ARGS,
                ignore_default_args=["--headless"], viewport={"width": 1600, "height": 1000}, timeout=90000)
            ctx.route("**/*", lambda r: r.continue_() if r.request.url.startswith(
                (f"http://127.0.0.1:{port}/", f"ws://127.0.0.1:{port}/", "data:", "blob:")) else r.abort())
            page = ctx.pages[0] if ctx.pages else ctx.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)[:300]))
            log("opening the frontend ...")
            page.goto(f"http://127.0.0.1:{port}/", wait_until="domcontentloaded", timeout=120000)
            page.wait_for_function(READY_JS, timeout=180000, polling=500)
            page.wait_for_timeout(1500)
            page.keyboard.press("Escape")
            problems += first_run(page, args.shots) if "first" in checks else []
            problems += demo_run(page, args.shots) if "demo" in checks else []
            problems += library_search(page, args.shots) if "library" in checks else []
            problems += train_run(page, args.shots, base) if "train" in checks else []
            problems += [f"page error: {e}" for e in errors if "scw" in e.lower()]
            ctx.close()
    finally:
        stop(proc)
        server_log = os.path.join(base, "server.log")
        if problems and os.path.exists(server_log):
            log("server log tail:\n" + open(server_log, encoding="utf-8", errors="replace").read()[-2500:])
        shutil.rmtree(base, ignore_errors=True)
    for p in problems:
        log(f"FAIL: {p}")
    verdict = "OK" if not problems else f"{len(problems)} problem(s)"
    log(f"browser check: {verdict}; screenshots in {args.shots}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
