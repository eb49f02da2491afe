// Model output is untrusted: markdown is turned into HTML by marked, then DOMPurify keeps only
// inert markup, and the result is inserted as a DOM fragment (never re-parsed from a string).

import { Marked } from "./vendor/marked.esm.js";

const DOMPurify = window.DOMPurify;
const parser = new Marked({ gfm: true, breaks: false, async: false });
// An image would be a request the page did not choose to make: keep its alt text only.
parser.use({ renderer: { image: ({ text }) => escapeHtml(text || "") } });
const SAFE_URL = /^(?:https?:|mailto:|#|\/(?!\/)|\.{0,2}\/|[^:]*$)/i;

DOMPurify.addHook("afterSanitizeAttributes", (node) => {
  if (node.tagName === "A") {
    const href = node.getAttribute("href") || "";
    if (!SAFE_URL.test(href.trim())) node.removeAttribute("href");
    node.setAttribute("rel", "noopener noreferrer nofollow");
    node.setAttribute("target", "_blank");
  }
});

const PURIFY_OPTIONS = {
  USE_PROFILES: { html: true },
  FORBID_TAGS: ["img", "picture", "source", "video", "audio", "style", "form", "input", "button", "textarea", "select", "iframe", "object", "embed", "svg", "math"],
  FORBID_ATTR: ["style", "srcset"],
  RETURN_DOM_FRAGMENT: true,
};

/** A sanitised DOM fragment for `text` (markdown). */
export function renderMarkdown(text) {
  return DOMPurify.sanitize(parser.parse(text), PURIFY_OPTIONS);
}

function escapeHtml(text) {
  return text.replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}
