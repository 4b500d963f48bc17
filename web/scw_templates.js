// ComfyUI-StableCascade: the Templates browser lists the pack's templates only once.
// ComfyUI lists the .json files of every folder named example_workflows, example, examples, workflow or workflows
// of a custom node, but serves only the first (example_workflows/). The pack keeps its editable workflows in
// workflows/ (the headless runner and the tests read them there) and their Templates copies, with thumbnails, in
// example_workflows/stable_cascade_*.json (scripts/make_workflows.py): without this, each workflow would be listed a
// second time under its short name (text_to_image, lora, ...) with no thumbnail, and open as "not found".
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const TEMPLATE_PREFIX = "stable_cascade_";

app.registerExtension({
  name: "ComfyUI-StableCascade.templates",
  setup() {
    const list = api.getWorkflowTemplates?.bind(api);
    if (!list) return;
    api.getWorkflowTemplates = async () => {
      const templates = await list();
      for (const [module, names] of Object.entries(templates || {})) {
        if (Array.isArray(names) && names.some((n) => n.startsWith(TEMPLATE_PREFIX))) {
          templates[module] = names.filter((n) => n.startsWith(TEMPLATE_PREFIX));
        }
      }
      return templates;
    };
  },
});
