// The extract view: documents in, forms (JSON schemas) filled by the model under
// response_format json_schema, shown as a table and as JSON; a batch gives one JSON-lines or CSV file.

import { ApiError, apiFetch, describeError, streamChat } from "./api.js";
import { has, t } from "./i18n.js";
import { selectedModel } from "./chat.js";

const $ = (id) => document.getElementById(id);
const MAX_TOKENS = 1024; // as `zili extract`: enough for the built-in forms
const CUSTOM = "custom";

let config = { system_prompt: "", forms: [] };
let batch = []; // [{name, text}] from the file picker
let results = []; // [{name, value} | {name, error}]
let controller = null;
let openedName = null; // the file shown in the document box, until the text there is edited

/** The messages `zili extract` sends (zili.extract.extraction_messages). */
function extractionMessages(schema, documentText) {
  const user = `JSON schema of the form:\n${JSON.stringify(schema)}\n\nDocument:\n${documentText.trim()}\n\n`
    + "Fill in the form as JSON.";
  return [{ role: "system", content: config.system_prompt }, { role: "user", content: user }];
}

function chosenForm() {
  const id = $("form-select").value;
  if (id !== CUSTOM) {
    const form = config.forms.find((f) => f.id === id);
    return { name: id.replace(/[^A-Za-z0-9_-]/g, "_"), schema: form.schema };
  }
  let schema;
  try {
    schema = JSON.parse($("schema-input").value);
  } catch (err) {
    throw new Error(t("extract.schemaInvalid", { message: err.message }));
  }
  if (schema === null || typeof schema !== "object" || Array.isArray(schema)) {
    throw new Error(t("extract.schemaNotObject"));
  }
  return { name: "form", schema };
}

async function readFiles(files) {
  const out = [];
  for (const file of files) {
    if (file.type === "application/pdf" || /\.pdf$/i.test(file.name)) throw new Error(t("extract.pdf", { name: file.name }));
    const text = await file.text();
    if (text.includes("\u0000")) throw new Error(t("extract.notText", { name: file.name }));
    out.push({ name: file.name, text });
  }
  return out;
}

async function onFiles(event) {
  setStatus("");
  try {
    const docs = await readFiles([...event.target.files]);
    if (docs.length === 1) {
      $("document-input").value = docs[0].text;
      openedName = docs[0].name;
      batch = [];
    } else {
      batch = docs;
    }
  } catch (err) {
    batch = [];
    setStatus(err.message, true);
  }
  event.target.value = "";
  renderBatch();
}

function renderBatch() {
  const box = $("batch-list") || document.createElement("div");
  box.id = "batch-list";
  box.className = "batch-list";
  $("document-files").closest("label").after(box);
  box.replaceChildren();
  if (!batch.length) return;
  const title = document.createElement("p");
  title.textContent = t("extract.batchCount", { count: batch.length });
  const names = document.createElement("ul");
  names.append(...batch.map((doc) => Object.assign(document.createElement("li"), { textContent: doc.name })));
  const clear = document.createElement("button");
  clear.type = "button";
  clear.className = "quiet";
  clear.textContent = t("extract.batchClear");
  clear.addEventListener("click", () => {
    batch = [];
    renderBatch();
  });
  box.append(title, names, clear);
}

