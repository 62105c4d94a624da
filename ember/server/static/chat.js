// The chat page: conversations in the sidebar, the current one in the middle, settings on the right.
// One answer streams at a time; Stop aborts its request, which makes the server cancel the sequence.

import { Api, ApiError } from './api.js';
import { Store, titleOf } from './store.js';
import { MessageView, splitAnswer } from './view.js';

const $ = (id) => document.getElementById(id);
const api = new Api();
const store = new Store();

let models = [];       // GET /v1/models: [{id, max_model_len}]
let current = null;    // the conversation shown
let views = [];        // MessageView per message of `current`
let running = null;    // the answer streaming now: {conv, msg, controller}
let frame = 0;         // a pending requestAnimationFrame for the streaming answer

// ------------------------------------------------------------------ banner, key

function showBanner(text) {
  $('banner').textContent = text;
  $('banner').hidden = !text;
}
store.onError = showBanner;

/** Opens the API-key dialog, with `error` under the field when a key was refused. */
function askKey(error) {
  const dialog = $('key-dialog');
  $('key-error').textContent = error || '';
  $('key-error').hidden = !error;
  $('key-input').value = '';
  if (!dialog.open) dialog.showModal();
  $('key-input').focus();
}

$('key-form').addEventListener('submit', async (event) => {
  event.preventDefault();
  const key = $('key-input').value.trim();
  if (!key) return;
  api.setKey(key);
  $('key-submit').disabled = true;
  try {
    await connect(true);
  } finally {
    $('key-submit').disabled = false;
  }
});

// ------------------------------------------------------------------ models

function modelInfo() {
  const m = models.find((x) => x.id === $('model').value);
  $('model-info').textContent = m && m.max_model_len ? `context ${m.max_model_len} tokens` : '';
}

/** Loads /v1/models; a 401 opens the key dialog (with an error when the key was just entered). */
async function connect(fromDialog = false) {
  try {
    models = await api.models();
  } catch (e) {
    if (e instanceof ApiError && e.unauthorized) {
      askKey(fromDialog || api.key ? 'The server refused this key (401 Unauthorized): check the value given '
        + 'to ember serve --api-key.' : '');
      showBanner('This server needs an API key.');
    } else {
      showBanner(`Cannot list the models: ${e.message}`);
    }
    return false;
  }
  if ($('key-dialog').open) $('key-dialog').close();
  showBanner('');
  const select = $('model');
  select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
  if (models.some((m) => m.id === store.settings.model)) select.value = store.settings.model;
  modelInfo();
  return true;
}

$('model').addEventListener('change', () => {
  store.settings.model = $('model').value;
  store.saveSettings();
  modelInfo();
});

// ------------------------------------------------------------------ conversations

function renderSidebar() {
  const items = store.list().map((conv) => {
    const row = document.createElement('div');
    row.className = `conv${current && conv.id === current.id ? ' active' : ''}`;
    row.dataset.id = conv.id;
    const title = document.createElement('span');
    title.className = 'title';
    title.textContent = conv.title;
    title.title = conv.title;
    const del = document.createElement('button');
    del.type = 'button';
    del.className = 'quiet delete';
    del.title = 'Delete this conversation';
    del.textContent = '\u00d7';
    del.addEventListener('click', (event) => {
      event.stopPropagation();
      if (running && running.conv === conv) return;
      if (!confirm(`Delete "${conv.title}"?`)) return;
      store.remove(conv.id);
      if (current && current.id === conv.id) show(null);
      renderSidebar();
    });
    row.append(title, del);
    row.addEventListener('click', () => show(conv));
    return row;
  });
  $('conversations').replaceChildren(...items);
}

/** Shows `conv` (null: an empty new chat). */
function show(conv) {
  current = conv;
  const box = $('messages');
  box.replaceChildren($('empty'));
  $('empty').hidden = Boolean(conv && conv.messages.length);
  views = [];
  const busy = Boolean(running);
  (conv ? conv.messages : []).forEach((msg, i) => {
    const view = new MessageView(msg, {
      busy, last: i === conv.messages.length - 1,
      onEdit: (text) => resend(conv, i, text),
      onRegenerate: () => regenerate(conv),
    });
    if (running && running.msg === msg) view.update(true);
    views.push(view);
    box.append(view.root);
  });
  box.scrollTop = box.scrollHeight;
  renderSidebar();
  $('input').focus();
}

