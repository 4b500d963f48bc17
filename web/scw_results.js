// ComfyUI-StableCascade: shows in the browser what the pack's nodes report.
// - A node's `ui.text` (the PSNR/SSIM of "Stable Cascade Image Compare") appears in a read-only text box on it.
// - A loader running the tiny random demo network (`ui.scw_badge`) gets a "demo network" badge above its title.
// - The pack's warnings (server event "scw.notice", sent by host/comfyui.py: demo networks, sizes rounded to a
//   multiple of 8, prompts over 77 tokens, ...) appear as one toast per burst, and the node that was running gets
//   a warning badge (and the lines in its text box, when it has one).
// Nothing here is saved into the workflow or sent with the prompt (the box is serialize: false; badges are drawn).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const PREFIX = "SCW_";
const WIDGET = "scw_report";
const TOAST_MS = 30000;
const BURST_MS = 400;
const DEMO_COLOR = "#b45309";
const WARN_COLOR = "#a16207";

function reportBox(node) {
  let widget = node.widgets?.find((w) => w.name === WIDGET);
  if (widget) return widget;
  const box = document.createElement("textarea");
  box.readOnly = true;
  box.className = "comfy-multiline-input scw-report";
  box.style.cssText = "width:100%;font-family:monospace;font-size:11px;white-space:pre;resize:none;";
  widget = node.addDOMWidget(WIDGET, "scw_report", box, {
    serialize: false,
    getValue: () => box.value,
    setValue: (v) => { box.value = v; },
  });
  widget.serialize = false;
  widget.scwBox = box;
  return widget;
}

function render(node) {
  const lines = [...(node.scwText || []), ...(node.scwNotices || []).map((t) => "! " + t)];
  const existing = node.widgets?.find((w) => w.name === WIDGET);
  if (!node.scwText?.length && !existing) {
    app.graph.setDirtyCanvas(true, true);
    return;
  }
  const widget = existing || reportBox(node);
  widget.scwBox.value = lines.join("\n");
  widget.scwBox.rows = Math.min(8, Math.max(2, lines.length + 1));
  const min = node.computeSize();
  node.setSize([Math.max(node.size[0], min[0]), Math.max(node.size[1], min[1])]);
  app.graph.setDirtyCanvas(true, true);
}

function drawBadge(node, ctx) {
  const badge = node.scwBadge;
  if (!badge) return;
  const title = globalThis.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  const h = 18;
  ctx.save();
  ctx.font = "bold 11px sans-serif";
  const w = ctx.measureText(badge.text).width + 12;
  const y = -title - h - 3;
  ctx.fillStyle = badge.color;
  ctx.beginPath();
  if (ctx.roundRect) ctx.roundRect(0, y, w, h, 5);
  else ctx.rect(0, y, w, h);
  ctx.fill();
  ctx.fillStyle = "#ffffff";
  ctx.textBaseline = "middle";
  ctx.fillText(badge.text, 6, y + h / 2 + 1);
  ctx.restore();
}

function nodeById(id) {
  if (id == null || !app.graph) return null;
  return app.graph.getNodeById(Number.isNaN(Number(id)) ? id : Number(id));
}

let pending = [];
let timer = null;

function flushToast() {
  timer = null;
  const items = pending;
  pending = [];
  if (!items.length) return;
  const severity = items.some((i) => i.level === "error") ? "error" : "warn";
  const summary = items.length === 1 ? "Stable Cascade: warning" : `Stable Cascade: ${items.length} warnings`;
  const detail = items.map((i) => (i.title ? `${i.title}: ` : "") + i.text).join("\n");
  const toast = app.extensionManager?.toast;
  if (toast) toast.add({ severity, summary, detail, life: TOAST_MS });
  console.warn(`${summary}\n${detail}`);
}

app.registerExtension({
  name: "ComfyUI-StableCascade.results",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData?.name?.startsWith(PREFIX)) return;
    const onExecuted = nodeType.prototype.onExecuted;
    nodeType.prototype.onExecuted = function (output) {
      onExecuted?.apply(this, arguments);
      if (Array.isArray(output?.scw_badge) && output.scw_badge.length) {
        this.scwBadge = { text: String(output.scw_badge[0]), color: DEMO_COLOR };
      }
      if (Array.isArray(output?.text) && !output?.scw_badge) this.scwText = output.text.map(String);
      render(this);
    };
    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      drawBadge(this, ctx);
      return r;
    };
  },
  async setup() {
    // The frontend's "Prompt outputs failed validation" dialog heads each failing node with its class id
    // (SCW_StageCLoader); name the pack's nodes as the canvas does (their title) instead.
    const queuePrompt = api.queuePrompt?.bind(api);
    if (queuePrompt) {
      api.queuePrompt = async (...args) => {
        try {
          return await queuePrompt(...args);
        } catch (error) {
          for (const [id, entry] of Object.entries(error?.response?.node_errors || {})) {
            if (!entry?.class_type?.startsWith(PREFIX)) continue;
            const title = nodeById(id)?.title || globalThis.LiteGraph?.registered_node_types?.[entry.class_type]?.title;
            if (title) entry.class_type = `${title} (node ${id})`;
          }
          throw error;
        }
      };
    }
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?.nodes || []) {
        if (node.scwBadge || node.scwNotices?.length) {
          node.scwBadge = null;
          node.scwNotices = [];
          render(node);
        }
      }
    });
    api.addEventListener("scw.notice", ({ detail }) => {
      const node = nodeById(detail?.node);
      if (node) {
        node.scwNotices = [...(node.scwNotices || []), String(detail.text)];
        if (!node.scwBadge) node.scwBadge = { text: "warning (see message)", color: WARN_COLOR };
        render(node);
      }
      pending.push({ text: String(detail?.text ?? ""), level: detail?.level, title: node?.title });
      if (!timer) timer = setTimeout(flushToast, BURST_MS);
    });
  },
});
