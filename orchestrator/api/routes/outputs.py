"""A finished run's files (the storyboard of a story run, the crops of a visual-reasoning run, …) as one zip."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import Response
from starlette.concurrency import run_in_threadpool

from mgmflow.orchestrator.api.deps import Context, CurrentScope, PathId, ThreadId
from mgmflow.orchestrator.api.errors import ApiError
from mgmflow.orchestrator.api.openapi import errors
from mgmflow.orchestrator.outputs import NoOutput, output_archive

router = APIRouter(prefix="/threads", tags=["runs"])


@router.get("/{thread_id}/runs/{run_id}/output", response_class=Response,
            responses={200: {"content": {"application/zip": {}}}, **errors(404, 409)})
async def read_run_output(thread_id: ThreadId, run_id: PathId, context: Context, scope: CurrentScope) -> Response:
    """The run's output folder as a zip, exactly what ``mgmflow run <workflow> --out DIR`` writes into ``DIR``
    (404 for a workflow without files, 409 before the run has succeeded)."""
    run = await run_in_threadpool(context.runs.get_run, run_id, scope=scope)
    if run.thread_id != thread_id:
        raise ApiError(404, f"run {run_id} not found on thread {thread_id}", code="not_found")
    try:
        archive = await run_in_threadpool(output_archive, context.runs, run)
    except NoOutput as error:
        raise ApiError(409 if run.status != "success" else 404, str(error), code=error.code) from None
    name = f"{run.workflow}-{run.run_id}.zip"
    return Response(archive, media_type="application/zip", headers={"Content-Disposition": f'attachment; filename="{name}"'})
