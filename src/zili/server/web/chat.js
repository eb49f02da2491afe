// The chat view: conversations kept in this browser (localStorage), answers streamed from
// /v1/chat/completions, a stop button that closes the stream (the server then aborts the request).

import { ApiError, apiFetch, describeError, streamChat } from "./api.js";
import { t, translate } from "./i18n.js";
import { renderMarkdown } from "./markdown.js";

const CHATS_KEY = "zili.chats";
const CURRENT_KEY = "zili.currentChat";
const SETTINGS_KEY = "zili.chatSettings";
const $ = (id) => document.getElementById(id);

let chats = [];
let currentId = null;
let controller = null;
let renderPending = null;

function load(key, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(key));
    return value ?? fallback;
  } catch {
    return fallback;
  }
}

function save() {
  localStorage.setItem(CHATS_KEY, JSON.stringify(chats));
  localStorage.setItem(CURRENT_KEY, currentId ?? "");
}

function saveSettings() {
  localStorage.setItem(SETTINGS_KEY, JSON.stringify({
    system: $("system-prompt").value, temperature: $("temperature").value, maxTokens: $("max-tokens").value,
    model: $("model-select").value,
  }));
}

function currentChat() {
  let chat = chats.find((c) => c.id === currentId);
  if (!chat) {
    chat = { id: crypto.randomUUID(), title: "", created: Date.now(), messages: [] };
    chats.unshift(chat);
    currentId = chat.id;
  }
  return chat;
}

/** The model names from /v1/models, into the picker (keeping the saved choice when still served). */
export async function loadModels() {
  const select = $("model-select");
  const saved = load(SETTINGS_KEY, {}).model;
  try {
    const body = await (await apiFetch("v1/models")).json();
    select.replaceChildren(...(body.data || []).map((card) => new Option(card.id, card.id)));
    if ([...select.options].some((o) => o.value === saved)) select.value = saved;
  } catch (err) {
    showError(err);
  }
}

export function selectedModel() {
  return $("model-select").value || undefined;
}

function number(input) {
  return input.value.trim() === "" ? undefined : Number(input.value);
}

function requestMessages(chat) {
  const system = $("system-prompt").value.trim();
  const turns = chat.messages.filter((m) => !m.error || m.content)
    .map(({ role, content }) => ({ role, content }));
  return system ? [{ role: "system", content: system }, ...turns] : turns;
}

async function send() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || controller) return;
  const chat = currentChat();
  if (!chat.title) chat.title = text.slice(0, 60);
  chat.messages.push({ role: "user", content: text });
  const answer = { role: "assistant", content: "", reasoning: "" };
  const body = {
    model: selectedModel(), messages: requestMessages(chat),
    temperature: number($("temperature")), max_tokens: number($("max-tokens")),
  };
  chat.messages.push(answer);
  prompt.value = "";
  save();
  renderChat();
  const view = $("messages").lastElementChild;
  controller = new AbortController();
  setBusy(true);
  const started = performance.now();
  try {
    const result = await streamChat(body, {
      signal: controller.signal,
      onDelta: (partial) => {
        answer.content = partial.content;
        answer.reasoning = partial.reasoning;
        scheduleRender(view, answer);
      },
    });
    Object.assign(answer, { content: result.content, reasoning: result.reasoning, stats: stats(result, started) });
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else answer.error = errorRecord(err);
  } finally {
    controller = null;
    setBusy(false);
    save();
    renderMessage(view, answer);
    renderList();
  }
}

function stats(result, started) {
  const usage = result.usage || {};
  const completion = usage.completion_tokens ?? null;
  const first = result.firstTokenAt ?? result.endedAt;
  const decodeSeconds = (result.endedAt - first) / 1000;
  let rate = null;
  if (completion > 1 && decodeSeconds > 0) rate = (completion - 1) / decodeSeconds;
  else if (completion) rate = completion / ((result.endedAt - started) / 1000);
  return {
    completion, prompt: usage.prompt_tokens ?? null, cached: usage.prompt_tokens_details?.cached_tokens ?? 0,
    rate, firstToken: (first - started) / 1000, finishReason: result.finishReason,
  };
}

function errorRecord(err) {
  if (err instanceof ApiError) {
    const { status, serverMessage: message, param, code, retryAfter, sentKey } = err;
    return { status, message, param, code, retryAfter, sentKey };
  }
  return { status: -1, message: String(err?.message || err) };
}

function errorText(record) {
  if (record.status === -1) return describeError(new Error(record.message));
  return describeError(new ApiError(record.status, record));
}

function showError(err) {
  document.dispatchEvent(new CustomEvent("zili:notice", { detail: describeError(err) }));
}

