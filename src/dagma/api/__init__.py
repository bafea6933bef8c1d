"""The HTTP API: `dagma serve` (FastAPI) puts the champion model, search and RAG behind tokens.

`dagma.api.app.create_app` builds it; `dagma.client.DagmaClient` calls it. See docs/api.md.
"""
