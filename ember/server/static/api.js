// The page's only way out: this server's OpenAI routes (same origin, relative URLs), with the API key
// (if the server wants one) kept in sessionStorage: it lasts for this tab and is never written to disk.

const KEY = 'ember.apiKey';

/** An HTTP or protocol error with the server's message (OpenAI error body) and status. */
export class ApiError extends Error {
  constructor(status, message, code = null) {
    super(message);
    this.status = status;
    this.code = code;
  }

  /** True for a missing or wrong API key (the page then asks for the key). */
  get unauthorized() {
    return this.status === 401;
  }
}

async function errorOf(resp) {
  let message = `${resp.status} ${resp.statusText}`.trim();
  let code = null;
  try {
    const body = await resp.json();
    if (body && body.error) {
      message = body.error.message || message;
      code = body.error.code || null;
    }
  } catch (e) { /* not JSON: keep the status line */ }
  return new ApiError(resp.status, message, code);
}

export class Api {
  constructor() {
    this.key = sessionStorage.getItem(KEY) || '';
  }

  setKey(key) {
    this.key = key;
    if (key) sessionStorage.setItem(KEY, key);
    else sessionStorage.removeItem(KEY);
  }

  headers() {
    const h = { 'Content-Type': 'application/json' };
    if (this.key) h.Authorization = `Bearer ${this.key}`;
    return h;
  }

  /** The served models: [{id, max_model_len, ...}] from GET /v1/models. */
  async models() {
    let resp;
    try {
      resp = await fetch('/v1/models', { headers: this.headers(), cache: 'no-store' });
    } catch (e) {
      throw new ApiError(0, `cannot reach the server (${e.message})`);
    }
    if (!resp.ok) throw await errorOf(resp);
    return (await resp.json()).data || [];
  }

  /**
   * Streams a chat completion (POST /v1/chat/completions, stream: true): yields each parsed chunk.
   * The final chunk carries `usage` (stream_options.include_usage). Aborting `signal` closes the
   * connection, which makes the server cancel the sequence and free its KV cache.
   */
  async *streamChat(body, signal) {
    let resp;
    try {
      resp = await fetch('/v1/chat/completions', {
        method: 'POST', headers: this.headers(), signal,
        body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
      });
    } catch (e) {
      if (e.name === 'AbortError') throw e;
      throw new ApiError(0, `cannot reach the server (${e.message})`);
    }
    if (!resp.ok) throw await errorOf(resp);
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buf = '';
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += value;
      let end;
      // Server-sent events: blocks separated by a blank line, payload on "data: " lines.
      while ((end = buf.indexOf('\n\n')) >= 0) {
        const block = buf.slice(0, end);
        buf = buf.slice(end + 2);
        const data = block.split('\n').filter((l) => l.startsWith('data:')).map((l) => l.slice(5).trimStart()).join('\n');
        if (!data) continue;
        if (data === '[DONE]') return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk.error.message || 'generation failed', chunk.error.code);
        yield chunk;
      }
    }
    throw new ApiError(0, 'the server closed the stream before it finished');
  }
}
