// A small code highlighter: one regular expression per language family finds comments, strings,
// numbers, keywords, literals and called functions; everything is returned as text nodes inside
// <span class="tok-..."> elements (no HTML strings), so code is never interpreted by the browser.

const C_LIKE = {
  line: '//', block: ['/\\*', '\\*/'], strings: ['"', "'", '`'],
  keywords: 'if else for while do switch case default break continue return function const let var new ' +
    'class extends super this import export from as async await try catch finally throw typeof instanceof ' +
    'in of void delete yield static public private protected interface enum type implements package ' +
    'struct union typedef sizeof template typename namespace using virtual override inline constexpr ' +
    'unsigned signed int long short char float double bool auto void final abstract synchronized ' +
    'throws go defer func chan map range select fallthrough goto fn let mut impl trait pub use mod crate ' +
    'self Self match loop where move ref dyn unsafe extern',
  literals: 'true false null undefined nullptr NULL nil None NaN Infinity',
};

const LANGS = {
  c: C_LIKE,
  python: {
    line: '#', strings: ['"""', "'''", '"', "'"],
    keywords: 'and as assert async await break class continue def del elif else except finally for from ' +
      'global if import in is lambda nonlocal not or pass raise return try while with yield match case print',
    literals: 'True False None self cls',
  },
  shell: {
    line: '#', strings: ['"', "'"],
    keywords: 'if then else elif fi for while until do done case esac function in return exit export local ' +
      'readonly set unset source echo cd sudo apt-get pip python git',
    literals: 'true false',
  },
  sql: {
    line: '--', block: ['/\\*', '\\*/'], strings: ["'", '"'], caseless: true,
    keywords: 'select from where and or not insert into values update set delete create table drop alter ' +
      'index join left right inner outer on group by order having limit offset as distinct union all case ' +
      'when then else end primary key foreign references default is in like between exists',
    literals: 'null true false',
  },
  json: { strings: ['"'], keywords: '', literals: 'true false null' },
  yaml: { line: '#', strings: ['"', "'"], keywords: '', literals: 'true false null yes no on off' },
  lua: {
    line: '--', strings: ['"', "'"],
    keywords: 'and break do else elseif end for function goto if in local not or repeat return then until while',
    literals: 'true false nil',
  },
  markup: { markup: true },
};

const ALIASES = {
  js: 'c', javascript: 'c', ts: 'c', typescript: 'c', jsx: 'c', tsx: 'c', java: 'c', kotlin: 'c',
  cpp: 'c', 'c++': 'c', cc: 'c', h: 'c', hpp: 'c', cuda: 'c', cs: 'c', csharp: 'c', go: 'c', golang: 'c',
  rust: 'c', rs: 'c', swift: 'c', scala: 'c', php: 'c', dart: 'c', zig: 'c',
  py: 'python', python3: 'python', ruby: 'python', rb: 'python', toml: 'yaml', ini: 'yaml', yml: 'yaml',
  sh: 'shell', bash: 'shell', zsh: 'shell', console: 'shell', shell: 'shell', dockerfile: 'shell',
  make: 'shell', makefile: 'shell', cmake: 'shell', powershell: 'shell', ps1: 'shell',
  html: 'markup', xml: 'markup', svg: 'markup', vue: 'markup',
};

const escape = (s) => s.replace(/[.*+?^${}()|[\]\\]/g, '\\$&');
const cache = new Map();

function pattern(name) {
  if (cache.has(name)) return cache.get(name);
  const L = LANGS[name];
  const parts = [];
  if (L.markup) {
    parts.push('(?<com><!--[\\s\\S]*?(?:-->|$))', '(?<tag></?[A-Za-z][\\w:-]*|/?>)',
      '(?<str>"[^"]*"|\'[^\']*\')', '(?<fn>\\b[\\w:-]+(?==))');
  } else {
    const com = [];
    if (L.line) com.push(`${escape(L.line)}.*`);
    if (L.block) com.push(`${L.block[0]}[\\s\\S]*?(?:${L.block[1]}|$)`);
    if (com.length) parts.push(`(?<com>${com.join('|')})`);
    const str = L.strings.map((q) => q.length === 3
      ? `${escape(q)}[\\s\\S]*?(?:${escape(q)}|$)`
      : `${escape(q)}(?:\\\\[\\s\\S]|(?!${escape(q)})[^\\\\${q === '`' ? '' : '\\n'}])*(?:${escape(q)}|$)`);
    parts.push(`(?<str>${str.join('|')})`);
    parts.push('(?<num>\\b(?:0[xX][\\da-fA-F_]+|0[bB][01_]+|\\d[\\d_]*(?:\\.\\d[\\d_]*)?(?:[eE][+-]?\\d+)?)[a-zA-Z]*\\b)');
    if (L.keywords) parts.push(`(?<kw>\\b(?:${L.keywords.split(' ').map(escape).join('|')})\\b)`);
    if (L.literals) parts.push(`(?<lit>\\b(?:${L.literals.split(' ').map(escape).join('|')})\\b)`);
    parts.push('(?<fn>\\b[A-Za-z_][\\w]*(?=\\s*\\())');
  }
  const re = new RegExp(parts.join('|'), L.caseless ? 'gi' : 'g');
  cache.set(name, re);
  return re;
}

/** The language family used for `lang` (a fence's info word), or null (plain text). */
export function languageOf(lang) {
  if (!lang) return null;
  const l = lang.toLowerCase();
  return LANGS[l] ? l : ALIASES[l] || null;
}

/** Highlights `code` as `lang`; returns a DocumentFragment of text nodes and token spans. */
export function highlight(code, lang) {
  const frag = document.createDocumentFragment();
  const name = languageOf(lang);
  if (!name) {
    frag.append(code);
    return frag;
  }
  let last = 0;
  for (const m of code.matchAll(pattern(name))) {
    if (!m[0]) continue;
    if (m.index > last) frag.append(code.slice(last, m.index));
    const kind = Object.keys(m.groups).find((k) => m.groups[k] !== undefined);
    const span = document.createElement('span');
    span.className = `tok-${kind}`;
    span.textContent = m[0];
    frag.append(span);
    last = m.index + m[0].length;
  }
  if (last < code.length) frag.append(code.slice(last));
  return frag;
}
