// Runs the web chat page's own script (serve/static/index.html) under node against a running server: a minimal
// DOM stands in for the browser (elements by id, created elements, localStorage); fetch is node's own, with the
// page's relative URLs resolved against the server. Then types the messages given and prints what happened.
const fs = require("fs");
const [, , pagePath, base, settingsJson, messagesJson] = process.argv;
const html = fs.readFileSync(pagePath, "utf8");
const script = html.slice(html.indexOf("<script>") + "<script>".length, html.lastIndexOf("</script>"));

class El {
  constructor(id = null, value = "") {
    Object.assign(this, {id, value, textContent: "", innerHTML: "", className: "", disabled: false, children: [],
                         listeners: {}, scrollTop: 0, scrollHeight: 0, parentNode: null, found: {}});
    this.classList = {names: new Set(), add: (c) => this.classList.names.add(c)};
  }
  appendChild(c) { c.parentNode = this; this.children.push(c); return c; }
  insertBefore(c, ref) { c.parentNode = this; this.children.splice(this.children.indexOf(ref), 0, c); return c; }
  querySelector(sel) { return this.found[sel] || (this.found[sel] = Object.assign(new El(), {parentNode: this})); }
  addEventListener(name, fn) { this.listeners[name] = fn; }
  requestSubmit() { this.listeners.submit({preventDefault() {}}); }
}
const values = {temperature: "0.7", top_p: "1", max_tokens: "256", ...JSON.parse(settingsJson)};
const elements = {};
const document = {
  getElementById: (id) => elements[id] || (elements[id] = new El(id, values[id] || "")),
  createElement: () => new El(),
};
const store = {};
const localStorage = {getItem: (k) => (k in store ? store[k] : null), setItem: (k, v) => { store[k] = String(v); },
                      removeItem: (k) => { delete store[k]; }};
const sent = [];
const fetch = (url, options = {}) => {
  if (options.body) sent.push(JSON.parse(options.body));
  return globalThis.fetch(base + url, options);
};
new Function("document", "localStorage", "fetch", script)(document, localStorage, fetch);

const idle = () => new Promise((resolve) => {
  const check = () => (elements.send.disabled ? setTimeout(check, 20) : resolve());
  setTimeout(check, 20);
});
(async () => {
  await new Promise((resolve) => setTimeout(resolve, 300));  // the page's /health request
  for (const text of JSON.parse(messagesJson)) {
    elements.input.value = text;
    elements.form.requestSubmit();
    await idle();
  }
  const texts = (el) => [el.textContent, el.innerHTML, ...el.children.flatMap(texts),
                         ...Object.values(el.found).flatMap(texts)];
  const log = elements.log;
  console.log(JSON.stringify({sent, history: JSON.parse(store["lmforge.history"] || "[]"),
                              model: elements.model.textContent,
                              errors: log.children.filter((c) => c.className.includes("msg")).flatMap(
                                (c) => c.children.filter((e) => e.className === "error").map((e) => e.textContent)),
                              notes: log.children.filter((c) => c.className === "meta").map((c) => c.textContent),
                              failed: log.children.filter((c) => c.classList.names.has("failed")).length}));
})();
