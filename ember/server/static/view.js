// One message on the page: its text (Markdown for answers, plain for the user's), the collapsible
// reasoning, the per-answer figures and the buttons (copy, edit and resend, regenerate).

import { copyButton, renderMarkdown } from './markdown.js';

function el(tag, cls, text) {
  const e = document.createElement(tag);
  if (cls) e.className = cls;
  if (text !== undefined) e.textContent = text;
  return e;
}

function button(label, title, onClick) {
  const b = el('button', null, label);
  b.type = 'button';
  b.title = title;
  b.addEventListener('click', onClick);
  return b;
}

/** An answer's reasoning and its answer proper: `reasoning` (from delta.reasoning_content) plus a
 * leading <think>...</think> block in the content, for servers and templates that leave it there. */
export function splitAnswer(msg) {
  let reasoning = msg.reasoning || '';
  let answer = msg.content || '';
  const m = answer.match(/^\s*<think>([\s\S]*?)(?:<\/think>\s*|$)/);
  if (m) {
    reasoning = reasoning ? `${reasoning}\n${m[1]}` : m[1];
    answer = answer.slice(m[0].length);
  }
  return { reasoning: reasoning.trim(), answer };
}

/** The one-line figures of a finished answer: tokens, tokens/s, first-token time, context use. */
export function statsText(msg) {
  const s = msg.stats;
  if (!s) return '';
  const parts = [];
  if (s.completionTokens != null) parts.push(`${s.completionTokens} tokens`);
  if (s.tokensPerSecond != null) parts.push(`${s.tokensPerSecond.toFixed(1)} tok/s`);
  if (s.firstTokenSeconds != null) parts.push(`first token ${s.firstTokenSeconds.toFixed(2)} s`);
  if (s.seconds != null && s.completionTokens == null) parts.push(`${s.seconds.toFixed(1)} s`);
  if (s.promptTokens != null && s.completionTokens != null) {
    const used = s.promptTokens + s.completionTokens;
    parts.push(s.context ? `context ${used}/${s.context} (${(100 * used / s.context).toFixed(1)}%)`
      : `context ${used} tokens`);
  }
  return parts.join(' \u00b7 ');
}

export class MessageView {
  /**
   * @param msg the stored message (rendered from, never changed here)
   * @param actions {busy, last, onEdit(text), onRegenerate()}: what the buttons may do
   */
  constructor(msg, actions) {
    this.msg = msg;
    this.actions = actions;
    this.root = el('div', `msg ${msg.role}`);
    this.root.append(el('div', 'who', msg.role === 'user' ? 'You' : (msg.stats && msg.stats.model) || 'Assistant'));
    this.reasoning = null;
    this.body = el('div', msg.role === 'user' ? 'body' : 'body md');
    this.error = el('div', 'error');
    this.tools = el('div', 'tools');
    this.root.append(this.body, this.error, this.tools);
    this.update();
  }

  /** Re-renders text, reasoning, error and buttons from the message (called as tokens stream in). */
  update(streaming = false) {
    const msg = this.msg;
    this.root.classList.toggle('streaming', streaming);
    if (msg.role === 'user') {
      this.body.textContent = msg.content;
    } else {
      const { reasoning, answer } = splitAnswer(msg);
      this.updateReasoning(reasoning, streaming && !answer);
      this.body.replaceChildren(renderMarkdown(answer));
    }
    this.error.hidden = !msg.error;
    this.error.textContent = msg.error || '';
    if (!streaming) this.updateTools();
  }

  updateReasoning(text, thinking) {
    if (!text) {
      if (this.reasoning) this.reasoning.remove();
      this.reasoning = null;
      return;
    }
    if (!this.reasoning) {
      this.reasoning = el('details', 'reasoning');
      this.reasoning.append(el('summary'), el('div', 'reasoning-body'));
      this.root.insertBefore(this.reasoning, this.body);
    }
    const words = text.split(/\s+/).filter(Boolean).length;
    this.reasoning.firstChild.textContent = thinking ? `Thinking\u2026 (${words} words)` : `Reasoning (${words} words)`;
    this.reasoning.lastChild.textContent = text;
  }

  updateTools() {
    const { msg, actions } = this;
    const tools = [];
    tools.push(copyButton(() => (msg.role === 'user' ? msg.content : splitAnswer(msg).answer)));
    if (msg.role === 'user') {
      const edit = button('Edit', 'Edit this message and send it again (later messages are replaced)',
        () => this.startEdit());
      edit.classList.add('edit-button');
      edit.disabled = actions.busy;
      tools.push(edit);
    } else {
      if (actions.last) {
        const regen = button('Regenerate', 'Answer this again', () => actions.onRegenerate());
        regen.classList.add('regenerate');
        regen.disabled = actions.busy;
        tools.push(regen);
      }
      const stats = el('span', 'stats', statsText(msg));
      if (msg.stopped) stats.prepend(el('span', 'stopped', msg.stats ? 'stopped \u00b7 ' : 'stopped'));
      tools.push(stats);
    }
    this.tools.replaceChildren(...tools);
  }

  startEdit() {
    const box = el('div', 'edit');
    const area = el('textarea');
    area.value = this.msg.content;
    const send = button('Send', 'Send the edited message', () => {
      if (area.value.trim()) this.actions.onEdit(area.value);
    });
    send.classList.add('primary', 'resend');
    const cancel = button('Cancel', 'Keep the message as it was', () => {
      box.replaceWith(this.body);
      this.tools.hidden = false;
    });
    const row = el('div', 'buttons');
    row.append(send, cancel);
    box.append(area, row);
    this.body.replaceWith(box);
    this.tools.hidden = true;
    area.focus();
  }
}
