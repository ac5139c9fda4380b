"""The playground: one static page (``/``) that drives the API from a browser."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import RedirectResponse

STATIC_DIR = Path(__file__).resolve().parent.parent / "static"

router = APIRouter(tags=["playground"], include_in_schema=False)


@router.get("/")
def read_playground() -> RedirectResponse:
    """Send browsers to the playground page."""
    return RedirectResponse("/playground/index.html")
