// Conversations and settings, kept in this browser's localStorage (per server origin).
//
// A conversation: {id, title, created, updated, messages: [{role: 'user'|'assistant', content,
// reasoning?, stats?, error?, stopped?}]}. stats: {promptTokens, completionTokens, seconds,
// firstTokenSeconds, tokensPerSecond, context, model}.

const CONVERSATIONS = 'ember.conversations';
const SETTINGS = 'ember.settings';
const THEME = 'ember.theme';

export const DEFAULT_SETTINGS = { system: '', temperature: 0.7, top_p: 1, max_tokens: null, extra: '', model: '' };

function read(key, fallback) {
  try {
    const raw = localStorage.getItem(key);
    return raw ? JSON.parse(raw) : fallback;
  } catch (e) {
    return fallback;
  }
}

/** A short title from the first user message. */
export function titleOf(text) {
  const line = text.trim().split('\n')[0].replace(/\s+/g, ' ');
  return line.length > 48 ? `${line.slice(0, 47)}\u2026` : line || 'New chat';
}

export class Store {
  constructor() {
    this.conversations = read(CONVERSATIONS, []);
    if (!Array.isArray(this.conversations)) this.conversations = [];
    this.settings = { ...DEFAULT_SETTINGS, ...read(SETTINGS, {}) };
    this.onError = () => {};
  }

  /** Conversations, most recently used first. */
  list() {
    return [...this.conversations].sort((a, b) => b.updated - a.updated);
  }

  get(id) {
    return this.conversations.find((c) => c.id === id) || null;
  }

  create() {
    const now = Date.now();
    const conv = { id: `c${now.toString(36)}${Math.random().toString(36).slice(2, 8)}`, title: 'New chat',
      created: now, updated: now, messages: [] };
    this.conversations.push(conv);
    return conv;
  }

  remove(id) {
    this.conversations = this.conversations.filter((c) => c.id !== id);
    this.save();
  }

  removeAll() {
    this.conversations = [];
    this.save();
  }

  /** Writes the conversations; a full storage (about 5 MB per origin) is reported, not thrown. */
  save() {
    try {
      localStorage.setItem(CONVERSATIONS, JSON.stringify(this.conversations));
    } catch (e) {
      this.onError(`could not save the conversations (${e.name}): delete some old ones`);
    }
  }

  /** Reads the conversations again (another tab changed them). */
  reload() {
    const got = read(CONVERSATIONS, []);
    this.conversations = Array.isArray(got) ? got : [];
  }

  saveSettings() {
    localStorage.setItem(SETTINGS, JSON.stringify(this.settings));
  }

  get theme() {
    return document.documentElement.dataset.theme === 'dark' ? 'dark' : 'light';
  }

  set theme(value) {
    document.documentElement.dataset.theme = value;
    localStorage.setItem(THEME, value);
  }
}
