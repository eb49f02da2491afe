// Talking to the server: the API key (kept in sessionStorage only), errors in words a person
// understands, and server-sent events from /v1/chat/completions.

import { t } from "./i18n.js";

const KEY_STORAGE = "zili.apiKey";
let askForKey = null;

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

/** `ask(reason)` is called on a 401 ("needed" or "refused") and resolves to true once a key is stored. */
export function onKeyNeeded(ask) {
  askForKey = ask;
}

/** An HTTP error with the fields of OpenAI's error object. */
export class ApiError extends Error {
  constructor(status, { message = "", param = null, code = null, retryAfter = null, sentKey = false } = {}) {
    super(message || `HTTP ${status}`);
    this.status = status;
    this.serverMessage = message;
    this.param = param;
    this.code = code;
    this.retryAfter = retryAfter;
    this.sentKey = sentKey;
  }

  static async from(response, sentKey) {
    let error = {};
    try {
      error = (await response.json()).error || {};
    } catch {
      // not JSON (a proxy's page): the status says enough
    }
    const retry = Number.parseInt(response.headers.get("Retry-After") || "", 10);
    return new ApiError(response.status, {
      message: typeof error.message === "string" ? error.message : "",
      param: typeof error.param === "string" ? error.param : null,
      code: typeof error.code === "string" ? error.code : null,
      retryAfter: Number.isFinite(retry) ? retry : null,
      sentKey,
    });
  }
}

/**
 * fetch() against the server, relative to the page. A 401 asks for a key (when `key` is not
 * given) and retries; any other non-2xx throws ApiError; an unreachable server throws ApiError(0).
 */
export async function apiFetch(path, { method = "GET", body, signal, key } = {}) {
  for (;;) {
    const sent = key ?? apiKey();
    const headers = {};
    if (body !== undefined) headers["Content-Type"] = "application/json";
    if (sent) headers.Authorization = `Bearer ${sent}`;
    let response;
    try {
      response = await fetch(path, {
        method, headers, signal, cache: "no-store", credentials: "omit",
        body: body === undefined ? undefined : JSON.stringify(body),
      });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(0, { message: String(err.message || err) });
    }
    if (response.status === 401 && key === undefined && askForKey) {
      await response.body?.cancel();
      if (await askForKey(sent ? "refused" : "needed")) continue;
      throw new ApiError(401, { sentKey: Boolean(sent) });
    }
    if (!response.ok) throw await ApiError.from(response, Boolean(sent));
    return response;
  }
}

// Request fields the page sets, named as the page labels them.
const FIELD_LABELS = {
  max_tokens: "chat.maxTokens",
  max_completion_tokens: "chat.maxTokens",
  temperature: "chat.temperature",
  model: "chat.model",
  messages: "field.messages",
  response_format: "extract.schema",
  "response_format.json_schema": "extract.schema",
  "response_format.json_schema.schema": "extract.schema",
};

/** The label of a request field in the page's language (the raw name when the page has none). */
export function fieldLabel(param) {
  const key = FIELD_LABELS[param];
  return key ? t(key) : param;
}

/** What went wrong, in words a person understands (the server's own words added where they help). */
export function describeError(err) {
  if (!(err instanceof ApiError)) return t("error.unexpected", { message: String(err?.message || err) });
  const message = err.serverMessage;
  switch (err.status) {
    case 0:
      return t("error.network");
    case 401:
      return t(err.sentKey ? "error.keyRefused" : "error.keyNeeded");
    case 403:
      return t("error.forbidden", { message });
    case 413:
      return t("error.tooLarge");
    case 429:
      return err.retryAfter !== null
        ? t("error.busyRetry", { seconds: err.retryAfter, message })
        : t("error.busy", { message });
    case 503:
      return err.code === "loading" ? t("error.loading") : t("error.unavailable", { message });
    case 400:
    case 422:
      return err.param
        ? t("error.badField", { field: fieldLabel(err.param), message })
        : t("error.badRequest", { message });
    case 404:
      return t("error.notFound", { message });
    default:
      return t("error.other", { status: err.status, message });
  }
}

/** The parsed `data:` payloads of a server-sent-event response, up to `data: [DONE]`. */
export async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += value;
      let end;
      while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
        const block = buffer.slice(0, end);
        buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
        const data = block.split(/\r?\n/).filter((line) => line.startsWith("data:"))
          .map((line) => line.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  } finally {
    reader.releaseLock();
  }
}

/**
 * One streamed chat completion. Calls `onDelta({content, reasoning})` as text arrives and
 * resolves to {content, reasoning, finishReason, usage, firstTokenAt, endedAt} (times in ms,
 * performance.now()). Aborting `signal` closes the connection, which makes the server abort the
 * request and free its KV blocks.
 */
export async function streamChat(body, { signal, onDelta = () => {} } = {}) {
  const response = await apiFetch("v1/chat/completions", {
    method: "POST", signal,
    body: { ...body, stream: true, stream_options: { include_usage: true } },
  });
  const result = { content: "", reasoning: "", finishReason: null, usage: null, firstTokenAt: null, endedAt: null };
  for await (const event of sseEvents(response)) {
    if (event.error) {
      throw new ApiError(500, { message: String(event.error.message || ""), code: event.error.code || null });
    }
    if (event.usage) result.usage = event.usage;
    for (const choice of event.choices || []) {
      const delta = choice.delta || {};
      const reasoning = typeof delta.reasoning_content === "string" ? delta.reasoning_content : "";
      const content = typeof delta.content === "string" ? delta.content : "";
      if ((reasoning || content) && result.firstTokenAt === null) result.firstTokenAt = performance.now();
      result.reasoning += reasoning;
      result.content += content;
      if (choice.finish_reason) result.finishReason = choice.finish_reason;
      if (reasoning || content) onDelta(result);
    }
  }
  result.endedAt = performance.now();
  return result;
}