function scheduleRender(view, message) {
  if (renderPending) return;
  renderPending = requestAnimationFrame(() => {
    renderPending = null;
    renderMessage(view, message);
  });
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  document.body.classList.toggle("busy", busy);
}

function renderMessage(view, message) {
  view.dataset.role = message.role;
  view.querySelector(".role").textContent = t(message.role === "user" ? "role.user" : "role.assistant");
  const reasoning = view.querySelector(".reasoning");
  reasoning.hidden = !message.reasoning;
  reasoning.querySelector("summary").textContent = t("chat.reasoning");
  reasoning.querySelector(".reasoning-text").textContent = message.reasoning || "";
  const content = view.querySelector(".content");
  if (message.role === "user") content.textContent = message.content;
  else content.replaceChildren(renderMarkdown(message.content || ""));
  const meta = view.querySelector(".meta");
  meta.classList.toggle("error", Boolean(message.error));
  meta.textContent = metaText(message);
  view.classList.toggle("streaming", message === currentAnswer());
  const list = $("messages");
  list.scrollTop = list.scrollHeight;
}

function currentAnswer() {
  if (!controller) return null;
  const messages = currentChat().messages;
  return messages[messages.length - 1];
}

function metaText(message) {
  if (message.error) return errorText(message.error);
  if (message.stopped) return t("chat.stopped");
  const s = message.stats;
  if (!s) return "";
  const parts = [];
  if (s.completion !== null) parts.push(t("chat.statsTokens", { completion: s.completion, prompt: s.prompt ?? "?" }));
  if (s.rate !== null) parts.push(t("chat.statsRate", { rate: s.rate.toFixed(1) }));
  parts.push(t("chat.statsFirstToken", { seconds: s.firstToken.toFixed(2) }));
  if (s.finishReason === "length") parts.push(t("chat.truncated"));
  return parts.join(t("common.separator"));
}

function renderChat() {
  const chat = chats.find((c) => c.id === currentId);
  const list = $("messages");
  const template = $("message-template");
  list.replaceChildren();
  for (const message of chat?.messages || []) {
    const view = template.content.firstElementChild.cloneNode(true);
    list.append(view);
    renderMessage(view, message);
  }
  $("chat-empty").hidden = Boolean(chat?.messages.length);
  renderList();
}

function renderList() {
  const list = $("chat-list");
  list.replaceChildren(...chats.map((chat) => {
    const item = document.createElement("li");
    item.classList.toggle("current", chat.id === currentId);
    const open = document.createElement("button");
    open.type = "button";
    open.className = "chat-open";
    open.textContent = chat.title || t("chat.untitled");
    open.addEventListener("click", () => switchTo(chat.id));
    const remove = document.createElement("button");
    remove.type = "button";
    remove.className = "quiet chat-delete";
    remove.dataset.i18n = "common.closeMark";
    remove.dataset.i18nAriaLabel = "chat.delete";
    remove.addEventListener("click", () => deleteChat(chat.id));
    item.append(open, remove);
    translate(item);
    return item;
  }));
}

function switchTo(id) {
  if (controller) return;
  currentId = id;
  save();
  renderChat();
}

function newChat() {
  if (controller) return;
  const empty = chats.find((c) => !c.messages.length);
  currentId = empty ? empty.id : null;
  currentChat();
  save();
  renderChat();
  $("prompt").focus();
}

function deleteChat(id) {
  if (controller && id === currentId) return;
  chats = chats.filter((c) => c.id !== id);
  if (currentId === id) currentId = chats[0]?.id ?? null;
  save();
  renderChat();
}

/** Re-draws everything language-dependent. */
export function refreshChat() {
  renderChat();
}

export function initChat() {
  chats = load(CHATS_KEY, []).filter((c) => c && Array.isArray(c.messages));
  currentId = localStorage.getItem(CURRENT_KEY) || chats[0]?.id || null;
  const settings = load(SETTINGS_KEY, {});
  if (typeof settings.system === "string") $("system-prompt").value = settings.system;
  if (settings.temperature !== undefined) $("temperature").value = settings.temperature;
  if (settings.maxTokens !== undefined) $("max-tokens").value = settings.maxTokens;
  for (const id of ["system-prompt", "temperature", "max-tokens", "model-select"]) {
    $(id).addEventListener("change", saveSettings);
  }
  $("send").addEventListener("click", send);
  $("stop").addEventListener("click", () => controller?.abort());
  $("new-chat").addEventListener("click", newChat);
  $("clear-chats").addEventListener("click", () => {
    if (controller || !window.confirm(t("chat.clearConfirm"))) return;
    chats = [];
    currentId = null;
    save();
    renderChat();
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  renderChat();
}
