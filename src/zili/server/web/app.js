// The zili web console: wiring of the views, the language switch, the API-key dialog and notices.

import { apiKey, onKeyNeeded, setApiKey } from "./api.js";
import { initChat, loadModels, refreshChat } from "./chat.js";
import { initExtract, refreshExtract } from "./extract.js";
import { languageNames, loadTables, preferredLanguage, setLanguage, t } from "./i18n.js";
import { initUsage, refreshUsage } from "./usage.js";

const $ = (id) => document.getElementById(id);
const VIEWS = ["chat", "extract", "usage"];
let pendingKey = null;

function showView(name) {
  const view = VIEWS.includes(name) ? name : "chat";
  for (const v of VIEWS) {
    $(`view-${v}`).hidden = v !== view;
    $(`tab-${v}`).setAttribute("aria-selected", String(v === view));
  }
  if (location.hash !== `#${view}`) history.replaceState(null, "", `#${view}`);
}

function notice(text) {
  $("notice-text").textContent = text;
  $("notice").hidden = !text;
}

/** Opens the key dialog; resolves to true once a key is stored, false if the person cancels. */
function askForKey(reason) {
  if (pendingKey) return pendingKey;
  const dialog = $("key-dialog");
  $("key-reason").textContent = t(reason === "refused" ? "key.reasonRefused" : reason === "manual" ? "key.reasonManual"
    : "key.reasonNeeded");
  $("key-input").value = "";
  pendingKey = new Promise((resolve) => {
    const finish = (stored) => {
      dialog.removeEventListener("close", onClose);
      pendingKey = null;
      if (dialog.open) dialog.close();
      resolve(stored);
    };
    const onClose = () => finish(false);
    dialog.addEventListener("close", onClose);
    dialog.onsave = () => {
      const key = $("key-input").value.trim();
      if (!key) return;
      setApiKey(key);
      finish(true);
    };
  });
  dialog.showModal();
  $("key-input").focus();
  return pendingKey;
}

function initKeyDialog() {
  const dialog = $("key-dialog");
  $("key-save").addEventListener("click", () => dialog.onsave?.());
  $("key-input").addEventListener("keydown", (event) => {
    if (event.key === "Enter") dialog.onsave?.();
  });
  $("key-cancel").addEventListener("click", () => dialog.close());
  $("key-forget").addEventListener("click", () => {
    setApiKey("");
    dialog.close();
  });
  $("key-button").addEventListener("click", async () => {
    if (await askForKey("manual")) loadModels();
  });
  onKeyNeeded(askForKey);
}

function initLanguage() {
  const select = $("lang-select");
  select.replaceChildren(...languageNames().map(([lang, name]) => new Option(name, lang)));
  select.addEventListener("change", () => {
    setLanguage(select.value);
    refreshChat();
    refreshExtract();
    refreshUsage();
  });
  const lang = preferredLanguage();
  select.value = lang;
  setLanguage(lang);
}

async function main() {
  await loadTables();
  initLanguage();
  initKeyDialog();
  for (const v of VIEWS) $(`tab-${v}`).addEventListener("click", () => showView(v));
  window.addEventListener("hashchange", () => showView(location.hash.slice(1)));
  $("notice-close").addEventListener("click", () => notice(""));
  document.addEventListener("zili:notice", (event) => notice(event.detail));
  showView(location.hash.slice(1));
  initChat();
  initUsage();
  await initExtract();
  document.body.dataset.ready = "true";
  await loadModels();
}

main();
