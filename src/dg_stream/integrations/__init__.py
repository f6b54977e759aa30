"""Adapters that put dg_stream behind other frameworks' interfaces.

Each adapter is a module of its own with its own extra, imported explicitly so that
``import dg_stream`` never imports a framework:

- ``dg_stream.integrations.langchain``: ``ChatDGStream``, a LangChain chat model
  (``pip install '.[langchain]'`` in a dg_stream checkout).
"""
