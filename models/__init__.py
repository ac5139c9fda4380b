"""The ML of mgmflow: Mini-Gemini (``models.mgm``) and diffusion/editing pipelines (``models.diffusion``).

Knows nothing of queues or graphs; the workers call it.
"""
