"""The hub's HTTP API for the school office and integrations (FastAPI served by uvicorn).

Read-only except for leave requests; token auth (api.token_file); the OpenAPI document is at
``/v1/openapi.json``. ``api_server(store, config)`` is what ``edugate hub run`` starts.
"""

from appliance.hub.api.server import ApiServer, api_server

__all__ = ["ApiServer", "api_server"]
