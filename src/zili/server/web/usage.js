// The usage view: the governance ledger's /admin/v1/usage, read with the operator's admin key
// (kept in sessionStorage only, like the API key).

import { ApiError, apiFetch, describeError } from "./api.js";
import { t } from "./i18n.js";
import { valueTable } from "./extract.js";

const ADMIN_KEY = "zili.adminKey";
const $ = (id) => document.getElementById(id);
let lastRows = null;

function setStatus(text, isError = false) {
  $("usage-status").textContent = text;
  $("usage-status").classList.toggle("error", isError);
}

/** The rows of a usage answer, whichever list field the ledger puts them in. */
export function usageRows(body) {
  if (Array.isArray(body)) return body;
  for (const field of ["data", "rows", "usage", "items"]) {
    if (Array.isArray(body?.[field])) return body[field];
  }
  return body && typeof body === "object" ? [body] : [];
}

async function loadUsage() {
  const key = $("admin-key").value.trim();
  if (key) sessionStorage.setItem(ADMIN_KEY, key);
  const query = new URLSearchParams({ by: $("usage-by").value });
  if ($("usage-since").value) query.set("since", $("usage-since").value);
  setStatus(t("usage.loading"));
  $("usage-table").replaceChildren();
  lastRows = null;
  try {
    const body = await (await apiFetch(`admin/v1/usage?${query}`, { key })).json();
    lastRows = usageRows(body);
    render();
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) setStatus(t("usage.missing"), true);
    else if (err instanceof ApiError && err.status === 401) setStatus(t("usage.denied"), true);
    else if (err instanceof ApiError && err.status === 403) setStatus(t("usage.forbidden", { message: err.serverMessage }), true);
    else setStatus(describeError(err), true);
  }
}

function render() {
  if (lastRows === null) return;
  setStatus(lastRows.length ? "" : t("usage.empty"));
  $("usage-table").replaceChildren(valueTable(lastRows));
}

export function refreshUsage() {
  render();
}

export function initUsage() {
  $("admin-key").value = sessionStorage.getItem(ADMIN_KEY) || "";
  $("usage-load").addEventListener("click", loadUsage);
}
