"""The ML of mgmflow: Mini-Gemini (``mgmflow.models.mgm``) and diffusion/editing pipelines (``mgmflow.models.diffusion``).

Knows nothing of queues or graphs; the workers call it.
"""