function viewOf(msg) {
  return views.find((v) => v.msg === msg) || null;
}

// ------------------------------------------------------------------ generation

/** The request for the next answer of `conv`: settings, system prompt and the history so far. */
function requestBody(conv) {
  const s = store.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: 'system', content: s.system });
  for (const m of conv.messages) {
    if (m.role === 'user') messages.push({ role: 'user', content: m.content });
    else if (m.content) messages.push({ role: 'assistant', content: splitAnswer(m).answer });
  }
  const body = { model: $('model').value || s.model, messages };
  if (s.temperature !== null && s.temperature !== '') body.temperature = Number(s.temperature);
  if (s.top_p !== null && s.top_p !== '') body.top_p = Number(s.top_p);
  if (s.max_tokens) body.max_tokens = Number(s.max_tokens);
  return { ...body, ...parseExtra(s.extra) };
}

function parseExtra(text) {
  if (!text || !text.trim()) return {};
  const value = JSON.parse(text);
  if (!value || typeof value !== 'object' || Array.isArray(value)) throw new Error('must be a JSON object');
  return value;
}

function setBusy(busy) {
  $('send').hidden = busy;
  $('stop').hidden = !busy;
  for (const b of document.querySelectorAll('.msg .edit-button, .msg .regenerate')) b.disabled = busy;
}

function nearBottom(box) {
  return box.scrollHeight - box.scrollTop - box.clientHeight < 80;
}

function repaint(msg) {
  if (frame) return;
  frame = requestAnimationFrame(() => {
    frame = 0;
    const view = viewOf(msg);
    if (!view) return;
    const box = $('messages');
    const stick = nearBottom(box);
    view.update(true);
    if (stick) box.scrollTop = box.scrollHeight;
  });
}

/** True when the settings make a valid request; else says what is wrong (nothing is sent or changed). */
function settingsValid() {
  try {
    parseExtra(store.settings.extra);
  } catch (e) {
    showBanner(`Settings: extra request fields: ${e.message}`);
    return false;
  }
  return true;
}

/** Streams a new answer at the end of `conv` (its last message is the user's). */
async function generate(conv) {
  const body = requestBody(conv);
  showBanner('');
  const msg = { role: 'assistant', content: '', reasoning: '' };
  conv.messages.push(msg);
  conv.updated = Date.now();
  running = { conv, msg, controller: new AbortController() };
  setBusy(true);
  if (current === conv) show(conv);
  store.save();
  const model = models.find((m) => m.id === body.model);
  const t0 = performance.now();
  let first = null;
  let lastAt = null;
  let usage = null;
  let saved = t0;
  try {
    for await (const chunk of api.streamChat(body, running.controller.signal)) {
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta || {};
        const piece = (delta.reasoning_content || '') + (delta.content || '');
        if (delta.reasoning_content) msg.reasoning += delta.reasoning_content;
        if (delta.content) msg.content += delta.content;
        if (piece) {
          lastAt = performance.now();
          if (first === null) first = lastAt;
        }
        if (choice.finish_reason) msg.finish = choice.finish_reason;
      }
      repaint(msg);
      if (performance.now() - saved > 1000) {  // keep a partial answer if the tab is closed
        saved = performance.now();
        store.save();
      }
    }
  } catch (e) {
    if (e.name === 'AbortError') {
      msg.stopped = true;
    } else {
      msg.error = e.message;
      if (e instanceof ApiError && e.unauthorized) askKey(e.message);
    }
  }
  const end = performance.now();
  msg.stats = {
    model: body.model,
    seconds: (end - t0) / 1000,
    firstTokenSeconds: first === null ? null : (first - t0) / 1000,
    context: model ? model.max_model_len : null,
  };
  if (usage) {
    msg.stats.promptTokens = usage.prompt_tokens;
    msg.stats.completionTokens = usage.completion_tokens;
    // decoding speed: tokens after the first over the time they took (the first one includes the prompt)
    if (usage.completion_tokens > 1 && lastAt > first) {
      msg.stats.tokensPerSecond = (usage.completion_tokens - 1) / ((lastAt - first) / 1000);
    }
  }
  cancelAnimationFrame(frame);
  frame = 0;
  running = null;
  conv.updated = Date.now();
  store.save();
  setBusy(false);
  if (current === conv) show(conv);
  else renderSidebar();
}

