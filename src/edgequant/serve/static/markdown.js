// A small Markdown renderer for model output that never parses HTML.
//
// Every piece of text becomes a DOM text node (createTextNode / textContent), and the only
// elements made are the fixed set below, so a reply containing `<img src=x onerror=…>` or
// `<script>` shows as those literal characters. Links are made only for http(s) URLs, with
// rel="noopener noreferrer". It is written for partial input too: while a reply streams, an
// unclosed code fence renders as a code block that runs to the end.
//
// Supported: paragraphs and line breaks, # headings, **bold** / __bold__, *italic* / _italic_,
// `inline code`, ``` / ~~~ fenced code blocks, - * + and 1. lists (nested by indentation),
// > quotes, --- rules, [text](https://…) links and bare https:// URLs.

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([^`\s]*)[^`]*$/;
const HEADING = /^ {0,3}(#{1,6})(?:\s+(.*?))?(?:\s+#+)?\s*$/;
const RULE = /^ {0,3}([-*_])(?:\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}>\s?(.*)$/;
const ITEM = /^(\s*)(?:([-*+])|(\d{1,9})[.)])(?:\s+(.*)|$)/;
const MAX_DEPTH = 8;

// code span | [label](url) | **bold** / __bold__ | *italic* | _italic_ | bare URL
const INLINE = new RegExp([
  "(`+)([^`]|[^`][\\s\\S]*?[^`])\\1(?!`)",
  "\\[([^\\]\\n]+)\\]\\(\\s*(https?:\\/\\/[^\\s()]+)\\s*\\)",
  "(\\*\\*|__)(?=\\S)([\\s\\S]*?\\S)\\5(?!\\*)",
  "\\*(?=[^\\s*])([^*\\n]*?[^\\s*])\\*(?!\\*)",
  "_(?=[^\\s_])([^_\\n]*?[^\\s_])_",
  "(https?:\\/\\/[^\\s<>\"'`]*[^\\s<>\"'`.,;:!?)\\]])",
].join("|"));
const WORD = /[\p{L}\p{N}]/u;

function el(tag, className) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  return node;
}

/** The URL as a string when it is an absolute http(s) URL, else null. */
export function safeUrl(text) {
  try {
    const url = new URL(text);
    return url.protocol === "http:" || url.protocol === "https:" ? url.href : null;
  } catch {
    return null;
  }
}

function link(url, label, depth) {
  const a = el("a");
  a.href = url;
  a.rel = "noopener noreferrer";
  a.target = "_blank";
  inline(label, a, depth + 1, false);
  return a;
}

/** Append the inline content of `text` to `parent` as text nodes and inline elements. */
function inline(text, parent, depth = 0, links = true) {
  if (depth > MAX_DEPTH) {
    parent.append(document.createTextNode(text));
    return;
  }
  let rest = text;
  while (rest) {
    const m = INLINE.exec(rest);
    if (!m) break;
    let node = null;
    if (m[1] !== undefined) {
      let code = m[2];
      if (code.length > 2 && code.startsWith(" ") && code.endsWith(" ")) code = code.slice(1, -1);
      node = el("code");
      node.textContent = code;
    } else if (m[3] !== undefined) {
      const url = links && safeUrl(m[4]);
      node = url ? link(url, m[3], depth) : null;
    } else if (m[5] !== undefined) {
      node = underscoreOk(rest, m) ? el("strong") : null;
      if (node) inline(m[6], node, depth + 1, links);
    } else if (m[7] !== undefined) {
      node = el("em");
      inline(m[7], node, depth + 1, links);
    } else if (m[8] !== undefined) {
      node = underscoreOk(rest, m) ? el("em") : null;
      if (node) inline(m[8], node, depth + 1, links);
    } else {
      const url = links && safeUrl(m[9]);
      node = url ? link(url, m[9], depth) : null;
    }
    if (node) {
      parent.append(document.createTextNode(rest.slice(0, m.index)), node);
      rest = rest.slice(m.index + m[0].length);
    } else {
      // not markup after all (snake_case, a javascript: link): keep one character as text
      parent.append(document.createTextNode(rest.slice(0, m.index + 1)));
      rest = rest.slice(m.index + 1);
    }
  }
  if (rest) parent.append(document.createTextNode(rest));
}

/** `_` and `__` emphasis must not start or end inside a word (snake_case_names). */
function underscoreOk(text, m) {
  if (!m[0].startsWith("_")) return true;
  const before = text[m.index - 1] || " ";
  const after = text[m.index + m[0].length] || " ";
  return !WORD.test(before) && !WORD.test(after);
}

