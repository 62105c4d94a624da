"""``ember serve``: an OpenAI-compatible HTTP server with continuous batching.

- :mod:`ember.server.app`: the FastAPI app (:func:`~ember.server.app.create_app`) and its routes.
- :mod:`ember.server.protocol`: request/response bodies in OpenAI's shapes.
- :mod:`ember.server.cli`: :func:`~ember.server.cli.serve`, the server process (HTTP thread + scheduler + signals);
  the ``serve`` verb's arguments are :mod:`ember.commands.serve`.

Importing this package imports nothing heavy; FastAPI is loaded only when a server is built.
"""
