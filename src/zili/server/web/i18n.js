// Translation tables and their application to the page. Every string a person sees comes from
// i18n/<lang>.json; elements name their string with data-i18n (text), data-i18n-placeholder,
// data-i18n-title or data-i18n-aria-label.

export const LANGUAGES = ["en", "zh-CN"];
const STORAGE_KEY = "zili.lang";

let tables = {};
let current = "en";

/** The language to start in: the one chosen before, else the browser's first supported one. */
export function preferredLanguage() {
  const saved = localStorage.getItem(STORAGE_KEY);
  if (LANGUAGES.includes(saved)) return saved;
  for (const tag of navigator.languages || [navigator.language || "en"]) {
    const lower = String(tag).toLowerCase();
    if (lower.startsWith("zh")) return "zh-CN";
    if (lower.startsWith("en")) return "en";
  }
  return "en";
}

/** Fetches every table (they are small: one request each, same origin). */
export async function loadTables() {
  const entries = await Promise.all(LANGUAGES.map(async (lang) => {
    const response = await fetch(`ui/i18n/${lang}.json`, { cache: "no-cache" });
    return [lang, await response.json()];
  }));
  tables = Object.fromEntries(entries);
}

export function language() {
  return current;
}

/** The text for `key` in the current language (English when missing), with {name} filled from `values`. */
export function t(key, values = {}) {
  const text = tables[current]?.[key] ?? tables.en?.[key] ?? key;
  return text.replace(/\{(\w+)\}/g, (whole, name) => (name in values ? String(values[name]) : whole));
}

/** Whether the current table has `key` (so callers can fall back to a generic message). */
export function has(key) {
  return key in (tables[current] || {});
}

export function setLanguage(lang, root = document) {
  current = LANGUAGES.includes(lang) ? lang : "en";
  localStorage.setItem(STORAGE_KEY, current);
  document.documentElement.lang = current;
  document.title = t("app.title");
  translate(root);
}

/** Applies the current table to `root` and everything under it. */
export function translate(root) {
  for (const el of root.querySelectorAll("[data-i18n]")) el.textContent = t(el.dataset.i18n);
  for (const el of root.querySelectorAll("[data-i18n-placeholder]")) el.placeholder = t(el.dataset.i18nPlaceholder);
  for (const el of root.querySelectorAll("[data-i18n-title]")) el.title = t(el.dataset.i18nTitle);
  for (const el of root.querySelectorAll("[data-i18n-aria-label]")) {
    el.setAttribute("aria-label", t(el.dataset.i18nAriaLabel));
  }
}

/** Each language's own name, for the switch. */
export function languageNames() {
  return LANGUAGES.map((lang) => [lang, tables[lang]?.["language.name"] ?? lang]);
}