function paragraph(lines, depth) {
  const p = el("p");
  lines.forEach((line, i) => {
    if (i) p.append(el("br"));
    inline(line.trim(), p, depth);
  });
  return p;
}

function fence(lines, i, m) {
  const marker = m[1];
  const close = new RegExp(`^ {0,3}${marker[0] === "`" ? "`" : "~"}{${marker.length},}\\s*$`);
  const body = [];
  let j = i + 1;
  while (j < lines.length && !close.test(lines[j])) body.push(lines[j++]);
  const pre = el("pre");
  const code = el("code");
  if (/^[\w+#.-]{1,32}$/.test(m[2])) {
    code.className = `language-${m[2]}`;
    pre.dataset.lang = m[2];
  }
  code.textContent = body.join("\n");
  pre.append(code);
  return [pre, j + 1];
}

function indentOf(s) {
  return s.length - s.trimStart().length;
}

function list(lines, i, depth) {
  const first = ITEM.exec(lines[i]);
  const ordered = first[3] !== undefined;
  const base = indentOf(first[1]);
  const node = el(ordered ? "ol" : "ul");
  if (ordered && Number(first[3]) !== 1) node.start = Number(first[3]);
  const items = [];
  let j = i;
  let blank = false;
  while (j < lines.length) {
    const line = lines[j];
    const m = ITEM.exec(line);
    if (m && indentOf(m[1]) <= base + 1 && (m[3] !== undefined) === ordered) {
      items.push([m[4] || ""]);
      blank = false;
    } else if (!line.trim()) {
      blank = true;
    } else if (indentOf(line) > base) {
      items[items.length - 1].push(...(blank ? ["", line] : [line]));
      blank = false;
    } else if (!blank && !m && !HEADING.test(line) && !FENCE.test(line) && !QUOTE.test(line)) {
      items[items.length - 1].push(line); // a lazy continuation of the item's paragraph
    } else {
      break;
    }
    j++;
  }
  for (const itemLines of items) {
    const li = el("li");
    const inner = Math.min(...itemLines.slice(1).filter((s) => s.trim()).map(indentOf), 99);
    const body = blocks(itemLines.map((s, k) => (k ? s.slice(Math.min(inner, indentOf(s))) : s)),
      depth + 1);
    if (itemLines.some((s) => !s.trim())) {
      li.append(body);
    } else { // a tight item: its paragraphs lose their margins
      for (const child of Array.from(body.childNodes)) {
        if (child.nodeName === "P") li.append(...child.childNodes);
        else li.append(child);
      }
    }
    node.append(li);
  }
  while (j > i && !lines[j - 1].trim()) j--; // leave trailing blank lines to the caller
  return [node, j];
}

function blocks(lines, depth) {
  const out = document.createDocumentFragment();
  if (depth > MAX_DEPTH) {
    out.append(paragraph(lines, depth));
    return out;
  }
  let para = [];
  const flush = () => {
    if (para.length) out.append(paragraph(para, depth));
    para = [];
  };
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (!line.trim()) {
      flush();
      i++;
    } else if ((m = FENCE.exec(line))) {
      flush();
      let pre;
      [pre, i] = fence(lines, i, m);
      out.append(pre);
    } else if ((m = HEADING.exec(line))) {
      flush();
      const h = el(`h${Math.min(6, m[1].length + 2)}`); // the page's own h1 and h2 come first
      inline(m[2] || "", h, depth);
      out.append(h);
      i++;
    } else if (RULE.test(line)) {
      flush();
      out.append(el("hr"));
      i++;
    } else if (QUOTE.test(line)) {
      flush();
      const quoted = [];
      while (i < lines.length && (m = QUOTE.exec(lines[i]))) {
        quoted.push(m[1]);
        i++;
      }
      const q = el("blockquote");
      q.append(blocks(quoted, depth + 1));
      out.append(q);
    } else if (ITEM.test(line) && (para.length === 0 || ITEM.exec(line)[4])) {
      flush();
      let node;
      [node, i] = list(lines, i, depth);
      out.append(node);
    } else {
      para.push(line);
      i++;
    }
  }
  flush();
  return out;
}

/** `text` as Markdown, as a DocumentFragment built without ever parsing HTML. */
export function markdownToFragment(text) {
  return blocks(String(text).replace(/\r\n?/g, "\n").split("\n"), 0);
}

/** Replace the content of `target` with `text` rendered as Markdown. */
export function renderMarkdown(text, target) {
  target.replaceChildren(markdownToFragment(text));
}