function send(text) {
  if (running || !text.trim()) return;
  if (!settingsValid()) return;
  if (!current) current = store.create();
  const conv = current;
  conv.messages.push({ role: 'user', content: text });
  if (conv.messages.length === 1) conv.title = titleOf(text);
  $('input').value = '';
  generate(conv);
}

function regenerate(conv) {
  if (running) return;
  if (!settingsValid()) return;
  while (conv.messages.length && conv.messages.at(-1).role === 'assistant') conv.messages.pop();
  if (conv.messages.length) generate(conv);
}

function resend(conv, index, text) {
  if (running) return;
  if (!settingsValid()) return;
  conv.messages = conv.messages.slice(0, index);
  conv.messages.push({ role: 'user', content: text });
  if (index === 0) conv.title = titleOf(text);
  generate(conv);
}

$('composer').addEventListener('submit', (event) => {
  event.preventDefault();
  send($('input').value);
});
$('input').addEventListener('keydown', (event) => {
  if (event.key === 'Enter' && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send($('input').value);
  }
});
$('stop').addEventListener('click', () => {
  if (running) running.controller.abort();
});
$('new-chat').addEventListener('click', () => show(null));
$('delete-all').addEventListener('click', () => {
  if (running || !store.conversations.length || !confirm('Delete every conversation kept in this browser?')) return;
  store.removeAll();
  show(null);
});

// ------------------------------------------------------------------ settings, theme, layout

const NUMBER_FIELDS = ['temperature', 'top_p', 'max_tokens'];

function loadSettings() {
  const s = store.settings;
  $('system').value = s.system;
  for (const f of NUMBER_FIELDS) $(f).value = s[f] ?? '';
  $('extra').value = s.extra;
}

function saveSettings() {
  const s = store.settings;
  s.system = $('system').value;
  for (const f of NUMBER_FIELDS) s[f] = $(f).value === '' ? null : Number($(f).value);
  s.extra = $('extra').value;
  let problem = '';
  try {
    parseExtra(s.extra);
  } catch (e) {
    problem = `Extra request fields: ${e.message}`;
  }
  $('settings-error').textContent = problem;
  $('settings-error').hidden = !problem;
  if (!problem && $('banner').textContent.startsWith('Settings:')) showBanner('');
  store.saveSettings();
}

for (const id of ['system', 'extra', ...NUMBER_FIELDS]) $(id).addEventListener('input', saveSettings);
$('open-settings').addEventListener('click', () => { $('settings').hidden = !$('settings').hidden; });
$('close-settings').addEventListener('click', () => { $('settings').hidden = true; });

function showTheme() {
  $('theme').textContent = store.theme === 'dark' ? 'Light' : 'Dark';
}
$('theme').addEventListener('click', () => {
  store.theme = store.theme === 'dark' ? 'light' : 'dark';
  showTheme();
});

$('toggle-sidebar').addEventListener('click', () => {
  const narrow = matchMedia('(max-width: 760px)').matches;
  $('app').classList.toggle(narrow ? 'show-sidebar' : 'no-sidebar');
});

// Another tab changed the conversations: show its version unless an answer is streaming here.
window.addEventListener('storage', (event) => {
  if (event.key !== 'ember.conversations' || running) return;
  store.reload();
  show(current && store.get(current.id));
});

loadSettings();
showTheme();
show(store.list()[0] || null);
connect();
