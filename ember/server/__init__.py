"""``ember serve``: an OpenAI- and Anthropic-compatible HTTP server with continuous batching.

- :mod:`ember.server.app`: the FastAPI app (:func:`~ember.server.app.create_app`); registers each API module.
- :mod:`ember.server.openai_api`: chat completions (tools, reasoning), completions, models.
- :mod:`ember.server.responses`, :mod:`ember.server.anthropic`, :mod:`ember.server.embeddings`: the other APIs.
- :mod:`ember.server.chat`: one chat turn for every API (template rendering, tool grammar, output parsing).
- :mod:`ember.server.core`: shared state (:class:`~ember.server.core.EmberServer`), requests' sequences, shutdown expiry.
- :mod:`ember.server.settings`: :class:`~ember.server.settings.ServerSettings` and the KV pool plan.
- :mod:`ember.server.errors`: error bodies in each API's shape, validation messages, API-key middleware.
- :mod:`ember.server.protocol`: OpenAI request/response bodies.
- :mod:`ember.server.cli`: :func:`~ember.server.cli.serve`, the server process (HTTP thread + scheduler + signals,
  drain); the ``serve`` verb's arguments are :mod:`ember.commands.serve`.

Importing this package imports nothing heavy; FastAPI is loaded only when a server is built.
"""
