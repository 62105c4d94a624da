// A small Markdown renderer for model answers: builds DOM nodes (never HTML strings), so any HTML in
// the text is shown as text and cannot run. Covers what chat models write: headings, paragraphs,
// fenced code (highlighted), inline code, bold/italic/strikethrough, links, lists (nested), block
// quotes, tables and rules. An unclosed code fence (an answer still streaming) renders as code so far.

import { highlight } from './highlight.js';

const FENCE = /^ {0,3}(`{3,}|~{3,})\s*([\w+#.-]*)[^\n]*$/;
const HEADING = /^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$/;
const RULE = /^ {0,3}([-*_])(\s*\1){2,}\s*$/;
const QUOTE = /^ {0,3}> ?(.*)$/;
const ITEM = /^( *)([-*+]|\d{1,9}[.)])\s+(.*)$/;
const TABLE_SEP = /^\s*\|?\s*:?-+:?\s*(\|\s*:?-+:?\s*)*\|?\s*$/;
const SAFE_URL = /^(https?:|mailto:)/i;

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

/** Copies `text` to the clipboard; falls back to a hidden textarea where the Clipboard API is absent
 * (pages served over plain http to another machine are not a secure context). */
export async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el('textarea');
  area.value = text;
  area.setAttribute('readonly', '');
  area.className = 'offscreen';
  document.body.append(area);
  area.select();
  document.execCommand('copy');
  area.remove();
}

/** A copy button that says "Copied" for a moment after a click. */
export function copyButton(getText, label = 'Copy') {
  const b = el('button', 'copy', label);
  b.type = 'button';
  b.addEventListener('click', async () => {
    try {
      await copyText(getText());
      b.textContent = 'Copied';
    } catch (e) {
      b.textContent = 'Copy failed';
    }
    setTimeout(() => { b.textContent = label; }, 1200);
  });
  return b;
}

function codeBlock(code, lang) {
  const box = el('div', 'codeblock');
  const head = el('div', 'code-head');
  head.append(el('span', 'lang', lang || 'text'), copyButton(() => code));
  const pre = el('pre');
  const c = el('code');
  if (lang) c.dataset.lang = lang;
  c.append(highlight(code, lang));
  pre.append(c);
  box.append(head, pre);
  return box;
}

// ------------------------------------------------------------------ inline

// One pattern for every inline construct; the first (leftmost) match wins, the text before it is plain.
const INLINE = new RegExp([
  /(`+)([^`]|[^`][\s\S]*?[^`])\1(?!`)/.source,                   // 1,2 code span
  /\*\*(?=\S)([\s\S]*?\S)\*\*/.source,                          // 3 bold
  /__(?=\S)([\s\S]*?\S)__(?!\w)/.source,                        // 4 bold
  /\*(?=[^\s*])([\s\S]*?[^\s*])\*/.source,                      // 5 italic
  /(?<![\w\\])_(?=[^\s_])([\s\S]*?[^\s_])_(?!\w)/.source,       // 6 italic
  /~~(?=\S)([\s\S]*?\S)~~/.source,                              // 7 strikethrough
  /(!?)\[([^\]\n]*)\]\(\s*<?((?:[^()\s<>]|\([^()\s]*\))*)>?(?:\s+"[^"]*")?\s*\)/.source,  // 8,9,10 link, image
  /<((?:https?:\/\/|mailto:)[^>\s]+)>/.source,                  // 11 autolink
  /(https?:\/\/[^\s<>]*[^\s<>.,:;"')\]*_~])/.source,            // 12 bare URL
  /\\([\\`*_{}[\]()#+\-.!~|>])/.source,                         // 13 escaped character
  /( {2,}|\\)?\n/.source,                                       // 14 line break
].join('|'), 'g');

function link(href, children) {
  if (!SAFE_URL.test(href)) {
    const span = el('span');
    span.append(...children);
    return span;
  }
  const a = el('a');
  a.href = href;
  a.target = '_blank';
  a.rel = 'noopener noreferrer';
  a.append(...children);
  return a;
}

/** Inline Markdown of `text` as a list of nodes. */
export function inline(text) {
  const out = [];
  let last = 0;
  INLINE.lastIndex = 0;
  const matches = [...text.matchAll(INLINE)];
  for (const m of matches) {
    if (m.index < last) continue;
    if (m.index > last) out.push(document.createTextNode(text.slice(last, m.index)));
    last = m.index + m[0].length;
    if (m[2] !== undefined) {
      const s = m[2];
      out.push(el('code', null, s.length > 2 && s[0] === ' ' && s.at(-1) === ' ' ? s.slice(1, -1) : s));
    } else if (m[3] !== undefined || m[4] !== undefined) {
      const b = el('strong');
      b.append(...inline(m[3] ?? m[4]));
      out.push(b);
    } else if (m[5] !== undefined || m[6] !== undefined) {
      const i = el('em');
      i.append(...inline(m[5] ?? m[6]));
      out.push(i);
    } else if (m[7] !== undefined) {
      const s = el('del');
      s.append(...inline(m[7]));
      out.push(s);
    } else if (m[9] !== undefined) {
      // Images are shown as links: loading them would reach other machines (and the CSP forbids it).
      const label = m[8] ? [document.createTextNode(`[image: ${m[9] || m[10]}]`)] : inline(m[9]);
      out.push(link(m[10], label.length ? label : [document.createTextNode(m[10])]));
    } else if (m[11] !== undefined || m[12] !== undefined) {
      const url = m[11] ?? m[12];
      out.push(link(url, [document.createTextNode(url)]));
    } else if (m[13] !== undefined) {
      out.push(document.createTextNode(m[13]));
    } else {
      out.push(el('br'));
    }
  }
  if (last < text.length) out.push(document.createTextNode(text.slice(last)));
  return out;
}

// ------------------------------------------------------------------ blocks

function splitRow(line) {
  let s = line.trim();
  if (s.startsWith('|')) s = s.slice(1);
  if (s.endsWith('|') && !s.endsWith('\\|')) s = s.slice(0, -1);
  return s.split(/(?<!\\)\|/).map((c) => c.trim().replace(/\\\|/g, '|'));
}

function table(lines) {
  const t = el('table');
  const aligns = splitRow(lines[1]).map((c) =>
    c.startsWith(':') && c.endsWith(':') ? 'center' : c.endsWith(':') ? 'right' : c.startsWith(':') ? 'left' : '');
  const head = el('thead');
  const hr = el('tr');
  splitRow(lines[0]).forEach((c, i) => {
    const th = el('th');
    if (aligns[i]) th.align = aligns[i];
    th.append(...inline(c));
    hr.append(th);
  });
  head.append(hr);
  const body = el('tbody');
  for (const line of lines.slice(2)) {
    const tr = el('tr');
    splitRow(line).forEach((c, i) => {
      const td = el('td');
      if (aligns[i]) td.align = aligns[i];
      td.append(...inline(c));
      tr.append(td);
    });
    body.append(tr);
  }
  t.append(head, body);
  return t;
}

function startsBlock(line, next) {
  return FENCE.test(line) || HEADING.test(line) || RULE.test(line) || QUOTE.test(line) || ITEM.test(line) ||
    (line.includes('|') && next !== undefined && TABLE_SEP.test(next) && next.includes('-'));
}

function list(lines, i, parent) {
  // Items of one list: lines from `i` on at the first item's indent, with their continuation lines
  // (indented deeper, or blank lines followed by indented text) handed to a nested render.
  const first = lines[i].match(ITEM);
  const indent = first[1].length;
  const ordered = /\d/.test(first[2]);
  const node = el(ordered ? 'ol' : 'ul');
  if (ordered && parseInt(first[2], 10) !== 1) node.start = parseInt(first[2], 10);
  while (i < lines.length) {
    const m = lines[i].match(ITEM);
    if (!m || m[1].length !== indent || /\d/.test(m[2]) !== ordered) break;
    const body = [m[3]];
    const contentIndent = indent + m[2].length + 1;
    i++;
    while (i < lines.length) {
      const line = lines[i];
      const lead = line.match(/^ */)[0].length;
      if (line.trim() === '') {
        const next = lines[i + 1];
        if (next === undefined || next.match(/^ */)[0].length <= indent) break;
        body.push('');
      } else if (lead > indent) {
        body.push(line.slice(Math.min(lead, contentIndent)));
      } else if (!startsBlock(line, lines[i + 1]) && body.at(-1) !== '') {
        body.push(line);  // a lazy continuation of the item's paragraph
      } else {
        break;
      }
      i++;
    }
    const li = el('li');
    const loose = body.includes('');
    const inner = blocks(body);
    if (!loose && inner.childNodes.length && inner.firstChild.tagName === 'P') {
      li.append(...inner.firstChild.childNodes);
      inner.firstChild.remove();
    }
    li.append(inner);
    node.append(li);
    while (i < lines.length && lines[i].trim() === '' && (lines[i + 1] || '').match(ITEM)?.[1].length === indent) i++;
  }
  parent.append(node);
  return i;
}

function blocks(lines) {
  const frag = document.createDocumentFragment();
  let i = 0;
  while (i < lines.length) {
    const line = lines[i];
    let m;
    if (line.trim() === '') {
      i++;
    } else if ((m = line.match(FENCE))) {
      const fence = m[1];
      const code = [];
      i++;
      while (i < lines.length && !(lines[i].trim().startsWith(fence) && lines[i].trim().replace(/[`~]/g, '') === '')) {
        code.push(lines[i]);
        i++;
      }
      i++;  // the closing fence (or past the end while streaming)
      frag.append(codeBlock(code.join('\n'), m[2].toLowerCase()));
    } else if ((m = line.match(HEADING))) {
      const h = el(`h${m[1].length}`);
      h.append(...inline(m[2]));
      frag.append(h);
      i++;
    } else if (RULE.test(line)) {
      frag.append(el('hr'));
      i++;
    } else if (QUOTE.test(line)) {
      const inner = [];
      while (i < lines.length && (m = lines[i].match(QUOTE))) {
        inner.push(m[1]);
        i++;
      }
      const q = el('blockquote');
      q.append(blocks(inner));
      frag.append(q);
    } else if (ITEM.test(line)) {
      i = list(lines, i, frag);
    } else if (line.includes('|') && i + 1 < lines.length && TABLE_SEP.test(lines[i + 1]) && lines[i + 1].includes('-')) {
      const rows = [line, lines[i + 1]];
      i += 2;
      while (i < lines.length && lines[i].includes('|') && lines[i].trim() !== '') {
        rows.push(lines[i]);
        i++;
      }
      frag.append(table(rows));
    } else {
      const para = [line];
      i++;
      while (i < lines.length && lines[i].trim() !== '' && !startsBlock(lines[i], lines[i + 1])) {
        para.push(lines[i]);
        i++;
      }
      const p = el('p');
      p.append(...inline(para.map((l) => l.replace(/^ {1,3}/, '')).join('\n')));
      frag.append(p);
    }
  }
  return frag;
}

/** Renders Markdown `text` into a DocumentFragment (safe: text nodes and known elements only). */
export function renderMarkdown(text) {
  return blocks(text.replace(/\r\n?/g, '\n').replace(/\t/g, '    ').split('\n'));
}