function setStatus(text, isError = false) {
  const status = $("extract-status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

async function run() {
  if (controller) return;
  let form;
  try {
    form = chosenForm();
  } catch (err) {
    setStatus(err.message, true);
    return;
  }
  const pasted = $("document-input").value;
  const docs = batch.length ? batch : [{ name: openedName ?? t("extract.pastedName"), text: pasted }];
  if (!docs.some((d) => d.text.trim())) {
    setStatus(t("extract.noDocument"), true);
    return;
  }
  results = [];
  renderResults();
  controller = new AbortController();
  setBusy(true);
  try {
    for (const [index, doc] of docs.entries()) {
      setStatus(t("extract.progress", { index: index + 1, count: docs.length, name: doc.name, chars: 0 }));
      results.push(await fill(doc, form, (chars) => setStatus(t("extract.progress", {
        index: index + 1, count: docs.length, name: doc.name, chars,
      }))));
      renderResults();
    }
    const failed = results.filter((r) => r.error).length;
    setStatus(failed ? t("extract.doneWithErrors", { failed, count: results.length })
      : t("extract.done", { count: results.length }), failed > 0);
  } catch (err) {
    setStatus(err.name === "AbortError" ? t("chat.stopped") : describeError(err), err.name !== "AbortError");
  } finally {
    controller = null;
    setBusy(false);
    renderResults();
  }
}

async function fill(doc, form, progress) {
  const body = {
    model: selectedModel(), messages: extractionMessages(form.schema, doc.text), temperature: 0,
    max_tokens: MAX_TOKENS,
    response_format: { type: "json_schema", json_schema: { name: form.name, schema: form.schema, strict: true } },
  };
  try {
    const result = await streamChat(body, { signal: controller.signal, onDelta: (r) => progress(r.content.length) });
    if (result.finishReason === "length") return { name: doc.name, error: t("extract.unfinished") };
    return { name: doc.name, value: JSON.parse(result.content) };
  } catch (err) {
    if (err.name === "AbortError") throw err;
    // A refused form or key ends the whole batch: every other document would fail the same way.
    if (err instanceof ApiError && [400, 401, 403, 404, 413, 422].includes(err.status)) throw err;
    return { name: doc.name, error: err instanceof ApiError ? describeError(err) : String(err.message || err) };
  }
}

function setBusy(busy) {
  $("extract-run").hidden = busy;
  $("extract-stop").hidden = !busy;
}

/** A table for any JSON value: objects as key / value rows, arrays of objects as one row each. */
export function valueTable(value) {
  if (Array.isArray(value)) {
    if (value.length && value.every((v) => v && typeof v === "object" && !Array.isArray(v))) {
      const columns = [...new Set(value.flatMap((v) => Object.keys(v)))];
      const table = document.createElement("table");
      const head = table.createTHead().insertRow();
      for (const c of columns) head.append(Object.assign(document.createElement("th"), { textContent: c }));
      const body = table.createTBody();
      for (const item of value) {
        const row = body.insertRow();
        for (const c of columns) row.insertCell().append(valueTable(item[c]));
      }
      return table;
    }
    return document.createTextNode(value.map(scalarText).join(", "));
  }
  if (value && typeof value === "object") {
    const table = document.createElement("table");
    const body = table.createTBody();
    for (const [key, item] of Object.entries(value)) {
      const row = body.insertRow();
      row.append(Object.assign(document.createElement("th"), { textContent: key }));
      row.insertCell().append(valueTable(item));
    }
    return table;
  }
  return document.createTextNode(scalarText(value));
}

function scalarText(value) {
  if (value === null || value === undefined) return "";
  return typeof value === "object" ? JSON.stringify(value) : String(value);
}

function button(key, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = t(key);
  b.addEventListener("click", onClick);
  return b;
}

function renderResults() {
  const box = $("extract-results");
  box.replaceChildren(...results.map((result, index) => {
    const card = document.createElement("article");
    card.className = "result";
    card.dataset.index = String(index);
    const title = document.createElement("h3");
    title.textContent = result.name;
    card.append(title);
    if (result.error) {
      const p = document.createElement("p");
      p.className = "error";
      p.textContent = result.error;
      card.append(p);
      return card;
    }
    const json = JSON.stringify(result.value, null, 2);
    const table = document.createElement("div");
    table.className = "result-table";
    table.append(valueTable(result.value));
    const pre = document.createElement("pre");
    pre.className = "result-json";
    pre.textContent = json;
    const actions = document.createElement("div");
    actions.className = "row";
    actions.append(
      button("extract.copy", (event) => copyText(json, event.target)),
      button("extract.downloadJson", () => download(`${baseName(result.name)}.json`, json, "application/json")),
    );
    card.append(table, pre, actions);
    return card;
  }));
  $("batch-actions").hidden = !results.some((r) => !r.error);
}

function baseName(name) {
  return (name.replace(/\.[^.]*$/, "") || "form").replace(/[\\/:*?"<>|]/g, "_");
}

async function copyText(text, target) {
  try {
    await navigator.clipboard.writeText(text);
  } catch {
    // Not a secure context (http on a LAN address): the older selection-based copy.
    const area = Object.assign(document.createElement("textarea"), { value: text });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  target.textContent = t("extract.copied");
  setTimeout(() => { target.textContent = t("extract.copy"); }, 1500);
}

function download(filename, text, type) {
  const url = URL.createObjectURL(new Blob([text], { type }));
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

/** One JSON object per line: {"document", "form"} or {"document", "error"}. */
export function toJsonLines(rows) {
  return rows.map((r) => JSON.stringify(r.error ? { document: r.name, error: r.error } : { document: r.name, form: r.value }))
    .join("\n") + "\n";
}

function flatten(value, prefix = "", out = {}) {
  if (value && typeof value === "object" && !Array.isArray(value)) {
    for (const [key, item] of Object.entries(value)) flatten(item, prefix ? `${prefix}.${key}` : key, out);
  } else {
    out[prefix || "value"] = Array.isArray(value) ? JSON.stringify(value) : value;
  }
  return out;
}

function csvCell(value) {
  const text = value === null || value === undefined ? "" : String(value);
  // A leading = + - @ would run as a formula in a spreadsheet: quote it as text.
  const safe = /^[=+\-@\t\r]/.test(text) ? `'${text}` : text;
  return /[",\n\r]/.test(safe) || safe !== text ? `"${safe.replace(/"/g, '""')}"` : safe;
}

/** RFC 4180 CSV: one row per document, nested fields as dotted columns, arrays as JSON text. */
export function toCsv(rows) {
  const flat = rows.map((r) => ({ document: r.name, ...(r.error ? { error: r.error } : flatten(r.value)) }));
  const columns = [...new Set(flat.flatMap((r) => Object.keys(r)))];
  return [columns, ...flat.map((r) => columns.map((c) => r[c]))].map((row) => row.map(csvCell).join(",")).join("\r\n")
    + "\r\n";
}

function fillFormPicker() {
  const select = $("form-select");
  const chosen = select.value;
  select.replaceChildren(
    ...config.forms.map((f) => new Option(has(`form.${f.id}`) ? t(`form.${f.id}`) : f.schema.title || f.id, f.id)),
    new Option(t("extract.customSchema"), CUSTOM),
  );
  if (chosen) select.value = chosen;
}

export function refreshExtract() {
  fillFormPicker();
  renderBatch();
  renderResults();
}

export async function initExtract() {
  $("form-select").addEventListener("change", () => { $("schema-box").hidden = $("form-select").value !== CUSTOM; });
  $("document-files").addEventListener("change", onFiles);
  // Typing or pasting a document replaces an opened batch: the run uses what the person touched last
  // (a batch kept behind an edited box would fill the old files' forms instead of the shown text).
  $("document-input").addEventListener("input", () => {
    openedName = null;
    if (batch.length) {
      batch = [];
      renderBatch();
    }
  });
  $("extract-run").addEventListener("click", run);
  $("extract-stop").addEventListener("click", () => controller?.abort());
  $("download-jsonl").addEventListener("click", () => download("forms.jsonl", toJsonLines(results), "application/x-ndjson"));
  $("download-csv").addEventListener("click", () => download("forms.csv", toCsv(results), "text/csv"));
  try {
    config = await (await apiFetch("ui/extract.json")).json();
  } catch (err) {
    setStatus(describeError(err), true);
  }
  fillFormPicker();
}
