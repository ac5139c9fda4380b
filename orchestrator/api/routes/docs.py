"""``/docs``: Swagger UI from files this server serves itself (the ``fastapi-offline`` package ships them), so the
page works offline and under a content security policy that allows scripts from this origin only (FastAPI's own
page loads Swagger UI from a CDN and starts it with an inline script)."""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles

ASSETS = StaticFiles(directory=Path(fastapi_offline.__file__).parent / "static")
ASSETS_URL = "/docs/assets"

router = APIRouter(tags=["docs"], include_in_schema=False)

_PAGE = f"""<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <title>mgmflow API</title>
  <link rel="stylesheet" href="{ASSETS_URL}/swagger-ui.css">
  <link rel="icon" href="{ASSETS_URL}/favicon.png">
</head>
<body>
  <div id="swagger-ui"></div>
  <script src="{ASSETS_URL}/swagger-ui-bundle.js"></script>
  <script src="/docs/start.js"></script>
</body>
</html>
"""

_START = """window.ui = SwaggerUIBundle({
  url: "/openapi.json",
  dom_id: "#swagger-ui",
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
  layout: "BaseLayout",
  deepLinking: true,
});
"""


@router.get("/docs")
def read_docs() -> HTMLResponse:
    """The interactive API reference."""
    return HTMLResponse(_PAGE)


@router.get("/docs/start.js")
def read_docs_script() -> Response:
    return Response(_START, media_type="text/javascript")
